#!/usr/bin/env python
"""ideoquant against stable-diffusion.cpp's converter (`sd-cli -M convert`) on the same file and cores.

Both read one original-layout bf16 file (fused `attention.qkv`, `attention.o`: sd.cpp has no mapping for diffusers
names), made here from a diffusers backbone (default: the real-width 2-layer source of scripts/bench_int8.py).
Each route is a fresh process under `/usr/bin/time -v` (wall, CPU, peak RSS), with the page cache warm and the
outputs removed and synced between runs; results go to a JSON-lines log and a table on stdout.

    scripts/build_sdcpp.sh                      # builds sd-cli (CPU, no native flags)
    python scripts/bench_sdcpp.py --sd-cli /path/to/sd-cli [--repeat 2]

Routes: cp; sd-cli q4_K and q8_0 (`-t` = CPUs); ideoquant q4_k, q4_k --imatrix ones (sd-cli's own algorithm: it
always passes all-ones importance weights), q8_0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def original_layout(src: Path, dst: Path) -> None:
    """One bf16 file in the original layout, from a diffusers backbone folder."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from ideoquant import model

    out, parts = {}, {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for name in h.keys():
                oname, idx = model.diffusers_to_original(name)
                t = h.get_tensor(name).to(torch.bfloat16)
                if oname.endswith(".qkv.weight"):
                    parts.setdefault(oname, {})[idx] = t
                else:
                    out[oname] = t
    for oname, p in parts.items():
        out[oname] = torch.cat([p[0], p[1], p[2]], 0).contiguous()  # rows q, k, v
    save_file(out, dst)


def timed(cmd: list[str]) -> dict:
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(p.stdout + p.stderr)[-2000:]}")
    err = p.stderr
    wall = [float(x) for x in re.search(r"Elapsed \(wall clock\).*: (\S+)", err)[1].split(":")]
    cpu = float(re.search(r"User time \(seconds\): (\S+)", err)[1]) + float(re.search(r"System time \(seconds\): (\S+)", err)[1])
    return {"wall_s": round(sum(v * 60**i for i, v in enumerate(reversed(wall))), 2), "cpu_s": round(cpu, 2),
            "peak_rss_mib": round(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)[1]) / 1024)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sd-cli", required=True, type=Path)
    ap.add_argument("--source", type=Path, help="a diffusers backbone folder (default: bench_int8's 2-layer source)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ideoquant-bench")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    if a.source is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        import bench_int8

        a.source = bench_int8.ensure_source(a.workdir, 2)
    src = a.workdir / "original_bf16.safetensors"
    if not src.exists():
        original_layout(a.source, src)
    out = a.workdir / "sdcpp-out"
    threads = str(len(os.sched_getaffinity(0)))
    sd, iq = [str(a.sd_cli), "-M", "convert", "-m", str(src), "-o", f"{out}.gguf", "-t", threads], \
        [sys.executable, "-m", "ideoquant", "gguf", str(src), "--out", str(out), "--overwrite"]
    routes = {"cp": ["cp", str(src), f"{out}.safetensors"], "sd-cli q4_K": [*sd, "--type", "q4_K"],
              "ideoquant q4_k": [*iq, "--type", "q4_k"], "ideoquant q4_k --imatrix ones": [*iq, "--type", "q4_k",
                                                                                          "--imatrix", "ones"],
              "sd-cli q8_0": [*sd, "--type", "q8_0"], "ideoquant q8_0": [*iq, "--type", "q8_0"]}
    best: dict[str, dict] = {}
    with open(a.workdir / "bench_sdcpp.jsonl", "a") as log:
        for rep in range(a.repeat):
            for name, cmd in routes.items():
                for p in (out, Path(f"{out}.gguf"), Path(f"{out}.safetensors")):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                subprocess.run(["sync"], check=False)
                subprocess.run(f"cat {src} > /dev/null", shell=True, check=False)
                r = timed(cmd) | {"route": name, "rep": rep, "load": open("/proc/loadavg").read().split()[:3],
                                  "when": time.strftime("%H:%M:%S")}
                log.write(json.dumps(r) + "\n")
                print(json.dumps(r), flush=True)
                if name not in best or r["wall_s"] < best[name]["wall_s"]:
                    best[name] = r
    print("\n| route (best) | wall s | CPU s | peak RSS MiB |\n| --- | ---: | ---: | ---: |")
    for name, r in best.items():
        print(f"| {name} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mib']} |")
    for t in ("q4_k", "q8_0"):
        sd_t = best[f"sd-cli {t.replace('_k', '_K')}"]["wall_s"]
        print(f"sd-cli / ideoquant at {t}: {sd_t / best[f'ideoquant {t}']['wall_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
