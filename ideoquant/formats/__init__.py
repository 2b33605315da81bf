"""Output formats as plug-ins, registered by name.

Each module holds everything one format knows: its plan rules (which tensors become what), its block encoder and
sink (how a component is written), its verify hooks (what a finished folder must hold) and its model-card text.
The job, `verify`, the card and `inspect` ask the registry; none of them tests a format's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol

from ..errors import IdeoquantError
from ..progress import Reporter

from .catalog import FORMATS as NAMES

# name -> module; modules are imported on first use (each pulls in torch and its encoder).
_MODULES = {name: f".{name}" for name in NAMES}
BLOCK_ELEMENTS = 1 << 20  # rows read, encoded and written at a time: bounds memory, keeps caches warm


@dataclass
class Sink:
    """What a format's `write_component` writes with: the staging folder, the job's worker pool and hasher, the
    progress reporter, the source and the format's own options."""

    staging: Path
    pool: Any  # workers.Pool
    hasher: Any  # write.hashing.Hasher
    reporter: Reporter
    source: Any  # source.Source
    recipe: Any  # recipe.Recipe
    options: Any  # the format's own options object
    block_elements: int = BLOCK_ELEMENTS  # elements per row block: the unit of reading, encoding and memory
    prefix: str = ""  # where this output sits in the job's folder ("Q4_K_M/" when one pass writes several)

    def key(self, rel: str) -> str:
        """The hasher key of a file of this output (its path in the job's folder)."""
        return self.prefix + rel


class Format(Protocol):
    name: str

    def plan(self, component, recipe, layout: str): ...  # -> plan.ComponentPlan

    def write_component(self, plan, sink: Sink) -> tuple[list[dict], list[str]]: ...  # (tensor records, files)

    # Optional: several outputs of one component from one read of the source (GGUF: one per type).
    # def write_components(self, jobs: list[tuple[plan, Sink]]) -> list[tuple[list[dict], list[str]]]: ...

    def check_stored(self, folder: Path, name: str, comp: dict, manifest: dict) -> tuple[list[str], list[str]]: ...

    def load_target(self, folder: Path, name: str, comp: dict) -> Path: ...

    def check_loaded(self, folder: Path, comp: dict, model) -> list[str]: ...

    def card(self, manifest: dict) -> "CardText": ...


@dataclass
class CardText:
    """A format's part of the model card."""

    what: str  # "INT8 W8A8 (torchao)", "GGUF Q4_K"
    tags: list[str]
    library_name: str | None
    recipe_lines: list[str]
    usage: str  # markdown: how to load it


def get(name: str) -> Format:
    if name not in _MODULES:
        raise IdeoquantError(f"unknown output format '{name}' (known: {', '.join(NAMES)})")
    return import_module(_MODULES[name], __name__).FORMAT
