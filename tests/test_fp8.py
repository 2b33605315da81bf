"""FP8 W8A8 (`fp8-w8a8`): torchao Float8Tensor per row, loadable by stock diffusers; from the FP8 release the weights
are the release's own bytes, from bf16 they are torchao's own."""

import json

import pytest
import torch
from diffusers import Ideogram4Transformer2DModel, TorchAoConfig
from safetensors import safe_open

import ideoquant
from ideoquant import formats, model
from ideoquant.evaluation.runner import velocity
from ideoquant.metrics import sqnr_db
from tests.conftest import load_reference
from tests.torchao_files import bits, stored

# e4m3 keeps 3 mantissa bits: a round-off of at most 2^-4 of each value, weights and activations both; an end-to-end
# velocity SQNR of 25 dB leaves room for both and is far above what a wrong scale or row order gives (< 5 dB).
FP8_FORWARD_FLOOR_DB = 25.0


@pytest.fixture(scope="module")
def fp8_out(fp8_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8w8a8") / "from-release"
    return out, ideoquant.convert(str(fp8_source), out, recipe="fp8-w8a8")


@pytest.fixture(scope="module")
def bf16_fp8_out(bf16_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8w8a8") / "from-bf16"
    return out, ideoquant.convert(str(bf16_source), out, recipe="fp8-w8a8", max_shard_size="1MB")




@pytest.fixture
def torchao_on_cpu(monkeypatch):
    """torchao's `quantize_` refuses FP8 configs without an FP8-capable GPU; the weight math it runs is plain torch
    on any device, so the reference lifts only that check."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


@pytest.mark.parametrize("component", model.COMPONENTS)
def test_release_bytes_carried_over_unchanged(fp8_out, fp8_source, component):
    """Every quantized weight's qdata and scale are the release's e4m3 bytes and float32 scales (fused qkv split into
    its q, k, v row blocks), and stock diffusers loads them as Float8Tensors."""
    out, m = fp8_out
    release = {}
    for f in (fp8_source / component).glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            release.update({k: h.get_tensor(k) for k in h.keys()})
    q = Ideogram4Transformer2DModel.from_pretrained(out, subfolder=component, torch_dtype=torch.bfloat16)
    params = dict(q.named_parameters())
    from diffusers.quantizers.bfl.utils import dequantize_fp8r

    tensors = m["components"][component]["tensors"]
    quantized = {t["name"] for t in tensors if t["decision"] == "quantized"}
    checked = kept = 0
    for key, codes in release.items():
        if not key.endswith(".weight") or f"{key}_scale" not in release:
            continue
        scale = release[f"{key}_scale"]
        parts = model.original_to_diffusers(key)
        rows = codes.shape[0] // len(parts)
        for name, i in parts:
            w = params[name]
            block = slice(i * rows, (i + 1) * rows)
            if name in quantized:
                assert type(w).__name__ == "Float8Tensor", name
                assert torch.equal(bits(w.qdata), bits(codes[block])), name
                assert torch.equal(w.scale, scale[block].float().reshape(-1, 1)), name
                checked += 1
            else:  # protected: the release's weight dequantized (diffusers' own FP8 rule), in bf16
                assert torch.equal(w.data, dequantize_fp8r(codes[block], scale[block]).to(torch.bfloat16)), name
                kept += 1
    assert checked == len(quantized) > 0 and kept == len(m["components"][component]["protected_modules"]) > 0
    # Nothing was re-quantized: the manifest says so, and the card too.
    assert all(t["sqnr_db"] is None for t in tensors if t["decision"] == "quantized")
    from ideoquant.publish.card import model_card

    card = model_card(m, "someone/ideogram4-fp8-w8a8")
    assert "Ada" in card and "Hopper" in card and "bit for bit" in card
    assert "Ideogram4Transformer2DModel.from_pretrained" in card


@pytest.mark.parametrize("component", model.COMPONENTS)
def test_bf16_source_equals_torchao_quantize(bf16_fp8_out, bf16_source, inputs, component, torchao_on_cpu):
    """From bf16: the tensors and their torchao metadata are those of torchao's own `quantize_` with
    Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) on the same weights (diffusers' TorchAoConfig
    route, the recipe's protected modules excluded), and the forward passes agree exactly."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    out, m = bf16_fp8_out
    protected = m["components"][component]["protected_modules"]
    ref = Ideogram4Transformer2DModel.from_pretrained(
        bf16_source, subfolder=component, torch_dtype=torch.bfloat16,
        quantization_config=TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                                          modules_to_not_convert=protected))
    stock = out.parent / f"stock-{component}"
    ref.save_pretrained(stock)
    ours, ours_meta = stored(out / component)
    theirs, theirs_meta = stored(stock)
    assert ours.keys() == theirs.keys()
    assert any(k.endswith("._weight_qdata") for k in ours)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(bits(ours[k]), bits(theirs[k])), k
    names = json.loads(theirs_meta["tensor_names"])
    assert sorted(json.loads(ours_meta["tensor_names"])) == sorted(names)
    for n in names:
        assert json.loads(ours_meta[n]) == json.loads(theirs_meta[n]), n
    config = json.loads((out / component / "config.json").read_text())["quantization_config"]
    assert config == json.loads((stock / "config.json").read_text())["quantization_config"]

    loaded = Ideogram4Transformer2DModel.from_pretrained(out, subfolder=component, torch_dtype=torch.bfloat16)
    assert torch.equal(velocity(loaded, inputs), velocity(ref, inputs))


@pytest.mark.parametrize("source", ["release", "bf16"])
def test_forward_on_cpu_matches_source(fp8_out, bf16_fp8_out, fp8_source, bf16_source, inputs, source):
    """torchao's FP8 linear (per-token e4m3 activations) runs on the CPU: the loaded model's velocity against the
    source's (for the release: its FP8 weights dequantized, w = fp8 * scale)."""
    out = (fp8_out if source == "release" else bf16_fp8_out)[0]
    q = Ideogram4Transformer2DModel.from_pretrained(out, subfolder="transformer", torch_dtype=torch.bfloat16)
    ref = load_reference(bf16_source)
    if source == "release":
        from diffusers.quantizers.bfl.utils import dequantize_fp8r

        release = {}
        with safe_open(fp8_source / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as h:
            release.update({k: h.get_tensor(k) for k in h.keys()})
        state = {}
        for key, t in release.items():
            if key.endswith(".weight_scale"):
                continue
            if f"{key}_scale" in release:
                t = dequantize_fp8r(t, release[f"{key}_scale"]).to(torch.bfloat16)
            parts = model.original_to_diffusers(key)
            rows = t.shape[0] // len(parts)
            state.update({name: t[i * rows:(i + 1) * rows] for name, i in parts})
        ref.load_state_dict(state)
    sq = sqnr_db(velocity(ref, inputs), velocity(q, inputs))
    assert sq > FP8_FORWARD_FLOOR_DB, sq


def test_verify_inspect_and_registry(fp8_out, bf16_source):
    out, m = fp8_out
    assert m["kind"] == "float8" and ideoquant.verify(out).ok
    found = formats.recognise(out)
    assert [(f.name, sorted(r.paths)) for f, r in found] == [("float8", sorted(model.COMPONENTS))]
    assert type(ideoquant.load_transformer(out / "transformer").layers[0].attention.to_q.weight).__name__ \
        == "Float8Tensor"
    # The fit table knows the format: one e4m3 byte per quantized weight plus a float32 scale per row.
    report = ideoquant.inspect(str(bf16_source), recipe="fp8-w8a8", vram_gb=24)
    rows = {r["type"]: r for r in report["fit"]["types"]}
    assert rows["fp8-w8a8"]["format"] == "float8"
    linear = sum(t["shape"][0] * t["shape"][1] + t["shape"][0] * 4 for c in m["components"].values()
                 for t in c["tensors"] if t["decision"] == "quantized")
    kept = sum(2 * torch.Size(t["shape"]).numel() for c in m["components"].values() for t in c["tensors"]
               if t["decision"] == "kept")
    assert report["gpu"]["weights_gib"] == pytest.approx((linear + kept) / (1 << 30), abs=1e-3)


def test_bad_options_refused(bf16_source, tmp_path):
    with pytest.raises(ideoquant.IdeoquantError, match="smoothquant"):
        ideoquant.convert(str(bf16_source), tmp_path / "x", recipe="fp8-w8a8", smoothquant=tmp_path / "s")
    with pytest.raises(ideoquant.IdeoquantError, match="no option qtype"):
        ideoquant.convert(str(bf16_source), tmp_path / "x", recipe="fp8-w8a8", qtype="q4_k")
    assert not (tmp_path / "x").exists()


def test_eval_reports_fp8_next_to_int8(bf16_fp8_out, bf16_source, tmp_path):
    """`eval` recognises the FP8 output by itself and measures it beside INT8 on the same inputs; with the inputs
    the model zeroes (text positions of input_proj), quantizing input_proj would give NaN: the recipe keeps it."""
    from ideoquant.evaluation.evaluate import evaluate

    int8 = tmp_path / "int8"
    ideoquant.convert(str(bf16_source), int8)
    rep = evaluate(str(bf16_source), [int8, bf16_fp8_out[0]], baselines=(), steps=1, tokens=8, grid=4)
    kinds = {v["kind"]: v["guided"]["sqnr_db"] for v in rep["variants"]}
    assert set(kinds) == {"int8", "float8"} and all(s > FP8_FORWARD_FLOOR_DB for s in kinds.values()), kinds
    assert "input_proj" in bf16_fp8_out[1]["components"]["transformer"]["protected_modules"]


def test_sensitivity_finds_the_zero_row_linears(bf16_source):
    """Measured one linear at a time through torchao's own FP8 linear: input_proj and llm_cond_proj (whose inputs
    the model zeroes at the other modality's positions) give a NaN velocity, ranked most fragile; the recipe keeps
    both."""
    from ideoquant.evaluation.sensitivity import select, sensitivity

    rep = sensitivity(str(bf16_source), "fp8-w8a8", components=["transformer"], steps=1, tokens=8, grid=4)
    broken = {u["unit"] for u in rep["units"] if u["non_finite"]}
    assert {"input_proj", "llm_cond_proj"} <= broken, broken
    assert {u["unit"] for u in rep["units"][:len(broken)]} == broken
    assert all(u["protected_by_recipe"] for u in rep["units"] if u["unit"] in ("input_proj", "llm_cond_proj"))
    assert all(u["sqnr_db_min"] > FP8_FORWARD_FLOOR_DB for u in rep["units"] if not u["non_finite"])
    assert select(rep, protect_top=1)[0]["unit"] not in ("input_proj", "llm_cond_proj")  # protected already
