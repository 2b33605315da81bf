"""MXFP4 and NVFP4: ggml's ``quantize_row_mxfp4_ref`` / ``quantize_row_nvfp4_ref``, as bytes.

Both store E2M1 (FP4) codes, gguf-py's ``MXFP4.kvalues`` (doubled E2M1 values, as ggml's ``kvalues_mxfp4``), each
the first nearest level to x / scale. MXFP4 (32 values, 17 B: e, qs[16]): one E8M0 exponent per block,
e = floor(log2(amax)) - 2 + 127, scale 2^(e - 128). NVFP4 (64 values, 36 B: d[4], qs[32]): one unsigned E4M3 scale
per 16 values, ue4m3(amax / 6), read back with ggml's factor 1/2. ggml ignores an importance matrix for both.
"""

from __future__ import annotations

import gguf
import numpy as np

from .common import F32, ZERO, bits_f32, f32_bits, jit

LEVELS = np.array(gguf.quants.MXFP4.kvalues, np.float32)  # 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ... -12


@jit
def _codes(xr, base, n, d, levels, o, pos):
    """ggml's best_index_mxfp4 for xr[base:base+n] with scale d (the first level with the least |level·d - x|),
    packed two per byte (value j low nibble, value j + n/2 high) at o[pos:pos+n/2]."""
    half = n // 2
    for j in range(half):
        b = np.uint8(0)
        for h in range(2):
            v = xr[base + h * half + j]
            best = abs(levels[0] * d - v)
            k = 0
            for i in range(1, 16):
                err = abs(levels[i] * d - v)
                if err < best:
                    best = err
                    k = i
            b |= np.uint8(k << (4 * h))
        o[pos + j] = b


@jit
def _amax(xr, base, n):
    amax = ZERO
    for j in range(n):
        a = abs(xr[base + j])
        if amax < a:
            amax = a
    return amax


@jit
def e8m0_half(e):
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 (subnormal for e < 2)."""
    return bits_f32(np.int32(0x00200000) << e) if e < 2 else bits_f32(np.int32(e - 1) << 23)


@jit
def ue4m3_bits(x):
    """ggml_fp32_to_ue4m3: unsigned E4M3 (bias 7) of a float32, mantissa rounded half up, saturating at 0x7E."""
    if not x > ZERO:
        return 0
    if x > F32(448.0):
        x = F32(448.0)
    bits = f32_bits(x)
    exp = ((bits >> 23) & 0xFF) - 127 + 7
    man = (bits >> 20) & 0x7
    if exp <= 0:
        m = np.int32(x * F32(512.0) + F32(0.5))
        return 0 if m < 1 else min(m, 7)
    if exp >= 15:
        return 0x7E
    man += (bits >> 19) & 1
    if man > 7:
        man = 0
        exp += 1
        if exp >= 15:
            return 0x7E
    return (exp << 3) | man


@jit
def ue4m3_half(u):
    """ggml_ue4m3_to_fp32: the E4M3 value times 1/2 (0 for 0 and 0x7F)."""
    if u == 0 or u == 0x7F:
        return ZERO
    exp = (u >> 3) & 0xF
    man = F32(u & 0x7)
    if exp == 0:
        raw = man * F32(2.0 ** -9)
    else:
        raw = (F32(1.0) + man / F32(8.0)) * bits_f32(np.int32(exp - 7 + 127) << 23)
    return raw * F32(0.5)


@jit
def _mx_scale(xr, base, o, pos):
    """MXFP4's block scale: (uint8_t)(floorf(log2f(amax)) - 2 + 127), float32 throughout, truncated as x86 converts
    (0 for an all-zero block); stored at o[pos], returned as 2^(e - 128)."""
    amax = _amax(xr, base, 32)
    e = (np.int32(np.floor(np.log2(amax)) - F32(2) + F32(127)) & 0xFF) if amax > ZERO else 0
    o[pos] = np.uint8(e)
    return e8m0_half(e)


@jit
def _nv_scale(xr, base, o, pos):
    """NVFP4's sub-block scale: ue4m3(amax / 6), stored at o[pos], returned as ggml reads it back (value / 2)."""
    u = ue4m3_bits(_amax(xr, base, 16) / F32(6.0))
    o[pos] = np.uint8(u)
    return ue4m3_half(u)


def _encoder(nv):
    """The compiled encoder (x, out) of MXFP4 (nv False: blocks of 32, e then qs[16]) or NVFP4 (nv True: blocks of
    64, four sub-block scales d[4] then qs[32], 16 values per scale)."""
    block, group, head, bpb = (64, 16, 4, 36) if nv else (32, 32, 1, 17)

    @jit
    def encode(x, out):
        rows, cols = x.shape
        for r in range(rows):
            xr = x[r]
            o = out[r]
            for b in range(cols // block):
                for s in range(block // group):
                    base = b * block + s * group
                    d = _nv_scale(xr, base, o, b * bpb + s) if nv else _mx_scale(xr, base, o, b * bpb)
                    _codes(xr, base, group, d, LEVELS, o, b * bpb + head + s * group // 2)

    return encode


encode_mxfp4 = _encoder(False)
encode_nvfp4 = _encoder(True)
