"""Load quantized backbones: INT8 output folders through stock diffusers, GGUF files through diffusers' GGUF machinery."""

from __future__ import annotations

from pathlib import Path

import torch

from . import model
from .errors import IdeoquantError


def load_transformer(path: str | Path, compute_dtype: torch.dtype = torch.bfloat16, device: str | None = None):
    """An `Ideogram4Transformer2DModel` from an ideoquant output: a `.gguf` file (either layout) or an INT8
    component folder (`OUT/transformer`)."""
    path = Path(path)
    if path.suffix == ".gguf":
        from .gguf import load_gguf_transformer

        m = load_gguf_transformer(path, compute_dtype)
    elif (path / "config.json").is_file():
        from diffusers import Ideogram4Transformer2DModel

        m = Ideogram4Transformer2DModel.from_pretrained(path, torch_dtype=compute_dtype)
    else:
        raise IdeoquantError(f"{path} is neither a .gguf file nor a component folder with config.json")
    if device:
        m.to(device)
    return m.eval()


def load_pipeline(quantized: str | Path, base: str = model.DEFAULT_SOURCE, compute_dtype=torch.bfloat16, **kwargs):
    """An `Ideogram4Pipeline` from `base` (text encoder, VAE, scheduler) with both backbones from `quantized`:
    an INT8 output folder, or a folder holding the two GGUF files ideoquant writes."""
    from diffusers import Ideogram4Pipeline

    quantized = Path(quantized)
    backbones = {}
    for c in model.COMPONENTS:
        ggufs = sorted(quantized.glob(f"*-{c}-*.gguf"))
        target = ggufs[0] if ggufs else quantized / c
        if not ggufs and not (target / "config.json").is_file():
            raise IdeoquantError(f"{quantized} holds no {c} (neither {c}/config.json nor *-{c}-*.gguf)")
        backbones[c] = load_transformer(target, compute_dtype)
    return Ideogram4Pipeline.from_pretrained(base, torch_dtype=compute_dtype, **backbones, **kwargs)
