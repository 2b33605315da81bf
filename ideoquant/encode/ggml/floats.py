"""F16 and BF16: ggml's ``ggml_fp32_to_fp16_row`` and ``ggml_fp32_to_bf16_row_ref``, as little-endian bytes."""

from __future__ import annotations

import numpy as np

from .common import f32_bits, fp16_bits, jit


@jit
def encode_f16(x, out):
    """Round to nearest even (subnormals included), >= 65520 -> inf, NaN -> 0x7E00 | sign."""
    rows, cols = x.shape
    for r in range(rows):
        xr = x[r]
        o = out[r]
        for j in range(cols):
            h = fp16_bits(xr[j])
            o[2 * j] = np.uint8(h & 0xFF)
            o[2 * j + 1] = np.uint8((h >> 8) & 0xFF)


@jit
def encode_bf16(x, out):
    """NaN -> (bits >> 16) | 0x40; otherwise (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 (round to nearest even)."""
    rows, cols = x.shape
    for r in range(rows):
        xr = x[r]
        o = out[r]
        for j in range(cols):
            u = np.int64(f32_bits(xr[j])) & 0xFFFFFFFF
            if (u & 0x7FFFFFFF) > 0x7F800000:
                h = (u >> 16) | 0x40
            else:
                h = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            o[2 * j] = np.uint8(h & 0xFF)
            o[2 * j + 1] = np.uint8((h >> 8) & 0xFF)
