"""`ideoquant bench` on the tiny complete pipeline (tests/pipeline_fixture.py): the reference, an INT8 output, a
GGUF output and the NF4 baseline generate small images through the CLI; every metric is checked against its own
library on the same inputs; a killed run resumes to the same numbers, and so does a run split over two processes
by `accelerate launch`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

import ideoquant
from ideoquant.bench import metrics, stats
from ideoquant.bench.prompts import load_prompts
from ideoquant.cli import app
from tests.bench_models import build_alexnet_features, build_clip
from tests.pipeline_fixture import build_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    {"id": "fox", "prompt": "a red fox in fresh snow", "group": "scenes"},
    {"id": "sign", "prompt": "a sign , hello world", "text": "hello world", "group": "text"},
    {"prompt": "a cat , photograph"},
]
# The smallest generation: 2 steps at 32x32 (a 16x16 token grid), a constant guidance scale.
GEN = ["--steps", "2", "--size", "32", "--max-sequence-length", "24", "--guidance", "7", "--device", "cpu"]
PERFORMANCE = set(stats.PERFORMANCE)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    base = build_pipeline(root / "tiny-ideogram4")
    ideoquant.convert(str(base), root / "int8")
    ideoquant.convert_gguf(str(base), root / "q8_0", qtype="q8_0")
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    clip = build_clip(root / "clip")
    alex = build_alexnet_features(root / "alexnet-features.safetensors")
    models = ["--metric-model", f"clip={clip}", "--metric-model", f"pick={clip}", "--metric-model", f"lpips={alex}"]
    return {"root": root, "base": base, "int8": root / "int8", "q8_0": root / "q8_0",
            "prompts": root / "prompts.jsonl", "clip": clip, "alex": alex, "models": models}


def _args(s, out, *variants, extra=()):
    return ["bench", str(s["base"]), *map(str, variants), "--base", str(s["base"]), "--out", str(out),
            "--prompts", str(s["prompts"]), *GEN, *extra]


def _run(args):
    r = CliRunner().invoke(app, args)
    return r


def _per_image(result):
    return {(e["variant"], e["prompt_id"], e["seed"]): e["metrics"] for e in result["images"]}


def _quality(result):
    return {v: {m: e for m, e in s.items() if m not in PERFORMANCE} for v, s in result["summary"].items()}


@pytest.fixture(scope="module")
def full(setup):
    """One uninterrupted run: reference, INT8, Q8_0 and NF4, all metrics with the local models, two seeds."""
    out = setup["root"] / "report"
    r = _run(_args(setup, out, setup["int8"], setup["q8_0"], "nf4", extra=["--seeds", "2", *setup["models"]]))
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "results.json").read_text())


def test_bench_end_to_end(setup, full):
    out, result = full
    variants = ["reference", "int8", "q8_0", "nf4"]
    assert [v["name"] for v in result["variants"]] == variants
    assert len(result["images"]) == 4 * 3 * 2
    for e in result["images"]:
        path = out / e["path"]
        assert not Path(e["path"]).is_absolute() and path.is_file()
        with Image.open(path) as im:
            assert im.size == (32, 32)
            assert im.text["variant"] == e["variant"] and int(im.text["seed"]) == e["seed"]
            assert im.text["steps"] == "2" and float(im.text["seconds"]) > 0
        names = set(e["metrics"])
        expected = {"clip", "pick"} | ({"ocr_ned", "ocr_exact"} if e["prompt_id"] == "sign" else set())
        assert names == expected | (set() if e["variant"] == "reference" else {"psnr", "ssim", "lpips"})
        assert isinstance(e.get("ocr_text"), str) == (e["prompt_id"] == "sign")  # what OCR read, for the report
    s = result["summary"]
    assert set(s) == set(variants)
    for v in variants[1:]:
        for m in ("clip", "pick"):
            e = s[v][m]
            assert e["n"] == 6 and e["ci_low"] <= e["delta_vs_reference"] <= e["ci_high"]
            assert e["verdict"] in ("indistinguishable from the reference", "better", "worse")
        assert s[v]["lpips"]["n"] == 6 and s[v]["lpips"]["delta_vs_reference"] is None
        assert s[v]["weight_bytes"]["mean"] > 0 and s[v]["seconds_per_step"]["mean"] > 0
    # The 8-bit outputs are closer to the reference than NF4, by every image-level distance.
    for v in ("int8", "q8_0"):
        assert s[v]["psnr"]["mean"] > s["nf4"]["psnr"]["mean"] + 5
        assert s[v]["ssim"]["mean"] > s["nf4"]["ssim"]["mean"]
        assert s[v]["lpips"]["mean"] < s["nf4"]["lpips"]["mean"]
        assert s[v]["psnr"]["vs"]["nf4"]["verdict"] == "better"
        assert s[v]["weight_bytes"]["mean"] > s["nf4"]["weight_bytes"]["mean"]
    assert "vs" not in s["nf4"]["psnr"]
    assert result["settings"]["steps"] == 2 and result["settings"]["size"] == [32, 32]
    assert (out / "summary.md").is_file() and (out / "index.html").read_text().count("OCR read:") == 4 * 2
    assert result["metrics"]["lpips"] == {"higher_is_better": False, "against_reference": True,
                                          "model": str(setup["alex"])}


def test_rerun_skips_and_other_settings_are_refused(setup, full):
    out, result = full
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    r = _run(_args(setup, out, setup["int8"], setup["q8_0"], "nf4",
                   extra=["--seeds", "2", "--json", *setup["models"]]))
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert _per_image(again) == _per_image(result) and _quality(again) == _quality(result)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps  # nothing regenerated
    r = _run(_args(setup, out, setup["int8"], setup["q8_0"], "nf4", extra=["--seeds", "2", "--steps", "3"]))
    assert r.exit_code == 2 and "other settings: steps is 2 there, 3 here" in r.output
    r = _run(_args(setup, out, setup["int8"], extra=["--seeds", "2"]))
    assert r.exit_code == 2 and "other settings: variants" in r.output


def test_clip_score_is_torchmetrics_clip_score(setup, full):
    """Per-image CLIPScore equals torchmetrics' CLIPScore on the same local model and images, and CLIP's own
    logits (logit scale x cosine) through transformers; PickScore equals those logits of its model."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    out, result = full
    prompts = {p.id: p.prompt for p in load_prompts(setup["prompts"])}
    entries = [e for e in result["images"] if e["variant"] == "int8"]
    images = [torch.from_numpy(np.asarray(Image.open(out / e["path"]).convert("RGB")).copy()).permute(2, 0, 1)
              for e in entries]
    texts = [prompts[e["prompt_id"]] for e in entries]
    model, processor = metrics.clip_model_and_processor(str(setup["clip"]))
    reference = CLIPScore(model_name_or_path=lambda: (model, processor))
    reference.update(torch.stack(images), texts)
    ours = [e["metrics"]["clip"] for e in entries]
    assert np.mean(ours) == pytest.approx(float(reference.compute()), rel=1e-5)
    clip = CLIPModel.from_pretrained(setup["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(setup["clip"])
    with torch.no_grad():
        logits = [float(clip(**proc(text=[t], images=[Image.open(out / e["path"])], return_tensors="pt",
                                    padding=True)).logits_per_image[0, 0]) for t, e in zip(texts, entries)]
    scale = float(clip.logit_scale.detach().exp())
    assert ours == pytest.approx([100 * max(x / scale, 0) for x in logits], rel=1e-4, abs=1e-4)
    assert [e["metrics"]["pick"] for e in entries] == pytest.approx(logits, rel=1e-4, abs=1e-4)


def test_bootstrap_ci_is_scipys():
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(7)
    a = rng.normal(20, 2, 40)
    b = a - rng.normal(0.3, 0.5, 40)
    delta, low, high = stats.paired_ci(a, b, seed=3)
    ref = scipy_stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True,
                                vectorized=True, n_resamples=9999, confidence_level=0.95, method="BCa",
                                rng=np.random.default_rng(3))
    assert delta == pytest.approx(np.mean(a - b))
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), rel=1e-12)
    assert low < delta < high and low > 0 and stats.verdict("clip", low, high) == "better"
    assert stats.verdict("lpips", low, high) == "worse"
    assert stats.verdict("clip", -0.1, 0.2) == "indistinguishable from the reference"


def test_ocr_reads_rendered_text():
    engine = metrics.ocr_engine()
    image = Image.new("RGB", (320, 96), "white")
    ImageDraw.Draw(image).text((10, 20), "HELLO WORLD", fill="black", font=ImageFont.load_default(size=40))
    read = metrics.read_text(engine, image)
    assert metrics.ocr_scores(read, "hello world") == {"ocr_ned": 0.0, "ocr_exact": 1.0}
    worse = metrics.ocr_scores(read, "goodbye moon")
    assert worse["ocr_exact"] == 0.0 and worse["ocr_ned"] > 0.5


def test_lpips_self_zero_noised_positive(setup):
    scorer = metrics.scorers(["lpips"], metrics.parse_metric_models([f"lpips={setup['alex']}"]))[0]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    noised = Image.fromarray(np.clip(pixels + rng.normal(0, 25, pixels.shape), 0, 255).astype(np.uint8))
    assert scorer.fn(image, image, None)["lpips"] == 0.0
    assert scorer.fn(noised, image, None)["lpips"] > 0.0
    # The backbone is the file's: its first convolution holds the saved tensor.
    from safetensors.torch import load_file

    net = metrics.lpips_model(str(setup["alex"]))
    assert torch.equal(net.net.slice1[0].weight, load_file(setup["alex"])["features.0.weight"])


def test_images_made_elsewhere(setup, full, tmp_path):
    out, result = full
    r = _run(["bench", "--images", str(out / "images"), "--prompts", str(setup["prompts"]), "--out",
              str(tmp_path / "scored"), "--metrics", "psnr,ssim", "--json"])
    assert r.exit_code == 0, r.output
    scored = json.loads(r.stdout)
    ours = {k: {m: v[m] for m in ("psnr", "ssim") if m in v} for k, v in _per_image(result).items()}
    assert _per_image(scored) == ours
    assert (tmp_path / "scored" / "images" / "nf4" / "fox-1.png").is_file()


def test_bad_input_is_one_line(setup, tmp_path, monkeypatch):
    r = _run(_args(setup, tmp_path / "r", setup["int8"], extra=["--metrics", "psnr,fid"]))
    assert r.exit_code == 2 and "unknown metric 'fid'" in r.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = _run(_args(setup, tmp_path / "busy", setup["int8"]))
    assert r.exit_code == 2 and "not an ideoquant bench report" in r.output
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    r = _run(_args(setup, setup["int8"], setup["int8"], extra=["--overwrite"]))
    assert r.exit_code == 2 and "source" in r.output and (setup["int8"] / "ideoquant.json").is_file()
    r = _run(_args(setup, tmp_path / "r3", setup["int8"], extra=["--size", "33", "--limit", "1", "--metrics", "psnr"]))
    assert r.exit_code == 2 and "the pipeline refused prompt fox" in r.output and r.output.count("\n") == 1
    monkeypatch.setitem(sys.modules, "lpips", None)  # the extra not installed
    r = _run(_args(setup, tmp_path / "r2", setup["int8"], extra=["--metrics", "lpips"]))
    assert r.exit_code == 2 and r.output.count("\n") == 1 and not (tmp_path / "r2" / "images").exists()
    assert 'the lpips metric needs the bench extra: pip install "ideoquant[bench]" (missing: lpips)' in r.output


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\n\na sign\n")
    assert [(p.id, p.prompt) for p in load_prompts(tmp_path / "p.txt")] == [("1", "a red fox"), ("3", "a sign")]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "id": "../etc"}\n')
    with pytest.raises(ideoquant.IdeoquantError, match="names image files"):
        load_prompts(tmp_path / "p.jsonl")


# ---------------------------------------------------------------- interrupted and distributed runs

SMALL = ["--metrics", "psnr,ssim,clip", "--limit", "2", "--seeds", "2"]


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def small(setup):
    out = setup["root"] / "small"
    r = _run(_args(setup, out, setup["int8"], setup["q8_0"], extra=[*SMALL, *setup["models"][:2]]))
    assert r.exit_code == 0, r.output
    return json.loads((out / "results.json").read_text())


def test_sigkill_then_rerun_gives_the_same_results(setup, small, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "ideoquant", *_args(setup, out, setup["int8"], setup["q8_0"],
                                                      extra=[*SMALL, *setup["models"][:2]])]
    p = _cli(args)
    deadline = time.monotonic() + 240
    while len(list((out / "images").rglob("*.png"))) < 5 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    made = len(list((out / "images").rglob("*.png")))
    assert 5 <= made < 12 and not (out / "results.json").exists()
    p = _cli([*args, "--json"])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    resumed = json.loads(stdout)
    assert _per_image(resumed) == _per_image(small) and _quality(resumed) == _quality(small)


def test_accelerate_launch_two_processes_gives_the_same_results(setup, small, tmp_path):
    out = tmp_path / "accelerate"
    # accelerate 1.16's `--cpu` launcher starts one process (several only through MPI); its torchrun launcher
    # starts two, which form a gloo group on the CPU (`--device cpu`).
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "ideoquant"]
    args = _args(setup, out, setup["int8"], setup["q8_0"], extra=[*SMALL, *setup["models"][:2], "--json"])
    p = _cli([*launch, *args])
    stdout, stderr = p.communicate(timeout=420)
    assert p.returncode == 0, stderr[-3000:]
    result = json.loads(stdout)
    assert _per_image(result) == _per_image(small) and _quality(result) == _quality(small)
    ranks = {json.loads(f.read_text())["variant"] for f in (out / "timings").glob("*-1.json")}
    assert ranks == {"reference", "int8", "q8_0"}  # the second process generated its share of every variant


def test_reference_runs_the_fp8_release_as_released(fp8_source):
    """The FP8 release's reference keeps its FP8 weights and per-row scales (diffusers' BFLFP8RLinear dequantizes
    each layer on the fly) and computes what the source's exactly dequantized weights compute."""
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear

    from ideoquant.bench.variants import reference_variant
    from ideoquant.evaluation.inputs import sample_inputs
    from ideoquant.evaluation.runner import source_model, velocity
    from ideoquant.source import open_source
    from ideoquant.testing import TINY_CONFIG

    comp = open_source(str(fp8_source)).components["transformer"]
    released, nbytes = reference_variant().load("transformer", comp, "cpu")
    fp8 = [m for m in released.modules() if isinstance(m, BFLFP8RLinear)]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    stored = sum(t.stored.nbytes * (t.rows[1] - t.rows[0]) // t.stored.shape[0] if t.rows else t.stored.nbytes
                 for t in comp.tensors.values())
    assert nbytes < sum(p.numel() * 2 for p in source_model(comp).parameters()) and nbytes >= stored
    inputs = sample_inputs(TINY_CONFIG)
    assert torch.equal(velocity(released, inputs), velocity(source_model(comp), inputs))


def test_an_interrupted_bench_says_its_images_are_kept(monkeypatch, tmp_path):
    """Unlike a conversion, an interrupted bench keeps every finished image for the next run: its line says so
    rather than "nothing was written"."""
    import ideoquant.bench.run

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ideoquant.bench.run, "bench", interrupted)
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "src"), "int8", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 130, r.output
    assert "images made so far are kept in" in r.output and "nothing was written" not in r.output
