"""Issue 11, the output side: nothing lost, nothing silent.

Every refused case asserts: exit code 2 (or 128 + signal), exactly one line `error: ...` naming the file, tensor or
option, no traceback, no staging or partial output left, the source unchanged, an existing --out intact.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ideoquant
from ideoquant import IdeoquantError, testing
from ideoquant.cli import app

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers


def _tree(root: Path) -> dict:
    """Every entry under root (links not followed) -> its kind and content hash: 'the source is unchanged'."""
    root = Path(root)
    out = {}
    paths = [root] if not root.is_dir() or root.is_symlink() else [root, *sorted(root.rglob("*"))]
    for p in paths:
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        elif p.is_dir():
            out[str(p)] = ("dir",)
    return out


def _debris(folder: Path) -> list[str]:
    """Staging folders, moved-aside outputs and lock files an ideoquant run leaves beside OUT."""
    return sorted(p.name for p in Path(folder).iterdir() if ".ideoquant" in p.name)


def _one_error_line(output: str, *needles: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _cli(args, code=2, *needles):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    if code == 2:
        _one_error_line(result.output, *needles)
    return result


@pytest.fixture
def src(bf16_source, tmp_path):
    """A private copy of the tiny pipeline folder (a test that failed to protect it must not break the others)."""
    return Path(shutil.copytree(bf16_source, tmp_path / "work" / "src", symlinks=True))


@pytest.fixture
def old_out(tmp_path):
    """An existing --out that every failure must leave as it was."""
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old")
    return out


# ---------------------------------------------------------------- 1. data loss


def _hf_cache(tmp_path: Path, source: Path) -> Path:
    """A Hugging Face cache layout: snapshots/<commit>/... are symlinks into blobs/<sha256>."""
    repo = tmp_path / "hub" / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("c" * 40)
    blobs.mkdir(parents=True)
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        link = snap / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    return snap


def _out_spelling(case: str, src: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(source to convert, --out) for each way of naming the source."""
    if case == "same":
        return src, src
    if case == "parent":
        return src, src.parent
    if case == "grandparent":
        return src, src.parent.parent
    if case == "symlink":
        link = tmp_path / "link"
        link.symlink_to(src)
        return src, link
    if case == "dotdot":
        return src, src / "transformer" / ".."
    if case == "relative-dotdot":
        return src, Path(os.path.relpath(src, Path.cwd())) / "." / "transformer" / ".." / ".." / src.name
    if case == "component-folder":
        return src, src / "transformer"
    if case == "source-file":
        return src, sorted((src / "transformer").glob("*.safetensors"))[0]
    if case == "existing-non-output-inside":
        (src / "vae").mkdir()
        (src / "vae" / "weights.bin").write_bytes(b"vae")
        return src, src / "vae"
    if case == "hardlink":
        f = sorted((src / "transformer").glob("*.safetensors"))[0]
        os.link(f, tmp_path / "hard.safetensors")
        return f, tmp_path / "hard.safetensors"
    if case == "source-via-symlinked-folder":
        link = tmp_path / "srclink"
        link.symlink_to(src)
        return link, src
    if case == "hf-snapshot":
        return _hf_cache(tmp_path, src), tmp_path / "hub" / "models--org--name" / "snapshots"
    if case == "hf-repo":
        return _hf_cache(tmp_path, src), tmp_path / "hub" / "models--org--name"
    if case == "hf-blobs":
        return _hf_cache(tmp_path, src), tmp_path / "hub" / "models--org--name" / "blobs"
    if case == "hf-blob-file":
        snap = _hf_cache(tmp_path, src)
        return snap, sorted((snap.parent.parent / "blobs").iterdir())[0]
    raise AssertionError(case)


DATA_LOSS = ["same", "parent", "grandparent", "symlink", "dotdot", "relative-dotdot", "component-folder",
             "source-file", "existing-non-output-inside", "hardlink", "source-via-symlinked-folder", "hf-snapshot",
             "hf-repo", "hf-blobs", "hf-blob-file"]


@pytest.mark.parametrize("case", DATA_LOSS)
def test_out_over_the_source_is_refused(src, tmp_path, case):
    source, out = _out_spelling(case, src, tmp_path)
    protected = tmp_path  # everything: the source, its cache, its parents
    before = _tree(protected)
    _cli(["convert", source, "--out", out, "--overwrite"], 2, "the source", "--out")
    assert _tree(protected) == before


def test_out_over_a_single_file_source_is_refused(original_source, tmp_path):
    f = Path(shutil.copy(original_source, tmp_path / "ideogram4.safetensors"))
    before = _tree(tmp_path)
    _cli(["gguf", f, "--out", f, "--overwrite"], 2, "is the source")
    _cli(["convert", f, "--out", tmp_path, "--overwrite"], 2, "contains the source")
    assert _tree(tmp_path) == before


def test_library_refuses_out_over_the_source_too(src):
    before = _tree(src.parent)
    with pytest.raises(IdeoquantError, match="the source"):
        ideoquant.convert(str(src), src.parent, overwrite=True)
    with pytest.raises(IdeoquantError, match="the source"):
        ideoquant.convert_gguf(str(src), src, overwrite=True, qtype="q8_0")
    assert _tree(src.parent) == before


def test_a_new_output_inside_the_source_folder_is_fine(src):
    before = _tree(src)
    out = src / "int8"
    _cli(["convert", src, "--out", out], 0)
    assert (out / "ideoquant.json").is_file()
    _cli(["convert", src, "--out", out, "--overwrite"], 0)  # an earlier output there may be replaced
    after = _tree(src)
    assert {k: v for k, v in after.items() if not k.startswith(str(out))} == before
    assert _debris(src) == []


# ---------------------------------------------------------------- 2. one line, exit 2


def test_wrong_recipe_kind_for_the_command(src, tmp_path, old_out):
    _cli(["convert", src, "--recipe", "gguf", "--out", old_out, "--overwrite"], 2, "gguf", "recipe")
    _cli(["gguf", src, "--recipe", "int8-w8a8", "--out", old_out, "--overwrite"], 2, "int8", "recipe")
    assert (old_out / "keep.txt").read_text() == "old" and _debris(old_out.parent) == []


@pytest.mark.parametrize("size", ["junk", "-1GB", "0", "5XB", "1e999GB", "nanGB", "", "12 parsecs", "3"])
def test_max_shard_size_junk(src, old_out, size):
    _cli(["convert", src, "--max-shard-size", size, "--out", old_out, "--overwrite"], 2, "--max-shard-size")
    assert (old_out / "keep.txt").read_text() == "old" and _debris(old_out.parent) == []


def test_parse_size_accepts_the_usual_spellings():
    from ideoquant.write.safetensors import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 << 20 and parse_size(" 1.5 gb ") == 15 * 10**8
    assert parse_size("4096") == 4096 and parse_size(10**6) == 10**6


@pytest.mark.parametrize("threads", ["0", "-3", "many"])
def test_threads_out_of_range(src, old_out, threads):
    _cli(["gguf", src, "--threads", threads, "--out", old_out, "--overwrite"], 2, "--threads")
    assert (old_out / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, 10**6])
def test_library_threads_out_of_range(src, tmp_path, threads):
    from ideoquant.workers import thread_count

    with pytest.raises(IdeoquantError, match="--threads"):
        thread_count(threads)
    with pytest.raises(IdeoquantError, match="--threads"):
        ideoquant.convert(str(src), tmp_path / "o", threads=threads)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["--tokens", "100000000"], "--tokens"), (["--tokens", "0"], "--tokens"), (["--grid", "0"], "--grid"),
    (["--batch", "-1"], "--batch"), (["--steps", "0"], "--steps"), (["--grid", "100000"], "--grid"),
])
def test_eval_sizes_out_of_range(bf16_source, args, needle):
    _cli(["eval", bf16_source, bf16_source, "--baselines", "none", *args], 2, needle)


def test_library_sample_sizes_are_bounded_before_allocating():
    import resource

    from ideoquant.evaluation.inputs import check_sample_size, sample_calls

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for kw in ({"tokens": 10**8}, {"tokens": 0}, {"grid": 0}, {"batch": -2}, {"steps": 0}, {"grid": (4, 10**6)},
               {"tokens": 2.5}):
        with pytest.raises(IdeoquantError, match="must be a whole number"):
            sample_calls(testing.TINY_CONFIG, **kw)
    # In range one by one, too much together: refused from the arithmetic, not by running out of memory.
    huge = {**testing.TINY_CONFIG, "llm_features_dim": 1 << 16}
    with pytest.raises(IdeoquantError, match="GiB of memory"):
        check_sample_size(huge, steps=1000, tokens=4096, grid=256, batch=64)
    assert time.perf_counter() - t0 < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 << 10  # KiB: nothing big allocated


def test_out_parent_is_a_file(src, tmp_path):
    (tmp_path / "afile").write_text("x")
    _cli(["convert", src, "--out", tmp_path / "afile" / "out"], 2, "afile", "not a folder")
    _cli(["gguf", src, "--out", tmp_path / "afile" / "deeper" / "out"], 2, "afile", "not a folder")
    assert (tmp_path / "afile").read_text() == "x"


@contextlib.contextmanager
def _read_only_folder(ro: Path, monkeypatch):
    """A new folder `ro` that this user cannot write to, for the duration."""
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    else:
        ro.chmod(0o555)
    try:
        yield ro
    finally:
        ro.chmod(0o755)


def test_out_parent_read_only(src, tmp_path, monkeypatch):
    with _read_only_folder(tmp_path / "ro", monkeypatch) as ro:
        _cli(["convert", src, "--out", ro / "new" / "out"], 2, str(ro), "not writable")
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.update(files=[]), "files: expected an object"),
    (lambda m: m.update(components=None), "components: expected an object"),
    (lambda m: next(iter(m["files"].values())).update(size="12"), "size: expected a whole number"),
    (lambda m: next(iter(m["files"].values())).pop("sha256"), "sha256: missing"),
    (lambda m: m["components"]["transformer"].update(tensors={"a": 1}), "tensors: expected a list"),
    (lambda m: m["components"]["transformer"]["tensors"][0].update(name=None), "name: expected a string"),
    (lambda m: m["components"]["transformer"]["tensors"][0].update(shape=["x"]), "shape[0]"),
    (lambda m: m["components"]["transformer"].update(files="a.safetensors"), "files: expected a list"),
    (lambda m: m.update(kind=7), "kind: expected a string"),
], ids=["files-list", "components-null", "size-string", "no-sha", "tensors-object", "name-null", "shape-str",
        "component-files-str", "kind-number"])
def test_verify_manifest_of_the_wrong_shape(tmp_path, bf16_source, edit, needle):
    out = tmp_path / "out"
    ideoquant.convert_gguf(str(bf16_source), out, qtype="q8_0", components=["transformer"])
    m = json.loads((out / "ideoquant.json").read_text())
    edit(m)
    (out / "ideoquant.json").write_text(json.dumps(m))
    _cli(["verify", out, "--no-load"], 2, "ideoquant.json", needle)
    _cli(["upload", out, "--repo-id", "me/x", "--dry-run"], 2, "ideoquant.json", needle)


@pytest.mark.parametrize("repo_id", ["not a repo/x", "a/b/c", "--x/y", "org/na..me", "justaname", "x/" + "y" * 120])
def test_upload_dry_run_invalid_repo_id(tmp_path, repo_id):
    _cli(["upload", tmp_path, "--repo-id", repo_id, "--dry-run"], 2, "--repo-id")


def test_os_errors_are_one_line_naming_the_path():
    from ideoquant.cli.app import os_error_line

    assert os_error_line(PermissionError(errno.EACCES, "Permission denied", "/x/y")) == "/x/y: Permission denied"
    assert os_error_line(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")) == \
        "/a -> /b: Invalid cross-device link"
    assert "\n" not in os_error_line(OSError("odd\nmessage"))


# ---------------------------------------------------------------- 3. a full disk


def test_full_disk_during_int8_write_is_an_ordinary_error(src, old_out, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    before = _tree(src)
    _cli(["convert", src, "--out", old_out, "--overwrite"], 2, "disk full", str(old_out.parent), "missing")
    assert (old_out / "keep.txt").read_text() == "old" and sorted(p.name for p in old_out.iterdir()) == ["keep.txt"]
    assert _debris(old_out.parent) == [] and _tree(src) == before


def test_fallocate_unsupported_falls_back_to_pwrite(tmp_path, monkeypatch):
    import hashlib as h

    import torch

    from ideoquant.write.safetensors import ShardWriter, Slot

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    w = ShardWriter(tmp_path / "s.safetensors", {"t": Slot(torch.float32, (4, 4))}, {})
    w.write("t", torch.ones(4, 4))
    w.close()
    assert w.sha256 == h.sha256((tmp_path / "s.safetensors").read_bytes()).hexdigest()


_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
sys.argv = ["ideoquant", *sys.argv[1:]]
from ideoquant.cli import main
main()
"""


@pytest.mark.parametrize("command", ["convert", "gguf"])
def test_file_size_limit_mid_write_cleans_up(src, old_out, command):
    """A real limit on file size (RLIMIT_FSIZE, as a nearly full disk): an error line, not a signal."""
    before = _tree(src)
    args = [command, str(src), "--out", str(old_out), "--overwrite"] + (["--type", "q8_0"] if command == "gguf" else [])
    p = subprocess.run([sys.executable, "-c", _LIMITED, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert any(x in errors[0] for x in ("too large", "disk full", "incomplete write")), errors[0]
    assert (old_out / "keep.txt").read_text() == "old" and _debris(old_out.parent) == []
    assert _tree(src) == before


# ---------------------------------------------------------------- 4. resource bombs: type rules


@pytest.mark.parametrize("regex", [r"(a+)+$", r"(a|aa)+$", r"(a*)*b", r"(\w+\s?)+$", r"^(([a-z])+.)+[A-Z]([a-z])+$"])
def test_type_rule_matching_cannot_hang(regex):
    from ideoquant.formats import resolve

    r = resolve("gguf", type_rules=[f"{regex}=Q8_0"])
    names = ["a" * 5000 + "!", "layers.0.feed_forward.w1.weight" * 50 + "!"]
    t0 = time.perf_counter()
    for n in names:
        r.type_for(n)
    assert time.perf_counter() - t0 < 0.5


def test_pathological_rule_on_the_command_line(src, tmp_path):
    _cli(["gguf", src, "--type-rule", "(a+)+$=Q8_0", "--type", "q8_0", "--out", tmp_path / "g",
          "--components", "transformer"], 0)
    # Unsupported syntax is refused as one line (no engine chatter on stderr).
    _cli(["gguf", src, "--type-rule", "(?=w1)w=Q8_0", "--out", tmp_path / "h"], 2, "bad type rule regex")
    _cli(["gguf", src, "--type-rule", "(a)\\1=Q8_0", "--out", tmp_path / "h"], 2, "bad type rule regex")
    assert not (tmp_path / "h").exists()


# ---------------------------------------------------------------- 7. a recipe's type


def _recipe(tmp_path, body: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text('name = "mine"\nformat = "gguf"\ndescription = "d"\nsource = "s"\n' + body)
    return p


def test_recipe_type_is_used(bf16_source, tmp_path):
    r = _recipe(tmp_path, 'type = "Q8_0"\n')
    out = tmp_path / "out"
    _cli(["gguf", bf16_source, "--recipe", r, "--out", out, "--components", "transformer"], 0)
    m = json.loads((out / "ideoquant.json").read_text())
    types = {t["dtype_out"] for t in m["components"]["transformer"]["tensors"] if t["decision"] == "quantized"}
    assert types <= {"Q8_0", "BF16"} and "Q8_0" in types
    assert (out / "ideogram4-transformer-Q8_0.gguf").is_file()
    # --type, given, still overrides the recipe
    m = ideoquant.convert_gguf(str(bf16_source), tmp_path / "o2", recipe=str(r), qtype="q4_k",
                               components=["transformer"])
    assert any(t["dtype_out"] == "Q4_K" for t in m["components"]["transformer"]["tensors"])


@pytest.mark.parametrize("body,needle", [('type = "Q9_K"\n', "Q9_K"), ('type = 8\n', "type"),
                                         ('type = "Q8_0"\n[rules]\n"w1" = "Q7_K"\n', "Q7_K"),
                                         ('type = "Q8_0"\n[rules]\n"(?<=x)w1" = "Q8_0"\n', "bad type rule regex")])
def test_recipe_type_is_validated_on_load(bf16_source, tmp_path, body, needle):
    from ideoquant.formats import load_recipe

    r = _recipe(tmp_path, body)
    with pytest.raises(IdeoquantError, match="r.toml"):
        load_recipe(r)
    _cli(["gguf", bf16_source, "--recipe", r, "--out", tmp_path / "out"], 2, "r.toml", needle)
    _cli(["inspect", bf16_source, "--recipe", r], 2, "r.toml", needle)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 8. refuse early


def test_early_refusals_come_before_download_and_hashing(src, old_out, tmp_path, monkeypatch):
    from ideoquant import job
    from ideoquant.source import hub

    def must_not_run(*a, **kw):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(hub, "download_source", must_not_run)
    monkeypatch.setattr(job, "open_source", must_not_run)
    monkeypatch.setattr(job, "Hasher", must_not_run)
    (tmp_path / "afile").write_text("x")
    for source in ("org/some-model", str(src)):
        with pytest.raises(IdeoquantError, match="already exists"):
            ideoquant.convert(source, old_out)
        with pytest.raises(IdeoquantError, match="already exists"):
            ideoquant.convert_gguf(source, old_out)
        with pytest.raises(IdeoquantError, match="not a folder"):
            ideoquant.convert(source, tmp_path / "afile" / "out")
    with pytest.raises(IdeoquantError, match="the source"):
        ideoquant.convert(str(src), src.parent, overwrite=True)
    # the cache folder of a Hub source is refused before anything is downloaded
    from huggingface_hub import constants

    with pytest.raises(IdeoquantError, match="the source"):
        ideoquant.convert("org/some-model", Path(constants.HF_HUB_CACHE), overwrite=True)
    assert (old_out / "keep.txt").read_text() == "old" and _debris(old_out.parent) == []


def test_not_enough_disk_is_refused_before_writing(src, old_out, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    _cli(["convert", src, "--out", old_out, "--overwrite"], 2, "not enough free disk")
    assert (old_out / "keep.txt").read_text() == "old" and _debris(old_out.parent) == []


# ---------------------------------------------------------------- 5. two runs, one --out; 6. signals


def test_a_held_lock_refuses_a_second_run_at_once(src, old_out):
    from ideoquant.write.staging import output_lock

    with output_lock(old_out):
        t0 = time.perf_counter()
        _cli(["convert", src, "--out", old_out, "--overwrite"], 2, str(old_out), f"pid {os.getpid()}")
        assert time.perf_counter() - t0 < 5
    assert _debris(old_out.parent) == []  # the lock file goes with the lock
    with output_lock(old_out):  # and can be taken again
        pass


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    return testing.build_checkpoint(tmp_path_factory.mktemp("slow") / "src", fmt="bf16",
                                    config={**testing.TINY_CONFIG, "num_layers": 8, "llm_features_dim": 4096})


def _start(slow_source, out):
    # the slowest encoder (Q4_1's weighted path, one thread): the run is still writing when the test catches it
    return subprocess.Popen([sys.executable, "-m", "ideoquant", "gguf", str(slow_source), "--out", str(out),
                             "--overwrite", "--type", "q4_1", "--imatrix", "ones", "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            # a shell's background job starts with SIGINT ignored, and the CLI keeps what is ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_staging(proc, parent: Path) -> None:
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.endswith(".partial") and any(p.glob("*.gguf")) for p in parent.iterdir()):
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"the conversion did not get to writing: {proc.communicate()[1]}")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_cleans_up_like_ctrl_c(slow_source, old_out, sig):
    """A real signal to a conversion mid-write (SIGINT is Ctrl-C): exit 128 + the signal, one error line, the old
    output intact, no staging, lock or partial file left, the source unchanged, and promptly."""
    signum = getattr(signal, sig)
    before = _tree(slow_source)
    proc = _start(slow_source, old_out)
    _wait_for_staging(proc, old_out.parent)
    proc.send_signal(signal.SIGSTOP)  # held mid-write, however fast the encoders get
    if sig == "SIGTERM":  # meanwhile, a second run to the same --out fails at once, naming the first
        _cli(["gguf", slow_source, "--out", old_out, "--overwrite"], 2, f"pid {proc.pid}")
    proc.send_signal(signum)  # delivered when it continues
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=30)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"interrupted ({sig})" in errors[0] and "Traceback" not in err, err
    assert elapsed < 5, (elapsed, err)  # typically a few tenths of a second; the margin is for a loaded machine
    assert (old_out / "keep.txt").read_text() == "old" and sorted(p.name for p in old_out.iterdir()) == ["keep.txt"]
    assert _debris(old_out.parent) == []
    assert _tree(slow_source) == before


def test_hasher_stops_promptly_when_the_job_fails(tmp_path):
    from ideoquant.write.hashing import Hasher

    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # sparse: 4 GiB to hash, seconds of work
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError):
        with Hasher() as h:
            h.add("big", big)
            time.sleep(0.05)
            raise RuntimeError("the job failed")
    assert time.perf_counter() - t0 < 1
    assert not [t for t in threading.enumerate() if t.name.startswith("ideoquant-hash")]


def test_signal_handlers_are_restored_after_a_command(bf16_source):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    _cli(["inspect", bf16_source, "--recipe", "nope"], 2, "unknown recipe")
    assert {s: signal.getsignal(s) for s in before} == before
