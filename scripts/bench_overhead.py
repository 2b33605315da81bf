#!/usr/bin/env python
"""The bench's own overhead against the generation it measures, on one run.

Builds the test suite's tiny complete Ideogram 4 pipeline, its INT8 and Q8_0 outputs and tiny local metric models
(a CLIP that also serves as PickScore, AlexNet features for LPIPS; RapidOCR ships its own), then runs
`ideoquant.bench.run.bench` once from an empty REPORT on one torch thread and times, in wall and CPU seconds:

  generation  the images phase (backbone loads, the pipeline's calls) without the PNG writes
  overhead    the PNG writes, loading the metric models, scoring every image, results.json and the report

The ratio overhead / generation is the bench's cost on top of making the images. A tiny model makes images in
tenths of a second, so this is the pessimistic case: on the real model an image takes minutes (the study: ~3 min at
1024x1024, 48 steps, on an RTX 3090) while scoring one takes the same milliseconds.

    python scripts/bench_overhead.py --size 64 --steps 8 --limit 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Clock:
    """Wall and CPU seconds summed over the calls of the wrapped functions, per label."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def add(self, label: str, wall: float, cpu: float) -> None:
        self.wall[label] = self.wall.get(label, 0.0) + wall
        self.cpu[label] = self.cpu.get(label, 0.0) + cpu

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - w, time.process_time() - c)

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ideoquant-bench-overhead"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--limit", type=int, default=8, help="prompts of the built-in set")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--metrics", default="psnr,ssim,lpips,clip,pick,ocr")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    import ideoquant
    from ideoquant.bench import generate, run
    from ideoquant.progress import Reporter
    from ideoquant.testing import build_pipeline
    from tests.bench_models import build_alexnet_features, build_clip

    torch.set_num_threads(1)
    work = args.work
    base = work / "tiny-ideogram4"
    if not (base / "model_index.json").exists():
        build_pipeline(base)
        ideoquant.convert(str(base), work / "int8", overwrite=True)
        ideoquant.convert_gguf(str(base), work / "q8_0", qtype="q8_0", overwrite=True)
        build_clip(work / "clip")
        build_alexnet_features(work / "alexnet.safetensors")

    clock = Clock()
    phases: dict[str, list[float]] = {}

    class PhaseClock(Reporter):
        def start(self, task, total):
            phases[task] = [time.perf_counter(), time.process_time()]

        def finish(self, task):
            w, c = phases[task]
            phases[task] = [time.perf_counter() - w, time.process_time() - c]

    clock.wrap(generate, "save_png", "png writes")
    clock.wrap(run, "scorers", "metric models")
    clock.wrap(run, "write_report", "report")
    clock.wrap(run.res, "write_json", "results.json")
    w0, c0 = time.perf_counter(), time.process_time()
    result = run.bench(str(base), [str(work / "int8"), str(work / "q8_0")], work / "report", base=str(base),
                       limit=args.limit, seeds=args.seeds, steps=args.steps, size=(args.size, args.size),
                       guidance=7.0, max_sequence_length=256, metrics=args.metrics,
                       metric_models=[f"clip={work / 'clip'}", f"pick={work / 'clip'}",
                                      f"lpips={work / 'alexnet.safetensors'}"],
                       device=args.device, overwrite=True, reporter=PhaseClock())
    total = [time.perf_counter() - w0, time.process_time() - c0]
    out = {"images": len(result["images"]), "size": args.size, "steps": args.steps, "device": args.device,
           "metrics": args.metrics, "total": total}
    for i, unit in enumerate(("wall", "cpu")):
        saving = (clock.wall if i == 0 else clock.cpu).get("png writes", 0.0)
        generation = phases["images"][i] - saving
        overhead = saving + phases["scoring"][i] + sum(
            (clock.wall if i == 0 else clock.cpu).get(k, 0.0) for k in ("metric models", "report", "results.json"))
        out[unit] = {"generation_s": round(generation, 3), "overhead_s": round(overhead, 3),
                     "png_writes_s": round(saving, 3), "scoring_s": round(phases["scoring"][i], 3),
                     "metric_models_s": round((clock.wall if i == 0 else clock.cpu).get("metric models", 0.0), 3),
                     "report_s": round((clock.wall if i == 0 else clock.cpu).get("report", 0.0)
                                       + (clock.wall if i == 0 else clock.cpu).get("results.json", 0.0), 3),
                     "overhead_ratio": round(overhead / generation, 4)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
