"""`ideoquant convert` (INT8) and `ideoquant gguf`: the conversions, with progress, a summary table or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from . import render
from .app import app, job_runtime
from .options import (Components, DeviceOpt, GGUFType, Json, Layout, NoProtect, Overwrite, Protect, Revision,
                      SourceArg, Threads, Token)


def summary(m: dict, out: Path) -> None:
    t = Table(title=f"{m['kind'].upper()} → {out}", title_justify="left")
    for col in ("component", "tensors q/kept", "source", "output", "ratio", "min weight SQNR", "time"):
        t.add_column(col, justify="right" if col != "component" else "left")
    for name, c in m["components"].items():
        t.add_row(name, f"{c['tensors_quantized']}/{c['tensors_kept']}", render.human_bytes(c["bytes_in"]),
                  render.human_bytes(c["bytes_out"]), f"{c['bytes_out'] / c['bytes_in']:.2f}x",
                  render.db(c["weight_sqnr_db_min"]), f"{c['seconds']:.1f} s")
    render.out_console.print(t)
    render.out_console.print(f"manifest: {out / 'ideoquant.json'}", soft_wrap=True, highlight=False)


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
    """Quantize both backbones to INT8 W8A8 (torchao format: stock diffusers loads it)."""
    from ..job import convert as api

    with job_runtime():
        m = render.with_progress(lambda rep: api(
            source, out, recipe=recipe, protect=protect, no_protect=no_protect, components=components or None,
            revision=revision, token=token, overwrite=overwrite, device=getattr(device, "value", device),
            max_shard_size=max_shard_size, threads=threads, reporter=rep, smoothquant=smoothquant, alpha=alpha),
            as_json)
    render.print_json(m) if as_json else summary(m, out)


@app.command()
def gguf(
    source: SourceArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="Output folder (created whole or not at all).")]
    = Path("ideogram4-gguf"),
    qtype: Annotated[Optional[GGUFType], typer.Option("--type", show_default=False,
        help="GGML type, or a mixture (q4_k_m) [default: the recipe's type; recipe gguf: q4_k].")] = None,
    recipe: Annotated[Optional[str], typer.Option(metavar="RECIPE",
        help="Recipe name or path [default: gguf, or the mixture's recipe].", show_default=False)] = None,
    type_rule: Annotated[List[str], typer.Option(metavar="REGEX=TYPE",
        help="REGEX=TYPE for matching tensor names, first match wins (repeatable).", show_default=False)] = [],
    protect: Protect = [],
    no_protect: NoProtect = [],
    layout: Annotated[Layout, typer.Option(
        help="original: fused qkv, as ComfyUI and stable-diffusion.cpp name it; diffusers: diffusers names.")]
    = "original",
    components: Components = [],
    revision: Revision = None,
    token: Token = None,
    overwrite: Overwrite = False,
    threads: Threads = None,
    as_json: Json = False,
):
    """Write one GGUF per backbone, bit-exact with ggml's quantizers."""
    from ..job import convert_gguf as api

    with job_runtime():
        m = render.with_progress(lambda rep: api(
            source, out, qtype=getattr(qtype, "value", qtype), recipe=recipe, type_rules=type_rule, protect=protect,
            no_protect=no_protect, layout=getattr(layout, "value", layout), components=components or None,
            revision=revision, token=token, overwrite=overwrite, threads=threads, reporter=rep), as_json)
    render.print_json(m) if as_json else summary(m, out)
