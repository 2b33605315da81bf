"""`verify`: an output folder against its manifest (files, hashes, unlisted files, stored recipe, loading)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import ideoquant
from ideoquant.errors import IdeoquantError
from ideoquant.publish.verify import verify

SHARD = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, bf16_source):
    """The tiny source (tests/conftest.py), converted once to INT8 and once to GGUF; tests tamper with copies."""
    root = tmp_path_factory.mktemp("verify")
    ideoquant.convert(bf16_source, root / "int8")
    ideoquant.convert_gguf(bf16_source, root / "gguf", recipe="gguf-q4_k_m")
    return root


@pytest.fixture
def int8_out(outputs, tmp_path):
    return shutil.copytree(outputs / "int8", tmp_path / "out")


@pytest.fixture
def gguf_out(outputs, tmp_path):
    return shutil.copytree(outputs / "gguf", tmp_path / "out")


def _edit_manifest(folder, edit):
    path = folder / "ideoquant.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def test_fresh_int8_output_verifies(int8_out):
    r = verify(int8_out)
    assert r.ok and r.problems == []
    text = "\n".join(r.checks)
    assert "files match the manifest" in text and "transformer: loads" in text
    assert "unconditional_transformer: config.json protects" in text
    # `verify --json`: exit 0, and a load check for every backbone the manifest file lists
    from ideoquant.cli import app

    result = CliRunner().invoke(app, ["verify", str(int8_out), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    listed = json.loads((int8_out / "ideoquant.json").read_text())["components"]
    assert d["ok"] is True and d["problems"] == []
    assert {c.split(":")[0] for c in d["checks"] if ": loads" in c} == set(listed)


def test_fresh_gguf_output_verifies(gguf_out):
    r = verify(gguf_out)
    assert r.ok, r.problems
    assert any("GGML types as recorded" in c and "Q4_K" in c for c in r.checks)
    assert any(c.startswith("unconditional_transformer: loads") for c in r.checks)


def test_one_changed_byte_names_the_file(int8_out):
    shard = int8_out / SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, deep in the tensor data: only the hash can tell
    shard.write_bytes(bytes(data))
    r = verify(int8_out)
    assert not r.ok
    assert any(SHARD in p and "sha256" in p for p in r.problems)
    assert not any(p.startswith("unconditional_transformer") for p in r.problems)  # the other backbone is fine


def test_deleted_file(int8_out):
    (int8_out / "unconditional_transformer" / "config.json").unlink()
    r = verify(int8_out, load=False)
    assert not r.ok and any("unconditional_transformer/config.json: missing" in p for p in r.problems)


def test_stray_weights_are_a_problem_other_files_are_not(int8_out):
    (int8_out / "README.md").write_text("# my notes\n")  # upload replaces it with the card
    (int8_out / "notes.txt").write_text("hello\n")
    (int8_out / ".cache").mkdir()
    (int8_out / ".cache" / "x.safetensors").write_bytes(b"cache")
    assert verify(int8_out, load=False).ok

    shutil.copy(int8_out / SHARD, int8_out / "transformer" / "diffusion_pytorch_model-old.safetensors")
    r = verify(int8_out, load=False)
    assert not r.ok
    assert r.problems == ["transformer/diffusion_pytorch_model-old.safetensors: unexpected file, not in the manifest"]


def test_missing_or_invalid_manifest_raises(int8_out, tmp_path):
    (int8_out / "ideoquant.json").write_text("{not json")
    with pytest.raises(IdeoquantError, match="not valid JSON"):
        verify(int8_out)
    (int8_out / "ideoquant.json").unlink()
    with pytest.raises(IdeoquantError, match="no ideoquant.json"):
        verify(int8_out)
    with pytest.raises(IdeoquantError, match="no such folder"):
        verify(tmp_path / "nowhere")


def test_protected_list_disagrees_with_config(int8_out):
    _edit_manifest(int8_out, lambda m: m["components"]["transformer"]["protected_modules"].pop())
    r = verify(int8_out, load=False)
    assert not r.ok
    assert any(p.startswith("transformer:") and "modules_to_not_convert" in p for p in r.problems)


def test_recorded_decision_disagrees_with_stored_tensors(int8_out):
    def flip(m):
        t = next(t for t in m["components"]["transformer"]["tensors"] if t["decision"] == "quantized")
        t["decision"], t["dtype_out"] = "kept", "BF16"

    _edit_manifest(int8_out, flip)
    r = verify(int8_out, load=False)
    assert not r.ok
    assert any("input_proj.weight is 'kept' in the manifest but input_proj.weight is not stored" in p
               for p in r.problems)
    assert any("input_proj._weight_qdata is not in the manifest" in p for p in r.problems)


def test_gguf_type_disagrees_with_manifest(gguf_out):
    def retype(m):
        t = next(t for t in m["components"]["transformer"]["tensors"] if t["dtype_out"] == "Q4_K")
        t["dtype_out"] = "Q8_0"

    _edit_manifest(gguf_out, retype)
    r = verify(gguf_out, load=False)
    assert not r.ok and len(r.problems) == 1
    assert "is Q4_K in ideogram4-transformer-Q4_K_M.gguf, the manifest says Q8_0" in r.problems[0]


def test_cli_verify_exit_codes(int8_out):
    from ideoquant.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(int8_out)])
    assert ok.exit_code == 0, ok.output
    assert "verified" in ok.output

    as_json = runner.invoke(app, ["verify", str(int8_out), "--no-load", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["ok"] is True

    (int8_out / "transformer" / "config.json").write_text("{}")
    bad = runner.invoke(app, ["verify", str(int8_out), "--no-load"])
    assert bad.exit_code == 1
    assert "transformer/config.json" in bad.output

    (int8_out / "ideoquant.json").unlink()
    assert runner.invoke(app, ["verify", str(int8_out)]).exit_code == 2  # no manifest: a user error
