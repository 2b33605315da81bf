"""`ideoquant`: a thin Typer layer over the Python API, rendered with Rich."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from .errors import IdeoquantError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Ideogram 4 for consumer GPUs: INT8 W8A8 for stock diffusers, bit-exact GGUF.")
console = Console(stderr=True)
out_console = Console()
GPU_BUDGET_GB = 24

SOURCE_HELP = "Hub repo id (ORG/NAME), local pipeline folder, component folder or .safetensors file."


def _quiet() -> None:
    """Third-party import chatter (torchao's optional kernels, torch's pytree notices) is not for our users.

    Done without importing anything heavy, so that `--help` and the commands that do not need diffusers stay fast.
    """
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read when diffusers sets up its logger


def _quiet_diffusers() -> None:
    """For the commands that load models through diffusers: no per-shard loading bars."""
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass


class RichReporter:
    """Per-component progress with bytes/s and ETA."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks = {}

    def start(self, component, total_bytes):
        self.tasks[component] = self.progress.add_task(component, total=total_bytes)

    def advance(self, component, nbytes):
        self.progress.advance(self.tasks[component], nbytes)

    def finish(self, component):
        task = self.tasks[component]
        self.progress.update(task, completed=self.progress.tasks[task].total)


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description:<26}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, disable=not enabled)


def _run(fn, as_json: bool, progress: Progress | None = None):
    """Call the API with progress (bytes by default); turn user errors into one line and exit code 2."""
    try:
        with progress or _progress(not as_json) as p:
            return fn(RichReporter(p))
    except IdeoquantError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: nothing was written")
        raise typer.Exit(130)


def _fmt_bytes(n) -> str:
    from .write.staging import human_bytes

    return human_bytes(n)


def _summary(m: dict, out: Path) -> None:
    t = Table(title=f"{m['kind'].upper()} → {out}", title_justify="left")
    for col in ("component", "tensors q/kept", "source", "output", "ratio", "min weight SQNR", "time"):
        t.add_column(col, justify="right" if col != "component" else "left")
    for name, c in m["components"].items():
        sq = c["weight_sqnr_db_min"]
        t.add_row(name, f"{c['tensors_quantized']}/{c['tensors_kept']}", _fmt_bytes(c["bytes_in"]),
                  _fmt_bytes(c["bytes_out"]), f"{c['bytes_out'] / c['bytes_in']:.2f}x",
                  "exact" if sq is None else f"{sq:.1f} dB", f"{c['seconds']:.1f} s")
    out_console.print(t)
    out_console.print(f"manifest: {out / 'ideoquant.json'}", soft_wrap=True, highlight=False)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@app.command()
def convert(
    source: Optional[str] = typer.Argument(None, help=SOURCE_HELP + " [default: ideogram-ai/ideogram-4-fp8]"),
    out: Path = typer.Option(Path("ideogram4-int8"), "--out", "-o", help="Output folder (created whole or not at all)."),
    recipe: str = typer.Option("int8-w8a8", help="Recipe name or path to a .toml."),
    protect: List[str] = typer.Option([], help="Also keep modules matching this glob in bf16."),
    no_protect: List[str] = typer.Option([], help="Quantize modules matching this glob even if the recipe protects them."),
    components: List[str] = typer.Option([], help="Only this backbone (repeatable)."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    device: str = typer.Option("cpu", help="Where the quantization math runs: cpu or cuda."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard."),
    smoothquant: Optional[Path] = typer.Option(None, "--smoothquant", help="Apply SmoothQuant with these statistics "
                                               "(from `ideoquant calibrate`)."),
    alpha: float = typer.Option(0.5, "--alpha", help="SmoothQuant migration strength (0: none, 1: all to weights)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of tables."),
):
    """Quantize both backbones to INT8 W8A8 (torchao format: stock diffusers loads it)."""
    from . import job as api

    m = _run(lambda rep: api.convert(source, out, recipe=recipe, protect=protect, no_protect=no_protect,
                                     components=components or None, revision=revision, overwrite=overwrite,
                                     device=device, max_shard_size=max_shard_size, reporter=rep,
                                     smoothquant=smoothquant, alpha=alpha), as_json)
    _print_json(m) if as_json else _summary(m, out)


@app.command()
def gguf(
    source: Optional[str] = typer.Argument(None, help=SOURCE_HELP + " [default: ideogram-ai/ideogram-4-fp8]"),
    out: Path = typer.Option(Path("ideogram4-gguf"), "--out", "-o", help="Output folder (created whole or not at all)."),
    qtype: str = typer.Option("q4_k", "--type", help="q8_0, q4_k, q5_k, q6_k, or the mixture q4_k_m."),
    recipe: Optional[str] = typer.Option(None, help="Recipe name or path (default: gguf, or gguf-q4_k_m for --type q4_k_m)."),
    type_rule: List[str] = typer.Option([], help="REGEX=TYPE for matching tensor names (first match wins)."),
    protect: List[str] = typer.Option([], help="Also keep modules matching this glob in BF16."),
    no_protect: List[str] = typer.Option([], help="Quantize modules matching this glob even if the recipe protects them."),
    layout: str = typer.Option("original", help="original (fused qkv, as ComfyUI and stable-diffusion.cpp name it) or diffusers."),
    components: List[str] = typer.Option([], help="Only this backbone (repeatable)."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    threads: Optional[int] = typer.Option(None, help="Encoder threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of tables."),
):
    """Write one GGUF per backbone, bit-exact with ggml's quantizers."""
    from . import job as api

    m = _run(lambda rep: api.convert_gguf(source, out, qtype=qtype, recipe=recipe, type_rules=type_rule,
                                          protect=protect, no_protect=no_protect, layout=layout,
                                          components=components or None, revision=revision, overwrite=overwrite,
                                          threads=threads, reporter=rep), as_json)
    _print_json(m) if as_json else _summary(m, out)


@app.command()
def inspect(
    source: Optional[str] = typer.Argument(None, help=SOURCE_HELP + " [default: ideogram-ai/ideogram-4-fp8]"),
    recipe: Optional[str] = typer.Option(None, help="Recipe whose plan to show [default: int8-w8a8, or gguf with --type]."),
    qtype: Optional[str] = typer.Option(None, "--type", help="GGUF recipes: base type override."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    components: List[str] = typer.Option([], help="Only this backbone (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Show what a source holds and what a recipe would do to it, with sizes and GPU memory."""
    from .inspect import inspect as api

    report = _run(lambda rep: api(source, recipe, qtype=qtype, revision=revision,
                                  components=components or None), as_json)
    if as_json:
        return _print_json(report)
    src = report["source"]
    out_console.print(f"[bold]{src.get('repo_id') or src.get('path')}[/bold]"
                      + (f" @ {src['commit']}" if src.get("commit") else ""))
    out_console.print(f"recipe [bold]{report['recipe']['name']}[/bold]: {report['recipe']['description']}")
    t = Table()
    for col in ("component", "params", "source dtypes", "quantized/kept", "size now", "size after"):
        t.add_column(col, justify="left" if col in ("component", "source dtypes") else "right")
    for name, c in report["components"].items():
        params = f"{c['params'] / 1e9:.2f} B" if c["params"] > 1e8 else f"{c['params'] / 1e6:.1f} M"
        t.add_row(f"{name}\n({c['layout']} layout)", params, "\n".join(c["dtypes"]),
                  f"{c['quantized']}/{c['kept']}", _fmt_bytes(c["bytes_in"]), _fmt_bytes(c["bytes_out"]))
    out_console.print(t)
    d = Table(title="what the recipe does", title_justify="left")
    for col in ("output dtype", "tensors", "bytes", "why"):
        d.add_column(col)
    for row in report["decisions"]:
        d.add_row(row["dtype"], str(row["tensors"]), _fmt_bytes(row["bytes"]), row["reason"])
    out_console.print(d)
    g = report["gpu"]
    verdict = "[green]fits[/green]" if g["fits"] else "[red]does not fit[/red]"
    out_console.print(f"GPU weights for both backbones: {g['weights_gib']:.2f} GiB, estimated peak "
                      f"{g['estimated_peak_gib']:.2f} GiB ({g['note']}) → {verdict} in {GPU_BUDGET_GB} GB")
    if not g["fits"]:
        verdict = "[green]fits[/green]" if g["fits_with_offload"] else "[red]does not fit[/red]"
        out_console.print(f"one backbone at a time (pipe.enable_model_cpu_offload()): "
                          f"{g['offload_peak_gib']:.2f} GiB → {verdict}")


@app.command()
def recipes(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the built-in recipes."""
    from .recipe import list_recipes

    rs = [r.to_dict() for r in list_recipes()]
    if as_json:
        return _print_json(rs)
    t = Table(show_lines=True)
    for col in ("name", "format", "protects", "description"):
        t.add_column(col)
    for r in rs:
        extra = f"\ntype {r['type']}" + "".join(f"\n{k} → {v}" for k, v in r.get("rules", {}).items()) \
            if r["format"] == "gguf" else ""
        t.add_row(r["name"], r["format"] + extra, "\n".join(r["protect"]) or "-", r["description"])
    out_console.print(t)


@app.command()
def demo(
    out: Path = typer.Option(Path("ideoquant-demo"), "--out", "-o", help="Working folder (replaced on each run)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Run the whole job offline on a tiny Ideogram 4 that ideoquant builds itself."""
    _quiet_diffusers()
    from .demo import run_demo

    report = _run(lambda rep: run_demo(out, reporter=rep), as_json)
    if as_json:
        return _print_json(report)
    t = Table(title=f"tiny Ideogram 4 ({report['params']:,} params per backbone) → {out}", title_justify="left")
    for col in ("variant", "files", "size", "vs source", "velocity SQNR", "cosine"):
        t.add_column(col, justify="left" if col in ("variant", "files") else "right")
    for v in report["variants"]:
        sq = v["sqnr_db"]
        t.add_row(v["name"], v["files"], _fmt_bytes(v["bytes"]), f"{v['ratio']:.2f}x",
                  "exact" if sq is None else f"{sq:.1f} dB", f"{v['cosine']:.5f}")
    out_console.print(t)
    out_console.print("velocity SQNR: the quantized backbones' outputs against the source's, both backbones, "
                      "same inputs. Next: `ideoquant convert` on the real model (see README).")


@app.command()
def verify(
    folder: Path = typer.Argument(..., help="An ideoquant output folder."),
    load: bool = typer.Option(True, help="Also load each component."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Check an output folder against its manifest: files, hashes, loadability, recipe. Exit 1 when something is wrong."""
    _quiet_diffusers()
    from .verify import verify as api

    result = _run(lambda rep: api(folder, load=load), True)
    if as_json:
        _print_json(result.to_dict())
    else:
        for c in result.checks:
            out_console.print(f"[green]ok[/green]   {c}", highlight=False)
        for p in result.problems:
            out_console.print(f"[red]FAIL[/red] {p}", highlight=False)
        out_console.print("[green]verified[/green]" if result.ok else f"[red]{len(result.problems)} problem(s)[/red]")
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def upload(
    folder: Path = typer.Argument(..., help="An ideoquant output folder (verified before anything is sent)."),
    repo_id: str = typer.Option(..., "--repo-id", help="ORG/NAME on the Hub."),
    private: bool = typer.Option(False, help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, help="Branch to commit to (created if missing)."),
    create_pr: bool = typer.Option(False, help="Open a pull request instead of committing to the branch."),
    commit_message: Optional[str] = typer.Option(None, help="Commit message."),
    keep_card: bool = typer.Option(False, help="Keep the folder's own README.md instead of writing a model card."),
    dry_run: bool = typer.Option(False, help="Show files and the model card; send nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Upload an output folder to the Hub in one commit, with a model card. Token: HF_TOKEN or `hf auth login`."""
    _quiet_diffusers()
    from .hub import upload as api

    result = _run(lambda rep: api(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                                  commit_message=commit_message, dry_run=dry_run, keep_card=keep_card,
                                  progress=not as_json), as_json)
    if as_json:
        return _print_json(result)
    t = Table(title=("dry run: would upload" if dry_run else "uploaded") + f" to {repo_id}", title_justify="left")
    t.add_column("file")
    t.add_column("size", justify="right")
    for f in result["files"]:
        t.add_row(f["path"], _fmt_bytes(f["size"]))
    out_console.print(t)
    if dry_run:
        out_console.rule("README.md")
        out_console.print(result["card"], markup=False, highlight=False)
    else:
        out_console.print(result.get("pr_url") or result.get("commit_url") or "")


# ---------------------------------------------------------------- eval, capture, sensitivity, calibrate


def _run_steps(fn, as_json: bool):
    """Like `_run`, with a progress bar that counts forward passes instead of bytes."""
    from rich.progress import MofNCompleteColumn

    progress = Progress(TextColumn("[bold]{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=as_json)
    return _run(fn, as_json, progress)


def _db(x) -> str:
    return "exact" if x is None else f"{x:.1f} dB"


def _sample_note(inputs: dict) -> str:
    if inputs.get("kind") == "captured":
        return f"captured inputs {inputs.get('path')} ({inputs.get('calls')})"
    return (f"{inputs['steps']} sample steps, {inputs['tokens']} text tokens + {inputs['grid'][0]}x{inputs['grid'][1]} "
            f"image tokens, batch {inputs['batch']}")


@app.command("eval")
def eval_(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    quantized: Optional[List[Path]] = typer.Argument(None, help="INT8 output folders and/or .gguf files "
                                                     "(or folders of them)."),
    baselines: str = typer.Option("fp8,nf4,w8a8", help="Baselines built from the source weights (comma-separated "
                                  "fp8, nf4, w8a8), or 'none'."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs recorded by `ideoquant capture`."),
    steps: int = typer.Option(4, help="Sample inputs: denoising steps (timesteps)."),
    tokens: int = typer.Option(64, help="Sample inputs: text tokens."),
    grid: int = typer.Option(16, help="Sample inputs: image grid side (grid x grid image tokens)."),
    batch: int = typer.Option(2, help="Sample inputs: prompts per step."),
    guidance: float = typer.Option(7.0, help="g in g * v_cond + (1 - g) * v_uncond."),
    layer_rows: int = typer.Option(64, help="Rows per layer and step kept from the source for per-layer SQNR."),
    components: List[str] = typer.Option([], help="Only this backbone (repeatable)."),
    device: str = typer.Option("cpu", help="cpu, or cuda (the way to run it on the real model)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of per-layer SQNR per variant."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit of SOURCE."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Compare quantized backbones (and FP8 / NF4 / unprotected W8A8 baselines) with the source on the same inputs."""
    _quiet_diffusers()
    from . import evaluate as api

    names = [] if baselines.strip().lower() in ("", "none") else [b for b in baselines.split(",") if b.strip()]
    report = _run_steps(lambda rep: api.evaluate(
        source, quantized or [], baselines=names, components=components or None, inputs=inputs, steps=steps,
        tokens=tokens, grid=grid, batch=batch, guidance=guidance, layer_rows=layer_rows, device=device,
        revision=revision, reporter=rep), as_json)
    if plot:
        api.plot(report, plot)
    if as_json:
        return _print_json(report)
    t = Table(title=f"eval against {source} ({_sample_note(report['inputs'])})", title_justify="left")
    for col in ("variant", "backbone", "SQNR", "cosine", "rel. err", f"guided (g={report['guidance']:g})",
                "weights", "worst layer"):
        t.add_column(col, justify="left" if col in ("variant", "backbone", "worst layer") else "right",
                     overflow="fold", no_wrap=col not in ("variant", "worst layer"))
    short = {"transformer": "cond", "unconditional_transformer": "uncond"}
    for v in report["variants"]:
        for i, (c, x) in enumerate(v["components"].items()):
            g = v["guided"]
            t.add_row(v["name"] if i == 0 else "", short.get(c, c), _db(x["sqnr_db"]), f"{x['cosine']:.6f}",
                      f"{x['rel_error']:.4f}", (_db(g["sqnr_db"]) if g else "-") if i == 0 else "",
                      f"{_fmt_bytes(x['weight_bytes'])} {x['weight_ratio']:.2f}x",
                      f"{x['worst_layer']} {_db(x['worst_layer_sqnr_db'])}" if x["worst_layer"] else "-")
        t.add_section()
    out_console.print(t)
    out_console.print("SQNR / cosine / rel. err: velocity on the image tokens against the source's (cond: transformer, "
                      "uncond: unconditional_transformer); guided: g * v_cond + (1 - g) * v_uncond; weights: bytes as "
                      "stored, and against the source's bf16; worst layer: lowest SQNR of a layer's output on the "
                      "source's layer input (its own error)."
                      + (f"\nplot: {plot}" if plot else ""), highlight=False)


@app.command()
def capture(
    model: str = typer.Argument(..., help="An Ideogram 4 pipeline (Hub repo id or folder) with its text encoder."),
    out: Path = typer.Option(Path("captured.safetensors"), "--out", "-o", help="Where to save the inputs."),
    prompt: List[str] = typer.Option(["a red fox in fresh snow, photograph"], help="Prompt (repeatable)."),
    height: int = typer.Option(512, help="Image height (small keeps the file small)."),
    width: int = typer.Option(512, help="Image width."),
    steps: int = typer.Option(4, help="Denoising steps: one call of each backbone per step."),
    max_sequence_length: int = typer.Option(256, help="Text tokens."),
    guidance_scale: float = typer.Option(7.0, help="Guidance scale of the run."),
    seed: int = typer.Option(0, help="Seed of the initial latents."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    offload: bool = typer.Option(False, help="enable_model_cpu_offload() instead of moving the pipeline to --device."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Run the real pipeline once and record every backbone call's inputs, for eval/sensitivity/calibrate --inputs."""
    _quiet_diffusers()
    from .evaluate import capture_pipeline

    info = _run_steps(lambda rep: capture_pipeline(model, out, prompts=prompt, height=height, width=width, steps=steps,
                                                   max_sequence_length=max_sequence_length,
                                                   guidance_scale=guidance_scale, seed=seed, device=device,
                                                   offload=offload, revision=revision), as_json)
    if as_json:
        return _print_json(info)
    out_console.print(f"captured {info['calls']} calls → {out} ({_fmt_bytes(info['bytes'])})", highlight=False)


@app.command()
def sensitivity(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    recipe: str = typer.Option("int8-w8a8", help="Recipe whose scheme to measure (int8: W8A8; gguf: its type)."),
    qtype: Optional[str] = typer.Option(None, "--type", help="GGUF recipes: base type override (q8_0, q4_k, ...)."),
    group: bool = typer.Option(False, "--group", help="Quantize one group at a time (every w2, every to_q, ...)."),
    components: List[str] = typer.Option([], help="Only this backbone (repeatable)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs recorded by `ideoquant capture`."),
    steps: int = typer.Option(2, help="Sample inputs: denoising steps."),
    tokens: int = typer.Option(64, help="Sample inputs: text tokens."),
    grid: int = typer.Option(16, help="Sample inputs: image grid side."),
    batch: int = typer.Option(2, help="Sample inputs: prompts per step."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="GGUF encoder threads."),
    top: int = typer.Option(25, help="Rows of the ranking to show."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the ranking."),
    write_recipe: Optional[Path] = typer.Option(None, "--write-recipe", help="Write a recipe TOML protecting the most "
                                                "fragile (needs --protect-top or --budget-gb)."),
    protect_top: Optional[int] = typer.Option(None, "--protect-top", help="Protect the K most fragile."),
    budget_gb: Optional[float] = typer.Option(None, "--budget-gb", help="Protect the most fragile while their extra "
                                              "bf16 bytes fit in X GB."),
    name: Optional[str] = typer.Option(None, help="Name of the written recipe (default: the file's stem)."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Rank linear layers (or groups) by the end-to-end SQNR lost when only that one is quantized."""
    _quiet_diffusers()
    from . import sensitivity as api

    if write_recipe and (protect_top is None) == (budget_gb is None):
        console.print("[red]error:[/red] --write-recipe needs exactly one of --protect-top K and --budget-gb X")
        raise typer.Exit(2)
    report = _run_steps(lambda rep: api.sensitivity(
        source, recipe, qtype=qtype, group=group, components=components or None, inputs=inputs, steps=steps,
        tokens=tokens, grid=grid, batch=batch, device=device, threads=threads, revision=revision, reporter=rep), as_json)
    written = None
    if write_recipe:
        try:
            written = api.write_recipe(report, write_recipe, protect_top=protect_top, budget_gb=budget_gb, name=name)
        except IdeoquantError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(2)
        report["written_recipe"] = {"path": str(write_recipe), "name": written.name, "protect": list(written.protect)}
    if plot:
        api.plot(report, plot)
    if as_json:
        return _print_json(report)
    t = Table(title=f"sensitivity under {report['recipe']['name']}: {report['scheme']}", title_justify="left")
    short = {"transformer": "cond", "unconditional_transformer": "uncond"}
    for col in ("rank", "group" if group else "layer", "type", *[short.get(c, c) for c in report["components"]],
                "noise", "+bf16", "protected"):
        t.add_column(col, justify="left" if col in ("group", "layer", "type") else "right",
                     overflow="fold" if col in ("group", "layer") else "ellipsis",
                     no_wrap=col not in ("group", "layer"))
    for u in report["units"][:top]:
        t.add_row(str(u["rank"]), u["unit"], ",".join(u["types"]),
                  *[_db(u["sqnr_db"].get(c)) for c in report["components"]],
                  f"{u['noise_share']:.1%}", _fmt_bytes(u["extra_bytes"]), "yes" if u["protected_by_recipe"] else "")
    out_console.print(t)
    out_console.print(f"cond / uncond: end-to-end velocity SQNR of transformer / unconditional_transformer with only "
                      f"that {'group' if group else 'layer'} quantized ({_sample_note(report['inputs'])}); lower = "
                      "more fragile. noise: share of the summed error; +bf16: extra bytes to keep it in bf16 (both "
                      "backbones); protected: by the recipe already." + (f"\nplot: {plot}" if plot else ""),
                      highlight=False)
    if written:
        out_console.print(f"recipe [bold]{written.name}[/bold] → {write_recipe}: protects "
                          f"{', '.join(written.protect) or 'nothing'}", highlight=False)


@app.command()
def calibrate(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Statistics file (.safetensors) for `convert --smoothquant`."),
    recipe: str = typer.Option("int8-w8a8", help="INT8 recipe: statistics for every linear it quantizes."),
    protect: List[str] = typer.Option([], help="Also keep modules matching this glob in bf16."),
    no_protect: List[str] = typer.Option([], help="Quantize modules matching this glob even if the recipe protects them."),
    components: List[str] = typer.Option([], help="Only this backbone (repeatable)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs recorded by `ideoquant capture`."),
    steps: int = typer.Option(4, help="Sample inputs: denoising steps."),
    tokens: int = typer.Option(64, help="Sample inputs: text tokens."),
    grid: int = typer.Option(16, help="Sample inputs: image grid side."),
    batch: int = typer.Option(2, help="Sample inputs: prompts per step."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Record SmoothQuant statistics (per-input-channel activation absmax of every quantized linear)."""
    _quiet_diffusers()
    from .smoothquant import calibrate as api

    res = _run_steps(lambda rep: api(source, out, recipe=recipe, protect=protect, no_protect=no_protect,
                                     components=components or None, inputs=inputs, steps=steps, tokens=tokens,
                                     grid=grid, batch=batch, device=device, revision=revision, reporter=rep), as_json)
    if as_json:
        return _print_json(res)
    t = Table(title=f"SmoothQuant statistics → {out} ({_sample_note(res['provenance']['inputs'])})",
              title_justify="left")
    outliers = "strongest outlier channels (max / median |x|)"
    for col in ("component", "linears", "calls", "rows", outliers):
        t.add_column(col, justify="left" if col in ("component", outliers) else "right")
    for c, s in res["components"].items():
        t.add_row(c, str(s["modules"]), str(s["calls"]), str(s["rows"]),
                  ", ".join(f"{n} {r:.0f}x" for n, r in list(s["outlier_ratio"].items())[:3]))
    out_console.print(t)
    out_console.print(f"next: ideoquant convert {source} --smoothquant {out} --alpha 0.5", highlight=False)


def main() -> None:
    _quiet()
    try:
        app()
    finally:
        # The process ends here. Python's shutdown would walk every object torch, torchao and numba created
        # (~1 s after a conversion, measured); frozen, they are left to the exit. Output is complete by now.
        gc.freeze()


if __name__ == "__main__":
    main()
