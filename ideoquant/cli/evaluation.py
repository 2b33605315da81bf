"""`ideoquant eval`, `capture`, `sensitivity` and `calibrate`: evidence of quality, measured end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from ..errors import IdeoquantError
from . import render
from .app import app, quiet_diffusers
from .options import (Batch, Components, DeviceOpt, GGUFType, Grid, Inputs, Json, NoProtect, Overwrite, Protect,
                      RequiredSource, Revision, Steps, Threads, Token, Tokens)

SHORT = {"transformer": "cond", "unconditional_transformer": "uncond"}
Plot = Annotated[Optional[Path], typer.Option("--plot", metavar="PNG", help="Write a PNG of the result.", show_default=False)]


def _value(x):
    return getattr(x, "value", x)


@app.command("eval")
def eval_(
    source: RequiredSource,
    quantized: Annotated[Optional[List[Path]], typer.Argument(metavar="OUTPUT",
        help="INT8 output folders and/or .gguf files (or folders of them).", show_default=False)] = None,
    baselines: Annotated[str, typer.Option(metavar="LIST",
        help="Baselines built from the source weights (comma-separated fp8, nf4, w8a8), or 'none'.")]
    = "fp8,nf4,w8a8",
    inputs: Inputs = None,
    steps: Steps = 4, tokens: Tokens = 64, grid: Grid = 16, batch: Batch = 2,
    guidance: Annotated[float, typer.Option(metavar="G", help="g in g * v_cond + (1 - g) * v_uncond.")] = 7.0,
    layer_rows: Annotated[int, typer.Option(metavar="N", min=1, max=65536,
                                            help="Rows per layer and step kept from the source for per-layer SQNR.")]
    = 64,
    components: Components = [],
    device: DeviceOpt = "cpu",
    plot: Plot = None,
    overwrite: Overwrite = False,
    revision: Revision = None,
    token: Token = None,
    as_json: Json = False,
):
    """Compare quantized backbones (and FP8 / NF4 / unprotected W8A8 baselines) with the source on the same inputs."""
    quiet_diffusers()
    from ..evaluation.evaluate import evaluate
    from ..evaluation.plots import evaluation_plot, plot_format
    from ..write.target import output_file, source_paths

    names = [] if baselines.strip().lower() in ("", "none") else [b for b in baselines.split(",") if b.strip()]
    with output_file(plot, source_paths(source, quantized, inputs), overwrite=overwrite, option="--plot") as plot_tmp:
        fmt = plot_format(plot) if plot else None
        report = render.with_progress(lambda rep: evaluate(
            source, quantized or [], baselines=names, components=components or None, inputs=inputs, steps=steps,
            tokens=tokens, grid=grid, batch=batch, guidance=guidance, layer_rows=layer_rows, device=_value(device),
            revision=revision, token=token, reporter=rep), as_json, steps=True)
        if plot:
            evaluation_plot(report, plot_tmp, format=fmt)
    if as_json:
        return render.print_json(report)
    t = Table(title=f"eval against {source} ({render.sample_note(report['inputs'])})", title_justify="left")
    for col in ("variant", "backbone", "SQNR", "cosine", "rel. err", f"guided (g={report['guidance']:g})",
                "weights", "worst layer"):
        t.add_column(col, justify="left" if col in ("variant", "backbone", "worst layer") else "right",
                     overflow="fold", no_wrap=col not in ("variant", "worst layer"))
    for v in report["variants"]:
        for i, (c, x) in enumerate(v["components"].items()):
            g = v["guided"]
            t.add_row(v["name"] if i == 0 else "", SHORT.get(c, c), render.db(x["sqnr_db"]), f"{x['cosine']:.6f}",
                      f"{x['rel_error']:.4f}", (render.db(g["sqnr_db"]) if g else "-") if i == 0 else "",
                      f"{render.human_bytes(x['weight_bytes'])} {x['weight_ratio']:.2f}x",
                      f"{x['worst_layer']} {render.db(x['worst_layer_sqnr_db'])}" if x["worst_layer"] else "-")
        t.add_section()
    render.out_console.print(t)
    render.out_console.print(
        "SQNR / cosine / rel. err: velocity on the image tokens against the source's (cond: transformer, uncond: "
        "unconditional_transformer); guided: g * v_cond + (1 - g) * v_uncond; weights: bytes as stored, and against "
        "the source's bf16; worst layer: lowest SQNR of a layer's output on the source's layer input (its own "
        "error)." + (f"\nplot: {plot}" if plot else ""), highlight=False)


@app.command()
def capture(
    model: Annotated[Optional[str], typer.Argument(metavar="[PIPELINE]", help="Same as --base.",
                                                   show_default=False)] = None,
    base: Annotated[Optional[str], typer.Option("--base", metavar="PIPELINE", help=render.BASE_HELP,
                                                show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="Where to save the inputs.")]
    = Path("captured.safetensors"),
    prompt: Annotated[List[str], typer.Option(metavar="TEXT", help="Prompt (repeatable).")]
    = ["a red fox in fresh snow, photograph"],
    height: Annotated[int, typer.Option(metavar="PX", min=16, max=4096, help="Image height (small keeps the file small).")] = 512,
    width: Annotated[int, typer.Option(metavar="PX", min=16, max=4096, help="Image width.")] = 512,
    steps: Annotated[int, typer.Option(metavar="N", min=1, max=1000, help="Denoising steps: one call of each backbone per step.")]
    = 4,
    max_sequence_length: Annotated[int, typer.Option(metavar="N", min=1, max=4096, help="Text tokens.")] = 256,
    guidance_scale: Annotated[float, typer.Option(metavar="G", help="Guidance scale of the run.")] = 7.0,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the initial latents.")] = 0,
    device: DeviceOpt = "cpu",
    offload: Annotated[bool, typer.Option(
        help="enable_model_cpu_offload() instead of moving the pipeline to --device.")] = False,
    overwrite: Overwrite = False,
    revision: Revision = None,
    as_json: Json = False,
):
    """Run the real pipeline once and record every backbone call's inputs, for eval/sensitivity/calibrate --inputs."""
    quiet_diffusers()
    from ..evaluation.inputs import capture_pipeline

    if model is not None and base is not None and model != base:
        raise IdeoquantError(f"two pipelines given ({model} and --base {base}): give one")
    chosen = next((b for b in (model, base) if b is not None), render.DEFAULT_BASE)
    info = render.with_progress(lambda rep: capture_pipeline(
        chosen, out, prompts=prompt, height=height, width=width, steps=steps, max_sequence_length=max_sequence_length,
        guidance_scale=guidance_scale, seed=seed, device=_value(device), offload=offload, revision=revision,
        overwrite=overwrite), as_json, steps=True)
    if as_json:
        return render.print_json(info)
    render.out_console.print(f"captured {info['calls']} calls → {out} ({render.human_bytes(info['bytes'])})",
                             highlight=False)


@app.command()
def sensitivity(
    source: RequiredSource,
    recipe: Annotated[str, typer.Option(metavar="RECIPE", help="Recipe whose scheme to measure (int8: W8A8; gguf: its type).")]
    = "int8-w8a8",
    qtype: Annotated[Optional[GGUFType], typer.Option("--type", help="GGUF recipes: base type override.",
                                                      show_default=False)] = None,
    group: Annotated[bool, typer.Option("--group", help="Quantize one group at a time (every w2, every to_q, ...).")]
    = False,
    components: Components = [], inputs: Inputs = None,
    steps: Steps = 2, tokens: Tokens = 64, grid: Grid = 16, batch: Batch = 2,
    device: DeviceOpt = "cpu",
    threads: Threads = None,
    top: Annotated[int, typer.Option(metavar="N", min=1, help="Rows of the ranking to show.")] = 25,
    plot: Plot = None,
    write_recipe: Annotated[Optional[Path], typer.Option(
        "--write-recipe", metavar="FILE", help="Write a recipe TOML protecting the most fragile (needs --protect-top or --budget-gb).",
        show_default=False)] = None,
    protect_top: Annotated[Optional[int], typer.Option("--protect-top", metavar="K", min=1, help="Protect the K most fragile.",
                                                       show_default=False)] = None,
    budget_gb: Annotated[Optional[float], typer.Option(
        "--budget-gb", metavar="GB", min=0.0, help="Protect the most fragile while their extra bf16 bytes fit in X GB.",
        show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(metavar="NAME", help="Name of the written recipe [default: the file's stem].",
                                                show_default=False)] = None,
    overwrite: Overwrite = False,
    revision: Revision = None,
    token: Token = None,
    as_json: Json = False,
):
    """Rank linear layers (or groups) by the end-to-end SQNR lost when only that one is quantized."""
    quiet_diffusers()
    from ..evaluation import sensitivity as api
    from ..evaluation.plots import plot_format, sensitivity_plot
    from ..formats import load_recipe
    from ..write.target import output_file, source_paths

    if write_recipe and (protect_top is None) == (budget_gb is None):
        raise IdeoquantError("--write-recipe needs exactly one of --protect-top K and --budget-gb X")
    if plot and write_recipe and Path(plot).absolute() == Path(write_recipe).absolute():
        raise IdeoquantError(f"--plot and --write-recipe name the same file {plot}: give two")
    inputs_read = source_paths(source, inputs, recipe if Path(recipe).is_file() else None)
    with output_file(write_recipe, inputs_read, overwrite=overwrite, option="--write-recipe") as recipe_tmp, \
            output_file(plot, inputs_read, overwrite=overwrite, option="--plot") as plot_tmp:
        fmt = plot_format(plot) if plot else None
        report = render.with_progress(lambda rep: api.sensitivity(
            source, recipe, qtype=_value(qtype), group=group, components=components or None, inputs=inputs,
            steps=steps, tokens=tokens, grid=grid, batch=batch, device=_value(device), threads=threads,
            revision=revision, token=token, reporter=rep), as_json, steps=True)
        if write_recipe:
            recipe_tmp.write_text(api.recipe_toml(report, protect_top=protect_top, budget_gb=budget_gb,
                                                  name=name or write_recipe.stem))
        if plot:
            sensitivity_plot(report, plot_tmp, format=fmt)
    written = None
    if write_recipe:
        written = load_recipe(write_recipe)
        report["written_recipe"] = {"path": str(write_recipe), "name": written.name, "protect": list(written.protect)}
    if as_json:
        return render.print_json(report)
    t = Table(title=f"sensitivity under {report['recipe']['name']}: {report['scheme']}", title_justify="left")
    for col in ("rank", "group" if group else "layer", "type", *[SHORT.get(c, c) for c in report["components"]],
                "noise", "+bf16", "protected"):
        t.add_column(col, justify="left" if col in ("group", "layer", "type") else "right",
                     overflow="fold" if col in ("group", "layer") else "ellipsis",
                     no_wrap=col not in ("group", "layer"))
    for u in report["units"][:top]:
        t.add_row(str(u["rank"]), u["unit"], ",".join(u["types"]),
                  *["NaN/Inf" if c in u.get("non_finite", ()) else render.db(u["sqnr_db"].get(c))
                    for c in report["components"]],
                  f"{u['noise_share']:.1%}", render.human_bytes(u["extra_bytes"]),
                  "yes" if u["protected_by_recipe"] else "")
    render.out_console.print(t)
    render.out_console.print(
        f"cond / uncond: end-to-end velocity SQNR of transformer / unconditional_transformer with only that "
        f"{'group' if group else 'layer'} quantized ({render.sample_note(report['inputs'])}); lower = more fragile. "
        "noise: share of the summed error; +bf16: extra bytes to keep it in bf16 (both backbones); protected: by the "
        "recipe already." + (f"\nplot: {plot}" if plot else ""), highlight=False)
    if written:
        render.out_console.print(f"recipe [bold]{written.name}[/bold] → {write_recipe}: protects "
                                 f"{', '.join(written.protect) or 'nothing'}", highlight=False)


@app.command()
def calibrate(
    source: RequiredSource,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="PATH", help="SmoothQuant statistics file "
                                                "(.safetensors) for `convert --smoothquant`.", show_default=False)]
    = None,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", metavar="FILE", help="Record an importance "
                                                    "matrix instead (llama.cpp's GGUF imatrix format), for "
                                                    "`ideoquant gguf --imatrix FILE`.", show_default=False)] = None,
    recipe: Annotated[str, typer.Option(metavar="RECIPE", help="INT8 recipe: statistics for every linear it quantizes.")] = "int8-w8a8",
    protect: Protect = [],
    no_protect: NoProtect = [],
    components: Components = [], inputs: Inputs = None,
    steps: Steps = 4, tokens: Tokens = 64, grid: Grid = 16, batch: Batch = 2,
    device: DeviceOpt = "cpu",
    overwrite: Overwrite = False,
    revision: Revision = None,
    token: Token = None,
    as_json: Json = False,
):
    """Record SmoothQuant statistics (--out) or an importance matrix for GGUF (--imatrix) from the source's
    activations."""
    quiet_diffusers()
    from ..evaluation.calibrate import calibrate as api
    from ..evaluation.calibrate import calibrate_imatrix

    if (out is None) == (imatrix is None):
        raise IdeoquantError("give exactly one of --out STATS.safetensors (SmoothQuant) and --imatrix FILE (GGUF)")
    if imatrix is not None:
        res = render.with_progress(lambda rep: calibrate_imatrix(
            source, imatrix, components=components or None, inputs=inputs, steps=steps, tokens=tokens, grid=grid,
            batch=batch, device=_value(device), revision=revision, token=token, reporter=rep, overwrite=overwrite),
            as_json, steps=True)
        if as_json:
            return render.print_json(res)
        render.out_console.print(f"importance matrix: {res['entries']} weights → {imatrix} "
                                 f"({render.human_bytes(res['bytes'])}); next: ideoquant gguf {source} --type q4_k_m "
                                 f"--imatrix {imatrix}", highlight=False)
        return

    res = render.with_progress(lambda rep: api(
        source, out, recipe=recipe, protect=protect, no_protect=no_protect, components=components or None,
        inputs=inputs, steps=steps, tokens=tokens, grid=grid, batch=batch, device=_value(device), revision=revision,
        token=token, reporter=rep, overwrite=overwrite), as_json, steps=True)
    if as_json:
        return render.print_json(res)
    t = Table(title=f"SmoothQuant statistics → {out} ({render.sample_note(res['provenance']['inputs'])})",
              title_justify="left")
    outliers = "strongest outlier channels (max / median |x|)"
    for col in ("component", "linears", "calls", "rows", outliers):
        t.add_column(col, justify="left" if col in ("component", outliers) else "right")
    for c, s in res["components"].items():
        t.add_row(c, str(s["modules"]), str(s["calls"]), str(s["rows"]),
                  ", ".join(f"{n} {r:.0f}x" for n, r in list(s["outlier_ratio"].items())[:3]))
    render.out_console.print(t)
    render.out_console.print(f"next: ideoquant convert {source} --smoothquant {out} --alpha 0.5", highlight=False)
