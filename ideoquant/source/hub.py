"""The Hugging Face Hub as a source: download exactly what a conversion reads, and one error line per refusal.

Everything goes through `huggingface_hub` unchanged: the normal cache (resumable, shared with diffusers), the
token from the argument, `HF_TOKEN` or `hf auth login`. The token is handed to the client and nothing else:
it never appears in a message, the manifest or the card.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from .. import model
from ..errors import IdeoquantError

# What a conversion reads from a pipeline repo, per backbone; nothing else (text encoder, VAE) is fetched.
COMPONENT_PATTERNS = ("{c}/config.json", "{c}/*.safetensors", "{c}/*.safetensors.index.json")


def allow_patterns(components: list[str] | None) -> list[str]:
    return ["model_index.json"] + [p.format(c=c) for c in (components or model.COMPONENTS) for p in COMPONENT_PATTERNS]


def check_repo_id(repo_id, option: str = "--repo-id") -> None:
    """ORG/NAME as the Hub accepts it (huggingface_hub's own validator), before anything is read or sent."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise IdeoquantError(f"{option} '{repo_id}': expected ORG/NAME (a Hub namespace and a repo name)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise IdeoquantError(f"{option} '{repo_id}': {' '.join(str(e).split())}") from None


def check_base(base, option: str = "--base") -> None:
    """A base pipeline is a Hub repo id (ORG/NAME) or a local folder holding a diffusers-layout Ideogram 4
    pipeline (its model_index.json names the pipeline class); anything else is refused before anything loads."""
    spec = str(base)
    path = Path(spec).expanduser()
    if path.exists():
        index = path / "model_index.json"
        try:
            cls = json.loads(index.read_text()).get("_class_name") if path.is_dir() else None
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            cls = None
        if cls != model.PIPELINE_CLASS:
            raise IdeoquantError(f"{option} {spec}: not a diffusers-layout Ideogram 4 pipeline folder (its "
                                 f"model_index.json must name {model.PIPELINE_CLASS}); give such a folder or a Hub "
                                 "repo id ORG/NAME")
        return
    try:
        check_repo_id(spec, option)
    except IdeoquantError:
        raise IdeoquantError(f"{option} '{spec}': neither a Hub repo id (ORG/NAME) nor an existing local folder "
                             "holding a diffusers-layout Ideogram 4 pipeline (model_index.json)") from None


def hub_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


def hub_error(e: BaseException, repo_id: str, revision: str | None, doing: str) -> IdeoquantError:
    """One clear line for each way the Hub can say no. Order matters: GatedRepoError is a RepositoryNotFoundError."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        LocalTokenNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError, RevisionResolutionError)

    local = ", or give a local path to the checkpoint instead" if doing == "download" else ""
    if isinstance(e, LocalTokenNotFoundError):
        return IdeoquantError(f"cannot {doing} {repo_id}: no Hub token; log in with `hf auth login` or set HF_TOKEN")
    if isinstance(e, GatedRepoError):
        return IdeoquantError(f"{repo_id} is gated: accept its licence at {hub_url(repo_id)}, then log in with "
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


def hub_exceptions() -> tuple[type[BaseException], ...]:
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
    except hub_exceptions() as e:
        raise hub_error(e, repo_id, revision, "download") from None
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
    except hub_exceptions() as e:
        raise hub_error(e, repo_id, revision, "download") from None
    return snapshot, rev.resolved, headers


def _lfs_hashes(api, repo_id: str, commit: str, patterns: list[str], token: str | None) -> dict[str, str]:
    """sha256 of the LFS files as the Hub records them, so convert need not hash gigabytes it just downloaded.
    Best effort: offline or on any Hub error the result is empty and convert hashes the files itself."""
    try:
        info = api.model_info(repo_id, revision=commit, files_metadata=True, token=token)
    except hub_exceptions():
        return {}
    return {s.rfilename: s.lfs.sha256 for s in info.siblings or ()
            if s.lfs is not None and s.lfs.sha256 and any(fnmatch.fnmatchcase(s.rfilename, p) for p in patterns)}
