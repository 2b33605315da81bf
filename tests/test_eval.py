"""`ideoquant eval` / `capture`: every variant and baseline with every metric; numbers agree with stock diffusers."""

import json

import pytest
import torch
from typer.testing import CliRunner

import ideoquant
from ideoquant import model, testing
from ideoquant.cli import app
from ideoquant.errors import IdeoquantError
from ideoquant.evaluation.evaluate import evaluate
from ideoquant.evaluation.inputs import capture, load_captured, sample_calls
from ideoquant.evaluation.plots import evaluation_plot as plot
from ideoquant.evaluation.runner import guided, stored_bytes
from ideoquant.evaluation.variants import resolve_variants
from ideoquant.metrics import sqnr_db
from ideoquant.evaluation import baselines
from ideoquant.evaluation.inputs import sample_inputs
from ideoquant.evaluation.runner import velocity
from tests.conftest import load_reference

SAMPLE = dict(steps=1, tokens=8, grid=4, batch=2)  # small: CPU bf16 matmuls are slow
LINEARS = 23  # 2 blocks x 8 + input_proj, llm_cond_proj, t_embedding x2, adaln_proj, final_layer x2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def outputs(bf16_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ideoquant.convert(str(bf16_source), root / "int8")
    ideoquant.convert_gguf(str(bf16_source), root / "gguf-q8_0", qtype="q8_0")
    return root


@pytest.fixture(scope="module")
def report(bf16_source, outputs):
    import shutil

    (outputs / "lone").mkdir(exist_ok=True)
    lone = shutil.copy(outputs / "gguf-q8_0" / "ideogram4-unconditional_transformer-Q8_0.gguf", outputs / "lone")
    return evaluate(str(bf16_source), [outputs / "int8", outputs / "gguf-q8_0", lone], **SAMPLE)


def test_reports_every_variant_and_baseline(report, outputs):
    by = {v["name"]: v for v in report["variants"]}
    assert list(by) == ["int8", "gguf-q8_0", "lone", "fp8-e4m3 (baseline)", "nf4 (baseline)",
                        "w8a8-unprotected (baseline)"]
    assert list(by["lone"]["components"]) == ["unconditional_transformer"]  # from the file's metadata
    assert by["lone"]["guided"] is None  # needs both backbones
    for v in report["variants"]:
        for c, x in v["components"].items():
            assert x["sqnr_db"] > 15 and 0.99 < x["cosine"] < 1 and 0 < x["rel_error"] < 0.2, (v["name"], c)
            assert len(x["layers"]) == len(x["layers_isolated"]) == LINEARS and x["worst_layer"] in x["layers"]
            assert 0 < x["weight_bytes"] < report["source_weight_bytes"][c]
        if len(v["components"]) == 2:
            assert v["guided"]["sqnr_db"] > 15
    sq = {n: by[n]["components"]["transformer"]["sqnr_db"] for n in by if n != "lone"}
    # The expected order: NF4 < FP8 e4m3 (3 mantissa bits) < W8A8 with nothing protected < the int8-w8a8 recipe.
    assert sq["nf4 (baseline)"] < sq["fp8-e4m3 (baseline)"] < sq["w8a8-unprotected (baseline)"] < sq["int8"]
    nbytes = {n: by[n]["weight_bytes"] for n in by}
    assert nbytes["nf4 (baseline)"] < min(nbytes["gguf-q8_0"], nbytes["int8"], nbytes["fp8-e4m3 (baseline)"])
    # The identical file evaluated twice gives identical numbers.
    u = "unconditional_transformer"
    assert by["lone"]["components"][u] == by["gguf-q8_0"]["components"][u]


def test_weight_bytes_are_the_stored_bytes(report, outputs):
    import gguf
    from safetensors import safe_open

    by = {v["name"]: v for v in report["variants"]}
    for c in model.COMPONENTS:
        stored = 0
        for f in (outputs / "int8" / c).glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                stored += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
        assert by["int8"]["components"][c]["weight_bytes"] == stored
        # GGUF in memory: quantized blocks and BF16 tensors as in the file; F32 norms/biases in the bf16 compute dtype.
        r = gguf.GGUFReader(str(outputs / "gguf-q8_0" / f"ideogram4-{c}-Q8_0.gguf"))
        want = sum(int(t.n_bytes) if t.tensor_type.name != "F32" else int(t.n_elements) * 2 for t in r.tensors)
        assert by["gguf-q8_0"]["components"][c]["weight_bytes"] == want


def test_int8_numbers_agree_with_stock_diffusers(report, outputs, bf16_source):
    """Independent path: from_pretrained, velocity per call, SQNR / cosine computed here."""
    from diffusers import Ideogram4Transformer2DModel

    calls = sample_calls(testing.TINY_CONFIG, **SAMPLE).calls
    got = next(v for v in report["variants"] if v["name"] == "int8")
    vel = {}
    for c in model.COMPONENTS:
        ref = load_reference(bf16_source, c)
        q = Ideogram4Transformer2DModel.from_pretrained(outputs / "int8", subfolder=c, torch_dtype=torch.bfloat16)
        outs = {}
        for name, m in (("ref", ref), ("q", q)):
            layer = dict(m.named_modules())["layers.0.attention.to_q"]
            seen = []
            h = layer.register_forward_hook(lambda mod, a, o: seen.append((a[0], o)))
            outs[name] = [velocity(m, call[c]) for call in calls]
            h.remove()
            outs[name + "_layer"] = torch.cat([o.reshape(-1, o.shape[-1]) for _, o in seen])
            outs[name + "_input"] = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in seen])
        q_layer = dict(q.named_modules())["layers.0.attention.to_q"]
        vel[c] = outs
        r, a = torch.cat(outs["ref"]), torch.cat(outs["q"])
        x = got["components"][c]
        assert x["sqnr_db"] == pytest.approx(sqnr_db(r, a), abs=1e-3)
        assert x["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(r.flatten(), a.flatten(), 0)),
                                            abs=1e-6)
        assert x["rel_error"] == pytest.approx(float((r - a).norm() / r.norm()), rel=1e-4)
        assert x["layers"]["layers.0.attention.to_q"] == pytest.approx(sqnr_db(outs["ref_layer"], outs["q_layer"]),
                                                                       abs=1e-3)
        with torch.no_grad():  # isolated: the INT8 layer (W8A8, per-token activations) on the source's layer input
            own = q_layer(outs["ref_input"])
        assert x["layers_isolated"]["layers.0.attention.to_q"] == pytest.approx(sqnr_db(outs["ref_layer"], own),
                                                                                abs=1e-3)
        assert x["layers_isolated"]["layers.0.feed_forward.w2"] is None  # protected by the recipe: exact
    g = report["guidance"]
    cond, uncond = vel["transformer"], vel["unconditional_transformer"]
    ref_g = torch.cat([g * c + (1 - g) * u for c, u in zip(cond["ref"], uncond["ref"])])
    q_g = torch.cat([g * c + (1 - g) * u for c, u in zip(cond["q"], uncond["q"])])
    assert got["guided"]["sqnr_db"] == pytest.approx(sqnr_db(ref_g, q_g), abs=1e-3)


def test_nf4_mirrors_bitsandbytes_blockwise_scheme():
    torch.manual_seed(0)
    w = torch.randn(7, 50, dtype=torch.bfloat16)  # 350 elements: 5 full blocks of 64 and a short one
    idx, absmax = baselines.nf4_quantize(w)
    assert absmax.shape == (6,) and absmax.dtype == torch.float32 and idx.max() <= 15
    flat = w.float().reshape(-1)
    assert torch.equal(absmax[:5], flat[:320].view(5, 64).abs().amax(1)) and absmax[5] == flat[320:].abs().max()
    scaled = flat / absmax.repeat_interleave(64)[:350]
    code = torch.tensor(baselines.NF4_CODE)
    dist = (scaled[:, None] - code).abs()
    assert torch.all(dist.gather(1, idx.long()[:, None])[:, 0] <= dist.min(1).values + 1e-7)  # the nearest code
    deq = baselines.nf4_dequantize(idx, absmax, w.shape)
    assert deq.dtype == torch.bfloat16
    expect = (code.to(torch.bfloat16)[idx.long()].float() * absmax.repeat_interleave(64)[:350]).to(torch.bfloat16)
    assert torch.equal(deq.reshape(-1), expect)


def test_fp8_baseline_uses_diffusers_fp8r(bf16_source):
    from diffusers.quantizers.bfl.utils import dequantize_fp8r, quantize_fp8r

    from ideoquant.source import open_source

    comp = open_source(str(bf16_source), components=["transformer"]).components["transformer"]
    m, nbytes = baselines.fp8_model(comp)
    w = comp.tensors["layers.0.feed_forward.w1.weight"].read()
    want = dequantize_fp8r(*quantize_fp8r(w.float())).to(torch.bfloat16)
    assert torch.equal(m.layers[0].feed_forward.w1.weight, want)
    linear = sum(p.numel() for n, p in m.named_parameters() if n.endswith(".weight") and p.ndim == 2
                 and n != "embed_image_indicator.weight")
    assert nbytes < stored_bytes(m) and nbytes > linear  # 1 byte per linear weight element + row scales + the rest


class FakePipeline:
    """Calls the two backbones the way Ideogram4Pipeline.__call__ does (keyword arguments, packed conditional
    sequence with the text region first, image-only unconditional call with zeroed text features), without a text
    encoder: the text features are random."""

    def __init__(self, folder):
        self.transformer = load_reference(folder, "transformer")
        self.unconditional_transformer = load_reference(folder, "unconditional_transformer")
        self.log = []

    def __call__(self, prompt, num_inference_steps=3, max_sequence_length=8, grid=4, attention_kwargs=None):
        cond = sample_inputs(dict(self.transformer.config), batch=len(prompt), text_tokens=max_sequence_length,
                                  grid=(grid, grid), seed=1)
        latents = cond["hidden_states"][:, max_sequence_length:].float()
        text_pad = torch.zeros(latents.shape[0], max_sequence_length, latents.shape[-1])
        neg = {k: cond[k][:, max_sequence_length:] for k in ("position_ids", "segment_ids", "indicator")}
        neg_llm = torch.zeros_like(cond["encoder_hidden_states"][:, max_sequence_length:])
        for i in range(num_inference_steps):
            t = torch.full((latents.shape[0],), (i + 1) / (num_inference_steps + 1)).to(torch.bfloat16)
            kw = dict(hidden_states=torch.cat([text_pad, latents], 1).to(torch.bfloat16), timestep=t,
                      encoder_hidden_states=cond["encoder_hidden_states"], position_ids=cond["position_ids"],
                      segment_ids=cond["segment_ids"], indicator=cond["indicator"])
            pos = self.transformer(**kw, attention_kwargs=attention_kwargs, return_dict=False)[0]
            nkw = dict(hidden_states=latents.to(torch.bfloat16), timestep=t, encoder_hidden_states=neg_llm, **neg)
            negv = self.unconditional_transformer(**nkw, attention_kwargs=attention_kwargs, return_dict=False)[0]
            self.log.append({"transformer": kw, "unconditional_transformer": nkw})
            v = 7.0 * pos[:, max_sequence_length:].float() + (1 - 7.0) * negv.float()
            latents = latents - 0.05 * v
        return latents


def test_capture_records_both_backbones_and_eval_uses_it(bf16_source, outputs, tmp_path):
    from safetensors import safe_open

    pipe = FakePipeline(bf16_source)
    info = capture(pipe, tmp_path / "cap.safetensors", prompt=["a", "b"], num_inference_steps=2)
    assert info["calls"] == {"transformer": 2, "unconditional_transformer": 2}
    with safe_open(tmp_path / "cap.safetensors", "pt") as f:
        keys = list(f.keys())
    # Constant arguments (text features, positions, masks) are stored once; latents and timesteps per call.
    assert sum(k.endswith(".encoder_hidden_states") for k in keys) == 2
    assert sum(k.endswith(".hidden_states") and "encoder" not in k for k in keys) == 4
    ins = load_captured(tmp_path / "cap.safetensors")
    assert len(ins.calls) == 2
    for got, sent in zip(ins.calls, pipe.log):
        for c in model.COMPONENTS:
            assert got[c].keys() == sent[c].keys()
            for k in sent[c]:
                assert torch.equal(got[c][k], sent[c][k]), (c, k)
    r = evaluate(str(bf16_source), [outputs / "int8"], baselines=(), inputs=tmp_path / "cap.safetensors")
    assert r["inputs"]["kind"] == "captured"
    # Independently: the captured calls through the reference and the stock-loaded INT8 model.
    from diffusers import Ideogram4Transformer2DModel

    v = {}
    for c in model.COMPONENTS:
        q = Ideogram4Transformer2DModel.from_pretrained(outputs / "int8", subfolder=c, torch_dtype=torch.bfloat16)
        v[c] = ([velocity(getattr(pipe, c), call[c]) for call in ins.calls],
                [velocity(q, call[c]) for call in ins.calls])
        assert r["variants"][0]["components"][c]["sqnr_db"] == pytest.approx(
            sqnr_db(torch.cat(v[c][0]), torch.cat(v[c][1])), abs=1e-3)
    want = sqnr_db(guided(v["transformer"][0], v["unconditional_transformer"][0], 7.0),
                   guided(v["transformer"][1], v["unconditional_transformer"][1], 7.0))
    assert r["variants"][0]["guided"]["sqnr_db"] == pytest.approx(want, abs=1e-3)


def test_cli_eval_json_and_plot(bf16_source, outputs, tmp_path):
    png = tmp_path / "eval.png"
    r = CliRunner().invoke(app, ["eval", str(bf16_source), str(outputs / "int8"), "--baselines", "none",
                                 "--steps", "1", "--tokens", "8", "--grid", "4", "--plot", str(png), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert [v["name"] for v in rep["variants"]] == ["int8"] and rep["variants"][0]["guided"]["sqnr_db"] > 30
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(app, ["eval", str(bf16_source), str(outputs / "int8"), "--baselines", "none",
                                 "--components", "transformer", "--steps", "1", "--tokens", "4", "--grid", "2"])
    assert r.exit_code == 0 and "SQNR" in r.output and "int8" in r.output, r.output
    r = CliRunner().invoke(app, ["eval", str(bf16_source), str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such quantized output" in r.output


def test_resolve_refuses_what_is_not_quantized(bf16_source, tmp_path):
    with pytest.raises(IdeoquantError, match="not quantized"):
        resolve_variants([bf16_source / "transformer"])
    with pytest.raises(IdeoquantError, match="not quantized"):
        resolve_variants([bf16_source])  # a pipeline folder, but the source itself
    with pytest.raises(IdeoquantError, match="holds no quantized backbone"):
        resolve_variants([tmp_path])
    with pytest.raises(IdeoquantError, match="unknown baseline"):
        evaluate(str(bf16_source), [], baselines=("int4",))
    other = testing.build_checkpoint(tmp_path / "one-layer", config=dict(testing.TINY_CONFIG, num_layers=1))
    ideoquant.convert(str(other), tmp_path / "one-layer-int8", components=["transformer"])
    with pytest.raises(IdeoquantError, match="not the same model"):
        evaluate(str(bf16_source), [tmp_path / "one-layer-int8"], baselines=(), steps=1, tokens=4, grid=2)


def test_plot_shows_every_layers_sqnr(report, tmp_path):
    """What is drawn: per backbone two panels (isolated, in situ), one line per variant that has that backbone,
    whose points are the report's per-layer SQNRs; the PNG read back has the figure's size and each line's colour."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    from ideoquant.evaluation.plots import EVALUATION_DPI, evaluation_figure

    fig = evaluation_figure(report)
    panels = [(c, kind) for c in report["components"] for kind in ("layers_isolated", "layers")]
    assert len(fig.axes) == len(panels)
    for ax, (c, kind) in zip(fig.axes, panels):
        assert ax.get_title(loc="left").startswith(c + ":")
        drawn = [v for v in report["variants"] if c in v["components"]]
        lines = ax.get_lines()
        assert len(lines) == len(drawn) and len(drawn) >= 2
        for line, v in zip(lines, drawn):
            assert line.get_label().startswith(v["name"] + " ")
            y = [float(p) for p in line.get_ydata() if p == p]  # NaN: a layer this variant has not, or exact
            want = [s for s in v["components"][c][kind].values() if s is not None]
            assert sorted(y) == pytest.approx(sorted(want)) and want
    png = plot(report, tmp_path / "x" / "layers.png")
    pixels = imread(png)[..., :3]
    w, h = fig.get_size_inches() * EVALUATION_DPI
    assert pixels.shape[:2] == (round(h), round(w))
    for line in fig.axes[0].get_lines():
        colour = torch.tensor(to_rgb(line.get_color()))
        assert (torch.from_numpy(pixels.copy()) - colour).abs().amax(-1).lt(0.02).sum() > 20, line.get_label()


def test_cli_capture_needs_a_whole_pipeline(bf16_source, tmp_path):
    """A backbone-only folder is not a pipeline (no text encoder, VAE, scheduler): one clear error line, exit 2."""
    r = CliRunner().invoke(app, ["capture", str(bf16_source), "--out", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 2 and "cannot load the pipeline" in r.output, r.output
    assert not (tmp_path / "c.safetensors").exists()
