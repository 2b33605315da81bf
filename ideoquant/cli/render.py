"""How the CLI shows things: Rich progress bars for the library's reports, tables, JSON, and the one error format.

Progress and errors go to stderr; results (tables, JSON) to stdout.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from ..progress import Reporter
from ..write.staging import human_bytes  # noqa: F401  (the one byte formatter, re-used here)

console = Console(stderr=True)
out_console = Console()


class RichReporter(Reporter):
    """The library's progress reports as Rich bars (bytes with speed and ETA, or counted steps)."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def start(self, task, total):
        self.tasks[task] = self.progress.add_task(task, total=total)

    def advance(self, task, n):
        self.progress.advance(self.tasks[task], n)

    def finish(self, task):
        t = self.tasks[task]
        self.progress.update(t, completed=self.progress.tasks[t].total)


def byte_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description:<26}"), BarColumn(), DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, disable=not enabled)


def step_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    disable=not enabled)


def with_progress(fn, as_json: bool, steps: bool = False):
    """fn(reporter) under a progress display (none with --json). Errors propagate to the app's one formatter."""
    with (step_progress if steps else byte_progress)(not as_json) as p:
        try:
            return fn(RichReporter(p))
        except BaseException:
            p.live.transient = True  # a failed run leaves no half-full bars: its one error line says it all
            raise


def error(message: str, as_json: bool, code: int) -> None:
    """The one error format: `error: ...` on one line on stderr, or a JSON object on stdout with --json."""
    message = " ".join(str(message).split())  # one line, whatever the message held
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "exit_code": code}) + "\n")
    else:
        console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def db(x) -> str:
    return "exact" if x is None else f"{x:.1f} dB"


def sample_note(inputs: dict) -> str:
    if inputs.get("kind") == "captured":
        return f"captured inputs {inputs.get('path')} ({inputs.get('calls')})"
    return (f"{inputs['steps']} sample steps, {inputs['tokens']} text tokens + {inputs['grid'][0]}x{inputs['grid'][1]} "
            f"image tokens, batch {inputs['batch']}")
