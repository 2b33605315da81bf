"""The CLI is a thin layer: each command runs the API and renders it."""

import json

from typer.testing import CliRunner

from ideoquant.cli import app

runner = CliRunner()


def test_convert_and_inspect_and_recipes(bf16_source, tmp_path):
    out = tmp_path / "int8"
    r = runner.invoke(app, ["convert", str(bf16_source), "--out", str(out), "--max-shard-size", "1MB"])
    assert r.exit_code == 0, r.output
    assert "transformer" in r.output and "ideoquant.json" in r.output
    # Each backbone's time comes with its rate (a fast backbone reads as fast), and the command's wall time.
    m = json.loads((out / "ideoquant.json").read_text())
    assert m["components"]["transformer"]["seconds"] > 0
    assert "iB/s" in r.output and "total:" in r.output and "s wall" in r.output
    assert (out / "transformer" / "config.json").exists()

    r = runner.invoke(app, ["convert", str(bf16_source), "--out", str(out), "--json", "--overwrite",
                            "--components", "transformer"])
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.stdout)["components"]) == ["transformer"]

    r = runner.invoke(app, ["inspect", str(bf16_source), "--json"])
    report = json.loads(r.stdout)
    assert report["components"]["transformer"]["quantized"] == 20
    assert report["gpu"]["fits"] is True
    r = runner.invoke(app, ["inspect", str(bf16_source), "--type", "q4_k_m"])
    assert r.exit_code == 0 and "Q6_K" in r.output and "fits" in r.output

    r = runner.invoke(app, ["recipes", "--json"])
    assert {x["name"] for x in json.loads(r.stdout)} >= {"int8-w8a8", "gguf"}


def test_gguf_command(bf16_source, tmp_path):
    """--layout diffusers says so in the file names, the manifest's warnings and the output; --arch is written as
    general.architecture (read back with gguf-py, not ideoquant)."""
    import gguf

    out = tmp_path / "g"
    r = runner.invoke(app, ["gguf", str(bf16_source), "--out", str(out), "--type", "q8_0", "--layout", "diffusers"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("*.gguf")) == ["ideogram4-transformer-Q8_0-diffusers.gguf",
                                                          "ideogram4-unconditional_transformer-Q8_0-diffusers.gguf"]
    m = json.loads((out / "ideoquant.json").read_text())
    assert len(m["warnings"]) == 1 and "wrong images" in m["warnings"][0] and m["gguf"]["layout"] == "diffusers"
    assert "warning:" in r.output and "ComfyUI" in r.output and "wrong images" in r.output

    def arch(path):
        return gguf.GGUFReader(str(path)).fields["general.architecture"].contents()

    assert arch(out / "ideogram4-transformer-Q8_0-diffusers.gguf") == "ideogram4"
    out2 = tmp_path / "g2"
    r = runner.invoke(app, ["gguf", str(bf16_source), "--out", str(out2), "--type", "q8_0", "--arch", "ideogram",
                            "--components", "unconditional_transformer", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["warnings"] == [] and m["gguf"] == {"arch": "ideogram", "layout": "original", "label": "Q8_0"}
    assert "warning:" not in r.output
    assert [p.name for p in out2.glob("*.gguf")] == ["ideogram4-unconditional_transformer-Q8_0.gguf"]
    assert arch(out2 / "ideogram4-unconditional_transformer-Q8_0.gguf") == "ideogram"
    r = runner.invoke(app, ["gguf", str(bf16_source), "--out", str(tmp_path / "g3"), "--arch", "Ideogram 4"])
    assert r.exit_code == 2 and "not an architecture name" in r.output and not (tmp_path / "g3").exists()


def test_demo(tmp_path, monkeypatch):
    # Each pair of progress bars names its variant; speeds in binary units, as the tables.
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    for label in ("int8-w8a8", "gguf-q8_0", "gguf-q4_k", "gguf-q4_k_m"):
        for c in ("transformer", "unconditional_transformer"):
            assert f"{label}/{c} " in r.output, (label, c)
    assert "iB/s" in r.output and "MB/s" not in r.output
    # It ends with a 4-prompt bench of a tiny complete pipeline: images, scored against the source's.
    bench = json.loads((tmp_path / "demo" / "bench" / "results.json").read_text())
    assert len({e["prompt_id"] for e in bench["images"]}) == 4 and len(bench["images"]) == 12
    assert bench["summary"]["pipeline-int8"]["psnr"]["mean"] > 30
    assert (tmp_path / "demo" / "bench" / "index.html").is_file() and "index.html" in r.output
    # Made in a staging folder, its records name the folders where they are now.
    assert bench["settings"]["source"] == str(tmp_path / "demo" / "pipeline")
    assert str(tmp_path / "demo" / "pipeline-int8") in (tmp_path / "demo" / "bench" / "index.html").read_text()
    # Without the bench extra it says what to install instead (as a table: tests/test_output_policy.py).
    from ideoquant import demo

    monkeypatch.setattr(demo, "BENCH_MODULES", ("not_an_installed_module",))
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--json", "--overwrite"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["bench"] == {"missing": "not_an_installed_module", "install": 'pip install "ideoquant[bench]"'}
    names = [v["name"] for v in report["variants"]]
    assert names == ["int8-w8a8", "gguf q8_0", "gguf q4_k", "gguf q4_k_m"]
    by = {v["name"]: v for v in report["variants"]}
    assert by["gguf q8_0"]["sqnr_db"] > by["gguf q4_k"]["sqnr_db"] > 30
    assert by["gguf q4_k"]["bytes"] < by["int8-w8a8"]["bytes"] < report["source_bytes"]


def test_import_and_help_do_not_import_torch():
    """`import ideoquant` and `ideoquant --help` stay instant: torch (and diffusers) load only when a command needs them."""
    import subprocess
    import sys

    code = ("import sys, ideoquant; from ideoquant.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'diffusers', 'torchao') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert callable(__import__("ideoquant").convert)  # the lazy names resolve


def test_error_is_the_first_and_only_line(tmp_path):
    """No blank line (an empty progress display) before `error:`; with --json the error is a JSON document."""
    r = runner.invoke(app, ["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error: source not found") and r.output.count("\n") == 1
    r = runner.invoke(app, ["gguf", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 2 and json.loads(r.stdout) == {"error": json.loads(r.stdout)["error"], "exit_code": 2}
    assert "source not found" in json.loads(r.stdout)["error"]


def test_a_run_failing_mid_job_prints_only_its_error(bf16_source, tmp_path):
    """After the progress display has started: still exactly one line (no bars, no blank line)."""
    import numpy as np

    from ideoquant import imatrix

    entry = imatrix.Entry(np.ones((1, 10), np.float32), np.ones(1, np.float32))  # 10 columns: the tensor has 512
    imatrix.write_gguf(tmp_path / "bad.gguf", imatrix.ImportanceMatrix({"llm_cond_proj.weight": entry}, ["x"], 1, 512))
    r = runner.invoke(app, ["gguf", str(bf16_source), "--out", str(tmp_path / "o"), "--imatrix", str(tmp_path / "bad.gguf")])
    assert r.exit_code == 2 and r.output.count("\n") == 1, repr(r.output)
    assert r.output.startswith("error: imatrix entry for llm_cond_proj.weight has 10 columns, the tensor has 512")
    assert not (tmp_path / "o").exists()
