"""Issue 17: every command that writes a file keeps the promises `convert` keeps (`write.target`).

For each writing command: an output at a file of the source, a folder of the source, a folder holding the source,
an existing file (with and without --overwrite) and an unwritable place. Refused: exit 2, one `error:` line, the
source's bytes and an existing output unchanged, nothing left behind. A SIGTERM mid-run leaves the old file. A
property test over spellings of the source's own paths (`..`, symlinks, hard links): never a write inside it.
(`convert` and `gguf` write folders: tests/test_safety.py holds them to the same rules.)
"""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ideoquant import IdeoquantError, manifest, model, testing
from ideoquant.write.target import output_file, source_paths
from tests.test_safety import REPO, _cli, _debris, _read_only_folder, _tree

SAMPLE = ["--steps", "1", "--tokens", "4", "--grid", "2", "--batch", "1"]
OLD = b"an existing output\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny source, a captured-inputs file and a fake base pipeline folder, in one folder (all are inputs)."""
    root = tmp_path_factory.mktemp("policy")
    src = testing.build_checkpoint(root / "src", fmt="bf16", max_shard_size="1MB")
    from ideoquant.evaluation.inputs import capture, sample_calls

    class Backbone(torch.nn.Module):
        def forward(self, **kwargs):
            return None

    class Pipeline:  # what `capture` needs of a pipeline: the two backbones, called once per step
        transformer, unconditional_transformer = Backbone(), Backbone()

        def __call__(self, calls):
            for step in calls.calls:
                for c, kwargs in step.items():
                    getattr(self, c)(**kwargs)

    capture(Pipeline(), root / "inputs.safetensors", sample_calls(testing.TINY_CONFIG, steps=1, tokens=4, grid=2,
                                                                   batch=1))
    base = root / "base"
    base.mkdir()
    (base / "model_index.json").write_text(json.dumps({"_class_name": model.PIPELINE_CLASS}))
    (base / "vae").mkdir()
    (base / "vae" / "config.json").write_text("{}")
    return root


# (command, option): the CLI arguments that make it write `out`; `source` is what it reads.
def _args(command: str, work: Path, out: Path) -> list:
    src = work / "src"
    return {
        "calibrate --out": ["calibrate", src, "--out", out, *SAMPLE],
        "calibrate --imatrix": ["calibrate", src, "--imatrix", out, *SAMPLE],
        "sensitivity --write-recipe": ["sensitivity", src, "--group", "--write-recipe", out, "--protect-top", "1",
                                       "--components", "transformer", *SAMPLE],
        "sensitivity --plot": ["sensitivity", src, "--group", "--plot", out, "--components", "transformer",
                               *SAMPLE],
        "eval --plot": ["eval", src, "--baselines", "fp8", "--components", "transformer", "--layer-rows", "2",
                        "--plot", out, *SAMPLE],
        "eval --plot (inputs)": ["eval", src, "--baselines", "fp8", "--components", "transformer", "--plot", out,
                                 "--inputs", work / "inputs.safetensors"],
        "capture --out": ["capture", "--base", work / "base", "--out", out],
    }[command]


COMMANDS = ["calibrate --out", "calibrate --imatrix", "sensitivity --write-recipe", "sensitivity --plot",
            "eval --plot", "eval --plot (inputs)", "capture --out"]


def _source_of(command: str, work: Path) -> Path:
    return work / ("base" if command.startswith("capture") else "src")


def _refused(command, work, out, *needles, overwrite=True):
    before = _tree(work)
    _cli([*_args(command, work, out), *(["--overwrite"] if overwrite else [])], 2, *needles)
    assert _tree(work) == before
    near = next(p for p in Path(out).absolute().parents if p.is_dir())
    assert _debris(work) == [] and _debris(near) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_output_at_a_file_of_the_source(work, command):
    source = _source_of(command, work)
    f = sorted(p for p in source.rglob("*") if p.is_file())[-1]
    _refused(command, work, f, "the source")
    # through a symlinked folder and `..`
    link = work.parent / f"link-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(f.parent)
    try:
        _refused(command, work, link / ".." / f.parent.name / f.name, "the source")
    finally:
        link.unlink()
    if command == "eval --plot (inputs)":  # a file the command reads besides SOURCE
        _refused(command, work, work / "inputs.safetensors", "is the source")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_at_a_folder_of_the_source(work, command):
    source = _source_of(command, work)
    sub = next(p for p in sorted(source.iterdir()) if p.is_dir())
    _refused(command, work, sub, "the source")
    _refused(command, work, source, "is the source")
    _refused(command, work, sub / "new.bin", "lies inside the source", overwrite=False)  # would join the source


@pytest.mark.parametrize("command", COMMANDS)
def test_output_at_a_folder_holding_the_source(work, command):
    _refused(command, work, work, "contains the source")
    _refused(command, work, work.parent, "contains the source")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_at_an_unwritable_place(work, command, tmp_path, monkeypatch):
    with _read_only_folder(tmp_path / "ro", monkeypatch) as ro:
        _refused(command, work, ro / "new" / "out.bin", str(ro), "not writable")
        assert list(ro.iterdir()) == []
    (tmp_path / "afile").write_bytes(OLD)
    _refused(command, work, tmp_path / "afile" / "out.bin", "afile", "not a folder")
    assert (tmp_path / "afile").read_bytes() == OLD


@pytest.mark.parametrize("command", COMMANDS)
def test_existing_output_needs_overwrite(work, command, tmp_path):
    out = tmp_path / "existing.png"
    out.write_bytes(OLD)
    _refused(command, work, out, "already exists", "--overwrite", overwrite=False)
    assert out.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.png"]


# The runs that succeed: the existing file is replaced by a complete new one, nothing else is left.
SUCCEEDS = {
    "calibrate --out": lambda out: _safetensors_meta(out, "ideoquant.smoothquant"),
    "calibrate --imatrix": lambda out: __import__("gguf").GGUFReader(str(out)).fields["general.type"].contents()
    == "imatrix",
    "sensitivity --write-recipe": lambda out: __import__("tomllib").loads(out.read_text())["name"] == out.stem,
    "eval --plot (inputs)": lambda out: out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n",
}


def _safetensors_meta(path: Path, key: str) -> bool:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return key in (f.metadata() or {})


@pytest.mark.parametrize("command", list(SUCCEEDS))
def test_existing_output_replaced_with_overwrite(work, command, tmp_path, one_torch_thread):
    out = tmp_path / ("existing.toml" if "recipe" in command else "existing.png" if "plot" in command
                      else "existing.bin")
    out.write_bytes(OLD)
    before = _tree(work)
    _cli([*_args(command, work, out), "--overwrite"], 0)
    assert out.read_bytes() != OLD and SUCCEEDS[command](out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file, no lock
    assert _tree(work) == before


def test_plot_and_recipe_cannot_be_one_file(work, tmp_path):
    out = tmp_path / "x.png"
    _cli(["sensitivity", work / "src", "--plot", out, "--write-recipe", out, "--protect-top", "1"], 2, "same file")


def test_unknown_plot_format_is_refused_before_work(work, tmp_path):
    _cli(["eval", work / "src", "--plot", tmp_path / "x.notanimage"], 2, "unknown image format")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- --base


@pytest.mark.parametrize("base", ["../../etc", "/etc", "org/na..me", "a/b/c", "", "justaname"])
def test_base_is_a_repo_id_or_a_pipeline_folder(work, tmp_path, base):
    from ideoquant.load import load_pipeline

    folder = work / "src" / "transformer"  # exists, but is no pipeline (no model_index.json naming one)
    for b in (base, str(folder)):
        _cli(["capture", "--base", b, "--out", tmp_path / "c.safetensors"], 2, "--base")
        _cli(["upload", work / "src", "--repo-id", "me/x", "--base", b, "--dry-run"], 2, "--base")
        with pytest.raises(IdeoquantError, match="base"):
            load_pipeline(work / "src", base=b)
    assert list(tmp_path.iterdir()) == []


def test_base_folder_and_repo_id_accepted(work):
    from ideoquant.source.hub import check_base

    check_base("ideogram-ai/ideogram-4-nf4-diffusers")
    check_base(work / "base")


# ---------------------------------------------------------------- SIGTERM mid-run


def _run_and_terminate(args: list, out: Path) -> subprocess.CompletedProcess:
    """Start the command, stop it as soon as it holds OUT's lock (the run has begun: models load, inputs are
    read), deliver SIGTERM, and let it finish."""
    proc = subprocess.Popen([sys.executable, "-m", "ideoquant", *map(str, args), "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lock = out.parent / f".{out.name}.ideoquant.lock"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not lock.exists():
        time.sleep(0.005)
    if proc.poll() is not None or not lock.exists():
        proc.kill()
        pytest.fail(f"the command did not get to running: {proc.communicate()[1]}")
    proc.send_signal(signal.SIGSTOP)  # held mid-run, however fast the tiny model is
    proc.send_signal(signal.SIGTERM)  # delivered when it continues
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


@pytest.mark.parametrize("command", ["calibrate --imatrix", "sensitivity --write-recipe", "eval --plot (inputs)"])
def test_sigterm_mid_run_leaves_the_old_file(work, command, tmp_path):
    out = tmp_path / ("old.toml" if "recipe" in command else "old.png" if "plot" in command else "old.bin")
    out.write_bytes(OLD)
    before = _tree(work)
    r = _run_and_terminate(_args(command, work, out), out)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted (SIGTERM)" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert out.read_bytes() == OLD and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert _tree(work) == before


# ---------------------------------------------------------------- the property


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    """A source folder with files and a subfolder, and outside it: a symlink to the source, a symlink to one of its
    files, a symlink to a subfolder, a hard link to a file, and a plain folder."""
    root = tmp_path_factory.mktemp("maze")
    src = root / "src"
    (src / "transformer").mkdir(parents=True)
    for name, data in (("model_index.json", b"{}"), ("transformer/config.json", b"{}"),
                       ("transformer/w.safetensors", b"weights")):
        (src / name).write_bytes(data)
    out = root / "out"
    out.mkdir()
    (out / "to-src").symlink_to(src)
    (out / "to-file").symlink_to(src / "transformer" / "w.safetensors")
    (out / "to-sub").symlink_to(src / "transformer")
    os.link(src / "transformer" / "config.json", out / "hard.json")
    (out / "plain").mkdir()
    return root


STARTS = ["src", "src/transformer", "src/transformer/w.safetensors", "src/model_index.json", "out", "out/to-src",
          "out/to-file", "out/to-sub", "out/hard.json", "out/plain", "."]
STEPS = ["..", ".", "transformer", "w.safetensors", "config.json", "model_index.json", "to-src", "to-file",
         "to-sub", "hard.json", "plain", "new.bin", "src", "out"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.sampled_from(STARTS), steps=st.lists(st.sampled_from(STEPS), max_size=5),
       relative=st.booleans(), overwrite=st.booleans())
def test_no_spelling_of_a_target_writes_inside_the_source(maze, start, steps, relative, overwrite):
    src = maze / "src"
    before = _tree(maze / "src")
    links = {p: os.readlink(p) for p in (maze / "out").iterdir() if p.is_symlink()}
    target = Path(os.path.join(maze, start, *steps))
    if relative:
        target = Path(os.path.relpath(target, Path.cwd()))
    real_src = Path(os.path.realpath(src))
    inodes = {(s.st_dev, s.st_ino) for s in (os.stat(p) for p in src.rglob("*"))}
    written = None
    try:
        with output_file(target, source_paths(str(src)), overwrite=overwrite) as tmp:
            tmp.write_bytes(b"new")
        written = Path(os.path.realpath(os.path.join(os.path.realpath(target.parent), target.name)))
    except IdeoquantError:
        pass
    assert _tree(src) == before, target
    assert {p: os.readlink(p) for p in (maze / "out").iterdir() if p.is_symlink()} == links
    assert not [p for p in maze.rglob("*") if ".ideoquant" in p.name]
    if written is not None:  # a write happened: outside the source, and to no inode of it
        assert real_src not in written.parents and written != real_src, (target, written)
        assert (os.stat(written).st_dev, os.stat(written).st_ino) not in inodes
        assert Path(written).read_bytes() == b"new"
        os.unlink(written)


def test_the_policy_is_checked_before_the_work(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(OLD)
    with pytest.raises(IdeoquantError, match="inside the source"):
        with output_file(src / "a.bin", source_paths(str(src)), overwrite=True):
            raise AssertionError("the body ran")
    with pytest.raises(KeyboardInterrupt):  # an interrupt while writing: the old file stays, nothing else
        with output_file(tmp_path / "o.bin", overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert hashlib.sha256((src / "a.bin").read_bytes()).digest() == hashlib.sha256(OLD).digest()


# ---------------------------------------------------------------- demo (writes a folder, reads no input)


def test_demo_folder_follows_the_policy(tmp_path, monkeypatch, one_torch_thread):
    from ideoquant import demo

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_bytes(OLD)
    before = _tree(out)
    _cli(["demo", "--out", out], 2, "already exists", "--overwrite")
    assert _tree(out) == before and _debris(tmp_path) == []

    def fails(*args, **kwargs):  # a failure midway, after the INT8 conversion was written
        raise IdeoquantError("the GGUF conversion failed")

    with monkeypatch.context() as m:
        m.setattr(demo, "convert_gguf", fails)
        _cli(["demo", "--out", out, "--overwrite"], 2, "the GGUF conversion failed")
    assert _tree(out) == before and _debris(tmp_path) == []

    monkeypatch.setattr(demo, "BENCH_MODULES", ("not_an_installed_module",))  # the bench: tests/test_cli.py
    r = _cli(["demo", "--out", out, "--overwrite"], 0)
    assert 'pip install "ideoquant[bench]"' in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert not (out / "notes.txt").exists() and (out / ".ideoquant-demo").is_file()
    # The records name the folders where they are now, not where they were made.
    for variant in ("int8", "gguf-q8_0", "gguf-q4_k", "gguf-q4_k_m"):
        assert manifest.read(out / variant)["source"]["spec"] == str(out / "source")
