"""IQ4_NL and IQ4_XS: ggml's ``quantize_iq4_nl`` / ``quantize_iq4_xs`` (``quantize_row_iq4_nl_impl``), as bytes.

Both map each value to one of 16 non-linear levels (gguf-py's ``IQ4_NL.kvalues``, ggml's ``kvalues_iq4nl``) times
a per-32 scale. ``ggml_quantize_chunk`` always runs the search with 7 trial scales either side (``ntry = 7``), with
element weights x² without an importance matrix and ``qw · sqrt(sigma2 + x²)`` with one (sigma2 = 2·Σx²/n over the
block, or the super-block for IQ4_XS). IQ4_NL (32 values, 18 B: fp16 d, qs[16]) stores the block's scale as fp16;
IQ4_XS (256 values, 136 B: fp16 d, scales_h u16, scales_l[4], qs[128]) stores eight 6-bit scales of the super-block
scale d = -max/32 and requantizes every value with them (d in float32, as ggml does, not the fp16 it stores).

The blocks of a row are searched side by side as lanes (``common``'s layout: ``X[32, g]``, one block per column),
so every loop over the lanes vectorises while each block's sums are still added in ggml's element order. The level
search is ggml's ``best_index_int8`` without branches: the last level <= a and the next one, the nearer of the two
(the lower on a tie), the ends below the first and from the last level up.
"""

from __future__ import annotations

import gguf
import numpy as np

from .common import F32, GROUP_MAX_EPS, ONE, ZERO, amax_signed, fp16_bits, jit, nearest_int

LEVELS = np.array(gguf.quants.IQ4_NL.kvalues, np.float32)  # ascending, -127 .. 113
NTRY = 7  # ggml_quantize_chunk's trial count for both types
QB = 32  # values per scale
LANES = 64  # blocks searched side by side


@jit(inline="always")
def _level(a):
    """(index, level) of ggml's best_index_int8(16, LEVELS, a)."""
    lo = LEVELS[0]
    hi = LEVELS[1]
    k = np.int32(0)
    for m in range(1, 15):
        up = a >= LEVELS[m]
        k = np.int32(m) if up else k
        lo = LEVELS[m] if up else lo
        hi = LEVELS[m + 1] if up else hi
    upper = not (a - lo < hi - a)
    k = k + np.int32(1) if upper else k
    q = hi if upper else lo
    first = a <= LEVELS[0]
    last = a >= LEVELS[15]
    k = np.int32(0) if first else (np.int32(15) if last else k)
    q = LEVELS[0] if first else (LEVELS[15] if last else q)
    return k, q


@jit
def _sums(X, W, idv, sumqx, sumq2):
    """Per lane, at scale 1 / idv: Σ w·q·x and Σ w·q·q, added in element order."""
    n, g = X.shape
    for k in range(g):
        sumqx[k] = ZERO
        sumq2[k] = ZERO
    for i in range(n):
        for k in range(g):
            x = X[i, k]
            q = _level(idv[k] * x)[1]
            wq = W[i, k] * q
            sumqx[k] += wq * x
            sumq2[k] += wq * q


@jit
def _indices(X, idv, L):
    n, g = X.shape
    for i in range(n):
        for k in range(g):
            L[i, k] = _level(idv[k] * X[i, k])[0]


@jit
def _scales(X, W, amax, mx, idv, sumqx, sumq2, best, scale):
    """The scale ggml's search settles on for every lane (0 where the block's max |x| < GROUP_MAX_EPS)."""
    g = X.shape[1]
    amax_signed(X, mx, amax)
    for k in range(g):
        idv[k] = ONE / (-mx[k] / LEVELS[0])
    _sums(X, W, idv, sumqx, sumq2)
    for k in range(g):
        d = sumqx[k] / sumq2[k] if sumq2[k] > ZERO else ZERO
        scale[k] = d
        best[k] = d * sumqx[k]
    for itry in range(-NTRY, NTRY + 1):
        for k in range(g):
            idv[k] = (F32(itry) + LEVELS[0]) / mx[k]
        _sums(X, W, idv, sumqx, sumq2)
        for k in range(g):
            take = sumq2[k] > ZERO and sumqx[k] * sumqx[k] > best[k] * sumq2[k]
            d = sumqx[k] / sumq2[k]
            scale[k] = d if take else scale[k]
            best[k] = d * sumqx[k] if take else best[k]
    for k in range(g):
        scale[k] = ZERO if amax[k] < GROUP_MAX_EPS else scale[k]


@jit
def _gather(xr, qw, weighted, b0, sigma2, X, W):
    """Blocks b0 .. b0+g-1 of the row into lanes, with ggml's element weights (sigma2 per lane)."""
    n, g = X.shape
    for k in range(g):
        base = (b0 + k) * QB
        for i in range(n):
            v = xr[base + i]
            X[i, k] = v
            W[i, k] = qw[base + i] * np.sqrt(sigma2[k] + v * v) if weighted else v * v


@jit
def _sumsq(xr, base, n):
    s = ZERO
    for j in range(n):
        s += xr[base + j] * xr[base + j]
    return s


@jit
def _pack(o, pos, L, k):
    for j in range(16):
        o[pos + j] = np.uint8(L[j, k] | (L[16 + j, k] << 4))


@jit
def _put_fp16(o, pos, f):
    h = fp16_bits(f)
    o[pos] = np.uint8(h & 0xFF)
    o[pos + 1] = np.uint8((h >> 8) & 0xFF)


def _encoder(xs):
    """The compiled encoder (x, imat, weighted, out) of IQ4_NL (xs False) or IQ4_XS (xs True)."""
    sb = 256 if xs else QB  # values per super-block (sigma2 and one fp16 d each)
    bpb = 136 if xs else 18  # bytes per super-block
    lanes = LANES - LANES % (sb // QB)  # whole super-blocks per chunk

    @jit
    def encode(x, imat, weighted, out):
        rows, cols = x.shape
        nb = cols // QB
        X = np.empty(QB * lanes, F32)
        W = np.empty(QB * lanes, F32)
        L = np.empty(QB * lanes, np.int32)
        v = np.empty((9, lanes), F32)  # per-lane scratch: sigma2, amax, mx, idv, sumqx, sumq2, best, scale, d
        for r in range(rows):
            xr = x[r]
            o = out[r]
            for b0 in range(0, nb, lanes):
                g = min(lanes, nb - b0)
                Xg = X[: QB * g].reshape((QB, g))
                Wg = W[: QB * g].reshape((QB, g))
                Lg = L[: QB * g].reshape((QB, g))
                sigma2, idv, scale = v[0, :g], v[3, :g], v[7, :g]
                for k in range(0, g, sb // QB):
                    s2 = _sumsq(xr, (b0 + k) * QB, sb) * (F32(2.0) / F32(sb))
                    for m in range(sb // QB):
                        sigma2[k + m] = s2
                _gather(xr, imat, weighted, b0, sigma2, Xg, Wg)
                _scales(Xg, Wg, v[1, :g], v[2, :g], idv, v[4, :g], v[5, :g], v[6, :g], scale)
                if not xs:
                    for k in range(g):
                        _put_fp16(o, (b0 + k) * bpb, scale[k])
                        idv[k] = ONE / scale[k] if scale[k] != ZERO else ZERO
                    _indices(Xg, idv, Lg)
                    for k in range(g):
                        _pack(o, (b0 + k) * bpb + 2, Lg, k)
                    continue
                for s0 in range(0, g, 8):
                    pos = (b0 + s0) // 8 * bpb
                    max_scale = ZERO
                    amax_scale = ZERO
                    for ib in range(8):
                        a = abs(scale[s0 + ib])
                        if a > amax_scale:
                            amax_scale = a
                            max_scale = scale[s0 + ib]
                    d = -max_scale / F32(32)
                    _put_fp16(o, pos, d)
                    id_d = ONE / d if d != ZERO else ZERO
                    scales_h = 0
                    for ib in range(8):
                        lv = min(31, max(-32, nearest_int(id_d * scale[s0 + ib])))
                        dl = d * F32(lv)
                        idv[s0 + ib] = ONE / dl if dl != ZERO else ZERO
                        lv += 32
                        if ib % 2 == 0:
                            o[pos + 4 + ib // 2] = np.uint8(lv & 0xF)
                        else:
                            o[pos + 4 + ib // 2] |= np.uint8((lv & 0xF) << 4)
                        scales_h |= (lv >> 4) << (2 * ib)
                    o[pos + 2] = np.uint8(scales_h & 0xFF)
                    o[pos + 3] = np.uint8((scales_h >> 8) & 0xFF)
                _indices(Xg, idv, Lg)
                for k in range(g):
                    _pack(o, (b0 + k) // 8 * bpb + 8 + 16 * ((b0 + k) % 8), Lg, k)

    return encode


encode_iq4_nl = _encoder(False)
encode_iq4_xs = _encoder(True)
