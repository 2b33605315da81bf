"""F16 and BF16: ggml's ``ggml_fp32_to_fp16_row`` and ``ggml_fp32_to_bf16_row_ref``, as little-endian bytes."""

from __future__ import annotations

import numpy as np

from .common import f32_bits, fp16_bits, jit


@jit
def bf16_bits(f):
    """float32 -> bfloat16 bits: NaN -> (bits >> 16) | 0x40; otherwise (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    (round to nearest even)."""
    u = np.int64(f32_bits(f)) & 0xFFFFFFFF
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


@jit
def _put_u16(o, pos, h):
    """Store the 16-bit code h little-endian at o[pos:pos+2]."""
    o[pos] = np.uint8(h & 0xFF)
    o[pos + 1] = np.uint8((h >> 8) & 0xFF)


@jit
def encode_16(bf16, x, out):
    """Every value of x as its 16-bit code: bfloat16 (bf16) or IEEE binary16 (round to nearest even, subnormals
    included, >= 65520 -> inf, NaN -> 0x7E00 | sign). Rows are contiguous in x and out, so one flat pass does it."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    if bf16:
        for j in range(xf.shape[0]):
            _put_u16(of, 2 * j, bf16_bits(xf[j]))
    else:
        for j in range(xf.shape[0]):
            _put_u16(of, 2 * j, fp16_bits(xf[j]))
