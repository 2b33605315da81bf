"""`ideoquant demo`: the whole job offline on a tiny Ideogram 4 that ideoquant builds itself (`testing.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import manifest, model
from .evaluation.inputs import sample_inputs
from .evaluation.runner import velocity
from .job import convert, convert_gguf
from .load import load_transformer
from .metrics import sqnr_db
from .progress import Reporter
from .testing import TINY_CONFIG, build_checkpoint, build_pipeline
from .write.staging import output_lock, staged_output
from .write.target import check_target

BENCH_MODULES = ("torchmetrics", "transformers", "scipy", "PIL")  # what the demo's bench (PSNR, SSIM) needs


class LabelledReporter(Reporter):
    """Passes reports on with task names prefixed by the variant (`int8/transformer`, `gguf-q4_k/transformer`), so
    the demo's pairs of progress bars say which variant each belongs to."""

    def __init__(self, inner: Reporter | None, label: str):
        self.inner, self.label = inner or Reporter(), label

    def _name(self, task: str) -> str:
        return f"{self.label}/{task}"

    def start(self, task: str, total: int) -> None:
        self.inner.start(self._name(task), total)

    def advance(self, task: str, n: int) -> None:
        self.inner.advance(self._name(task), n)

    def finish(self, task: str) -> None:
        self.inner.finish(self._name(task))


def run_demo(out: str | Path = "ideoquant-demo", reporter=None, *, overwrite: bool = False) -> dict:
    """The whole job on a tiny checkpoint: build it, convert to INT8 and GGUF, load each result, compare outputs;
    then, with the bench extra installed, a 4-prompt `bench` of a tiny complete pipeline (`report["bench"]`).

    OUT follows the output policy (`write.target`): an existing OUT is replaced only with `overwrite`, and the
    demo is made in a staging folder beside OUT that replaces it only once complete. The demo reads no input, so
    there is no source for OUT to lie in."""
    out = check_target(out, (), overwrite=overwrite, folder=True)
    with output_lock(out), staged_output(out, overwrite) as staging:
        report = _run_demo(staging, out, reporter)
        _relocate_records(staging, out)
    return report


def _relocate_records(staging: Path, out: Path) -> None:
    """The records the demo's conversions and bench made name the places they read as given, that is under the
    staging folder: name them as they will be after the rename, under OUT (manifests, the bench's settings and
    results, and the report pages rendered from them)."""
    from .bench import report as bench_report
    from .bench import results as bench_results

    def moved(value):
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        return value.replace(str(staging), str(out)) if isinstance(value, str) else value

    for path in staging.glob(f"*/{manifest.MANIFEST}"):
        manifest.write(path.parent, moved(manifest.read(path.parent)))
    bench = staging / "bench"
    if (bench / bench_results.RESULTS).is_file():
        for name in (bench_results.SETTINGS, bench_results.RESULTS):
            bench_results.write_json(bench / name, moved(json.loads((bench / name).read_text())))
        bench_report.write_report(bench, json.loads((bench / bench_results.RESULTS).read_text()))


def _run_demo(staging: Path, out: Path, reporter) -> dict:
    """The demo, written under `staging`; the report names the places as they will be, under OUT."""
    from diffusers import Ideogram4Transformer2DModel

    (staging / ".ideoquant-demo").write_text("made by `ideoquant demo`; safe to delete\n")
    source = build_checkpoint(staging / "source", fmt="bf16")

    def rep(label):
        return LabelledReporter(reporter, label)

    runs = [
        ("int8-w8a8", lambda: convert(source, staging / "int8", reporter=rep("int8-w8a8"))),
        ("gguf q8_0", lambda: convert_gguf(source, staging / "gguf-q8_0", qtype="q8_0", reporter=rep("gguf-q8_0"))),
        ("gguf q4_k", lambda: convert_gguf(source, staging / "gguf-q4_k", qtype="q4_k", reporter=rep("gguf-q4_k"))),
        ("gguf q4_k_m", lambda: convert_gguf(source, staging / "gguf-q4_k_m", qtype="q4_k_m",
                                             reporter=rep("gguf-q4_k_m"))),
    ]
    variants = []
    refs = {c: Ideogram4Transformer2DModel.from_pretrained(source / c, torch_dtype=torch.bfloat16)
            for c in model.COMPONENTS}
    inputs = sample_inputs(TINY_CONFIG)
    ref_v = torch.cat([velocity(refs[c], inputs) for c in model.COMPONENTS])
    source_bytes = sum(f.stat().st_size for c in model.COMPONENTS for f in (source / c).glob("*.safetensors"))
    params = sum(p.numel() for p in refs["transformer"].parameters())
    for name, run in runs:
        m = run()
        target = staging / ("int8" if name.startswith("int8") else f"gguf-{name.split()[1]}")
        quant_v = []
        for c in model.COMPONENTS:
            files = m["components"][c]["files"]
            weights = next(f for f in files if f.endswith((".gguf", ".safetensors")))
            path = target / weights if weights.endswith(".gguf") else target / c
            quant_v.append(velocity(load_transformer(path), inputs))
        v = torch.cat(quant_v)
        weight_bytes = sum(info["size"] for rel, info in m["files"].items() if rel.endswith((".gguf", ".safetensors")))
        variants.append({
            "name": name,
            "files": target.name + "/",
            "bytes": weight_bytes,
            "ratio": weight_bytes / source_bytes,
            "sqnr_db": sqnr_db(ref_v, v),
            "cosine": float(torch.nn.functional.cosine_similarity(ref_v.flatten(), v.flatten(), dim=0)),
        })
    return {"source": str(out / "source"), "params": params, "source_bytes": source_bytes, "variants": variants,
            "bench": demo_bench(staging, out, reporter)}


def bench_missing() -> str | None:
    """The first module the demo's bench needs that is not installed, or None."""
    from importlib.util import find_spec

    return next((m for m in BENCH_MODULES if find_spec(m) is None), None)


def demo_bench(staging: Path, out: Path, reporter=None) -> dict:
    """Images, not just velocities: a tiny complete pipeline (text encoder, VAE, both backbones), its INT8 and Q4_K
    outputs, and `bench` on the first 4 built-in prompts (2 steps at 32x32, PSNR and SSIM: no model downloads).
    Written under `staging`, named under OUT. Without the bench extra: what to install."""
    missing = bench_missing()
    if missing:
        return {"missing": missing, "install": 'pip install "ideoquant[bench]"'}
    from .bench.run import bench

    pipeline = build_pipeline(staging / "pipeline")
    convert(pipeline, staging / "pipeline-int8", reporter=LabelledReporter(reporter, "pipeline-int8"))
    convert_gguf(pipeline, staging / "pipeline-q4_k", qtype="q4_k",
                 reporter=LabelledReporter(reporter, "pipeline-q4_k"))
    result = bench(str(pipeline), [str(staging / "pipeline-int8"), str(staging / "pipeline-q4_k")], staging / "bench",
                   base=str(pipeline), limit=4, steps=2, size=(32, 32), guidance=7.0, max_sequence_length=256,
                   metrics="psnr,ssim", device="cpu", reporter=reporter)
    return {"report": str(out / "bench" / "index.html"), "images": len(result["images"]),
            "summary": {v: {m: s[m]["mean"] for m in ("psnr", "ssim", "seconds_per_image") if m in s}
                        for v, s in result["summary"].items()}}
