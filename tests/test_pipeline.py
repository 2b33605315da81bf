"""The whole route on a tiny COMPLETE pipeline (both backbones, Qwen3-VL text encoder, tokenizer, FLUX.2 VAE,
scheduler; diffusers layout, tests/pipeline_fixture.py): `load_pipeline` with an INT8 and a GGUF output and a local
base runs a denoising step in stock diffusers; the model card's code, as uploaded, is what runs; `capture` takes the
base too."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch
from typer.testing import CliRunner

import ideoquant
from ideoquant import model
from ideoquant.cli import app
from ideoquant.evaluation.inputs import capture_pipeline, load_captured
from ideoquant.formats import usage
from ideoquant.publish import card
from ideoquant.publish.upload import upload
from tests.pipeline_fixture import PIPELINE_CONFIG, build_pipeline, run_kwargs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The smallest call of the card's code: one step on an 8x8 image, a constant guidance scale (the pipeline's default
# schedule has 48 entries, one per default step).
TINY_CALL = {"height": 8, "width": 8, "num_inference_steps": 1, "guidance_scale": 7.0, "guidance_schedule": None}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-ideogram4")


@pytest.fixture(scope="module")
def outputs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    ideoquant.convert(str(base), root / "int8")
    ideoquant.convert_gguf(str(base), root / "q8_0", qtype="q8_0")
    return {"int8": root / "int8", "q8_0": root / "q8_0"}


def _step(pipe, latents):
    """One denoising step from fixed noise; returns what the step added (proportional to the guided velocity)."""
    out = pipe(**run_kwargs(), latents=latents.clone()).images
    return (out - latents).float()


@pytest.fixture(scope="module")
def reference(base):
    """Stock diffusers on the source pipeline itself (bf16 backbones), and a negative control with the two backbones
    swapped."""
    from diffusers import Ideogram4Pipeline

    pipe = Ideogram4Pipeline.from_pretrained(base, torch_dtype=torch.bfloat16)
    latents = torch.randn(1, 16, PIPELINE_CONFIG["in_channels"], generator=torch.Generator().manual_seed(1))
    ref = _step(pipe, latents)
    swapped = Ideogram4Pipeline.from_pretrained(base, torch_dtype=torch.bfloat16, transformer=pipe.unconditional_transformer,
                                                unconditional_transformer=pipe.transformer)
    return latents, ref, _step(swapped, latents)


def _torchao_int8(base, output):
    """The source pipeline with torchao's own `quantize_` (Int8DynamicActivationInt8WeightConfig) applied to each
    backbone's linears, except the modules the output's config.json leaves unconverted."""
    from diffusers import Ideogram4Pipeline
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    pipe = Ideogram4Pipeline.from_pretrained(base, torch_dtype=torch.bfloat16)
    for c in model.COMPONENTS:
        config = json.loads((output / c / "config.json").read_text())
        protected = set(config["quantization_config"]["modules_to_not_convert"])
        assert "layers.0.feed_forward.w2" in protected and "layers.0.feed_forward.w1" not in protected
        quantize_(getattr(pipe, c), Int8DynamicActivationInt8WeightConfig(),
                  filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and name not in protected)
    return pipe


@torch.no_grad()
def _gguf_py(base, loaded):
    """The source pipeline with every weight that the loaded GGUF output holds quantized replaced by gguf-py's own
    quantization of the source weight to that type, dequantized by gguf-py. diffusers' GGUF kernels dequantize Q8_0
    in float16 (`d * x`, a float16 scale) before casting to the compute dtype: the same rounding here."""
    import gguf
    from diffusers import Ideogram4Pipeline
    from diffusers.quantizers.gguf.utils import GGUFParameter

    pipe = Ideogram4Pipeline.from_pretrained(base, torch_dtype=torch.bfloat16)
    types = set()
    for c in model.COMPONENTS:
        stored = dict(getattr(loaded, c).named_parameters())
        for name, p in getattr(pipe, c).named_parameters():
            if not isinstance(stored[name], GGUFParameter):
                continue
            qtype = gguf.GGMLQuantizationType(int(stored[name].quant_type))
            types.add(qtype.name)
            w = gguf.quants.dequantize(gguf.quants.quantize(p.float().numpy(), qtype), qtype)
            w = torch.from_numpy(w).reshape(p.shape)
            p.copy_(w.to(torch.float16) if qtype == gguf.GGMLQuantizationType.Q8_0 else w)
    assert types == {"Q8_0", "BF16"}, types  # the protected linears stay BF16
    return pipe


@pytest.mark.parametrize("kind", ["int8", "q8_0"])
def test_load_pipeline_runs_a_step_as_the_libraries_compute_it(base, outputs, reference, kind):
    """`load_pipeline` with an output computes the step that stock diffusers computes with the library's own
    quantization of the source (torchao's `quantize_`; gguf-py's quantize and dequantize), bit for bit."""
    latents, ref, swapped = reference
    assert not torch.equal(ref, swapped)  # the control: the wrong backbone in a slot changes the step
    pipe = ideoquant.load_pipeline(outputs[kind], base=base)
    w = pipe.transformer.layers[0].feed_forward.w1
    for c in model.COMPONENTS:  # both slots hold this output's own backbone, quantized
        lin = getattr(pipe, c).layers[0].feed_forward.w1
        assert (type(lin.weight).__name__ == "Int8Tensor") if kind == "int8" else (type(lin).__name__ == "GGUFLinear")
    assert w is not pipe.unconditional_transformer.layers[0].feed_forward.w1
    got = _step(pipe, latents)
    assert got.abs().sum() > 0 and not torch.equal(got, ref)  # quantized: not the bf16 source's step
    expected = _torchao_int8(base, outputs[kind]) if kind == "int8" else _gguf_py(base, pipe)
    assert torch.equal(got, _step(expected, latents))


def test_load_pipeline_needs_a_loadable_base(outputs, tmp_path):
    with pytest.raises(ideoquant.IdeoquantError, match="not a diffusers-layout Ideogram 4 pipeline"):
        ideoquant.load_pipeline(outputs["int8"], base=tmp_path)  # an empty folder: no model_index.json
    (tmp_path / "model_index.json").write_text('{"_class_name": "Ideogram4Pipeline"}')
    with pytest.raises(ideoquant.IdeoquantError, match="cannot load the base pipeline"):
        ideoquant.load_pipeline(outputs["int8"], base=tmp_path)  # named, but nothing there to load


@pytest.mark.parametrize("kind", ["int8", "q8_0"])
def test_card_code_is_what_runs(hub_env, base, outputs, kind, tmp_path, monkeypatch):
    """Upload with --base; the card's Python block (read back from the Hub) equals `usage_code`; the same code with
    the CPU and the tiny call substituted downloads the backbones from the Hub and makes an image."""
    repo = f"me/ideogram4-{kind}-{uuid.uuid4().hex[:8]}"
    r = upload(outputs[kind], repo, base=str(base), progress=False)
    assert r["base"] == str(base)
    text = hub_env.hub.read(repo, "README.md").decode()
    m = json.loads((outputs[kind] / "ideoquant.json").read_text())
    shown = usage.code_block(text)
    assert shown == card.usage_code(m, repo, str(base))
    assert f'from_pretrained(\n    "{base}",' in shown and 'pipe.to("cuda")' in shown
    run = card.usage_code(m, repo, str(base), device="cpu", call=TINY_CALL)
    # Only the device and the call's arguments differ.
    assert run.splitlines()[:-3] == shown.splitlines()[:-3] and run.splitlines()[-1] == shown.splitlines()[-1]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(run, f"<card of {repo}>", "exec"), ns)  # noqa: S102  the card's own code
    assert ns["image"].size == (8, 8) and (tmp_path / usage.IMAGE_FILE).stat().st_size > 0
    downloads = hub_env.hub.file_downloads()
    weights = {f for f in m["files"] if f.endswith((".gguf", ".safetensors"))}
    assert weights and all(any(p.endswith("/" + f) for p in downloads) for f in weights), downloads
    # The card says what the base needs; the default names bitsandbytes.
    assert f"come from `{base}`" in text
    default = card.model_card(m, repo)
    assert "ideogram-ai/ideogram-4-nf4-diffusers" in usage.code_block(default) and "bitsandbytes" in default


def test_capture_from_a_base(base, tmp_path):
    info = capture_pipeline(base, tmp_path / "cap.safetensors", height=8, width=8, steps=2, max_sequence_length=24)
    assert info["calls"] == {c: 2 for c in model.COMPONENTS} and info["base"] == str(base)
    ins = load_captured(tmp_path / "cap.safetensors")
    cond = ins.calls[0]["transformer"]
    assert cond["hidden_states"].shape == (1, 24 + 16, PIPELINE_CONFIG["in_channels"])
    assert cond["encoder_hidden_states"].shape[-1] == PIPELINE_CONFIG["llm_features_dim"]
    r = CliRunner().invoke(app, ["capture", "--base", str(base), "--out", str(tmp_path / "c2.safetensors"),
                                 "--height", "16", "--width", "16", "--steps", "1", "--max-sequence-length", "24"])
    assert r.exit_code == 0, r.output
    assert load_captured(tmp_path / "c2.safetensors").info["calls"] == {c: 1 for c in model.COMPONENTS}
    r = CliRunner().invoke(app, ["capture", str(base), "--base", os.fspath(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "two pipelines" in r.output
