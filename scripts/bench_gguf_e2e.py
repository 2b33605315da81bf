#!/usr/bin/env python
"""GGUF export end to end, as a user runs it: `ideoquant gguf` against a plain copy of the same source, in one run.

The source is one backbone at Ideogram 4's real widths (hidden 4608, FFN 12288, text width 53248) with fewer layers,
bf16 as diffusers saves it (`--layers`, default 2; built once by scripts/bench_int8.py's builder and reused). Each
route runs as its own process, timed from spawn to exit (interpreter start and imports included), with the page
cache warm (`--cold`: dropped or evicted before every run) and its anonymous memory sampled every 20 ms:

  copy         `cp -r SOURCE OUT`: the I/O floor (read every byte, write as many).
  <type>       `python -m ideoquant gguf SOURCE --out OUT --type <type> --overwrite` for every --types entry.
  many         one pass writing every --types entry (`--type a,b,c`), against the sum of the separate runs.

Ratios are against the copy of the same run; the best of --repeat runs is kept per route. Results go to
docs/bench_gguf_e2e.md (`--out -`: print only).

    python scripts/bench_gguf_e2e.py --layers 2 --types q8_0,q4_k,q4_k_m,q5_k_m --repeat 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_int8 as bi  # noqa: E402  (the real-width source builder and the process sampler helpers)

GIB = 1 << 30


def run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while True:
        peak = max(peak, bi._status(proc.pid).get("RssAnon", 0))
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_anon": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--source", type=Path, help="an existing source instead of the built one (e.g. the real-size "
                                                "FP8 release layout from scripts/build_real_source.py)")
    ap.add_argument("--types", default="q8_0,q4_k,q4_k_m")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ideoquant-bench")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_gguf_e2e.md"))
    a = ap.parse_args(argv)
    src = a.source or bi.ensure_source(a.workdir, a.layers)
    files = sorted(src.rglob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    types = [t.strip() for t in a.types.split(",")]
    out = a.workdir / "out"
    routes = {"copy": ["cp", "-r", str(src), str(out)]}
    cli = [sys.executable, "-m", "ideoquant", "gguf", str(src), "--out", str(out), "--overwrite"]
    for t in types:
        routes[t] = [*cli, "--type", t]
    if len(types) > 1:
        routes["many"] = [*cli, "--type", ",".join(types)]
    best: dict[str, dict] = {}
    for _ in range(a.repeat):
        for name, cmd in routes.items():
            shutil.rmtree(out, ignore_errors=True)
            if a.cold:
                bi.evict(files)
            else:
                bi.warm(files)
            r = run(cmd)
            subprocess.run(["sync"], check=False)
            if name not in best or r["wall_s"] < best[name]["wall_s"]:
                best[name] = r
            print(f"{name:>8}: {r['wall_s']:6.2f} s wall, {r['cpu_s']:6.2f} CPU-s, "
                  f"peak anon {r['peak_anon'] / GIB:.2f} GiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    copy = best["copy"]["wall_s"]
    rows = [f"| {name} | {r['wall_s']:.2f} | {r['wall_s'] / copy:.2f}x | {r['cpu_s']:.1f} | "
            f"{r['peak_anon'] / GIB:.2f} |" for name, r in best.items()]
    lines = [
        f"# GGUF export end to end ({dt.date.today()})", "",
        (f"Source: {src.name}, " if a.source else f"Source: one backbone, real widths, {a.layers} layers, bf16, ")
        + f"{size / GIB:.2f} GiB "
        f"({'cold' if a.cold else 'warm'} page cache). Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}.",
        f"Command: `python scripts/bench_gguf_e2e.py {('--source ' + str(a.source)) if a.source else ('--layers ' + str(a.layers))} --types {a.types} --repeat {a.repeat}"
        f"{' --cold' if a.cold else ''}`", "",
        "| route | wall s (best) | vs copy | CPU s | peak anon GiB |", "| --- | ---: | ---: | ---: | ---: |", *rows]
    if "many" in best:
        separate = sum(best[t]["wall_s"] for t in types)
        lines += ["", f"One pass writing {', '.join(types)}: {best['many']['wall_s']:.2f} s against "
                      f"{separate:.2f} s for the separate runs ({best['many']['wall_s'] / separate:.2f}x)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out != "-":
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
