"""IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S: ggml's ``quantize_row_<t>_impl`` (ggml-quants.c).

All five search the same way. A block (16 or 32 values) is split into signs and magnitudes ``xval``; a scan over
trial scales rounds every group of ``n`` magnitudes (8 on the 2-bit grids, 4 on the 3-bit ones) to the lattice's
level code, replaces a code that is not a grid point by its best neighbour, and keeps the trial with the largest
``sumqx^2 / sumq2``; a last pass requantizes with the winning scale. Super-block scales are 4-bit codes of
``max_scale / 31``. What differs per type (compile-time constants of ``_encoder``): block and group sizes, the
trial grid, the start, which groups the last pass revisits, the sign parity trick of the ``XXS``/``XS`` types
(an odd number of negative signs flips the least important value), the weights without an imatrix, fudge factors
on the stored ``d``, and the byte layout.

Every float operation is ggml's, in its order, in float32 (see ``common``); the lattices come from ``grids``.
"""

from __future__ import annotations

import numpy as np

from .common import F32, GROUP_MAX_EPS, ONE, ZERO, jit, make_qp_quants, nearest_int, put_fp16
from .grids import lattice, lattice_values

QK_K = 256
HALF = F32(0.5)
FLT_MAX = F32(3.4028234663852886e38)
SHORT_LIST = 12  # neighbour lists shorter than this are searched point by point
ODD = np.arange(1, 16, 2).astype(np.float32)  # ggml's lattice coordinate 2*level + 1

IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S = range(5)


@jit
def find_best_neighbour(neighbours, off, values, V, x, xbase, w, wbase, n, scale, d2):
    """ggml's iq2/iq3_find_best_neighbour and iq1_find_best_neighbour2: the point of the neighbour list at ``off``
    with the smallest sum w*(scale*q - x)^2 over its n values q (values [G, n]; the same laid out by
    ``grids.neighbour_values`` in V), the first on ties. Each point's sum is added in ggml's order; on a long list
    the points are vector lanes (d2: scratch)."""
    c = neighbours[off]
    vb = (off + 1) * n
    if c < SHORT_LIST:  # too few lanes to pay for the vector loop: one point at a time
        best = FLT_MAX
        gi = neighbours[off + 1]
        for j in range(c):
            g = neighbours[off + 1 + j]
            dist = ZERO
            for i in range(n):
                diff = scale * values[g, i] - x[xbase + i]
                dist += (w[wbase + i] * diff) * diff
            if dist < best:
                best = dist
                gi = g
        return gi
    acc = d2[:c]
    acc[:] = ZERO
    for i in range(n):
        xi = x[xbase + i]
        wi = w[wbase + i]
        row = V[vb + i * c: vb + (i + 1) * c]
        for j in range(c):
            diff = scale * row[j] - xi
            acc[j] += (wi * diff) * diff
    best = FLT_MAX
    gi = neighbours[off + 1]  # kept only when every distance is NaN (ggml asserts then)
    for j in range(c):
        if d2[j] < best:
            best = d2[j]
            gi = neighbours[off + 1 + j]
    return gi


@jit
def put_levels(levels, g, L, base, n):
    for i in range(n):
        L[base + i] = levels[g, i]


@jit
def round_group(xval, base, n, bits, kmaxq, idv, L):
    """L[base:base+n] = clamp(nearest_int(0.5*(id*x - 1)), 0, kMaxQ-1); returns the level code u."""
    u = 0
    for i in range(n):
        l = nearest_int(HALF * (idv * xval[base + i] - ONE))
        l = max(np.int32(0), min(np.int32(kmaxq - 1), l))
        L[base + i] = l
        u |= l << (bits * i)
    return u


@jit
def level_sums(weight, xval, L, B):
    """(sum w*x*q, sum w*q*q) with q = 2*L + 1, in ggml's order."""
    sumqx = ZERO
    sumq2 = ZERO
    for i in range(B):
        w = weight[i]
        q = F32(2 * L[i] + 1)
        sumqx += (w * xval[i]) * q
        sumq2 += (w * q) * q
    return sumqx, sumq2


@jit
def grid_search(xval, weight, waux, B, n, bits, kmaxq, values, V, levels, kmap, neighbours, d2, L, LA, U, IDV, SX,
                SQ, ongrid, OG, is_lo, is_hi, step, denom, scale, best, ongrid_start, final_all, final_needs_offgrid):
    """The trial scan and last pass shared by the five types; returns the block scale, L holds its levels.

    The trials do not depend on each other until ggml picks the best, so they run side by side as vector lanes
    t (LA [B, T] levels, U [T] codes, IDV [T] inverse scales, SX / SQ [T] sums, OG [groups, T] on-grid flags),
    each lane's sums added in ggml's order; the pick then goes through them in ggml's order."""
    ng = B // n
    T = is_hi - is_lo + 1
    for t in range(T):
        IDV[t] = (F32(2 * kmaxq - 1) + F32(is_lo + t) * step) / denom
    lo = np.int32(0)
    hi = np.int32(kmaxq - 1)
    for k in range(ng):
        for t in range(T):
            U[t] = 0
        for i in range(n):
            xv = xval[n * k + i]
            sh = np.int32(bits * i)
            for t in range(T):
                l = max(lo, min(hi, nearest_int(HALF * (IDV[t] * xv - ONE))))
                LA[n * k + i, t] = l
                U[t] |= l << sh
        for t in range(T):
            gi = kmap[U[t]]
            OG[k, t] = gi >= 0
            if gi < 0:
                g = find_best_neighbour(neighbours, -gi - 1, values, V, xval, n * k, waux, n * k, n, ONE / IDV[t], d2)
                for i in range(n):
                    LA[n * k + i, t] = levels[g, i]
    for t in range(T):
        SX[t] = ZERO
        SQ[t] = ZERO
    for i in range(B):
        w = weight[i]
        wx = w * xval[i]
        for t in range(T):
            q = F32(2 * LA[i, t] + 1)
            SX[t] += wx * q
            SQ[t] += (w * q) * q
    tb = -1
    for t in range(T):
        if SQ[t] > ZERO and SX[t] * SX[t] > best * SQ[t]:
            scale = SX[t] / SQ[t]
            best = scale * SX[t]
            tb = t
    for k in range(ng):
        ongrid[k] = ongrid_start if tb < 0 else OG[k, tb]
    if tb >= 0:
        for i in range(B):
            L[i] = LA[i, tb]
    n_off = 0
    for k in range(ng):
        n_off += 0 if ongrid[k] else 1
    if (n_off > 0 or not final_needs_offgrid) and scale > ZERO:
        idv = ONE / scale
        for k in range(ng):
            if ongrid[k] and not final_all:
                continue
            u = round_group(xval, n * k, n, bits, kmaxq, idv, L)
            gi = kmap[u]
            if gi < 0:
                g = find_best_neighbour(neighbours, -gi - 1, values, V, xval, n * k, waux, n * k, n, scale, d2)
                put_levels(levels, g, L, n * k, n)
        sumqx, sumq2 = level_sums(weight, xval, L, B)
        if sumq2 > ZERO:
            scale = sumqx / sumq2
    return scale


@jit
def split_signs(xb, base, weight, B, parity, xval, signs):
    """xval = |x| and signs[k] = the sign bits of values 8k..8k+7; with parity, an odd count flips back the value
    with the smallest weight*x*x (its xval is then negative) and keeps 7 bits."""
    for k in range(B // 8):
        nflip = 0
        s = 0
        for i in range(8):
            v = xb[base + 8 * k + i]
            if v >= ZERO:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                nflip += 1
                s |= 1 << i
        if parity:
            if nflip % 2:
                v0 = xb[base + 8 * k]
                imin = 0
                mn = (weight[8 * k] * v0) * v0
                for i in range(1, 8):
                    v = xb[base + 8 * k + i]
                    ax = (weight[8 * k + i] * v) * v
                    if ax < mn:
                        mn = ax
                        imin = i
                xval[8 * k + imin] = -xval[8 * k + imin]
                s ^= 1 << imin
            s &= 127
        signs[k] = s


@jit
def superblock_sumx2(xr, base):
    """sum x^2 over the super-block at base, sequentially."""
    sumx2 = ZERO
    for i in range(QK_K):
        v = xr[base + i]
        sumx2 += v * v
    return sumx2


@jit
def block_max(xval, B):
    mx = xval[0]
    for i in range(1, B):
        mx = mx if mx > xval[i] else xval[i]  # MAX(max, x)
    return mx


def _encoder(t):
    """The compiled row encoder (x, imat, weighted, out) of type t (one of the constants above)."""
    B = 32 if t in (IQ2_XXS, IQ3_XXS, IQ3_S) else 16
    n = 8 if t in (IQ2_XXS, IQ2_XS, IQ2_S) else 4
    bits = 2 if n == 8 else 3
    kmaxq = 3 if n == 8 else 8
    parity = t in (IQ2_XXS, IQ2_XS, IQ3_XXS)
    sign_mask = 127 if parity else 255
    two = t != IQ2_XXS and t != IQ2_XS  # sigma2 = 2*sumx2/QK_K, else sumx2/QK_K
    is_lo, is_hi = {IQ2_XXS: (-6, 6), IQ3_XXS: (-15, 15)}.get(t, (-9, 9))
    step = F32(0.1) if n == 8 else F32(0.2)
    eps = {IQ2_XXS: GROUP_MAX_EPS, IQ2_XS: GROUP_MAX_EPS, IQ2_S: F32(1e-8), IQ3_XXS: F32(1e-8), IQ3_S: ZERO}[t]
    final_all = t in (IQ2_XXS, IQ3_S)
    final_needs_offgrid = t != IQ2_XXS
    ongrid_start = t != IQ3_S
    fudge = {IQ2_XXS: ONE, IQ2_XS: ONE, IQ2_S: F32(0.9875), IQ3_XXS: F32(1.0125), IQ3_S: F32(1.033)}[t]
    bpb = {IQ2_XXS: 66, IQ2_XS: 74, IQ2_S: 82, IQ3_XXS: 98, IQ3_S: 110}[t]
    nb = QK_K // B
    ng = B // n
    name = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")[t]

    @jit
    def encode_rows(x, imat, weighted, out, values, V, levels, kmap, neighbours):
        rows, cols = x.shape
        weight = np.empty(B, np.float32)
        waux = np.empty(B, np.float32)
        d2 = np.empty(levels.shape[0], np.float32)
        xval = np.empty(B, np.float32)
        L = np.zeros(B, np.int32)
        T = is_hi - is_lo + 1  # the trials, side by side in grid_search
        LA = np.zeros((B, T), np.int32)
        U = np.zeros(T, np.int32)
        IDV = np.zeros(T, np.float32)
        SX = np.zeros(T, np.float32)
        SQ = np.zeros(T, np.float32)
        OG = np.zeros((ng, T), np.bool_)
        ongrid = np.zeros(ng, np.bool_)
        signs = np.zeros(B // 8, np.int32)
        scales = np.zeros(nb, np.float32)
        # IQ2_XXS starts every block from make_qp_quants(32, 4, xval, L, weight), run on the super-block's lanes
        QX = np.empty((B, nb), np.float32)
        QW = np.empty((B, nb), np.float32)
        QL = np.empty((B, nb), np.int32)
        qscale = np.empty(nb, np.float32)
        for r in range(rows):
            xr = x[r]
            o = out[r]
            for ibl in range(cols // QK_K):
                pos = ibl * bpb
                for j in range(bpb):
                    o[pos + j] = 0
                sumx2 = superblock_sumx2(xr, ibl * QK_K)
                sigma2 = (F32(2) * sumx2 if two else sumx2) / F32(QK_K)
                if t == IQ2_XXS:
                    for ib in range(nb):
                        base = ibl * QK_K + B * ib
                        for i in range(B):
                            v = xr[base + i]
                            QW[i, ib] = imat[base + i] * np.sqrt(sigma2 + v * v)
                            weight[i] = QW[i, ib]
                        split_signs(xr, base, weight, B, parity, xval, signs)
                        for i in range(B):
                            QX[i, ib] = xval[i]
                    make_qp_quants(QX, QW, kmaxq + 1, QL, qscale)
                max_scale = ZERO
                for ib in range(nb):
                    base = ibl * QK_K + B * ib
                    if weighted:
                        for i in range(B):
                            v = xr[base + i]
                            weight[i] = imat[base + i] * np.sqrt(sigma2 + v * v)
                    elif t == IQ2_S:
                        for i in range(B):
                            v = xr[base + i]
                            weight[i] = F32(0.25) * sigma2 + v * v
                    else:
                        for i in range(B):
                            v = xr[base + i]
                            weight[i] = v * v
                    for i in range(B):
                        waux[i] = np.sqrt(weight[i])
                    split_signs(xr, base, weight, B, parity, xval, signs)
                    mx = block_max(xval, B)
                    scales[ib] = ZERO
                    if t == IQ3_S:
                        if mx == ZERO:
                            continue
                    elif mx < eps:
                        continue
                    for i in range(B):
                        L[i] = 0
                    if t == IQ2_XXS:
                        scale = qscale[ib]
                        denom = scale * F32(kmaxq)  # eff_max
                        if denom <= ZERO:
                            continue
                    else:
                        denom = mx
                        scale = mx / F32(2 * kmaxq - 1)
                    scale = grid_search(xval, weight, waux, B, n, bits, kmaxq, values, V, levels, kmap, neighbours, d2,
                                        L, LA, U, IDV, SX, SQ, ongrid, OG, is_lo, is_hi, step, denom, scale, ZERO,
                                        ongrid_start, final_all, final_needs_offgrid)
                    if scale < ZERO:
                        scale = -scale
                        for k in range(B // 8):
                            signs[k] = (~signs[k]) & sign_mask
                    for k in range(ng):
                        u = 0
                        for i in range(n):
                            u |= L[n * k + i] << (bits * i)
                        gi = kmap[u]  # always on the grid here
                        if t == IQ2_XXS:  # qs: uint32 pairs (4 grid bytes; 4 x 7 sign bits | scale << 28)
                            o[pos + 2 + 8 * ib + k] = gi
                        elif t == IQ2_XS:  # qs: uint16 grid | signs << 9
                            v16 = gi | (signs[k] << 9)
                            o[pos + 2 + 2 * (2 * ib + k)] = v16 & 0xFF
                            o[pos + 3 + 2 * (2 * ib + k)] = (v16 >> 8) & 0xFF
                        elif t == IQ2_S:  # qs[32] low bytes, qs[32:] signs, qh 2 bits per group
                            i8 = 2 * ib + k
                            o[pos + 2 + i8] = gi & 255
                            o[pos + 66 + i8 // 4] |= (gi >> 8) << (2 * (i8 % 4))
                            o[pos + 2 + 32 + i8] = signs[k]
                        elif t == IQ3_XXS:  # qs[64] grid bytes, then uint32 signs | scale << 28
                            o[pos + 2 + 8 * ib + k] = gi
                        else:  # IQ3_S: qs[64], qh[8] (1 bit per group), signs[32], scales[4]
                            g = ib * ng + k
                            o[pos + 2 + g] = gi & 255
                            o[pos + 66 + g // 8] |= (gi >> 8) << (g % 8)
                    if t == IQ2_XXS or t == IQ3_XXS:
                        sw = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
                        p = pos + 2 + (8 * ib + 4 if t == IQ2_XXS else 64 + 4 * ib)
                        for j in range(4):
                            o[p + j] = (sw >> (8 * j)) & 0xFF
                    elif t == IQ3_S:
                        for k in range(4):
                            o[pos + 74 + 4 * ib + k] = signs[k]
                    scales[ib] = scale
                    max_scale = max_scale if max_scale > scale else scale  # MAX(max_scale, scale)
                if max_scale == ZERO:
                    for j in range(bpb):
                        o[pos + j] = 0
                    continue
                d = max_scale / F32(31)
                put_fp16(o, pos, d * fudge if t != IQ2_XXS and t != IQ2_XS else d)
                idv = ONE / d
                for ib in range(nb):
                    l = nearest_int(HALF * (idv * scales[ib] - ONE))
                    l = max(np.int32(0), min(np.int32(15), l))
                    if t == IQ2_XXS:
                        o[pos + 2 + 8 * ib + 7] |= l << 4
                    elif t == IQ3_XXS:
                        o[pos + 2 + 64 + 4 * ib + 3] |= l << 4
                    elif t == IQ2_XS:
                        o[pos + 66 + ib // 2] |= l << (4 * (ib % 2))
                    elif t == IQ2_S:
                        o[pos + 74 + ib // 2] |= l << (4 * (ib % 2))
                    else:
                        o[pos + 106 + ib // 2] |= l << (4 * (ib % 2))

    def encode(x, imat, weighted, out):
        lat = lattice(name)
        encode_rows(x, imat, weighted, out, ODD[lat.levels], lattice_values(name, ODD), lat.levels, lat.kmap,
                    lat.neighbours)

    return encode


encode_iq2_xxs = _encoder(IQ2_XXS)
encode_iq2_xs = _encoder(IQ2_XS)
encode_iq2_s = _encoder(IQ2_S)
encode_iq3_xxs = _encoder(IQ3_XXS)
encode_iq3_s = _encoder(IQ3_S)
