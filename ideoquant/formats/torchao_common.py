"""What the torchao formats (INT8 W8A8, FP8 W8A8) share: an output stock diffusers loads with `from_pretrained`,
recognised by the torchao config its `config.json` names, fake-quantized in memory with torchao's own `quantize_`.

Not a format itself: `formats/int8.py` and `formats/fp8.py` use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import model
from . import Recognised


def config_type(folder: Path) -> str | None:
    """The torchao config class a component folder's `config.json` names (`Int8DynamicActivationInt8WeightConfig`),
    or None (no such file, not torchao)."""
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "torchao":
        return None
    quant_type = qc.get("quant_type")
    default = quant_type.get("default") if isinstance(quant_type, dict) else None
    return default.get("_type") if isinstance(default, dict) else None


def recognise(path: Path, config_name: str) -> list[Recognised]:
    """A component folder, or an output folder of component folders, quantized with this torchao config."""
    if not path.is_dir():
        return []
    if config_type(path) == config_name:
        return [Recognised({path.name if path.name in model.COMPONENTS else "transformer": path})]
    comps = {c: path / c for c in model.COMPONENTS if config_type(path / c) == config_name}
    return [Recognised(comps)] if comps else []


def load(path: Path, compute_dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel.from_pretrained(path, torch_dtype=compute_dtype)


def fake_quantize(m: torch.nn.Module, config, types: Mapping[str, Any]) -> dict[str, torch.nn.Parameter]:
    """torchao's `quantize_` with `config` on exactly these linears (torchao computes with the result)."""
    from torchao.quantization import quantize_

    modules = dict(m.named_modules())
    wanted = set(types)
    saved = {n: modules[n].weight for n in types}
    quantize_(m, config, filter_fn=lambda mod, fqn: fqn in wanted)
    return saved

