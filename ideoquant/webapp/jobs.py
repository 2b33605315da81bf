"""One conversion job of the browser app, start to finish, without any web framework: check, convert, verify, upload.

A job converts a Hub repo to the outputs asked for (INT8 in one pass, every GGUF type in a second one), verifies each
output, and uploads them all to a new repo in one commit (`publish.upload.upload_outputs`). It runs on a thread of its
own; the page reads its state (`Job.snapshot`) while it runs.

- Before any work: the target repo must not exist, the source must be readable with the user's token, and the disk
  must hold the download and every output (with a suggestion of fewer outputs when it cannot).
- Cancel (and the time limit) stop the job as Ctrl-C stops the CLI: `KeyboardInterrupt`'s sibling `Cancelled` is
  raised in the job's thread, the conversion's staging is removed and an upload's new repo is deleted.
- Work files (the outputs, and the source download when the job made it) are removed after every job.
The token is handed to the library calls and nothing else: never logged, never in a message or a file.
"""

from __future__ import annotations

import ctypes
import fnmatch
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .. import formats, job, model
from ..errors import IdeoquantError
from ..formats import catalog
from ..progress import Reporter
from ..publish.upload import upload_outputs
from ..publish.verify import verify
from ..source import open_source
from ..source.hub import allow_patterns, check_repo_id, hub_error, hub_exceptions
from ..formatting import human_bytes
from ..write.staging import _existing_ancestor
from ..write.target import check_target, source_paths
from ..write.target import hub_cache_folder as cache_folder

INT8 = "int8"
OUTPUTS = (INT8, *catalog.GGUF_CHOICES)  # what a job can write: "int8" and every `ideoquant gguf --type`
INT8_RECIPE = "int8-w8a8"
GGUF_LAYOUT = "original"  # what ComfyUI and stable-diffusion.cpp read


_RUNNING: set["Job"] = set()  # this process's jobs between start() and the end of their cleanup
_RUNNING_LOCK = threading.Lock()


def stop_all(timeout: float | None = 60) -> None:
    """Cancel every running job and wait for its cleanup: the app calls it when it shuts down (Ctrl-C, SIGTERM),
    so that no job dies with the process half-way, its work files left behind."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for job in running:
        job.cancel("shutdown")
    for job in running:
        job.wait(timeout)


class Cancelled(BaseException):
    """Raised in a job's thread by Cancel or the time limit; like KeyboardInterrupt, no `except Exception` stops it."""


@dataclass
class Request:
    source: str
    outputs: list[str]
    target: str
    private: bool = False
    imatrix: str | None = None  # an importance-matrix file, or "ones"


@dataclass
class Row:
    """Progress of one backbone in one pass."""

    label: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def rate(self) -> float | None:
        elapsed = (self.finished or time.monotonic()) - self.started
        return self.done / elapsed if elapsed > 0 and self.done else None

    def eta(self) -> float | None:
        rate = self.rate()
        return None if rate is None or self.finished else (self.total - self.done) / rate


class _Progress(Reporter):
    """The library's reports, kept per (pass, backbone) for the page to draw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: dict[str, Row] = {}
        self.stage = ""

    def start(self, task, total):
        with self.lock:
            self.rows[f"{self.stage}/{task}"] = Row(f"{self.stage} · {task}", total)

    def advance(self, task, n):
        with self.lock:
            self.rows[f"{self.stage}/{task}"].done += n

    def finish(self, task):
        with self.lock:
            row = self.rows[f"{self.stage}/{task}"]
            row.done, row.finished = row.total, time.monotonic()

    def copy(self) -> list[Row]:
        with self.lock:
            return [Row(r.label, r.total, r.done, r.started, r.finished) for r in self.rows.values()]


def parse_outputs(outputs) -> tuple[bool, list[str]]:
    """("int8" asked, [GGUF types in the order given]); an unknown name or none at all is an error."""
    names = [str(o).strip().lower() for o in (outputs or [])]
    unknown = [o for o in names if o not in OUTPUTS]
    if unknown:
        raise IdeoquantError(f"unknown output '{unknown[0]}': choose from {', '.join(OUTPUTS)}")
    if not names:
        raise IdeoquantError("choose at least one output (INT8 or a GGUF type)")
    return INT8 in names, list(dict.fromkeys(o for o in names if o != INT8))


def default_target(user: str | None, source: str) -> str:
    name = str(source or model.DEFAULT_SOURCE).strip().rstrip("/").split("/")[-1]
    return f"{user}/{name}-ideoquant" if user else ""


class Job:
    """One request on its own thread. `start()`, then read `snapshot()`; `cancel()` at any time."""

    def __init__(self, request: Request, token: str | None, work_root: Path, *, disk_budget: int | None = None,
                 time_limit: float | None = None, threads: int | None = None):
        self.request, self._token = request, token
        self.work = Path(work_root) / f"job-{uuid.uuid4().hex[:12]}"
        self.disk_budget, self.time_limit, self.threads = disk_budget, time_limit, threads
        self.progress = _Progress()
        self.phase = "queued"
        self.plan: dict[str, int] = {}  # output folder -> bytes it will take
        self.verified: dict[str, list[str]] = {}  # output folder -> verify lines ("ok ..." / "FAIL ...")
        self.result: dict | None = None
        self.error: str | None = None
        self.stopped: str | None = None  # why a cancelled job stopped ("cancelled", "time limit")
        self.started = self.ended = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._interruptible = False
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ---- control ---------------------------------------------------------------------------------------------
    def start(self) -> "Job":
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="ideoquant-app-job", daemon=True)
        with self._lock:
            self._interruptible = True
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        self._thread.start()
        if self.time_limit:
            self._timer = threading.Timer(self.time_limit, self.cancel, args=("time limit",))
            self._timer.daemon = True
            self._timer.start()
        return self

    def cancel(self, reason: str = "cancelled") -> bool:
        """Stop the job like Ctrl-C; False when it is already past the point where stopping changes anything."""
        with self._lock:
            if not self._interruptible or self._thread is None:
                return False
            self._interruptible = False  # one interrupt per job: its cleanup is never interrupted
            self.stopped = reason
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident), ctypes.py_object(Cancelled))
            return True

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    # ---- the job ---------------------------------------------------------------------------------------------
    def _main(self) -> None:
        cached_before = set()
        try:
            try:
                cached_before = self._cached_source_paths()
                self._run()
            finally:
                with self._lock:
                    self._interruptible = False
        except Cancelled:
            self.phase = "stopped"
            self.error = {"time limit": "the job ran past the time limit and was stopped",
                          "shutdown": "the app shut down"}.get(self.stopped, "cancelled") + (
                              ": nothing was uploaded, work files removed")
        except IdeoquantError as e:
            self.phase, self.error = "failed", str(e)
        except OSError as e:
            self.phase, self.error = "failed", " ".join(f"{e.filename + ': ' if e.filename else ''}"
                                                        f"{e.strerror or e}".split())
        except Exception as e:  # noqa: BLE001  a bug: one line in the page, the job's files still removed
            self.phase, self.error = "failed", f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"
        finally:
            if self.error and self.result is None and "nothing was uploaded" not in self.error:
                self.error += "; nothing was uploaded"
            if self._timer is not None:
                self._timer.cancel()
            self._cleanup(cached_before)
            self.ended = time.monotonic()
            with _RUNNING_LOCK:
                _RUNNING.discard(self)
            self.done.set()

    def _run(self) -> None:
        r = self.request
        int8, types = parse_outputs(r.outputs)
        source, target = str(r.source or "").strip(), str(r.target or "").strip()
        if source.count("/") != 1 or not all(source.split("/")):
            raise IdeoquantError(f"source '{source}': give a Hub repo id, ORG/NAME")
        check_repo_id(target, "target")
        self.phase = "checking"
        self._check_target(target)
        labels = [t.upper() for t in types]  # what names a GGUF output (its files, its folder)
        # Each pass's format reads its options now (an imatrix a type needs, ...): refused before any work.
        passes = ([(INT8, formats.of(INT8_RECIPE).conversion(INT8_RECIPE, (), (), {}))] if int8 else []) + (
            [(labels[0] if len(labels) == 1 else "", formats.get("gguf").conversion(
                None, (), (), {"qtype": types, "layout": GGUF_LAYOUT, "imatrix": r.imatrix}))] if types else [])
        self._check_disk(source, passes)
        check_target(self.work, source_paths(source, r.imatrix), option="--work-dir", folder=True)
        outputs = self.work / "outputs"
        outputs.mkdir(parents=True)
        self.phase = "converting"
        if int8:
            self.progress.stage = "INT8"
            job.convert(source, outputs / INT8, recipe=INT8_RECIPE, token=self._token, threads=self.threads,
                        reporter=self.progress)
        if types:
            self.progress.stage = "GGUF " + ", ".join(labels)
            one_pass = self.work / "gguf"
            job.convert_gguf(source, one_pass if len(types) > 1 else outputs / labels[0], qtype=types,
                             layout=GGUF_LAYOUT, token=self._token, threads=self.threads, imatrix=r.imatrix,
                             reporter=self.progress)
            if len(types) > 1:  # one pass writes OUT/<TYPE>/ each: every output becomes a folder of the repo
                for label in labels:
                    (one_pass / label).rename(outputs / label)
        self.phase = "verifying"
        results = {}
        for name in sorted(p.name for p in outputs.iterdir()):
            results[name] = verify(outputs / name)
            self.verified[name] = ([f"ok {c}" for c in results[name].checks]
                                   + [f"FAIL {p}" for p in results[name].problems])
        self.phase = "uploading"
        self.result = upload_outputs(outputs, target, private=r.private, token=self._token, verified=results,
                                     progress=False)
        self.phase = "done"

    def _check_target(self, target: str) -> None:
        from huggingface_hub import HfApi

        try:
            exists = HfApi(token=self._token).repo_exists(target)
        except hub_exceptions() as e:
            raise hub_error(e, target, None, "check") from None
        if exists:
            raise IdeoquantError(f"Hub repo {target} already exists: choose a new name (a job never replaces a "
                                 "repo's content); nothing was uploaded")

    def _check_disk(self, source: str, passes) -> None:
        """The source download (what the cache lacks) plus every output must fit the disk (and the app's budget).
        passes: (the name of a pass's one output, its format's Conversion); an output of several is its folder."""
        from huggingface_hub import HfApi, try_to_load_from_cache

        src = open_source(source, token=self._token, headers_only=True)  # configs and headers: the access check
        for name, conversion in passes:
            for o in conversion.outputs(src):
                self.plan[o.folder or name] = sum(p.bytes_out for p in o.plans.values())
        try:
            info = HfApi(token=self._token).model_info(source, revision=src.commit, files_metadata=True)
        except hub_exceptions() as e:
            raise hub_error(e, source, None, "download") from None
        patterns = allow_patterns(None)
        download = sum(s.size or 0 for s in info.siblings or ()
                       if any(fnmatch.fnmatchcase(s.rfilename, p) for p in patterns)
                       and not isinstance(try_to_load_from_cache(source, s.rfilename, revision=src.commit), str))
        free = min(shutil.disk_usage(_existing_ancestor(p)).free for p in (self.work, cache_folder(source)))
        if self.disk_budget is not None:
            free = min(free, self.disk_budget)
        need = download + sum(self.plan.values())
        if need <= free:
            return
        sizes = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.plan.items())
        fits, room = [], free - download
        for label, size in self.plan.items():
            if size <= room:
                fits.append(label)
                room -= size
        hint = (f"choose fewer outputs at once, e.g. {' + '.join(fits)}, and the others in a second job" if fits
                else "no output fits next to the source download: free some disk space")
        raise IdeoquantError(f"not enough disk space for this job: it needs {human_bytes(need)} (source download "
                             f"{human_bytes(download)}; outputs {sizes}) and {human_bytes(free)} are free; {hint}; "
                             "nothing was uploaded")

    def _cached_source_paths(self) -> set[Path]:
        source = str(self.request.source or "").strip()
        if source.count("/") != 1:
            return set()
        folder = cache_folder(source)
        locks = folder.parent / ".locks" / folder.name
        return {p for p in (folder, locks) if p.exists()}

    def _cleanup(self, cached_before: set[Path]) -> None:
        """Work files go, success or failure; so does the source's cache folder when this job downloaded it."""
        shutil.rmtree(self.work, ignore_errors=True)
        for p in self._cached_source_paths() - cached_before:
            shutil.rmtree(p, ignore_errors=True)

    # ---- what the page shows ---------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"phase": self.phase, "rows": self.progress.copy(), "plan": dict(self.plan),
                "verified": {k: list(v) for k, v in self.verified.items()}, "result": self.result,
                "error": self.error, "elapsed": (self.ended or time.monotonic()) - (self.started or time.monotonic())}

