"""Shared compiled helpers: ggml's float32 arithmetic, nearest_int, fp16 rounding and the make_*_quants searches.

Every search works on *lanes*: ``X[n, g]`` holds ``g`` independent groups (sub-blocks, blocks or super-blocks)
of ``n`` values, column ``k`` being one group. Each loop runs over the position ``i`` outside and the lane ``k``
inside, so the inner loops are element-wise over contiguous memory (the compiler vectorises them) while every
running sum of one group is still added in ggml's order, ``i = 0, 1, ...``. Arithmetic is float32 exactly where
ggml's C code is, one IEEE rounding per operation: no fast-math, no FMA contraction (numba passes no ``contract``
flag without fastmath), constants are float32, and integer quants are converted to float32 before they meet a
float32 (numba would widen float32 * int64 to float64).

Branches of ggml's per-group code (early exits, accepted trials) become per-lane selects; lanes that C would have
left early still run through the search, and their results are overwritten at the end, so they never leak into
the bytes.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

F32 = np.float32
MAGIC = F32(12582912.0)  # 1.5 * 2**23: nearest_int's constant
MANTISSA_MASK = np.int32(0x007FFFFF)  # nearest_int: the low bits of f + MAGIC ...
MANTISSA_BIAS = np.int32(0x00400000)  # ... less 2**22 are the rounded f
FP16_NORMAL_BITS = np.int32(0x38800000)  # the float32 bits from which fp16_bits rounds to a normal half ...
FP16_INF_BITS = np.int32(0x477FF000)  # ... up to these, where it rounds to inf
GROUP_MAX_EPS = F32(1e-15)
ZERO = F32(0.0)
ONE = F32(1.0)
TENTH = F32(0.1)
HALF_DOWN_BITS = np.int32(0x3EFFFFFF)  # largest float32 below 0.5: trunc(v + copysign(it, v)) == roundf(v)


def jit(fn=None, **options):
    """nb.njit, GIL-free, numpy error model (x/0 is inf, not an exception), cached on disk where numba can write a
    cache; compiled per process where it cannot (numba refuses to decorate then)."""
    if fn is None:
        return lambda f: jit(f, **options)
    options.setdefault("error_model", "numpy")
    try:
        return nb.njit(nogil=True, cache=True, **options)(fn)
    except RuntimeError:
        return nb.njit(nogil=True, **options)(fn)


@intrinsic
def f32_bits(typingctx, x):
    """The bits of a float32 as int32 (a register move)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, b):
    """The low 32 bits of an integer as a float32 bit pattern."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if b.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif b.bitwidth < 32:
            v = builder.sext(v, ir.IntType(32)) if b.signed else builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(b), codegen


def _load_i32x32(context, builder, aryty, ary, base):
    """<32 x i32>: the bits of the 32 float32 at ary[base:base+32] (one unaligned vector load)."""
    arr = context.make_array(aryty)(context, builder, ary)
    ptr = cgutils.get_item_pointer(context, builder, aryty, arr, [base])
    vty = ir.VectorType(ir.IntType(32), 32)
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=4)


def _reduce_i32x32(builder, op, v):
    fnty = ir.FunctionType(ir.IntType(32), [v.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.{op}.v32i32")
    return builder.call(fn, [v])


def _block32_args(xr, base):
    return (isinstance(xr, types.Array) and xr.ndim == 1 and xr.layout == "C" and xr.dtype == types.float32
            and isinstance(base, types.Integer))


@intrinsic
def absmax_keys32(typingctx, xr, base):
    """Integer reductions over the 32 float32 bit patterns b of xr[base:base+32] (C-contiguous 1-D float32):
    (max b, max |b| over the negative ones or 0). Exact integer maxima, so the vector reduction's order does not
    matter; the caller derives ggml's signed absmax from the pair."""
    if not _block32_args(xr, base):
        return None

    def codegen(context, builder, signature, args):
        v = _load_i32x32(context, builder, signature.args[0], args[0], args[1])
        zero = ir.Constant(v.type, None)
        neg = builder.icmp_signed("<", v, zero)
        t = builder.select(neg, builder.and_(v, ir.Constant(v.type, [0x7FFFFFFF] * 32)), zero)
        mp = _reduce_i32x32(builder, "smax", v)
        mn = _reduce_i32x32(builder, "smax", t)
        return context.make_tuple(builder, signature.return_type, [mp, mn])

    return types.UniTuple(types.int32, 2)(xr, base), codegen


@intrinsic
def abs_bits_max32(typingctx, xr, base):
    """max |b| (b & 0x7FFFFFFF, int32) over the 32 float32 bit patterns of xr[base:base+32] (C-contiguous 1-D
    float32): the bits of max |x| for finite values, above 0x7F800000 - 1 for an Inf or NaN. One vector reduction,
    for a type that needs only the unsigned maximum (Q8_0)."""
    if not _block32_args(xr, base):
        return None

    def codegen(context, builder, signature, args):
        v = _load_i32x32(context, builder, signature.args[0], args[0], args[1])
        return _reduce_i32x32(builder, "smax", builder.and_(v, ir.Constant(v.type, [0x7FFFFFFF] * 32)))

    return types.int32(xr, base), codegen


@intrinsic
def minmax_keys32(typingctx, xr, base):
    """(min k, max k) over k = b ^ ((b >> 31) & 0x7FFFFFFF), b the bits of xr[base:base+32]: keys that order like
    the finite float32 values (-0 just below +0)."""
    if not _block32_args(xr, base):
        return None

    def codegen(context, builder, signature, args):
        v = _load_i32x32(context, builder, signature.args[0], args[0], args[1])
        sh = builder.ashr(v, ir.Constant(v.type, [31] * 32))
        k = builder.xor(v, builder.and_(sh, ir.Constant(v.type, [0x7FFFFFFF] * 32)))
        lo = _reduce_i32x32(builder, "smin", k)
        hi = _reduce_i32x32(builder, "smax", k)
        return context.make_tuple(builder, signature.return_type, [lo, hi])

    return types.UniTuple(types.int32, 2)(xr, base), codegen


@jit
def nearest_int(f):
    """ggml's nearest_int: bits(f + 12582912.f) & 0x7fffff - 0x400000 (round half to even for |f| <= 4194303,
    and the same wrap-around as C outside that range). int32 (numba would widen the bit arithmetic to int64, and
    int64 lanes halve the vector width of every loop that uses it)."""
    return np.int32((f32_bits(f + MAGIC) & MANTISSA_MASK) - MANTISSA_BIAS)


@jit
def roundf_i(v):
    """C's roundf (half away from zero) of a finite float32 with |v| < 2**31, as int32."""
    h = bits_f32((f32_bits(v) & np.int32(-0x80000000)) | HALF_DOWN_BITS)
    return np.int32(np.trunc(v + h))


@jit
def fp16_bits(f):
    """float32 -> IEEE binary16 bits (int32 0..0xFFFF): round to nearest even, subnormals included; |x| >= 65520
    gives inf; NaN gives 0x7E00 | sign (ggml's GGML_FP32_TO_FP16)."""
    b = f32_bits(f)
    sign = (b >> 16) & np.int32(0x8000)
    x = b & np.int32(0x7FFFFFFF)
    if x > np.int32(0x7F800000):
        return sign | np.int32(0x7E00)
    if x >= FP16_INF_BITS:
        return sign | np.int32(0x7C00)
    if x >= FP16_NORMAL_BITS:  # normal half
        return sign | fp16_normal_bits(x)
    if x < np.int32(0x33000000):  # below 2**-25 (a tie with 0 at exactly 2**-25 goes to 0 as well)
        return sign
    e = x >> 23
    m = (x & np.int32(0x7FFFFF)) | np.int32(0x800000)
    shift = np.int32(126) - e  # 14..24
    h = m >> shift
    rem = m & ((np.int32(1) << shift) - np.int32(1))
    half = np.int32(1) << (shift - np.int32(1))
    if rem > half or (rem == half and (h & np.int32(1)) != 0):
        h += np.int32(1)
    return sign | h


# ---------------------------------------------------------------- search passes on tiles of lanes
#
# The searches below loop over the position i outside and the lane k inside, so every per-lane running sum is a
# load and a store per element. Their hot passes (make_qkx_quants' trials: 21 or 16 per group, two passes each,
# most of a Q4_K or Q5_K encode; make_qx_quants' 19 trials, most of Q6_K) are written here as LLVM IR over tiles
# of lanes instead: a tile's sums stay in registers across the n positions, and each position is a handful of
# vector operations. Each operation is the float32 (or int32) operation of the loop it replaces, in the same
# order per lane, so the bytes do not change.

_F32, _I32 = ir.FloatType(), ir.IntType(32)
_TILE = 32  # lanes per tile: four 256-bit vectors, whose independent sum chains keep the core busy


def _splat(value, width, ty):
    return ir.Constant(ir.VectorType(ty, width), [value] * width)


def _splat_value(builder, v, width):
    """A vector of `width` copies of the scalar v."""
    vty = ir.VectorType(v.type, width)
    one = builder.insert_element(ir.Constant(vty, None), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, None), ir.Constant(ir.VectorType(_I32, width), [0] * width))


class _Lanes:
    """Tiles of C-contiguous float32 lane arrays: 2-D [n, g] (position, lane) and 1-D [g] (per lane)."""

    def __init__(self, context, builder, tys, args):
        self.context, self.builder = context, builder
        self.arrays = [context.make_array(t)(context, builder, a) for t, a in zip(tys, args)]
        self.n, self.g = (builder.extract_value(self.arrays[0].shape, d) for d in (0, 1))

    def ptr(self, j, k0, width, row=None):
        """Pointer to the <width x float> at array j's [row, k0] (2-D) or [k0] (1-D)."""
        arr = self.arrays[j]
        idx = k0 if row is None else self.builder.add(self.builder.mul(row, self.g), k0)
        vty = ir.VectorType(_F32, width)
        return self.builder.bitcast(self.builder.gep(arr.data, [idx]), vty.as_pointer())

    def load(self, j, k0, width, row=None):
        return self.builder.load(self.ptr(j, k0, width, row), align=4)

    def store(self, v, j, k0, width, row=None):
        self.builder.store(v, self.ptr(j, k0, width, row), align=4)

    def positions(self, width, step, init):
        """Run step(i, accs) -> new accs for i = 0 .. n-1 with `len(init)` vector accumulators held in registers
        (allocas that LLVM promotes); returns their final values."""
        b = self.builder
        accs = [cgutils.alloca_once_value(b, v) for v in init]
        with cgutils.for_range(b, self.n) as loop:
            for acc, v in zip(accs, step(loop.index, [b.load(a) for a in accs])):
                b.store(v, acc)
        return [b.load(a) for a in accs]

    def tiles(self, emit):
        """emit(k0, width) over every lane: tiles of _TILE, then one each of 16, 8, 4, 2, 1 for the rest."""
        b = self.builder
        full = b.udiv(self.g, ir.Constant(self.g.type, _TILE))
        with cgutils.for_range(b, full) as loop:
            emit(b.mul(loop.index, ir.Constant(self.g.type, _TILE)), _TILE)
        k0 = cgutils.alloca_once_value(b, b.mul(full, ir.Constant(self.g.type, _TILE)))
        width = _TILE // 2
        while width >= 1:
            k = b.load(k0)
            with b.if_then(b.icmp_signed(">=", b.sub(self.g, k), ir.Constant(self.g.type, width))):
                emit(k, width)
                b.store(b.add(k, ir.Constant(self.g.type, width)), k0)
            width //= 2


def _lane_arrays(arrays, dims):
    return all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == types.float32 and a.ndim == d
               for a, d in zip(arrays, dims))


def _nearest_int_clamped(b, t, lo, hi, width):
    """min(max(nearest_int(t), lo), hi) on int32 lanes, as `nearest_int` computes it."""
    bits = b.bitcast(b.fadd(t, _splat(float(MAGIC), width, _F32)), ir.VectorType(_I32, width))
    q = b.sub(b.and_(bits, _splat(int(MANTISSA_MASK), width, _I32)), _splat(int(MANTISSA_BIAS), width, _I32))
    q = b.select(b.icmp_signed(">", q, lo), q, lo)
    return b.select(b.icmp_signed("<", q, hi), q, hi)


@intrinsic
def qkx_trial_sums(typingctx, X, W, Laux, isc, mn, nmax, sum_l, sum_l2, sum_xl):
    """One make_qkx_quants trial's first pass on every lane k of X [n, g]: l_i = clamp(nearest_int(isc * (x_i -
    mn)), 0, nmax) into Laux[i, k] (as float32), and the sums over i = 0 .. n-1, in order, of w*l, (w*l)*l and
    (w*l)*x into sum_l, sum_l2, sum_xl."""
    if not (_lane_arrays((X, W, Laux, isc, mn, sum_l, sum_l2, sum_xl), (2, 2, 2, 1, 1, 1, 1, 1))
            and nmax == types.int32):
        return None

    def codegen(context, builder, signature, args):
        b = builder
        lanes = _Lanes(context, b, signature.args[:5] + signature.args[6:], args[:5] + args[6:])

        def tile(k0, width):
            isc_v, mn_v = lanes.load(3, k0, width), lanes.load(4, k0, width)
            lo, hi = _splat(0, width, _I32), _splat_value(b, args[5], width)

            def step(i, sums):
                x, w = lanes.load(0, k0, width, i), lanes.load(1, k0, width, i)
                lf = b.sitofp(_nearest_int_clamped(b, b.fmul(isc_v, b.fsub(x, mn_v)), lo, hi, width),
                              ir.VectorType(_F32, width))
                lanes.store(lf, 2, k0, width, i)
                wl = b.fmul(w, lf)
                return [b.fadd(sums[0], wl), b.fadd(sums[1], b.fmul(wl, lf)), b.fadd(sums[2], b.fmul(wl, x))]

            for j, total in zip((5, 6, 7), lanes.positions(width, step, [_splat(0.0, width, _F32)] * 3)):
                lanes.store(total, j, k0, width)

        lanes.tiles(tile)
        return context.get_dummy_value()

    return types.void(X, W, Laux, isc, mn, nmax, sum_l, sum_l2, sum_xl), codegen


@intrinsic
def qkx_trial_errors(typingctx, X, W, Laux, t_scale, t_min, use_mad, cur):
    """One make_qkx_quants trial's second pass on every lane k of X [n, g]: cur[k] = the sum over i = 0 .. n-1, in
    order from 0, of w*(d*d) (w*|d| with use_mad), d = (t_scale * l_i + t_min) - x_i with l_i from Laux."""
    if not (_lane_arrays((X, W, Laux, t_scale, t_min, cur), (2, 2, 2, 1, 1, 1))
            and isinstance(use_mad, types.Boolean)):
        return None

    def codegen(context, builder, signature, args):
        b = builder
        lanes = _Lanes(context, b, signature.args[:5] + signature.args[6:], args[:5] + args[6:])
        mad = args[5]

        def tile(k0, width):
            vf = ir.VectorType(_F32, width)
            fabs = cgutils.get_or_insert_function(b.module, ir.FunctionType(vf, [vf]), f"llvm.fabs.v{width}f32")
            ts_v, tm_v = lanes.load(3, k0, width), lanes.load(4, k0, width)

            def step(i, acc):
                x, w, lf = (lanes.load(j, k0, width, i) for j in (0, 1, 2))
                d = b.fsub(b.fadd(b.fmul(ts_v, lf), tm_v), x)
                return [b.fadd(acc[0], b.fmul(w, b.select(mad, b.call(fabs, [d]), b.fmul(d, d))))]

            lanes.store(lanes.positions(width, step, [_splat(0.0, width, _F32)])[0], 5, k0, width)

        lanes.tiles(tile)
        return context.get_dummy_value()

    return types.void(X, W, Laux, t_scale, t_min, use_mad, cur), codegen


@intrinsic
def qx_trial_sums(typingctx, X, W, WX, isc, nmax, sumlx, suml2):
    """One make_qx_quants trial on every lane k of X [n, g]: l_i = clamp(nearest_int(isc * x_i), -nmax, nmax - 1)
    and the sums over i = 0 .. n-1, in order, of wx_i*l and (w_i*l)*l into sumlx, suml2."""
    if not _lane_arrays((X, W, WX, isc, sumlx, suml2), (2, 2, 2, 1, 1, 1)) or nmax != types.int32:
        return None

    def codegen(context, builder, signature, args):
        b = builder
        lanes = _Lanes(context, b, signature.args[:4] + signature.args[5:], args[:4] + args[5:])

        def tile(k0, width):
            isc_v = lanes.load(3, k0, width)
            hi = _splat_value(b, args[4], width)
            lo = b.sub(_splat(0, width, _I32), hi)
            hi = b.sub(hi, _splat(1, width, _I32))

            def step(i, sums):
                x, w, wx = (lanes.load(j, k0, width, i) for j in (0, 1, 2))
                lf = b.sitofp(_nearest_int_clamped(b, b.fmul(isc_v, x), lo, hi, width), ir.VectorType(_F32, width))
                return [b.fadd(sums[0], b.fmul(wx, lf)), b.fadd(sums[1], b.fmul(b.fmul(w, lf), lf))]

            for j, total in zip((4, 5), lanes.positions(width, step, [_splat(0.0, width, _F32)] * 2)):
                lanes.store(total, j, k0, width)

        lanes.tiles(tile)
        return context.get_dummy_value()

    return types.void(X, W, WX, isc, nmax, sumlx, suml2), codegen


@jit
def fp16_normal_bits(x):
    """`fp16_bits` of a positive float32 whose bits x (int32) are in [FP16_NORMAL_BITS, FP16_INF_BITS): that rounds to
    a normal half: the exponent rebased and the mantissa rounded to nearest even. Branch-free, so a loop over many
    scales vectorizes; the caller sends the other values (zero, subnormal, inf, NaN) to `fp16_bits`."""
    return (x - np.int32(0x38000000) + np.int32(0xFFF) + ((x >> 13) & np.int32(1))) >> 13


@jit
def fp16_value(h):
    """IEEE binary16 bits (int32) -> float32, exact."""
    sign = (h & np.int32(0x8000)) << 16
    e = (h >> 10) & np.int32(0x1F)
    m = h & np.int32(0x3FF)
    if e == 0:
        v = F32(m) * F32(5.9604644775390625e-08)  # m * 2**-24, exact
        return bits_f32(f32_bits(v) | sign)
    if e == 31:
        return bits_f32(sign | np.int32(0x7F800000) | (m << 13))
    return bits_f32(sign | ((e + np.int32(112)) << 23) | (m << 13))


@jit
def fp16_round(f):
    """float32 rounded through binary16 and back: what C reads back from GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f))."""
    return fp16_value(fp16_bits(f))


@jit
def put_fp16(out, pos, f):
    """Store fp16(f) little-endian at out[pos:pos+2]; return the rounded value as float32."""
    h = fp16_bits(f)
    out[pos] = np.uint8(h & 0xFF)
    out[pos + 1] = np.uint8((h >> 8) & 0xFF)
    return fp16_value(h)


@jit
def amax_signed(X, mx, amax):
    """Per lane: the signed value with the largest |x| (the first one on ties; +0 when all are 0) and its |x|."""
    n, g = X.shape
    for k in range(g):
        amax[k] = ZERO
        mx[k] = ZERO
    for i in range(n):
        for k in range(g):
            v = X[i, k]
            a = abs(v)
            take = a > amax[k]
            amax[k] = a if take else amax[k]
            mx[k] = v if take else mx[k]


@jit
def level_sums(slx, sl2, wx, w, fl):
    """(slx + wx*l, sl2 + (w*l)*l): ggml's sums sum w*x*l and sum w*l*l with one more element at level l = fl."""
    return slx + wx * fl, sl2 + (w * fl) * fl


@jit
def raises_ratio(slx2, sl22, sumlx, suml2):
    """ggml's cross-multiplied test that sums (slx2, sl22) give a larger sumlx^2 / suml2 than (sumlx, suml2)."""
    return (slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22


@jit
def lsq_scales(sumlx, suml2, amax, scale):
    """scale[k] = sumlx[k] / suml2[k] on every lane, 0 where the group's max |x| < GROUP_MAX_EPS or suml2 <= 0."""
    for k in range(sumlx.shape[0]):
        zero = amax[k] < GROUP_MAX_EPS
        scale[k] = ZERO if zero or not suml2[k] > ZERO else sumlx[k] / suml2[k]


@jit
def make_qx_quants(X, W, nmax, L, scale):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=W) on every lane of X [n, g].

    W [n, g]: the weights (x*x for qw = NULL). Writes L [n, g] (int32, 0..2*nmax-1; 0 for an all-zero group) and
    scale [g]."""
    n, g = X.shape
    mx = np.empty(g, F32)
    amax = np.empty(g, F32)
    amax_signed(X, mx, amax)
    WX = np.empty((n, g), F32)
    for i in range(n):
        for k in range(g):
            WX[i, k] = W[i, k] * X[i, k]
    isc = np.empty(g, F32)
    best_isc = np.empty(g, F32)
    best = np.empty(g, F32)
    fn = F32(nmax)
    lo = np.int32(-nmax)  # int32 lanes (see nearest_int)
    hi = np.int32(nmax - 1)
    sumlx = np.empty(g, F32)
    suml2 = np.empty(g, F32)
    for k in range(g):
        isc[k] = F32(-nmax) / mx[k]
    for step in range(-10, 10):
        if step == 0:
            continue
        if step > -10:
            c = fn + TENTH * F32(step)
            for k in range(g):
                isc[k] = (-c) / mx[k]
        qx_trial_sums(X, W, WX, isc, np.int32(nmax), sumlx, suml2)
        if step == -10:  # the first, unconditional pass
            for k in range(g):
                s = sumlx[k] / suml2[k] if suml2[k] != ZERO else ZERO
                scale[k] = s
                best[k] = s * sumlx[k]
                best_isc[k] = isc[k]
        else:
            for k in range(g):
                if suml2[k] > ZERO and sumlx[k] * sumlx[k] > best[k] * suml2[k]:
                    s = sumlx[k] / suml2[k]
                    scale[k] = s
                    best[k] = s * sumlx[k]
                    best_isc[k] = isc[k]
    for i in range(n):
        for k in range(g):
            l = nearest_int(best_isc[k] * X[i, k])
            L[i, k] = nmax + min(max(l, lo), hi)
    for k in range(g):
        if amax[k] < GROUP_MAX_EPS:
            scale[k] = ZERO
            for i in range(n):
                L[i, k] = 0


@jit
def make_q3_quants(X, nmax, L, scale):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on every lane of X [n, g]. L [n, g] int32 0..2*nmax-1.

    The weights w = x*x and w*x are recomputed where they are used (the same float32 products every time), so the
    descent's lane loop touches only X, L and the two sums: few enough arrays for LLVM's runtime alias checks, and
    it vectorises."""
    n, g = X.shape
    mx = np.empty(g, F32)
    amax = np.empty(g, F32)
    amax_signed(X, mx, amax)
    lo = np.int32(-nmax)  # int32 throughout: int64 lanes would halve the vector width
    hi = np.int32(nmax - 1)
    sumlx = np.zeros(g, F32)
    suml2 = np.zeros(g, F32)
    isc = np.empty(g, F32)
    for k in range(g):
        isc[k] = F32(-nmax) / mx[k]
    for i in range(n):
        for k in range(g):
            x = X[i, k]
            w = x * x
            l = min(max(nearest_int(isc[k] * x), lo), hi)
            L[i, k] = l
            sumlx[k], suml2[k] = level_sums(sumlx[k], suml2[k], w * x, w, F32(l))
    for itry in range(5):
        changed = np.int32(0)
        for i in range(n):
            for k in range(g):
                x = X[i, k]
                w = x * x
                wx = w * x
                li = L[i, k]
                fl = F32(li)
                slx = sumlx[k] - wx * fl
                sl2 = suml2[k] - (w * fl) * fl
                nl = min(max(nearest_int((x * sl2) / slx), lo), hi)
                slx2, sl22 = level_sums(slx, sl2, wx, w, F32(nl))
                acc = (slx > ZERO) & (nl != li) & (sl22 > ZERO) & raises_ratio(slx2, sl22, sumlx[k], suml2[k])
                L[i, k] = nl if acc else li  # branch-free: the lanes vectorise
                sumlx[k], suml2[k] = (slx2, sl22) if acc else (sumlx[k], suml2[k])
                changed = max(changed, np.int32(acc))  # int32 max: stays int32
        if changed == 0:  # a pass without a change leaves the state as it was: every later pass would be the same
            break
    lsq_scales(sumlx, suml2, amax, scale)
    for i in range(n):
        for k in range(g):
            L[i, k] = 0 if amax[k] < GROUP_MAX_EPS else L[i, k] + nmax


@jit
def make_qkx_quants(X, W, nmax, rmin, rdelta, nstep, use_mad, L, scale, the_min):
    """make_qkx2_quants / make_qkx3_quants(n, nmax, x, weights=W, ...) on every lane of X [n, g].

    (The two agree whenever weights are given: max == min and max <= min are the same test once min <= 0.)
    Writes L [n, g] (int32 0..nmax), scale [g] and the_min [g] (= -min)."""
    n, g = X.shape
    fn = F32(nmax)
    nm = np.int32(nmax)  # int32 lanes (see nearest_int)
    z0 = np.int32(0)
    mn = np.empty(g, F32)
    mx = np.empty(g, F32)
    sum_w = np.empty(g, F32)
    sum_x = np.empty(g, F32)
    for k in range(g):
        mn[k] = X[0, k]
        mx[k] = X[0, k]
        sum_w[k] = W[0, k]
        sum_x[k] = W[0, k] * X[0, k]
    for i in range(1, n):
        for k in range(g):
            x = X[i, k]
            w = W[i, k]
            mn[k] = x if x < mn[k] else mn[k]
            mx[k] = x if x > mx[k] else mx[k]
            sum_w[k] += w
            sum_x[k] += w * x
    valid = np.empty(g, np.bool_)
    mn0 = np.empty(g, F32)
    isc = np.empty(g, F32)
    best = np.zeros(g, F32)
    best_isc = np.empty(g, F32)
    best_mn = np.empty(g, F32)
    for k in range(g):
        m = mn[k] if mn[k] <= ZERO else ZERO  # if (min > 0) min = 0
        mn[k] = m
        mn0[k] = m
        valid[k] = mx[k] != m
        isc[k] = fn / (mx[k] - m)
        scale[k] = ONE / isc[k]
        best_isc[k] = isc[k]
        best_mn[k] = m
    for i in range(n):
        for k in range(g):
            x = X[i, k]
            l = F32(min(max(nearest_int(isc[k] * (x - mn[k])), z0), nm))
            diff = (scale[k] * l + mn[k]) - x
            diff = abs(diff) if use_mad else diff * diff
            best[k] += W[i, k] * diff
    Laux = np.empty((n, g), F32)
    sum_l = np.empty(g, F32)
    sum_l2 = np.empty(g, F32)
    sum_xl = np.empty(g, F32)
    t_scale = np.empty(g, F32)
    t_min = np.empty(g, F32)
    cur = np.empty(g, F32)
    for step in range(nstep + 1):
        c = (rmin + rdelta * F32(step)) + fn
        for k in range(g):
            isc[k] = c / (mx[k] - mn[k])
        qkx_trial_sums(X, W, Laux, isc, mn, nm, sum_l, sum_l2, sum_xl)
        for k in range(g):
            D = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k]
            ts = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / D
            tm = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / D
            if tm > ZERO:
                tm = ZERO
                ts = sum_xl[k] / sum_l2[k]
            t_scale[k] = ts
            t_min[k] = tm if D > ZERO else F32(np.nan)  # a NaN error never wins: the trial is skipped
        qkx_trial_errors(X, W, Laux, t_scale, t_min, use_mad, cur)
        for k in range(g):
            if cur[k] < best[k]:
                best[k] = cur[k]
                scale[k] = t_scale[k]
                best_isc[k] = isc[k]
                best_mn[k] = mn[k]
                mn[k] = t_min[k]
    for i in range(n):
        for k in range(g):
            l = min(max(nearest_int(best_isc[k] * (X[i, k] - best_mn[k])), z0), nm)
            L[i, k] = l if valid[k] else 0
    for k in range(g):
        if not valid[k]:
            scale[k] = ZERO
            mn[k] = mn0[k]
        the_min[k] = -mn[k]


@jit
def make_qp_quants(X, W, nmax, L, scale):
    """make_qp_quants(n, nmax, x, L, quant_weights=W) on every lane of X [n, g]. L [n, g] int32: the uint8 that C
    stores (a negative nearest_int wraps)."""
    n, g = X.shape
    fn = F32(nmax)
    nm = np.int32(nmax)  # int32 lanes (see nearest_int)
    mx = np.zeros(g, F32)
    for i in range(n):
        for k in range(g):
            x = X[i, k]
            mx[k] = mx[k] if mx[k] > x else x  # MAX(max, x)
    isc = np.empty(g, F32)
    sc = np.empty(g, F32)
    best = np.zeros(g, F32)
    mse = np.empty(g, F32)
    for k in range(g):
        isc[k] = fn / mx[k]
        sc[k] = ONE / isc[k]
    for i in range(n):
        for k in range(g):
            x = X[i, k]
            l = F32(nearest_int(isc[k] * x) & 0xFF)
            diff = x - sc[k] * l
            best[k] += (W[i, k] * diff) * diff
    isi = np.empty(g, F32)
    for step in range(-4, 5):
        if step == 0:
            continue
        c = TENTH * F32(step) + fn
        for k in range(g):
            isi[k] = c / mx[k]
            sc[k] = ONE / isi[k]
            mse[k] = ZERO
        for i in range(n):
            for k in range(g):
                x = X[i, k]
                l = F32(min(nm, nearest_int(isi[k] * x)))
                diff = x - sc[k] * l
                mse[k] += (W[i, k] * diff) * diff
        for k in range(g):
            if mse[k] < best[k]:
                best[k] = mse[k]
                isc[k] = isi[k]
    sumlx = np.zeros(g, F32)
    suml2 = np.zeros(g, F32)
    for i in range(n):
        for k in range(g):
            x = X[i, k]
            l = min(nm, nearest_int(isc[k] * x))
            L[i, k] = l & 0xFF  # stored as uint8; the sums use the int
            sumlx[k], suml2[k] = level_sums(sumlx[k], suml2[k], W[i, k] * x, W[i, k], F32(l))
    for itry in range(5):
        changed = np.int32(0)
        for i in range(n):
            for k in range(g):
                w = W[i, k]
                x = X[i, k]
                li = L[i, k]
                fl = F32(li)
                slx = sumlx[k] - (w * x) * fl
                sl2 = suml2[k] - (w * fl) * fl
                nl = min(nm, nearest_int((x * sl2) / slx))
                slx2, sl22 = level_sums(slx, sl2, w * x, w, F32(nl))
                acc = (slx > ZERO) & (sl2 > ZERO) & (nl != li) & raises_ratio(slx2, sl22, sumlx[k], suml2[k])
                L[i, k] = (nl & 0xFF) if acc else li
                sumlx[k], suml2[k] = (slx2, sl22) if acc else (sumlx[k], suml2[k])
                changed = max(changed, np.int32(acc))
        if changed == 0:
            break
    lsq_scales(sumlx, suml2, mx, scale)
    for k in range(g):
        if mx[k] < GROUP_MAX_EPS:
            for i in range(n):
                L[i, k] = 0
