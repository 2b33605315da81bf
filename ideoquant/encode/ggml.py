"""Bit-exact, vectorised numpy ports of ggml's reference quantizers.

Formats: ``Q8_0``, ``Q4_K``, ``Q5_K`` and ``Q6_K``.  The encoders reproduce,
byte for byte, what ggml's ``quantize_row_*_ref`` functions (the path taken by
``ggml_quantize_chunk`` / ``llama-quantize`` *without* an importance matrix)
produce on a build with strict IEEE float32 arithmetic and no FMA contraction.
Decoding is delegated to gguf-py (``gguf.quants.dequantize``).

How exactness is kept while vectorising:

* every value is computed in float32, never float64 (numpy float32 ufuncs
  round every single operation, exactly like the C code; ``a*b + c`` is two
  roundings, i.e. no FMA);
* every running sum of the C code is added up sequentially in index order.
  Sub-block data is laid out transposed, ``[positions, sub-blocks]``, and
  summed with ``np.einsum("ij,ij->j")`` / ``np.add.reduce(axis=0)``, which
  for a C-contiguous array add the rows one after another (checked against
  an explicit loop at import, with a row-loop fallback; see ``_self_check``);
* ``nearest_int`` (the ``x + 12582912.f`` bit trick) is round-half-to-even
  while ``|x| <= 4194303``; the fast path uses ``np.rint`` and every search
  step checks, per sub-block and from the extreme inputs only, that it is in
  that range; otherwise the bit trick itself is emulated on the int32 view;
* ``roundf`` (Q8_0) rounds half away from zero: ``trunc(v + copysign(0.5-ulp, v))``;
* fp32 -> fp16 is round-to-nearest-even including subnormals
  (``astype(np.float16)``);
* ggml's quirks are kept: the quants of Q8_0 use the float32 ``1/d`` (and
  are 0 where ``1/d`` overflows, as x86 C's float->int8 conversion gives); in the
  K-quants a sub-block whose final scale is 0 (e.g. fp16 underflow on tiny
  rows) keeps the quants found by the scale search; the 6-bit sub-scales are
  truncated to ``uint8`` before ``MIN(63, .)``; ``make_qkx2_quants`` feeds
  the best ``min`` found so far into the following search steps.

Public API::

    quantize(x, qtype, threads=None) -> uint8 [..., bytes_per_row]
    dequantize(q, qtype)             -> float32 [..., cols]
    type_size(qtype)                 -> (block_size, bytes_per_block)
    can_quantize(qtype, row_length)  -> bool
    QTYPES                           -> ("Q8_0", "Q4_K", "Q5_K", "Q6_K")
    Q8_0 / Q4_K / Q5_K / Q6_K        .quantize_blocks(blocks) / .dequantize_blocks(q)

Inputs are expected to be finite.  NaN/Inf give deterministic but unspecified
bytes (ggml itself has undefined behaviour there).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = [
    "QTYPES",
    "Q8_0",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "quantize",
    "dequantize",
    "type_size",
    "can_quantize",
    "normalize_qtype",
]

QTYPES: tuple[str, ...] = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")

_f32 = np.float32
_MAGIC = _f32(12582912.0)  # 1.5 * 2**23, ggml's nearest_int constant
_NI_MAX = _f32(4194303.0)  # ggml asserts |x| <= this in nearest_int
_GROUP_MAX_EPS = _f32(1e-15)
# largest float32 below 0.5: trunc(v + copysign(_HALF_DOWN, v)) == roundf(v)
_HALF_DOWN = np.nextafter(_f32(0.5), _f32(0.0))
_HALF_DOWN_BITS = np.array(_HALF_DOWN).view(np.uint32)[()]  # 0x3EFFFFFF


# --------------------------------------------------------------------------
# type handling
# --------------------------------------------------------------------------

def normalize_qtype(qtype: Any) -> str:
    """Return the canonical name ("Q8_0", "Q4_K", ...) of a supported type.

    Accepts a case-insensitive string or a ``gguf.GGMLQuantizationType``
    (or its integer id).  Raises ``ValueError`` for anything else.
    """
    name: str | None = None
    if isinstance(qtype, GGMLQuantizationType):
        name = qtype.name
    elif isinstance(qtype, (int, np.integer)) and not isinstance(qtype, bool):
        try:
            name = GGMLQuantizationType(int(qtype)).name
        except ValueError:
            name = None
    elif isinstance(qtype, str):
        name = qtype.strip().upper()
    if name is None or name not in QTYPES:
        raise ValueError(
            f"unsupported ggml quantization type {qtype!r}; supported: {', '.join(QTYPES)}"
        )
    return name


def type_size(qtype: Any) -> tuple[int, int]:
    """``(block_size, bytes_per_block)`` of a supported type (from gguf-py)."""
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[normalize_qtype(qtype)]]
    return int(bs), int(ts)


def can_quantize(qtype: Any, row_length: int) -> bool:
    """True if rows of ``row_length`` elements can be stored as ``qtype``.

    Raises ``ValueError`` for an unsupported type.
    """
    bs, _ = type_size(qtype)
    row_length = int(row_length)
    return row_length > 0 and row_length % bs == 0


# --------------------------------------------------------------------------
# exact scalar helpers, vectorised
# --------------------------------------------------------------------------

def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` bit for bit (also outside its asserted range).

    ``v`` float32 -> int32: ``(bits(v + 12582912.f) & 0x7fffff) - 0x400000``.
    """
    t = np.add(v, _MAGIC, dtype=np.float32)
    i = t.view(np.int32)
    np.bitwise_and(i, 0x007FFFFF, out=i)
    np.subtract(i, 0x00400000, out=i)
    return i


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [n] -> uint8 [n, 2], round-to-nearest-even fp16, little endian."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


_tls = threading.local()


def _scratch(key: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A per-thread scratch array, reused from chunk to chunk.

    Allocating the ~1 MB chunk temporaries afresh for every chunk costs a lot
    of page faults (glibc returns freed heap tops to the OS and faults them
    back in), which for Q8_0 was as expensive as the arithmetic.
    """
    cache = getattr(_tls, "bufs", None)
    if cache is None:
        cache = _tls.bufs = {}
    size = int(np.prod(shape))
    buf = cache.get((key, np.dtype(dtype).char))
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1), dtype)
        cache[(key, np.dtype(dtype).char)] = buf
    return buf[:size].reshape(shape)


class _Workspace:
    """Scratch arrays for one chunk; reused across the search steps."""

    __slots__ = ("a", "b", "c")

    def __init__(self, shape: tuple[int, int], reuse: bool = True):
        if reuse:
            self.a = _scratch("ws.a", shape)
            self.b = _scratch("ws.b", shape)
            self.c = _scratch("ws.c", shape)
        else:
            self.a = np.empty(shape, np.float32)
            self.b = np.empty(shape, np.float32)
            self.c = np.empty(shape, np.float32)


# --------------------------------------------------------------------------
# sequential sums over the position axis
# --------------------------------------------------------------------------
#
# The C code accumulates ``s += a[i]*b[i]`` for i = 0, 1, ... in float32.
# With sub-blocks laid out as C-contiguous [P, n] arrays (column = sub-block):
#
# * ``np.add.reduce(a, axis=0)`` adds row after row into the output, i.e.
#   the same order;
# * ``np.einsum("ij,ij->j", a, b)`` walks i in the outer loop and does
#   ``out[j] += a[i, j]*b[i, j]``: the same again, without a temporary, about
#   twice as fast as multiply + reduce.
#
# Both hold only while the column axis is a real, strided loop: for a single
# column numpy switches to a contiguous (pairwise / unrolled) reduction, so
# narrow arrays take an explicit row loop.  A numpy build whose einsum kernels
# contract to FMA (a baseline with FMA, NEON) would also break exactness, so
# both are checked once at import against the explicit loop; whatever fails
# the check is not used.

_MIN_VEC_COLS = 8


def _loop_dot(a, b, c=None):
    r = a[0] * b[0]
    if c is not None:
        r *= c[0]
    for i in range(1, a.shape[0]):
        t = a[i] * b[i]
        if c is not None:
            t *= c[i]
        r += t
    return r


def _self_check() -> tuple[bool, bool]:
    rng = np.random.default_rng(12345)
    reduce_ok = einsum_ok = True
    with np.errstate(all="ignore"):
        for n in (_MIN_VEC_COLS, _MIN_VEC_COLS + 1, 24, 1000):
            a = (rng.standard_normal((32, n)) * rng.uniform(1e-3, 1e3, (32, n))).astype(np.float32)
            b = rng.integers(0, 32, (32, n)).astype(np.float32)
            c = rng.standard_normal((32, n)).astype(np.float32)
            r1 = a[0].copy()
            for i in range(1, 32):
                r1 += a[i]
            s = np.add.reduce(a, axis=0)
            reduce_ok = reduce_ok and s.dtype == np.float32 and np.array_equal(r1, s)
            e2 = np.einsum("ij,ij->j", a, b, optimize=False)
            e3 = np.einsum("ij,ij,ij->j", a, b, c, optimize=False)
            einsum_ok = (
                einsum_ok
                and e2.dtype == np.float32
                and np.array_equal(_loop_dot(a, b), e2)
                and np.array_equal(_loop_dot(a, b, c), e3)
            )
    return bool(reduce_ok), bool(einsum_ok)


_REDUCE_OK, _EINSUM_OK = _self_check()


def _ssum(a):
    """sum_i a[i] per column, sequential in i; float32 [P, n] -> [n]."""
    if _REDUCE_OK and a.shape[1] >= _MIN_VEC_COLS:
        return np.add.reduce(a, axis=0)
    r = a[0].copy()
    for i in range(1, a.shape[0]):
        r += a[i]
    return r


def _sdot(a, b, tmp):
    """sum_i a[i]*b[i] per column, sequential in i; ``tmp``: scratch like ``a``."""
    if a.shape[1] >= _MIN_VEC_COLS:
        if _EINSUM_OK:
            return np.einsum("ij,ij->j", a, b, optimize=False)
        if _REDUCE_OK:
            np.multiply(a, b, out=tmp)
            return np.add.reduce(tmp, axis=0)
    return _loop_dot(a, b)


def _sdot3(a, b, c, tmp):
    """sum_i (a[i]*b[i])*c[i] per column, sequential in i."""
    if a.shape[1] >= _MIN_VEC_COLS:
        if _EINSUM_OK:
            return np.einsum("ij,ij,ij->j", a, b, c, optimize=False)
        if _REDUCE_OK:
            np.multiply(a, b, out=tmp)
            np.multiply(tmp, c, out=tmp)
            return np.add.reduce(tmp, axis=0)
    return _loop_dot(a, b, c)


# --------------------------------------------------------------------------
# make_qkx2_quants (Q4_K, Q5_K), vectorised over sub-blocks
# --------------------------------------------------------------------------

def _make_qkx2_quants(X, W, nmax, rmin, rdelta, nstep, ws, track=False):
    """Vectorised ``make_qkx2_quants(n=P, nmax, x, w, ..., use_mad=false)``.

    ``X``, ``W``: float32 ``[P, n]`` (position-major: column ``k`` is one
    sub-block), ``ws``: a ``_Workspace`` of the same shape.  Returns
    ``(scale, the_min)``, each ``[n]`` float32.  With ``track=True`` it also
    returns ``(best_isc, best_mn)``: the quants the search settled on are
    ``clamp(nearest_int(best_isc*(x - best_mn)), 0, nmax)`` (0 where
    ``best_isc`` is 0).  Columns are independent of each other.
    """
    f = _f32
    nmax_f = f(nmax)
    # rint(v) <= nmax as long as v < nmax + 0.5 (the tie goes to even = nmax + 1)
    no_top_clip = f(nmax) + f(0.5) - f(1e-3)
    L, T, E = ws.a, ws.b, ws.c

    xlo = np.minimum.reduce(X, axis=0)
    xhi = np.maximum.reduce(X, axis=0)
    mn = np.minimum(xlo, f(0))  # if (min > 0) min = 0
    sum_w = _ssum(W)  # w0 + w1 + ... in order
    sum_x = _sdot(W, X, T)  # w0*x0 + w1*x1 + ... in order

    valid = xhi != mn  # max == min -> all-zero quants, scale 0
    all_valid = bool(valid.all())
    invalid = ~valid
    rng = xhi - mn
    if not all_valid:
        rng[invalid] = f(1)
    dlo = xlo - mn  # isc*dlo is the extreme of isc*(x - min) opposite to ~c

    def quant(isc, c):
        """L = clamp(nearest_int(isc*(X - mn)), 0, nmax)."""
        np.subtract(X, mn, out=T)
        np.multiply(T, isc, out=T)
        vlo = dlo * isc
        lo = vlo.min()
        hi = vlo.max()
        if lo >= -_NI_MAX and hi <= _NI_MAX:  # False for NaN, too
            if c < no_top_clip and hi < no_top_clip and lo >= f(-0.5):
                np.rint(T, out=L)  # already inside [0, nmax] (maybe -0.0)
            else:
                np.rint(T, out=T)
                np.clip(T, 0, nmax_f, out=L)
        else:  # rare: out of nearest_int's range, emulate the bit trick exactly
            li = _nearest_int(T)
            np.clip(li, 0, nmax, out=li)
            L[...] = li

    isc = nmax_f / rng
    scale = f(1) / isc
    quant(isc, nmax_f)
    np.multiply(L, scale, out=E)
    np.add(E, mn, out=E)
    np.subtract(E, X, out=E)
    best = _sdot3(E, E, W, T)  # sum w*(diff*diff)
    if track:
        best_isc = isc
        best_mn = mn.copy()

    for step in range(nstep + 1):
        c = f(rmin) + f(rdelta) * f(step) + nmax_f  # (rmin + rdelta*is) + nmax
        isc = c / rng
        quant(isc, c)
        sum_l = _sdot(W, L, T)
        sum_l2 = _sdot3(W, L, L, T)
        sum_xl = _sdot3(W, L, X, T)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        if pos.any():
            this_min[pos] = f(0)
            this_scale[pos] = sum_xl[pos] / sum_l2[pos]
        np.multiply(L, this_scale, out=E)
        np.add(E, this_min, out=E)
        np.subtract(E, X, out=E)
        cur = _sdot3(E, E, W, T)
        imp = cur < best
        imp &= D > 0
        if not all_valid:
            imp &= valid
        k = np.flatnonzero(imp)
        if k.size:
            best[k] = cur[k]
            scale[k] = this_scale[k]
            if track:
                best_isc[k] = isc[k]
                best_mn[k] = mn[k]
            mk = this_min[k]
            mn[k] = mk
            rng[k] = xhi[k] - mk
            dlo[k] = xlo[k] - mk
    if not all_valid:
        scale[invalid] = f(0)
        if track:
            best_isc[invalid] = f(0)
    if track:
        return scale, -mn, best_isc, best_mn
    return scale, -mn


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales/mins [nb, 8] uint8 -> the 12-byte ``scales`` field."""
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _to_subblocks(blocks: np.ndarray, sub: int) -> np.ndarray:
    """[nb, 256] -> position-major [sub, nb*256/sub] (C-contiguous copy)."""
    return np.ascontiguousarray(blocks.reshape(-1, sub).T)


def _from_subblocks(Lq: np.ndarray, nb: int) -> np.ndarray:
    """position-major [sub, n] uint8 -> [nb, 256]."""
    return np.ascontiguousarray(Lq.T).reshape(nb, 256)


# --------------------------------------------------------------------------
# format classes
# --------------------------------------------------------------------------

class _Quant:
    qtype: GGMLQuantizationType
    block_size: int
    type_size: int
    # blocks per work item: keeps the working set in L2 / small L3 share
    chunk_blocks: int = 256

    def __init_subclass__(cls, qtype: GGMLQuantizationType, **kw):
        super().__init_subclass__(**kw)
        cls.qtype = qtype
        cls.block_size, cls.type_size = (int(v) for v in GGML_QUANT_SIZES[qtype])

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
        """Quantize float32 ``[n, block_size]`` into ``out`` (uint8 ``[n, type_size]``)."""
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, threads: int | None = 1) -> np.ndarray:
        """float32 ``[n, block_size]`` -> uint8 ``[n, bytes_per_block]``."""
        blocks = np.ascontiguousarray(blocks, dtype=np.float32)
        if blocks.ndim != 2 or blocks.shape[1] != cls.block_size:
            raise ValueError(
                f"{cls.qtype.name}.quantize_blocks expects shape (n, {cls.block_size}), "
                f"got {blocks.shape}"
            )
        out = np.empty((blocks.shape[0], cls.type_size), np.uint8)
        _run_chunks(cls, blocks, out, threads)
        return out

    @classmethod
    def dequantize_blocks(cls, q: np.ndarray) -> np.ndarray:
        """uint8 ``[n, bytes_per_block]`` -> float32 ``[n, block_size]`` (gguf-py)."""
        q = np.ascontiguousarray(q, dtype=np.uint8).reshape(-1, cls.type_size)
        return gguf.quants.dequantize(q, cls.qtype).reshape(-1, cls.block_size)


class Q8_0(_Quant, qtype=GGMLQuantizationType.Q8_0):
    """``block_q8_0``: fp16 d, int8 qs[32]; ``quantize_row_q8_0_ref``."""

    chunk_blocks = 8192

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray, out: np.ndarray) -> None:
        with np.errstate(all="ignore"):
            cls._quantize_chunk_impl(blocks, out)

    @classmethod
    def _quantize_chunk_impl(cls, blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        b1 = _scratch("q8.1", (n * 32,))
        b2 = _scratch("q8.2", (n * 32,))
        b3 = _scratch("q8.3", (n * 8,))
        a = np.abs(blocks.reshape(-1), out=b1)
        # amax of each run of 32: pairwise maxima over the flat array (long
        # strided loops are much faster than n short reductions; max is exact
        # in any order), ping-ponging between two scratch buffers
        m = np.maximum(a[0::2], a[1::2], out=b2[: n * 16])
        m = np.maximum(m[0::2], m[1::2], out=b3[: n * 8])
        m = np.maximum(m[0::2], m[1::2], out=b2[: n * 4])
        m = np.maximum(m[0::2], m[1::2], out=b3[: n * 2])
        d = np.maximum(m[0::2], m[1::2]) / _f32(127)
        idv = np.zeros_like(d)
        np.divide(_f32(1), d, out=idv, where=d != 0)
        v = np.multiply(blocks, idv[:, None], out=b1.reshape(n, 32))
        # roundf (half away from zero) = trunc(v + copysign(0.5 - ulp, v)); the
        # copysign is done on the bits (numpy's copysign is slow), and the
        # float -> int8 cast truncates toward zero
        h = b2.reshape(n, 32).view(np.uint32)
        np.bitwise_and(v.view(np.uint32), np.uint32(0x80000000), out=h)
        np.bitwise_or(h, _HALF_DOWN_BITS, out=h)
        v += h.view(np.float32)
        out.view("<f2")[:, 0] = d  # round-to-nearest-even fp16, in place
        np.copyto(out[:, 2:].view(np.int8), v, casting="unsafe")
        huge = np.isinf(idv)  # d is subnormal and 1/d overflowed: x*id is +-inf or NaN
        if huge.any():  # ggml's float->int8 conversion of those yields 0 on x86
            out[huge, 2:] = 0


class _QKx2(_Quant, qtype=GGMLQuantizationType.Q4_K):  # shared by Q4_K/Q5_K
    chunk_blocks = 1024
    nmax: int
    rmin: float
    rdelta: float
    nstep: int

    @classmethod
    def _scales_and_quants(cls, blocks: np.ndarray):
        f = _f32
        nb = blocks.shape[0]
        X = _to_subblocks(blocks, 32)  # [32, nb*8]
        n = X.shape[1]
        ws = _Workspace(X.shape)
        sum_x2 = _sdot(X, X, ws.b)  # sequential over the 32 positions
        av_x = np.sqrt(sum_x2 / f(32))
        W = np.abs(X)
        np.add(W, av_x, out=W)  # weights = av_x + |x|
        scale, the_min = _make_qkx2_quants(X, W, cls.nmax, cls.rmin, cls.rdelta, cls.nstep, ws)
        S = scale.reshape(nb, 8)
        M = the_min.reshape(nb, 8)
        # C: ``max = 0; if (v > max) max = v`` -> +0.0 unless something is > 0
        max_scale = np.fmax.reduce(S, axis=1)
        max_scale = np.where(max_scale > 0, max_scale, f(0))
        max_min = np.fmax.reduce(M, axis=1)
        max_min = np.where(max_min > 0, max_min, f(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, f(63) / max_scale, f(0))
            inv_min = np.where(max_min > 0, f(63) / max_min, f(0))
        ls = np.minimum(_nearest_int(inv_scale[:, None] * S) & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(_nearest_int(inv_min[:, None] * M) & 0xFF, 63).astype(np.uint8)
        d16 = (max_scale / f(63)).astype(np.float16)
        dmin16 = (max_min / f(63)).astype(np.float16)
        dj = (d16.astype(f)[:, None] * ls.astype(f)).reshape(n)
        dmj = (dmin16.astype(f)[:, None] * lm.astype(f)).reshape(n)
        # re-quantize with the fp16-rounded d / dmin
        V = ws.a
        np.add(X, dmj, out=V)
        np.divide(V, dj, out=V)
        Li = _nearest_int(V)
        np.clip(Li, 0, cls.nmax, out=Li)
        zero = dj == 0
        if zero.any():  # keep the quants of the scale search: redo it for those
            k = np.flatnonzero(zero)
            Xk = np.ascontiguousarray(X[:, k])
            Wk = np.ascontiguousarray(W[:, k])
            _, _, best_isc, best_mn = _make_qkx2_quants(
                Xk, Wk, cls.nmax, cls.rmin, cls.rdelta, cls.nstep, _Workspace(Xk.shape, reuse=False),
                track=True,
            )
            Vk = np.multiply(Xk - best_mn, best_isc)
            Lk = _nearest_int(Vk)
            np.clip(Lk, 0, cls.nmax, out=Lk)
            Li[:, k] = Lk
        L = _from_subblocks(Li.astype(np.uint8), nb)
        head = np.empty((nb, 16), np.uint8)
        head[:, 0:2] = _fp16_bytes(d16.astype(f))
        head[:, 2:4] = _fp16_bytes(dmin16.astype(f))
        head[:, 4:16] = _pack_scale_min_k4(ls, lm)
        return head, L


class Q4_K(_QKx2, qtype=GGMLQuantizationType.Q4_K):
    """``block_q4_K``: d, dmin, scales[12], qs[128]; ``quantize_row_q4_K_ref``."""

    nmax, rmin, rdelta, nstep = 15, -1.0, 0.1, 20

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray, out: np.ndarray) -> None:
        with np.errstate(all="ignore"):
            head, L = cls._scales_and_quants(blocks)
        nb = blocks.shape[0]
        L = L.reshape(nb, 4, 2, 32)
        out[:, :16] = head
        out[:, 16:].reshape(nb, 4, 32)[...] = L[:, :, 0, :] | (L[:, :, 1, :] << 4)


class Q5_K(_QKx2, qtype=GGMLQuantizationType.Q5_K):
    """``block_q5_K``: d, dmin, scales[12], qh[32], qs[128]; ``quantize_row_q5_K_ref``."""

    nmax, rmin, rdelta, nstep = 31, -0.5, 0.1, 15

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray, out: np.ndarray) -> None:
        with np.errstate(all="ignore"):
            head, L = cls._scales_and_quants(blocks)
        nb = blocks.shape[0]
        L = L.reshape(nb, 8, 32)
        hi = L >> 4
        qh = np.zeros((nb, 32), np.uint8)
        for s in range(8):
            qh |= hi[:, s, :] << s
        lo = (L & 0xF).reshape(nb, 4, 2, 32)
        out[:, :16] = head
        out[:, 16:48] = qh
        out[:, 48:].reshape(nb, 4, 32)[...] = lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)


class Q6_K(_Quant, qtype=GGMLQuantizationType.Q6_K):
    """``block_q6_K``: ql[128], qh[64], int8 scales[16], d; ``quantize_row_q6_K_ref``."""

    chunk_blocks = 1024

    @classmethod
    def _make_qx_quants(cls, X: np.ndarray):
        """Vectorised ``make_qx_quants(16, 32, x, L, rmse_type=1, NULL)``.

        X float32 [16, n].  Returns (scale [n], best_isc [n], zero [n]).
        """
        f = _f32
        n = X.shape[1]
        cols = np.arange(n)
        A = np.abs(X)
        idx = np.argmax(A, axis=0)  # first index of the largest |x|
        amax = A[idx, cols]
        mx = X[idx, cols]
        zero = amax < _GROUP_MAX_EPS
        if zero.any():
            mx = np.where(zero, f(1), mx)
        W = np.multiply(X, X)
        WX = np.multiply(W, X)
        V = A  # reuse
        T = np.empty_like(X)

        def sums(isc):
            np.multiply(X, isc, out=V)
            np.rint(V, out=V)  # |isc*x| <= ~33: nearest_int == rint here
            np.clip(V, -32, 31, out=V)
            sumlx = _sdot(WX, V, T)  # sum (w*x)*l
            suml2 = _sdot3(W, V, V, T)  # sum (w*l)*l
            return sumlx, suml2

        isc = f(-32) / mx
        sumlx, suml2 = sums(isc)
        scale = np.where(suml2 != 0, sumlx / suml2, f(0))
        best = scale * sumlx
        best_isc = isc
        for step in range(-9, 10):
            if step == 0:
                continue
            c = f(32) + f(0.1) * f(step)
            isc = (-c) / mx
            sumlx, suml2 = sums(isc)
            imp = sumlx * sumlx > best * suml2
            imp &= suml2 > 0
            k = np.flatnonzero(imp)
            if k.size:
                s_new = sumlx[k] / suml2[k]
                scale[k] = s_new
                best[k] = s_new * sumlx[k]
                best_isc[k] = isc[k]
        if zero.any():
            scale[zero] = f(0)
        return scale, best_isc, zero

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray, out: np.ndarray) -> None:
        f = _f32
        nb = blocks.shape[0]
        with np.errstate(all="ignore"):
            X = _to_subblocks(blocks, 16)  # [16, nb*16]
            n = X.shape[1]
            scale, best_isc, zero = cls._make_qx_quants(X)
            S = scale.reshape(nb, 16)
            absS = np.abs(S)
            # C keeps the first strictly larger |scale|, so NaN never wins
            j = np.argmax(np.where(np.isnan(absS), f(-1), absS), axis=1)
            rows = np.arange(nb)
            max_abs = absS[rows, j]
            max_scale = S[rows, j]
            zblk = max_abs < _GROUP_MAX_EPS
            iscale = f(-128) / np.where(zblk, f(1), max_scale)
            d16 = (f(1) / iscale).astype(np.float16)
            sc = np.minimum(_nearest_int(iscale[:, None] * S), 127).astype(np.int8)
            dj = (d16.astype(f)[:, None] * sc.astype(f)).reshape(n)
            V = np.divide(X, dj)
            Li = _nearest_int(V)
            np.clip(Li, -32, 31, out=Li)
            Li += 32
            zd = dj == 0
            if zd.any():  # keep make_qx_quants' quants (0 for an all-zero sub-block)
                k = np.flatnonzero(zd)
                Lk = _nearest_int(X[:, k] * best_isc[k])
                np.clip(Lk, -32, 31, out=Lk)
                Lk += 32
                Lk[:, zero[k]] = 0
                Li[:, k] = Lk
        L = _from_subblocks(Li.astype(np.uint8), nb).reshape(nb, 2, 4, 32)
        lo = L & 0xF
        hi = L >> 4
        ql = out[:, 0:128].reshape(nb, 2, 2, 32)
        ql[:, :, 0, :] = lo[:, :, 0, :] | (lo[:, :, 2, :] << 4)
        ql[:, :, 1, :] = lo[:, :, 1, :] | (lo[:, :, 3, :] << 4)
        out[:, 128:192].reshape(nb, 2, 32)[...] = (
            hi[:, :, 0, :] | (hi[:, :, 1, :] << 2) | (hi[:, :, 2, :] << 4) | (hi[:, :, 3, :] << 6)
        )
        out[:, 192:208] = sc.view(np.uint8)
        out[:, 208:210] = _fp16_bytes(d16.astype(f))
        if zblk.any():
            out[zblk] = 0


_CLASSES: dict[str, type[_Quant]] = {"Q8_0": Q8_0, "Q4_K": Q4_K, "Q5_K": Q5_K, "Q6_K": Q6_K}


# --------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------

def _to_float32(x: Any) -> np.ndarray:
    mod = type(x).__module__
    if mod.startswith("torch") and hasattr(x, "detach"):  # torch tensor, any dtype
        import torch  # already imported by the caller

        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def quantize(x: Any, qtype: Any, threads: int | None = None) -> np.ndarray:
    """Quantize rows of ``x`` exactly like ggml's reference quantizer.

    ``x``: float array ``[..., cols]`` (float32/float16/bfloat16 torch
    tensors are accepted; everything is converted to float32 first).
    Returns uint8 ``[..., cols // block_size * bytes_per_block]``, the ggml
    blocks of each row laid end to end as in a GGUF tensor.

    ``threads``: worker threads (default ``os.cpu_count()``).  The blocks are
    split into independent chunks; the bytes do not depend on ``threads``.
    """
    name = normalize_qtype(qtype)
    cls = _CLASSES[name]
    arr = _to_float32(x)
    if arr.ndim < 1:
        raise ValueError("quantize expects an array with at least one dimension")
    cols = arr.shape[-1]
    bs, ts = cls.block_size, cls.type_size
    if cols == 0 or cols % bs != 0:
        raise ValueError(
            f"{name}: row length {cols} is not a positive multiple of the block size {bs}"
        )
    out_shape = (*arr.shape[:-1], cols // bs * ts)
    blocks = arr.reshape(-1, bs)
    out = np.empty((blocks.shape[0], ts), np.uint8)
    _run_chunks(cls, blocks, out, threads)
    return out.reshape(out_shape)


def _run_chunks(cls: type[_Quant], blocks: np.ndarray, out: np.ndarray, threads: int | None) -> None:
    """Quantize ``blocks`` into ``out`` chunk by chunk on ``threads`` workers."""
    n = blocks.shape[0]
    step = cls.chunk_blocks
    ranges = [(s, min(n, s + step)) for s in range(0, n, step)]
    if not ranges:
        return
    if threads is None:
        threads = os.cpu_count() or 1
    threads = max(1, min(int(threads), len(ranges)))

    def work(r: tuple[int, int]) -> None:
        s, e = r
        cls._quantize_chunk(blocks[s:e], out[s:e])

    if threads == 1:
        for r in ranges:
            work(r)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(work, ranges):
            pass


def dequantize(q: Any, qtype: Any) -> np.ndarray:
    """Decode ggml bytes ``[..., bytes_per_row]`` to float32 ``[..., cols]``.

    Delegates to ``gguf.quants.dequantize``.
    """
    name = normalize_qtype(qtype)
    q = np.ascontiguousarray(np.asarray(q, dtype=np.uint8))
    _, ts = type_size(name)
    if q.ndim < 1 or q.shape[-1] % ts != 0:
        raise ValueError(f"{name}: last dimension {q.shape[-1:]} is not a multiple of {ts} bytes")
    return np.asarray(gguf.quants.dequantize(q, GGMLQuantizationType[name]), dtype=np.float32)
