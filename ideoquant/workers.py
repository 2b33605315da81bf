"""One worker pool per job: blocks of rows encoded on every CPU this process may use.

The pool lives as long as the job (not one per block), and each worker thread keeps its own scratch buffers
(`Pool.workspace`), so a multi-MB block never pays fresh page faults. Nothing here changes process-wide state:
the encoders release the GIL (numba `nogil`, torch ops) and need no interpreter or torch thread settings.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait

from .encode.int8 import Workspace
from .errors import IdeoquantError

MAX_THREADS = 1024


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroups cpusets), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on macOS / Windows
        return max(1, os.cpu_count() or 1)


def thread_count(threads: int | None) -> int:
    """`threads` as asked (None: every available CPU); 1 to MAX_THREADS, anything else is an IdeoquantError."""
    if threads is None:
        return available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise IdeoquantError(f"--threads {threads!r}: must be a whole number from 1 to {MAX_THREADS}")
    return threads


class Pool:
    """fn(item) on the workers, results consumed in order on the calling thread. Use as a context manager."""

    def __init__(self, threads: int | None = None):
        self.threads = thread_count(threads)
        self._executor = None
        self._local = threading.local()

    def __enter__(self) -> "Pool":
        if self.threads > 1:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="ideoquant-encode")
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def workspace(self) -> Workspace:
        """The calling worker thread's reusable buffers (what an encoder returns in them is valid until its next
        call on that thread)."""
        ws = getattr(self._local, "workspace", None)
        if ws is None:
            ws = self._local.workspace = Workspace()
        return ws

    def run(self, fn, items, done, window: int | None = None) -> None:
        """fn(item) for every item on the workers; done(item, result) on this thread, in item order.

        At most `window` items (default: 4 per thread) are in flight, so results waiting for `done` stay a few
        blocks however long `items` is. On an error nothing new starts, and the items already running finish
        before it propagates: their writer is about to be aborted, and a write into a closed (or reused)
        descriptor must not happen.
        """
        if self._executor is None:
            for x in items:
                done(x, fn(x))
            return
        window = window or 4 * self.threads
        pending: deque = deque()
        try:
            for x in items:
                pending.append((x, self._executor.submit(fn, x)))
                if len(pending) >= window:
                    y, f = pending.popleft()
                    done(y, f.result())
            while pending:
                y, f = pending.popleft()
                done(y, f.result())
        finally:
            for _, f in pending:
                f.cancel()
            wait([f for _, f in pending])

    def map(self, fn, items) -> list:
        """[fn(item) for item in items], on the workers."""
        out = []
        self.run(fn, items, lambda _, r: out.append(r))
        return out
