"""SmoothQuant's smoothing factor, torchao 0.18's math (`torchao/prototype/smoothquant/core.py`)."""

from __future__ import annotations

import torch

DTYPE = torch.bfloat16  # the model's compute dtype: torchao computes the factor in the weight/activation dtype
EPS = torch.finfo(torch.float32).eps
# The header key of the statistics file `ideoquant calibrate` writes and `convert --smoothquant` reads.
KEY_STATS = "ideoquant.smoothquant"


def smoothing_factor(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """torchao 0.18 `RunningAbsMaxSmoothQuantObserver.compute_smoothing_factor`, on bf16 absmaxes (the model dtype)."""
    x = x_absmax.to(DTYPE)
    w = w_absmax.to(DTYPE)
    return torch.pow(x + EPS, alpha) / torch.pow(w + EPS, 1 - alpha)
