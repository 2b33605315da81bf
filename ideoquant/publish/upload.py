"""Upload a verified output folder to the Hub in one commit, with a model card.

The token is handed to `huggingface_hub` and nothing else: it never appears in a message, the manifest or the card.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .. import manifest
from ..errors import IdeoquantError
from ..source.hub import check_base, check_repo_id, hub_error, hub_exceptions, hub_url
from . import card
from .verify import LOADABLE_SUFFIXES, verify


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
           token: str | None = None, progress: bool = True, base: str | None = None,
           bench: card.BenchSection | None = None) -> dict:
    """Verify `folder`, then push exactly the files its manifest lists, the manifest and a model card in ONE commit.

    Nothing is sent when verification fails or with dry_run. The card is generated in memory (the verified folder
    is never modified); with keep_card an existing README.md in the folder is uploaded instead. Weight and config
    files already in the repo (at that revision) that this upload does not replace are deleted in the same commit,
    so a loader never mixes two uploads; other files (docs, images) stay.

    base: the diffusers-layout pipeline the card's code loads the text encoder, tokenizer, VAE and scheduler from
    (default `load.DEFAULT_BASE_PIPELINE`).

    bench: results of `ideoquant bench` for the card (its tables) and its image grid, uploaded beside the card;
    not with keep_card (the folder's own README would not show them).
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if base is not None:
        check_base(base)
    _refuse_unverified(folder, verify(folder))
    if bench is not None and keep_card:
        raise IdeoquantError("--bench puts the bench results into the generated model card: it cannot be combined "
                             "with --keep-card")
    m = manifest.read(folder)
    own = folder / "README.md"
    card_text = own.read_text() if keep_card and own.is_file() else card.model_card(m, repo_id, base, bench)
    paths = sorted(m["files"]) + [manifest.MANIFEST]
    files = [{"path": p, "size": (folder / p).stat().st_size} for p in paths]
    files.append({"path": "README.md", "size": len(card_text.encode())})
    if bench is not None:
        files.append({"path": bench.GRID_PATH, "size": len(bench.grid_png)})
    message = commit_message or f"Upload {m['kind'].upper()} quantization of {_base_name(m)} (ideoquant)"
    plan = {"repo_id": repo_id, "revision": revision or "main", "create_pr": create_pr, "private": private,
            "commit_message": message, "files": files, "card": card_text, "dry_run": dry_run,
            "base": str(base or card.DEFAULT_BASE_PIPELINE),
            "commit_url": None, "pr_url": None, "deleted": None}  # deleted: only known once the repo is listed
    if dry_run:
        return plan

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in paths]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode()))
    if bench is not None:
        ops.append(CommitOperationAdd(path_in_repo=bench.GRID_PATH, path_or_fileobj=bench.grid_png))
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
    except hub_exceptions() as e:
        raise hub_error(e, repo_id, revision, "upload to") from None
    plan.update(commit_url=info.commit_url, pr_url=info.pr_url, commit=info.oid, deleted=stale)
    return plan


def output_folders(folder) -> list[str]:
    """The outputs in `folder`, one subfolder each (with its manifest), sorted by name."""
    return sorted(p.name for p in Path(folder).iterdir() if (p / manifest.MANIFEST).is_file())


def upload_outputs(folder, repo_id: str, *, private: bool = False, token: str | None = None,
                   base: str | None = None, verified: dict | None = None, progress: bool = True) -> dict:
    """Several outputs (the subfolders of `folder`, each with its manifest) into a NEW repo, one folder each, with one
    model card listing them all, in ONE commit.

    verified: {subfolder: VerifyResult} the caller has just shown (each subfolder is verified here otherwise); any
    problem and nothing is sent. The repo must not exist (a job never mixes with an earlier upload). It is created
    here, and deleted again when the commit fails or the call is interrupted (Ctrl-C, a cancelled job), so a repo
    either holds every output or does not exist."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if base is not None:
        check_base(base)
    names = output_folders(folder)
    if not names:
        raise IdeoquantError(f"no outputs to upload in {folder} (no subfolder with {manifest.MANIFEST})")
    for name in names:
        _refuse_unverified(folder / name, (verified or {}).get(name) or verify(folder / name))
    manifests = {name: manifest.read(folder / name) for name in names}
    card_text = card.collection_card(manifests, repo_id, base)
    paths = [f"{name}/{p}" for name, m in manifests.items() for p in [*sorted(m["files"]), manifest.MANIFEST]]

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in paths]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode()))
    api = HfApi(token=token)
    message = f"Upload {', '.join(names)} quantizations of {_base_name(next(iter(manifests.values())))} (ideoquant)"
    with _progress_bars(progress):
        try:
            api.create_repo(repo_id, private=private, exist_ok=False)
        except HfHubHTTPError as e:
            if e.response is not None and e.response.status_code == 409:
                raise IdeoquantError(f"Hub repo {repo_id} already exists: choose a new name (an upload never "
                                     "replaces a repo's content); nothing was uploaded") from None
            raise hub_error(e, repo_id, None, "upload to") from None
        except hub_exceptions() as e:
            raise hub_error(e, repo_id, None, "upload to") from None
        try:
            info = api.create_commit(repo_id, ops, commit_message=message)
        except BaseException as e:
            with contextlib.suppress(*hub_exceptions()):
                api.delete_repo(repo_id)
            if isinstance(e, hub_exceptions()):
                raise hub_error(e, repo_id, None, "upload to") from None
            raise
    files = [{"path": p, "size": (folder / p).stat().st_size} for p in paths]
    return {"repo_id": repo_id, "url": hub_url(repo_id), "private": private, "commit_url": info.commit_url,
            "commit": info.oid, "files": files + [{"path": "README.md", "size": len(card_text.encode())}],
            "card": card_text}


def _refuse_unverified(folder: Path, result) -> None:
    if not result.ok:
        shown = "; ".join(result.problems[:3]) + (f"; and {len(result.problems) - 3} more"
                                                  if len(result.problems) > 3 else "")
        raise IdeoquantError(f"refusing to upload {folder}: verification failed: {shown}")


def _base_name(m: dict) -> str:
    return m.get("source", {}).get("repo_id") or "Ideogram 4"
