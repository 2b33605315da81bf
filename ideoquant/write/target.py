"""The output policy: what every command that writes a file or a folder promises, implemented once.

1. No target is, contains or (when it exists) lies inside anything the command reads: the SOURCE, and every other
   input it names (`--inputs`, `--imatrix`, `--smoothquant`, a recipe file, the outputs `eval` compares). Compared
   resolved (symlinks, `..`), by inode (hard links) and, for a Hub repo id, against the repo's folder in the Hugging
   Face cache. A new output folder inside a source folder is fine (it replaces nothing, and the source's reader
   never looks into it); a file is not (a .safetensors in a component folder would be read as a shard).
2. An existing target is replaced only with `--overwrite`.
3. The new output is written under a temporary name beside the target and renamed into place only once complete:
   an error, Ctrl-C or SIGTERM leaves the old target as it was and nothing else behind.
4. All of it is checked before any model runs or any byte of a source is read.

`output_file` is the one call for a command that writes one file; folders go through `check_target` and
`staging.staged_output` (the conversion job).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ..errors import IdeoquantError
from .staging import check_not_source, check_output, entry_path, output_lock, remove_stale, staging_name


def source_paths(*specs) -> list[Path]:
    """The places a command's inputs name, before anything is opened: local paths as given (a file, a folder, or
    a link to either), a Hub repo id's folder in the Hugging Face cache (its snapshots link into its blobs).
    A spec may be None, a string, a path or a list of them; a name that is neither (a packaged recipe, `ones`)
    names no place."""
    paths: list[Path] = []
    for spec in specs:
        if spec is None:
            continue
        if isinstance(spec, (list, tuple)):
            paths += source_paths(*spec)
            continue
        spec = os.fspath(spec)
        path = Path(spec).expanduser()
        if os.path.lexists(path):
            paths.append(path)
            continue
        parts = spec.split("/")
        if len(parts) == 2 and all(parts):
            paths.append(hub_cache_folder(spec))
    return paths


def hub_cache_folder(repo_id: str) -> Path:
    """A model repo's folder in the Hugging Face cache (its snapshots link into its blobs), named by
    huggingface_hub's own rule."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def check_target(out, sources=(), *, overwrite: bool = False, option: str = "--out", folder: bool = False,
                 owned_marker: str | None = None, needed: int | None = None) -> Path:
    """Points 1, 2 and 4 of the policy for `out` (the place `option` names), against the input paths `sources`
    (`source_paths`): refuse (IdeoquantError, one line) a target that is, contains or would replace an input, an
    existing one without `overwrite`, a file target that is a folder, a place that cannot be written, or (with
    `needed` bytes) a disk without room. `folder`: the target is a folder; inside a source folder an existing one
    may be replaced only if it is an earlier output (holds `owned_marker`). Returns `out` as a Path."""
    out = Path(out)
    sources = [Path(p) for p in sources]
    check_not_source(out, sources, folders=[p for p in sources if p.is_dir()],
                     owned_marker=owned_marker if folder else None, option=option, new_inside=folder)
    check_output(out, overwrite, needed, option=option)
    if not folder and (os.path.isdir(out) or out.name in ("", ".", "..")):
        raise IdeoquantError(f"cannot write {option} {out}: it is a folder; give a file name")
    return out


@contextlib.contextmanager
def output_file(out, sources=(), *, overwrite: bool = False, option: str = "--out") -> Iterator[Path | None]:
    """The output policy for a command that writes one file (see the module docstring): call it before the
    command reads or computes anything and keep it open for the whole run.

        with output_file(args.out, source_paths(args.source, args.inputs), overwrite=args.overwrite,
                         option="--out") as tmp:
            ...  # load, compute
            save(result, tmp)  # write the complete file to `tmp`

    On entry: `check_target` (refused: one IdeoquantError line), then OUT's lock (a second run to the same file
    fails at once). Yields the temporary path beside `out` to write to (a writer that picks its format from the
    file name must be told the format: the temporary name ends in `.partial`). On a normal exit the temporary
    file is renamed over `out` (atomic: same folder); on any exception, Ctrl-C or SIGTERM it is removed and an
    existing `out` is untouched. `out=None` (an optional output not asked for) yields None and does nothing."""
    if out is None:
        yield None
        return
    out = check_target(out, sources, overwrite=overwrite, option=option)
    entry = entry_path(out)  # the place checked is the place written, however `out` is spelled
    with output_lock(entry):
        remove_stale(entry)
        tmp = entry.parent / staging_name(entry)
        try:
            yield tmp
            if not tmp.is_file():
                raise IdeoquantError(f"nothing was written to {option} {out}")
            if os.path.isdir(entry):  # appeared since the check: never replace a folder with a file
                raise IdeoquantError(f"cannot write {option} {out}: it is a folder; give a file name")
            os.replace(tmp, entry)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
