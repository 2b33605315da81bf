"""How the CLI shows things: Rich progress bars for the library's reports, tables, JSON, and the one error format.

Progress and errors go to stderr; results (tables, JSON) to stdout.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from ..progress import Reporter
from ..formatting import db, human_bytes  # noqa: F401  the one formatter of each, for every command

# The base pipeline (text encoder, tokenizer, VAE, scheduler); the same names as ideoquant.load, which this module
# does not import (it pulls in torch).
DEFAULT_BASE = "ideogram-ai/ideogram-4-nf4-diffusers"
BASE_HELP = (f"Diffusers-layout Ideogram 4 pipeline for the text encoder, tokenizer, VAE and scheduler [default: "
             f"{DEFAULT_BASE}: its text encoder is NF4, so bitsandbytes on CUDA; or a bf16 diffusers repack such as "
             "CalamitousFelicitousness/Ideogram-4-bf16-Diffusers].")

console = Console(stderr=True)
out_console = Console()


class RichReporter(Reporter):
    """The library's progress reports as Rich bars (bytes with speed and ETA, or counted steps)."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def start(self, task, total):
        if not self.tasks:  # the display starts with the first task: a run refused before any work shows no bars
            self.progress.start()
        self.tasks[task] = self.progress.add_task(task, total=total)

    def advance(self, task, n):
        self.progress.advance(self.tasks[task], n)

    def finish(self, task):
        t = self.tasks[task]
        self.progress.update(t, completed=self.progress.tasks[t].total)


class BinarySpeedColumn(ProgressColumn):
    """Bytes per second in the units of the tables (KiB/s, MiB/s); rich's TransferSpeedColumn is decimal (MB/s)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{human_bytes(speed)}/s", style="progress.data.speed")


def byte_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description:<36}"), BarColumn(), DownloadColumn(binary_units=True),
                    BinarySpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, disable=not enabled)


def duration(seconds: float, nbytes: int | None = None) -> str:
    """`1.2 s`, with the rate when bytes are given (`0.1 s, 2.08 GiB/s`): a fast backbone reads as fast, not wrong."""
    text = f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds * 1000:.0f} ms"
    return text + (f", {human_bytes(nbytes / seconds)}/s" if nbytes and seconds > 0 else "")


def print_warnings(m: dict) -> None:
    """A manifest's `warnings`, one line each on stderr."""
    for w in m.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)


def step_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    disable=not enabled)


def with_progress(fn, as_json: bool, steps: bool = False):
    """fn(reporter) under a progress display (none with --json). Errors propagate to the app's one formatter."""
    p = (step_progress if steps else byte_progress)(not as_json)
    reporter = RichReporter(p)
    try:
        result = fn(reporter)
    except BaseException:
        if reporter.tasks:  # a failed run leaves no half-full bars (nor Rich's closing blank line): one error line
            p.live.transient = True
            p.live.stop()
        raise
    if reporter.tasks:
        p.stop()
    return result


def error(message: str, as_json: bool, code: int) -> None:
    """The one error format: `error: ...` on one line on stderr, or a JSON object on stdout with --json."""
    message = " ".join(str(message).split())  # one line, whatever the message held
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "exit_code": code}) + "\n")
    else:
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True, markup=True)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def sample_note(inputs: dict) -> str:
    if inputs.get("kind") == "captured":
        return f"captured inputs {inputs.get('path')} ({inputs.get('calls')})"
    return (f"{inputs['steps']} sample steps, {inputs['tokens']} text tokens + {inputs['grid'][0]}x{inputs['grid'][1]} "
            f"image tokens, batch {inputs['batch']}")
