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


def _encoder(bf16):
    """The compiled encoder (x, out) of BF16 (bf16) or F16 (IEEE binary16: round to nearest even, subnormals
    included, >= 65520 -> inf, NaN -> 0x7E00 | sign): every value's 16-bit code, little-endian."""

    @jit
    def encode(x, out):
        xf = x.reshape(-1)  # rows are contiguous in x and in out: one flat pass
        of = out.reshape(-1)
        for j in range(xf.shape[0]):
            h = bf16_bits(xf[j]) if bf16 else fp16_bits(xf[j])
            of[2 * j] = np.uint8(h & 0xFF)
            of[2 * j + 1] = np.uint8((h >> 8) & 0xFF)

    return encode


encode_f16 = _encoder(False)
encode_bf16 = _encoder(True)
