"""Output folders appear whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
from pathlib import Path

from ..errors import IdeoquantError


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
    _remove_stale(out)
    staging = out.parent / f".{out.name}.ideoquant-{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.ideoquant-{os.getpid()}.old"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _remove_stale(out: Path) -> None:
    """Staging folders of runs that were killed (SIGKILL, power loss) and whose process is gone."""
    for p in out.parent.glob(f".{out.name}.ideoquant-*.partial"):
        try:
            pid = int(p.name.rsplit("-", 1)[1].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
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


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_mapped(f.fileno(), os.fstat(f.fileno()).st_size)


def sha256_mapped(fd: int, size: int, ready=None, chunk: int = 8 << 20) -> str:
    """sha256 of the first `size` bytes of a file, hashed from a memory map.

    Mapped, the page cache is hashed in place; read() would first copy every byte (measured: the copies cost
    more CPU than half the hash itself). Each chunk is unmapped once hashed, so the resident size stays one
    chunk. ready(pos) -> end: for a file still being written, blocks until bytes up to `end` (> pos) exist.
    """
    h = hashlib.sha256()
    if size == 0:
        return h.hexdigest()
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        drop = hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")  # not on Windows
        if drop:
            mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            pos = 0
            while pos < size:
                end = min(size, pos + chunk, ready(pos) if ready else size)
                h.update(view[pos:end])
                start = pos - pos % mmap.PAGESIZE
                if drop:
                    mm.madvise(mmap.MADV_DONTNEED, start, end - start)
                pos = end
        finally:
            view.release()
    return h.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
