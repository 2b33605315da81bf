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

from . import formats, model
from .errors import IdeoquantError
from .recipe import Recipe
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
    """An `Ideogram4Transformer2DModel` from one backbone of an ideoquant output, loaded by the format that wrote it
    (`formats.recognise`): a `.gguf` file (either layout), or a torchao component folder (`OUT/transformer`). Any
    other diffusers component folder (a bf16 source's) loads as it is."""
    path = Path(path)
    found = formats.recognise(path) if path.exists() else []
    if found:
        m = found[0][0].load(path, compute_dtype)
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
    """The file or folder of one backbone in an ideoquant output, as the format that wrote it says
    (`formats.recognise`): `<component>/` (torchao formats) or the one `*-<component>-*.gguf`."""
    quantized = Path(quantized)
    paths = [r.paths[component] for _, r in formats.recognise(quantized) if component in r.paths]
    if len(paths) > 1:
        raise IdeoquantError(f"{quantized} holds {len(paths)} {component} backbones "
                             f"({', '.join(p.name for p in paths)}); keep one type per folder")
    if not paths:
        raise IdeoquantError(f"{quantized} holds no {component} (neither a quantized {component}/config.json nor "
                             f"*-{component}-*.gguf)")
    return paths[0]


def pipeline_quantization_config(recipe: str | Recipe = "int8-w8a8", config: dict | None = None):
    """A diffusers `PipelineQuantizationConfig` that quantizes both backbones with torchao like `convert` does.

    Use it with a base that holds bf16 backbones in diffusers layout (not the FP8 release, not the NF4 repo):
    `Ideogram4Pipeline.from_pretrained(BF16_BASE_PIPELINE, quantization_config=pipeline_quantization_config(),
    torch_dtype=torch.bfloat16)`.

    `modules_to_not_convert` is the recipe's protected modules expanded against the model's config (default:
    the real Ideogram 4 shape), since diffusers matches them by name, not by glob.
    """
    from diffusers import PipelineQuantizationConfig, TorchAoConfig

    r = formats.resolve(recipe)
    torchao_config = getattr(formats.get(r.format), "torchao_config", None)
    if torchao_config is None:
        raise IdeoquantError(f"recipe '{r.name}' is a {r.format} recipe; diffusers applies torchao recipes only")
    spec = model.model_spec(config or {})
    protected = r.protected_modules(sorted(spec.linear_modules))
    return PipelineQuantizationConfig(quant_mapping={
        c: TorchAoConfig(torchao_config(), modules_to_not_convert=protected) for c in model.COMPONENTS
    })
