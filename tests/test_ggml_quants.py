"""ideoquant.encode.ggml against a plain scalar Python port of ggml's C reference (Q8_0, Q4_K, Q5_K, Q6_K) on odd
inputs (subnormals, huge values, ties, constant blocks), and the convenience API (quantize / dequantize).

The byte-exactness against ggml's own output is in test_ggml_types.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType

from ideoquant.encode import ggml

F = np.float32



def assert_same_bytes(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == np.uint8 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{what}: {len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"














# --------------------------------------------------------------------------
# a plain scalar port of the C reference, for fuzzing odd inputs
# --------------------------------------------------------------------------


def ni(v) -> int:
    """ggml nearest_int, bit trick included."""
    t = np.array(F(v) + F(12582912.0), dtype=np.float32).view(np.int32)
    return (int(t) & 0x007FFFFF) - 0x00400000


def ref_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return F(0), -mn, [0] * n
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best = F(0)
    L = []
    for i in range(n):
        l = max(0, min(nmax, ni(iscale * (x[i] - mn))))
        L.append(l)
        diff = scale * F(l) + mn - x[i]
        best = best + w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
        sum_l = sum_l2 = sum_xl = F(0)
        Laux = []
        for i in range(n):
            l = max(0, min(nmax, ni(iscale * (x[i] - mn))))
            Laux.append(l)
            lf = F(l)
            sum_l = sum_l + w[i] * lf
            sum_l2 = sum_l2 + w[i] * lf * lf
            sum_xl = sum_xl + w[i] * lf * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                cur = cur + w[i] * (diff * diff)
            if cur < best:
                L, best, scale, mn = Laux, cur, this_scale, this_min
    return scale, -mn, L


def fp16_bytes(v) -> list[int]:
    return list(np.array([v], dtype=np.float32).astype("<f2").view(np.uint8))


def ref_qkx_block(x, nmax, rmin, rdelta, nstep):
    """quantize_row_q4_K_ref / q5_K_ref for one 256 block -> (head bytes, L[256])."""
    L = [0] * 256
    scales, mins = [], []
    max_scale = max_min = F(0)
    for j in range(8):
        xs = x[32 * j: 32 * j + 32]
        sum_x2 = F(0)
        for v in xs:
            sum_x2 = sum_x2 + v * v
        av_x = np.sqrt(sum_x2 / F(32))
        w = [av_x + abs(v) for v in xs]
        s, m, Lj = ref_make_qkx2(xs, w, nmax, rmin, rdelta, nstep)
        L[32 * j: 32 * j + 32] = Lj
        scales.append(s)
        mins.append(m)
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    ls = [min(63, ni(inv_scale * s) & 0xFF) for s in scales]
    lm = [min(63, ni(inv_min * m) & 0xFF) for m in mins]
    sc = [0] * 12
    for j in range(8):
        if j < 4:
            sc[j] = ls[j]
            sc[j + 4] = lm[j]
        else:
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sc[j - 4] |= (ls[j] >> 4) << 6
            sc[j] |= (lm[j] >> 4) << 6
    d16 = np.float16(max_scale / F(63))
    dmin16 = np.float16(max_min / F(63))
    for j in range(8):
        d = F(d16) * F(ls[j])
        if d == 0:
            continue
        dm = F(dmin16) * F(lm[j])
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, ni((x[32 * j + ii] + dm) / d)))
    head = fp16_bytes(max_scale / F(63)) + fp16_bytes(max_min / F(63)) + sc
    return head, L


def ref_q4_k(x):
    head, L = ref_qkx_block(x, 15, -1.0, 0.1, 20)
    qs = []
    for j in range(0, 256, 64):
        qs += [L[j + l] | (L[j + l + 32] << 4) for l in range(32)]
    return head + qs


def ref_q5_k(x):
    head, L = ref_qkx_block(x, 31, -0.5, 0.1, 15)
    qh = [0] * 32
    ql = []
    m1, m2 = 1, 2
    for n in range(0, 256, 64):
        for j in range(32):
            l1, l2 = L[n + j], L[n + j + 32]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            ql.append(l1 | (l2 << 4))
        m1 <<= 2
        m2 <<= 2
    return head + qh + ql


def ref_make_qx(x, nmax):
    n = len(x)
    mx = amax = F(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < F(1e-15):
        return F(0), [0] * n
    iscale = F(-nmax) / mx

    def sums(isc):
        slx = sl2 = F(0)
        Ls = []
        for v in x:
            l = max(-nmax, min(nmax - 1, ni(isc * v)))
            Ls.append(l + nmax)
            w = v * v
            slx = slx + w * v * F(l)
            sl2 = sl2 + w * F(l) * F(l)
        return slx, sl2, Ls

    sumlx, suml2, L = sums(iscale)
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / mx
        slx, sl2, Ls = sums(iscale)
        if sl2 > 0 and slx * slx > best * sl2:
            L = Ls
            scale = slx / sl2
            best = scale * slx
    return scale, L


def ref_q6_k(x):
    L = [0] * 256
    scales = []
    max_scale = max_abs = F(0)
    for ib in range(16):
        s, Lb = ref_make_qx(x[16 * ib: 16 * ib + 16], 32)
        L[16 * ib: 16 * ib + 16] = Lb
        scales.append(s)
        if abs(s) > max_abs:
            max_abs, max_scale = abs(s), s
    if max_abs < F(1e-15):
        return [0] * 210
    iscale = F(-128) / max_scale
    d16 = np.float16(F(1) / iscale)
    sc = [min(127, ni(iscale * s)) for s in scales]
    for j in range(16):
        d = F(d16) * F(sc[j])
        if d == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, ni(x[16 * j + ii] / d))) + 32
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        for l in range(32):
            a, b, c, e = (L[128 * h + l + 32 * k] for k in range(4))
            ql[64 * h + l] = (a & 0xF) | ((c & 0xF) << 4)
            ql[64 * h + l + 32] = (b & 0xF) | ((e & 0xF) << 4)
            qh[32 * h + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
    return ql + qh + [v & 0xFF for v in sc] + fp16_bytes(F(1) / iscale)


def ref_q8_0(x):
    out = []
    for b in range(0, len(x), 32):
        xs = x[b: b + 32]
        amax = F(0)
        for v in xs:
            amax = max(amax, abs(v))
        d = amax / F(127)
        idv = F(1) / d if d != 0 else F(0)
        out += fp16_bytes(d)
        for v in xs:
            r = float(v * idv)
            if not math.isfinite(r):  # 1/d overflowed (|x| < ~4e-37): C's float->int8 gives 0 on x86
                out.append(0)
                continue
            out.append(int(math.copysign(math.floor(abs(r) + 0.5), r)) & 0xFF)
    return out


REF_FN = {"Q8_0": ref_q8_0, "Q4_K": ref_q4_k, "Q5_K": ref_q5_k, "Q6_K": ref_q6_k}
FUZZ_TYPES = tuple(REF_FN)


def fuzz_blocks(seed: int, n: int) -> np.ndarray:
    """n blocks of 256 odd values, built sub-block by sub-block (32 wide)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 8, 32), np.float64)
    for b in range(n):
        for s in range(8):
            kind = rng.integers(0, 12)
            g = rng.standard_normal(32)
            if kind == 0:
                v = g * 10.0 ** rng.uniform(-12, 12)
            elif kind == 1:
                v = np.abs(g) * 0.02
            elif kind == 2:
                v = -np.abs(g) * 0.02
            elif kind == 3:
                v = np.full(32, rng.choice([0.0, 0.5, -0.03, 1e-3, 7.0, -2.0, 1e-7, -1e-7]))
            elif kind == 4:  # exact ties on a grid
                v = rng.integers(-254, 255, 32) / 2.0 * 2.0 ** -7
            elif kind == 5:  # sparse spikes
                v = np.where(rng.random(32) < 0.1, g * 3.0, 0.0)
            elif kind == 6:  # few distinct values
                v = rng.choice([-0.25, 0.0, 0.125, 0.5], 32)
            elif kind == 7:  # float32 subnormals
                v = g * 1e-40
            elif kind == 8:  # all equal but one
                v = np.full(32, 0.01)
                v[rng.integers(32)] = rng.choice([-1.0, 1.0, 0.0100001])
            elif kind == 9:  # offset with a narrow range
                v = 1.0 + g * 1e-5
            elif kind == 10:
                v = rng.standard_t(3, 32) * 0.02
            else:
                v = g * 1e18
            out[b, s] = v
    return out.reshape(n, 256).astype(np.float32)


@pytest.mark.parametrize("qtype", FUZZ_TYPES)
def test_fuzz_against_scalar_port(qtype):
    n = {"Q8_0": 48, "Q4_K": 24, "Q5_K": 24, "Q6_K": 24}[qtype]
    x = fuzz_blocks(1 + FUZZ_TYPES.index(qtype), n)
    with np.errstate(all="ignore"):
        got = ggml.quantize(x, qtype)
        want = np.array([REF_FN[qtype](list(row)) for row in x], dtype=np.uint8)
    assert_same_bytes(got, want, qtype + " fuzz")


# --------------------------------------------------------------------------
# other properties
# --------------------------------------------------------------------------


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)




@pytest.mark.parametrize(
    "qtype,tol", [("Q8_0", 0.005), ("Q4_K", 0.1), ("Q5_K", 0.06), ("Q6_K", 0.025)]
)
def test_round_trip_error_small(qtype, tol):
    x = gaussian(16, 4096, seed=3)
    x[1] *= 1e3
    x[2] = np.abs(x[2])
    q = ggml.quantize(x, qtype)
    bs, ts = ggml.type_size(qtype)
    assert q.shape == (16, 4096 // bs * ts)
    y = ggml.dequantize(q, qtype)
    assert y.shape == x.shape and y.dtype == np.float32
    rel = np.abs(y - x).max(axis=1) / np.abs(x).max(axis=1)
    assert rel.max() < tol, rel
    # the K-quants are at least as good as their bit width suggests on average
    rms = np.sqrt(((y - x) ** 2).mean()) / np.sqrt((x ** 2).mean())
    assert rms < {"Q8_0": 0.01, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype], rms


def test_q8_0_matches_gguf_py_random():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((33, 1024)) * 10.0 ** rng.uniform(-6, 4, (33, 1))).astype(np.float32)
    x[0] = np.round(x[0] * 4) / 4  # ties
    x[1] = 0.0
    want = gguf.quants.quantize(x, GGMLQuantizationType.Q8_0)
    assert_same_bytes(ggml.quantize(x, "q8_0"), want, "Q8_0 vs gguf-py")


def test_shapes_dtypes_and_type_arguments():
    x = gaussian(2, 3 * 512, seed=5).reshape(2, 1, 1536)
    ref = ggml.quantize(x.reshape(2, 1536), "Q4_K")
    got = ggml.quantize(x, GGMLQuantizationType.Q4_K)
    assert got.shape == (2, 1, 6 * 144)
    assert_same_bytes(got.reshape(ref.shape), ref, "3-D input")
    assert_same_bytes(ggml.quantize(x.reshape(2, 1536), int(GGMLQuantizationType.Q4_K)), ref, "int type")
    assert_same_bytes(ggml.quantize(x.reshape(2, 1536), " q4_k "), ref, "spaced name")
    h = x.reshape(2, 1536).astype(np.float16)
    assert_same_bytes(ggml.quantize(h, "Q6_K"), ggml.quantize(h.astype(np.float32), "Q6_K"), "float16")
    assert_same_bytes(ggml.quantize(x.reshape(2, 1536).tolist(), "Q8_0"), ggml.quantize(x.reshape(2, 1536), "Q8_0"), "list")
    # a non-contiguous view
    big = gaussian(4, 1024, seed=9)
    assert_same_bytes(ggml.quantize(big[::2, ::1], "Q5_K"), ggml.quantize(big[::2].copy(), "Q5_K"), "view")


def test_torch_bfloat16_input():
    torch = pytest.importorskip("torch")
    t = torch.randn(3, 512, dtype=torch.bfloat16) * 0.02
    want = ggml.quantize(t.float().numpy(), "Q4_K")
    assert_same_bytes(ggml.quantize(t, "Q4_K"), want, "bf16 tensor")




@pytest.mark.parametrize("bad", ["Q8_1", "F32", "q4", "", "Q4_K_M", GGMLQuantizationType.TQ1_0, 9999, None, 3.5])
def test_unknown_type_raises(bad):
    with pytest.raises(ValueError, match="unsupported ggml type"):
        ggml.quantize(np.zeros((1, 256), np.float32), bad)
    with pytest.raises(ValueError):
        ggml.type_size(bad)
    with pytest.raises(ValueError):
        ggml.can_quantize(bad, 256)
    with pytest.raises(ValueError):
        ggml.dequantize(np.zeros((1, 34), np.uint8), bad)


@pytest.mark.parametrize("qtype,cols", [("Q8_0", 48), ("Q8_0", 0), ("Q4_K", 4096 + 32), ("Q5_K", 128), ("Q6_K", 300)])
def test_bad_row_length_raises(qtype, cols):
    with pytest.raises(ValueError, match="block size"):
        ggml.quantize(np.zeros((2, cols), np.float32), qtype)






def test_unknown_integer_type_id():
    with pytest.raises(ValueError):
        ggml.normalize_qtype(9999)
    assert ggml.normalize_qtype(np.int64(GGMLQuantizationType.Q6_K)) == "Q6_K"






