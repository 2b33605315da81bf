"""ideoquant.encode.ggml against ggml's own bytes: every type, with and without an importance matrix.

The vectors in tests/data/ggml (see its README.md) were written by ggml's ``ggml_quantize_chunk`` (0.15.3; the IQ
types, MXFP4 and NVFP4 by 0.19.0, commit 8e800ce, which reproduces the older files too).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from ideoquant.encode import ggml

DATA = Path(__file__).resolve().parent / "data" / "ggml"
FILES = sorted(p.name for p in DATA.glob("*.npz"))
QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FOUR_BIT = ("IQ4_NL", "IQ4_XS", "MXFP4", "NVFP4")
FP4 = ("MXFP4", "NVFP4")  # ggml ignores the weights; the reference set still has _imat_ files (equal bytes)
IQ = ("IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M")
REQUIRED = ("IQ2_XS", "IQ2_XXS", "IQ1_S")  # ggml_quantize_requires_imatrix: no file without one
NEEDS_IMATRIX = REQUIRED + ("IQ2_S", "IQ1_M")  # and the ones llama-quantize refuses to write without one
WEIGHTED = tuple(t for t in QUANTS if t != "Q8_0") + ("IQ4_NL", "IQ4_XS") + IQ
SIZES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
         "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
         "F16": (1, 2), "BF16": (1, 2), "IQ3_S": (256, 110), "IQ3_XXS": (256, 98), "IQ2_S": (256, 82),
         "IQ2_XS": (256, 74), "IQ2_XXS": (256, 66), "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ4_NL": (32, 18),
         "IQ4_XS": (256, 136), "MXFP4": (32, 17), "NVFP4": (64, 36)}
# README: max |error| / row absmax on the normal rows (NULL, ones, act), plus a little slack
ERR = {"Q2_K": (0.42, 0.40, 0.65), "Q3_K": (0.24, 0.23, 0.29), "Q4_0": (0.125, 0.12, 0.18),
       "Q4_1": (0.067, 0.081, 0.13), "Q5_0": (0.0625, 0.054, 0.079), "Q5_1": (0.033, 0.042, 0.065),
       "Q4_K": (0.085, 0.087, 0.14), "Q5_K": (0.049, 0.051, 0.068), "Q6_K": (0.023, 0.029, 0.079),
       "Q8_0": (0.004,), "BF16": (0.0035,), "F16": (0.0004,)}
NORMAL_ROWS = [r for r in range(64) if not 30 <= r <= 43]  # no zero, constant, tiny or huge rows


def file_qtype(name):
    """"q4_k_imat_act.npz" -> "Q4_K"."""
    return name.removesuffix(".npz").split("_imat")[0].upper()


def load(name):
    z = np.load(DATA / name)
    w = z["imatrix"] if "imatrix" in z.files else None
    return z["x"], z["q"], str(z["qtype"]), w


def same(got, want, what):
    assert got.dtype == np.uint8 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{what}: {len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}"


def test_reference_set_is_complete():
    """Every type has ggml's bytes without an imatrix (where ggml runs without one) and with both flavours (where it
    has a weighted path); every file is a type of ours."""
    want = {"f16_special.npz", "bf16_special.npz"}
    for t in ggml.QTYPES:
        if t not in REQUIRED:
            want.add(t.lower() + ".npz")
        if ggml.has_imatrix_path(t) or t in FP4:
            want |= {t.lower() + "_imat_ones.npz", t.lower() + "_imat_act.npz"}
    assert set(FILES) == want
    assert (DATA / "README.md").is_file()
    assert sum((DATA / f).stat().st_size for f in FILES) < 64 * 2**20  # about 0.85 MB a file (each holds its x)


@pytest.mark.parametrize("name", FILES)
def test_bytes_equal_ggml(name):
    x, q, qtype, w = load(name)
    same(ggml.encode(x, qtype, w), q, name)


@pytest.mark.parametrize("name", [f for f in FILES if "imat" not in f and "special" not in f])
def test_rows_are_independent_and_out_is_filled(name):
    x, q, qtype, _ = load(name)
    parts = [ggml.encode(np.ascontiguousarray(x[a:b]), qtype) for a, b in ((0, 1), (1, 17), (17, 40), (40, 64))]
    same(np.concatenate(parts), q, name + " row slices")
    out = np.full_like(q, 0xA5)
    assert ggml.encode(x, qtype, out=out) is out
    same(out, q, name + " out=")
    out[:] = 0x5A
    for a in range(0, 64, 24):  # slices of a preallocated output, as a caller's thread pool would fill it
        ggml.encode(np.ascontiguousarray(x[a:a + 24]), qtype, out=out[a:a + 24])
    same(out, q, name + " out= slices")


@pytest.mark.parametrize("qtype", WEIGHTED)
def test_weighted_rows_are_independent(qtype):
    x, q, _, w = load(qtype.lower() + "_imat_act.npz")
    got = np.concatenate([ggml.encode(np.ascontiguousarray(x[a:a + 16]), qtype, w) for a in range(0, 64, 16)])
    same(got, q, qtype + " act, row slices")


@pytest.mark.parametrize("flavour", ["", "_imat_act"])
@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_kquant_column_prefixes(qtype, flavour):
    """K-quant super-blocks are independent (a weighted one takes sigma2 from its own 256 values), so the first m
    super-blocks of a row are ggml's first m. 1, 3, 5 and 7 of them give chunks of 8-112 lanes: the searches' lane
    tiles of 32 and every narrower tail (a whole 4096-wide row is 128 or 256 lanes, whole tiles only)."""
    x, q, _, w = load(qtype.lower() + flavour + ".npz")
    bpb = SIZES[qtype][1]
    for m in (1, 3, 5, 7):
        cols = m * 256
        got = ggml.encode(np.ascontiguousarray(x[:, :cols]), qtype, None if w is None else w[:cols])
        same(got, q[:, :m * bpb], f"{qtype}{flavour} first {m} super-blocks")


def test_search_lanes_do_not_depend_on_their_tile():
    """make_qkx_quants and make_qx_quants give each lane (group) the same result whatever tile of lanes it runs in:
    37 lanes (tiles of 32, 4 and 1) equal the first 37 of 64 (two whole tiles, which the reference files check
    against ggml's bytes), degenerate lanes (all zero, constant, one value) included."""
    from ideoquant.encode.ggml import common

    rng = np.random.default_rng(7)
    X = (rng.standard_normal((32, 64)) * 0.02).astype(np.float32)
    X[:, 3] = 0.0
    X[:, 5] = 0.25
    X[1:, 9] = 0.0
    X[:, 33:36] = np.abs(X[:, 33:36])
    W = (np.sqrt(np.mean(X * X, axis=0)) + np.abs(X)).astype(np.float32)

    def qkx(g, nmax, use_mad):
        L, scale, the_min = np.empty((32, g), np.int32), np.empty(g, np.float32), np.empty(g, np.float32)
        common.make_qkx_quants(np.ascontiguousarray(X[:, :g]), np.ascontiguousarray(W[:, :g]), nmax,
                               np.float32(-1.0), np.float32(0.1), 20, use_mad, L, scale, the_min)
        return L, scale, the_min

    def qx(g, nmax):
        L, scale = np.empty((32, g), np.int32), np.empty(g, np.float32)
        common.make_qx_quants(np.ascontiguousarray(X[:, :g]), np.ascontiguousarray(W[:, :g]), nmax, L, scale)
        return L, scale

    for whole, part in [(qkx(64, 15, False), qkx(37, 15, False)), (qkx(64, 3, True), qkx(37, 3, True)),
                        (qx(64, 32), qx(37, 32))]:
        for a, b in zip(whole, part):
            assert np.array_equal(a[..., :37].view(np.uint32) if a.dtype == np.float32 else a[..., :37],
                                  b.view(np.uint32) if b.dtype == np.float32 else b)


@pytest.mark.parametrize("qtype", ["Q8_0", "F16", "BF16", *FP4])
def test_types_without_weighted_path_ignore_imatrix(qtype):
    x, q, _, _ = load(qtype.lower() + ".npz")
    _, _, _, w = load("q4_k_imat_act.npz")
    assert not ggml.has_imatrix_path(qtype)
    same(ggml.encode(x, qtype, w), q, qtype + " with imatrix")


@pytest.mark.parametrize("name", [f for f in FILES if file_qtype(f) in ERR and "special" not in f])
def test_round_trip_error_within_readme_bounds(name):
    x, q, qtype, _ = load(name)
    flavour = 2 if "imat_act" in name else 1 if "imat_ones" in name else 0
    y = ggml.decode(q, qtype)
    assert y.shape == x.shape and y.dtype == np.float32
    xs, ys = x[NORMAL_ROWS], y[NORMAL_ROWS]
    rel = np.abs(ys - xs).max(axis=1) / np.abs(xs).max(axis=1)
    assert rel.max() <= ERR[qtype][flavour] * 1.1, (name, rel.max())  # the table gives 2 significant digits


def test_registry_agrees_with_gguf_py():
    """Every entry's sizes and file type are gguf-py's; every fallback is registered and takes shorter rows."""
    for name, t in ggml.registry.TYPES.items():
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[GGMLQuantizationType[name]], name
        assert t.file_type in gguf.LlamaFileType.__members__, (name, t.file_type)
        if t.fallback is not None:
            f = ggml.registry.TYPES[t.fallback]
            assert t.block_size % f.block_size == 0 and f.block_size < t.block_size, name
        assert set(t.readers) <= set(ggml.registry.EVERY_READER) and t.readers, name
    assert not ggml.registry.TYPES["F32"].encoder  # norms and biases: stored as they are, never a --type


def test_type_helpers():
    assert ggml.QTYPES == QUANTS + FOUR_BIT + IQ + ("F16", "BF16")
    for name in ggml.QTYPES:
        bs, ts = ggml.type_size(name)
        assert (bs, ts) == SIZES[name]
        assert ggml.type_size(name.lower()) == (bs, ts) == ggml.type_size(GGMLQuantizationType[name])
        assert ggml.normalize_qtype(GGMLQuantizationType[name]) == name
        assert ggml.normalize_qtype(f" {name.lower()} ") == name
        assert ggml.can_quantize(name, bs * 3)
        assert not ggml.can_quantize(name, 0)
        assert ggml.can_quantize(name, bs + 1) == (bs == 1)
        assert ggml.has_imatrix_path(name) == (name in WEIGHTED)
        assert ggml.needs_imatrix(name) == (name in NEEDS_IMATRIX)
        assert (ggml.registry.get(name).imatrix == ggml.registry.REQUIRED) == (name in REQUIRED)
    for bad in ("Q8_1", "TQ2_0", "F32", "", "q4_k_m", GGMLQuantizationType.TQ1_0, 9999, None):
        with pytest.raises(ValueError):
            ggml.normalize_qtype(bad)
        with pytest.raises(ValueError):
            ggml.type_size(bad)


@pytest.mark.parametrize("qtype", QUANTS + ("F16", "BF16") + FOUR_BIT + IQ)
def test_gguf_py_decodes_every_type(qtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 512)) * 0.02).astype(np.float32)
    q = ggml.encode(x, qtype, np.ones(512, np.float32) if qtype in REQUIRED else None)
    bs, ts = SIZES[qtype]
    assert q.shape == (3, 512 // bs * ts)
    y = gguf.quants.dequantize(q, GGMLQuantizationType[qtype])
    assert y.shape == x.shape
    assert np.array_equal(ggml.dequantize(q, qtype), y)
    bound = 0.85 if qtype == "IQ1_M" else 0.5  # 1.75 bits a value without an imatrix: about 0.79 here
    assert np.abs(y - x).max() <= bound * np.abs(x).max()


def test_encode_argument_checks():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError):
        ggml.encode(x.astype(np.float64), "Q4_K")
    with pytest.raises(ValueError):
        ggml.encode(np.zeros((2, 512), np.float32)[:, ::2], "Q4_K")
    with pytest.raises(ValueError):
        ggml.encode(np.zeros((2, 288), np.float32), "Q4_K")
    with pytest.raises(ValueError):
        ggml.encode(x, "Q4_K", out=np.empty((2, 143), np.uint8))
    with pytest.raises(ValueError):
        ggml.encode(x, "Q4_K", imatrix=np.ones(255, np.float32))
    assert ggml.encode(np.zeros((0, 256), np.float32), "Q6_K").shape == (0, 210)
    for qtype in REQUIRED:  # ggml asserts an imatrix for these
        with pytest.raises(ValueError, match="importance matrix"):
            ggml.encode(x, qtype)


def test_quantize_wrappers_any_shape_and_torch():
    torch = pytest.importorskip("torch")
    x, q, _, w = load("q4_k_imat_act.npz")
    got = ggml.quantize(x.reshape(4, 16, -1), "q4_k", imatrix=w)
    assert got.shape == (4, 16, q.shape[1])
    same(got.reshape(q.shape), q, "3-D quantize")
    same(ggml.quantize(torch.from_numpy(x), "Q4_K", imatrix=torch.from_numpy(w)), q, "torch")
    y = ggml.dequantize(got, "Q4_K")
    assert y.shape == (4, 16, x.shape[1]) and y.dtype == np.float32
    t = torch.randn(3, 512, dtype=torch.bfloat16)
    same(ggml.quantize(t, "BF16"), t.view(torch.int16).numpy().view(np.uint8).reshape(3, 1024), "bf16 exact")
