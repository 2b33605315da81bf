"""`ideoquant demo`: the whole job offline on a tiny Ideogram 4 that ideoquant builds itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import render
from .app import app, job_runtime, quiet_diffusers
from .options import Json, Overwrite


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="The demo's folder.")]
    = Path("ideoquant-demo"),
    overwrite: Overwrite = False,
    as_json: Json = False,
):
    """Run the whole job offline on a tiny Ideogram 4 that ideoquant builds itself."""
    quiet_diffusers()
    from ..demo import run_demo

    with job_runtime():
        report = render.with_progress(lambda rep: run_demo(out, reporter=rep, overwrite=overwrite), as_json)
    if as_json:
        return render.print_json(report)
    t = Table(title=f"tiny Ideogram 4 ({report['params']:,} params per backbone) → {out}", title_justify="left")
    for col in ("variant", "files", "size", "vs source", "velocity SQNR", "cosine"):
        t.add_column(col, justify="left" if col in ("variant", "files") else "right")
    for v in report["variants"]:
        t.add_row(v["name"], v["files"], render.human_bytes(v["bytes"]), f"{v['ratio']:.2f}x", render.db(v["sqnr_db"]),
                  f"{v['cosine']:.5f}")
    render.out_console.print(t)
    render.out_console.print("velocity SQNR: the quantized backbones' outputs against the source's, both backbones, "
                             "same inputs.")
    b = report["bench"]
    if "missing" in b:
        render.out_console.print(f"Images too: `{b['install']}` and rerun; the demo then ends with a 4-prompt "
                                 "`ideoquant bench` of a tiny complete pipeline.", highlight=False, markup=False,
                                 soft_wrap=True)
    else:
        t = Table(title=f"bench: {b['images']} images of a tiny complete pipeline → {b['report']}",
                  title_justify="left")
        for col in ("variant", "PSNR", "SSIM", "s/image"):
            t.add_column(col, justify="left" if col == "variant" else "right")
        for v, s in b["summary"].items():
            t.add_row(v, f"{s['psnr']:.1f} dB" if "psnr" in s else "-", f"{s['ssim']:.4f}" if "ssim" in s else "-",
                      f"{s['seconds_per_image']:.2f}" if "seconds_per_image" in s else "-")
        render.out_console.print(t)
    render.out_console.print("Next: `ideoquant convert` on the real model, then `ideoquant bench` (see README).")
