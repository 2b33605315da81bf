"""Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: ggml's ``quantize_row_<t>_ref`` (no imatrix) and ``quantize_row_<t>_impl``.

The reference paths run one specialised row kernel per type, one 32-element block at a time: the block's max/min
search is one vector load and exact integer vector reductions on the float bits (``absmax_keys32``,
``minmax_keys32``; the bits order like the finite values do), then the scale, the fp16 bytes and the quantization
and nibble packing, which LLVM vectorises over the block. The rare cases that depend on element order (+a and -a
both holding the max; +0 vs -0 as min or max) are resolved out of line. No per-block calls, no temporaries. The
weighted paths transpose a chunk of blocks into lanes and run the shared make_qx_quants / make_qkx3_quants searches
on all of them at once.
"""

from __future__ import annotations

import numpy as np

from .common import (
    F32,
    ONE,
    ZERO,
    absmax_keys32,
    bits_f32,
    f32_bits,
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
    s = ZERO
    for j in range(xr.shape[0]):
        s += xr[j] * xr[j]
    return s / F32(xr.shape[0])


@jit
def _gather(xr, qw, b0, g, sigma2, X, W):
    for i in range(QK):
        for k in range(g):
            x = xr[(b0 + k) * QK + i]
            X[i, k] = x
            W[i, k] = qw[(b0 + k) * QK + i] * np.sqrt(sigma2 + x * x)


@jit
def _put_nibbles(o, pos, q):
    for j in range(16):
        o[pos + j] = np.uint8((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4))


@jit
def _put_qh(o, pos, q):
    h = np.uint32(0)
    for j in range(QK):
        h |= np.uint32((q[j] >> 4) & 1) << np.uint32(j)
    for t in range(4):
        o[pos + t] = np.uint8((h >> np.uint32(8 * t)) & np.uint32(0xFF))


@jit
def encode_q8_0(x, out):
    rows, cols = x.shape
    for r in range(rows):
        xr = x[r]
        o = out[r]
        for b in range(cols // QK):
            base = b * QK
            mp, mn = absmax_keys32(xr, base)
            m = max(mp, mn, np.int32(0))  # max |bits|: amax (mp < 0 only when every value is negative or -0)
            d = bits_f32(m) / F32(127)
            idv = ONE / d if d != ZERO else ZERO
            pos = b * 34
            put_fp16(o, pos, d)
            if np.isinf(idv):  # x*inf: C's float->int8 conversion gives 0 on x86
                for j in range(QK):
                    o[pos + 2 + j] = 0
            else:
                for j in range(QK):
                    o[pos + 2 + j] = np.uint8(roundf_i(xr[base + j] * idv) & 0xFF)


@jit
def encode_q4_0(x, imat, weighted, out):
    _encode_x_0(x, imat, weighted, out, 4)


@jit
def encode_q5_0(x, imat, weighted, out):
    _encode_x_0(x, imat, weighted, out, 5)


@jit
def encode_q4_1(x, imat, weighted, out):
    _encode_x_1(x, imat, weighted, out, 4)


@jit
def encode_q5_1(x, imat, weighted, out):
    _encode_x_1(x, imat, weighted, out, 5)


@jit
def _encode_x_0(x, imat, weighted, out, bits):
    """Q4_0 (bits=4: d, qs[16]; 18 B) and Q5_0 (bits=5: d, qh[4], qs[16]; 22 B)."""
    rows, cols = x.shape
    nb = cols // QK
    bpb = 18 if bits == 4 else 22
    qs_off = 2 if bits == 4 else 6
    nmax = 8 if bits == 4 else 16
    q = np.empty(QK, np.int32)
    X = np.empty(QK * LANES, F32)
    W = np.empty(QK * LANES, F32)
    L = np.empty(QK * LANES, np.int32)
    sc = np.empty(LANES, F32)
    for r in range(rows):
        xr = x[r]
        o = out[r]
        if weighted:
            sigma2 = _row_sigma2(xr)
            for b0 in range(0, nb, LANES):
                g = min(LANES, nb - b0)
                Xg = X[: QK * g].reshape((QK, g))
                Wg = W[: QK * g].reshape((QK, g))
                Lg = L[: QK * g].reshape((QK, g))
                sg = sc[:g]
                _gather(xr, imat, b0, g, sigma2, Xg, Wg)
                make_qx_quants(Xg, Wg, nmax, Lg, sg)
                for k in range(g):
                    pos = (b0 + k) * bpb
                    put_fp16(o, pos, sg[k])
                    for j in range(QK):
                        q[j] = Lg[j, k]
                    if bits == 5:
                        _put_qh(o, pos + 2, q)
                    _put_nibbles(o, pos + qs_off, q)
        else:
            _ref_x_0(xr, o, nb, bits)


@jit
def _encode_x_1(x, imat, weighted, out, bits):
    """Q4_1 (d, m, qs[16]; 20 B) and Q5_1 (d, m, qh[4], qs[16]; 24 B)."""
    rows, cols = x.shape
    nb = cols // QK
    bpb = 20 if bits == 4 else 24
    qs_off = 4 if bits == 4 else 8
    nmax = 15 if bits == 4 else 31
    q = np.empty(QK, np.int32)
    X = np.empty(QK * LANES, F32)
    W = np.empty(QK * LANES, F32)
    L = np.empty(QK * LANES, np.int32)
    sc = np.empty(LANES, F32)
    mn = np.empty(LANES, F32)
    for r in range(rows):
        xr = x[r]
        o = out[r]
        if weighted:
            sigma2 = _row_sigma2(xr)
            for b0 in range(0, nb, LANES):
                g = min(LANES, nb - b0)
                Xg = X[: QK * g].reshape((QK, g))
                Wg = W[: QK * g].reshape((QK, g))
                Lg = L[: QK * g].reshape((QK, g))
                sg = sc[:g]
                mg = mn[:g]
                _gather(xr, imat, b0, g, sigma2, Xg, Wg)
                make_qkx_quants(Xg, Wg, nmax, F32(-0.9), F32(0.05), 36, False, Lg, sg, mg)
                for k in range(g):
                    pos = (b0 + k) * bpb
                    put_fp16(o, pos, sg[k])
                    put_fp16(o, pos + 2, -mg[k])
                    for j in range(QK):
                        q[j] = Lg[j, k]
                    if bits == 5:
                        _put_qh(o, pos + 4, q)
                    _put_nibbles(o, pos + qs_off, q)
        else:
            _ref_x_1(xr, o, nb, bits)


@jit
def _ref_x_0(xr, o, nb, bits):
    """quantize_row_q4_0_ref / q5_0_ref on one row: d = max / -nmax, q = MIN(top, (int8_t)(x*id + bias))."""
    if bits == 4:
        _ref_q4_0_row(xr, o, nb)
    else:
        _ref_q5_0_row(xr, o, nb)


@jit
def _ref_x_1(xr, o, nb, bits):
    """quantize_row_q4_1_ref / q5_1_ref on one row: d = (max - min) / nmax, q = (x - min)*id + 0.5."""
    if bits == 4:
        _ref_q4_1_row(xr, o, nb)
    else:
        _ref_q5_1_row(xr, o, nb)


@jit
def _scale_0(mx, nmax):
    """(d, id, bias multiplier) of a Q4_0/Q5_0 block; id = 0 (and no bias) where 1/d is inf: C's float -> int
    conversion of +-inf / NaN gives 0 on x86, and x*0 + 0 converts to 0 as well."""
    d = mx / F32(-nmax)
    idv = ONE / d if d != ZERO else ZERO
    if np.isinf(idv):
        return d, ZERO, ZERO
    return d, idv, ONE


@jit
def _ref_q4_0_row(xr, o, nb):
    for b in range(nb):
        base = b * QK
        mp, mn = absmax_keys32(xr, base)
        mx = _first_with_abs_bits(xr, base, mp) if mp == mn and mp > 0 else _signed_max(mp, mn)
        d, idv, on = _scale_0(mx, 8)
        bz = F32(8.5) * on
        pos = b * 18
        put_fp16(o, pos, d)
        for j in range(16):
            v0 = min(15, ((_trunc_i(xr[base + j] * idv + bz) + 128) & 255) - 128)  # MIN(15, (int8_t)..)
            v1 = min(15, ((_trunc_i(xr[base + j + 16] * idv + bz) + 128) & 255) - 128)
            o[pos + 2 + j] = np.uint8((v0 & 0xF) | ((v1 & 0xF) << 4))


@jit
def _ref_q5_0_row(xr, o, nb):
    for b in range(nb):
        base = b * QK
        mp, mn = absmax_keys32(xr, base)
        mx = _first_with_abs_bits(xr, base, mp) if mp == mn and mp > 0 else _signed_max(mp, mn)
        d, idv, on = _scale_0(mx, 16)
        bz = F32(16.5) * on
        pos = b * 22
        put_fp16(o, pos, d)
        h = np.uint32(0)
        for j in range(16):
            v0 = min(31, ((_trunc_i(xr[base + j] * idv + bz) + 128) & 255) - 128)
            v1 = min(31, ((_trunc_i(xr[base + j + 16] * idv + bz) + 128) & 255) - 128)
            o[pos + 6 + j] = np.uint8((v0 & 0xF) | ((v1 & 0xF) << 4))
            h |= (np.uint32((v0 >> 4) & 1) << np.uint32(j)) | (np.uint32((v1 >> 4) & 1) << np.uint32(j + 16))
        for t in range(4):
            o[pos + 2 + t] = np.uint8((h >> np.uint32(8 * t)) & np.uint32(0xFF))


@jit
def _scale_1(lo, hi, nmax):
    """(d, id, lz, hz) of a Q4_1/Q5_1 block; where 1/d is inf, id = lz = hz = 0 (see _scale_0)."""
    d = (hi - lo) / F32(nmax)
    idv = ONE / d if d != ZERO else ZERO
    if np.isinf(idv):
        return d, ZERO, ZERO, ZERO
    return d, idv, lo, F32(0.5)


@jit
def _ref_q4_1_row(xr, o, nb):
    for b in range(nb):
        base = b * QK
        klo, khi = minmax_keys32(xr, base)
        lo = _key_f32(klo)
        hi = _key_f32(khi)
        if lo == ZERO or hi == ZERO:  # +0 and -0 compare equal: C keeps the first zero it meets
            z = _first_zero(xr, base)
            lo = z if lo == ZERO else lo
            hi = z if hi == ZERO else hi
        d, idv, lz, hz = _scale_1(lo, hi, 15)
        pos = b * 20
        put_fp16(o, pos, d)
        put_fp16(o, pos + 2, lo)
        for j in range(16):
            v0 = min(15, ((_trunc_i((xr[base + j] - lz) * idv + hz) + 128) & 255) - 128)  # MIN(15, (int8_t)..)
            v1 = min(15, ((_trunc_i((xr[base + j + 16] - lz) * idv + hz) + 128) & 255) - 128)
            o[pos + 4 + j] = np.uint8((v0 & 0xF) | ((v1 & 0xF) << 4))


@jit
def _ref_q5_1_row(xr, o, nb):
    for b in range(nb):
        base = b * QK
        klo, khi = minmax_keys32(xr, base)
        lo = _key_f32(klo)
        hi = _key_f32(khi)
        if lo == ZERO or hi == ZERO:
            z = _first_zero(xr, base)
            lo = z if lo == ZERO else lo
            hi = z if hi == ZERO else hi
        d, idv, lz, hz = _scale_1(lo, hi, 31)
        pos = b * 24
        put_fp16(o, pos, d)
        put_fp16(o, pos + 2, lo)
        h = np.uint32(0)
        for j in range(16):
            v0 = _trunc_i((xr[base + j] - lz) * idv + hz) & 255  # (uint8_t), no clamp
            v1 = _trunc_i((xr[base + j + 16] - lz) * idv + hz) & 255
            o[pos + 8 + j] = np.uint8((v0 & 0xF) | ((v1 & 0xF) << 4))
            h |= (np.uint32((v0 >> 4) & 1) << np.uint32(j)) | (np.uint32((v1 >> 4) & 1) << np.uint32(j + 16))
        for t in range(4):
            o[pos + 4 + t] = np.uint8((h >> np.uint32(8 * t)) & np.uint32(0xFF))
