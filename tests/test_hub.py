"""Hub download and upload against the fake hub on 127.0.0.1 (tests/hubserver.py), with the real client."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import ideoquant
from ideoquant.evaluation.inputs import sample_inputs
from ideoquant.evaluation.runner import velocity
from ideoquant.errors import IdeoquantError
from ideoquant.publish.upload import upload
from ideoquant.publish.verify import verify

SECRET = "hf_secret_never_printed_0123456789"
DECOYS = {  # in the source repo, never needed by a conversion: must never be fetched
    "vae/diffusion_pytorch_model.safetensors": b"\0vae weights",
    "text_encoder/model.safetensors": b"\0text encoder weights",
    "transformer/diffusion_pytorch_model.bin": b"\0a pickle",
    "README.md": b"---\nlicense: other\nlicense_name: ideogram-4-non-commercial\n---\n# Ideogram 4 (test)\n",
}


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def source(bf16_source) -> Path:
    """The tiny bf16 pipeline folder of tests/conftest.py (sharded, with index files)."""
    return bf16_source


def _source_files(src: Path, skip: str | None = None) -> dict[str, Path]:
    return {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*"))
            if p.is_file() and not (skip and p.relative_to(src).as_posix().startswith(skip + "/"))}


@pytest.fixture
def seeded(hub_env, source):
    """A source pipeline repo on the fake hub, with decoys: (repo_id, commit sha)."""
    repo = f"org/{_uid('ideogram4')}"
    sha = hub_env.hub.seed(repo, {**_source_files(source), **DECOYS})
    hub_env.hub.reset_log()
    return repo, sha


@pytest.fixture(scope="module")
def local_out(tmp_path_factory, bf16_source) -> Path:
    out = tmp_path_factory.mktemp("hub_out") / "int8"
    ideoquant.convert(bf16_source, out)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_round_trip(hub_env, seeded, source, tmp_path, capfd):
    repo, sha = seeded
    hub = hub_env.hub

    # Download: only model_index.json and the backbones' config/weights/index, at the resolved commit.
    m = ideoquant.convert(repo, tmp_path / "out", token=SECRET)
    assert m["source"]["kind"] == "hub" and m["source"]["repo_id"] == repo and m["source"]["commit"] == sha
    needed = sorted(_source_files(source))
    fetched = {p.split(f"/resolve/{sha}/", 1)[1] for p in hub.file_downloads()}
    # Files with identical bytes (the two backbones' config.json) share one cache blob: fetched once.
    assert fetched <= set(needed) and {_sha256(source / r) for r in fetched} == {_sha256(source / r) for r in needed}
    assert not fetched & set(DECOYS)
    assert f"Bearer {SECRET}" in hub.auth_headers  # the explicit token wins over HF_TOKEN
    for rel, rec in m["source"]["files"].items():
        assert rec["sha256"] == _sha256(source / rel)  # from the Hub's LFS metadata or hashed: either way right

    # Again: everything comes from the cache, no file is fetched; same output bits.
    hub.reset_log()
    m2 = ideoquant.convert(repo, tmp_path / "out2", token=SECRET)
    assert hub.file_downloads() == [] and m2["source"]["commit"] == sha
    assert m2["files"] == m["files"]

    # Upload: one commit with every file, the manifest and the card.
    target = f"me/{_uid('ideogram4-int8')}"
    hub.reset_log()
    result = upload(tmp_path / "out", target, token=SECRET, progress=False)
    assert hub.count("POST", f"/api/models/{target}/commit/") == 1
    assert f"Bearer {SECRET}" in hub.auth_headers
    assert result["repo_id"] == target and result["dry_run"] is False and result["commit_url"]
    expected = sorted([*m["files"], "ideoquant.json", "README.md"])
    assert sorted(f["path"] for f in result["files"]) == expected
    assert sorted(hub.files(target)) == sorted([".gitattributes", *expected])

    # Download into a fresh cache: bytes as the manifest says, a card with the right front matter, and it loads.
    from huggingface_hub import snapshot_download

    down = Path(snapshot_download(target, cache_dir=tmp_path / "fresh_cache"))
    for rel, rec in m["files"].items():
        assert _sha256(down / rel) == rec["sha256"], rel
    assert (down / "ideoquant.json").read_bytes() == (tmp_path / "out" / "ideoquant.json").read_bytes()
    card = (down / "README.md").read_text()
    assert card == result["card"]
    meta = _front_matter(card)
    assert meta["base_model"] == repo and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "other" and meta["license_name"] == "ideogram-4-non-commercial"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"ideogram4", "quantized", "int8"} <= set(meta["tags"])
    assert f'from_pretrained(\n    "{target}", subfolder="transformer"' in card and sha in card
    assert verify(down).ok

    from diffusers import Ideogram4Transformer2DModel

    remote = Ideogram4Transformer2DModel.from_pretrained(down, subfolder="transformer", torch_dtype=torch.bfloat16)
    local = Ideogram4Transformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer",
                                                        torch_dtype=torch.bfloat16)
    inputs = sample_inputs(dict(local.config))
    assert torch.equal(velocity(remote, inputs), velocity(local, inputs))

    # The token went to the server and nowhere else.
    captured = capfd.readouterr()
    for text in [json.dumps(m), json.dumps(m2), card, captured.out, captured.err,
                 (tmp_path / "out" / "ideoquant.json").read_text()]:
        assert SECRET not in text


def test_convert_at_old_commit_and_branch(hub_env, seeded, tmp_path):
    repo, old = seeded
    new = hub_env.hub.seed(repo, {"notes.txt": b"a later commit"})
    hub_env.hub.seed(repo, {"notes.txt": b"on a branch"}, revision="dev")
    one = ["transformer"]  # one backbone is enough here, and only its files may be fetched
    assert ideoquant.convert(repo, tmp_path / "a", revision=old, components=one)["source"]["commit"] == old
    assert not [p for p in hub_env.hub.file_downloads() if "/unconditional_transformer/" in p]
    m = ideoquant.convert(repo, tmp_path / "b", revision="dev", components=one)
    assert m["source"]["revision"] == "dev" and m["source"]["commit"] == hub_env.hub.head(repo, "dev") != new
    assert list(m["components"]) == one


def test_offline_uses_the_cache(hub_env, seeded, tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    repo, sha = seeded
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    with pytest.raises(IdeoquantError, match="HF_HUB_OFFLINE is set and the files are not in the Hugging Face cache"):
        ideoquant.convert(repo, tmp_path / "a")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    online = ideoquant.convert(repo, tmp_path / "b", components=["transformer"])
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    hub_env.hub.reset_log()
    offline = ideoquant.convert(repo, tmp_path / "c", components=["transformer"])
    assert offline["source"]["commit"] == sha and offline["source"]["files"] == online["source"]["files"]
    assert hub_env.hub.requests == []


def test_download_errors(hub_env, source, tmp_path, monkeypatch):
    hub = hub_env.hub
    with pytest.raises(IdeoquantError, match=r"^Hub repo org/no-such-repo does not exist or you have no access"):
        ideoquant.convert("org/no-such-repo", tmp_path / "a")

    gated = f"org/{_uid('gated')}"
    hub.seed(gated, _source_files(source))
    hub.set_gated(gated)
    with pytest.raises(IdeoquantError, match=rf"{gated} is gated: accept its licence at http://\S+/{gated}.*HF_TOKEN"):
        ideoquant.convert(gated, tmp_path / "b")

    hub.unrestrict(gated)
    with pytest.raises(IdeoquantError, match="revision 'nope' not found"):
        ideoquant.convert(gated, tmp_path / "c", revision="nope")

    partial = f"org/{_uid('partial')}"
    hub.seed(partial, _source_files(source, skip="unconditional_transformer"))
    with pytest.raises(IdeoquantError, match="missing component 'unconditional_transformer'"):
        ideoquant.convert(partial, tmp_path / "d")

    import huggingface_hub.constants as C
    import huggingface_hub.hf_api as hf_api

    monkeypatch.setattr(C, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(hf_api.api, "endpoint", "http://127.0.0.1:9")
    with pytest.raises(IdeoquantError, match="the Hub is unreachable .*local path"):
        ideoquant.convert(f"org/{_uid('away')}", tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in "abcde")


def test_tampered_output_is_never_sent(hub_env, local_out, tmp_path):
    out = shutil.copytree(local_out, tmp_path / "out")
    shard = out / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    target = f"me/{_uid('tampered')}"
    with pytest.raises(IdeoquantError, match="refusing to upload .*transformer/diffusion_pytorch_model.safetensors"):
        upload(out, target, progress=False)
    assert hub_env.hub.write_requests() == [] and hub_env.hub.requests == []


def test_dry_run_sends_nothing(hub_env, local_out):
    target = f"me/{_uid('dry')}"
    result = upload(local_out, target, dry_run=True)
    assert hub_env.hub.requests == []
    assert result["dry_run"] is True and result["commit_url"] is None
    meta = _front_matter(result["card"])
    assert "base_model" not in meta and meta["license"] == "other"  # a local source: no base_model
    assert "local checkpoint" in result["card"]
    assert {f["path"] for f in result["files"]} >= {"ideoquant.json", "README.md",
                                                     "transformer/diffusion_pytorch_model.safetensors"}
    assert not (local_out / "README.md").exists()  # the verified folder is never modified
    assert upload(local_out, target, dry_run=True)["card"] == result["card"]  # deterministic


def test_gguf_card(hub_env, source, tmp_path):
    out = tmp_path / "gguf"
    ideoquant.convert_gguf(source, out, recipe="gguf-q4_k_m")
    result = upload(out, "me/ideogram4-gguf", dry_run=True)
    assert hub_env.hub.requests == []
    meta = _front_matter(result["card"])
    assert "library_name" not in meta and meta["pipeline_tag"] == "text-to-image"
    assert {"gguf", "q4_k", "q6_k", "quantized", "ideogram4"} <= set(meta["tags"])
    assert 'hf_hub_download("me/ideogram4-gguf", "ideogram4-transformer-Q4_K_M.gguf")' in result["card"]
    card = result["card"]
    # What loads the files today, and the base pipeline (never the FP8 source repo) with what it needs.
    assert "--uncond-diffusion-model" in card and "does not read `general.architecture`" in card
    assert "`general.architecture = ideogram4`" in card and "#455" in card and "#459" in card
    assert "without importance weights" not in card and "no importance weights" in card
    assert 'from_pretrained(\n    "ideogram-ai/ideogram-4-nf4-diffusers",' in card and "bitsandbytes" in card
    assert 'from_pretrained(\n    "ideogram-ai/ideogram-4-fp8"' not in card
    assert "**Warning:**" not in card


def test_gguf_card_diffusers_layout_and_arch(hub_env, source, tmp_path):
    out = tmp_path / "gguf-d"
    ideoquant.convert_gguf(source, out, qtype="q8_0", layout="diffusers", arch="ideogram",
                           components=["transformer"])
    card = upload(out, "me/ideogram4-gguf-d", dry_run=True, base="some/bf16-diffusers")["card"]
    assert 'hf_hub_download("me/ideogram4-gguf-d", "ideogram4-transformer-Q8_0-diffusers.gguf")' in card
    assert "**These files use diffusers tensor names**" in card and "**Warning:** --layout diffusers" in card
    assert 'from_pretrained(\n    "some/bf16-diffusers",' in card and "come from `some/bf16-diffusers`" in card
    assert "--uncond-diffusion-model" not in card


def test_upload_to_branch_and_pr_keep_card(hub_env, local_out, tmp_path):
    out = shutil.copytree(local_out, tmp_path / "out")
    (out / "README.md").write_text("---\nlicense: other\n---\n# my own card\n")
    target = f"me/{_uid('branch')}"
    hub = hub_env.hub
    r = upload(out, target, revision="int8", keep_card=True, commit_message="int8 weights", progress=False)
    assert r["revision"] == "int8" and hub.read(target, "README.md", revision="int8").endswith(b"# my own card\n")
    assert "ideoquant.json" not in hub.files(target)  # main untouched
    pr = upload(out, target, create_pr=True, progress=False)
    assert pr["pr_url"] and "ideoquant.json" in hub.files(target, "refs/pr/1")
    assert "ideoquant.json" not in hub.files(target)
    assert b"base_model_relation" not in hub.read(target, "README.md", revision="refs/pr/1")  # local source


def test_upload_replaces_an_earlier_upload(hub_env, local_out):
    target = f"me/{_uid('again')}"
    stale = {"transformer/diffusion_pytorch_model-00001-of-00002.safetensors": b"\0old shard",
             "transformer/diffusion_pytorch_model.safetensors.index.json": b'{"weight_map": {}}',
             "ideogram4-transformer-Q8_0.gguf": b"\0old gguf"}
    hub_env.hub.seed(target, {**stale, "samples/cat.png": b"\x89PNG", "NOTES.md": b"notes"})
    r = upload(local_out, target, progress=False)
    assert r["deleted"] == sorted(stale)
    files = hub_env.hub.files(target)
    assert not set(stale) & set(files) and {"samples/cat.png", "NOTES.md", "ideoquant.json"} <= set(files)
    assert hub_env.hub.count("POST", f"/api/models/{target}/commit/") == 1


def test_cli_upload(hub_env, local_out):
    from ideoquant.cli import app

    target = f"me/{_uid('cli')}"
    runner = CliRunner()
    dry = runner.invoke(app, ["upload", str(local_out), "--repo-id", target, "--dry-run",
                              "--base", "CalamitousFelicitousness/Ideogram-4-bf16-Diffusers"])
    assert dry.exit_code == 0, dry.output
    assert "README.md" in dry.output and "license_name: ideogram-4-non-commercial" in dry.output
    assert '"CalamitousFelicitousness/Ideogram-4-bf16-Diffusers",' in dry.output and "no bitsandbytes" in dry.output
    assert hub_env.hub.requests == []

    real = runner.invoke(app, ["upload", str(local_out), "--repo-id", target, "--json"])
    assert real.exit_code == 0, real.output
    assert json.loads(real.stdout)["commit_url"] and "ideoquant.json" in hub_env.hub.files(target)
    assert "Bearer hf_test_token" in hub_env.hub.auth_headers  # no --token: HF_TOKEN from the environment


def test_inspect_hub_source_reads_headers_only(hub_env, seeded, source, tmp_path):
    """inspect plans a Hub repo from its configs and safetensors headers: no weights land in the cache."""
    from ideoquant.inspection import inspect

    repo, sha = seeded
    remote = inspect(repo, "int8-w8a8")
    local = inspect(str(source), "int8-w8a8")
    assert remote["source"]["commit"] == sha
    for c in ("transformer", "unconditional_transformer"):
        for key in ("params", "quantized", "kept", "bytes_in", "bytes_out", "protected_modules"):
            assert remote["components"][c][key] == local["components"][c][key], (c, key)
    import os
    assert list(Path(os.environ["HF_HUB_CACHE"]).rglob("*.safetensors")) == []
    assert list(Path(os.environ["HF_HUB_CACHE"]).rglob("config.json"))  # the configs were fetched


def test_default_source_is_the_official_fp8_release(hub_env, official_repo, fp8_source, tmp_path):
    """No SOURCE: the gated `ideogram-ai/ideogram-4-fp8` layout (fused FP8 per-row, index, no quantization_config)
    is downloaded with the token, only its backbone files, and read like the local replica."""
    repo, sha = official_repo
    m = ideoquant.convert(None, tmp_path / "out", components=["transformer"])
    assert m["source"]["repo_id"] == repo and m["source"]["commit"] == sha
    fetched = {p.split(f"/resolve/{sha}/", 1)[1] for p in hub_env.hub.file_downloads()}
    assert fetched <= {"model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                       "transformer/diffusion_pytorch_model.safetensors.index.json"}
    assert "transformer/diffusion_pytorch_model.safetensors" in fetched
    assert m["components"]["transformer"]["source_layout"] == "original"
    assert any("float32 per-row scales" in n for n in m["source"]["notes"])
    local = ideoquant.convert(fp8_source, tmp_path / "local", components=["transformer"])
    assert m["files"]["transformer/diffusion_pytorch_model.safetensors"] == \
        local["files"]["transformer/diffusion_pytorch_model.safetensors"]
    # Without a token the gated release is refused with one line saying what to do.
    hub_env.hub.reset_log()
    with pytest.raises(IdeoquantError, match=f"{repo} is gated: accept its licence"):
        ideoquant.convert(None, tmp_path / "anon", token=False, components=["transformer"])


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_local_dir_download_is_not_hashed_again(hub_env, seeded, source, tmp_path):
    """`hf download --local-dir` records each LFS file's sha256 beside the download: a job takes the hash from that
    record while the file is as downloaded (huggingface_hub's own test: mtime at most 1 s past the record), hashes
    the file otherwise, and writes nothing into the folder."""
    import os

    from huggingface_hub import snapshot_download

    repo, _ = seeded
    down = Path(snapshot_download(repo, local_dir=tmp_path / "dl", allow_patterns=[
        "model_index.json", "*transformer/*.json", "*transformer/*.safetensors"]))
    weights = sorted(p.relative_to(down).as_posix() for p in down.glob("*/*.safetensors"))
    assert len(weights) >= 2
    records = {rel: down / ".cache" / "huggingface" / "download" / f"{rel}.metadata" for rel in weights}
    lines = {rel: rec.read_text().splitlines() for rel, rec in records.items()}
    assert all(lines[rel][1] == _sha256(down / rel) for rel in weights)  # the library recorded the real sha256

    # A stand-in digest in one record shows where the manifest's digest came from.
    rel = weights[0]
    stand_in = "0123456789abcdef" * 4
    records[rel].write_text(f"{lines[rel][0]}\n{stand_in}\n{lines[rel][2]}\n")
    before = _tree(down)
    m = ideoquant.convert(down, tmp_path / "out")
    files = m["source"]["files"]
    assert files[rel]["sha256"] == stand_in
    assert all(files[r]["sha256"] == _sha256(down / r) for r in files if r != rel)
    assert _tree(down) == before  # no lock file, no folder: the source is read only

    # A backbone folder inside the download finds the same records.
    m = ideoquant.convert(down / rel.split("/")[0], tmp_path / "out_backbone")
    assert m["source"]["files"][rel.split("/", 1)[1]]["sha256"] == stand_in

    # Modified after the download (mtime past the record): hashed again.
    later = float(lines[rel][2]) + 5
    os.utime(down / rel, (later, later))
    m = ideoquant.convert(down, tmp_path / "out2")
    assert m["source"]["files"][rel]["sha256"] == _sha256(down / rel) != stand_in
