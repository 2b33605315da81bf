"""`ideoquant app`: the browser app (needs the `app` extra: `pip install "ideoquant[app]"`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import IdeoquantError
from .app import app
from .options import Threads


@app.command("app")
def serve(
    port: Annotated[Optional[int], typer.Option("--port", min=1, max=65535, metavar="N",
                                                help="Port to serve on [default: Gradio's, 7860 or the next free one].",
                                                show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", metavar="ADDR",
                                      help="Address to listen on (0.0.0.0 exposes the page to your network).")]
    = "127.0.0.1",
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", metavar="PATH",
                                                     help="Where jobs write their outputs (removed after each job) "
                                                     "[default: the temp folder].", show_default=False)] = None,
    disk_budget: Annotated[Optional[str], typer.Option("--disk-budget", metavar="SIZE",
                                                       help="At most this much disk per job (download + outputs), "
                                                       "e.g. 45GB, besides the disk's free space.",
                                                       show_default=False)] = None,
    time_limit: Annotated[float, typer.Option(
        "--time-limit", metavar="SECONDS", min=1, help="Stop a job that runs longer (cleanly, as Cancel does).")]
    = 4 * 3600,
    threads: Threads = None,
):
    """Serve the browser app: sign in, pick a source repo and outputs, convert, verify and upload in one commit."""
    try:
        from ..webapp.page import launch
    except ImportError as e:
        raise IdeoquantError(f"the app needs the `app` extra (pip install \"ideoquant[app]\"): {e}") from None
    from ..write.safetensors import parse_size

    budget = parse_size(disk_budget, "--disk-budget") if disk_budget is not None else None
    launch(host=host, port=port, work_dir=work_dir, disk_budget=budget, time_limit=time_limit, threads=threads)
