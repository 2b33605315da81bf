"""`ideoquant`: a thin Typer layer over the Python API, rendered with Rich."""

from __future__ import annotations

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
    """Third-party import chatter (torchao's optional kernels, torch's pytree notices) is not for our users."""
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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


def _run(fn, as_json: bool):
    """Call the API with progress; turn user errors into one line and exit code 2."""
    try:
        with _progress(not as_json) as progress:
            return fn(RichReporter(progress))
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
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of tables."),
):
    """Quantize both backbones to INT8 W8A8 (torchao format: stock diffusers loads it)."""
    from . import job as api

    m = _run(lambda rep: api.convert(source, out, recipe=recipe, protect=protect, no_protect=no_protect,
                                     components=components or None, revision=revision, overwrite=overwrite,
                                     device=device, max_shard_size=max_shard_size, reporter=rep), as_json)
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


def main() -> None:
    _quiet()
    app()


if __name__ == "__main__":
    main()
