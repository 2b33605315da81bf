"""Q2_K, Q3_K, Q4_K, Q5_K and Q6_K: ggml's ``quantize_row_<t>_ref`` (no imatrix) and ``quantize_row_<t>_impl``.

Each row is cut into chunks of up to ``SB`` super-blocks of 256 values. A chunk's sub-blocks (16 or 32 values)
are transposed into lanes, ``X[i, k]`` = value ``i`` of sub-block ``k``, and the shared searches of ``common``
run on all of them at once; the per-super-block scale quantization works on lanes of super-blocks. Then every
super-block is requantized with its fp16-rounded scales and packed, exactly as ggml does.
"""

from __future__ import annotations

import numpy as np

from .common import (
    F32,
    GROUP_MAX_EPS,
    ONE,
    ZERO,
    jit,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    put_fp16,
)

QK_K = 256
SB = 24  # super-blocks per chunk: a 4608-wide row (18) in one, fewer allocations per weight


@jit
def _gather(xr, s0, ns, sub, X):
    """X[i, k] = value i of sub-block k of super-blocks s0 .. s0+ns-1."""
    g = ns * (QK_K // sub)
    base = s0 * QK_K
    for i in range(sub):
        for k in range(g):
            X[i, k] = xr[base + k * sub + i]


def _encoder(bits):
    """The compiled encoder of Q<bits>_K, (x, imat, weighted, out): every row of x in chunks of SB super-blocks,
    each encoded by the type's chunk kernel. bits is a compile-time constant of the closure.

    X, W, L are [sub, g] lane views of flat buffers (written out here: views returned by a jitted call cost time);
    P holds per sub-block values (scales, mins, weight sums, d, d*min), Is is int32 scratch for one super-block."""
    sub = 32 if bits == 4 or bits == 5 else 16

    @jit
    def encode(x, imat, weighted, out):
        rows, cols = x.shape
        nsb = cols // QK_K
        Xf = np.empty(SB * QK_K, F32)
        Wf = np.empty(SB * QK_K, F32)
        Lf = np.empty(SB * QK_K, np.int32)
        P = (np.zeros(SB * 16, F32), np.zeros(SB * 16, F32), np.zeros(SB * 16, F32), np.zeros(SB * 16, F32),
             np.zeros(SB * 16, F32))
        Is = np.empty(QK_K + 16, np.int32)
        for r in range(rows):
            for s0 in range(0, nsb, SB):
                ns = min(SB, nsb - s0)
                g = ns * (QK_K // sub)
                X = Xf[: sub * g].reshape((sub, g))
                W = Wf[: sub * g].reshape((sub, g))
                L = Lf[: sub * g].reshape((sub, g))
                _gather(x[r], s0, ns, sub, X)
                if bits == 2:
                    _q2_k_chunk(x[r], imat, weighted, out[r], s0, ns, X, W, L, P)
                elif bits == 3:
                    _q3_k_chunk(x[r], imat, weighted, out[r], s0, ns, X, W, L, P, Is)
                elif bits == 6:
                    _q6_k_chunk(imat, weighted, out[r], s0, ns, X, W, L, P)
                elif bits == 4:
                    _q4_k_chunk(x[r], imat, weighted, out[r], s0, ns, X, W, L, P)
                else:
                    _q5_k_chunk(x[r], imat, weighted, out[r], s0, ns, X, W, L, P)

    return encode


@jit
def _superblock_sigma2(xr, s, two):
    """ggml's sum_x2 over one super-block (sequential), times 2 or not, over 256."""
    acc = ZERO
    base = s * QK_K
    for j in range(QK_K):
        acc += xr[base + j] * xr[base + j]
    if two:
        acc = F32(2) * acc
    return acc / F32(QK_K)


@jit
def _imat_weights(xr, qw, s0, ns, sub, X, W, sw, two):
    """W = qw * sqrtf(sigma2 + x*x) (sigma2 per super-block) and sw[k] = the sum of sub-block k's weights."""
    nsub = QK_K // sub
    for s in range(ns):
        sigma2 = _superblock_sigma2(xr, s0 + s, two)
        for kk in range(nsub):
            k = s * nsub + kk
            acc = ZERO
            for i in range(sub):
                x = X[i, k]
                w = qw[(s0 + s) * QK_K + kk * sub + i] * np.sqrt(sigma2 + x * x)
                W[i, k] = w
                acc += w
            sw[k] = acc


@jit
def _lanes_by_superblock(v, ns, nsub):
    """[ns*nsub] per-sub-block values -> a new V[nsub, ns] (lanes = super-blocks)."""
    V = np.empty((nsub, ns), F32)
    for s in range(ns):
        for j in range(nsub):
            V[j, s] = v[s * nsub + j]
    return V


@jit
def _qkx_weighted(xr, imat, s0, ns, sub, X, W, L, P, nmax, smax, two):
    """The imatrix path of Q2_K / Q4_K / Q5_K: the weights, make_qkx3_quants on the sub-blocks (scales P[0], mins
    P[1], weight sums P[2]), then make_qp_quants(smax) of the scales and of the mins of each super-block, weighted by
    the sums: (Ls, d, Lm, dmin), Ls / Lm [nsub, ns] and d / dmin [ns]."""
    nsub = QK_K // sub
    _imat_weights(xr, imat, s0, ns, sub, X, W, P[2], two)
    make_qkx_quants(X, W, nmax, F32(-0.9), F32(0.05), 36, False, L, P[0], P[1])
    S = _lanes_by_superblock(P[2], ns, nsub)
    Ls = np.empty((nsub, ns), np.int32)
    Lm = np.empty((nsub, ns), np.int32)
    d = np.empty(ns, F32)
    dmin = np.empty(ns, F32)
    make_qp_quants(_lanes_by_superblock(P[0], ns, nsub), S, smax, Ls, d)
    make_qp_quants(_lanes_by_superblock(P[1], ns, nsub), S, smax, Lm, dmin)
    return Ls, d, Lm, dmin


@jit
def _superblock_max(v, ns, nsub):
    """[ns]: the largest of each super-block's nsub values v[s*nsub:(s+1)*nsub], at least 0 (one call per chunk)."""
    mx = np.zeros(ns, F32)
    for s in range(ns):
        for j in range(s * nsub, (s + 1) * nsub):
            mx[s] = v[j] if v[j] > mx[s] else mx[s]
    return mx


@jit
def _superblock_absmax(v, ns, nsub):
    """([ns], [ns]): each super-block's first value with the largest |v| (0 if all are 0), and that |v|."""
    mx = np.zeros(ns, F32)
    amax = np.zeros(ns, F32)
    for s in range(ns):
        for j in range(s * nsub, (s + 1) * nsub):
            if abs(v[j]) > amax[s]:
                amax[s] = abs(v[j])
                mx[s] = v[j]
    return mx, amax


@jit
def _requant(X, L, dj, dmj, lo, hi, off):
    """L[i, k] = clamp(nearest_int((x + dm)/d), lo, hi) + off on every lane with d != 0 (others keep L)."""
    n, g = X.shape
    for i in range(n):
        for k in range(g):
            if dj[k] != ZERO:
                L[i, k] = min(max(nearest_int((X[i, k] + dmj[k]) / dj[k]), lo), hi) + off


# ---------------------------------------------------------------- Q4_K / Q5_K

@jit
def _pack_k4(o, pos, ls, lm):
    """The 12-byte scales field of Q4_K/Q5_K from 8 scales and 8 mins (uint8 values)."""
    for j in range(4):
        o[pos + j] = np.uint8(ls[j] & 0xFF)
        o[pos + j + 4] = np.uint8(lm[j] & 0xFF)
    for j in range(4, 8):
        o[pos + j + 4] = np.uint8(((ls[j] & 0xF) | ((lm[j] & 0xF) << 4)) & 0xFF)
        o[pos + j - 4] |= np.uint8(((ls[j] >> 4) << 6) & 0xFF)
        o[pos + j] |= np.uint8(((lm[j] >> 4) << 6) & 0xFF)


@jit
def _scale_min_k4(o, pos, j):
    if j < 4:
        return np.int32(o[pos + j] & 63), np.int32(o[pos + j + 4] & 63)
    d = (np.int32(o[pos + j + 4]) & 0xF) | ((np.int32(o[pos + j - 4]) >> 6) << 4)
    m = (np.int32(o[pos + j + 4]) >> 4) | ((np.int32(o[pos + j]) >> 6) << 4)
    return d, m


def _q45_k_chunk_kernel(bits):
    """The compiled chunk kernel of Q4_K (bits=4: d, dmin, scales[12], qs[128]; 144 B) or Q5_K (bits=5: ..., qh[32],
    qs[128]; 176 B); bits is a compile-time constant of the closure."""

    @jit
    def chunk(xr, imat, weighted, o, s0, ns, X, W, L, P):
        sub = 32
        nsub = 8
        g = ns * nsub
        bpb = 144 if bits == 4 else 176
        nmax = 15 if bits == 4 else 31
        scales, mins, dj, dmj = P[0], P[1], P[3], P[4]
        ls = np.empty(nsub, np.int32)
        lm = np.empty(nsub, np.int32)
        if weighted:
            Ls, dblk, Lm, mblk = _qkx_weighted(xr, imat, s0, ns, sub, X, W, L, P, nmax, 63, True)
        else:
            for k in range(g):
                acc = ZERO
                for i in range(sub):
                    acc += X[i, k] * X[i, k]
                av_x = np.sqrt(acc / F32(32))
                for i in range(sub):
                    W[i, k] = av_x + abs(X[i, k])
            rmin = F32(-1.0) if bits == 4 else F32(-0.5)
            make_qkx_quants(X, W, nmax, rmin, F32(0.1), 20 if bits == 4 else 15, False, L, scales, mins)
            max_scales = _superblock_max(scales, ns, nsub)
            max_mins = _superblock_max(mins, ns, nsub)
        for s in range(ns):
            pos = (s0 + s) * bpb
            if weighted:
                for j in range(nsub):
                    ls[j] = Ls[j, s] if bits == 4 else min(63, Ls[j, s])
                    lm[j] = Lm[j, s] if bits == 4 else min(63, Lm[j, s])
                dv = dblk[s]
                mv = mblk[s]
            else:
                max_scale = max_scales[s]
                max_min = max_mins[s]
                inv_scale = F32(63) / max_scale if max_scale > ZERO else ZERO
                inv_min = F32(63) / max_min if max_min > ZERO else ZERO
                for j in range(nsub):
                    ls[j] = min(63, nearest_int(inv_scale * scales[s * nsub + j]) & 0xFF)
                    lm[j] = min(63, nearest_int(inv_min * mins[s * nsub + j]) & 0xFF)
                dv = max_scale / F32(63)
                mv = max_min / F32(63)
            _pack_k4(o, pos + 4, ls, lm)
            d = put_fp16(o, pos, dv)
            dmin = put_fp16(o, pos + 2, mv)
            for j in range(nsub):
                scv, mnv = _scale_min_k4(o, pos + 4, j)
                dj[s * nsub + j] = d * F32(scv)
                dmj[s * nsub + j] = dmin * F32(mnv)
        _requant(X, L, dj, dmj, 0, nmax, 0)
        for s in range(ns):
            pos = (s0 + s) * bpb
            if bits == 4:
                for p in range(4):
                    for l in range(32):
                        a = L[l, s * nsub + 2 * p]
                        b = L[l, s * nsub + 2 * p + 1]
                        o[pos + 16 + 32 * p + l] = np.uint8(a | (b << 4))
            else:
                for l in range(32):
                    o[pos + 16 + l] = 0
                for p in range(4):
                    for l in range(32):
                        a = L[l, s * nsub + 2 * p]
                        b = L[l, s * nsub + 2 * p + 1]
                        h = 0
                        if a > 15:
                            a -= 16
                            h |= 1 << (2 * p)
                        if b > 15:
                            b -= 16
                            h |= 2 << (2 * p)
                        o[pos + 16 + l] |= np.uint8(h)
                        o[pos + 48 + 32 * p + l] = np.uint8(a | (b << 4))

    return chunk


_q4_k_chunk = _q45_k_chunk_kernel(4)
_q5_k_chunk = _q45_k_chunk_kernel(5)


# ---------------------------------------------------------------- Q6_K

@jit
def _q6_k_chunk(imat, weighted, o, s0, ns, X, W, L, P):
    """Q6_K (ql[128], qh[64], scales[16], d; 210 B) of the chunk's super-blocks."""
    sub = 16
    nsub = 16
    g = ns * nsub
    scales, dj, dmj = P[0], P[3], P[4]  # dmj stays 0
    if weighted:
        for s in range(ns):
            for kk in range(nsub):
                for i in range(sub):
                    W[i, s * nsub + kk] = imat[(s0 + s) * QK_K + kk * sub + i]
    else:
        for i in range(sub):
            for k in range(g):
                W[i, k] = X[i, k] * X[i, k]
    make_qx_quants(X, W, 32, L, scales)
    max_scales, max_abss = _superblock_absmax(scales, ns, nsub)
    for s in range(ns):
        pos = (s0 + s) * 210
        max_scale = max_scales[s]
        max_abs = max_abss[s]
        if max_abs < GROUP_MAX_EPS:
            for t in range(210):
                o[pos + t] = 0
            for j in range(nsub):
                dj[s * nsub + j] = ZERO
                for i in range(sub):
                    L[i, s * nsub + j] = -1  # marks the block as written
            continue
        iscale = F32(-128) / max_scale
        d = put_fp16(o, pos + 208, ONE / iscale)
        for j in range(nsub):
            v = min(127, nearest_int(iscale * scales[s * nsub + j]))
            v = ((v + 128) & 255) - 128  # int8_t
            o[pos + 192 + j] = np.uint8(v & 0xFF)
            dj[s * nsub + j] = d * F32(v)
    _requant(X, L, dj, dmj, -32, 31, 32)
    for s in range(ns):
        pos = (s0 + s) * 210
        if L[0, s * nsub] < 0:
            continue
        for h in range(2):
            for l in range(32):
                e = 128 * h + l
                q1 = L[e % 16, s * nsub + e // 16]
                q2 = L[(e + 32) % 16, s * nsub + (e + 32) // 16]
                q3 = L[(e + 64) % 16, s * nsub + (e + 64) // 16]
                q4 = L[(e + 96) % 16, s * nsub + (e + 96) // 16]
                o[pos + 64 * h + l] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
                o[pos + 64 * h + l + 32] = np.uint8((q2 & 0xF) | ((q4 & 0xF) << 4))
                o[pos + 128 + 32 * h + l] = np.uint8(
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))


# ---------------------------------------------------------------- Q2_K / Q3_K

@jit
def _pack_2bit(o, pos, L, s, nsub):
    """qs[64] of Q2_K / Q3_K: bits 2k..2k+1 of byte 32h+l hold element 128h + 32k + l (low 2 bits of L)."""
    for h in range(2):
        for l in range(32):
            v = 0
            for t in range(4):
                e = 128 * h + 32 * t + l
                v |= (L[e % 16, s * nsub + e // 16] & 3) << (2 * t)
            o[pos + 32 * h + l] = np.uint8(v)


@jit
def _q2_k_chunk(xr, imat, weighted, o, s0, ns, X, W, L, P):
    """Q2_K (scales[16], qs[64], d, dmin; 84 B) of the chunk's super-blocks."""
    sub = 16
    nsub = 16
    scales, mins, dj, dmj = P[0], P[1], P[3], P[4]
    if weighted:
        Ls, dblk, Lm, mblk = _qkx_weighted(xr, imat, s0, ns, sub, X, W, L, P, 3, 15, False)
    else:
        for i in range(sub):
            for k in range(ns * nsub):
                W[i, k] = abs(X[i, k])
        make_qkx_quants(X, W, 3, F32(-0.5), F32(0.1), 15, True, L, scales, mins)
        max_scales = _superblock_max(scales, ns, nsub)
        max_mins = _superblock_max(mins, ns, nsub)
    for s in range(ns):
        pos = (s0 + s) * 84
        if weighted:
            for j in range(nsub):
                o[pos + j] = np.uint8((Ls[j, s] | (Lm[j, s] << 4)) & 0xFF)
            d = put_fp16(o, pos + 80, dblk[s])
            dmin = put_fp16(o, pos + 82, mblk[s])
        else:
            max_scale = max_scales[s]
            max_min = max_mins[s]
            if max_scale > ZERO:
                isc = F32(15) / max_scale
                for j in range(nsub):
                    o[pos + j] = np.uint8(nearest_int(isc * scales[s * nsub + j]) & 0xFF)
                d = put_fp16(o, pos + 80, max_scale / F32(15))
            else:
                for j in range(nsub):
                    o[pos + j] = 0
                d = put_fp16(o, pos + 80, ZERO)
            if max_min > ZERO:
                imn = F32(15) / max_min
                for j in range(nsub):
                    o[pos + j] |= np.uint8((nearest_int(imn * mins[s * nsub + j]) << 4) & 0xFF)
                dmin = put_fp16(o, pos + 82, max_min / F32(15))
            else:
                dmin = put_fp16(o, pos + 82, ZERO)
        for j in range(nsub):
            b = np.int32(o[pos + j])
            dj[s * nsub + j] = d * F32(b & 0xF)
            dmj[s * nsub + j] = dmin * F32(b >> 4)
    _requant(X, L, dj, dmj, 0, 3, 0)
    for s in range(ns):
        _pack_2bit(o, (s0 + s) * 84 + 16, L, s, nsub)


@jit
def _q3_k_chunk(xr, imat, weighted, o, s0, ns, X, W, L, P, Is):
    """Q3_K (hmask[32], qs[64], scales[12], d; 110 B) of the chunk's super-blocks."""
    nsub = 16
    scales, sw, dj = P[0], P[2], P[3]
    Lsb = Is[:QK_K]
    lsv = Is[QK_K: QK_K + nsub]
    D = np.empty(QK_K, F32)
    if weighted:
        _imat_weights(xr, imat, s0, ns, 16, X, W, sw, True)
        make_qx_quants(X, W, 4, L, scales)
        Ls = np.empty((nsub, ns), np.int32)
        dblk = np.empty(ns, F32)
        make_qx_quants(_lanes_by_superblock(scales, ns, nsub), _lanes_by_superblock(sw, ns, nsub), 32, Ls, dblk)
    else:
        make_q3_quants(X, 4, L, scales)
        max_scales, _ = _superblock_absmax(scales, ns, nsub)
    for s in range(ns):
        pos = (s0 + s) * 110
        for t in range(12):
            o[pos + 96 + t] = 0
        if weighted:
            for j in range(nsub):
                lsv[j] = Ls[j, s]
            dv = dblk[s]
            have = True
        else:
            max_scale = max_scales[s]
            have = max_scale != ZERO
            if have:
                isc = F32(-32) / max_scale
                for j in range(nsub):
                    l = nearest_int(isc * scales[s * nsub + j])
                    l = ((l + 128) & 255) - 128  # int8_t
                    lsv[j] = min(max(l, -32), 31) + 32
                dv = ONE / isc
            else:
                dv = ZERO
        if have:
            for j in range(nsub):
                l = lsv[j]
                if j < 8:
                    o[pos + 96 + j] = np.uint8(l & 0xF)
                else:
                    o[pos + 96 + j - 8] |= np.uint8((l & 0xF) << 4)
                o[pos + 96 + 8 + j % 4] |= np.uint8(((l >> 4) << (2 * (j // 4))) & 0xFF)
        d = put_fp16(o, pos + 108, dv)
        for j in range(nsub):
            if j < 8:
                sc = np.int32(o[pos + 96 + j]) & 0xF
            else:
                sc = np.int32(o[pos + 96 + j - 8]) >> 4
            sc = (sc | (((np.int32(o[pos + 104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
            dj[s * nsub + j] = d * F32(sc)
    for s in range(ns):
        sb = s0 + s
        _q3_k_requant_pack(xr[sb * QK_K: (sb + 1) * QK_K], L, s, dj, D, Lsb, o, sb * 110)


@jit
def _q3_k_requant_pack(xs, L, s, dj, D, Lsb, o, pos):
    """One super-block (xs: its 256 values; lane group s of L / dj): ggml's requantization
    l = clamp(nearest_int(x/d), -4, 3) + 4 in natural element order (sub-blocks with d == 0 keep make_q3_quants'
    L), then hmask[32] (bit t of byte m: element 32t + m > 3) and qs[64] (the low 2 bits, Q2_K layout). Every loop
    is branch-free over contiguous memory, so all of them vectorise."""
    for j in range(16):
        d = dj[s * 16 + j]
        if d == ZERO:  # rare: C skips the sub-block
            for i in range(16):
                Lsb[16 * j + i] = L[i, s * 16 + j]
        for i in range(16):
            D[16 * j + i] = d
    for e in range(QK_K):
        d = D[e]
        l = min(max(nearest_int(xs[e] / d), np.int32(-4)), np.int32(3))
        Lsb[e] = l + 4 if d != ZERO else Lsb[e]
    for m in range(32):
        h = 0
        for t in range(8):
            h |= ((Lsb[32 * t + m] >> 2) & 1) << t
        o[pos + m] = np.uint8(h)
    for hh in range(2):
        for l in range(32):
            v = 0
            for t in range(4):
                v |= (Lsb[128 * hh + 32 * t + l] & 3) << (2 * t)
            o[pos + 32 + 32 * hh + l] = np.uint8(v)


encode_q2_k = _encoder(2)
encode_q3_k = _encoder(3)
encode_q4_k = _encoder(4)
encode_q5_k = _encoder(5)
encode_q6_k = _encoder(6)
