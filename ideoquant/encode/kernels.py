"""Compiled CPU loops for the INT8 encoder: one pass per row instead of a dozen torch ops per block.

torchao's per-row INT8 math is a handful of elementwise steps; done as torch ops each step is a pass over the
block and a call that takes the GIL, and the encoder threads share it. Here each row is widened to float32 once
(bf16 bits shifted, FP8 values built from their codes' bits and scaled), quantized and measured in cache, with
the GIL released for the whole block. The arithmetic is the same IEEE float32 operations in the same order as
torch's (no fast-math on anything that feeds the result), so the bits equal torchao's: tests/test_int8.py checks
them against torchao itself. Compiled on first use (a few seconds) and cached on disk by numba, so later runs load
them in about 0.5 s.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

EPS = np.float32(np.finfo(np.float32).eps)  # torchao clamps int8 scales at float32 eps for every input dtype

# How the scale absmax / 127.5 is rounded: torchao computes it in the weight's dtype.
ROUND_NONE, ROUND_BF16, ROUND_F16 = 0, 1, 2


def _jit(fn=None, **options):
    """nb.njit, GIL-free, cached on disk; compiled per process where no cache folder is writable (numba refuses
    to decorate then), so a read-only install still works, only slower to start."""
    if fn is None:
        return lambda f: _jit(f, **options)
    try:
        return nb.njit(nogil=True, cache=True, **options)(fn)
    except RuntimeError:
        return nb.njit(nogil=True, **options)(fn)


@_jit(fastmath={"reassoc"})
def _sum_squares(x):
    # Reassociation only here: the error statistics tolerate a different summation order; it lets the loop vectorize.
    s = np.float32(0.0)
    for j in range(x.shape[0]):
        s += x[j] * x[j]
    return s


@_jit
def _round_scale(s, rounding):
    """float32 s >= 0 rounded to nearest-even in bf16 or fp16, as torch's conversion does (exact in float64)."""
    if rounding == ROUND_NONE or not math.isfinite(s):
        return s
    mantissa, min_exp = (7, -126) if rounding == ROUND_BF16 else (10, -14)
    e = max(math.frexp(s)[1] - 1, min_exp)  # floor(log2 s); subnormals share the smallest normal's step
    step = math.ldexp(1.0, e - mantissa)
    return np.float32(np.rint(np.float64(s) / step) * step)


@_jit
def _quantize_row(y, absmax, rounding, qrow):
    """One row, widened to float32 in `y` (overwritten), with max|w| already known -> (scale, signal, noise).

    scale = round(absmax / 127.5) clamped at eps; q = round_half_even(w * (1/scale)) clamped to [-128, 127].
    The error comes from the scaled row y = w * (1/scale): signal = s^2 sum(y^2), noise = s^2 sum((y - q)^2).
    A NaN or Inf in the row makes absmax, and so the scale and the signal, non-finite: the caller checks.
    """
    s = _round_scale(absmax / np.float32(127.5), rounding)
    if s < EPS:
        s = EPS
    inv = np.float32(1.0) / s
    for j in range(y.shape[0]):
        y[j] = y[j] * inv
    signal = _sum_squares(y)
    for j in range(y.shape[0]):
        v = y[j]
        q = min(max(np.rint(v), np.float32(-128.0)), np.float32(127.0))
        qrow[j] = np.int8(q)
        y[j] = v - q
    noise = _sum_squares(y)
    s2 = np.float64(s) * np.float64(s)
    return s, s2 * signal, s2 * noise


@_jit
def _bits_to_float(b):
    one = np.empty(1, np.uint32)
    one[0] = b
    return one.view(np.float32)[0]


@_jit
def _widen_bf16_row(bits, wide):
    """One bf16 row (uint16 bits) into float32 bits; returns the largest magnitude's bits (NaN and Inf above all)."""
    m = np.uint16(0)
    for j in range(bits.shape[0]):
        b = bits[j]
        wide[j] = np.uint32(b) << np.uint32(16)  # bf16 is the top half of a float32
        a = b & np.uint16(0x7FFF)  # magnitudes order as their bits do
        m = a if a > m else m
    return np.uint32(m) << np.uint32(16)


@_jit
def _copy_f32_row(x, y, bits):
    """One float32 row into `y` (`bits` is its uint32 view); returns the largest magnitude's bits."""
    m = np.uint32(0)
    for j in range(x.shape[0]):
        y[j] = x[j]
        a = bits[j] & np.uint32(0x7FFFFFFF)
        m = a if a > m else m
    return m


@_jit
def quantize_bf16(bits, qdata, scale, energy):
    """bf16 rows given as their uint16 bits [r, k] -> qdata int8 [r, k], scale float32 [r], energy float64 [2, r]."""
    wide = np.empty(bits.shape[1], np.uint32)
    y = wide.view(np.float32)
    for r in range(bits.shape[0]):
        absmax = _bits_to_float(_widen_bf16_row(bits[r], wide))
        scale[r], energy[0, r], energy[1, r] = _quantize_row(y, absmax, ROUND_BF16, qdata[r])


@_jit
def quantize_f32(x, rounding, qdata, scale, energy):
    """float32 rows [r, k] (float32 weights, or fp16 ones widened with rounding=ROUND_F16) -> as `quantize_bf16`."""
    y = np.empty(x.shape[1], np.float32)
    bits = y.view(np.uint32)
    for r in range(x.shape[0]):
        absmax = _bits_to_float(_copy_f32_row(x[r], y, bits))
        scale[r], energy[0, r], energy[1, r] = _quantize_row(y, absmax, rounding, qdata[r])


@_jit
def quantize_fp8(codes, row_scale, qdata, scale, energy):
    """FP8 e4m3fn rows (uint8 codes [r, k], per-row float32 scale [r]) dequantized as diffusers does,
    `code.float() * row_scale` in float32, then quantized: as `quantize_bf16`.

    max|w| comes from the largest code magnitude: rounding is monotonic, so max|c * s| = |max|c| * s|.
    """
    y = np.empty(codes.shape[1], np.float32)
    for r in range(codes.shape[0]):
        absmax = _fp8_absmax(_dequantize_fp8_row(codes[r], row_scale[r], y), row_scale[r])
        scale[r], energy[0, r], energy[1, r] = _quantize_row(y, absmax, ROUND_NONE, qdata[r])


@intrinsic
def _fp8_value(typingctx, c):
    """An e4m3fn code (uint8) -> its float32 value, the bits torch's `.float()` gives (NaN codes 0x7F / 0xFF
    included), built from the code's bits in 32-bit integer arithmetic.

    Not a 256-entry table lookup: a gather per value does not vectorize well, and numba would widen the integer
    arithmetic to int64 (half the vector width); this IR stays in i32 lanes (measured 0.47 -> 0.17 ns per value).
    A normal code (exponent field e > 0) is 2^(e-7) * (1 + m/8): its exponent and mantissa fields shifted into
    float32's place, the exponent rebased from bias 7 to 127. A subnormal one (e = 0) is m * 2^-9, exact in
    float32. Magnitude 0x7F is e4m3fn's only NaN (no Inf): 0x7FF00000 with the sign, what torch's conversion gives.
    """
    if c != types.uint8:
        return None

    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()

        def k(v):
            return ir.Constant(i32, v)

        c32 = builder.zext(args[0], i32)
        mag = builder.and_(c32, k(0x7F))
        sign = builder.shl(builder.and_(c32, k(0x80)), k(24))
        normal = builder.add(builder.shl(mag, k(20)), k((127 - 7) << 23))
        sub = builder.bitcast(builder.fmul(builder.sitofp(mag, f32), ir.Constant(f32, 2.0 ** -9)), i32)
        bits = builder.select(builder.icmp_unsigned("<", mag, k(8)), sub, normal)
        bits = builder.select(builder.icmp_unsigned("==", mag, k(0x7F)), k(0x7FF00000), bits)
        return builder.bitcast(builder.or_(bits, sign), f32)

    return types.float32(c), codegen


@intrinsic
def _max_magnitude8(typingctx, m, c):
    """max(m, c & 0x7F) for uint8 m and c, in 8-bit arithmetic: numba would widen the comparison to int64, which
    keeps a row's running max in a quarter as many vector lanes as the codes."""
    if m != types.uint8 or c != types.uint8:
        return None

    def codegen(context, builder, signature, args):
        a = builder.and_(args[1], ir.Constant(ir.IntType(8), 0x7F))
        return builder.select(builder.icmp_unsigned(">", a, args[0]), a, args[0])

    return types.uint8(m, c), codegen


@_jit
def _dequantize_fp8_row(codes, s, y):
    """One FP8 e4m3fn row (uint8 codes [k]): y = `code.float() * s`, one float32 multiply per value, as torch's
    `weight.float() * scale` computes it. Returns the largest code magnitude, for `_fp8_absmax`."""
    m = np.uint8(0)
    for j in range(codes.shape[0]):
        c = codes[j]
        y[j] = _fp8_value(c) * s
        m = _max_magnitude8(m, c)  # 0x7F is NaN in e4m3fn; there is no Inf
    return m


@_jit
def _fp8_absmax(m, s):
    """max|w| of a row whose largest code magnitude is m (NaN for a NaN code): rounding is monotonic, so
    max|c * s| = |max|c| * s|."""
    return abs(_fp8_value(m) * s)


@_jit
def max_magnitude_bits(bits, mask):
    """max(bits & mask) over a flat, non-empty integer view of floats: at or above the exponent mask means a NaN or
    Inf."""
    m = bits[0] & mask
    for j in range(1, bits.shape[0]):
        a = bits[j] & mask
        m = a if a > m else m
    return m


def load() -> None:
    """Compile (first run) or load from numba's cache every kernel, for the argument types the encoder passes."""
    bits, codes = np.zeros((1, 8), np.uint16), np.zeros((1, 8), np.uint8)
    x, qdata = np.zeros((1, 8), np.float32), np.empty((1, 8), np.int8)
    scale, energy = np.empty(1, np.float32), np.empty((2, 1))
    quantize_bf16(bits, qdata, scale, energy)
    quantize_f32(x, ROUND_F16, qdata, scale, energy)
    quantize_fp8(codes, scale, qdata, scale, energy)
    max_magnitude_bits(bits.reshape(-1), np.uint16(0x7FFF))
    max_magnitude_bits(x.view(np.uint32).reshape(-1), np.uint32(0x7FFFFFFF))


@_jit
def widen_bf16(bits, out):
    """bfloat16 bits [r, k] (uint16) -> float32 [r, k]: exact (the bits shifted into the high half)."""
    o = out.view(np.uint32)
    for i in range(bits.shape[0]):
        for j in range(bits.shape[1]):
            o[i, j] = np.uint32(bits[i, j]) << np.uint32(16)


@_jit
def dequantize_fp8(codes, row_scale, out):
    """FP8 e4m3fn rows (uint8 codes [r, k], float32 scale per row [r]) -> float32 [r, k]: `code.float() * scale`,
    one float32 multiply per value, as torch's `weight.float() * scale[:, None]` computes it. Returns whether every
    value is finite, from each row's largest code magnitude."""
    finite = True
    for r in range(codes.shape[0]):
        m = _dequantize_fp8_row(codes[r], row_scale[r], out[r])
        if codes.shape[1] and not math.isfinite(_fp8_absmax(m, row_scale[r])):
            finite = False
    return finite


@_jit
def fp8_to_bf16(codes, row_scale, out, energy):
    """FP8 e4m3fn rows (uint8 codes [r, k], float32 scale per row [r]) -> their bf16 bits [r, k] (uint16) in one
    pass: w = `code.float() * scale` as `dequantize_fp8` computes it, rounded to nearest-even as torch's
    float32 -> bfloat16 conversion does (the bias 0x7FFF plus the kept bit's lowest). energy [2, r] float64: each
    row's sum of w^2 and of (w - bf16(w))^2. Returns whether every w is finite (a NaN code, or an overflow)."""
    k = codes.shape[1]
    w = np.empty(k, np.float32)
    kept = np.empty(k, np.uint32)
    w_bits, kept_w = w.view(np.uint32), kept.view(np.float32)
    finite = True
    for r in range(codes.shape[0]):
        m = _dequantize_fp8_row(codes[r], row_scale[r], w)
        if k and not math.isfinite(_fp8_absmax(m, row_scale[r])):
            finite = False
        for j in range(k):
            b = w_bits[j]
            h = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            out[r, j] = np.uint16(h)
            kept[j] = h << np.uint32(16)
        energy[0, r], energy[1, r] = _row_energies(w, kept_w)
    return finite


@_jit(fastmath={"reassoc"})
def _row_energies(x, y):
    # Reassociation only here, as in `_sum_squares`: an error statistic, summed in whatever order vectorizes.
    signal = np.float32(0.0)
    noise = np.float32(0.0)
    for j in range(x.shape[0]):
        d = x[j] - y[j]
        signal += x[j] * x[j]
        noise += d * d
    return np.float64(signal), np.float64(noise)
