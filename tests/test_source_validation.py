"""Broken and hostile sources (issue 11): companion tensors, JSON of the wrong shape, configs that lie about sizes,
headers that lie about data, ambiguous shards, index entries that leave the folder. Each is one IdeoquantError
naming the file or tensor, raised from the headers and JSON alone; plus property-based fuzzing of the header
reader and of every JSON input."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ideoquant import model, testing
from ideoquant.errors import IdeoquantError
from ideoquant.source import open as source_open
from ideoquant.source import open_source
from ideoquant.source.tensors import _read_rows

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any tensor data is read: the checks must come from the headers alone."""
    from ideoquant.source import tensors

    def boom(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(tensors, "_read_rows", boom)


def _comfy_like(tmp_path, edit, name="ideogram4_fp8_scaled.safetensors", fmt="fp8", layout="official"):
    """One backbone file of the official FP8 layout (or another), its tensors changed by `edit(dict)`."""
    src = testing.build_checkpoint(tmp_path / "build", layout=layout, fmt=fmt)
    f = src / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    edit(sd)
    out = tmp_path / name
    save_file(sd, out, metadata={"format": "pt"})
    return out


# --- companion tensors -------------------------------------------------------------------------------------------

W = "layers.0.feed_forward.w1.weight"


@pytest.mark.parametrize("change,message", [
    (lambda sd: sd.update({W + "_scale": sd[W + "_scale"][:-1]}), r"weight_scale has shape \[511\]; expected \[512\]"),
    (lambda sd: sd.update({W + "_scale": sd[W + "_scale"][:, None]}), r"shape \[512, 1\]; expected \[512\]"),
    (lambda sd: sd.update({W + "_scale": sd[W + "_scale"][:2]}), r"shape \[2\]; expected \[512\]"),
    (lambda sd: sd.update({W + "_scale": sd[W + "_scale"].to(torch.int32)}), "dtype I32; expected F32"),
    (lambda sd: sd.update({W + "_scale": sd[W + "_scale"].double()}), "dtype F64; expected F32"),
    (lambda sd: sd.pop(W + "_scale"), f"FP8 tensor {W} has no {W}_scale"),
    (lambda sd: sd.update({"layers.0.ffn_norm1.weight_scale": torch.ones(1)}), "layers.0.ffn_norm1.weight_scale scales"),
    (lambda sd: sd.update({"nothing.weight_scale": torch.ones(1)}), "nothing.weight_scale has no weight"),
    (lambda sd: sd.update({"layers.0.feed_forward.w1.comfy_quant": torch.ones(3)}), "comfy_quant has dtype F32"),
    (lambda sd: sd.update({"layers.0.ffn_norm1.comfy_quant": torch.ones(3, dtype=torch.uint8)}),
     "belongs to an FP8 layer, but layers.0.ffn_norm1 has a BF16 weight"),
    (lambda sd: sd.update({"layers.0.feed_forward.w1.input_scale": torch.ones(4)}), r"input_scale has dtype F32 and shape \[4\]"),
    (lambda sd: sd.update({W: sd[W].view(torch.uint8)}), f"{W}_scale scales {W}, which is U8, not FP8"),
    (lambda sd: (sd.update({W: sd[W].view(torch.uint8)}), sd.pop(W + "_scale")), f"{W} has unsupported dtype U8"),
    (lambda sd: sd.update({"layers.0.feed_forward.w1.weight_scale_2": torch.ones(())}), "NVFP4"),
])
def test_companion_tensors_are_checked_from_the_headers(tmp_path, no_reads, change, message):
    f = _comfy_like(tmp_path, change)
    with pytest.raises(IdeoquantError, match=message):
        open_source(f)


def test_scalar_and_one_element_scales_are_per_tensor(tmp_path):
    def edit(sd):
        sd[W + "_scale"] = sd[W + "_scale"].max().reshape(1)
    comp = open_source(_comfy_like(tmp_path, edit)).components["transformer"]
    codes = load_file(tmp_path / "ideogram4_fp8_scaled.safetensors")[W]
    assert torch.equal(comp.tensors[W].read(), codes.float() * load_file(tmp_path / "ideogram4_fp8_scaled.safetensors")[W + "_scale"])


# --- JSON inputs of the wrong shape ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny bf16 pipeline, one shard per backbone plus an index, to copy and break."""
    src = testing.build_checkpoint(tmp_path_factory.mktemp("v") / "src", fmt="bf16", max_shard_size="100MB")
    for c in model.COMPONENTS:
        f = src / c / "diffusion_pytorch_model.safetensors"
        with safe_open(f, "pt") as h:
            keys = list(h.keys())
        (src / c / source_open.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": {k: f.name for k in keys}}))
    return src


@pytest.fixture
def copy(small, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(small, dst, symlinks=True)
    return dst


def _edit(path: Path, fn):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


CFG, IDX, MI = "transformer/config.json", f"transformer/{source_open.INDEX_NAME}", "model_index.json"


@pytest.mark.parametrize("rel,fn,message", [
    (CFG, lambda d: [d], "config.json: expected a JSON object, found a list"),
    (CFG, lambda d: None, "config.json: expected a JSON object, found null"),
    (CFG, lambda d: {**d, "num_layers": "2"}, "config.json: num_layers must be a positive integer, not a string"),
    (CFG, lambda d: {**d, "num_layers": None}, "num_layers must be a positive integer, not null"),
    (CFG, lambda d: {**d, "num_layers": True}, "num_layers must be a positive integer, not a boolean"),
    (CFG, lambda d: {**d, "num_layers": 2.0}, "num_layers must be a positive integer, not a number"),
    (CFG, lambda d: {**d, "attention_head_dim": -128}, "attention_head_dim must be a positive integer"),
    (CFG, lambda d: {**d, "rope_theta": "big"}, "rope_theta must be a positive number, not a string"),
    (CFG, lambda d: {**d, "norm_eps": [1e-5]}, "norm_eps must be a positive number, not a list"),
    (CFG, lambda d: {**d, "mrope_section": "24,20,20"}, "mrope_section must be a list"),
    (CFG, lambda d: {**d, "_class_name": 4}, "_class_name must be a string, not an integer"),
    (CFG, lambda d: {**d, "quantization_config": "int8"}, "quantization_config must be an object, not a string"),
    (CFG, lambda d: {**d, "num_layers": 3}, "config.json: num_layers = 3 but the tensors hold 2"),
    (CFG, lambda d: {k: v for k, v in d.items() if k != "num_layers"}, r"num_layers is left out \(default 34\) but the tensors hold 2"),
    (IDX, lambda d: [d], "index.json: expected a JSON object, found a list"),
    (IDX, lambda d: {**d, "weight_map": list(d["weight_map"])}, "weight_map must be a non-empty object"),
    (IDX, lambda d: {**d, "weight_map": None}, "weight_map must be a non-empty object of tensor -> file, not null"),
    (IDX, lambda d: {**d, "weight_map": {k: 1 for k in d["weight_map"]}}, r"weight_map\[.*\] must be a file name"),
    (IDX, lambda d: {**d, "metadata": "x"}, "metadata must be an object"),
    (MI, lambda d: [d], "model_index.json: expected a JSON object, found a list"),
    (MI, lambda d: {**d, "transformer": "diffusers"}, "model_index.json: transformer must be .library, class."),
    (MI, lambda d: {**d, "_class_name": None}, "model_index.json: _class_name must be a string, not null"),
])
def test_json_of_the_wrong_shape_is_one_clear_error(copy, rel, fn, message):
    _edit(copy / rel, fn)
    with pytest.raises(IdeoquantError, match=message) as e:
        open_source(copy)
    assert str(copy / rel) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["", "{", "\xff\xfe", "[" * 100000 + "]" * 100000, '{"a": NaN'])
def test_unparseable_json_names_the_file(copy, text):
    (copy / CFG).write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe")
    with pytest.raises(IdeoquantError, match=f"cannot read {copy / CFG}"):
        open_source(copy)


def test_absurd_config_sizes_allocate_nothing(copy):
    _edit(copy / CFG, lambda d: {**d, "num_layers": 1 << 30, "intermediate_size": 1 << 30})
    tracemalloc.start()
    try:
        with pytest.raises(IdeoquantError, match="num_layers = 1073741824 but the tensors hold 2"):
            open_source(copy)
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()


# --- headers that lie, ambiguous and escaping shards ---------------------------------------------------------------


def test_header_claiming_more_data_than_the_file_holds(copy):
    f = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-4])  # the last tensor is 4 bytes short
    with pytest.raises(IdeoquantError, match=f"corrupt or truncated safetensors file {f}: the header describes"):
        open_source(copy)
    f.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(IdeoquantError, match="the header claims 1099511627776 bytes"):
        open_source(copy)


def test_tensor_in_two_shards_is_ambiguous(copy):
    f = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({"embed_image_indicator.weight": torch.zeros(2, 256, dtype=torch.bfloat16)}, f.with_name("extra.safetensors"))
    _edit(copy / IDX, lambda d: {**d, "weight_map": {**d["weight_map"], "extra": "extra.safetensors"}})
    with pytest.raises(IdeoquantError, match="embed_image_indicator.weight is stored in both .* the source is ambiguous"):
        open_source(copy)


@pytest.mark.parametrize("entry", ["../x.safetensors", "/etc/x.safetensors", "sub/x.safetensors", "..", "a\\b.safetensors"])
def test_index_entries_that_leave_the_folder(copy, entry):
    outside = copy.parent / "x.safetensors"
    shutil.copy(copy / "transformer" / "diffusion_pytorch_model.safetensors", outside)
    _edit(copy / IDX, lambda d: {**d, "weight_map": {k: entry for k in d["weight_map"]}})
    with pytest.raises(IdeoquantError, match="leaves the folder; entries must name files in the same folder"):
        open_source(copy)


def test_index_entry_that_is_not_safetensors(copy):
    _edit(copy / IDX, lambda d: {**d, "weight_map": {k: "model.bin" for k in d["weight_map"]}})
    with pytest.raises(IdeoquantError, match="is not a .safetensors file"):
        open_source(copy)


def test_symlinked_shards_as_in_the_hf_cache_are_fine(copy, tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for c in model.COMPONENTS:
        f = copy / c / "diffusion_pytorch_model.safetensors"
        target = blobs / c
        shutil.move(f, target)
        f.symlink_to(os.path.relpath(target, f.parent))
    assert sorted(open_source(copy).components) == sorted(model.COMPONENTS)


def test_stale_index_is_tolerated_and_noted(copy):
    _edit(copy / IDX, lambda d: {**d, "weight_map": {**d["weight_map"], "gone.weight": "diffusion_pytorch_model.safetensors"}})
    notes = open_source(copy).describe()["notes"]
    assert any("is stale (1 listed tensors not in the files" in n for n in notes)


# --- fuzzing ----------------------------------------------------------------------------------------------------

SIZES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "U8": 1, "I8": 1, "I64": 8, "F64": 8, "BOOL": 1}
BREAKS = ["dtype", "shape", "offsets", "entry", "metadata", "json", "length", "truncate", "extra", "dupkey"]


@st.composite
def files(draw):
    """A safetensors file: valid two times in three, otherwise broken in one way (of BREAKS, with random values)."""
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = SIZES[dtype] * math.prod(shape)
        header[draw(st.text(max_size=6)) + str(i)] = {"dtype": dtype, "shape": shape,
                                                      "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    tensors = [k for k in header if k != "__metadata__"]
    data = bytes((i * 37) % 251 for i in range(offset))
    broken = draw(st.integers(0, 2)) == 0 and draw(st.sampled_from(BREAKS))
    junk = st.sampled_from([-1, 2 ** 64, 1.5, "3", True, None, [], {}, "F4", "F8_E8M0", 7, ""])
    if broken in ("dtype", "shape", "offsets", "entry") and tensors:
        key = draw(st.sampled_from(tensors))
        e = header[key]
        if broken == "dtype":
            e["dtype"] = draw(junk | st.sampled_from(sorted(SIZES)))
        elif broken == "shape":
            e["shape"] = draw(junk) if draw(st.booleans()) else [*e["shape"], draw(junk)]
        elif broken == "offsets":
            a, b = e["data_offsets"]
            e["data_offsets"] = draw(st.sampled_from([[a], [b, a], [a, b + 1], [a - 1, b], [a, b, b], "x",
                                                      [a, float(b)], [a + 1, b + 1]]))
        else:
            header[key] = draw(st.sampled_from([[1, 2], "x", None, {"dtype": e["dtype"]},
                                                {k: v for k, v in e.items() if k != "shape"}]))
    if broken == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), junk, min_size=1, max_size=2) | junk)
    text = json.dumps(header).encode() + b" " * draw(st.sampled_from([0, 3]))
    if broken == "json":
        text = draw(st.sampled_from([b"[]", b"null", b"{", b"\xff\xff", b"1e999", b" {}", b"{}x", b'"s"']))
    if broken == "dupkey" and tensors:
        text = text[:1] + json.dumps({tensors[0]: header[tensors[0]]}).encode()[1:-1] + b"," + text[1:]
    length = len(text)
    if broken == "length":
        length += draw(st.sampled_from([1, -1, 1 << 40, 2 ** 63]))
    if broken == "extra":
        data += b"\0" * draw(st.integers(1, 9))
    blob = struct.pack("<Q", length % 2 ** 64) + text + data
    if broken == "truncate":
        blob = blob[: draw(st.integers(0, max(len(blob) - 1, 0)))]
    return blob


@FUZZ
@given(blob=files())
def test_fuzz_header_reader(tmp_path, blob):
    f = tmp_path / "x.safetensors"
    f.write_bytes(blob)
    source_open._HEADER_CACHE.clear()
    try:
        tensors, metadata = source_open._read_header(f)
    except IdeoquantError as e:
        assert "\n" not in str(e)
        return
    # Accepted: safetensors itself reads the same tensors, bytes for bytes.
    with safe_open(f, "pt") as h:
        assert set(h.keys()) == set(tensors)
        assert (h.metadata() or {}) == metadata
        for k, t in tensors.items():
            ref = h.get_tensor(k)
            assert list(ref.shape) == list(t.shape)
            ours = _read_rows(t, None)
            assert torch.equal(ours.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), k


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 33) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)


@st.composite
def json_docs(draw, valid):
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    doc = json.loads(json.dumps(valid))
    keys = list(doc) + draw(st.lists(st.text(max_size=8), max_size=1))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        if isinstance(doc.get(key), dict) and doc[key] and draw(st.booleans()):
            inner = draw(st.sampled_from(sorted(doc[key])))
            doc[key][inner] = draw(json_values)
        elif draw(st.integers(0, 3)) == 0:
            doc.pop(key, None)
        else:
            doc[key] = draw(json_values)
    return doc


@pytest.mark.parametrize("rel", [CFG, IDX, MI])
def test_fuzz_json_inputs(small, tmp_path_factory, rel):
    folder = tmp_path_factory.mktemp("fuzz") / "src"
    shutil.copytree(small, folder)
    valid = json.loads((small / rel).read_text())

    @FUZZ
    @given(doc=json_docs(valid))
    def check(doc):
        (folder / rel).write_text(json.dumps(doc))
        try:
            src = open_source(folder)
        except IdeoquantError as e:
            assert "\n" not in str(e)
            return
        for c in src.components.values():  # accepted: the config agrees with the tensors it describes
            assert {k: t.shape for k, t in c.tensors.items()} == c.spec.shapes

    check()
