#!/usr/bin/env python
"""End to end, as a user runs it: every ideoquant route against `cp -r` of the same backbone, cold, synced.

Each route is a fresh process, timed from spawn until its output is on the disk: the command and then `sync`
(both `cp -r SOURCE OUT && sync` and `ideoquant ... && sync`; without the `sync` a route returns with gigabytes
of dirty pages, which flatters whichever route leaves more). Before every command the page cache is dropped
(`sync; echo 3 > /proc/sys/vm/drop_caches`: run as root). The routes alternate, round after round, and the
table gives the median of the rounds:

  cp -r                         the I/O floor: read every byte, write as many
  convert (INT8)                `ideoquant convert SOURCE`
  convert --recipe fp8-w8a8     when the recipe exists in this checkout
  gguf --type q8_0              `ideoquant gguf SOURCE --type q8_0`
  gguf --type q4_k_m            `ideoquant gguf SOURCE --type q4_k_m`

wall: seconds from spawn until `sync` returns. CPU-s: user + system time of the command and its `sync` (from
wait4: the process and every thread it ran). peak RSS: the command's largest resident set (ru_maxrss); peak anon:
its largest anonymous resident set, sampled every 20 ms (file pages of the source a map shows are the kernel's to
drop; anonymous memory is what the route needs). The source is one backbone folder at the real size, built once
by `scripts/build_real_source.py` (about 9.3 GB of FP8):

    python scripts/build_real_source.py /data/ideogram4-fp8 --components transformer
    python scripts/bench_e2e.py /data/ideogram4-fp8/transformer --rounds 2

The markdown table is printed and written to docs/bench_e2e.md (`--out -`: print only), with the machine it ran
on. Outputs are written beside the source (`--workdir`) and removed after each run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def routes(source: Path, out: Path) -> dict[str, list[str]]:
    """Route name -> command; the fp8-w8a8 route only where this checkout has the recipe."""
    sys.path.insert(0, str(ROOT))
    from ideoquant.recipe import recipe_files

    cli = [sys.executable, "-m", "ideoquant"]
    found = {
        "`cp -r`": ["cp", "-r", str(source), str(out)],
        "`convert` (INT8)": [*cli, "convert", str(source), "--out", str(out)],
        "`convert --recipe fp8-w8a8`": [*cli, "convert", str(source), "--out", str(out), "--recipe", "fp8-w8a8"],
        "`gguf --type q8_0`": [*cli, "gguf", str(source), "--out", str(out), "--type", "q8_0"],
        "`gguf --type q4_k_m`": [*cli, "gguf", str(source), "--out", str(out), "--type", "q4_k_m"],
    }
    if "fp8-w8a8" not in {p.stem for p in recipe_files()}:
        del found["`convert --recipe fp8-w8a8`"]
    return found


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"error: cannot drop the page cache ({e}); run as root") from None


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def timed(cmd: list[str]) -> dict:
    """`cmd && sync`, timed from spawn until sync returns; CPU and memory from wait4 and /proc."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anon = 0
    while True:
        anon = max(anon, rss_anon(proc.pid))
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{err[-2000:]}")
    sync = subprocess.Popen(["sync"])
    _, _, ru_sync = os.wait4(sync.pid, 0)
    wall = time.perf_counter() - t0
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime + ru_sync.ru_utime + ru_sync.ru_stime,
            "rss": ru.ru_maxrss * 1024, "anon": anon}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    return f"{len(os.sched_getaffinity(0))} CPUs ({model}), {mem / GIB:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="one backbone folder (or pipeline folder) to convert")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over every route (default 2)")
    ap.add_argument("--routes", help="only these routes, comma-separated substrings of their names (e.g. cp,q8_0)")
    ap.add_argument("--workdir", type=Path, help="where outputs go (default: beside the source)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_e2e.md"), help="markdown file, or - to print only")
    a = ap.parse_args(argv)
    source = a.source.resolve()
    if not source.exists():
        raise SystemExit(f"error: {source} does not exist")
    workdir = (a.workdir or source.parent).resolve()
    out = workdir / "bench-e2e-out"
    todo = routes(source, out)
    if a.routes:
        keys = [k.strip() for k in a.routes.split(",")]
        todo = {name: cmd for name, cmd in todo.items() if any(k in name for k in keys)}
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    results: dict[str, list[dict]] = {name: [] for name in todo}
    for r in range(a.rounds):
        # Alternate the order too, so no route always runs right after the same neighbour.
        for name, cmd in (todo.items() if r % 2 == 0 else reversed(todo.items())):
            shutil.rmtree(out, ignore_errors=True)
            drop_caches()
            m = timed(cmd)
            results[name].append(m)
            shutil.rmtree(out, ignore_errors=True)
            print(f"round {r + 1}  {name:<30} {m['wall']:7.1f} s wall  {m['cpu']:6.1f} CPU-s  "
                  f"peak RSS {m['rss'] / GIB:.2f} GiB, anon {m['anon'] / GIB:.2f} GiB", flush=True)
    os.sync()
    median = {name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in results.items()}
    copy = next((m["wall"] for name, m in median.items() if "cp -r" in name), None)
    rows = []
    for name, m in median.items():
        ratio = f"{m['wall'] / copy:.2f}x" if copy else "-"
        rows.append(f"| {name} | {m['wall']:.1f} s | {ratio} | {m['cpu']:.1f} | {m['rss'] / GIB:.2f} GiB | "
                    f"{m['anon'] / GIB:.2f} GiB |")
    command = f"python scripts/bench_e2e.py {a.source} --rounds {a.rounds}" + (f" --routes {a.routes}" if a.routes else "")
    text = "\n".join([
        f"# End to end, cold, `&& sync` ({dt.date.today()})", "",
        f"Source: {source.name}, {size / 1e9:.2f} GB in {len(files)} files. Machine: {machine()}.",
        f"Page cache dropped before every command; each route timed until its `sync` returns; median of "
        f"{a.rounds} alternating rounds. Command: `{command}`", "",
        "| route | wall | vs `cp -r` | CPU-s (user + sys) | peak RSS | peak anon |",
        "|---|---:|---:|---:|---:|---:|", *rows]) + "\n"
    print(text)
    if a.out != "-":
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
