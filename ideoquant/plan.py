"""Plan: the recipe resolved per tensor, before any data is read.

`inspect`, the free-disk check, the memory estimate and the progress totals all come from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from . import model
from .errors import IdeoquantError
from .recipe import Recipe
from .source import Component, SourceTensor

GGUF_QTYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")
GGUF_PLAIN = {"F32": 4, "BF16": 2, "F16": 2}
# A K-quant needs rows that are a multiple of 256; Q8_0 needs 32. Fall back to the next type that fits.
FALLBACK = {"Q4_K": "Q8_0", "Q5_K": "Q8_0", "Q6_K": "Q8_0", "Q8_0": "BF16"}
PROTECTED_DTYPE = "BF16"  # protected linear weights, in both formats
OTHER_GGUF_DTYPE = "F32"  # norms, biases, the image-indicator embedding (small; F32 as ComfyUI-GGUF keeps them)


def ggml_block(qtype: str) -> tuple[int, int]:
    """(elements per block, bytes per block) from gguf-py's table."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


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
    format: str  # "int8" or "gguf"
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


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _protected(component: Component, recipe: Recipe) -> dict[str, str]:
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


def plan_int8(component: Component, recipe: Recipe) -> ComponentPlan:
    if recipe.format != "int8":
        raise IdeoquantError(f"recipe '{recipe.name}' is a {recipe.format} recipe; use it with `ideoquant {recipe.format}`")
    spec = component.spec
    protected = _protected(component, recipe)
    tensors = []
    for name, src in component.tensors.items():
        module = model.module_of(name)
        if spec.is_linear_weight(name) and module not in protected:
            rows, cols = src.shape
            tensors.append(TensorPlan(name, (src,), src.shape, True, "int8", "linear weight: int8 per-channel",
                                      rows * cols + rows * 4 + rows))
        elif spec.is_linear_weight(name):
            tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                      f"protected by recipe pattern '{protected[module]}'",
                                      _numel(src.shape) * 2, protected[module]))
        else:
            tensors.append(TensorPlan(name, (src,), src.shape, False, PROTECTED_DTYPE,
                                      "not a linear weight (norm, bias or embedding)", _numel(src.shape) * 2))
    return ComponentPlan(component, "int8", "diffusers", tensors, sorted(protected))


def plan_gguf(component: Component, recipe: Recipe, layout: str = "original") -> ComponentPlan:
    if recipe.format != "gguf":
        raise IdeoquantError(f"recipe '{recipe.name}' is an {recipe.format} recipe; use it with `ideoquant {recipe.format}`")
    if layout not in ("original", "diffusers"):
        raise IdeoquantError(f"unknown layout '{layout}': choose original or diffusers")
    for qtype in [recipe.type, *(t for _, t in recipe.rules)]:
        if qtype not in GGUF_QTYPES:
            raise IdeoquantError(f"unknown GGUF type '{qtype}': choose from {', '.join(q.lower() for q in GGUF_QTYPES)}")
    spec = component.spec
    protected = _protected(component, recipe)
    groups: dict[str, list[SourceTensor]] = {}
    for name, src in component.tensors.items():
        out = model.diffusers_to_original(name)[0] if layout == "original" else name
        groups.setdefault(out, []).append(src)
    tensors = []
    for out, srcs in groups.items():
        shape = (sum(s.shape[0] for s in srcs), *srcs[0].shape[1:])
        names = [s.name for s in srcs]
        if not spec.is_linear_weight(names[0]):
            tensors.append(TensorPlan(out, tuple(srcs), shape, False, OTHER_GGUF_DTYPE,
                                      "not a linear weight (norm, bias or embedding)", _numel(shape) * 4))
            continue
        hit = [protected[model.module_of(n)] for n in names if model.module_of(n) in protected]
        if hit:
            tensors.append(TensorPlan(out, tuple(srcs), shape, False, PROTECTED_DTYPE,
                                      f"protected by recipe pattern '{hit[0]}'", _numel(shape) * 2, hit[0]))
            continue
        qtype, why = recipe.type_for(out, *names)
        wanted = qtype
        while qtype in FALLBACK and shape[-1] % ggml_block(qtype)[0]:
            qtype = FALLBACK[qtype]
        if qtype != wanted:
            why += f"; rows of {shape[-1]} are not a multiple of {ggml_block(wanted)[0]}, so {qtype}"
        if qtype in GGUF_PLAIN:
            nbytes = _numel(shape) * GGUF_PLAIN[qtype]
        else:
            block, size = ggml_block(qtype)
            nbytes = _numel(shape) // block * size
        tensors.append(TensorPlan(out, tuple(srcs), shape, qtype not in GGUF_PLAIN, qtype, why, nbytes))
    return ComponentPlan(component, "gguf", layout, tensors, sorted(protected))
