"""`ideoquant`: a thin Typer layer over the Python API, one module per command group (as huggingface_hub's `hf`).

`app.py` holds the application, its global options and the one exception formatter; `options.py` the shared typed
options; `render.py` progress, tables and JSON; the other modules one command group each.
"""

from . import bench, convert, demo, evaluation, inspect, publish, webapp  # noqa: F401  (each registers its commands)
from .app import app, main

__all__ = ["app", "main"]
