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
from .grids import lattice

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
def find_best_neighbour2(neighbours, off, levels, xr, xbase, weight, wbase, scale, xx, L):
    """ggml's iq1_find_best_neighbour2: the neighbour with the smallest sum w*(scale*xx[level] - x)^2 over the 8
    values xr[xbase:], weights weight[wbase:] (first on ties); its levels go to L[wbase:wbase+8]."""
    best = FLT_MAX
    gi = -1
    for j in range(1, neighbours[off] + 1):
        g = neighbours[off + j]
        d2 = ZERO
        for i in range(8):
            diff = scale * xx[levels[g, i]] - xr[xbase + i]
            d2 += (weight[wbase + i] * diff) * diff
        if d2 < best:
            best = d2
            gi = g
    if gi < 0:  # only NaN distances get here (ggml asserts); keep the first neighbour
        gi = neighbours[off + 1]
    for i in range(8):
        L[wbase + i] = levels[gi, i]
    return gi


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
def superblock_sigma2(xr, base):
    """2 * sum x^2 / QK_K over the super-block at base (sequential sum)."""
    sumx2 = ZERO
    for i in range(QK_K):
        v = xr[base + i]
        sumx2 += v * v
    return F32(2) * sumx2 / F32(QK_K)


@jit
def grid_groups(L, B, xr, base, weight, scale, xx_first, xx_rest, levels, kmap, neighbours, index):
    """The grid index of each group of 8 levels (a neighbour for a code off the grid; L is updated); returns True
    when every group was on the grid."""
    all_on = True
    for k in range(B // 8):
        u = 0
        for j in range(8):
            u |= L[8 * k + j] << (2 * j)
        gi = kmap[u]
        if gi < 0:
            all_on = False
            gi = find_best_neighbour2(neighbours, -gi - 1, levels, xr, base + 8 * k, weight, 8 * k, scale,
                                      xx_first if k == 0 else xx_rest, L)
        index[k] = gi
    return all_on


@jit
def refit_scale(B, xr, base, weight, levels, index, xx_first, xx_rest, scale):
    """sum w*q*x / sum w*q*q over the block's grid points (ggml's rescale after a neighbour), if both are > 0."""
    sumqx = ZERO
    sumq2 = ZERO
    for k in range(B // 8):
        xx = xx_first if k == 0 else xx_rest
        for j in range(8):
            w = weight[8 * k + j]
            q = xx[levels[index[k], j]]
            sumqx += (w * q) * xr[base + 8 * k + j]
            sumq2 += (w * q) * q
    if sumqx > ZERO and sumq2 > ZERO:
        return sumqx / sumq2
    return scale


@jit
def encode_iq1_s_rows(x, imat, weighted, out, levels, kmap, neighbours):
    rows, cols = x.shape
    B = 32
    nb = QK_K // B
    weight = np.empty(B, np.float32)
    sumx = np.zeros(B + 1, np.float32)
    sumw = np.zeros(B + 1, np.float32)
    idx = np.empty(B, np.int64)
    L = np.zeros(B, np.int32)
    index = np.zeros(B // 8, np.int64)
    scales = np.zeros(nb, np.float32)
    shifts = np.zeros(nb, np.int32)
    for r in range(rows):
        xr = x[r]
        o = out[r]
        for ibl in range(cols // QK_K):
            pos = ibl * 50  # d, qs[32], qh[8] (uint16)
            for j in range(50):
                o[pos + j] = 0
            sigma2 = superblock_sigma2(xr, ibl * QK_K)
            max_scale = ZERO
            for ib in range(nb):
                base = ibl * QK_K + B * ib
                mx = block_weights(xr, base, imat, weighted, sigma2, B, weight)
                scales[ib] = ZERO
                shifts[ib] = 1
                if mx < F32(1e-12):  # GROUP_MAX_EPS_IQ1_S
                    continue
                stable_order(xr, base, B, idx)
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
                        sumqx = (a * X_P[0] + b * X_P[1]) + c * X_P[2]
                        sumq2 = ((wa * X_P[0]) * X_P[0] + (wb * X_P[1]) * X_P[1]) + (wc * X_P[2]) * X_P[2]
                        if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
                            scale = sumqx / sumq2
                            best = scale * sumqx
                            b1, b2, shift = i1, i2, 1
                        sumqx = (a * X_M[0] + b * X_M[1]) + c * X_M[2]
                        sumq2 = ((wa * X_M[0]) * X_M[0] + (wb * X_M[1]) * X_M[1]) + (wc * X_M[2]) * X_M[2]
                        if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
                            scale = sumqx / sumq2
                            best = scale * sumqx
                            b1, b2, shift = i1, i2, -1
                if b1 < 0 or b2 < 0 or shift == 0:
                    continue
                for j in range(B):
                    L[idx[j]] = 0 if j < b1 else 1 if j < b2 else 2
                if scale < ZERO:
                    for j in range(B):
                        L[j] = 2 - L[j]
                    scale = -scale
                    shift = -shift
                xx = X_P if shift == 1 else X_M
                if not grid_groups(L, B, xr, base, weight, scale, xx, xx, levels, kmap, neighbours, index):
                    scale = refit_scale(B, xr, base, weight, levels, index, xx, xx, scale)
                h = 0
                for k in range(B // 8):
                    o[pos + 2 + (B // 8) * ib + k] = index[k] & 255
                    h |= (index[k] >> 8) << (3 * k)
                o[pos + 34 + 2 * ib] = h & 0xFF
                o[pos + 35 + 2 * ib] = (h >> 8) & 0xFF
                scales[ib] = scale
                shifts[ib] = shift
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == ZERO:
                continue
            d = max_scale / F32(15)
            put_fp16(o, pos, d * F32(1.125))
            idv = ONE / d
            for ib in range(nb):
                l = nearest_int(HALF * (idv * scales[ib] - ONE))
                l = max(np.int32(0), min(np.int32(7), l))
                if shifts[ib] == -1:
                    l |= 8
                o[pos + 35 + 2 * ib] |= l << 4  # qh[ib] |= l << 12


@jit
def encode_iq1_m_rows(x, imat, weighted, out, levels, kmap, neighbours):
    rows, cols = x.shape
    B = 16
    nb = QK_K // B
    weight = np.empty(B, np.float32)
    idx = np.empty(B, np.int64)
    L = np.zeros(B, np.int32)
    index = np.zeros(B // 8, np.int64)
    scales = np.zeros(nb, np.float32)
    shifts = np.zeros(nb, np.int32)
    sqx = np.zeros(4, np.float32)
    sq2 = np.zeros(4, np.float32)
    # the level of each shift combination k for the first / second group of 8: 0: (+, +), 1: (+, -), 2: (-, +), 3: (-, -)
    for r in range(rows):
        xr = x[r]
        o = out[r]
        for ibl in range(cols // QK_K):
            pos = ibl * 56  # qs[32], qh[16], scales[8]
            for j in range(56):
                o[pos + j] = 0
            sigma2 = superblock_sigma2(xr, ibl * QK_K)
            max_scale = ZERO
            for ib in range(nb):
                base = ibl * QK_K + B * ib
                mx = block_weights(xr, base, imat, weighted, sigma2, B, weight)
                scales[ib] = ZERO
                shifts[ib] = 0
                if mx < F32(1e-7):  # GROUP_MAX_EPS_IQ1_M
                    continue
                stable_order(xr, base, B, idx)
                best = -FLT_MAX
                scale = mx
                b1 = -1
                b2 = -1
                bk = -1
                for i1 in range(B + 1):
                    for i2 in range(i1, B + 1):
                        for k in range(4):
                            sqx[k] = ZERO
                            sq2[k] = ZERO
                        for j in range(B):
                            i = idx[j]
                            lv = 0 if j < i1 else 1 if j < i2 else 2
                            w = weight[i]
                            v = xr[base + i]
                            p = X_P[lv]
                            m = X_M[lv]
                            wpx = (w * p) * v
                            wmx = (w * m) * v
                            wpp = (w * p) * p
                            wmm = (w * m) * m
                            if i < B // 2:
                                sqx[0] += wpx
                                sqx[1] += wpx
                                sqx[2] += wmx
                                sqx[3] += wmx
                                sq2[0] += wpp
                                sq2[1] += wpp
                                sq2[2] += wmm
                                sq2[3] += wmm
                            else:
                                sqx[0] += wpx
                                sqx[2] += wpx
                                sqx[1] += wmx
                                sqx[3] += wmx
                                sq2[0] += wpp
                                sq2[2] += wpp
                                sq2[1] += wmm
                                sq2[3] += wmm
                        for k in range(4):
                            if sq2[k] > ZERO and sqx[k] * sqx[k] > best * sq2[k]:
                                scale = sqx[k] / sq2[k]
                                best = scale * sqx[k]
                                b1, b2, bk = i1, i2, k
                if b1 < 0 or b2 < 0 or bk < 0:
                    continue
                for j in range(B):
                    L[idx[j]] = 0 if j < b1 else 1 if j < b2 else 2
                if scale < ZERO:
                    for j in range(B):
                        L[j] = 2 - L[j]
                    scale = -scale
                    bk = 3 - bk
                xx0 = X_P if bk < 2 else X_M
                xx1 = X_P if bk % 2 == 0 else X_M
                if not grid_groups(L, B, xr, base, weight, scale, xx0, xx1, levels, kmap, neighbours, index):
                    scale = refit_scale(B, xr, base, weight, levels, index, xx0, xx1, scale)
                o[pos + 2 * ib] = index[0] & 255
                o[pos + 2 * ib + 1] = index[1] & 255
                o[pos + 32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
                scales[ib] = scale
                shifts[ib] = bk
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == ZERO:
                continue
            d = max_scale / F32(15)
            idv = ONE / d
            sumqx = ZERO
            sumq2 = ZERO
            for ib in range(nb):
                l = nearest_int(HALF * (idv * scales[ib] - ONE))
                l = max(np.int32(0), min(np.int32(7), l))
                sc = (l << (3 * (ib % 4))) & 0xFFFF  # into the uint16 sc[ib / 4]
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


def _rows_encoder(kernel):
    def encode(x, imat, weighted, out):
        lat = lattice("IQ1_S")
        kernel(x, imat, weighted, out, lat.levels, lat.kmap, lat.neighbours)

    return encode


encode_iq1_s = _rows_encoder(encode_iq1_s_rows)
encode_iq1_m = _rows_encoder(encode_iq1_m_rows)
