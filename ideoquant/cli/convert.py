"""`ideoquant convert` (INT8) and `ideoquant gguf`: the conversions, with progress, a summary table or JSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from . import render
from ..formats import catalog
from .app import app, job_runtime
from .options import (Components, Convention, DeviceOpt, Json, Layout, NoProtect, Overwrite, Protect, Revision,
                      SourceArg, Threads, Token)


def summary(m: dict, out: Path, wall: float | None = None) -> None:
    """The table; `time` is each backbone's wall time from its first read to its last write (its source bytes per
    second beside it), and `wall` the whole command's, start-up, hashing and manifest included."""
    t = Table(title=f"{m['kind'].upper()} → {out}", title_justify="left")
    for col in ("component", "tensors q/kept", "source", "output", "ratio", "min weight SQNR", "time"):
        t.add_column(col, justify="right" if col != "component" else "left")
    for name, c in m["components"].items():
        t.add_row(name, f"{c['tensors_quantized']}/{c['tensors_kept']}", render.human_bytes(c["bytes_in"]),
                  render.human_bytes(c["bytes_out"]), f"{c['bytes_out'] / c['bytes_in']:.2f}x",
                  render.db(c["weight_sqnr_db_min"]), render.duration(c["seconds"], c["bytes_in"]))
    render.out_console.print(t)
    if wall is not None:
        render.out_console.print(f"total: {wall:.1f} s wall", highlight=False)
    render.out_console.print(f"manifest: {out / 'ideoquant.json'}", soft_wrap=True, highlight=False)
    render.print_warnings(m)


@app.command()
def convert(
    source: SourceArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="Output folder (created whole or not at all).")]
    = Path("ideogram4-int8"),
    recipe: Annotated[str, typer.Option(metavar="RECIPE", help="Recipe name or path to a .toml.")] = "int8-w8a8",
    protect: Protect = [],
    no_protect: NoProtect = [],
    components: Components = [],
    revision: Revision = None,
    token: Token = None,
    overwrite: Overwrite = False,
    device: DeviceOpt = "cpu",
    max_shard_size: Annotated[str, typer.Option(metavar="SIZE", help="Largest safetensors shard (e.g. 5GB, 500MB).")] = "5GB",
    threads: Threads = None,
    smoothquant: Annotated[Optional[Path], typer.Option(
        "--smoothquant", metavar="FILE", help="Apply SmoothQuant with these statistics (from `ideoquant calibrate`).",
        show_default=False)] = None,
    alpha: Annotated[float, typer.Option("--alpha", metavar="A", min=0.0, max=1.0,
                                         help="SmoothQuant migration strength (0: none, 1: all to weights).")] = 0.5,
    as_json: Json = False,
):
    """Quantize both backbones with a torchao recipe, which stock diffusers loads: INT8 W8A8 (int8-w8a8, any CUDA GPU)
    or FP8 W8A8 (fp8-w8a8: Ada, Hopper, Blackwell; from the FP8 release a bit-exact repack)."""
    from ..job import convert as api

    t0 = time.perf_counter()
    with job_runtime():
        m = render.with_progress(lambda rep: api(
            source, out, recipe=recipe, protect=protect, no_protect=no_protect, components=components or None,
            revision=revision, token=token, overwrite=overwrite, device=getattr(device, "value", device),
            max_shard_size=max_shard_size, threads=threads, reporter=rep, smoothquant=smoothquant, alpha=alpha),
            as_json)
    render.print_json(m) if as_json else summary(m, out, time.perf_counter() - t0)


@app.command()
def gguf(
    source: SourceArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="Output folder (created whole or not at all).")]
    = Path("ideogram4-gguf"),
    qtype: Annotated[Optional[str], typer.Option(
        "--type", metavar="TYPE[,TYPE...]", show_default=False,
        help="GGML type or mixture: " + ", ".join(catalog.GGUF_CHOICES) + ". Several, comma-separated, are written in "
        "one pass (OUT/<TYPE>/ each) [default: the recipe's type; recipe gguf: q4_k].")] = None,
    recipe: Annotated[Optional[str], typer.Option(metavar="RECIPE",
        help="Recipe name or path [default: gguf, or the mixture's recipe].", show_default=False)] = None,
    type_rule: Annotated[List[str], typer.Option(metavar="REGEX=TYPE",
        help="REGEX=TYPE for matching tensor names, first match wins (repeatable).", show_default=False)] = [],
    protect: Protect = [],
    no_protect: NoProtect = [],
    layout: Annotated[Layout, typer.Option(
        help="original: fused qkv, as ComfyUI and stable-diffusion.cpp name it; diffusers: diffusers names.")]
    = "original",
    arch: Annotated[str, typer.Option("--arch", metavar="NAME", help=(
        "general.architecture to write. Only ComfyUI-GGUF reads it: its PRs #455/#460 list ideogram4, #459 "
        "ideogram; stable-diffusion.cpp and diffusers ignore it."))] = "ideogram4",
    components: Components = [],
    revision: Revision = None,
    token: Token = None,
    overwrite: Overwrite = False,
    threads: Threads = None,
    imatrix: Annotated[Optional[str], typer.Option(
        metavar="FILE|ones", help="Importance weights for ggml's weighted quantizers: an imatrix file (from "
        "`ideoquant calibrate --imatrix`, llama-imatrix or sd-cli), or 'ones' (what stable-diffusion.cpp's "
        "converter uses).", show_default=False)] = None,
    imatrix_convention: Annotated[Convention, typer.Option(
        help="How the file's sums become ggml's weights: as llama-quantize or as sd-cli derives them.")] = "llama",
    as_json: Json = False,
):
    """Write one GGUF per backbone, bytes equal to ggml's quantizers (with --imatrix, its weighted path)."""
    from ..job import convert_gguf as api

    t0 = time.perf_counter()
    with job_runtime():
        m = render.with_progress(lambda rep: api(
            source, out, qtype=getattr(qtype, "value", qtype), recipe=recipe, type_rules=type_rule, protect=protect,
            no_protect=no_protect, layout=getattr(layout, "value", layout), components=components or None,
            revision=revision, token=token, overwrite=overwrite, threads=threads, imatrix=imatrix,
            imatrix_convention=getattr(imatrix_convention, "value", imatrix_convention), reporter=rep, arch=arch),
            as_json)
    manifests = m if isinstance(m, list) else [m]
    if as_json:
        for one in manifests:
            render.print_warnings(one)  # stderr: stdout stays one JSON document
        return render.print_json(m)
    for one in manifests:
        label = one.get("gguf", {}).get("label")
        summary(one, out / label if isinstance(m, list) and label else out, time.perf_counter() - t0)
