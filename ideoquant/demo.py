"""`ideoquant demo`: the whole job offline on a tiny Ideogram 4 that ideoquant builds itself (`testing.py`)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import model
from .errors import IdeoquantError
from .evaluation.inputs import sample_inputs
from .evaluation.runner import velocity
from .job import convert, convert_gguf
from .load import load_transformer
from .metrics import sqnr_db
from .progress import Reporter
from .testing import TINY_CONFIG, build_checkpoint, build_pipeline

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


def run_demo(out: str | Path = "ideoquant-demo", reporter=None) -> dict:
    """The whole job on a tiny checkpoint: build it, convert to INT8 and GGUF, load each result, compare outputs;
    then, with the bench extra installed, a 4-prompt `bench` of a tiny complete pipeline (`report["bench"]`)."""
    import shutil

    from diffusers import Ideogram4Transformer2DModel

    out = Path(out)
    if out.exists():
        if not (out / ".ideoquant-demo").exists():
            raise IdeoquantError(f"{out} exists and is not an ideoquant demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".ideoquant-demo").write_text("made by `ideoquant demo`; safe to delete\n")
    source = build_checkpoint(out / "source", fmt="bf16")
    def rep(label):
        return LabelledReporter(reporter, label)

    runs = [
        ("int8-w8a8", lambda: convert(source, out / "int8", reporter=rep("int8-w8a8"))),
        ("gguf q8_0", lambda: convert_gguf(source, out / "gguf-q8_0", qtype="q8_0", reporter=rep("gguf-q8_0"))),
        ("gguf q4_k", lambda: convert_gguf(source, out / "gguf-q4_k", qtype="q4_k", reporter=rep("gguf-q4_k"))),
        ("gguf q4_k_m", lambda: convert_gguf(source, out / "gguf-q4_k_m", qtype="q4_k_m",
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
        target = out / ("int8" if name.startswith("int8") else f"gguf-{name.split()[1]}")
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
    return {"source": str(source), "params": params, "source_bytes": source_bytes, "variants": variants,
            "bench": demo_bench(out, reporter)}


def bench_missing() -> str | None:
    """The first module the demo's bench needs that is not installed, or None."""
    from importlib.util import find_spec

    return next((m for m in BENCH_MODULES if find_spec(m) is None), None)


def demo_bench(out: Path, reporter=None) -> dict:
    """Images, not just velocities: a tiny complete pipeline (text encoder, VAE, both backbones), its INT8 and Q4_K
    outputs, and `bench` on the first 4 built-in prompts (2 steps at 32x32, PSNR and SSIM: no model downloads).
    Without the bench extra: what to install."""
    missing = bench_missing()
    if missing:
        return {"missing": missing, "install": 'pip install "ideoquant[bench]"'}
    from .bench.run import bench

    pipeline = build_pipeline(out / "pipeline")
    convert(pipeline, out / "pipeline-int8", reporter=LabelledReporter(reporter, "pipeline-int8"))
    convert_gguf(pipeline, out / "pipeline-q4_k", qtype="q4_k", reporter=LabelledReporter(reporter, "pipeline-q4_k"))
    result = bench(str(pipeline), [str(out / "pipeline-int8"), str(out / "pipeline-q4_k")], out / "bench",
                   base=str(pipeline), limit=4, steps=2, size=(32, 32), guidance=7.0, max_sequence_length=256,
                   metrics="psnr,ssim", device="cpu", reporter=reporter)
    return {"report": str(out / "bench" / "index.html"), "images": len(result["images"]),
            "summary": {v: {m: s[m]["mean"] for m in ("psnr", "ssim", "seconds_per_image") if m in s}
                        for v, s in result["summary"].items()}}
