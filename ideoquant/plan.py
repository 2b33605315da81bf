"""Plan: the recipe resolved per tensor, before any data is read.

The data types here are shared by every format; each format's own rules (`formats/<name>.py`) fill them in.
`inspect`, the free-disk check, the memory estimate and the progress totals all come from a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from . import model
from .recipe import Recipe
from .source import Component, SourceTensor

PROTECTED_DTYPE = "BF16"  # protected linear weights, in every format


@dataclass
class TensorPlan:
    name: str  # name in the output
    sources: tuple[SourceTensor, ...]  # one, or the q/k/v row blocks of a fused tensor
    shape: tuple[int, ...]
    quantize: bool
    dtype: str  # output: "int8", "BF16", "F32", "Q4_K", ...
    reason: str
    bytes_out: int
    protected_by: str | None = None

    @property
    def bytes_in(self) -> int:
        return sum(s.nbytes for s in self.sources)

    @property
    def source_dtype(self) -> str:
        return self.sources[0].dtype


@dataclass
class ComponentPlan:
    component: Component
    format: str  # a name in the `formats` registry
    layout: str  # names in the output: "diffusers" or "original"
    tensors: list[TensorPlan]
    protected: list[str] = field(default_factory=list)  # module names kept in high precision

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)

    @property
    def largest_tensor_bytes(self) -> int:
        return max(t.bytes_in for t in self.tensors)


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def protected_modules(component: Component, recipe: Recipe) -> dict[str, str]:
    """Protected linear module -> the pattern that protects it. Patterns also match original-layout aliases."""
    modules = sorted(component.spec.linear_modules)
    aliases = {m: model.module_of(model.diffusers_to_original(m + ".weight")[0]) for m in modules}
    names = modules + sorted(set(aliases.values()) - set(modules))
    # Validates every pattern against the model (a pattern matching nothing is an error).
    hits = set(recipe.protected_modules(names))
    out = {}
    for m in modules:
        if m in hits or aliases[m] in hits:
            out[m] = next((p for p in recipe.protect if fnmatchcase(m, p) or fnmatchcase(aliases[m], p)), "")
    return out


def row_blocks(tensors: list[TensorPlan], max_elements: int):
    """The one streaming order of a job: (tensor index, source tensor, rows) for every block of about
    max_elements of every source of every planned tensor, in plan order (rows None: a 1-D tensor, read whole)."""
    for i, t in enumerate(tensors):
        for src in t.sources:
            for rows in src.row_ranges(max_elements):
                yield i, src, rows
