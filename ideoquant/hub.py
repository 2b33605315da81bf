"""The Hugging Face Hub: download exactly what a conversion reads, upload a verified output in one commit.

Both sides go through `huggingface_hub` unchanged: the normal cache (resumable, shared with diffusers), the
token from the argument, `HF_TOKEN` or `hf auth login`. The token is handed to the client and nothing else:
it never appears in a message, the manifest or the card.
"""

from __future__ import annotations

import contextlib
import fnmatch
from pathlib import Path

from . import model
from .errors import IdeoquantError

# What a conversion reads from a pipeline repo, per backbone; nothing else (text encoder, VAE) is fetched.
COMPONENT_PATTERNS = ("{c}/config.json", "{c}/*.safetensors", "{c}/*.safetensors.index.json")


def allow_patterns(components: list[str] | None) -> list[str]:
    return ["model_index.json"] + [p.format(c=c) for c in (components or model.COMPONENTS) for p in COMPONENT_PATTERNS]


def _hub_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


def _hub_error(e: BaseException, repo_id: str, revision: str | None, doing: str) -> IdeoquantError:
    """One clear line for each way the Hub can say no. Order matters: GatedRepoError is a RepositoryNotFoundError."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        LocalTokenNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError, RevisionResolutionError)

    local = ", or give a local path to the checkpoint instead" if doing == "download" else ""
    if isinstance(e, LocalTokenNotFoundError):
        return IdeoquantError(f"cannot {doing} {repo_id}: no Hub token; log in with `hf auth login` or set HF_TOKEN")
    if isinstance(e, GatedRepoError):
        return IdeoquantError(f"{repo_id} is gated: accept its licence at {_hub_url(repo_id)}, then log in with "
                              "`hf auth login` or set HF_TOKEN to a token of that account")
    if isinstance(e, RepositoryNotFoundError):
        return IdeoquantError(f"Hub repo {repo_id} does not exist or you have no access "
                              "(check the name; for a private repo log in with `hf auth login` or set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return IdeoquantError(f"revision '{revision}' not found in Hub repo {repo_id} (a branch, tag or commit sha)")
    if isinstance(e, OfflineModeIsEnabled) or isinstance(e.__cause__, OfflineModeIsEnabled):
        return IdeoquantError(f"cannot {doing} {repo_id}: HF_HUB_OFFLINE is set and the files are not in the "
                              f"Hugging Face cache; unset HF_HUB_OFFLINE{local}")
    if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code in (401, 403):
        return IdeoquantError(f"cannot {doing} {repo_id}: the Hub refused the request "
                              f"({e.response.status_code}); log in with `hf auth login` or set HF_TOKEN to a token "
                              "with access (write access to upload)")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        detail = (e.server_message or "").strip().splitlines()
        return IdeoquantError(f"cannot {doing} {repo_id}: the Hub answered {status}"
                              + (f" ({detail[0]})" if detail else ""))
    if isinstance(e, (_transport_error(), LocalEntryNotFoundError, RevisionResolutionError, ConnectionError,
                      TimeoutError)):
        return IdeoquantError(f"cannot {doing} {repo_id}: the Hub is unreachable ({type(e).__name__}); "
                              f"check the network{local}")
    return IdeoquantError(f"cannot {doing} {repo_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _transport_error() -> type[BaseException]:
    """The HTTP client's base error for connections and timeouts (huggingface_hub 2.x uses httpx2, 1.x httpx)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx.TransportError


def _hub_exceptions() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalTokenNotFoundError,
                                        RevisionResolutionError)

    return (HfHubHTTPError, _transport_error(), ConnectionError, TimeoutError, FileNotFoundError, HFValidationError,
            RevisionResolutionError, LocalTokenNotFoundError)


def download_source(repo_id: str, revision: str | None, token: str | None,
                    components: list[str] | None) -> tuple[Path, str, dict[str, str]]:
    """Fetch model_index.json and the backbone files of `repo_id` at `revision` into the HF cache.

    Returns (snapshot folder, commit sha, {relative path: sha256} for LFS files, as the Hub reports them).
    The revision is resolved to a commit first (and the mapping cached), so the files and the recorded commit
    always agree; a second run finds everything in the cache and downloads nothing, and offline
    (`HF_HUB_OFFLINE=1`, or the Hub unreachable) a cached snapshot is used as is.
    """
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    patterns = allow_patterns(components)
    try:
        rev = api.resolve_revision(repo_id, revision=revision, token=token)
        snapshot = Path(snapshot_download(repo_id, revision=rev, allow_patterns=patterns, token=token))
    except _hub_exceptions() as e:
        raise _hub_error(e, repo_id, revision, "download") from None
    return snapshot, rev.resolved, _lfs_hashes(api, repo_id, rev.resolved, patterns, token)


def remote_headers(repo_id: str, revision: str | None, token: str | None,
                   components: list[str] | None) -> tuple[Path, str, dict[str, dict[str, tuple]]]:
    """For `inspect`: the configs, and each weight file's safetensors header read with HTTP range requests.

    Returns (snapshot folder holding only the JSON files, commit sha, {relative path: {tensor: (dtype, shape)}}):
    a few hundred kilobytes instead of the weights.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import SafetensorsParsingError

    api = HfApi()
    weights = [p for p in allow_patterns(components) if p.endswith("/*.safetensors")]
    try:
        rev = api.resolve_revision(repo_id, revision=revision, token=token)
        snapshot = Path(snapshot_download(repo_id, revision=rev, token=token,
                                          allow_patterns=[p for p in allow_patterns(components) if p not in weights]))
        files = [f for f in api.list_repo_files(repo_id, revision=rev.resolved, token=token)
                 if any(fnmatch.fnmatchcase(f, p) for p in weights)]
        headers = {}
        for f in files:
            meta = api.parse_safetensors_file_metadata(repo_id, f, revision=rev.resolved, token=token)
            headers[f] = {k: (t.dtype, tuple(t.shape)) for k, t in meta.tensors.items()}
    except SafetensorsParsingError as e:
        raise IdeoquantError(f"corrupt or truncated safetensors file in {repo_id}: {str(e).splitlines()[0]}") from None
    except _hub_exceptions() as e:
        raise _hub_error(e, repo_id, revision, "download") from None
    return snapshot, rev.resolved, headers


def _lfs_hashes(api, repo_id: str, commit: str, patterns: list[str], token: str | None) -> dict[str, str]:
    """sha256 of the LFS files as the Hub records them, so convert need not hash gigabytes it just downloaded.
    Best effort: offline or on any Hub error the result is empty and convert hashes the files itself."""
    try:
        info = api.model_info(repo_id, revision=commit, files_metadata=True, token=token)
    except _hub_exceptions():
        return {}
    return {s.rfilename: s.lfs.sha256 for s in info.siblings or ()
            if s.lfs is not None and s.lfs.sha256 and any(fnmatch.fnmatchcase(s.rfilename, p) for p in patterns)}


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def upload(folder, repo_id: str, *, private: bool = False, revision: str | None = None, create_pr: bool = False,
           commit_message: str | None = None, dry_run: bool = False, keep_card: bool = False,
           token: str | None = None, progress: bool = True) -> dict:
    """Verify `folder`, then push exactly the files its manifest lists, the manifest and a model card in ONE commit.

    Nothing is sent when verification fails or with dry_run. The card is generated in memory (the verified folder
    is never modified); with keep_card an existing README.md in the folder is uploaded instead. Weight and config
    files already in the repo (at that revision) that this upload does not replace are deleted in the same commit,
    so a loader never mixes two uploads; other files (docs, images) stay.
    """
    from . import card, manifest
    from .verify import LOADABLE_SUFFIXES, verify

    folder = Path(folder)
    result = verify(folder)
    if not result.ok:
        shown = "; ".join(result.problems[:3]) + (f"; and {len(result.problems) - 3} more"
                                                  if len(result.problems) > 3 else "")
        raise IdeoquantError(f"refusing to upload {folder}: verification failed: {shown}")
    m = manifest.read(folder)
    own = folder / "README.md"
    card_text = own.read_text() if keep_card and own.is_file() else card.model_card(m, repo_id)
    paths = sorted(m["files"]) + [manifest.MANIFEST]
    files = [{"path": p, "size": (folder / p).stat().st_size} for p in paths]
    files.append({"path": "README.md", "size": len(card_text.encode())})
    message = commit_message or f"Upload {m['kind'].upper()} quantization of {_base_name(m)} (ideoquant)"
    plan = {"repo_id": repo_id, "revision": revision or "main", "create_pr": create_pr, "private": private,
            "commit_message": message, "files": files, "card": card_text, "dry_run": dry_run,
            "commit_url": None, "pr_url": None, "deleted": None}  # deleted: only known once the repo is listed
    if dry_run:
        return plan

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in paths]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode()))
    api = HfApi(token=token)
    try:
        with _progress_bars(progress):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            # Weights or configs of an earlier upload that this one does not replace (other shard names, a stale
            # index.json) would be loaded next to the new files: delete them in the same commit.
            stale = sorted(f for f in api.list_repo_files(repo_id, revision=revision)
                           if f not in m["files"] and f.endswith(LOADABLE_SUFFIXES)
                           and f not in (manifest.MANIFEST, "README.md"))
            ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
            info = api.create_commit(repo_id, ops, commit_message=message, revision=revision, create_pr=create_pr)
    except _hub_exceptions() as e:
        raise _hub_error(e, repo_id, revision, "upload to") from None
    plan.update(commit_url=info.commit_url, pr_url=info.pr_url, commit=info.oid, deleted=stale)
    return plan


def _base_name(m: dict) -> str:
    return m.get("source", {}).get("repo_id") or "Ideogram 4"
