"""The fake hub (tests/hubserver.py) against the real huggingface_hub client, offline on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

# Imported before any fixture runs on purpose: hub_env must work on an already-imported client.
import huggingface_hub
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.conftest_hub import TEST_TOKEN

README = "---\nlicense: apache-2.0\nlibrary_name: diffusers\ntags:\n- ideogram\n- quantized\n---\n# Test model\n"
BIG = 12 * 1024 * 1024  # above the 10 MiB LFS threshold


@pytest.fixture
def repo_id():
    return f"user/test-{uuid.uuid4().hex[:8]}"


def _folder(root: Path) -> dict[str, bytes]:
    files = {
        "README.md": README.encode(),
        "config.json": b'{"hidden_size": 64}\n',
        "model_index.json": b'{"_class_name": "IdeogramPipeline"}\n',
        "transformer/diffusion_pytorch_model.safetensors": os.urandom(BIG),
        "notes/info.txt": b"hello\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_create_upload_list_info(hub_env, repo_id, tmp_path):
    api = HfApi()  # no endpoint argument: it must come from the patched constants
    url = huggingface_hub.create_repo(repo_id)  # module-level function: the import-time HfApi instance
    assert url.repo_id == repo_id and url.startswith(hub_env.url)
    api.create_repo(repo_id, exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409

    files = _folder(tmp_path / "src")
    info = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "src", commit_message="Upload weights")
    assert info.oid == hub_env.hub.head(repo_id)
    big = "transformer/diffusion_pytorch_model.safetensors"
    # The big file went through the LFS batch API + PUT, the rest inline in the commit.
    assert hub_env.hub.count("POST", f"/{repo_id}.git/info/lfs/objects/batch") == 1
    assert hub_env.hub.count("PUT", "/_lfs/" + hashlib.sha256(files[big]).hexdigest()) == 1
    assert f"Bearer {TEST_TOKEN}" in hub_env.hub.auth_headers
    assert hub_env.hub.files(repo_id)[big]["lfs"] and not hub_env.hub.files(repo_id)["config.json"]["lfs"]

    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *files])
    tree = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True)}
    assert {"transformer", "notes"} <= set(tree) and tree[big].lfs.sha256 == hashlib.sha256(files[big]).hexdigest()
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="transformer")] == [big]

    model = api.model_info(repo_id, files_metadata=True)
    assert model.sha == info.oid
    assert model.card_data.license == "apache-2.0" and model.card_data.library_name == "diffusers"
    assert "ideogram" in model.tags
    sizes = {s.rfilename: s for s in model.siblings}
    assert sizes[big].size == BIG and sizes[big].lfs.sha256 == hashlib.sha256(files[big]).hexdigest()
    assert sizes["config.json"].lfs is None and sizes["config.json"].size == len(files["config.json"])

    refs = api.list_repo_refs(repo_id)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", info.oid)]
    commits = api.list_repo_commits(repo_id)
    assert [c.title for c in commits] == ["Upload weights", "initial commit"] and commits[0].commit_id == info.oid
    assert api.repo_exists(repo_id) and not api.repo_exists("user/does-not-exist")
    assert api.file_exists(repo_id, "config.json") and not api.file_exists(repo_id, "nope.json")

    # Uploading the same folder again is a no-op: the preupload oids match, so no new commit and no upload.
    hub_env.hub.reset_log()
    again = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "src", commit_message="again")
    assert again.oid == info.oid
    assert not [r for r in hub_env.hub.write_requests() if "/commit/" in r[1] or "/_lfs/" in r[1]]


def test_snapshot_download_patterns_then_cache(hub_env, repo_id, tmp_path):
    files = _folder(tmp_path)
    sha = hub_env.hub.seed(repo_id, {k: tmp_path / k for k in files})
    patterns = ["transformer/*", "model_index.json"]
    hub_env.hub.reset_log()

    path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    assert path.name == sha
    got = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert got == ["model_index.json", "transformer/diffusion_pytorch_model.safetensors"]
    for rel in got:
        assert (path / rel).read_bytes() == files[rel]
    first = hub_env.hub.file_downloads()
    assert sorted(first) == sorted(f"/{repo_id}/resolve/{sha}/{rel}" for rel in got)  # each file fetched once

    hub_env.hub.reset_log()
    assert Path(snapshot_download(repo_id, allow_patterns=patterns)) == path
    assert hub_env.hub.file_downloads() == []  # second call served from the cache
    assert hub_env.hub.count("HEAD") == 0 and hub_env.hub.write_requests() == []

    local = tmp_path / "local"
    snapshot_download(repo_id, allow_patterns=["config.json"], local_dir=local)
    assert (local / "config.json").read_bytes() == files["config.json"]


def test_download_old_commit_and_branch(hub_env, repo_id):
    old = hub_env.hub.seed(repo_id, {"weights.bin": b"\0old" * 100, "config.json": b'{"v": 1}'})
    new = hub_env.hub.seed(repo_id, {"weights.bin": b"\0new" * 100, "config.json": b'{"v": 2}'})
    for name, rev, data in [("weights.bin", old, b"\0old"), ("weights.bin", new, b"\0new"),
                            ("weights.bin", "main", b"\0new"), ("config.json", old, b'{"v": 1}')]:
        assert Path(hf_hub_download(repo_id, name, revision=rev)).read_bytes().startswith(data)

    api = HfApi()
    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    dev = api.upload_file(path_or_fileobj=b'{"v": 3}', path_in_repo="config.json", repo_id=repo_id,
                          revision="dev", commit_message="dev config")
    assert Path(hf_hub_download(repo_id, "config.json", revision="dev")).read_bytes() == b'{"v": 3}'
    assert hub_env.hub.read(repo_id, "config.json") == b'{"v": 2}'  # main untouched
    assert {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches} == {"main": new, "dev": dev.oid}

    api.delete_file("weights.bin", repo_id, revision="dev")
    assert "weights.bin" not in api.list_repo_files(repo_id, revision="dev")
    assert "weights.bin" in api.list_repo_files(repo_id)

    # Range requests (used to resume downloads).
    r = huggingface_hub.get_session().get(f"{hub_env.url}/{repo_id}/resolve/main/weights.bin",
                                          headers={"Range": "bytes=1-3"})
    assert r.status_code == 206 and r.content == b"new"


def test_create_pr(hub_env, repo_id):
    hub_env.hub.seed(repo_id, {"a.txt": b"a"})
    main = hub_env.hub.head(repo_id)
    info = HfApi().upload_file(path_or_fileobj=b"b", path_in_repo="b.txt", repo_id=repo_id, create_pr=True,
                               commit_message="proposal")
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert hub_env.hub.head(repo_id) == main
    assert Path(hf_hub_download(repo_id, "b.txt", revision="refs/pr/1")).read_bytes() == b"b"
    prs = HfApi().list_repo_refs(repo_id, include_pull_requests=True).pull_requests
    assert [(p.ref, p.target_commit) for p in prs] == [("refs/pr/1", info.oid)]


def test_errors(hub_env, repo_id):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json")
    hub_env.hub.seed(repo_id, {"config.json": b"{}"})
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")

    hub_env.hub.set_gated(repo_id)
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "config.json")
    with pytest.raises(GatedRepoError):
        snapshot_download(repo_id)
    with pytest.raises(GatedRepoError):
        api.model_info(repo_id)
    assert api.repo_exists(repo_id)  # the client counts a gated repo as existing
    hub_env.hub.set_gated(repo_id, allowed_tokens=[TEST_TOKEN])
    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == b"{}"
    hub_env.hub.set_private(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)
    hub_env.hub.unrestrict(repo_id)
    api.delete_repo(repo_id)
    assert not api.repo_exists(repo_id)


def test_standalone_server(tmp_path):
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hubserver.py")), "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy, whatever the env says
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(f"{url}/api/models/user/nothing", timeout=10)
        assert err.value.code == 404 and err.value.headers["X-Error-Code"] == "RepoNotFound"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
