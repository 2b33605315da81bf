"""GGUF: the public encoder API (like gguf-py's `quants`) and loading Ideogram 4 GGUF files into diffusers.

`quantize(x, qtype)` / `dequantize(q, qtype)` are bit-exact with ggml's reference quantizers (see
`ideoquant.encode.ggml`). `load_gguf_transformer` builds an `Ideogram4Transformer2DModel` whose linear
layers keep their GGUF weights and dequantize on the fly, on diffusers' own GGUF machinery
(`GGUFParameter`, `GGUFLinear`): diffusers 0.42's `from_single_file` does not list Ideogram 4 yet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import model
from .encode.ggml import QTYPES, can_quantize, dequantize, quantize, type_size  # noqa: F401  (public API)
from .errors import IdeoquantError

ARCH = "ideogram4"
KEY_COMPONENT = "ideogram4.component"
KEY_CONFIG = "ideogram4.diffusers_config"  # the component's diffusers config.json, as JSON text
KEY_LAYOUT = "ideogram4.layout"
KEY_RECIPE = "ideoquant.recipe"
KEY_VERSION = "ideoquant.version"


def read_metadata(path: str | Path) -> dict:
    """The GGUF key/value pairs as Python values (strings, numbers, lists)."""
    reader = _reader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _reader(path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise IdeoquantError(f"cannot read GGUF file {path}: {e}") from None


def load_gguf_transformer(path: str | Path, compute_dtype: torch.dtype = torch.bfloat16, config: dict | None = None):
    """An Ideogram4Transformer2DModel from a GGUF file of either layout (original fused qkv, or diffusers names).

    The config comes from the file's `ideogram4.diffusers_config` key, else from `config`, else from the tensor
    shapes. Quantized linear weights stay quantized (GGUFLinear dequantizes per forward pass).
    """
    from accelerate import init_empty_weights
    from diffusers import GGUFQuantizationConfig, Ideogram4Transformer2DModel
    from diffusers.models.model_loading_utils import load_gguf_checkpoint, load_model_dict_into_meta
    from diffusers.quantizers import DiffusersAutoQuantizer
    from diffusers.quantizers.gguf.utils import GGUFParameter

    path = Path(path)
    if not path.is_file():
        raise IdeoquantError(f"no such GGUF file: {path}")
    meta = read_metadata(path)
    try:
        checkpoint = load_gguf_checkpoint(str(path))
    except (ValueError, OSError) as e:
        raise IdeoquantError(f"cannot load GGUF file {path}: {str(e).splitlines()[0]}") from None
    state = {}
    for name, t in checkpoint.items():
        parts = model.original_to_diffusers(name)
        if len(parts) == 1:
            state[parts[0][0]] = t
            continue
        rows = t.shape[0] // len(parts)  # GGUF quants are per row: row blocks of the bytes are row blocks of the weight
        for new, i in parts:
            piece = t.data[i * rows : (i + 1) * rows].clone()
            state[new] = GGUFParameter(piece, quant_type=t.quant_type) if isinstance(t, GGUFParameter) else piece
    if config is None and KEY_CONFIG in meta:
        config = json.loads(meta[KEY_CONFIG])
    if config is None:
        shapes = {k: _logical_shape(v) for k, v in state.items()}
        config = model.infer_config(shapes)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    quantizer = DiffusersAutoQuantizer.from_config(GGUFQuantizationConfig(compute_dtype=compute_dtype))
    with init_empty_weights():
        m = Ideogram4Transformer2DModel.from_config(config)
    expected = set(m.state_dict())
    missing = sorted(expected - set(state))
    if missing or set(state) - expected:
        raise IdeoquantError(f"{path.name} is not an Ideogram 4 backbone for this config "
                             f"(missing {missing[:1]}, unexpected {sorted(set(state) - expected)[:1]})")
    quantizer.preprocess_model(model=m, device_map=None, state_dict=state, keep_in_fp32_modules=[])
    load_model_dict_into_meta(m, state, dtype=compute_dtype, device_map={"": torch.device("cpu")},
                              hf_quantizer=quantizer, keep_in_fp32_modules=[], unexpected_keys=[])
    quantizer.postprocess_model(m)
    m.hf_quantizer = quantizer
    return m.eval()


def _logical_shape(t) -> tuple[int, ...]:
    return tuple(getattr(t, "quant_shape", None) or t.shape)


def gguf_filename(component: str, label: str) -> str:
    """`ideogram4-transformer-Q4_K.gguf`: names say component and type."""
    return f"ideogram4-{component}-{label}.gguf"


def file_label(qtype_option: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "", qtype_option).upper()
