#!/usr/bin/env python3
"""Throughput of ideoquant's compiled ggml encoders against ggml's own C quantizer, every type, with and without imatrix.

Measures, on one float32 matrix (default 1024 x 12288, N(0, 0.02^2)), the best of a few runs, in million elements
per second, for every type of ``ideoquant.encode.ggml`` (Q4_0 .. Q8_0, Q2_K .. Q6_K, F16, BF16), without and
(for the types that have a weighted path) with an importance matrix:

* ideoquant ``encode`` on 1 thread and row-split over ``--threads`` threads (a ThreadPoolExecutor in this script;
  the kernels release the GIL);
* ggml's C quantizer (``ggml_quantize_chunk``), the same way: from ``--ggml-lib`` (a ``libggml-base.so`` built
  from ggml's source, which has every type; see below) or else PyPI ``ggml-python`` when importable (its older ggml
  lacks MXFP4 and NVFP4).

A ``libggml-base.so`` for ``--ggml-lib``, from ggml at the commit the reference vectors were made with (no ggml code
is kept in this repository)::

    git clone https://github.com/ggml-org/ggml && cd ggml && git checkout 8e800cef2948046cc47f9db6090491c6128ca42c
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON
    cmake --build build --target ggml-base      # -> build/src/libggml-base.so

It checks that the bytes agree with ggml C, prints a markdown table with ratios (ideoquant / ggml C at the same
thread count), and writes it to ``docs/bench_gguf.md`` (``--out``; ``--out -`` to skip writing).

    python scripts/bench_gguf.py [--rows 1024 --cols 12288 --repeats 3 --types Q4_K,Q8_0] [--ggml-lib PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import importlib.metadata
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402

from ideoquant.encode import ggml as iq  # noqa: E402


def pkg_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have been busy (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(v) for v in fields]
        busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle, iowait
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_time(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, process CPU seconds of that run, result)."""
    best, cpu, result = float("inf"), float("nan"), None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        wall, c1 = time.perf_counter() - t0, time.process_time()
        if wall < best:
            best, cpu = wall, c1 - c0
    return best, cpu, result


class GGMLLib:
    """ggml's C quantizer from a shared library, with ggml-python's names (ggml's type ids are gguf-py's)."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def __getattr__(self, name: str):
        if name.startswith("GGML_TYPE_"):
            return int(GGMLQuantizationType[name.removeprefix("GGML_TYPE_")])
        return getattr(self.lib, name)


def load_ggml_c(lib_path: str | None = None):
    """ggml's C quantizer: the library at lib_path, else the ggml-python module, else None."""
    if lib_path:
        return GGMLLib(lib_path)
    try:
        import ggml  # type: ignore  # PyPI: ggml-python

        ggml.ggml_quantize_chunk  # noqa: B018
        return ggml
    except Exception:  # noqa: BLE001 - any import problem just skips the C rows
        return None


def split_rows(fn, rows: int, threads: int) -> None:
    """fn(r0, r1) on `threads` contiguous row ranges, in a thread pool (or inline for one thread)."""
    if threads <= 1:
        fn(0, rows)
        return
    step = (rows + threads - 1) // threads
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda r: fn(r, min(rows, r + step)), range(0, rows, step)))


def iq_encode(qtype: str, x: np.ndarray, imatrix, threads: int) -> np.ndarray:
    bs, ts = iq.type_size(qtype)
    out = np.empty((x.shape[0], x.shape[1] // bs * ts), np.uint8)
    split_rows(lambda r0, r1: iq.encode(x[r0:r1], qtype, imatrix, out=out[r0:r1]), x.shape[0], threads)
    return out


def ggml_c_quantize(mod, qtype: str, x: np.ndarray, threads: int, imatrix=None) -> np.ndarray:
    t = getattr(mod, f"GGML_TYPE_{qtype}")
    bs, ts = iq.type_size(qtype)
    rows, cols = x.shape
    out = np.empty((rows, cols // bs * ts), np.uint8)
    mod.ggml_quantize_init(t)
    src = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    qw = None if imatrix is None else imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    def run(r0: int, r1: int) -> None:
        # ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix):
        # start is an element offset into src; dst is the start of the whole output
        mod.ggml_quantize_chunk(t, src, ctypes.c_void_p(out.ctypes.data), r0 * cols, r1 - r0, cols, qw)

    split_rows(run, rows, threads)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=12288)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the multi-thread setting")
    ap.add_argument("--types", default=",".join(iq.QTYPES), help="types to time")
    ap.add_argument("--out", default=str(REPO / "docs" / "bench_gguf.md"), help="markdown output ('-': none)")
    ap.add_argument("--ggml-lib", help="libggml-base.so built from ggml's source (see above); default: ggml-python")
    args = ap.parse_args(argv)

    busy0, own0, wall0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols), dtype=np.float32) * np.float32(0.02)).astype(np.float32)
    # an activation-like importance vector: per-column mean of squares, log-normal column scales
    imat = (np.exp(rng.standard_normal(args.cols)) * rng.chisquare(512, args.cols) / 512).astype(np.float32)
    n = x.size
    nt = max(1, args.threads)
    thread_settings = [1] if nt == 1 else [1, nt]
    results: list[tuple[str, str, str, float, float, float]] = []  # impl, case, threads, Mel/s, wall s, cpu s
    outputs: dict[tuple[str, str, str], np.ndarray] = {}
    notes: list[str] = []
    mod = load_ggml_c(args.ggml_lib)
    if mod is None:
        notes.append("ggml C reference: skipped (the `ggml` package from PyPI `ggml-python` is not importable)")
        print("ggml-python not importable: skipping the C reference", flush=True)
    IQ, C = "ideoquant (numba)", "ggml C (" + ("libggml-base" if args.ggml_lib else "ggml-python") + ")"

    # (implementation, case, threads, function) - run round-robin, so that a burst of load from other jobs hits
    # every case alike; the best run is kept
    cases: list[tuple[str, str, str, object]] = []
    case_names: list[str] = []
    for qtype in [iq.normalize_qtype(t) for t in args.types.split(",") if t.strip()]:
        needs = iq.registry.TYPES[qtype].imatrix == iq.registry.REQUIRED  # ggml asserts importance weights
        for w in ([imat] if needs else [None, imat]) if iq.has_imatrix_path(qtype) else [None]:
            case = qtype + (" +imatrix" if w is not None else "")
            case_names.append(case)
            iq.encode(x[:1], qtype, w)  # compile / load outside the timing
            if mod is not None:  # and ggml's tables (the IQ types' grids and neighbour maps, seconds for IQ1_S)
                mod.ggml_quantize_init(getattr(mod, f"GGML_TYPE_{qtype}"))
            for th in thread_settings:
                cases.append((IQ, case, str(th), lambda qtype=qtype, w=w, th=th: iq_encode(qtype, x, w, th)))
                if mod is not None:
                    cases.append((C, case, str(th), lambda qtype=qtype, w=w, th=th: ggml_c_quantize(mod, qtype, x, th, w)))

    best: dict[int, tuple[float, float]] = {}
    for rep in range(max(1, args.repeats)):
        for i, (impl, case, th, fn) in enumerate(cases):
            wall, cpu, q = best_time(fn, 1)
            if i not in best or wall < best[i][0]:
                best[i] = (wall, cpu)
            print(f"run {rep + 1}: {impl:<22} {case:<14} threads={th:<3} {n / wall / 1e6:8.1f} M el/s "
                  f"({wall:.3f} s wall, {cpu:.3f} s CPU)", flush=True)
            if rep == 0:
                outputs[(impl, case, th)] = q
            del q
    for i, (impl, case, th, _) in enumerate(cases):
        wall, cpu = best[i]
        results.append((impl, case, th, n / wall / 1e6, wall, cpu))

    # byte checks
    for (impl, case, th), q in outputs.items():
        if impl == C:
            mine = outputs[(IQ, case, th)]
            notes.append(f"{case} threads={th}: ideoquant bytes == ggml C bytes: {np.array_equal(mine, q)}")
        elif th != "1":
            notes.append(f"{case}: ideoquant threads={th} bytes == threads=1 bytes: "
                         f"{np.array_equal(outputs[(IQ, case, '1')], q)}")

    rate = {(impl, case, th): r for impl, case, th, r, _, _ in results}
    busy1 = machine_busy_seconds()
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (time.process_time() - own0)) / (time.perf_counter() - wall0)
        contention = (f"other processes used {others:.2f} CPU cores on average during the run "
                      "(wall times suffer when that is well above 0)")
    else:
        contention = "CPU use of other processes unknown"
    lines = [
        "# GGUF quantizer throughput: ideoquant (numba) vs ggml C",
        "",
        f"- date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}",
        f"- python {platform.python_version()}, numpy {np.__version__}, gguf {pkg_version('gguf')}"
        + (f", ggml C from {args.ggml_lib} (built from ggml's source for the benchmark, default release flags)"
           if args.ggml_lib else f", ggml-python {pkg_version('ggml-python')} (C reference; optional, not a "
           "dependency: `pip install --target DIR ggml-python`, then `PYTHONPATH=DIR`)" if mod is not None else ""),
        f"- input: {args.rows} x {args.cols} float32, N(0, 0.02^2) (imatrix: log-normal column energies); best of {args.repeats} runs "
        f"(cases run round-robin); {contention}",
        f"- command: `python scripts/bench_gguf.py --rows {args.rows} --cols {args.cols} --repeats {args.repeats}"
        + (f" --types {args.types}" if args.types != ",".join(iq.QTYPES) else "")
        + (" --ggml-lib libggml-base.so" if args.ggml_lib else "") + "`",
        "",
        "Ratio = ideoquant / ggml C at the same thread count (higher is faster).",
        "",
        "| type | threads | ideoquant M el/s | ggml C M el/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for case in case_names:
        for th in map(str, thread_settings):
            r = rate.get((IQ, case, th))
            c = rate.get((C, case, th))
            ratio = f"{r / c:.2f}x" if r and c else "-"
            cs = f"{c:.1f}" if c else "-"
            lines.append(f"| {case} | {th} | {r:.1f} | {cs} | {ratio} |")
    lines.append("")
    lines += ["All runs:", "", "| implementation | case | threads | M elements/s | wall s | CPU s |",
              "|---|---|---:|---:|---:|---:|"]
    for impl, case, th, r, s_, c in results:
        lines.append(f"| {impl} | {case} | {th} | {r:.1f} | {s_:.3f} | {c:.3f} |")
    lines.append("")
    if notes:
        lines += ["Checks:", ""] + [f"- {t}" for t in notes] + [""]
    text = "\n".join(lines)
    print()
    print(text)
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
