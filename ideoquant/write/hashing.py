"""sha256 of every file a job reads or writes, computed from memory maps, overlapping with the job's work."""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


_thread = threading.local()  # a Hasher's thread: `cancel`, its job's stop event


class Cancelled(Exception):
    """The hash was abandoned (the job stopped)."""


def sha256_file(path: Path, cancel: threading.Event | None = None, ready=None, hashed=None) -> str:
    with open(path, "rb") as f:
        return sha256_mapped(f.fileno(), os.fstat(f.fileno()).st_size, ready, cancel=cancel, hashed=hashed)


def sha256_mapped(fd: int, size: int, ready=None, chunk: int = 8 << 20, cancel: threading.Event | None = None,
                  hashed=None) -> str:
    """sha256 of the first `size` bytes of a file, hashed from a memory map.

    Mapped, the page cache is hashed in place; read() would first copy every byte (measured: the copies cost
    more CPU than half the hash itself). Each chunk is unmapped once hashed, so the resident size stays one
    chunk. ready(pos) -> end: blocks until the bytes up to `end` (> pos) may be hashed (a file still being
    written: until they exist). hashed(pos, end): called once bytes [pos, end) are hashed and unmapped (the
    caller may then let the page cache drop them). cancel: once set, the hash stops at the next chunk (raises
    Cancelled): an interrupted job does not wait for the rest of an 18 GB file.
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
            cancel = cancel or getattr(_thread, "cancel", None)
            while pos < size:
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                end = min(size, pos + chunk, ready(pos) if ready else size)
                h.update(view[pos:end])
                start = pos - pos % mmap.PAGESIZE
                if drop:
                    mm.madvise(mmap.MADV_DONTNEED, start, end - start)
                if hashed is not None:
                    hashed(pos, end)
                pos = end
        finally:
            view.release()
    return h.hexdigest()


class Hasher:
    """sha256 of finished files on one background thread, overlapping with the next tensor's work.
    Use as a context manager: the thread ends with the block, finished or cancelled."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ideoquant-hash",
                                        initializer=setattr, initargs=(_thread, "cancel", self._cancel))
        self._jobs: dict[str, tuple[Path, Future]] = {}

    def __enter__(self) -> "Hasher":
        return self

    def __exit__(self, *exc) -> None:
        if exc and exc[0] is not None:  # the job failed or was interrupted: stop the hash in flight now
            self._cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, key: str, path: Path, ready=None, hashed=None) -> None:
        """Hash `path` on the thread, in order of `add`; ready and hashed as `sha256_mapped` takes them."""
        self._jobs[key] = (path, self._pool.submit(sha256_file, path, None, ready, hashed))

    def add_known(self, key: str, path: Path, sha256: str) -> None:
        """A file whose digest was computed while it was written."""
        done: Future = Future()
        done.set_result(sha256)
        self._jobs[key] = (path, done)

    def results(self) -> dict[str, dict]:
        """{key: {"size", "sha256"}} for every file added, waiting for those still being hashed."""
        return {k: {"size": p.stat().st_size, "sha256": f.result()} for k, (p, f) in self._jobs.items()}
