"""SmoothQuant's convert-time part for the INT8 W8A8 output, the way torchao 0.18's `SmoothQuantConfig` does it.

`ideoquant calibrate` (`evaluation/calibrate.py`) runs the source backbones on sample or captured inputs with a
forward pre-hook on every linear the recipe quantizes and keeps a running per-input-channel max |x| (what
torchao's `RunningAbsMaxSmoothQuantObserver` keeps). The statistics go to a safetensors file: one float32 vector
per `<component>.<module>` (the bf16 absmax, exactly), provenance in the header.

`convert(..., smoothquant=stats, alpha=0.5)` then applies, per quantized linear, torchao's
`torchao/prototype/smoothquant/core.py` math in the model dtype (bf16):

    s = (max|X_j| + eps) ** alpha / (max|W_:,j| + eps) ** (1 - alpha),   eps = torch.finfo(torch.float32).eps

the weight becomes `W * s` and is quantized with the base config (per-row int8, `encode/int8.py`), and the Int8Tensor
carries `act_pre_scale = 1 / s` (its linear multiplies the activation by it before the per-token int8 quantization).
In torchao's safetensors format that is one more key, `<module>._weight_act_pre_scale` (bf16 [in_features]), and
`act_pre_scale` in the tensor's `_tensor_data_names`; `layout` takes both from a meta Int8Tensor with the pre-scale
set, so stock `Ideogram4Transformer2DModel.from_pretrained` loads the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import model as model_mod
from .. import sidecar
from ..encode.smoothing import DTYPE, KEY_STATS, smoothing_factor
from ..errors import IdeoquantError
from ..plan import row_blocks
from ..write.hashing import sha256_file
from . import BLOCK_ELEMENTS



# ---------------------------------------------------------------- statistics


@dataclass
class Statistics:
    path: Path
    absmax: dict[str, dict[str, torch.Tensor]]  # component -> module -> float32 [in_features]
    provenance: dict
    sha256: str

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        path = Path(path)
        provenance, tensors = sidecar.read(path, KEY_STATS, "SmoothQuant statistics", "ideoquant calibrate")
        absmax: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in tensors.items():
            c, _, module = k.partition(".")
            absmax.setdefault(c, {})[module] = t
        return cls(path, absmax, provenance, sha256_file(path))


def layout(name: str, shape: tuple[int, int], dtype: torch.dtype = DTYPE):
    """Keys, dtypes, shapes and torchao metadata of a smoothed weight: a meta Int8Tensor with act_pre_scale set."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    from ..encode import int8

    meta = int8._quantize(torch.empty(shape, dtype=dtype, device="meta"))
    meta.act_pre_scale = torch.empty(shape[1], dtype=DTYPE, device="meta")
    tensors, metadata = flatten_tensor_state_dict({name: meta})
    return int8.Int8Layout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata[name])


@dataclass
class Smoothing:
    """One weight's factor: `smooth` the rows before quantizing, `unsmooth` the dequantized rows (effective weight)."""

    factor: torch.Tensor  # s, bf16 [in_features]
    act_pre_scale: torch.Tensor  # 1 / s, bf16

    def smooth(self, block: torch.Tensor) -> torch.Tensor:
        return block * self.factor.to(block.device)

    def unsmooth(self, dequantized: torch.Tensor) -> torch.Tensor:
        return dequantized / self.factor.to(dequantized.device, torch.float32)


@dataclass
class Smoother:
    """What `convert` needs: which weights are smoothed, their layout, their factor; and the manifest record."""

    stats: Statistics
    alpha: float
    modules: dict[str, list[str]] = field(default_factory=dict)  # component -> smoothed modules

    def applies(self, component: str, tensor: str) -> bool:
        return model_mod.module_of(tensor) in self.modules.get(component, ())

    def layout(self, tensor: str, shape):
        return layout(tensor, tuple(shape))

    def prepare(self, component: str, t) -> Smoothing:
        """Column absmax of the source weight (a first streamed pass over its rows), then torchao's factor."""
        w_absmax = None
        for _, src, rows in row_blocks([t], BLOCK_ELEMENTS):
            m = src.read(rows).abs().amax(dim=0)
            w_absmax = m if w_absmax is None else torch.maximum(w_absmax, m)
        x_absmax = self.stats.absmax[component][model_mod.module_of(t.name)]
        if x_absmax.shape != w_absmax.shape:
            raise IdeoquantError(f"SmoothQuant statistics for {component}.{t.name}: {tuple(x_absmax.shape)} channels, "
                                 f"the weight has {tuple(w_absmax.shape)}")
        s = smoothing_factor(x_absmax, w_absmax, self.alpha)
        return Smoothing(s, 1.0 / s)

    def record(self) -> dict:
        p = self.stats.provenance
        return {
            "statistics": {"file": self.stats.path.name, "sha256": self.stats.sha256, "provenance": p},
            "alpha": self.alpha,
            "formula": "s = (max|X_j| + eps)^alpha / (max|W_:,j| + eps)^(1 - alpha) in bf16, eps = float32 eps "
                       "(torchao 0.18 prototype/smoothquant); weight W * s; act_pre_scale = 1 / s",
            "modules": self.modules,
        }


def smoother_for(stats_path: str | Path | None, alpha: float, plans: dict) -> Smoother | None:
    """Check the statistics against the plans (every quantized linear needs its absmax) and build the Smoother."""
    if stats_path is None:
        return None
    if not 0.0 <= alpha <= 1.0:
        raise IdeoquantError(f"--alpha must be between 0 and 1, not {alpha}")
    stats = Statistics.load(stats_path)
    sm = Smoother(stats, float(alpha))
    for c, plan in plans.items():
        have = stats.absmax.get(c)
        if have is None:
            raise IdeoquantError(f"SmoothQuant statistics {stats.path.name} hold nothing for {c} "
                                 f"(they cover {', '.join(stats.absmax) or 'nothing'}); run `ideoquant calibrate` "
                                 "on it")
        mods = [model_mod.module_of(t.name) for t in plan.tensors if t.quantize]
        missing = [m for m in mods if m not in have]
        if missing:
            raise IdeoquantError(f"SmoothQuant statistics {stats.path.name} lack {c}.{missing[0]} "
                                 f"({len(missing)} quantized modules without statistics): calibrate with the same "
                                 "recipe")
        for t in plan.tensors:
            if t.quantize and have[model_mod.module_of(t.name)].shape != (t.shape[1],):
                raise IdeoquantError(f"SmoothQuant statistics for {c}.{t.name} have "
                                     f"{tuple(have[model_mod.module_of(t.name)].shape)} channels, the weight "
                                     f"{t.shape[1]}: statistics of another model?")
        sm.modules[c] = mods
    return sm


def smoothed_modules(manifest: dict, component: str) -> set[str]:
    """Modules stored with `_weight_act_pre_scale` in an output (for readers of the manifest, e.g. verify)."""
    return set(((manifest.get("smoothquant") or {}).get("modules") or {}).get(component, ()))
