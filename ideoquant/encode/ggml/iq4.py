"""IQ4_NL and IQ4_XS: ggml's ``quantize_iq4_nl`` / ``quantize_iq4_xs`` (``quantize_row_iq4_nl_impl``), as bytes.

Both map each value to one of 16 non-linear levels (gguf-py's ``IQ4_NL.kvalues``, ggml's ``kvalues_iq4nl``) times
a per-32 scale. ``ggml_quantize_chunk`` always runs the search with 7 trial scales either side (``ntry = 7``), with
element weights x² without an importance matrix and ``qw · sqrt(sigma2 + x²)`` with one (sigma2 = 2·Σx²/n over the
block, or the super-block for IQ4_XS). IQ4_NL (32 values, 18 B: fp16 d, qs[16]) stores the block's scale as fp16;
IQ4_XS (256 values, 136 B: fp16 d, scales_h u16, scales_l[4], qs[128]) stores eight 6-bit scales of the super-block
scale d = -max/32 and requantizes every value with them (d in float32, as ggml does, not the fp16 it stores).

The level search is ggml's ``best_index_int8`` written without branches: the nearest of the two levels around x,
the lower one on a tie, the ends below the first and above the last level. Loops run over the level outside and the
block's 32 values inside, so they vectorise; every sum is still added in ggml's order.
"""

from __future__ import annotations

import gguf
import numpy as np

from .common import F32, GROUP_MAX_EPS, ONE, ZERO, fp16_bits, jit, nearest_int

LEVELS = np.array(gguf.quants.IQ4_NL.kvalues, np.float32)  # ascending, -127 .. 113
NTRY = 7  # ggml_quantize_chunk's trial count for both types
QB = 32  # values per scale


@jit
def _levels(xs, idv, levels, L, Q):
    """ggml's best_index_int8(16, levels, idv * xs[j]) for the 32 values: L[j] the index, Q[j] its level."""
    n = levels.shape[0]
    for j in range(QB):
        a = idv * xs[j]
        lo = levels[0]
        hi = levels[1]
        k = np.int32(0)
        for i in range(1, n - 1):  # the last level with levels[i] <= a (a above levels[0]), and the next one
            up = a >= levels[i]
            k = np.int32(i) if up else k
            lo = levels[i] if up else lo
            hi = levels[i + 1] if up else hi
        pick_hi = not (a - lo < hi - a)
        k = k + np.int32(1) if pick_hi else k
        q = hi if pick_hi else lo
        if a <= levels[0]:
            k, q = np.int32(0), levels[0]
        elif a >= levels[n - 1]:
            k, q = np.int32(n - 1), levels[n - 1]
        L[j] = k
        Q[j] = q


@jit
def _weighted_sums(xs, w, Q):
    sumqx = ZERO
    sumq2 = ZERO
    for j in range(QB):
        wq = w[j] * Q[j]
        sumqx += wq * xs[j]
        sumq2 += wq * Q[j]
    return sumqx, sumq2


@jit
def _block_scale(xs, w, levels, L, Q):
    """The scale ggml's search settles on for one block of 32 (0 for an all-but-zero block); L: its indices from
    the first pass (IQ4_NL keeps them only when the block is zero, IQ4_XS recomputes them)."""
    amax = ZERO
    mx = ZERO
    for j in range(QB):
        ax = abs(xs[j])
        if ax > amax:
            amax = ax
            mx = xs[j]
    if amax < GROUP_MAX_EPS:
        return ZERO
    d = -mx / levels[0]
    _levels(xs, ONE / d, levels, L, Q)
    sumqx, sumq2 = _weighted_sums(xs, w, Q)
    d = sumqx / sumq2 if sumq2 > ZERO else ZERO
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        _levels(xs, (F32(itry) + levels[0]) / mx, levels, L, Q)
        sumqx, sumq2 = _weighted_sums(xs, w, Q)
        if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@jit
def _weights(xs, qw, qoff, weighted, sigma2, w):
    for j in range(QB):
        if weighted:
            w[j] = qw[qoff + j] * np.sqrt(sigma2 + xs[j] * xs[j])
        else:
            w[j] = xs[j] * xs[j]


@jit
def _sigma2(xr, base, n):
    s = ZERO
    for j in range(n):
        s += xr[base + j] * xr[base + j]
    return s * (F32(2.0) / F32(n))


@jit
def _pack(o, pos, L):
    for j in range(16):
        o[pos + j] = np.uint8(L[j] | (L[16 + j] << 4))


@jit
def _put_fp16(o, pos, f):
    h = fp16_bits(f)
    o[pos] = np.uint8(h & 0xFF)
    o[pos + 1] = np.uint8((h >> 8) & 0xFF)


@jit
def encode_iq4_nl(x, imat, weighted, out):
    rows, cols = x.shape
    levels = LEVELS
    w = np.empty(QB, F32)
    L = np.zeros(QB, np.int32)
    Q = np.empty(QB, F32)
    for r in range(rows):
        xr = x[r]
        o = out[r]
        for b in range(cols // QB):
            base = b * QB
            xs = xr[base:base + QB]
            _weights(xs, imat, base, weighted, _sigma2(xr, base, QB), w)
            d = _block_scale(xs, w, levels, L, Q)
            _put_fp16(o, b * 18, d)
            _levels(xs, ONE / d if d != ZERO else ZERO, levels, L, Q)
            _pack(o, b * 18 + 2, L)


@jit
def encode_iq4_xs(x, imat, weighted, out):
    rows, cols = x.shape
    levels = LEVELS
    w = np.empty(QB, F32)
    L = np.zeros(QB, np.int32)
    Q = np.empty(QB, F32)
    scales = np.empty(8, F32)
    for r in range(rows):
        xr = x[r]
        o = out[r]
        for s in range(cols // 256):
            sbase = s * 256
            pos = s * 136
            sigma2 = _sigma2(xr, sbase, 256)
            max_scale = ZERO
            amax_scale = ZERO
            for ib in range(8):
                base = sbase + ib * QB
                xs = xr[base:base + QB]
                _weights(xs, imat, base, weighted, sigma2, w)
                sc = _block_scale(xs, w, levels, L, Q)
                scales[ib] = sc
                if abs(sc) > amax_scale:
                    amax_scale = abs(sc)
                    max_scale = sc
            d = -max_scale / F32(32)
            _put_fp16(o, pos, d)
            idv = ONE / d if d != ZERO else ZERO
            scales_h = 0
            for ib in range(8):
                lv = min(31, max(-32, nearest_int(idv * scales[ib])))
                dl = d * F32(lv)
                idl = ONE / dl if dl != ZERO else ZERO
                base = sbase + ib * QB
                _levels(xr[base:base + QB], idl, levels, L, Q)
                _pack(o, pos + 8 + 16 * ib, L)
                lv += 32
                if ib % 2 == 0:
                    o[pos + 4 + ib // 2] = np.uint8(lv & 0xF)
                else:
                    o[pos + 4 + ib // 2] |= np.uint8((lv & 0xF) << 4)
                scales_h |= (lv >> 4) << (2 * ib)
            o[pos + 2] = np.uint8(scales_h & 0xFF)
            o[pos + 3] = np.uint8((scales_h >> 8) & 0xFF)

