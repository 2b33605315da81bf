"""Output folders appear whole or not at all."""

from __future__ import annotations

import contextlib
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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
