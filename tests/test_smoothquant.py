"""SmoothQuant: calibrate -> convert --smoothquant. Bit for bit what torchao's SmoothQuantConfig makes, loadable by
stock diffusers, and better than plain W8A8 on a model with activation outlier channels."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import ideoquant
from ideoquant import model, testing
from ideoquant.cli import app
from ideoquant.encode import int8
from ideoquant.errors import IdeoquantError
from ideoquant.evaluation.evaluate import evaluate
from ideoquant.evaluation.inputs import sample_calls
from ideoquant.evaluation.runner import velocities
from ideoquant.formats import load_recipe
from ideoquant.encode.smoothing import smoothing_factor
from ideoquant.evaluation.calibrate import calibrate, quantized_modules
from ideoquant.formats.smoothquant import KEY_STATS, Statistics
from ideoquant.source import open_source
from tests.conftest import load_reference

SAMPLE = dict(steps=2, tokens=8, grid=4, batch=2)
OUTLIER = 100.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def outlier_source(tmp_path_factory):
    return testing.build_outlier_checkpoint(tmp_path_factory.mktemp("outliers") / "src", OUTLIER)


@pytest.fixture(scope="module")
def calls():
    return sample_calls(testing.TINY_CONFIG, **SAMPLE)


@pytest.fixture(scope="module")
def smoothed(outlier_source, calls, tmp_path_factory):
    root = tmp_path_factory.mktemp("sq")
    info = calibrate(str(outlier_source), root / "stats.safetensors", inputs=calls)
    plain = ideoquant.convert(str(outlier_source), root / "plain")
    sq = ideoquant.convert(str(outlier_source), root / "sq", smoothquant=root / "stats.safetensors", alpha=0.5)
    return root, info, plain, sq


def test_statistics_file(smoothed, outlier_source):
    root, info, _, _ = smoothed
    stats = Statistics.load(root / "stats.safetensors")
    comp = open_source(str(outlier_source)).components["transformer"]
    mods = quantized_modules(comp, load_recipe("int8-w8a8"))
    assert len(mods) == 20 and set(stats.absmax) == set(model.COMPONENTS)
    assert sorted(stats.absmax["transformer"]) == sorted(mods)  # every linear the recipe quantizes, nothing else
    assert stats.absmax["transformer"]["layers.0.attention.to_q"].shape == (256,)
    assert stats.absmax["transformer"]["layers.0.attention.to_q"].dtype == torch.float32
    p = stats.provenance
    assert p["source"]["path"] == str(outlier_source) and p["recipe"] == "int8-w8a8"
    assert p["inputs"]["kind"] == "sample" and p["inputs"]["steps"] == 2
    assert p["count"]["transformer"] == {"calls": 2, "rows": 2 * 2 * (8 + 16)}  # calls x batch x tokens
    assert "layers.0.feed_forward.w2" in p["protected"]["transformer"]
    with safe_open(root / "stats.safetensors", "pt") as f:
        assert json.loads(f.metadata()[KEY_STATS]) == p
    # The injected outlier channels are what calibration sees as the largest inputs of q/k/v and w1/w3.
    x = stats.absmax["transformer"]["layers.1.feed_forward.w1"]
    assert set(x.topk(4).indices.tolist()) == {3, 77, 150, 201}
    assert info["components"]["transformer"]["outlier_ratio"]


@pytest.mark.parametrize("component", model.COMPONENTS)
def test_bit_identical_to_torchao_smoothquant(smoothed, outlier_source, calls, component):
    """torchao's own flow on an in-memory model: quantize_(SmoothQuantConfig(PREPARE, running absmax)), the same
    calls, quantize_(CONVERT). Its observers must see the same absmax, and its Int8Tensors must equal ours."""
    from diffusers import Ideogram4Transformer2DModel
    from torchao.prototype.smoothquant import SmoothQuantConfig
    from torchao.quantization import quantize_

    root = smoothed[0]
    stats = Statistics.load(root / "stats.safetensors").absmax[component]
    ref = load_reference(outlier_source, component)
    mods = set(stats)
    only = lambda mod, fqn: fqn in mods  # noqa: E731  the recipe's quantized linears (w2, final_layer.linear stay bf16)
    quantize_(ref, SmoothQuantConfig(int8.config(), step="prepare", alpha=0.5, use_running_absmax=True), filter_fn=only)
    velocities(ref, [c[component] for c in calls.calls])
    named = dict(ref.named_modules())
    for n in mods:
        assert torch.equal(named[n].obs.x_abs_max.float(), stats[n]), n
    quantize_(ref, SmoothQuantConfig(int8.config(), step="convert", alpha=0.5, use_running_absmax=True), filter_fn=only)
    ours = Ideogram4Transformer2DModel.from_pretrained(root / "sq", subfolder=component, torch_dtype=torch.bfloat16)
    theirs, mine = dict(ref.named_parameters()), dict(ours.named_parameters())
    for n in sorted(mods):
        a, b = mine[n + ".weight"], theirs[n + ".weight"]
        assert type(a).__name__ == type(b).__name__ == "Int8Tensor"
        for field in ("qdata", "scale", "zero_point", "act_pre_scale"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and torch.equal(x, y), (n, field)
        assert a.block_size == b.block_size and a.act_quant_kwargs == b.act_quant_kwargs
    for n, p in theirs.items():  # the protected and non-linear tensors too
        if module_not_in(n, mods):
            assert torch.equal(mine[n], p), n


def module_not_in(name, mods):
    return model.module_of(name) not in mods


def test_stored_format_and_manifest(smoothed):
    root, _, plain, sq = smoothed
    f = next((root / "sq" / "transformer").glob("*.safetensors"))
    with safe_open(f, "pt") as h:
        keys, md = set(h.keys()), h.metadata()
        pre = h.get_tensor("layers.0.attention.to_q._weight_act_pre_scale")
    assert pre.dtype == torch.bfloat16 and pre.shape == (256,)
    assert sum(k.endswith("._weight_act_pre_scale") for k in keys) == 20
    assert "act_pre_scale" in json.loads(md["layers.0.attention.to_q.weight"])["_tensor_data_names"]
    assert "act_pre_scale" not in json.loads(md["layers.0.feed_forward.w2.weight"]).get("_tensor_data_names", [])
    rec = sq["smoothquant"]
    assert rec["alpha"] == 0.5 and rec["statistics"]["file"] == "stats.safetensors"
    assert len(rec["statistics"]["sha256"]) == 64 and rec["statistics"]["provenance"]["recipe"] == "int8-w8a8"
    assert len(rec["modules"]["transformer"]) == 20
    assert "smoothquant" not in plain
    # The manifest's per-weight SQNR is that of the effective weight (dequant / s) against the source weight.
    q = {t["name"]: t["sqnr_db"] for t in sq["components"]["transformer"]["tensors"]}
    assert 20 < q["layers.0.attention.to_q.weight"] < 60


def test_smoothquant_beats_plain_w8a8_on_outliers(smoothed, outlier_source, calls):
    root = smoothed[0]
    r = evaluate(str(outlier_source), [root / "plain", root / "sq"], baselines=(), inputs=calls, layer_rows=8)
    by = {v["name"]: v for v in r["variants"]}
    for c in model.COMPONENTS:
        assert by["sq"]["components"][c]["sqnr_db"] > by["plain"]["components"][c]["sqnr_db"] + 5, c
        # The layers reading the outlier channels are where it shows.
        assert (by["sq"]["components"][c]["layers"]["layers.0.attention.to_q"]
                > by["plain"]["components"][c]["layers"]["layers.0.attention.to_q"] + 10)
    assert by["sq"]["guided"]["sqnr_db"] > by["plain"]["guided"]["sqnr_db"] + 5


def test_factor_is_torchaos_formula():
    from torchao.prototype.smoothquant.core import RunningAbsMaxSmoothQuantObserver

    torch.manual_seed(0)
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    x = (torch.randn(5, 32) * torch.linspace(0.01, 50, 32)).to(torch.bfloat16)
    x[:, 7] = 0  # a channel that never fires: eps keeps the factor finite
    for alpha in (0.0, 0.3, 0.5, 1.0):
        obs = RunningAbsMaxSmoothQuantObserver(w, alpha=alpha)
        obs(x)
        want = obs.compute_smoothing_factor()
        got = smoothing_factor(x.abs().amax(0).float(), w.abs().amax(0), alpha)
        assert got.dtype == want.dtype and torch.equal(got, want), alpha


def test_statistics_must_cover_the_plan(outlier_source, calls, tmp_path):
    safe = tmp_path / "safe.safetensors"
    calibrate(str(outlier_source), safe, recipe="int8-w8a8-safe", components=["transformer"], inputs=calls)
    with pytest.raises(IdeoquantError, match="lack transformer.layers.0.adaln_modulation"):
        ideoquant.convert(str(outlier_source), tmp_path / "o", components=["transformer"], smoothquant=safe)
    with pytest.raises(IdeoquantError, match="nothing for unconditional_transformer"):
        ideoquant.convert(str(outlier_source), tmp_path / "o", recipe="int8-w8a8-safe", smoothquant=safe)
    with pytest.raises(IdeoquantError, match="--alpha"):
        ideoquant.convert(str(outlier_source), tmp_path / "o", smoothquant=safe, alpha=1.5)
    with pytest.raises(IdeoquantError, match="not written by `ideoquant calibrate`"):
        weights = next((outlier_source / "transformer").glob("*.safetensors"))
        ideoquant.convert(str(outlier_source), tmp_path / "o", smoothquant=weights)
    with pytest.raises(IdeoquantError, match="SmoothQuant applies to INT8"):
        calibrate(str(outlier_source), tmp_path / "x.safetensors", recipe="gguf", inputs=calls)
    # A stricter recipe than the statistics' is fine: protected modules simply are not smoothed.
    m = ideoquant.convert(str(outlier_source), tmp_path / "ok", components=["transformer"], recipe="int8-w8a8-safe",
                          smoothquant=safe)
    assert len(m["smoothquant"]["modules"]["transformer"]) == 17  # 20 minus the 3 adaLN modulations it protects


def test_cli_calibrate_and_convert(outlier_source, tmp_path):
    stats = tmp_path / "s.safetensors"
    r = CliRunner().invoke(app, ["calibrate", str(outlier_source), "--out", str(stats), "--components", "transformer",
                                 "--steps", "1", "--tokens", "4", "--grid", "2"])
    assert r.exit_code == 0, r.output
    assert "SmoothQuant statistics" in r.output and stats.is_file()
    r = CliRunner().invoke(app, ["convert", str(outlier_source), "--out", str(tmp_path / "o"), "--components",
                                 "transformer", "--smoothquant", str(stats), "--alpha", "0.6", "--json"])
    assert r.exit_code == 0, r.output
    # --alpha reaches the math: torchao's SmoothQuant with alpha 0.6, its observers holding the statistics from the
    # file, makes the same smoothed weights and act_pre_scale as the command wrote.
    from diffusers import Ideogram4Transformer2DModel
    from torchao.prototype.smoothquant import SmoothQuantConfig
    from torchao.quantization import quantize_

    absmax = Statistics.load(stats).absmax["transformer"]
    ref = load_reference(outlier_source, "transformer")
    only = lambda mod, fqn: fqn in absmax  # noqa: E731
    quantize_(ref, SmoothQuantConfig(int8.config(), step="prepare", alpha=0.6, use_running_absmax=True), filter_fn=only)
    named = dict(ref.named_modules())
    for n, a in absmax.items():
        named[n].obs(a[None].to(torch.bfloat16))  # exact: the statistics are bf16 values
    quantize_(ref, SmoothQuantConfig(int8.config(), step="convert", alpha=0.6, use_running_absmax=True), filter_fn=only)
    ours = dict(Ideogram4Transformer2DModel.from_pretrained(tmp_path / "o", subfolder="transformer",
                                                            torch_dtype=torch.bfloat16).named_parameters())
    theirs = dict(ref.named_parameters())
    for n in absmax:
        for field in ("qdata", "scale", "act_pre_scale"):
            assert torch.equal(getattr(ours[n + ".weight"], field), getattr(theirs[n + ".weight"], field)), (n, field)


def test_smoothed_output_verifies(smoothed):
    from ideoquant.publish.verify import verify

    result = verify(smoothed[0] / "sq", load=False)
    assert result.ok, result.problems
