"""Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: ggml's ``quantize_row_<t>_ref`` (no imatrix) and ``quantize_row_<t>_impl``.

The reference paths run one specialised row kernel per type, one 32-element block at a time: the block's max/min
search is one vector load and exact integer vector reductions on the float bits (``absmax_keys32``,
``minmax_keys32``; the bits order like the finite values do), then the scale, the fp16 bytes and the quantization
and nibble packing, which LLVM vectorises over the block. The rare cases that depend on element order (+a and -a
both holding the max; +0 vs -0 as min or max) are resolved out of line. No per-block calls, no temporaries.
Q8_0 instead makes three vector passes over a row (its blocks' max |x|, their scales, their codes). The
weighted paths transpose a chunk of blocks into lanes and run the shared make_qx_quants / make_qkx3_quants searches
on all of them at once.
"""

from __future__ import annotations

import numpy as np

from .common import (
    F32,
    FP16_INF_BITS,
    FP16_NORMAL_BITS,
    ONE,
    ZERO,
    abs_bits_max32,
    absmax_keys32,
    bits_f32,
    f32_bits,
    fp16_bits,
    fp16_normal_bits,
    jit,
    make_qkx_quants,
    make_qx_quants,
    minmax_keys32,
    put_fp16,
    roundf_i,
)

QK = 32
LANES = 64  # blocks per chunk on the weighted paths
ABS = np.int32(0x7FFFFFFF)


@jit
def _first_with_abs_bits(xr, base, m):
    """The first of xr[base:base+32] whose |bits| == m (the rare tie of +a and -a; kept out of line)."""
    for j in range(QK):
        if (f32_bits(xr[base + j]) & ABS) == m:
            return xr[base + j]
    return ZERO


@jit
def _first_zero(xr, base):
    """The first zero (+0 or -0) of xr[base:base+32] (kept out of line)."""
    for j in range(QK):
        if xr[base + j] == ZERO:
            return xr[base + j]
    return ZERO


@jit
def _signed_max(mp, mn):
    """ggml's signed absmax from absmax_keys32's (max bits, max |bits| of the negatives): +0 if all are +-0;
    on a tie of +a and -a (mp == mn > 0) the caller looks for the first one instead."""
    if max(mp, mn) <= 0:
        return ZERO
    return bits_f32(mp) if mp >= mn else bits_f32(mn | np.int32(-0x80000000))


@jit
def _key_f32(k):
    """The float32 of a minmax_keys32 key."""
    return bits_f32(k ^ ((k >> 31) & ABS))


@jit
def _trunc_i(v):
    """C's float -> int conversion (toward zero) of a finite float32."""
    return np.int32(v)


@jit
def _row_sigma2(xr):
    """ggml's sigma2 of a row: sum x*x (sequential) over its length."""
    s = ZERO
    for j in range(xr.shape[0]):
        s += xr[j] * xr[j]
    return s / F32(xr.shape[0])


@jit
def _gather(xr, qw, b0, g, sigma2, X, W):
    """X[i, k] = value i of block b0 + k, W = qw * sqrtf(sigma2 + x*x)."""
    for i in range(QK):
        for k in range(g):
            x = xr[(b0 + k) * QK + i]
            X[i, k] = x
            W[i, k] = qw[(b0 + k) * QK + i] * np.sqrt(sigma2 + x * x)


@jit
def _nibbles(v0, v1):
    """The byte of two 4-bit codes: v0 low, v1 high."""
    return np.uint8((v0 & 0xF) | ((v1 & 0xF) << 4))


@jit
def _qh_bits(v0, v1, j):
    """Bits 4 of codes j and j + 16 at their places j and j + 16 of the 32-bit qh."""
    return (np.uint32((v0 >> 4) & 1) << np.uint32(j)) | (np.uint32((v1 >> 4) & 1) << np.uint32(j + 16))


@jit
def _put_u32(o, pos, h):
    """Store the uint32 h little-endian at o[pos:pos+4]."""
    for t in range(4):
        o[pos + t] = np.uint8((h >> np.uint32(8 * t)) & np.uint32(0xFF))


@jit
def encode_q8_0(x, out):
    """Q8_0 rows (d fp16, qs[32] int8; 34 B a block): ggml's quantize_row_q8_0_ref, in three passes over each row
    so that every pass is a vector loop: the blocks' max |x|, their scales, then the codes.

    One pass per block did the same work in about twice the time (0.59 against 0.22-0.28 ns a value, one thread):
    each block's short serial chain (reduction, two divisions, the fp16 rounding's branches, then the codes that
    need 1/d) left the vector units waiting. The max is that of |bits|, as the one-pass kernel took it. The codes
    loop stays inline: called as a function per block it lost its vectorization (measured 1.2 ns a value).
    """
    rows, cols = x.shape
    nb = cols // QK
    amax_bits = np.empty(nb, np.int32)
    inv_d = np.empty(nb, F32)
    d_half = np.empty(nb, np.int32)
    for r in range(rows):
        xr = x[r]
        o = out[r]
        for b in range(nb):
            amax_bits[b] = abs_bits_max32(xr, b * QK)
        _q8_0_scales(amax_bits, inv_d, d_half)
        for b in range(nb):
            base, pos, h, idv = b * QK, b * 34, d_half[b], inv_d[b]
            o[pos] = np.uint8(h & 0xFF)
            o[pos + 1] = np.uint8((h >> 8) & 0xFF)
            if np.isinf(idv):  # x*inf: C's float->int8 conversion gives 0 on x86
                for j in range(QK):
                    o[pos + 2 + j] = 0
            else:
                for j in range(QK):
                    o[pos + 2 + j] = np.uint8(roundf_i(xr[base + j] * idv) & 0xFF)


@jit
def _q8_0_scales(amax_bits, inv_d, d_half):
    """Per block: d = amax / 127, 1/d (0 for d == 0) and d's fp16 bits, as ggml computes them (1/d from the
    unrounded float32 d). The fp16 rounding of a normal half is branch-free here; the rare other ones (an all-zero
    block, subnormal or overflowing d, an Inf or NaN) go through `fp16_bits` afterwards."""
    others = 0
    for b in range(amax_bits.shape[0]):
        d = bits_f32(amax_bits[b]) / F32(127)  # amax_bits >= 0: d is +0, positive, +inf or a NaN
        inv_d[b] = ONE / d if d != ZERO else ZERO
        db = f32_bits(d)
        d_half[b] = fp16_normal_bits(db)
        others += (db < FP16_NORMAL_BITS) | (db >= FP16_INF_BITS)
    if others:
        for b in range(amax_bits.shape[0]):
            d = bits_f32(amax_bits[b]) / F32(127)
            db = f32_bits(d)
            if db < FP16_NORMAL_BITS or db >= FP16_INF_BITS:
                d_half[b] = fp16_bits(d)


def _encoder(bits, has_min):
    """The compiled encoder (x, imat, weighted, out) of Q4_0 / Q5_0 (has_min False: d[, qh[4]], qs[16]; 18 / 22 B)
    or Q4_1 / Q5_1 (has_min True: d, m[, qh[4]], qs[16]; 20 / 24 B), bits 4 or 5: compile-time constants of the
    closure. Without weights, the type's row kernel; with them, make_qx_quants / make_qkx3_quants on lanes."""

    @jit
    def encode(x, imat, weighted, out):
        rows, cols = x.shape
        nb = cols // QK
        if not weighted:
            for r in range(rows):
                _ref_row(x[r], out[r], nb, bits, has_min)
            return
        head = 4 if has_min else 2  # the fp16 fields
        qs_off = head + 4 if bits == 5 else head
        bpb = qs_off + 16
        nmax = (1 << bits) - 1 if has_min else 1 << (bits - 1)
        X = np.empty(QK * LANES, F32)
        W = np.empty(QK * LANES, F32)
        L = np.empty(QK * LANES, np.int32)
        sc = np.empty(LANES, F32)
        mn = np.empty(LANES, F32)
        for r in range(rows):
            xr = x[r]
            o = out[r]
            sigma2 = _row_sigma2(xr)
            for b0 in range(0, nb, LANES):
                g = min(LANES, nb - b0)
                Xg = X[: QK * g].reshape((QK, g))
                Wg = W[: QK * g].reshape((QK, g))
                Lg = L[: QK * g].reshape((QK, g))
                _gather(xr, imat, b0, g, sigma2, Xg, Wg)
                if has_min:
                    make_qkx_quants(Xg, Wg, nmax, F32(-0.9), F32(0.05), 36, False, Lg, sc, mn)
                else:
                    make_qx_quants(Xg, Wg, nmax, Lg, sc)
                for k in range(g):
                    pos = (b0 + k) * bpb
                    put_fp16(o, pos, sc[k])
                    if has_min:
                        put_fp16(o, pos + 2, -mn[k])
                    h = np.uint32(0)
                    for j in range(16):
                        q0 = Lg[j, k]
                        q1 = Lg[j + 16, k]
                        o[pos + qs_off + j] = _nibbles(q0, q1)
                        h |= _qh_bits(q0, q1, j)
                    if bits == 5:
                        _put_u32(o, pos + head, h)

    return encode


@jit
def _ref_row(xr, o, nb, bits, has_min):
    """quantize_row_<t>_ref on one row, by the row kernel of the type."""
    if has_min:
        if bits == 4:
            _ref_q4_1_row(xr, o, nb)
        else:
            _ref_q5_1_row(xr, o, nb)
    elif bits == 4:
        _ref_q4_0_row(xr, o, nb)
    else:
        _ref_q5_0_row(xr, o, nb)


@jit
def _code(v, top):
    """MIN(top, (int8_t)v): C's float -> int8 conversion of a finite float32 (toward zero, wrapped), clamped."""
    return min(top, ((_trunc_i(v) + 128) & 255) - 128)


@jit
def _scale_offsets(d, lo, bias):
    """(id, lz, hz) of a block with scale d, for q = (x - lz)*id + hz: (1/d, lo, bias), id = 0 for d = 0; all 0
    where 1/d is inf (C's float -> int conversion of +-inf / NaN gives 0 on x86, and x*0 + 0 converts to 0)."""
    idv = ONE / d if d != ZERO else ZERO
    if np.isinf(idv):
        return ZERO, ZERO, ZERO
    return idv, lo, bias


def _ref_row_kernel(bits, has_min):
    """The compiled row kernel of quantize_row_<t>_ref for t = Q4_0 / Q5_0 (has_min False: d = max / -nmax,
    q = MIN(top, (int8_t)(x*id + nmax + 0.5))) or Q4_1 / Q5_1 (d = (max - min) / nmax, q = (int8_t)((x - min)*id
    + 0.5), MIN(15, .) for Q4_1, unclamped for Q5_1). bits and has_min are compile-time constants of the closure,
    so each type gets its own straight-line kernel. No jitted call takes an array on the per-block path (numba
    would incref / decref it on every block)."""
    nmax = ((1 << bits) - 1) if has_min else (1 << (bits - 1))
    top = 127 if has_min and bits == 5 else (1 << bits) - 1  # MIN(127, (int8_t)v) never binds
    head = 4 if has_min else 2
    qs_off = head + 4 if bits == 5 else head
    bpb = qs_off + 16

    @jit
    def row(xr, o, nb):
        for b in range(nb):
            base = b * QK
            pos = b * bpb
            if has_min:  # min and max; of +0 and -0 (equal to C) the first one met
                klo, khi = minmax_keys32(xr, base)
                lo = _key_f32(klo)
                hi = _key_f32(khi)
                if lo == ZERO or hi == ZERO:
                    z = _first_zero(xr, base)
                    lo = z if lo == ZERO else lo
                    hi = z if hi == ZERO else hi
                d = (hi - lo) / F32(nmax)
                put_fp16(o, pos + 2, lo)
            else:  # the signed absmax: the first value with the largest |x|
                mp, mn = absmax_keys32(xr, base)
                mx = _first_with_abs_bits(xr, base, mp) if mp == mn and mp > 0 else _signed_max(mp, mn)
                lo = ZERO
                d = mx / F32(-nmax)
            put_fp16(o, pos, d)
            idv, lz, hz = _scale_offsets(d, lo, F32(0.5) if has_min else F32(nmax) + F32(0.5))
            h = np.uint32(0)
            for j in range(16):
                v0 = _code((xr[base + j] - lz) * idv + hz, top)
                v1 = _code((xr[base + j + 16] - lz) * idv + hz, top)
                o[pos + qs_off + j] = _nibbles(v0, v1)
                h |= _qh_bits(v0, v1, j)
            if bits == 5:
                _put_u32(o, pos + head, h)

    return row


_ref_q4_0_row = _ref_row_kernel(4, False)
_ref_q5_0_row = _ref_row_kernel(5, False)
_ref_q4_1_row = _ref_row_kernel(4, True)
_ref_q5_1_row = _ref_row_kernel(5, True)


encode_q4_0 = _encoder(4, False)
encode_q5_0 = _encoder(5, False)
encode_q4_1 = _encoder(4, True)
encode_q5_1 = _encoder(5, True)
