"""Tiny Ideogram 4 checkpoints, built with diffusers' own class, and deterministic inputs for them.

Used by `ideoquant demo`, by the tests and by the benchmarks: the whole job runs offline on a model that
has every module of the real one, only narrower and shallower.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import model

# Widths are multiples of 256 so that the K-quants apply; in_channels (64) is not, so input_proj exercises
# the fallback. attention_head_dim must be 128: the default mrope_section (24, 20, 20) covers 64 frequencies.
TINY_CONFIG = dict(
    in_channels=64,
    num_layers=2,
    attention_head_dim=128,
    num_attention_heads=2,
    intermediate_size=512,
    adaln_dim=256,
    llm_features_dim=512,
)


def build_model(config: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised float32 Ideogram4Transformer2DModel with non-trivial norms and biases."""
    from diffusers import Ideogram4Transformer2DModel

    torch.manual_seed(seed)
    m = Ideogram4Transformer2DModel(**(config or TINY_CONFIG))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:  # norms at 1 and biases at 0 would hide mistakes in how they are carried
                p.copy_((1.0 if "norm" in name else 0.0) + 0.05 * torch.randn_like(p))
    return m.eval()


def build_checkpoint(
    path: str | Path,
    *,
    config: dict | None = None,
    fmt: str = "bf16",
    layout: str = "diffusers",
    max_shard_size: str | int = "2MB",
    seed: int = 0,
) -> Path:
    """Write a pipeline folder (model_index.json, transformer/, unconditional_transformer/).

    fmt: "bf16", "fp16", "fp32" or "fp8" (float8_e4m3fn weights with float32 per-row `weight_scale`, the
    diffusers BFL fp8r scheme). layout "original" writes one `ideogram4.safetensors` file instead, with
    fused `attention.qkv`, `attention.o` and `conditional_transformer.` / `unconditional_transformer.` prefixes.
    """
    from diffusers.quantizers.bfl.utils import quantize_fp8r
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}[fmt]
    single: dict[str, torch.Tensor] = {}
    for i, component in enumerate(model.COMPONENTS):
        m = build_model(config, seed=seed + i)
        if layout == "diffusers" and fmt != "fp8":
            m.to(dtype).save_pretrained(path / component, max_shard_size=max_shard_size)
            continue
        sd = {k: v.to(dtype).contiguous() for k, v in m.state_dict().items()}
        if fmt == "fp8":
            linear = model.model_spec(dict(m.config)).linear_modules
            for k in list(sd):
                if k.endswith(".weight") and k[:-7] in linear:
                    sd[k], sd[k + "_scale"] = quantize_fp8r(sd[k].float())
        if layout == "original":
            prefix = "conditional_transformer." if component == "transformer" else "unconditional_transformer."
            single.update({prefix + k: v for k, v in _fuse(sd).items()})
        else:
            (path / component).mkdir(exist_ok=True)
            m.save_config(path / component)
            if fmt == "fp8":  # as an FP8 release marks itself for diffusers' BFL fp8r loader
                cfg_file = path / component / "config.json"
                cfg = json.loads(cfg_file.read_text())
                cfg["quantization_config"] = {"quant_method": "bfl", "compute_dtype": "bfloat16", "pre_quantized": True}
                cfg_file.write_text(json.dumps(cfg, indent=2))
            save_file(sd, path / component / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    if layout == "original":
        save_file(single, path / "ideogram4.safetensors", metadata={"format": "pt"})
        return path / "ideogram4.safetensors"
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": model.PIPELINE_CLASS,
        "_diffusers_version": _diffusers_version(),
        "transformer": ["diffusers", model.MODEL_CLASS],
        "unconditional_transformer": ["diffusers", model.MODEL_CLASS],
    }, indent=2))
    return path


def _fuse(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> original layout (fused qkv rows, `attention.o`); FP8 scales follow their rows."""
    out: dict[str, list] = {}
    for k, v in sd.items():
        base, suffix = (k[: -len("_scale")], "_scale") if k.endswith(".weight_scale") else (k, "")
        name, idx = model.diffusers_to_original(base)
        out.setdefault(name + suffix, []).append((idx, v))
    return {k: torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])]) for k, parts in out.items()}


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def build_outlier_checkpoint(path: str | Path, outlier: float = 100.0) -> Path:
    """The tiny model with activation outlier channels, the way they arise in real transformers: a few channels of
    the norms before q/k/v, w1/w3 and llm_cond_proj are `outlier` times larger, and the weight columns that read
    them as much smaller, so the bf16 model computes the same function while those linears' inputs carry outliers
    (which per-token int8 activation quantization handles badly and SmoothQuant moves into the weights, and which
    make those small weight columns matter: what an importance matrix tells the GGUF quantizers)."""
    from safetensors.torch import load_file, save_file

    path = build_checkpoint(path, max_shard_size="100MB")
    ch, text_ch = [3, 77, 150, 201], [5, 300]

    def scale(sd, key, idx, factor, dim):
        w = sd[key].float()
        if dim == 0:
            w[idx] *= factor
        else:
            w[:, idx] *= factor
        sd[key] = w.bfloat16()

    for c in model.COMPONENTS:
        f = path / c / "diffusion_pytorch_model.safetensors"
        sd = load_file(f)
        for k in list(sd):
            if k.endswith(("attention_norm1.weight", "ffn_norm1.weight")):
                scale(sd, k, ch, outlier, 0)
            if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "w1.weight", "w3.weight")):
                scale(sd, k, ch, 1 / outlier, 1)
        scale(sd, "llm_cond_norm.weight", text_ch, outlier, 0)
        scale(sd, "llm_cond_proj.weight", text_ch, 1 / outlier, 1)
        save_file(sd, f, metadata={"format": "pt"})
    return path
