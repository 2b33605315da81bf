"""INT8 W8A8: bit-identical to diffusers + torchao, loadable by stock diffusers, close to the source."""

import json
from pathlib import Path

import math

import pytest
import torch
from diffusers import Ideogram4Transformer2DModel, TorchAoConfig
from safetensors import safe_open

import ideoquant
from ideoquant import model, testing
from ideoquant.encode import int8
from ideoquant.metrics import sqnr_db
from ideoquant.evaluation.runner import velocity


@pytest.fixture(scope="module")
def int8_out(bf16_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "out"
    m = ideoquant.convert(str(bf16_source), out, max_shard_size="1MB")
    return out, m


@pytest.fixture(scope="module")
def stock_out(bf16_source, int8_out, tmp_path_factory):
    """The stock route: diffusers + torchao quantize at load, then save_pretrained, with the same protected modules."""
    out = tmp_path_factory.mktemp("stock")
    for c in model.COMPONENTS:
        protected = int8_out[1]["components"][c]["protected_modules"]
        q = Ideogram4Transformer2DModel.from_pretrained(
            bf16_source, subfolder=c, torch_dtype=torch.bfloat16,
            quantization_config=TorchAoConfig(int8.config(), modules_to_not_convert=protected))
        q.save_pretrained(out / c, max_shard_size="1MB")
    return out


def _tensors_and_metadata(folder):
    tensors, metadata = {}, {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            md = h.metadata()
            names = json.loads(md["tensor_names"])
            metadata[f.name] = md
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return tensors, metadata, names


@pytest.mark.parametrize("component", model.COMPONENTS)
def test_bytes_and_metadata_identical_to_diffusers_torchao(int8_out, stock_out, component):
    ours, our_md, our_names = _tensors_and_metadata(int8_out[0] / component)
    stock, stock_md, stock_names = _tensors_and_metadata(stock_out / component)
    assert ours.keys() == stock.keys()
    for k in stock:
        assert ours[k].dtype == stock[k].dtype and torch.equal(ours[k], stock[k]), k
    assert sum(k.endswith("._weight_qdata") for k in ours) == 20  # 2 layers x 8 linears + 4 non-block, minus protected
    assert set(our_names) == set(stock_names)
    # Every shard carries the complete torchao metadata (diffusers merges shards with dict.update).
    reference = next(iter(stock_md.values()))
    for md in our_md.values():
        assert set(json.loads(md["tensor_names"])) == set(our_names)
        assert md["format"] == "pt"
        for name in our_names:
            assert md[name] == reference[name], name
    ours_cfg = json.loads((int8_out[0] / component / "config.json").read_text())
    stock_cfg = json.loads((stock_out / component / "config.json").read_text())
    assert ours_cfg["quantization_config"] == stock_cfg["quantization_config"]


@pytest.mark.parametrize("component", model.COMPONENTS)
def test_stock_diffusers_loads_and_computes_as_torchao(int8_out, bf16_source, inputs, component):
    q = Ideogram4Transformer2DModel.from_pretrained(int8_out[0], subfolder=component, torch_dtype=torch.bfloat16)
    weights = dict(q.named_parameters())
    assert type(weights["layers.0.feed_forward.w1.weight"]).__name__ == "Int8Tensor"
    assert type(weights["layers.0.feed_forward.w2.weight"]).__name__ == "Parameter"
    # torchao's own route, quantizing the source at load (stock diffusers + TorchAoConfig), computes the same
    stock = Ideogram4Transformer2DModel.from_pretrained(
        bf16_source, subfolder=component, torch_dtype=torch.bfloat16,
        quantization_config=TorchAoConfig(int8.config(),
                                          modules_to_not_convert=int8_out[1]["components"][component]["protected_modules"]))
    assert torch.equal(velocity(q, inputs), velocity(stock, inputs))


def test_protected_tensors_bit_identical_to_source(int8_out, bf16_source):
    out, m = int8_out
    for c in model.COMPONENTS:
        src = {}
        for f in (bf16_source / c).glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                src.update({k: h.get_tensor(k) for k in h.keys()})
        ours = {}
        for f in (out / c).glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                ours.update({k: h.get_tensor(k) for k in h.keys()})
        kept = [t for t in m["components"][c]["tensors"] if t["decision"] == "kept"]
        assert any(t["name"] == "layers.1.feed_forward.w2.weight" for t in kept)
        for t in kept:
            assert torch.equal(ours[t["name"]], src[t["name"]]), t["name"]
            assert t["sqnr_db"] is None  # exact


def test_manifest_records_everything(int8_out, bf16_source):
    out, _ = int8_out
    m = json.loads((out / "ideoquant.json").read_text())  # what verify and upload read: the file, not the dict
    assert m["kind"] == "int8" and m["recipe"]["name"] == "int8-w8a8"
    assert m["tool"]["torchao"] and m["tool"]["diffusers"]
    assert m["source"]["kind"] == "folder" and m["source"]["files"]
    import hashlib
    for rel, info in m["source"]["files"].items():
        data = (bf16_source / rel).read_bytes()
        assert len(data) == info["size"] and hashlib.sha256(data).hexdigest() == info["sha256"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"ideoquant.json"}
    assert files == set(m["files"])
    for rel, info in m["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == info["sha256"]
    t = {r["name"]: r for r in m["components"]["transformer"]["tensors"]}
    w1 = t["layers.0.feed_forward.w1.weight"]
    assert w1["decision"] == "quantized" and w1["dtype_in"] == "BF16" and w1["dtype_out"] == "int8"
    assert w1["bytes_out"] < w1["bytes_in"]
    # The recorded error is the stored weight's: dequantize torchao's int8 and scale from the file, against the source.
    stored = {}
    for f in (out / "transformer").glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            stored.update({k: h.get_tensor(k) for k in h.keys() if k.startswith("layers.0.feed_forward.w1.")})
    source = {}
    for f in (bf16_source / "transformer").glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            if "layers.0.feed_forward.w1.weight" in h.keys():
                source = h.get_tensor("layers.0.feed_forward.w1.weight").float()
    qdata, scale = (stored[f"layers.0.feed_forward.w1._weight_{k}"].float() for k in ("qdata", "scale"))
    approx = qdata * scale.reshape(-1, 1)
    assert sqnr_db(source, approx) == pytest.approx(w1["sqnr_db"], abs=0.01)
    assert t["layers.0.feed_forward.w2.weight"]["reason"].startswith("protected by recipe pattern")
    assert "not a linear weight" in t["embed_image_indicator.weight"]["reason"]


def test_fp8_source(fp8_source, bf16_source, inputs, tmp_path):
    """From the FP8 release: what torchao's own `quantize_` makes of the release's weights as diffusers dequantizes
    them (float32, `dequantize_fp8r`), tensor for tensor and in the forward pass."""
    from diffusers.quantizers.bfl.utils import dequantize_fp8r
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    m = ideoquant.convert(str(fp8_source), tmp_path / "out")
    assert m["components"]["transformer"]["source_format"] == "fp8-per-row"
    q = Ideogram4Transformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer",
                                                    torch_dtype=torch.bfloat16)
    # The release's tensors read with safetensors, FP8 weights dequantized by diffusers, under diffusers' names.
    weights = {}
    for f in (fp8_source / "transformer").glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                if k.endswith(".weight_scale"):
                    continue
                t = h.get_tensor(k)
                if t.dtype == torch.float8_e4m3fn:
                    t = dequantize_fp8r(t, h.get_tensor(f"{k}_scale"))
                parts = model.original_to_diffusers(k)
                rows = t.shape[0] // len(parts)  # per-row scales: a fused weight's row blocks are its parts
                weights.update({name: t[i * rows : (i + 1) * rows] for name, i in parts})
    protected = set(json.loads((tmp_path / "out/transformer/config.json").read_text())
                    ["quantization_config"]["modules_to_not_convert"])
    assert "layers.0.feed_forward.w2" in protected and "layers.0.feed_forward.w1" not in protected
    # The same model (from_pretrained: the rotary buffer stays float32), the quantized linears' weights in float32.
    ref = Ideogram4Transformer2DModel.from_pretrained(bf16_source, subfolder="transformer", torch_dtype=torch.bfloat16)
    ref.load_state_dict(weights, strict=True)
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and name not in protected:
            mod.weight = torch.nn.Parameter(weights[f"{name}.weight"], requires_grad=False)
    quantize_(ref, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and name not in protected)
    ours, theirs = dict(q.named_parameters()), dict(ref.named_parameters())
    quantized = [k for k, v in theirs.items() if type(v).__name__ == "Int8Tensor"]
    assert "layers.0.feed_forward.w1.weight" in quantized
    for k in quantized:
        assert type(ours[k]).__name__ == "Int8Tensor", k
        assert torch.equal(ours[k].qdata, theirs[k].qdata) and torch.equal(ours[k].scale, theirs[k].scale), k
    assert torch.equal(velocity(q, inputs), velocity(ref, inputs))


def test_original_layout_single_file_gives_same_weights(original_source, int8_out, tmp_path):
    m = ideoquant.convert(str(original_source), tmp_path / "out")
    assert m["components"]["transformer"]["source_layout"] == "original"
    for c in model.COMPONENTS:
        ours, _, _ = _tensors_and_metadata(tmp_path / "out" / c)
        ref, _, _ = _tensors_and_metadata(int8_out[0] / c)
        assert ours.keys() == ref.keys()
        assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_components_option_and_safe_recipe(bf16_source, tmp_path):
    m = ideoquant.convert(str(bf16_source), tmp_path / "out", recipe="int8-w8a8-safe", components=["transformer"])
    assert list(m["components"]) == ["transformer"]
    assert not (tmp_path / "out" / "unconditional_transformer").exists()
    protected = m["components"]["transformer"]["protected_modules"]
    assert "layers.0.adaln_modulation" in protected and "final_layer.adaln_modulation" in protected
    cfg = json.loads((tmp_path / "out/transformer/config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == protected


def test_pipeline_quantization_config_matches_recipe():
    from diffusers import PipelineQuantizationConfig

    cfg = ideoquant.pipeline_quantization_config("int8-w8a8")
    assert isinstance(cfg, PipelineQuantizationConfig)
    assert set(cfg.quant_mapping) == set(model.COMPONENTS)
    protected = cfg.quant_mapping["transformer"].modules_to_not_convert
    assert len(protected) == 35 and "layers.33.feed_forward.w2" in protected and "final_layer.linear" in protected
    tiny = ideoquant.pipeline_quantization_config("int8-w8a8", config=testing.TINY_CONFIG)
    assert tiny.quant_mapping["transformer"].modules_to_not_convert == [
        "final_layer.linear", "layers.0.feed_forward.w2", "layers.1.feed_forward.w2"]


def test_load_pipeline_passes_both_quantized_backbones(int8_out, monkeypatch):
    """load_pipeline builds the pipeline from the base repo with both backbones taken from the quantized folder."""
    import diffusers

    seen = {}

    def fake_from_pretrained(base, **kwargs):
        seen.update(kwargs, base=base)
        return "pipeline"

    monkeypatch.setattr(diffusers.Ideogram4Pipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    assert ideoquant.load_pipeline(int8_out[0], base="ideogram-ai/ideogram-4-fp8") == "pipeline"
    assert seen["base"] == "ideogram-ai/ideogram-4-fp8" and seen["torch_dtype"] == torch.bfloat16
    for c in model.COMPONENTS:
        w = seen[c].layers[0].feed_forward.w1.weight
        assert type(w).__name__ == "Int8Tensor"
    with pytest.raises(ideoquant.IdeoquantError, match="holds no"):
        ideoquant.load_pipeline(int8_out[0] / "transformer")


@pytest.mark.parametrize("case", ["gaussian", "zeros", "tiny", "negative", "positive", "outliers", "fp32", "fp16",
                                  "bf16_every_absmax", "fp16_every_absmax", "fp32_subnormal"])
def test_encoder_bits_equal_torchao(case):
    """ideoquant's int8 encoders (the compiled CPU kernel, and the torch ops `--device cuda` runs) against torchao's
    own function, on the edge cases that matter."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1024, generator=g) * 0.02
    if case == "zeros":
        x = torch.zeros(4, 256)
    elif case == "tiny":
        x = x * 1e-30
    elif case == "negative":
        x = -x.abs()
    elif case == "positive":
        x = x.abs()
    elif case == "outliers":
        x[:, :4] *= 1000
    elif case == "bf16_every_absmax":
        # one row per positive finite bf16 value as the row's absmax (both signs): every rounding of absmax/127.5
        values = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
        x = torch.rand(values.numel(), 64, generator=g) * values[:, None]
        x[:, 0] = values
        x = torch.cat([x, -x])
    elif case == "fp16_every_absmax":  # including fp16 subnormals, whose scales round on the subnormal grid
        values = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
        x = torch.rand(values.numel(), 16, generator=g) * values[:, None]
        x[:, 0] = values
        x = torch.cat([x, -x])
    elif case == "fp32_subnormal":
        x = x * 1e-38
    dtype = {"fp32": torch.float32, "fp32_subnormal": torch.float32, "fp16": torch.float16,
             "fp16_every_absmax": torch.float16}.get(case, torch.bfloat16)
    x = x.to(dtype)
    q, s, z, signal, noise = int8.quantize(x)
    rq, rs, rz = int8.reference_quantize(x)
    assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(z, rz)
    tq, ts, tz, tsignal, tnoise = int8._quantize_torch(x)
    assert torch.equal(tq, rq) and torch.equal(ts, rs) and torch.equal(tz, rz)
    assert signal == pytest.approx(tsignal, rel=1e-5) and noise == pytest.approx(tnoise, rel=1e-4, abs=1e-30)
    if case == "gaussian":
        from ideoquant.metrics import sqnr_db
        import math
        assert abs(10 * math.log10(signal / noise) - sqnr_db(x, int8.dequantize(rq, rs))) < 1e-3


def test_hf_cache_snapshot_source_hashes_from_blob_names(bf16_source, tmp_path, monkeypatch):
    """A source inside a Hugging Face cache snapshot: weights link to blobs/<sha256>, so they are not re-hashed."""
    import hashlib


    snapshot = tmp_path / "models--org--ideogram" / "snapshots" / ("c" * 40)
    blobs = tmp_path / "models--org--ideogram" / "blobs"
    blobs.mkdir(parents=True)
    for f in sorted(p for p in bf16_source.rglob("*") if p.is_file()):
        data = f.read_bytes()
        lfs = f.suffix == ".safetensors"  # the Hub stores weights in LFS (sha256 blob names), configs in git (sha1)
        blob = blobs / (hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest())
        blob.write_bytes(data)
        link = snapshot / f.relative_to(bf16_source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    hashed = []
    from ideoquant.write import hashing

    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p, *a: (hashed.append(Path(p).name), real(p, *a))[1])
    m = ideoquant.convert(str(snapshot), tmp_path / "out", components=["transformer"])
    assert hashed and not any(h.endswith(".safetensors") for h in hashed)  # only the small git files were read
    for rel, info in m["source"]["files"].items():
        assert hashlib.sha256((bf16_source / rel).read_bytes()).hexdigest() == info["sha256"]


def test_fp8_dequantization_is_diffusers_own():
    """ideoquant's in-place FP8 per-row dequantization gives diffusers' `dequantize_fp8r` bits, every FP8 value."""
    from diffusers.quantizers.bfl.utils import dequantize_fp8r as diffusers_dequantize

    from ideoquant.encode.fp8 import dequantize_fp8r

    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)  # NaN included
    w = every.repeat(7, 1)
    scale = torch.tensor([1.0, 0.5, 3e-3, 1e-7, 2.5e4, 7.1, -0.3], dtype=torch.float32)
    ours = dequantize_fp8r(w, scale, torch.empty(7, 256))
    ref = diffusers_dequantize(w, scale)
    assert ours.dtype == ref.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


def test_fp8_kept_as_bf16_is_diffusers_dequantization_rounded_by_torch():
    """A protected FP8 weight goes to bf16 in one pass: the bits of diffusers' `dequantize_fp8r` converted by torch
    (`.to(torch.bfloat16)`), every e4m3fn code under scales that round up, down, to even and past bf16's range;
    the energies are those of the float64 difference; a NaN code or an overflow names the tensor."""
    from diffusers.quantizers.bfl.utils import dequantize_fp8r as diffusers_dequantize

    from ideoquant.encode.fp8 import fp8r_to_bf16

    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = every[(every & 0x7F) != 0x7F].view(torch.float8_e4m3fn).repeat(6, 1)
    scale = torch.tensor([1.0, 1.00390625, 1.0 + 3 * 2**-9, 3e-3, -0.3, 1e-30], dtype=torch.float32)
    out = torch.empty(codes.shape, dtype=torch.bfloat16)
    signal, noise = fp8r_to_bf16(codes, scale, out, "w")
    ref = diffusers_dequantize(codes, scale)
    assert torch.equal(out.view(torch.int16), ref.to(torch.bfloat16).view(torch.int16))
    exact = ref.double()
    assert signal == pytest.approx(float((exact ** 2).sum()), rel=1e-5)
    assert noise == pytest.approx(float(((exact - out.double()) ** 2).sum()), rel=1e-5) and noise > 0
    for bad_codes, bad_scale in ((every.view(torch.float8_e4m3fn)[None], torch.ones(1)),  # 0x7F, 0xFF: NaN
                                 (codes[:1], torch.tensor([1e38]))):  # 448 * 1e38 overflows float32
        with pytest.raises(ideoquant.IdeoquantError, match="tensor w contains NaN or Inf"):
            fp8r_to_bf16(bad_codes, bad_scale, torch.empty(bad_codes.shape, dtype=torch.bfloat16), "w")


def test_fp8_encoder_equals_torchao_on_diffusers_dequantized_weight():
    """The fused FP8 path (codes -> float32 -> int8 in one pass) gives what torchao gives for diffusers' dequantized
    float32 weight: every e4m3fn code, positive, negative, tiny and huge row scales."""
    from diffusers.quantizers.bfl.utils import dequantize_fp8r as diffusers_dequantize

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (8, 512), generator=g, dtype=torch.int32).to(torch.uint8)
    codes[codes & 0x7F == 0x7F] = 0  # NaN codes are checked below
    codes[0, :256] = torch.arange(256).to(torch.uint8)
    codes[0, 0x7F] = codes[0, 0xFF] = 0
    codes[5] = 0  # an all-zero row: scale clamps at eps
    weights = codes.view(torch.float8_e4m3fn)
    scale = torch.tensor([1.0, 0.5, 3e-3, 1e-30, 2.5e4, 7.1, -0.3, 1e-7], dtype=torch.float32)
    q, s, z, signal, noise = int8.quantize_fp8(weights, scale)
    rq, rs, rz = int8.reference_quantize(diffusers_dequantize(weights, scale))
    assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(z, rz)
    tq, ts, tz, tsignal, tnoise = int8._quantize_torch(diffusers_dequantize(weights, scale))
    assert signal == pytest.approx(tsignal, rel=1e-5) and noise == pytest.approx(tnoise, rel=1e-4)
    codes[3, 100] = 0x7F  # NaN: the row's scale, and so the signal, is not finite
    q, s, z, signal, noise = int8.quantize_fp8(codes.view(torch.float8_e4m3fn), scale)
    assert not math.isfinite(signal) and not torch.isfinite(s[3]).item() and torch.isfinite(s[:3]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_non_finite_check_every_float_dtype(dtype):
    from ideoquant.encode.finite import check_finite as _check_finite

    x = torch.randn(16, 33).to(dtype)
    x[3, 3] = torch.finfo(dtype).max  # the largest finite value is fine
    _check_finite("w", x)
    _check_finite("w", x[:, 1:])  # a non-contiguous view
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[7, 30] = bad
        with pytest.raises(ideoquant.IdeoquantError, match="tensor w contains NaN or Inf"):
            _check_finite("w", y)


def test_kernels_compile_where_numba_cannot_cache():
    """numba refuses `cache=True` for code it has nowhere to cache (here: a function with no source file, as for a
    read-only install without a writable cache folder); the kernels then compile per process instead."""
    import numba

    from ideoquant.encode import kernels

    namespace = {}
    exec("def double(x):\n    return 2 * x\n", namespace)
    with pytest.raises(RuntimeError, match="cannot cache"):
        numba.njit(cache=True)(namespace["double"])
    assert kernels._jit(namespace["double"])(21) == 42
