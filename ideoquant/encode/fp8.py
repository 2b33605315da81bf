"""The FP8 (e4m3fn) per-row source format: `w = fp8 * scale[:, None]`, dequantized exactly in float32."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import damaged_tensor


def dequantize_fp8r(weight: torch.Tensor, weight_scale: torch.Tensor, out: torch.Tensor | None = None,
                    name: str | None = None, q8_0: np.ndarray | None = None) -> torch.Tensor:
    """The release's FP8 dequantization, `weight.float() * weight_scale[:, None]`, bit for bit (what diffusers'
    `dequantize_fp8r` computes).

    tests/test_int8.py checks every FP8 value against diffusers' own function. One compiled GIL-free pass (each
    value built from its code's bits, see `kernels._fp8_value`, and a float32 multiply; torch's `.float()` is not
    vectorized on CPU: 4.4 ms per million values against 0.2 ms), into `out` (float32, the weight's shape) when
    given, and without importing diffusers (seconds of CPU) to convert an FP8 release.
    name: a NaN or Inf in the result is then an error naming the tensor (found in the same pass).
    q8_0: uint8 [rows, cols / 32 * 34]: also the result's ggml Q8_0 bytes (`ggml.encode(..., "Q8_0")`'s), encoded
    slice by slice while the float32 rows are in cache (see `fp8_q8_0`).
    """
    from . import kernels

    out = torch.empty(weight.shape, dtype=torch.float32) if out is None else out
    cols = weight.shape[-1] if weight.dim() else 1
    codes = weight.contiguous().view(torch.uint8).reshape(-1, cols).numpy()
    scale = weight_scale.to(torch.float32).contiguous().reshape(-1).numpy()
    if q8_0 is None:
        finite = kernels.dequantize_fp8(codes, scale, out.view(-1, cols).numpy())
    else:
        from .fp8_q8_0 import dequantize_fp8_q8_0

        if (cols % 32 or q8_0.dtype != np.uint8 or q8_0.shape != (codes.shape[0], cols // 32 * 34)
                or not q8_0.flags.c_contiguous):
            raise ValueError(f"q8_0 must be C-contiguous uint8 [{codes.shape[0]}, {cols // 32 * 34}] and the rows a "
                             "multiple of 32 long")
        finite = dequantize_fp8_q8_0(codes, scale, out.view(-1, cols).numpy(), q8_0)
    if name is not None and not finite:
        raise damaged_tensor(name)
    return out


def fp8r_to_bf16(codes: torch.Tensor, row_scale: torch.Tensor, out: torch.Tensor, name: str) -> tuple[float, float]:
    """FP8 rows as stored (e4m3fn codes [r, K], float32 scale per row [r]) into `out` (bfloat16 [r, K]) as
    `dequantize_fp8r(...).to(torch.bfloat16)` gives them, in one compiled pass without the float32 block; returns
    the signal and noise energies of that rounding. A NaN or Inf is an error naming the tensor, as there."""
    from . import kernels

    energy = np.empty((2, codes.shape[0]))
    finite = kernels.fp8_to_bf16(codes.contiguous().view(torch.uint8).numpy(),
                                 row_scale.to(torch.float32).contiguous().numpy(),
                                 out.view(torch.int16).numpy().view(np.uint16), energy)
    if not finite:
        raise damaged_tensor(name)
    signal, noise = energy.sum(axis=1).tolist()
    return signal, noise
