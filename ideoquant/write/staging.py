"""Output folders appear whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from ..errors import IdeoquantError
from ..formatting import human_bytes


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any error (or Ctrl-C) it is removed.

    Beside `out`, on the same filesystem, so the final rename is atomic. An existing `out` survives every
    failure: it is moved aside only after the new one is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise IdeoquantError(f"{out} already exists (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    staging = out.parent / staging_name(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    try:
        if os.path.lexists(out):
            old = out.parent / f".{out.name}.ideoquant-{os.getpid()}.old"
            out.rename(old)
        staging.rename(out)
    except BaseException:  # even an interrupt between the two renames leaves the old OUT in place
        if old is not None and not os.path.lexists(out):
            old.rename(out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


def staging_name(out: Path) -> str:
    """The temporary name beside OUT that this process writes the new output under."""
    return f".{Path(out).name}.ideoquant-{os.getpid()}.partial"


def remove_stale(out: Path) -> None:
    """Staging files and folders of runs that were killed (SIGKILL, power loss) and whose process is gone."""
    for p in [*out.parent.glob(f".{out.name}.ideoquant-*.partial"), *out.parent.glob(f".{out.name}.ideoquant-*.old")]:
        try:
            pid = int(p.name.rsplit("-", 1)[1].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
        except (ValueError, PermissionError, IndexError):
            pass


def check_free_space(folder: Path, needed: int) -> None:
    """Fail up front, from the plan, rather than halfway through a 10 GB write."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = 64 << 20
    if needed + margin > free:
        raise IdeoquantError(f"not enough free disk in {probe}: the output needs {human_bytes(needed)}, "
                             f"{human_bytes(free)} free")


# ---------------------------------------------------------------- refusing early: the source, OUT, the lock


def _real(p: Path) -> Path:
    """`p` with symlinks and `..` resolved (as far as it exists), absolute. Resolved as the operating system does:
    `link/..` is the parent of the link's target, not the folder holding the link."""
    return Path(os.path.realpath(os.path.expanduser(p)))


def entry_path(p: Path) -> Path:
    """The directory entry `p` names, absolute: its folder resolved, a final link itself not followed (a rename
    over `p` replaces the link)."""
    head, tail = os.path.split(os.path.expanduser(os.fspath(p)).rstrip("/") or "/")
    if tail in ("", ".", ".."):
        return _real(p)
    return Path(os.path.realpath(head or ".")) / tail


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_source(out: Path, protected, folders=(), owned_marker: str | None = None, option: str = "--out",
                     new_inside: bool = True) -> None:
    """Refuse an OUT that is, contains or would replace anything in `protected` (the source's paths: its folder,
    every file it reads; their symlink targets are followed). Compared resolved (symlinks, `..`) and by inode, so
    no spelling of the same place gets past it.

    Inside a source folder (`folders`), a new OUT is fine only with `new_inside` (an output folder: the source's
    reader never looks into it; a file would be, e.g. a .safetensors in a component folder is read as a shard);
    an existing one would be replaced, which is refused unless it is an earlier output (holds `owned_marker`)."""
    out = Path(out)
    refuse = f"refusing to replace or delete (part of) the source; choose another {option}"
    targets = {_real(out), entry_path(out)}  # the entry itself when it is a link: the rename replaces the link
    try:
        st = os.stat(out)
        out_id = (st.st_dev, st.st_ino)
    except OSError:
        out_id = None
    for p in protected:
        p = Path(p)
        for s in (entry_path(p), _real(p)):
            for t in targets:
                if _within(s, t):
                    what = "is" if s == t else "contains"
                    raise IdeoquantError(f"{option} {out} {what} the source {p}: {refuse}")
        if out_id is not None:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == out_id:
                raise IdeoquantError(f"{option} {out} is the source {p}: {refuse}")
    exists = os.path.lexists(out)
    if exists or not new_inside:
        ours = owned_marker is not None and os.path.isdir(out) and os.path.isfile(Path(out) / owned_marker)
        for folder in folders:
            for s in {entry_path(folder), _real(folder)}:
                if any(t != s and _within(t, s) for t in targets) and not ours:
                    if not exists:
                        raise IdeoquantError(f"{option} {out} lies inside the source {folder}: a file there would "
                                             f"become part of the source; choose another {option}")
                    raise IdeoquantError(f"{option} {out} already exists inside the source {folder} and is not an "
                                         f"ideoquant output: {refuse}")


def _existing_ancestor(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not os.path.lexists(p):
        p = p.parent
    return p


def check_output(out: Path, overwrite: bool = False, needed: int | None = None, option: str = "--out") -> None:
    """What can be known about OUT before any work: it does not exist (or --overwrite), its folder can be created
    and written, and (with `needed`, the planned bytes) the disk has room."""
    out = Path(out)
    if os.path.lexists(out) and not overwrite:
        raise IdeoquantError(f"{option} {out} already exists (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    probe = _existing_ancestor(parent)
    if not probe.is_dir():
        raise IdeoquantError(f"cannot write {option} {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise IdeoquantError(f"cannot write {option} {out}: {probe} is not writable (permission denied)")
    if needed is not None:
        check_free_space(parent, needed)


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.ideoquant.lock"


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on OUT for the whole run (a lock file beside it, removed at the end): a second run
    to the same OUT fails at once, naming the process that holds it. Folders created for OUT are removed again
    if the run fails before writing them."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    created = []
    p = Path(os.path.abspath(parent))
    while not os.path.lexists(p):
        created.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(out)
    fd = None
    try:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                fd = None
                raise IdeoquantError(f"{out} is being written by another ideoquant run (pid {holder}); "
                                     f"wait for it to finish (lock: {path})") from None
            # The holder before us may have removed the file as we opened it: lock the file that is there now.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    except BaseException:
        _unlock(path, fd)
        fd = None
        for d in created:  # innermost first; only folders this run made and left empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    finally:
        if fd is not None:
            _unlock(path, fd)


def _unlock(path: Path, fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)  # while still holding the lock: a waiting run re-checks the inode
    os.close(fd)


def disk_full_error(folder: Path, e: OSError, needed: int | None = None) -> IdeoquantError:
    """An ENOSPC / EDQUOT / EFBIG while writing, as one line: where, and how much space is missing."""
    try:
        free = shutil.disk_usage(_existing_ancestor(folder)).free
    except OSError:
        free = None
    if e.errno == errno.EFBIG:
        return IdeoquantError(f"cannot write {folder}: file too large (the file size limit of this process or "
                              f"filesystem; {e.filename or ''})".replace("; )", ")"))
    what = "quota exceeded" if e.errno == errno.EDQUOT else "disk full"
    msg = f"{what} writing {folder}"
    if needed is not None and free is not None and needed > free:
        msg += (f": the output needs {human_bytes(needed)}, {human_bytes(free)} free "
                f"({human_bytes(needed - free)} missing)")
    elif needed is not None and free is not None:
        msg += (f": the output needs {human_bytes(needed)}, only {human_bytes(free)} free "
                "(missing at the time of writing)")
    elif free is not None:
        msg += f": {human_bytes(free)} free"
    return IdeoquantError(msg + "; nothing was written, an existing output is unchanged")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
