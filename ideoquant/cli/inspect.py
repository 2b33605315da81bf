"""`ideoquant inspect` (what a source holds and what a recipe does to it) and `ideoquant recipes`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from . import render
from .app import app
from .options import Components, GGUFType, Json, Revision, SourceArg, Token

GPU_BUDGET_GB = 24


@app.command()
def inspect(
    source: SourceArg = None,
    recipe: Annotated[Optional[str], typer.Option(metavar="RECIPE",
        help="Recipe whose plan to show [default: int8-w8a8, or gguf with --type].", show_default=False)] = None,
    qtype: Annotated[Optional[GGUFType], typer.Option("--type", help="Show the GGUF plan for this type.",
                                                      show_default=False)] = None,
    revision: Revision = None,
    token: Token = None,
    components: Components = [],
    vram: Annotated[Optional[float], typer.Option(
        "--vram", metavar="GB", min=0.1, max=10000,
        help="List which types fit both backbones on a card of this size, with and without CPU offload.",
        show_default=False)] = None,
    as_json: Json = False,
):
    """Show what a source holds and what a recipe would do to it, with sizes and GPU memory."""
    from ..inspection import inspect as api

    report = render.with_progress(lambda rep: api(source, recipe, qtype=getattr(qtype, "value", qtype),
                                                  revision=revision, components=components or None, token=token,
                                                  vram_gb=vram),
                                  as_json)
    if as_json:
        return render.print_json(report)
    out = render.out_console
    src = report["source"]
    out.print(f"[bold]{src.get('repo_id') or src.get('path')}[/bold]"
              + (f" @ {src['commit']}" if src.get("commit") else ""))
    out.print(f"recipe [bold]{report['recipe']['name']}[/bold]: {report['recipe']['description']}")
    t = Table()
    for col in ("component", "params", "source dtypes", "quantized/kept", "size now", "size after"):
        t.add_column(col, justify="left" if col in ("component", "source dtypes") else "right")
    for name, c in report["components"].items():
        params = f"{c['params'] / 1e9:.2f} B" if c["params"] > 1e8 else f"{c['params'] / 1e6:.1f} M"
        t.add_row(f"{name}\n({c['layout']} layout)", params, "\n".join(c["dtypes"]),
                  f"{c['quantized']}/{c['kept']}", render.human_bytes(c["bytes_in"]),
                  render.human_bytes(c["bytes_out"]))
    out.print(t)
    d = Table(title="what the recipe does", title_justify="left")
    for col in ("output dtype", "tensors", "bytes", "why"):
        d.add_column(col)
    for row in report["decisions"]:
        d.add_row(row["dtype"], str(row["tensors"]), render.human_bytes(row["bytes"]), row["reason"])
    out.print(d)
    g = report["gpu"]
    verdict = "[green]fits[/green]" if g["fits"] else "[red]does not fit[/red]"
    out.print(f"GPU weights for both backbones: {g['weights_gib']:.2f} GiB, estimated peak "
              f"{g['estimated_peak_gib']:.2f} GiB ({g['note']}) → {verdict} in {GPU_BUDGET_GB} GB")
    if not g["fits"]:
        verdict = "[green]fits[/green]" if g["fits_with_offload"] else "[red]does not fit[/red]"
        out.print(f"one backbone at a time (pipe.enable_model_cpu_offload()): "
                  f"{g['offload_peak_gib']:.2f} GiB → {verdict}")
    if report["fit"]:
        fit = report["fit"]
        f = Table(title=f"what fits a {fit['vram_gb']:g} GB card (weights + ~3 GiB activations)", title_justify="left")
        for col in ("type", "both backbones", "both resident", "one at a time (offload)"):
            f.add_column(col, justify="left" if col == "type" else "right")
        yes, no = "[green]fits[/green]", "[red]no[/red]"
        for row in fit["types"]:
            f.add_row(row["type"], f"{row['weights_gib']:.2f} GiB", yes if row["fits"] else no,
                      yes if row["fits_with_offload"] else no)
        out.print(f)


@app.command()
def recipes(as_json: Json = False):
    """List the built-in recipes."""
    from ..formats import list_recipes

    rs = [r.to_dict() for r in list_recipes()]
    if as_json:
        return render.print_json(rs)
    t = Table(show_lines=True)
    for col in ("name", "format", "protects", "description"):
        t.add_column(col)
    for r in rs:
        extra = f"\ntype {r['type']}" + "".join(f"\n{k} → {v}" for k, v in r.get("rules", {}).items()) \
            if r.get("type") is not None else ""
        t.add_row(r["name"], r["format"] + extra, "\n".join(r["protect"]) or "-", r["description"])
    render.out_console.print(t)
