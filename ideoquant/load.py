"""Load quantized backbones: INT8 output folders through stock diffusers, GGUF files through diffusers' GGUF
machinery; and the same INT8 recipe applied at load time by diffusers (`pipeline_quantization_config`).

A pipeline needs a *base*: the text encoder, tokenizer, VAE and scheduler, in diffusers layout, from a repo that stock
diffusers can load. `ideogram-ai/ideogram-4-fp8` (the quantizer's default source) is not one: its backbones are fused
FP8 and its text encoder is weight-only FP8 under `language_model.*` keys. The bases that work are in
`BASE_PIPELINES`; the two backbones always come from the quantized output, so diffusers never downloads the base's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import model
from .encode import int8
from .errors import IdeoquantError
from .formats.gguf import KEY_CONFIG, read_metadata
from .recipe import Recipe, load_recipe
from .source.hub import check_base

# The default base: the repo diffusers' own docs and examples load. Its text encoder is bitsandbytes NF4.
DEFAULT_BASE_PIPELINE = "ideogram-ai/ideogram-4-nf4-diffusers"
BF16_BASE_PIPELINE = "CalamitousFelicitousness/Ideogram-4-bf16-Diffusers"
# What each base needs (the backbones are ideoquant's in every case).
BASE_PIPELINES = {
    DEFAULT_BASE_PIPELINE: "the official diffusers-layout release; its Qwen3-VL text encoder is bitsandbytes NF4, so "
                           "it needs `pip install bitsandbytes` and a CUDA GPU",
    BF16_BASE_PIPELINE: "a community diffusers-layout bf16 repack; no bitsandbytes, runs anywhere torch does, but the "
                        "bf16 Qwen3-VL-8B text encoder is about 16 GB",
}


def load_transformer(path: str | Path, compute_dtype: torch.dtype = torch.bfloat16, device: str | None = None):
    """An `Ideogram4Transformer2DModel` from an ideoquant output: a `.gguf` file (either layout) or an INT8
    component folder (`OUT/transformer`)."""
    path = Path(path)
    if path.suffix == ".gguf":
        m = load_gguf_transformer(path, compute_dtype)
    elif (path / "config.json").is_file():
        from diffusers import Ideogram4Transformer2DModel

        m = Ideogram4Transformer2DModel.from_pretrained(path, torch_dtype=compute_dtype)
    else:
        raise IdeoquantError(f"{path} is neither a .gguf file nor a component folder with config.json")
    if device:
        m.to(device)
    return m.eval()


def load_pipeline(quantized: str | Path, base: str | Path = DEFAULT_BASE_PIPELINE, compute_dtype=torch.bfloat16,
                  **kwargs):
    """An `Ideogram4Pipeline` with both backbones from `quantized` (an INT8 output folder, or a folder holding the
    two GGUF files ideoquant writes) and everything else from `base`: a diffusers-layout Ideogram 4 pipeline (Hub
    repo id or folder; see `BASE_PIPELINES` for what each needs). `kwargs` go to `from_pretrained` (revision, ...)."""
    from diffusers import Ideogram4Pipeline

    check_base(base, "base")
    quantized = Path(quantized)
    backbones = {c: load_transformer(backbone_path(quantized, c), compute_dtype) for c in model.COMPONENTS}
    try:
        return Ideogram4Pipeline.from_pretrained(base, torch_dtype=compute_dtype, **backbones, **kwargs)
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise IdeoquantError(f"cannot load the base pipeline {base}: {' '.join(str(e).split())} "
                             f"(a base is a diffusers-layout Ideogram 4 pipeline, e.g. {DEFAULT_BASE_PIPELINE}, "
                             f"which needs bitsandbytes on CUDA, or {BF16_BASE_PIPELINE})") from None


def backbone_path(quantized: str | Path, component: str) -> Path:
    """The file or folder of one backbone in an ideoquant output: `<component>/` (INT8) or the one
    `*-<component>-*.gguf` (any type label and layout suffix, e.g. `ideogram4-transformer-Q4_K-diffusers.gguf`)."""
    quantized = Path(quantized)
    ggufs = sorted(quantized.glob(f"*-{component}-*.gguf"))
    if len(ggufs) > 1:
        raise IdeoquantError(f"{quantized} holds {len(ggufs)} {component} GGUF files ({', '.join(f.name for f in ggufs)}); "
                             "keep one type per folder")
    if ggufs:
        return ggufs[0]
    if not (quantized / component / "config.json").is_file():
        raise IdeoquantError(f"{quantized} holds no {component} (neither {component}/config.json nor "
                             f"*-{component}-*.gguf)")
    return quantized / component


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


def pipeline_quantization_config(recipe: str | Recipe = "int8-w8a8", config: dict | None = None):
    """A diffusers `PipelineQuantizationConfig` that quantizes both backbones with torchao like `convert` does.

    Use it with a base that holds bf16 backbones in diffusers layout (not the FP8 release, not the NF4 repo):
    `Ideogram4Pipeline.from_pretrained(BF16_BASE_PIPELINE, quantization_config=pipeline_quantization_config(),
    torch_dtype=torch.bfloat16)`.

    `modules_to_not_convert` is the recipe's protected modules expanded against the model's config (default:
    the real Ideogram 4 shape), since diffusers matches them by name, not by glob.
    """
    from diffusers import PipelineQuantizationConfig, TorchAoConfig

    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    spec = model.model_spec(config or {})
    protected = r.protected_modules(sorted(spec.linear_modules))
    return PipelineQuantizationConfig(quant_mapping={
        c: TorchAoConfig(int8.config(), modules_to_not_convert=protected) for c in model.COMPONENTS
    })
