"""ideoquant.imatrix against independent references: files built with gguf-py's GGUFWriter or byte by byte with
struct, the writer checked with gguf-py's GGUFReader, weights against hand-computed values from
shared/notes/imatrix.md."""

import math
import os
import struct

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ideoquant import imatrix as im
from ideoquant.errors import IdeoquantError

QKV = "layers.0.attention.qkv.weight"
W1 = "layers.10.feed_forward.w1.weight"
O = "layers.2.attention.o.weight"


# ---------------------------------------------------------------------------------------------- references


def gguf_writer_file(path, entries, datasets=("calib.txt",), chunk_count=7, chunk_size=512, general_type="imatrix"):
    """A GGUF imatrix made with gguf-py's own writer, laid out as the notes (2.2) describe."""
    w = gguf.GGUFWriter(str(path), arch="unused")
    del w.kv_data[0]["general.architecture"]  # llama-imatrix writes none
    if general_type is not None:
        w.add_type(general_type)
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(entries):
        s, c = entries[name]
        w.add_tensor(name + ".in_sum2", np.asarray(s, np.float32))  # numpy [n_mat, n_cols] = ne [n_cols, n_mat]
        w.add_tensor(name + ".counts", np.asarray(c, np.float32).reshape(-1, 1))  # ne [1, n_mat]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dat_bytes(entries, last_call=None, dataset=None):
    """A legacy .dat byte by byte (notes 2.3): int32 n_entries; len, name, ncall, nval, float32 values; last_call;
    dataset len + bytes."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values))
        out += struct.pack(f"<{len(values)}f", *values)
    if last_call is not None:
        out += struct.pack("<i", last_call)
    if dataset is not None:
        out += struct.pack("<i", len(dataset.encode())) + dataset.encode()
    return out


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(kvs, tensors, version=3, n_tensors=None, n_kv=None):
    """A GGUF file by hand for hostile variants. kvs: [(key, type, raw value bytes)];
    tensors: [(name, ne, ggml_type, data bytes)]."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    for key, vtype, raw in kvs:
        head += gstr(key) + struct.pack("<I", vtype) + raw
    offset, blobs = 0, b""
    for name, ne, ttype, data in tensors:
        head += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        head += struct.pack("<IQ", ttype, offset)
        pad = -len(data) % 32
        blobs += data + b"\0" * pad
        offset += len(data) + pad
    head += b"\0" * (-len(head) % 32)
    return head + blobs


def std_kvs(general_type=b"imatrix", chunk_count=struct.pack("<I", 3), chunk_type=4):
    return [
        ("general.type", 8, gstr(general_type)),
        ("imatrix.datasets", 9, struct.pack("<IQ", 8, 1) + gstr("d.txt")),
        ("imatrix.chunk_count", chunk_type, chunk_count),
        ("imatrix.chunk_size", 4, struct.pack("<I", 512)),
    ]


def f32(*v):
    return struct.pack(f"<{len(v)}f", *v)


GOOD_TENSORS = [(QKV + ".in_sum2", [4], 0, f32(1, 2, 3, 4)), (QKV + ".counts", [1], 0, f32(2))]


# ---------------------------------------------------------------------------------------------- GGUF


def test_read_gguf_made_by_gguf_writer(tmp_path):
    entries = {
        QKV: ([[2.0, 4.0, 6.0, 8.0]], [4.0]),
        "moe.experts.weight": ([[1, 2], [3, 4], [5, 6]], [2.0, 0.0, 4.0]),  # partial MoE data, still written
    }
    m = im.read(gguf_writer_file(tmp_path / "a.gguf", entries, datasets=("a.txt", "b.txt")))
    assert m.source_format == "gguf"
    assert (m.datasets, m.chunk_count, m.chunk_size) == (["a.txt", "b.txt"], 7, 512)
    assert set(m.entries) == set(entries)
    e = m.entries["moe.experts.weight"]
    assert e.in_sum2.dtype == np.float32 and e.in_sum2.shape == (3, 2)
    np.testing.assert_array_equal(e.in_sum2, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(e.counts, [2, 0, 4])
    assert e.ncall is None and not e.legacy
    # llama-quantize: in_sum2 / counts per matrix row, 1.0 where the count is 0 (notes 2.4)
    np.testing.assert_array_equal(im.weights(m, "moe.experts.weight", 2, "llama"), [0.5, 1, 1, 1, 1.25, 1.5])
    np.testing.assert_array_equal(im.weights(m, QKV, 4, "llama"), [0.5, 1, 1.5, 2])


def test_write_gguf_checked_with_gguf_reader(tmp_path):
    m = im.ImportanceMatrix(
        {
            O: im.Entry(np.array([[3.0, 5.0]], np.float32), np.array([3.0], np.float32)),
            QKV: im.Entry(np.array([[1.0, 2.0, 3.0]], np.float32), np.array([1.0], np.float32)),
            W1: im.Entry(np.array([[0.25]], np.float32), np.array([9.0], np.float32)),
            "moe.weight": im.Entry(np.arange(6, dtype=np.float32).reshape(3, 2), np.array([1, 0, 2], np.float32)),
        },
        datasets=["one.txt", "two.txt"],
        chunk_count=12,
        chunk_size=256,
    )
    path = tmp_path / "out.gguf"
    im.write_gguf(path, m)
    r = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert "general.architecture" not in fields
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["one.txt", "two.txt"]
    assert fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert fields["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    assert (fields["imatrix.chunk_count"].contents(), fields["imatrix.chunk_size"].contents()) == (12, 256)
    assert r.fields["GGUF.version"].contents() == 3
    # sorted by entry name, bytewise ("layers.10" before "layers.2"), in_sum2 then counts
    names = [t.name for t in r.tensors]
    assert names == [n + s for n in sorted(m.entries) for s in (".in_sum2", ".counts")]
    assert names[:2] == [QKV + ".in_sum2", QKV + ".counts"] and names[2].startswith("layers.10.")
    by = {t.name: t for t in r.tensors}
    # ne = [n_cols, n_mat] and [1, n_mat], with ggml_n_dims' trailing 1s dropped
    assert [int(d) for d in by[QKV + ".in_sum2"].shape] == [3]
    assert [int(d) for d in by[QKV + ".counts"].shape] == [1]
    assert [int(d) for d in by["moe.weight.in_sum2"].shape] == [2, 3]
    assert [int(d) for d in by["moe.weight.counts"].shape] == [1, 3]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert t.data_offset % 32 == 0
    np.testing.assert_array_equal(np.asarray(by["moe.weight.in_sum2"].data).reshape(-1), np.arange(6))
    np.testing.assert_array_equal(np.asarray(by["moe.weight.counts"].data).reshape(-1), [1, 0, 2])
    np.testing.assert_array_equal(np.asarray(by[W1 + ".in_sum2"].data), [0.25])
    assert os.path.getsize(path) % 32 == 0  # the last tensor is padded too
    # and back through our reader
    back = im.read(path)
    for name, e in m.entries.items():
        np.testing.assert_array_equal(back.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (m.datasets, 12, 256)


def test_write_gguf_refuses_names_ggml_cannot_hold(tmp_path):
    long = "model.diffusion_model.uncond.layers.10.feed_forward.w1.weight"
    m = im.ImportanceMatrix({long: im.Entry(np.ones((1, 2), np.float32), np.ones(1, np.float32))}, chunk_size=1)
    with pytest.raises(IdeoquantError, match="too long"):
        im.write_gguf(tmp_path / "x.gguf", m)
    assert list(tmp_path.iterdir()) == []
    im.write_dat(tmp_path / "x.dat", m)  # the legacy format has no such limit
    assert long in im.read(tmp_path / "x.dat").entries


# ---------------------------------------------------------------------------------------------- .dat


def test_read_llama_dat_built_by_hand(tmp_path):
    p = tmp_path / "l.dat"
    p.write_bytes(dat_bytes([(QKV, 3, [3.0, 6.0, 9.0]), (W1, 2, [1.0, 0.5])], last_call=42, dataset="wiki.txt"))
    m = im.read(p)
    assert m.source_format == "dat"
    assert (m.datasets, m.chunk_count, m.chunk_size) == (["wiki.txt"], 42, 0)
    e = m.entries[QKV]
    assert e.legacy and e.ncall == 3 and e.in_sum2.shape == (1, 3)
    np.testing.assert_array_equal(e.in_sum2, [[3, 6, 9]])
    # llama-quantize: stored / ncall; sd.cpp: stored as is (notes 2.4, 3.3)
    np.testing.assert_array_equal(im.weights(m, QKV, 3, "llama"), [1, 2, 3])
    np.testing.assert_array_equal(im.weights(m, QKV, 3, "sdcpp"), [3, 6, 9])
    np.testing.assert_array_equal(im.weights(m, W1, 2, "llama"), [0.5, 0.25])


def test_read_sdcpp_dat(tmp_path):
    """sd.cpp: legacy layout, hash-map order, full internal names, last_call always 0, no dataset (notes 3.2)."""
    p = tmp_path / "sd.dat"
    p.write_bytes(dat_bytes([("model.diffusion_model." + W1, 5, [10.0, 20.0]),
                             ("model.diffusion_model." + QKV, 3, [3.0, 6.0, 9.0])], last_call=0))
    m = im.read(p)
    assert (m.datasets, m.chunk_count) == ([], 0)
    assert im.lookup(m, QKV) is m.entries["model.diffusion_model." + QKV]
    np.testing.assert_array_equal(im.weights(m, QKV, 3, "sdcpp"), [3, 6, 9])
    np.testing.assert_array_equal(im.weights(m, W1, 2, "llama"), [2, 4])
    assert im.lookup(m, QKV, uncond=True) is None  # the conditional statistics are not used for the uncond backbone


def test_read_old_llama_dat_without_trailer(tmp_path):
    p = tmp_path / "old.dat"
    p.write_bytes(dat_bytes([(QKV, 1, [1.0])]))
    m = im.read(p)
    assert (m.chunk_count, m.datasets, list(m.entries)) == (0, [], [QKV])


def test_write_dat_reproduces_a_sorted_llama_file_byte_for_byte(tmp_path):
    raw = dat_bytes([(QKV, 3, [3.0, 6.0, 9.0]), (W1, 2, [1.0, 0.5]), (O, 1, [0.1])], last_call=42, dataset="w.txt")
    (tmp_path / "in.dat").write_bytes(raw)
    im.write_dat(tmp_path / "out.dat", im.read(tmp_path / "in.dat"))
    assert (tmp_path / "out.dat").read_bytes() == raw


def test_write_dat_from_sums_as_llama_imatrix_does(tmp_path):
    """save_imatrix_legacy: (sum / count) * ncall, ncall = ceil(max count / chunk_size), 1.0 * ncall for a matrix with
    count 0, entries with no data skipped, last_call = chunk_count and the last dataset (notes 2.3)."""
    m = im.ImportanceMatrix(
        {
            QKV: im.Entry(np.array([[2.0, 4.0, 6.0]], np.float32), np.array([4.0], np.float32)),
            "moe.weight": im.Entry(np.array([[1.0, 3.0], [7.0, 7.0]], np.float32), np.array([0.0, 5.0], np.float32)),
            "empty.weight": im.Entry(np.ones((1, 2), np.float32), np.zeros(1, np.float32)),
        },
        datasets=["a.txt", "b.txt"], chunk_count=9, chunk_size=3,
    )
    im.write_dat(tmp_path / "o.dat", m)
    moe = float(np.float32(7) / np.float32(5) * np.float32(2))  # float32 arithmetic, as the C code
    entries = [(QKV, 2, [1.0, 2.0, 3.0]), ("moe.weight", 2, [2.0, 2.0, moe, moe])]
    expect = dat_bytes(entries, last_call=9, dataset="b.txt")
    assert (tmp_path / "o.dat").read_bytes() == expect
    back = im.read(tmp_path / "o.dat")
    np.testing.assert_array_equal(back.entries[QKV].in_sum2, [[1, 2, 3]])
    assert back.entries[QKV].ncall == 2 and back.datasets == ["b.txt"]


# ---------------------------------------------------------------------------------------------- weights


def test_weights_hand_computed():
    """notes 4: llama-quantize passes in_sum2 / counts (mean x^2); sd.cpp passes mean x^2 * ncall."""
    m = im.ImportanceMatrix(
        {QKV: im.Entry(np.array([[2.0, 4.0, 6.0]], np.float32), np.array([4.0], np.float32))}, chunk_size=3
    )
    np.testing.assert_array_equal(im.weights(m, QKV, 3, "llama"), [0.5, 1.0, 1.5])
    # what `llama-imatrix --output-format dat` stores and sd.cpp then passes: ncall = ceil(4 / 3) = 2
    np.testing.assert_array_equal(im.weights(m, QKV, 3, "sdcpp"), [1.0, 2.0, 3.0])
    w = im.weights(m, "model.diffusion_model." + QKV, 3, "llama")
    assert w.dtype == np.float32 and w.flags.c_contiguous
    # missing: NULL for llama-quantize, all ones for sd.cpp
    assert im.weights(m, O, 5, "llama") is None
    np.testing.assert_array_equal(im.weights(m, O, 5, "sdcpp"), np.ones(5, np.float32))
    np.testing.assert_array_equal(im.ones(4), [1, 1, 1, 1])
    assert im.ones(4).dtype == np.float32
    with pytest.raises(IdeoquantError, match="columns"):
        im.weights(m, QKV, 4, "llama")
    with pytest.raises(IdeoquantError, match="convention"):
        im.weights(m, QKV, 3, "gguf")
    # no chunk size: a GGUF-style entry has no ncall to derive sd.cpp's vector from
    m.chunk_size = 0
    with pytest.raises(IdeoquantError, match="chunk size"):
        im.weights(m, QKV, 3, "sdcpp")


def test_weights_from_accumulator_follow_sdcpp_collector():
    acc = im.Accumulator(chunk_size=2)
    acc.add(QKV, np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    acc.add(QKV, np.array([[[1.0, 0.0]]], np.float32))  # leading dims flatten into rows
    m = acc.result()
    e = m.entries[QKV]
    np.testing.assert_array_equal(e.in_sum2, [[11.0, 20.0]])
    np.testing.assert_array_equal(e.counts, [3])
    assert e.ncall == 2 and m.chunk_count == 1 and m.chunk_size == 2
    np.testing.assert_array_equal(im.weights(m, QKV, 2, "llama"), np.float32([11.0, 20.0]) / np.float32(3))
    # sd.cpp's collector stores (values / counts) * ncall with ncall = callbacks
    sd = np.float32([11.0, 20.0]) / np.float32(3) * np.float32(2)
    np.testing.assert_array_equal(im.weights(m, QKV, 2, "sdcpp"), sd)


def test_lookup_name_forms():
    e1, e2, e3 = (im.Entry(np.ones((1, 1), np.float32), np.ones(1, np.float32)) for _ in range(3))
    m = im.ImportanceMatrix({QKV: e1, "model.diffusion_model." + QKV: e2, "model.diffusion_model.uncond." + O: e3})
    assert im.lookup(m, QKV) is e1  # llama.cpp's form (the GGUF tensor name) first
    assert im.lookup(m, QKV, convention="sdcpp") is e2  # sd.cpp's full name first
    assert im.lookup(m, "diffusion_model." + QKV) is e1
    assert im.lookup(m, O) is None
    assert im.lookup(m, O, uncond=True) is e3
    assert im.lookup(m, W1) is None
    assert im.canonical("transformer." + W1) == W1


# ---------------------------------------------------------------------------------------------- collector


def test_accumulator_matches_sequential_float32():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 7)).astype(np.float32) * 10 for n in (1, 300, 17)]
    acc = im.Accumulator(chunk_size=100, datasets=["prompts.txt"])
    ref = np.zeros(7, np.float32)
    for b in batches:
        acc.add("w", b)
        for row in b:  # llama.cpp's loop: values[j] += x[j] * x[j], in float
            ref += row * row
    m = acc.result()
    np.testing.assert_array_equal(m.entries["w"].in_sum2[0], ref)
    assert m.entries["w"].counts.tolist() == [318] and m.chunk_count == 3 and m.datasets == ["prompts.txt"]
    with pytest.raises(IdeoquantError, match="NaN"):
        acc.add("w", np.array([[np.nan] * 7], np.float32))
    with pytest.raises(IdeoquantError, match="columns"):
        acc.add("w", np.ones((2, 6), np.float32))
    with pytest.raises(IdeoquantError):
        im.Accumulator(chunk_size=0)


# ---------------------------------------------------------------------------------------------- hostile


def _expect_error(tmp_path, data, match=None):
    p = tmp_path / "bad.bin"
    p.write_bytes(data)
    with pytest.raises(IdeoquantError, match=match) as info:
        im.read(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "truncated"),
        (b"\x01\x00", "truncated"),
        (struct.pack("<i", 0), "at least 1"),
        (struct.pack("<i", -5), "at least 1"),
        (struct.pack("<i", 2**31 - 1) + b"\0" * 20, "claims"),
        (struct.pack("<ii", 1, -3) + b"\0" * 8, "name length"),
        (struct.pack("<ii", 1, 2**31 - 1) + b"ab" + b"\0" * 8, "truncated"),
        (struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 2**31 - 1) + b"\0" * 8, "truncated"),
        (struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, -1), "values"),
        (struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", -1, 1) + f32(1), "negative ncall"),
        (struct.pack("<ii", 1, 1) + b"\xff" + struct.pack("<ii", 1, 1) + f32(1), "UTF-8"),
        (dat_bytes([("a", 1, [float("nan")])]), "non-finite"),
        (dat_bytes([("a", 1, [float("inf")])]), "non-finite"),
        (dat_bytes([("a", 1, [-1.0])]), "negative"),
        (dat_bytes([("a", 1, [1.0]), ("a", 1, [1.0])]), "twice"),
        (dat_bytes([("a", 1, [1.0])], last_call=-1), "negative chunk count"),
        (dat_bytes([("a", 1, [1.0])], last_call=1) + struct.pack("<i", 10**9), "truncated"),
        (dat_bytes([("a", 1, [1.0])], last_call=1) + struct.pack("<i", -2), "negative dataset"),
        (dat_bytes([("a", 1, [1.0])], last_call=1, dataset="x") + b"junk", "unexpected bytes"),
        (dat_bytes([("a", 1, [1.0])]) + b"\x01", "truncated"),
    ],
)
def test_hostile_dat(tmp_path, data, match):
    _expect_error(tmp_path, data, match)


def test_every_truncation_of_a_dat_is_refused_or_complete(tmp_path):
    body = dat_bytes([(QKV, 3, [3.0, 6.0, 9.0]), (W1, 2, [1.0, 0.5])])
    full = body + struct.pack("<i", 4) + struct.pack("<i", 3) + b"abc"
    valid_ends = {len(body), len(body) + 4, len(full)}
    for n in range(len(full)):
        if n in valid_ends:
            continue
        _expect_error(tmp_path, full[:n])


U64_HUGE = 2**62


@pytest.mark.parametrize(
    "data, match",
    [
        (b"GGUF", "truncated"),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version"),
        (gguf_bytes(std_kvs(), GOOD_TENSORS, n_kv=U64_HUGE), "claims"),
        (gguf_bytes(std_kvs(), GOOD_TENSORS, n_tensors=U64_HUGE), "claims"),
        (gguf_bytes([("k" * 3, 8, struct.pack("<Q", U64_HUGE))], []), "truncated"),
        (gguf_bytes([("arr", 9, struct.pack("<IQ", 4, U64_HUGE))], []), "truncated"),
        (gguf_bytes([("arr", 9, struct.pack("<IQ", 8, U64_HUGE))], []), "claims"),
        (gguf_bytes([("arr", 9, struct.pack("<IQ", 9, 1))], []), "element type"),
        (gguf_bytes([("x", 99, b"")], []), "unknown value type"),
        (gguf_bytes(std_kvs(general_type=b"model"), GOOD_TENSORS), "general.type"),
        (gguf_bytes(std_kvs()[1:], GOOD_TENSORS), "general.type is missing"),
        (gguf_bytes(std_kvs()[:3], GOOD_TENSORS), "missing key imatrix.chunk_size"),
        (gguf_bytes(std_kvs(chunk_count=struct.pack("<i", -1), chunk_type=5), GOOD_TENSORS), "GGUF type"),
        (gguf_bytes(std_kvs() + [("general.alignment", 4, struct.pack("<I", 3))], GOOD_TENSORS), "alignment"),
        (gguf_bytes(std_kvs(), [GOOD_TENSORS[0]]), "has no"),
        (gguf_bytes(std_kvs(), [GOOD_TENSORS[1]]), "has no"),
        (gguf_bytes(std_kvs(), []), "no entries"),
        (gguf_bytes(std_kvs(), [(QKV + ".in_sum2", [4], 1, f32(1, 2)), GOOD_TENSORS[1]]), "ggml type 1"),
        (gguf_bytes(std_kvs(), [(QKV + ".in_sum2", [2**40], 0, f32(1, 2, 3, 4)), GOOD_TENSORS[1]]), "shape"),
        (gguf_bytes(std_kvs(), [(QKV + ".in_sum2", [4, 0], 0, f32(1, 2, 3, 4)), GOOD_TENSORS[1]]), "shape"),
        (gguf_bytes(std_kvs(), [(QKV + ".in_sum2", [256], 0, f32(1, 2, 3, 4)), GOOD_TENSORS[1]]), "outside"),
        (gguf_bytes(std_kvs(), [(QKV + ".in_sum2", [4, 1, 1, 1, 1], 0, f32(1, 2, 3, 4))]), "dimensions"),
        (gguf_bytes(std_kvs(), [(QKV + ".in_sum2", [4, 2], 0, f32(*range(8))), GOOD_TENSORS[1]]), "expected"),
        (gguf_bytes(std_kvs(), [(QKV + ".in_sum2", [4], 0, f32(1, float("nan"), 3, 4)), GOOD_TENSORS[1]]),
         "non-finite"),
        (gguf_bytes(std_kvs(), [GOOD_TENSORS[0], (QKV + ".counts", [1], 0, f32(-2))]), "negative"),
        (gguf_bytes(std_kvs(), GOOD_TENSORS + GOOD_TENSORS), "twice"),
        (gguf_bytes(std_kvs() + std_kvs()[:1], GOOD_TENSORS), "twice"),
    ],
)
def test_hostile_gguf(tmp_path, data, match):
    _expect_error(tmp_path, data, match)


def test_hand_built_gguf_is_accepted(tmp_path):
    """The hostile cases above differ from this good file in one place each."""
    p = tmp_path / "good.gguf"
    p.write_bytes(gguf_bytes(std_kvs(), GOOD_TENSORS))
    m = im.read(p)
    np.testing.assert_array_equal(im.weights(m, QKV, 4, "llama"), [0.5, 1, 1.5, 2])
    assert (m.datasets, m.chunk_count, m.chunk_size) == (["d.txt"], 3, 512)


def test_every_truncation_of_a_gguf_is_refused_or_complete(tmp_path):
    full = gguf_bytes(std_kvs(), GOOD_TENSORS)
    p = tmp_path / "t.gguf"
    for n in range(len(full)):
        p.write_bytes(full[:n])
        try:
            m = im.read(p)
        except IdeoquantError:
            continue
        # only the padding after the last tensor may go
        assert n >= len(full) - 28
        np.testing.assert_array_equal(m.entries[QKV].in_sum2, [[1, 2, 3, 4]])


def test_unreadable_paths(tmp_path):
    with pytest.raises(IdeoquantError, match="cannot read"):
        im.read(tmp_path / "missing.dat")
    with pytest.raises(IdeoquantError, match="cannot read"):
        im.read(tmp_path)


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "keep.gguf"
    target.write_bytes(b"old")
    bad = im.ImportanceMatrix({QKV: im.Entry(np.array([[np.nan]], np.float32), np.ones(1, np.float32))})
    for writer in (im.write_gguf, im.write_dat):
        with pytest.raises(IdeoquantError, match="finite"):
            writer(target, bad)
    empty = im.ImportanceMatrix({})
    with pytest.raises(IdeoquantError, match="no entries"):
        im.write_dat(target, empty)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["keep.gguf"]
    with pytest.raises(IdeoquantError, match="cannot write"):
        im.write_gguf(tmp_path / "no-such-dir" / "x.gguf", _one())


def test_gguf_without_a_dataset_name_is_refused(tmp_path):
    """gguf-py drops an empty array's key, and a GGUF imatrix without imatrix.datasets is not llama.cpp's layout."""
    m = _one()
    m.datasets = []
    with pytest.raises(IdeoquantError, match="no dataset"):
        im.write_gguf(tmp_path / "x.gguf", m)
    assert list(tmp_path.iterdir()) == []


def _one():
    return im.ImportanceMatrix({QKV: im.Entry(np.ones((1, 2), np.float32), np.ones(1, np.float32))}, chunk_size=1)


# ---------------------------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _read_or_error(path, data):
    path.write_bytes(data)
    try:
        m = im.read(path)
    except IdeoquantError as e:
        assert str(path) in str(e)
        return None
    assert isinstance(m, im.ImportanceMatrix) and m.entries
    for e in m.entries.values():
        assert e.in_sum2.dtype == np.float32 and np.isfinite(e.in_sum2).all()
    return m


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(fuzz_dir, data):
    _read_or_error(fuzz_dir / "r.dat", data)


_SEED_DAT = dat_bytes([(QKV, 3, [3.0, 6.0, 9.0]), (W1, 2, [1.0, 0.5])], last_call=4, dataset="d")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(_SEED_DAT) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(_SEED_DAT)))
def test_fuzz_mutated_dat(fuzz_dir, flips, cut):
    data = bytearray(_SEED_DAT)
    for i, b in flips:
        data[i] = b
    _read_or_error(fuzz_dir / "m.dat", bytes(data[:cut]))


_SEED_GGUF = gguf_bytes(std_kvs(), GOOD_TENSORS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(4, len(_SEED_GGUF) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_gguf(fuzz_dir, flips):
    data = bytearray(_SEED_GGUF)
    for i, b in flips:
        data[i] = b
    _read_or_error(fuzz_dir / "m.gguf", bytes(data))


def test_round_trips(tmp_path):
    acc = im.Accumulator(chunk_size=4, datasets=["p.txt"])
    rng = np.random.default_rng(1)
    for name in (QKV, O, W1):
        acc.add(name, rng.standard_normal((9, 8)).astype(np.float32))
    m = acc.result()
    im.write_gguf(tmp_path / "a.gguf", m)
    g = im.read(tmp_path / "a.gguf")
    for name in m.entries:
        np.testing.assert_array_equal(im.weights(g, name, 8, "llama"), im.weights(m, name, 8, "llama"))
        # a GGUF file has no ncall: sd.cpp's vector is then what `llama-imatrix --output-format dat` would store
        ncall = math.ceil(9 / 4)
        sd = im.weights(m, name, 8, "llama") * np.float32(ncall)
        np.testing.assert_array_equal(im.weights(g, name, 8, "sdcpp"), sd)
    im.write_dat(tmp_path / "a.dat", m)
    d = im.read(tmp_path / "a.dat")
    for name in m.entries:
        # the .dat keeps what sd.cpp would pass exactly, and llama-quantize's stored / ncall
        np.testing.assert_array_equal(im.weights(d, name, 8, "sdcpp"), im.weights(m, name, 8, "sdcpp"))
        np.testing.assert_allclose(im.weights(d, name, 8, "llama"), im.weights(m, name, 8, "llama"), rtol=1e-6)
        assert d.entries[name].ncall == 1  # one batch added per name
