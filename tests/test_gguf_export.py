"""GGUF export: readable by gguf-py, bytes equal to the encoder's, protected tensors exact, loadable, close."""

import json

import gguf
import numpy as np
import pytest
import torch

import ideoquant
from ideoquant import model
from ideoquant.gguf import dequantize, quantize
from ideoquant.metrics import sqnr_db
from ideoquant.source import open_source
from ideoquant.evaluation.runner import velocity
from tests.conftest import load_reference

TYPES = ("q8_0", "q4_k", "q4_k_m")


@pytest.fixture(scope="module")
def exports(bf16_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for qtype in TYPES:
        for layout in ("original", "diffusers"):
            folder = root / f"{qtype}-{layout}"
            out[qtype, layout] = folder, ideoquant.convert_gguf(str(bf16_source), folder, qtype=qtype, layout=layout)
    return out


def _file(folder, component, label, layout="original"):
    return folder / (f"ideogram4-{component}-{label}" + ("-diffusers" if layout == "diffusers" else "") + ".gguf")


def test_metadata(exports, bf16_source):
    folder, m = exports["q4_k_m", "original"]
    assert sorted(p.name for p in folder.glob("*.gguf")) == [
        "ideogram4-transformer-Q4_K_M.gguf", "ideogram4-unconditional_transformer-Q4_K_M.gguf"]
    for c in model.COMPONENTS:
        r = gguf.GGUFReader(_file(folder, c, "Q4_K_M"))
        kv = {k: f.contents() for k, f in r.fields.items()}
        assert kv["general.architecture"] == "ideogram4"
        assert kv["general.quantization_version"] == gguf.GGML_QUANT_VERSION
        assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
        assert c in kv["general.name"]
        assert kv["ideogram4.component"] == c and kv["ideogram4.layout"] == "original"
        assert kv["ideoquant.recipe"] == "gguf-q4_k_m" and kv["ideoquant.version"] == ideoquant.__version__
        config = json.loads(kv["ideogram4.diffusers_config"])
        source_config = json.loads((bf16_source / c / "config.json").read_text())
        assert {k: v for k, v in config.items() if not k.startswith("_")} == \
            {k: v for k, v in source_config.items() if not k.startswith("_")}
        assert json.loads((folder / c / "config.json").read_text())["num_layers"] == 2
    assert m["kind"] == "gguf" and m["recipe"]["name"] == "gguf-q4_k_m"


def test_base_model_keys_for_hub_sources(tmp_path, bf16_source):
    from ideoquant import formats
    from ideoquant.formats.gguf import gguf_metadata, gguf_recipe

    src = open_source(str(bf16_source))
    src.repo_id, src.commit = "ideogram-ai/ideogram-4-fp8", "a" * 40
    recipe, label = gguf_recipe("q4_k")
    kv = gguf_metadata(formats.get("gguf").plan(src.components["transformer"], recipe), src, recipe, label)
    assert kv["general.base_model.count"] == 1
    assert kv["general.base_model.0.organization"] == "ideogram-ai"
    assert kv["general.base_model.0.repo_url"] == "https://huggingface.co/ideogram-ai/ideogram-4-fp8"


@pytest.mark.parametrize("key", [("q4_k", "original"), ("q4_k", "diffusers"), ("q4_k_m", "original"),
                                 ("q8_0", "original")])
def test_every_tensor_bytes_equal_encoder_of_source(exports, bf16_source, key):
    folder, m = exports[key]
    label = key[0].upper()
    src = open_source(str(bf16_source)).components
    for c in model.COMPONENTS:
        reader = gguf.GGUFReader(_file(folder, c, label, key[1]))
        records = {t["name"]: t for t in m["components"][c]["tensors"]}
        assert {t.name for t in reader.tensors} == set(records)
        for t in reader.tensors:
            rec = records[t.name]
            parts = [src[c].tensors[n] for n in (rec["sources"] or [t.name])]
            x = torch.cat([p.read() for p in parts]) if len(parts) > 1 else parts[0].read()
            assert t.tensor_type.name == rec["dtype_out"], t.name
            if rec["decision"] == "quantized" and rec["dtype_out"] == "Q8_0":
                # gguf-py's own Q8_0 quantizer is bit-exact with ggml: an independent encoder of the same rows
                expected = gguf.quants.quantize(x.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
                assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected), t.name
            elif rec["decision"] == "quantized":
                # K-quant bytes are checked against ggml's own in test_gguf_reference_export; here the stored bytes,
                # decoded by gguf-py, must be this tensor's rows in this order; the manifest's SQNR is the whole
                # tensor's, exactly (every tensor of the tiny model is under the exact-SQNR size).
                decoded = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).reshape(x.shape)
                assert sqnr_db(x.float(), decoded) == pytest.approx(rec["sqnr_db"], abs=0.002), t.name
                assert "sqnr_sample_rows" not in rec, t.name
                assert rec["sqnr_db"] > 20, t.name
            elif rec["dtype_out"] == "BF16":  # protected linear: exact bf16 bits
                assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint16),
                                      x.to(torch.bfloat16).view(torch.int16).numpy().reshape(-1).view(np.uint16))
                assert rec["sqnr_db"] is None
            else:  # norms, biases, embedding: F32, exact
                assert rec["dtype_out"] == "F32"
                assert np.array_equal(np.asarray(t.data).reshape(-1), x.float().numpy().reshape(-1)), t.name


def test_sqnr_above_the_exact_size_is_a_recorded_sample(bf16_source, tmp_path, monkeypatch):
    """Above EXACT_SQNR_ELEMENTS the manifest's SQNR is an estimate from a few rows of every block, and says so;
    the estimate is near the whole tensor's SQNR computed here from the file (gguf-py) and the source."""
    from ideoquant.formats import gguf as gguf_format

    monkeypatch.setattr(gguf_format, "EXACT_SQNR_ELEMENTS", 0)
    m = ideoquant.convert_gguf(str(bf16_source), tmp_path / "o", qtype="q4_k", components=["transformer"])
    src = open_source(str(bf16_source)).components["transformer"]
    reader = gguf.GGUFReader(_file(tmp_path / "o", "transformer", "Q4_K"))
    by_name = {t.name: t for t in reader.tensors}
    quantized = [r for r in m["components"]["transformer"]["tensors"] if r["decision"] == "quantized"]
    assert quantized
    for rec in quantized:
        assert 0 < rec["sqnr_sample_rows"] < rec["shape"][0], rec["name"]
        parts = [src.tensors[n] for n in (rec["sources"] or [rec["name"]])]
        x = torch.cat([p.read() for p in parts]) if len(parts) > 1 else parts[0].read()
        t = by_name[rec["name"]]
        decoded = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).reshape(x.shape)
        assert abs(sqnr_db(x.float(), decoded) - rec["sqnr_db"]) < 3.0, rec["name"]
    for rec in m["components"]["transformer"]["tensors"]:
        if rec["dtype_out"] == "F32":  # exact by construction: nothing sampled
            assert "sqnr_sample_rows" not in rec and rec["sqnr_db"] is None


def test_fused_qkv_and_layout_names(exports):
    orig = {t.name for t in gguf.GGUFReader(_file(exports["q4_k", "original"][0], "transformer", "Q4_K")).tensors}
    diff = {t.name for t in gguf.GGUFReader(_file(exports["q4_k", "diffusers"][0], "transformer", "Q4_K",
                                                   "diffusers")).tensors}
    assert "layers.0.attention.qkv.weight" in orig and "layers.0.attention.o.weight" in orig
    assert "layers.0.attention.to_q.weight" not in orig
    assert {"layers.0.attention.to_q.weight", "layers.0.attention.to_out.0.weight"} <= diff
    r = gguf.GGUFReader(_file(exports["q4_k", "original"][0], "transformer", "Q4_K"))
    qkv = next(t for t in r.tensors if t.name == "layers.0.attention.qkv.weight")
    assert list(qkv.shape) == [256, 768]  # ggml order: ne0 = row length, ne1 = 3 * hidden rows


def test_diffusers_layout_names_and_finders(exports):
    """A diffusers-layout file says so in its name (and the manifest warns); load_pipeline's and eval's finders
    still pick the files up, one variant per folder."""
    from ideoquant.evaluation.variants import resolve_variants
    from ideoquant.load import backbone_path

    folder, m = exports["q4_k", "diffusers"]
    assert sorted(p.name for p in folder.glob("*.gguf")) == [
        "ideogram4-transformer-Q4_K-diffusers.gguf", "ideogram4-unconditional_transformer-Q4_K-diffusers.gguf"]
    assert "wrong images" in m["warnings"][0] and exports["q4_k", "original"][1]["warnings"] == []
    for c in model.COMPONENTS:
        assert backbone_path(folder, c) == _file(folder, c, "Q4_K", "diffusers")
        assert backbone_path(exports["q4_k", "original"][0], c) == _file(exports["q4_k", "original"][0], c, "Q4_K")
    (v,) = resolve_variants([folder])
    assert v.kind == "gguf" and v.paths == {c: str(_file(folder, c, "Q4_K", "diffusers")) for c in model.COMPONENTS}
    (v,) = resolve_variants([_file(folder, "unconditional_transformer", "Q4_K", "diffusers")])
    assert list(v.paths) == ["unconditional_transformer"]


def test_decisions_protected_fallback_and_mixture(exports):
    records = {t["name"]: t for t in exports["q4_k", "original"][1]["components"]["transformer"]["tensors"]}
    assert records["layers.0.feed_forward.w2.weight"]["dtype_out"] == "BF16"
    assert records["final_layer.linear.weight"]["dtype_out"] == "BF16"
    assert records["layers.0.feed_forward.w1.weight"]["dtype_out"] == "Q4_K"
    assert records["embed_image_indicator.weight"]["dtype_out"] == "F32"
    assert records["layers.0.attention_norm1.weight"]["dtype_out"] == "F32"
    # in_channels = 64: K-quants cannot take rows of 64; it falls back, with the reason recorded.
    fallback = records["input_proj.weight"]
    assert fallback["dtype_out"] == "Q8_0" and "not a multiple of 256" in fallback["reason"]
    mix = {t["name"]: t for t in exports["q4_k_m", "original"][1]["components"]["transformer"]["tensors"]}
    assert mix["layers.1.feed_forward.w2.weight"]["dtype_out"] == "Q6_K"
    assert mix["layers.1.attention.qkv.weight"]["dtype_out"] == "Q5_K"
    assert mix["layers.1.attention.o.weight"]["dtype_out"] == "Q4_K"
    assert mix["final_layer.linear.weight"]["dtype_out"] == "BF16"


@pytest.mark.parametrize("qtype", TYPES)
def test_load_transformer_as_close_as_the_files_weights(exports, bf16_source, inputs, qtype):
    """diffusers' GGUF route (load_transformer) is as close to the source as the stock bf16 model holding the file's
    tensors decoded by gguf-py (within 1 dB: diffusers dequantizes into bf16, rounding the scale products), and
    both layouts load the same model."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    for c in model.COMPONENTS:
        path = _file(exports[qtype, "diffusers"][0], c, qtype.upper(), "diffusers")
        q = ideoquant.load_transformer(path)
        assert isinstance(q.layers[0].feed_forward.w1, GGUFLinear)
        decoded = load_reference(bf16_source, c)
        params = dict(decoded.named_parameters())
        for t in gguf.GGUFReader(path).tensors:
            w = np.array(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))
            params[t.name].data.copy_(torch.from_numpy(w).reshape(params[t.name].shape))
        want = velocity(load_reference(bf16_source, c), inputs)
        got = velocity(q, inputs)
        assert sqnr_db(want, got) == pytest.approx(sqnr_db(want, velocity(decoded, inputs)), abs=1.0), (qtype, c)
        original = ideoquant.load_transformer(_file(exports[qtype, "original"][0], c, qtype.upper()))
        assert torch.equal(velocity(original, inputs), got), (qtype, c)


def test_type_rule_overrides(bf16_source, tmp_path):
    m = ideoquant.convert_gguf(str(bf16_source), tmp_path / "o", qtype="q4_k", components=["transformer"],
                               type_rules=[r"attention\.o\.weight$=q8_0", r"adaln_modulation=Q6_K"])
    records = {t["name"]: t for t in m["components"]["transformer"]["tensors"]}
    assert records["layers.0.attention.o.weight"]["dtype_out"] == "Q8_0"
    assert records["layers.1.adaln_modulation.weight"]["dtype_out"] == "Q6_K"
    assert records["layers.1.adaln_modulation.bias"]["dtype_out"] == "F32"  # rules apply to linear weights only
    assert records["layers.1.feed_forward.w1.weight"]["dtype_out"] == "Q4_K"


def test_fp8_source_to_gguf(fp8_source, tmp_path):
    m = ideoquant.convert_gguf(str(fp8_source), tmp_path / "o", qtype="q8_0", components=["transformer"])
    comp = open_source(str(fp8_source)).components["transformer"]
    r = gguf.GGUFReader(tmp_path / "o" / "ideogram4-transformer-Q8_0.gguf")
    t = next(t for t in r.tensors if t.name == "layers.0.feed_forward.w1.weight")
    expected = gguf.quants.quantize(comp.tensors["layers.0.feed_forward.w1.weight"].read().numpy(),
                                    gguf.GGMLQuantizationType.Q8_0)  # gguf-py's encoder, independent of ideoquant's
    assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected)
    assert m["components"]["transformer"]["weight_sqnr_db_min"] > 35


def test_fp8_rows_to_q8_0_in_cache_sized_slices():
    """The GGUF route's FP8 read with Q8_0 encoded slice by slice in the same call: the float32 rows are those of
    the plain dequantization, the bytes gguf-py's Q8_0 of them, over several slices and a partial last one; a NaN
    code in a later slice still names the tensor."""
    from ideoquant.encode import fp8_q8_0
    from ideoquant.encode.fp8 import dequantize_fp8r

    cols = 4096
    rows = 2 * (fp8_q8_0.SLICE_ELEMENTS // cols) + 3
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E
    codes[1] = 0  # an all-zero row
    codes[2, :32] = 1
    weights = codes.view(torch.float8_e4m3fn)
    scale = torch.exp(torch.randn(rows, generator=g) * 4).to(torch.float32)
    scale[2] = 1e-36  # row 2's first block is the smallest subnormal: d is a float32 subnormal, 1/d overflows
    plain = dequantize_fp8r(weights, scale)
    q8_0 = np.empty((rows, cols // 32 * 34), np.uint8)
    fused = dequantize_fp8r(weights, scale, torch.empty(rows, cols), "w", q8_0=q8_0)
    assert torch.equal(fused.view(torch.int32), plain.view(torch.int32))
    with np.errstate(all="ignore"):  # gguf-py's 1/d of row 2's first block
        want = gguf.quants.quantize(plain.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(q8_0, want)
    codes[-1, 7] = 0xFF
    with pytest.raises(ideoquant.IdeoquantError, match="tensor w contains NaN or Inf"):
        dequantize_fp8r(codes.view(torch.float8_e4m3fn), scale, torch.empty(rows, cols), "w", q8_0=q8_0)


def test_dequantize_round_trip():
    x = np.random.default_rng(0).normal(0, 0.02, (4, 512)).astype(np.float32)
    for qtype, floor in (("Q8_0", 40), ("Q6_K", 28), ("Q5_K", 22), ("Q4_K", 16)):
        assert sqnr_db(torch.from_numpy(x), torch.from_numpy(dequantize(quantize(x, qtype), qtype))) > floor
