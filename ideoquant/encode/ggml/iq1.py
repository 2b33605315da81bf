"""IQ1_S and IQ1_M: ggml's ``quantize_row_iq1_s_impl`` and ``quantize_row_iq1_m_impl`` (ggml-quants.c).

Each block's values take one of three levels, ``-1, 0, 1`` shifted by ``+-IQ1S_DELTA``. ggml sorts the block's
values and tries every pair of cut points between the levels (the optimum is among them), for each shift (IQ1_S:
one shift per block of 32; IQ1_M: one per group of 8, four combinations per block of 16). The levels of each group
of 8 must be a point of IQ1_S's 2048-point grid; one that is not becomes its nearest neighbour (``grids``). Block
scales are 3-bit codes of ``max_scale / 15``; IQ1_M then fits the super-block scale by least squares over all
blocks. Every float operation is ggml's, in its order, in float32 (see ``common``). ggml sorts with the C
library's ``qsort``, which glibc implements as a (stable) merge sort: equal values keep their index order here too.
"""

from __future__ import annotations

import numpy as np

from .common import F32, ONE, ZERO, fp16_bits, jit, nearest_int, put_fp16
from .grids import lattice, lattice_values
from .iquants import find_best_neighbour, put_levels, superblock_sumx2

QK_K = 256
HALF = F32(0.5)
FLT_MAX = F32(3.4028234663852886e38)
DELTA = F32(0.125)  # IQ1S_DELTA = IQ1M_DELTA
X_P = np.array([F32(-1) + DELTA, DELTA, ONE + DELTA], np.float32)
X_M = np.array([F32(-1) - DELTA, -DELTA, ONE - DELTA], np.float32)


@jit
def stable_order(xb, base, B, idx):
    """idx = the positions 0..B-1 ordered by xb[base + i], equal values in index order (insertion sort)."""
    for j in range(B):
        v = xb[base + j]
        p = j
        while p > 0 and xb[base + idx[p - 1]] > v:
            idx[p] = idx[p - 1]
            p -= 1
        idx[p] = j


@jit
def block_weights(xr, base, imat, weighted, sigma2, B, weight):
    """qw * sqrt(sigma2 + x^2) with an imatrix, x^2 without; returns the block's max |x|."""
    mx = abs(xr[base])
    for i in range(B):
        v = xr[base + i]
        weight[i] = imat[base + i] * np.sqrt(sigma2 + v * v) if weighted else v * v
        mx = mx if mx > abs(v) else abs(v)  # MAX(max, fabsf(x))
    return mx


@jit
def split_search_s(xr, base, weight, idx, sumx, sumw, mx):
    """IQ1_S's exhaustive search over the cut points (i1, i2) of the sorted block of 32, one shift for all of it,
    with prefix sums: (i1, i2, shift +1 / -1 or 0 for none, scale)."""
    B = 32
    for j in range(B):
        i = idx[j]
        sumx[j + 1] = sumx[j] + weight[i] * xr[base + i]
        sumw[j + 1] = sumw[j] + weight[i]
    best = -FLT_MAX
    scale = mx
    b1 = -1
    b2 = -1
    shift = 0
    for i1 in range(B + 1):
        for i2 in range(i1, B + 1):
            a = sumx[i1] - sumx[0]
            b = sumx[i2] - sumx[i1]
            c = sumx[B] - sumx[i2]
            wa = sumw[i1] - sumw[0]
            wb = sumw[i2] - sumw[i1]
            wc = sumw[B] - sumw[i2]
            for sgn in (1, -1):
                xx = X_P if sgn == 1 else X_M
                sumqx = (a * xx[0] + b * xx[1]) + c * xx[2]
                sumq2 = ((wa * xx[0]) * xx[0] + (wb * xx[1]) * xx[1]) + (wc * xx[2]) * xx[2]
                if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    b1, b2, shift = i1, i2, sgn
    return b1, b2, shift, scale


@jit
def split_search_m(xr, base, weight, idx, mx, CX, CQ, AX, AQ):
    """IQ1_M's exhaustive search over the cut points (i1, i2) of the sorted block of 16 and the 4 shift combinations
    k of its two groups of 8 (0: (+, +), 1: (+, -), 2: (-, +), 3: (-, -)): (i1, i2, k or -1 for none, scale).

    ggml sums each pair's sumqx[k] and sumq2[k] from zero over the sorted values, level 0 below i1, 1 below i2, 2
    from there. The same additions in the same order here, shared where they are the same: the level-0 prefix once
    per i1, then all i2 at once as lanes (AX, AQ [4, 17]), each adding its level-1 or level-2 term per value.
    CX, CQ [4, 3, 16]: the term of sorted value j at level lv in sumqx[k] and sumq2[k]."""
    B = 16
    for j in range(B):
        i = idx[j]
        w = weight[i]
        v = xr[base + i]
        second = i >= B // 2  # combination k shifts the first group by k >> 1, the second by k & 1 (0: +, 1: -)
        for lv in range(3):
            wpx = (w * X_P[lv]) * v
            wmx = (w * X_M[lv]) * v
            wpp = (w * X_P[lv]) * X_P[lv]
            wmm = (w * X_M[lv]) * X_M[lv]
            CX[0, lv, j] = wpx
            CQ[0, lv, j] = wpp
            CX[1, lv, j] = wmx if second else wpx
            CQ[1, lv, j] = wmm if second else wpp
            CX[2, lv, j] = wpx if second else wmx
            CQ[2, lv, j] = wpp if second else wmm
            CX[3, lv, j] = wmx
            CQ[3, lv, j] = wmm
    best = -FLT_MAX
    scale = mx
    b1 = -1
    b2 = -1
    bk = -1
    px0 = px1 = px2 = px3 = ZERO  # the level-0 prefix sums of the 4 combinations
    pq0 = pq1 = pq2 = pq3 = ZERO
    for i1 in range(B + 1):
        for i2 in range(i1, B + 1):
            AX[0, i2], AX[1, i2], AX[2, i2], AX[3, i2] = px0, px1, px2, px3
            AQ[0, i2], AQ[1, i2], AQ[2, i2], AQ[3, i2] = pq0, pq1, pq2, pq3
        for j in range(i1, B):
            for k in range(4):
                c1x = CX[k, 1, j]
                c2x = CX[k, 2, j]
                c1q = CQ[k, 1, j]
                c2q = CQ[k, 2, j]
                for i2 in range(i1, B + 1):
                    AX[k, i2] += c1x if j < i2 else c2x
                    AQ[k, i2] += c1q if j < i2 else c2q
        for i2 in range(i1, B + 1):
            for k in range(4):
                sqx = AX[k, i2]
                sq2 = AQ[k, i2]
                if sq2 > ZERO and sqx * sqx > best * sq2:
                    scale = sqx / sq2
                    best = scale * sqx
                    b1, b2, bk = i1, i2, k
        if i1 < B:
            px0 += CX[0, 0, i1]
            px1 += CX[1, 0, i1]
            px2 += CX[2, 0, i1]
            px3 += CX[3, 0, i1]
            pq0 += CQ[0, 0, i1]
            pq1 += CQ[1, 0, i1]
            pq2 += CQ[2, 0, i1]
            pq3 += CQ[3, 0, i1]
    return b1, b2, bk, scale


def _encoder(is_m):
    """The compiled row encoder (x, imat, weighted, out, levels, kmap, neighbours) of IQ1_M (is_m) or IQ1_S."""
    B = 16 if is_m else 32
    bpb = 56 if is_m else 50  # IQ1_M: qs[32], qh[16], scales[8]; IQ1_S: d, qs[32], qh[8] (uint16)
    qs = 0 if is_m else 2
    eps = F32(1e-7) if is_m else F32(1e-12)  # GROUP_MAX_EPS_IQ1_M, _IQ1_S
    skipped_shift = 0 if is_m else 1
    nb = QK_K // B

    @jit
    def encode_rows(x, imat, weighted, out, gp, gm, vp, vm, levels, kmap, neighbours):
        rows, cols = x.shape
        weight = np.empty(B, np.float32)
        sumx = np.zeros(B + 1, np.float32)
        sumw = np.zeros(B + 1, np.float32)
        idx = np.empty(B, np.int64)
        L = np.zeros(B, np.int64)
        index = np.zeros(B // 8, np.int64)
        scales = np.zeros(nb, np.float32)
        shifts = np.zeros(nb, np.int64)
        d2 = np.empty(levels.shape[0], np.float32)
        CX = np.zeros((4, 3, B), np.float32)  # IQ1_M's search tables
        CQ = np.zeros((4, 3, B), np.float32)
        AX = np.zeros((4, B + 1), np.float32)
        AQ = np.zeros((4, B + 1), np.float32)
        for r in range(rows):
            xr = x[r]
            o = out[r]
            for ibl in range(cols // QK_K):
                pos = ibl * bpb
                for j in range(bpb):
                    o[pos + j] = 0
                sigma2 = F32(2) * superblock_sumx2(xr, ibl * QK_K) / F32(QK_K)
                max_scale = ZERO
                for ib in range(nb):
                    base = ibl * QK_K + B * ib
                    mx = block_weights(xr, base, imat, weighted, sigma2, B, weight)
                    scales[ib] = ZERO
                    shifts[ib] = skipped_shift
                    if mx < eps:
                        continue
                    stable_order(xr, base, B, idx)
                    if is_m:
                        b1, b2, shift, scale = split_search_m(xr, base, weight, idx, mx, CX, CQ, AX, AQ)
                    else:
                        b1, b2, shift, scale = split_search_s(xr, base, weight, idx, sumx, sumw, mx)
                    if b1 < 0 or b2 < 0 or shift == (-1 if is_m else 0):
                        continue
                    for j in range(B):
                        L[idx[j]] = 0 if j < b1 else 1 if j < b2 else 2
                    if scale < ZERO:
                        for j in range(B):
                            L[j] = 2 - L[j]
                        scale = -scale
                        shift = 3 - shift if is_m else -shift
                    plus0 = shift < 2 if is_m else shift == 1  # the shift of each group of 8: +delta or -delta
                    plus1 = shift % 2 == 0 if is_m else plus0
                    all_on = True
                    for k in range(B // 8):
                        u = 0
                        for j in range(8):
                            u |= L[8 * k + j] << (2 * j)
                        gi = kmap[u]
                        if gi < 0:
                            all_on = False
                            plus = plus0 if k == 0 else plus1
                            gi = find_best_neighbour(neighbours, -gi - 1, gp if plus else gm, vp if plus else vm,
                                                     xr, base + 8 * k, weight, 8 * k, 8, scale, d2)
                            put_levels(levels, gi, L, 8 * k, 8)
                        index[k] = gi
                    if not all_on:  # refit the scale to the grid points
                        sumqx = ZERO
                        sumq2 = ZERO
                        for k in range(B // 8):
                            xx = X_P if (plus0 if k == 0 else plus1) else X_M
                            for j in range(8):
                                w = weight[8 * k + j]
                                q = xx[levels[index[k], j]]
                                sumqx += (w * q) * xr[base + 8 * k + j]
                                sumq2 += (w * q) * q
                        if sumqx > ZERO and sumq2 > ZERO:
                            scale = sumqx / sumq2
                    h = 0
                    for k in range(B // 8):
                        o[pos + qs + (B // 8) * ib + k] = index[k] & 255
                        h |= (index[k] >> 8) << ((4 if is_m else 3) * k)
                    if is_m:
                        o[pos + 32 + ib] = h
                    else:
                        o[pos + 34 + 2 * ib] = h & 0xFF
                        o[pos + 35 + 2 * ib] = (h >> 8) & 0xFF
                    scales[ib] = scale
                    shifts[ib] = shift
                    max_scale = max_scale if max_scale > scale else scale
                if max_scale == ZERO:
                    continue
                d = max_scale / F32(15)
                idv = ONE / d
                if not is_m:
                    put_fp16(o, pos, d * F32(1.125))
                    for ib in range(nb):
                        l = max(np.int32(0), min(np.int32(7), nearest_int(HALF * (idv * scales[ib] - ONE))))
                        o[pos + 35 + 2 * ib] |= (l | (8 if shifts[ib] == -1 else 0)) << 4  # qh[ib] |= l << 12
                    continue
                sumqx = ZERO
                sumq2 = ZERO
                for ib in range(nb):  # IQ1_M: the super-block scale by least squares over the stored points
                    l = max(np.int32(0), min(np.int32(7), nearest_int(HALF * (idv * scales[ib] - ONE))))
                    sc = l << (3 * (ib % 4))  # into the uint16 sc[ib / 4]
                    o[pos + 48 + 2 * (ib // 4)] |= sc & 0xFF
                    o[pos + 49 + 2 * (ib // 4)] |= sc >> 8
                    o[pos + 32 + ib] |= (0x00, 0x80, 0x08, 0x88)[shifts[ib]]
                    base = ibl * QK_K + B * ib
                    block_weights(xr, base, imat, weighted, sigma2, B, weight)
                    fl = F32(2 * l + 1)
                    qh = np.int32(o[pos + 32 + ib])
                    for k in range(2):
                        xx = (X_P if shifts[ib] < 2 else X_M) if k == 0 else (X_P if shifts[ib] % 2 == 0 else X_M)
                        g = np.int32(o[pos + 2 * ib + k]) + ((qh << (8 - 4 * k)) & 0x700)
                        for j in range(8):
                            w = weight[8 * k + j]
                            q = xx[levels[g, j]] * fl
                            sumqx += (w * q) * xr[base + 8 * k + j]
                            sumq2 += (w * q) * q
                if sumq2 > ZERO:
                    d = sumqx / sumq2
                h = fp16_bits(d * F32(1.1125))  # its 4 nibbles go to the top of sc[0..3]
                for j in range(4):
                    o[pos + 49 + 2 * j] |= ((h >> (4 * j)) & 0xF) << 4

    def encode(x, imat, weighted, out):
        lat = lattice("IQ1_S")
        encode_rows(x, imat, weighted, out, X_P[lat.levels], X_M[lat.levels], lattice_values("IQ1_S", X_P),
                    lattice_values("IQ1_S", X_M), lat.levels, lat.kmap, lat.neighbours)

    return encode


encode_iq1_s = _encoder(False)
encode_iq1_m = _encoder(True)
