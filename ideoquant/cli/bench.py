"""`ideoquant bench`: image-level quality of quantized outputs against the source, the way the study measured it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from ..errors import IdeoquantError
from . import render
from .app import app, interrupt_keeps, job_runtime, quiet_diffusers
from .options import Json, Overwrite, Revision, Token

SIZE_HELP = "Image size, WxH or N for NxN."


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h if sep else w))
    except ValueError:
        raise IdeoquantError(f"--size {text}: give WxH (e.g. 1024x768) or N") from None
    if not all(16 <= s <= 8192 for s in size):
        raise IdeoquantError(f"--size {text}: each side must be between 16 and 8192 pixels")
    return size


@app.command()
def bench(
    args: Annotated[Optional[List[str]], typer.Argument(metavar="SOURCE VARIANT...", show_default=False,
        help="SOURCE (the reference, run as released), then ideoquant outputs (INT8 folder, folder of GGUF files, "
             "a multi-type pass) and/or baselines built from SOURCE: nf4, w8a8-unprotected, fp8.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="REPORT", help="Report folder (resumed when it holds a "
                                      "run with the same settings).")] = Path("bench-report"),
    base: Annotated[Optional[str], typer.Option("--base", metavar="PIPELINE", help=render.BASE_HELP,
                                                show_default=False)] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", metavar="FILE", show_default=False,
        help="Prompts: plain text (one per line) or JSONL (prompt, and optional id, text, seed, group) "
             "[default: the built-in set].")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", metavar="DIR", show_default=False,
        help="Score images made elsewhere instead (DIR/<variant>/<id>-<seed>.png, the reference in "
             "DIR/reference/); needs --prompts.")] = None,
    seeds: Annotated[int, typer.Option(metavar="N", min=1, max=10000, help="Seeds 0..N-1 for every prompt "
                                       "(a prompt's own seed wins).")] = 1,
    steps: Annotated[int, typer.Option(metavar="N", min=1, max=1000, help="Denoising steps.")] = 48,
    guidance: Annotated[Optional[float], typer.Option(metavar="G", show_default=False,
        help="Constant guidance scale [default: the pipeline's own schedule at 48 steps, else 7.0].")] = None,
    size: Annotated[str, typer.Option(metavar="WxH", help=SIZE_HELP)] = "1024",
    max_sequence_length: Annotated[Optional[int], typer.Option(metavar="N", min=1, max=8192, show_default=False,
        help="Text tokens [default: the pipeline's].")] = None,
    limit: Annotated[Optional[int], typer.Option(metavar="N", min=1, show_default=False,
        help="Only the first N prompts (a quick look).")] = None,
    metrics: Annotated[Optional[str], typer.Option(metavar="LIST", show_default=False,
        help="Comma-separated subset of psnr, ssim, lpips, clip, pick, ocr_ned, ocr_exact (ocr: both) "
             "[default: all].")] = None,
    metric_model: Annotated[List[str], typer.Option("--metric-model", metavar="NAME=PATH", show_default=False,
        help="A local copy of a metric model (repeatable): clip, pick, pick-processor, lpips (AlexNet state dict "
             "file).")] = [],
    device: Annotated[Optional[str], typer.Option(metavar="DEVICE", show_default=False,
        help="cpu or cuda [default: cuda when available; under accelerate launch, each process's own].")] = None,
    offload: Annotated[bool, typer.Option(help="enable_model_cpu_offload() (a card too small for the pipeline).")]
    = False,
    overwrite: Overwrite = False,
    revision: Revision = None,
    token: Token = None,
    as_json: Json = False,
):
    """Image-level quality: every variant's images against SOURCE's, same prompts and seeds, with paired CIs."""
    quiet_diffusers()

    from ..bench.run import bench as run_bench
    from ..bench.run import process_state, score_images

    args = list(args or [])
    main_process = process_state(device).is_main_process
    kept = f"the images made so far are kept in {out}; the same command resumes"  # what an interrupt leaves
    if images is not None:
        if args:
            raise IdeoquantError("--images scores images made elsewhere: give no SOURCE or VARIANT")
        if prompts is None:
            raise IdeoquantError("--images needs --prompts FILE (the prompts the images were made from)")
        with job_runtime(), interrupt_keeps(kept):
            result = render.with_progress(lambda rep: score_images(
                images, prompts, out, metrics=metrics, metric_models=metric_model, device=device,
                overwrite=overwrite, reporter=rep), as_json, steps=True)
    else:
        if len(args) < 2:
            raise IdeoquantError("give SOURCE and at least one VARIANT (an ideoquant output, or nf4 / "
                                 "w8a8-unprotected)")
        with job_runtime(), interrupt_keeps(kept):
            result = render.with_progress(lambda rep: run_bench(
                args[0], args[1:], out, base=base, prompts=prompts, seeds=seeds, steps=steps, guidance=guidance,
                size=_size(size), max_sequence_length=max_sequence_length, limit=limit, metrics=metrics,
                metric_models=metric_model, device=device, offload=offload, overwrite=overwrite, revision=revision,
                token=token, reporter=rep), as_json or not main_process, steps=True)
    if result is None:  # another process of an accelerate launch: the main process reports
        return
    if as_json:
        return render.print_json(result)
    print_summary(result, out)


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if abs(x) < 1e5 else render.human_bytes(x)


def print_summary(result: dict, out: Path) -> None:
    metric_names = list(result["metrics"])
    t = Table(title=f"bench → {out} ({len(result['images'])} images)", title_justify="left")
    t.add_column("variant", no_wrap=True)
    for m in metric_names:
        t.add_column(m, justify="right")
    for col in ("s/image", "weights"):
        t.add_column(col, justify="right")
    for v, s in result["summary"].items():
        cells = []
        for m in metric_names:
            e = s.get(m)
            if not e:
                cells.append("-")
                continue
            text = fmt(e["mean"])
            if e["delta_vs_reference"] is not None:
                text += f" ({e['delta_vs_reference']:+.3g}, CI {e['ci_low']:+.3g}..{e['ci_high']:+.3g})"
            cells.append(text)
        perf = [s.get("seconds_per_image"), s.get("weight_bytes")]
        t.add_row(v, *cells, fmt(perf[0]["mean"]) if perf[0] else "-",
                  render.human_bytes(perf[1]["mean"]) if perf[1] else "-")
    render.out_console.print(t)
    render.out_console.print(
        "mean per variant (difference vs the reference, paired same-seed, bootstrap 95 % CI). psnr, ssim, lpips "
        f"compare each image with the reference's. Details: {out / 'results.json'}", highlight=False)
