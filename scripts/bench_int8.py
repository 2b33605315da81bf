#!/usr/bin/env python
"""INT8 benchmark at real Ideogram 4 width: ideoquant vs the stock diffusers+torchao route vs a raw read.

Builds one backbone folder (`transformer`) at the real widths (hidden 4608, FFN 12288, text width 53248)
with fewer layers, then runs each route in its own fresh Python subprocess:

  raw        safe_open every tensor of the source and .clone() it: the floor, reading the bytes.
  stock      Ideogram4Transformer2DModel.from_pretrained(..., quantization_config=TorchAoConfig(
             Int8DynamicActivationInt8WeightConfig(), modules_to_not_convert=<ideoquant's protected modules>))
             then .save_pretrained(out).
  ideoquant  ideoquant.convert(src, out, components=["transformer"], overwrite=True).

The parent samples every child every 20 ms for RssAnon (the memory the process needs; file-backed mmap
pages of the source are not counted, they are reclaimable) and VmHWM (max RSS, for reference), times the
subprocess from spawn to exit (wall), and reads the child's own timing of the work alone (without
interpreter start and library imports) from the JSON on its last stdout line. After each run the parent
times `sync` (the output's dirty pages; not part of any route's time). With --cold the page cache is
dropped (or the source evicted with posix_fadvise) before every run.

Targets (issue): ideoquant >= 3x faster than stock, <= 1/4 of its peak anonymous memory, and within 1.5x
of the raw read. They are judged on wall time (cold when --cold), the median over --repeat runs; the
work-time ratios are printed beside them.

    python scripts/bench_int8.py --layers 4 --cold --repeat 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTES = ("raw", "stock", "ideoquant")
REAL_WIDTHS = dict(in_channels=128, attention_head_dim=256, num_attention_heads=18, intermediate_size=12288,
                   adaln_dim=512, llm_features_dim=53248)
TARGET_SPEEDUP = 3.0  # stock / ideoquant, time
TARGET_MEMORY = 0.25  # ideoquant / stock, peak anon
TARGET_RAW = 1.5  # ideoquant / raw, time
SAMPLE_S = 0.02
GIB = 1 << 30


# ---------------------------------------------------------------- children (one route per fresh process)


def _emit(result: dict) -> None:
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def child_build(src: Path, layers: int, fmt: str) -> None:
    """The source: one backbone at real width, saved as diffusers does (single 5GB-max shard), in bf16; or as the
    FP8 release is (fmt "fp8": every linear weight float8_e4m3fn with a float32 per-row `weight_scale`, made by
    diffusers' own `quantize_fp8r`; no quantization_config, as the release has none)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from ideoquant.testing import build_model

    t0 = time.perf_counter()
    config = dict(REAL_WIDTHS, num_layers=layers)
    if fmt == "bf16" and layers > STREAMED_BUILD_LAYERS:
        params = _build_streamed(src, config)
        _emit({"work_s": time.perf_counter() - t0, "params": params})
        return
    m = build_model(config, seed=0)
    if fmt == "bf16":
        m.to(torch.bfloat16).save_pretrained(src, max_shard_size="5GB")
    else:
        from diffusers.quantizers.bfl.utils import quantize_fp8r
        from safetensors.torch import save_file

        from ideoquant import model

        linear = model.model_spec(dict(m.config)).linear_modules
        sd = {}
        for k, v in m.state_dict().items():
            if k.endswith(".weight") and k[: -len(".weight")] in linear:
                sd[k], sd[k + "_scale"] = quantize_fp8r(v.float())
            else:
                sd[k] = v.to(torch.bfloat16).contiguous()
        src.mkdir(parents=True, exist_ok=True)
        m.save_config(src)
        save_file(sd, src / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    _emit({"work_s": time.perf_counter() - t0, "params": sum(p.numel() for p in m.parameters())})


STREAMED_BUILD_LAYERS = 12  # deeper float32 models do not fit this machine's RAM: built layer by layer instead


def _build_streamed(src: Path, config: dict) -> int:
    """A deep bf16 source without the float32 model in memory: a one-layer model gives every non-layer tensor and
    layer 0; layer i is layer 0 with each tensor's rows rotated by i (different bytes, same statistics). Written
    as diffusers' save_pretrained does: 5 GB shards, an index, config.json."""
    import torch
    from safetensors.torch import save_file

    from ideoquant.testing import build_model

    one = build_model(dict(config, num_layers=1), seed=0).to(torch.bfloat16)
    sd = {k: v.contiguous() for k, v in one.state_dict().items()}
    keys = list(sd)
    first = next(i for i, k in enumerate(keys) if k.startswith("layers."))
    per_layer = [k[len("layers.0."):] for k in keys if k.startswith("layers.0.")]
    # the model's registration order, layer 0 expanded to every layer
    ordered = keys[:first] + [f"layers.{i}.{rest}" for i in range(config["num_layers"]) for rest in per_layer]
    ordered += [k for k in keys[first:] if not k.startswith("layers.")]

    def tensor(k: str) -> torch.Tensor:
        if not k.startswith("layers."):
            return sd[k]
        _, i, rest = k.split(".", 2)
        return sd["layers.0." + rest].roll(int(i), dims=0).contiguous()

    src.mkdir(parents=True, exist_ok=True)
    limit, shards, current, size = 5 * 10**9, [], [], 0
    for k in ordered:
        n = sd[k if not k.startswith("layers.") else "layers.0." + k.split(".", 2)[2]].numel() * 2
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(k)
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    for j, keys in enumerate(shards):
        name = f"diffusion_pytorch_model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        part = {k: tensor(k) for k in keys}
        save_file(part, src / name, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in part.values())
        weight_map.update({k: name for k in keys})
        del part
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    one.register_to_config(num_layers=config["num_layers"])
    one.save_config(src)
    return total // 2


def child_raw(src: Path) -> None:
    import torch  # noqa: F401
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    t0, w0 = time.perf_counter(), time.time()
    n = 0
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                t = h.get_tensor(k).clone()
                n += t.numel() * t.element_size()
                del t
    t1 = time.perf_counter()
    _emit({"work_s": t1 - t0, "bytes": n, "phases": [["read", w0, time.time()]]})


def child_stock(src: Path, out: Path) -> None:
    import torch
    from diffusers import Ideogram4Transformer2DModel, TorchAoConfig
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    layers = json.loads((src / "config.json").read_text())["num_layers"]
    # The modules ideoquant's int8-w8a8 recipe protects (layers.*.feed_forward.w2, final_layer.linear),
    # spelled out: diffusers matches modules_to_not_convert by substring (`name + "."`).
    keep = [f"layers.{i}.feed_forward.w2" for i in range(layers)] + ["final_layer.linear"]
    t0, w0 = time.perf_counter(), time.time()
    qc = TorchAoConfig(Int8DynamicActivationInt8WeightConfig(), modules_to_not_convert=keep)
    m = Ideogram4Transformer2DModel.from_pretrained(src, torch_dtype=torch.bfloat16, quantization_config=qc)
    t1, w1 = time.perf_counter(), time.time()
    m.save_pretrained(out)
    t2, w2 = time.perf_counter(), time.time()
    _emit({"work_s": t2 - t0, "load_quantize_s": t1 - t0, "save_s": t2 - t1,
           "phases": [["load+quantize", w0, w1], ["save", w1, w2]]})


def child_ideoquant(src: Path, out: Path) -> None:
    """The command a user runs, `ideoquant convert SRC --out OUT --components transformer --overwrite`, through the
    console script's own entry point (progress bars on stderr, the summary table on stdout)."""
    sys.path.insert(0, str(ROOT))
    # torch before the clock, as the other routes do; everything else ideoquant needs (torchao) is imported inside
    # convert, so it counts in the work time.
    import torch  # noqa: F401

    from ideoquant import cli

    sys.argv = ["ideoquant", "convert", str(src), "--out", str(out), "--components", "transformer", "--overwrite"]
    t0, w0 = time.perf_counter(), time.time()
    try:
        cli.main()
    except SystemExit as e:
        if e.code:
            raise
    t1 = time.perf_counter()
    comp = json.loads((out / "ideoquant.json").read_text())["components"]["transformer"]
    _emit({"work_s": t1 - t0, "component_s": comp.get("seconds"), "protected": comp.get("protected_modules"),
           "phases": [["convert", w0, time.time()]]})


def child_verify(stock: Path, ours: Path) -> None:
    """Compare the two outputs' safetensors by key: same keys, dtypes, shapes and bytes."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        keys = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                keys.update({k: f for k in h.keys()})
        return keys

    a, b = index(stock), index(ours)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    same, differ, int8_same, int8_total = 0, [], 0, 0
    for k in sorted(set(a) & set(b)):
        with safe_open(a[k], framework="pt") as ha, safe_open(b[k], framework="pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        ok = x.dtype == y.dtype and x.shape == y.shape and torch.equal(
            x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8))
        same += ok
        if not ok:
            differ.append(k)
        if x.dtype == torch.int8 and k.endswith("._weight_qdata"):
            int8_total += 1
            int8_same += ok
        del x, y
    qa = json.loads((stock / "config.json").read_text()).get("quantization_config", {})
    qb = json.loads((ours / "config.json").read_text()).get("quantization_config", {})
    _emit({"keys_stock": len(a), "keys_ideoquant": len(b), "only_stock": only_a[:5], "only_ideoquant": only_b[:5],
           "identical": same, "differ": differ[:5], "n_differ": len(differ),
           "int8_weights_identical": int8_same, "int8_weights": int8_total,
           "protected_same": sorted(qa.get("modules_to_not_convert") or []) == sorted(qb.get("modules_to_not_convert") or [])})


# ---------------------------------------------------------------- parent: run, sample, report


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "VmHWM:", "RssFile:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _busy_s() -> float:
    """CPU seconds spent busy by the whole machine since boot (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


CHILD_ENV = dict(os.environ)


def run_child(args: list[str], log: Path) -> dict:
    """Spawn `python bench_int8.py --_child ...`, sample it every 20 ms, reap it with its rusage."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    with open(log.with_suffix(".out"), "w") as so, open(log.with_suffix(".err"), "w") as se:
        load1 = os.getloadavg()[0]
        busy0, self0 = _busy_s(), time.process_time()
        t0, spawn = time.perf_counter(), time.time()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=str(ROOT), env=CHILD_ENV)
        samples = []  # (unix time, RssAnon, VmHWM)
        peak_anon = peak_hwm = 0
        while True:
            s = _status(proc.pid)
            if s:
                peak_anon = max(peak_anon, s.get("RssAnon", 0))
                peak_hwm = max(peak_hwm, s.get("VmHWM", 0))
                samples.append((time.time(), s.get("RssAnon", 0), s.get("VmHWM", 0)))
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(SAMPLE_S)
        wall, end = time.perf_counter() - t0, time.time()
        busy = _busy_s() - busy0 - (time.process_time() - self0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = log.with_suffix(".out").read_text().strip().splitlines()
    if proc.returncode != 0 or not stdout:
        err = log.with_suffix(".err").read_text()[-3000:]
        raise SystemExit(f"child {' '.join(args)} failed (exit {proc.returncode}):\n{err}")
    result = json.loads(stdout[-1])
    result.update(wall_s=wall, peak_anon=peak_anon, peak_hwm=max(peak_hwm, ru.ru_maxrss * 1024),
                  cpu_s=ru.ru_utime + ru.ru_stime, load1=load1,
                  # CPU time other processes used on this machine meanwhile: a contention gauge
                  other_cpu_s=max(0.0, busy - (ru.ru_utime + ru.ru_stime)))
    phases = {}
    for name, a, b in result.get("phases", []):
        vals = [anon for t, anon, _ in samples if a <= t <= b]
        phases[name] = {"s": b - a, "peak_anon": max(vals) if vals else None}
    result["phase_detail"] = phases
    if result.get("phases"):  # interpreter start + imports before the work, teardown after it
        result["startup_s"] = result["phases"][0][1] - spawn
        result["teardown_s"] = end - result["phases"][-1][2]
    return result


def evict(files: list[Path]) -> str:
    """Drop the page cache (root), else evict the source files' clean pages with posix_fadvise."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        pass
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def warm(files: list[Path]) -> None:
    for p in files:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def header_params(files: list[Path]) -> int:
    n = 0
    for p in files:
        with open(p, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                c = 1
                for d in v["shape"]:
                    c *= d
                n += c
    return n


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors")) if folder.exists() else 0


def ensure_source(workdir: Path, layers: int, fmt: str = "bf16") -> Path:
    base = workdir / (f"src-L{layers}" if fmt == "bf16" else f"src-L{layers}-{fmt}")
    src = base / "transformer"
    marker = base / ".complete"
    if marker.is_file() and json.loads(marker.read_text()).get("config") == dict(REAL_WIDTHS, num_layers=layers):
        print(f"reusing source {src}")
        return src
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    print(f"building the source in {src} (real widths, {layers} layers, {fmt}) ...", flush=True)
    r = run_child(["--_child", "build", "--src", str(src), "--layers", str(layers), "--source", fmt], base / "build")
    marker.write_text(json.dumps({"config": dict(REAL_WIDTHS, num_layers=layers), "params": r["params"]}))
    print(f"  built in {r['wall_s']:.1f} s ({r['params']:,} params, peak anon {r['peak_anon'] / GIB:.2f} GiB)")
    return src


def versions() -> dict[str, str]:
    out = {}
    for lib in ("torch", "torchao", "diffusers", "safetensors", "ideoquant"):
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "-"
    return out


def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = platform.processor() or "-"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "ram_gib": mem / GIB, "cpu": cpu, "python": platform.python_version()}


def _fmt_ratio(value: float, ok: bool) -> str:
    return f"{value:.2f} {'PASS' if ok else 'FAIL'}"


def summarize(runs: list[dict]) -> dict:
    out = {}
    for route in ROUTES:
        rs = [r for r in runs if r["route"] == route]
        if rs:
            out[route] = {
                "wall_s": statistics.median(r["wall_s"] for r in rs),
                "work_s": statistics.median(r["work_s"] for r in rs),
                "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                "other_cpu_s": statistics.median(r["other_cpu_s"] for r in rs),
                "flush_s": statistics.median(r["flush_s"] for r in rs),
                "peak_anon": max(r["peak_anon"] for r in rs),
                "peak_hwm": max(r["peak_hwm"] for r in rs),
            }
    return out


def ratios(s: dict) -> list[list[str]]:
    """[ratio, target, on wall (judged), on work time, on CPU time] rows."""
    rows = []

    def time_row(label, num, den, ok):
        return [label, *[_fmt_ratio(s[num][k] / s[den][k], ok(s[num][k] / s[den][k])) for k in ("wall_s", "work_s", "cpu_s")]]

    if "stock" in s and "ideoquant" in s:
        rows.append(time_row("time stock / ideoquant", "stock", "ideoquant", lambda x: x >= TARGET_SPEEDUP))
        rows[-1].insert(1, f">= {TARGET_SPEEDUP:g}")
        m = s["ideoquant"]["peak_anon"] / s["stock"]["peak_anon"]
        rows.append(["peak anon ideoquant / stock", f"<= {TARGET_MEMORY:g}", _fmt_ratio(m, m <= TARGET_MEMORY), "", ""])
    if "raw" in s and "ideoquant" in s:
        rows.append(time_row("time ideoquant / raw", "ideoquant", "raw", lambda x: x <= TARGET_RAW))
        rows[-1].insert(1, f"<= {TARGET_RAW:g}")
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_rows(runs: list[dict]) -> list[list[str]]:
    rows = []
    for r in runs:
        phases = f"start {r['startup_s']:.1f} s, " if "startup_s" in r else ""
        phases += ", ".join(f"{k} {v['s']:.1f} s / {v['peak_anon'] / GIB:.2f} GiB" if v["peak_anon"] is not None
                           else f"{k} {v['s']:.1f} s" for k, v in r["phase_detail"].items())
        phases += f", exit {r['teardown_s']:.1f} s" if "teardown_s" in r else ""
        rows.append([r["route"], str(r["repeat"]), f"{r['wall_s']:.2f}", f"{r['work_s']:.2f}", f"{r['cpu_s']:.1f}",
                     f"{r['flush_s']:.2f}", f"{r['peak_anon'] / GIB:.2f}", f"{r['peak_hwm'] / GIB:.2f}",
                     f"{r['other_cpu_s']:.1f}", f"{r['load1']:.1f}", phases])
    return rows


RUN_HEADER = ["route", "run", "wall s", "work s", "cpu s", "flush s", "peak anon GiB", "VmHWM GiB",
              "other CPU s", "load1", "phases (time / peak anon)"]
SUMMARY_HEADER = ["route", "wall s", "work s", "cpu s", "peak anon GiB", "VmHWM GiB", "other CPU s", "output bytes"]
RATIO_HEADER = ["ratio", "target", "wall (judged)", "work", "cpu"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ideoquant-bench-int8")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="drop the page cache (or evict the source) before every run")
    ap.add_argument("--markdown", type=Path, default=ROOT / "docs" / "bench_int8.md")
    ap.add_argument("--routes", default=",".join(ROUTES), help="comma-separated subset of raw,stock,ideoquant")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads in every child (OMP_NUM_THREADS); default: torch's own choice")
    ap.add_argument("--no-verify", action="store_true", help="skip comparing the stock and ideoquant outputs")
    ap.add_argument("--source", choices=("bf16", "fp8"), default="bf16",
                    help="the source's format: bf16, or FP8 per-row as the default release ships (routes raw and "
                         "ideoquant only: stock diffusers has no route from the FP8 release to torchao int8)")
    ap.add_argument("--_child", choices=("build", "raw", "stock", "ideoquant", "verify"), help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child == "build":
        return child_build(args.src, args.layers, args.source) or 0
    if args._child == "raw":
        return child_raw(args.src) or 0
    if args._child == "stock":
        return child_stock(args.src, args.out) or 0
    if args._child == "ideoquant":
        return child_ideoquant(args.src, args.out) or 0
    if args._child == "verify":
        return child_verify(args.src, args.out) or 0

    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if any(r not in ROUTES for r in routes):
        ap.error(f"--routes: choose from {', '.join(ROUTES)}")
    if args.source == "fp8" and "stock" in routes:
        routes.remove("stock")
        print("--source fp8: no stock route (diffusers has no loader for the FP8 release's own scheme, and has no "
              "way from it to torchao int8)")
    if args.threads:
        CHILD_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    src = ensure_source(workdir, args.layers, args.source)
    files = sorted(src.glob("*.safetensors"))
    src_bytes = sum(p.stat().st_size for p in files)
    params = header_params(files)
    print(f"source: {src} ({params:,} params, {src_bytes / 1e9:.2f} GB in {len(files)} file(s))")
    outs = {"stock": workdir / "out-stock", "ideoquant": workdir / "out-ideoquant"}
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)

    runs, eviction = [], None
    if not args.cold:
        warm(files)
    for rep in range(1, args.repeat + 1):
        for route in routes:
            if route in outs:
                shutil.rmtree(outs[route], ignore_errors=True)
            if args.cold:
                eviction = evict(files)
            else:
                os.sync()
            child = ["--_child", route, "--src", str(src)]
            if route in outs:
                child += ["--out", str(outs[route])]
            print(f"[{rep}/{args.repeat}] {route} ...", end=" ", flush=True)
            r = run_child(child, logs / f"{route}-{rep}")
            t = time.perf_counter()
            os.sync()
            r.update(route=route, repeat=rep, flush_s=time.perf_counter() - t)
            print(f"wall {r['wall_s']:.2f} s, work {r['work_s']:.2f} s, peak anon {r['peak_anon'] / GIB:.2f} GiB")
            runs.append(r)

    out_bytes = {"raw": "-", "stock": str(folder_bytes(outs["stock"])),
                 "ideoquant": str(folder_bytes(outs["ideoquant"] / "transformer"))}
    s = summarize(runs)
    verify = None
    if not args.no_verify and "stock" in routes and "ideoquant" in routes:
        verify = run_child(["--_child", "verify", "--src", str(outs["stock"]), "--out",
                            str(outs["ideoquant"] / "transformer")], logs / "verify")

    mode = "cold (page cache dropped before each run: " + str(eviction) + ")" if args.cold else "warm (source in page cache)"
    summary_rows = [[k, f"{v['wall_s']:.2f}", f"{v['work_s']:.2f}", f"{v['cpu_s']:.1f}", f"{v['peak_anon'] / GIB:.2f}",
                     f"{v['peak_hwm'] / GIB:.2f}", f"{v['other_cpu_s']:.1f}", out_bytes[k]] for k, v in s.items()]
    ratio_rows = ratios(s)
    verdict = all("PASS" in r[2] for r in ratio_rows) if ratio_rows else None
    if verify:
        vline = (f"ideoquant vs stock output: {verify['identical']}/{verify['identical'] + verify['n_differ']} "
                 f"common tensors byte-identical, int8 weights identical {verify['int8_weights_identical']}/"
                 f"{verify['int8_weights']}, keys stock {verify['keys_stock']} / ideoquant {verify['keys_ideoquant']}"
                 f"{', only in stock: ' + str(verify['only_stock']) if verify['only_stock'] else ''}"
                 f"{', only in ideoquant: ' + str(verify['only_ideoquant']) if verify['only_ideoquant'] else ''}"
                 f"{', differ: ' + str(verify['differ']) if verify['differ'] else ''}, "
                 f"modules_to_not_convert {'same' if verify['protected_same'] else 'DIFFERENT'}")
    else:
        vline = "output comparison: not run"

    ncpu = os.cpu_count() or 1
    busy = [r for r in runs if r["other_cpu_s"] > 0.15 * r["wall_s"] * ncpu]
    busy_note = (f"**Warning: the machine was shared.** In {len(busy)} of {len(runs)} runs other processes used more "
                 f"than 15% of the {ncpu} CPUs (column *other CPU*), so wall and work times there are inflated; "
                 "the *cpu* ratios are less sensitive to that." if busy else
                 "The machine was quiet during every run (other processes used under 15% of the CPUs).")
    print()
    print(busy_note)
    print(f"mode: {mode}; threads {args.threads or 'default'}; times are medians over {args.repeat} run(s), peak anon the max")
    print(table(RUN_HEADER, run_rows(runs)))
    print()
    print(table(SUMMARY_HEADER, summary_rows))
    print()
    print(table(RATIO_HEADER, ratio_rows))
    if verdict is not None:
        print(f"\ntargets (on {'cold ' if args.cold else ''}wall time and peak anon): {'PASS' if verdict else 'FAIL'}")
    print(vline)

    m, v = machine(), versions()
    md = [
        "# INT8 benchmark: ideoquant vs stock diffusers+torchao vs raw read",
        "",
        f"Generated by `python scripts/bench_int8.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" on {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']:.1f} GiB RAM, Python {m['python']}",
        f"- Versions: torch {v['torch']}, torchao {v['torchao']}, diffusers {v['diffusers']}, "
        f"safetensors {v['safetensors']}, ideoquant {v['ideoquant']}",
        f"- Source: one `Ideogram4Transformer2DModel` backbone at real width (hidden 4608, FFN 12288, text width "
        f"53248) with {args.layers} layers: {params:,} params, {src_bytes:,} bytes "
        f"{'bf16' if args.source == 'bf16' else 'FP8 per-row (linear weights float8_e4m3fn + float32 row scales; the rest bf16)'}"
        f" in {len(files)} safetensors file(s)",
        f"- Mode: {mode}; {args.repeat} run(s) per route, each in a fresh Python process; torch threads: "
        f"{args.threads or 'default (' + str(m['nproc']) + ')'}",
        "",
        "Routes: **raw** = `safe_open` + `get_tensor(k).clone()` for every tensor (the floor); **stock** = "
        "`Ideogram4Transformer2DModel.from_pretrained(src, torch_dtype=bfloat16, quantization_config=TorchAoConfig("
        "Int8DynamicActivationInt8WeightConfig(), modules_to_not_convert=[layers.N.feed_forward.w2..., "
        "final_layer.linear]))` + `save_pretrained(out)`; **ideoquant** = the command `ideoquant convert src "
        "--out out --components transformer --overwrite`, run through the console script's entry point "
        "(`ideoquant.cli.main`) in the child.",
        "",
        "Columns: *wall* = spawn to exit of the subprocess, as the parent sees it (includes interpreter start and "
        "library imports); *work* = the child's own timing of the work alone; *cpu* = user+sys of the child; "
        "*flush* = `sync` after the child exits (the output's dirty pages, counted in no route); *peak anon* = max "
        "RssAnon sampled every 20 ms from /proc/PID/status (the memory the process needs); *VmHWM* = max RSS, "
        "which also counts the source's file-backed mmap pages (reclaimable); *other CPU* = CPU seconds that "
        "everything else on the machine used during the run (from /proc/stat: other processes, and kernel threads "
        "such as writeback; about 0 on a quiet machine, so a contention gauge); *load1* = 1-minute load average at "
        "the start of the run; *phases*: interpreter start + imports, the work (peak anon within it), interpreter "
        "exit.",
        "",
        busy_note,
        "",
        "## Ratios",
        "",
        f"Targets are judged on **{'cold ' if args.cold else ''}wall time** (median of the runs) and peak anon; "
        "the work-time ratios are shown for reference.",
        "",
        table(RATIO_HEADER, ratio_rows),
        "",
        f"Overall: **{'PASS' if verdict else 'FAIL'}**" if verdict is not None else "",
        "",
        "## Summary (median time, max memory)",
        "",
        table(SUMMARY_HEADER, summary_rows),
        "",
        "## Every run",
        "",
        table(RUN_HEADER, run_rows(runs)),
        "",
        "## Output check",
        "",
        vline,
        "",
    ]
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text("\n".join(md).rstrip("\n") + "\n")
    (workdir / "results.json").write_text(json.dumps({"args": sys.argv[1:], "runs": runs, "summary": s,
                                                      "verify": verify}, indent=1, default=str))
    print(f"\nwrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
