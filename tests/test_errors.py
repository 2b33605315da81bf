"""Bad input: one clear line, exit code 2, nothing half-written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import ideoquant
from ideoquant import IdeoquantError, testing
from ideoquant.cli import app


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if name in p.name]


def _fails(source, tmp_path, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(IdeoquantError, match=match):
        ideoquant.convert(str(source), out, **kw)
    assert not out.exists() and not _leftovers(tmp_path, "out")


def test_missing_component(bf16_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bf16_source, src)
    shutil.rmtree(src / "unconditional_transformer")
    _fails(src, tmp_path, "missing component 'unconditional_transformer'")


def test_not_an_ideogram4_checkpoint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"foo.weight": torch.zeros(4, 4)}, src / "model.safetensors")
    _fails(src, tmp_path, "not an Ideogram 4 checkpoint")
    (src / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    _fails(src, tmp_path, "not an Ideogram 4 checkpoint")


def test_truncated_safetensors(bf16_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bf16_source, src)
    shard = sorted((src / "transformer").glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _fails(src, tmp_path, "corrupt or truncated")


def test_corrupt_header(bf16_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bf16_source, src)
    shard = sorted((src / "transformer").glob("*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    _fails(src, tmp_path, "corrupt or truncated")


def test_pickle_only_is_refused_without_unpickling(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # A file that would run code if unpickled: the test fails loudly if anything loads it.
    (src / "diffusion_pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    _fails(src, tmp_path, "refusing pickle")
    _fails(src / "diffusion_pytorch_model.bin", tmp_path, "refusing pickle")
    assert not os.path.exists("pwned")


@pytest.mark.parametrize("tensor", ["layers.1.feed_forward.w3.weight", "layers.1.feed_forward.w2.weight"],
                         ids=["quantized", "protected"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_in_weight_names_the_tensor(tmp_path, tensor, value):
    src = testing.build_checkpoint(tmp_path / "src", fmt="bf16", max_shard_size="100MB")
    f = src / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file
    sd = load_file(f)
    sd[tensor][3, 5] = float(value)
    save_file(sd, f, metadata={"format": "pt"})
    _fails(src, tmp_path, f"{tensor} contains NaN or Inf")
    with pytest.raises(IdeoquantError, match=f"{tensor} contains NaN or Inf"):
        ideoquant.convert_gguf(str(src), tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_unknown_recipe(bf16_source, tmp_path):
    _fails(bf16_source, tmp_path, "unknown recipe 'nope'", recipe="nope")


def test_not_enough_disk(bf16_source, tmp_path, monkeypatch):
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    _fails(bf16_source, tmp_path, "not enough free disk")


def test_existing_out_needs_overwrite_and_survives_failures(bf16_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(IdeoquantError, match="already exists"):
        ideoquant.convert(str(bf16_source), out)
    with pytest.raises(IdeoquantError, match="unknown recipe"):
        ideoquant.convert(str(bf16_source), out, overwrite=True, recipe="nope")
    assert (out / "keep.txt").read_text() == "old"
    ideoquant.convert(str(bf16_source), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "ideoquant.json").exists()
    assert _leftovers(tmp_path, "out") == ["out"]


def test_killed_process_leaves_no_out(tmp_path):
    """SIGKILL halfway: no cleanup code runs, yet OUT never appears (only the hidden staging folder)."""
    src = testing.build_checkpoint(tmp_path / "src", fmt="bf16",
                                config={**testing.TINY_CONFIG, "num_layers": 8, "llm_features_dim": 4096})
    out = tmp_path / "out"
    # the slowest encoder path on one thread, so the run is still writing when it is caught
    proc = subprocess.Popen([sys.executable, "-m", "ideoquant", "gguf", str(src), "--out", str(out), "--type", "q4_1",
                             "--imatrix", "ones", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    staged = []
    while time.time() < deadline and proc.poll() is None:
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and any(p.glob("*.gguf"))]
        if staged:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staged, "the conversion finished before it could be killed"
    assert not out.exists()
    # The next run cleans up the dead run's staging folder and succeeds.
    ideoquant.convert_gguf(str(src), out, qtype="q8_0", components=["transformer"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


@pytest.mark.parametrize("args,message", [
    (["convert", "{src}", "--recipe", "nope"], "unknown recipe"),
    (["gguf", "{src}", "--type", "q9_k"], "unknown --type 'q9_k'"),
    (["gguf", "{src}", "--type-rule", "noequals"], "bad --type-rule"),
    (["gguf", "{src}", "--type-rule", "([=Q8_0"], "bad type rule regex"),
    (["gguf", "{src}", "--type-rule", "w1=Q9_K"], "unknown GGUF type 'Q9_K'"),
    (["convert", "{src}", "--protect", "layers.*.nothing"], "matches no module"),
    (["convert", "/nonexistent/path"], "source not found"),
    (["convert", "{src}", "--components", "vae"], "unknown component 'vae'"),
    (["convert", "{src}", "--device", "tpu"], "device"),
])
def test_cli_errors_are_one_line_exit_2(bf16_source, tmp_path, args, message):
    args = [a.format(src=bf16_source) for a in args] + ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_already_quantized_source_is_refused(bf16_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bf16_source, src)
    for c in ("transformer", "unconditional_transformer"):
        cfg = json.loads((src / c / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (src / c / "config.json").write_text(json.dumps(cfg))
    _fails(src, tmp_path, "already quantized")


@pytest.mark.parametrize("fault", ["nan-code", "inf-scale"])
@pytest.mark.parametrize("kind", ["gguf", "int8"])
def test_fp8_nan_or_inf_is_found_as_it_is_dequantized(tmp_path, fault, kind):
    """A NaN code (0x7F) in an FP8 weight, or a scale that overflows, stops the run naming the tensor (found in the
    dequantizing pass itself, for quantized and protected weights alike)."""
    import torch
    from safetensors.torch import load_file, save_file

    src = testing.build_checkpoint(tmp_path / "src", fmt="fp8", layout="official")
    f = src / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    name = "layers.1.feed_forward.w2.weight"  # protected in both formats: kept, not quantized
    if fault == "nan-code":
        codes = sd[name].view(torch.uint8).clone()
        codes[3, 5] = 0x7F
        sd[name] = codes.view(torch.float8_e4m3fn)
    else:
        sd[name + "_scale"][2] = 3e38  # 448 * 3e38 overflows float32
    save_file(sd, f, metadata={"format": "pt"})
    args = [kind if kind == "gguf" else "convert", str(src), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"tensor {name} contains NaN or Inf" in result.output and not (tmp_path / "out").exists()
