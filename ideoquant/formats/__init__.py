"""Output formats as plug-ins, registered by name: the one place that knows which formats exist.

Each format module (`formats/<name>.py`, registered in `catalog.FORMATS`) owns its whole surface behind the typed
`Format` protocol: the recipe keys it accepts, the conversion options it parses, its plan rules, its sink, how it
recognises its own output (for `load`, `verify`, `eval`, `bench`), its in-memory fake-quantizer (for `sensitivity`,
`eval` and `bench`), its rows in `inspect --vram`'s fit table and its model-card text. The job, `verify`, the card,
`inspect`, `load` and the evaluation ask this registry; none of them tests a format's name, and nothing outside
this package imports a concrete format module (an import-linter contract and a test keep it so).

Adding a format: one module with a `FORMAT` object, its name in `catalog.FORMATS`, its recipes in `recipes/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from .. import recipe as recipe_mod
from ..errors import IdeoquantError
from ..progress import Reporter

from .catalog import FORMATS as NAMES

if TYPE_CHECKING:  # the protocol's types; imported lazily so `ideoquant --help` does not load torch
    import torch

    from ..plan import ComponentPlan
    from ..recipe import Recipe
    from ..source import Component, Source
    from ..workers import Pool
    from ..write.hashing import Hasher

# name -> module; modules are imported on first use (each pulls in torch and its encoder).
_MODULES = {name: f".{name}" for name in NAMES}
# Rows read, encoded and written at a time: bounds memory (a few blocks per worker). 4 M elements rather than 1 M
# halves the per-block Python cost (measured, one 9.3 GB backbone: INT8 and Q8_0 2 CPU-s and 2-3 s less; 2 M and
# 8 M do about as well as 4 M), with the same peak memory.
BLOCK_ELEMENTS = 1 << 22


@dataclass
class Sink:
    """What a format's `write_component` writes with: the staging folder, the job's worker pool and hasher, the
    progress reporter, the source and the format's own options."""

    staging: Path
    pool: "Pool"
    hasher: "Hasher"
    reporter: Reporter
    source: "Source"
    recipe: "Recipe"
    options: object  # the format's own options object (`Output.options`), read back by that format only
    block_elements: int = BLOCK_ELEMENTS  # elements per row block: the unit of reading, encoding and memory
    prefix: str = ""  # where this output sits in the job's folder ("Q4_K_M/" when one pass writes several)

    def key(self, rel: str) -> str:
        """The hasher key of a file of this output (its path in the job's folder)."""
        return self.prefix + rel


@dataclass
class Output:
    """One output of a job: a recipe, its plans, the format's options, and where it goes in OUT ("" for OUT itself;
    a subfolder when one pass writes several)."""

    recipe: "Recipe"
    plans: "dict[str, ComponentPlan]"
    options: object = None
    folder: str = ""
    extra: dict | None = None


@dataclass
class Conversion:
    """A format's reading of `convert`'s options: how to plan the outputs once the source is open."""

    recipes: "list[Recipe]"  # the recipe of each output, overrides applied
    outputs: "Callable[[Source], list[Output]]"  # the opened source -> the outputs to write in one pass
    threads: int | None = None  # the pool size the job must use (None: the caller's choice)
    several: bool = False  # the job returns a list of manifests (one per output), not one manifest
    inputs: tuple = ()  # files the conversion reads besides the source (statistics, an imatrix): OUT must spare them


@dataclass
class CardText:
    """A format's part of the model card."""

    what: str  # "INT8 W8A8 (torchao)", "GGUF Q4_K"
    tags: list[str]
    library_name: str | None
    recipe_lines: list[str]
    usage: str  # markdown: how to load it


@dataclass
class FitRow:
    """One row of `inspect --vram`'s table: a label and the recipe whose plan gives its size."""

    label: str  # "int8-w8a8", "q4_k_m"
    recipe: "Recipe"


@dataclass
class Recognised:
    """What a format says about a path it wrote: the backbones there (component -> file or folder to load), and
    the label of the variant (a GGUF type label; "" when the folder names it)."""

    paths: dict[str, Path]
    label: str = ""
    group: Path | None = None  # outputs sharing this folder and label are one variant (GGUF files of one type)


class Format(Protocol):
    name: str  # the registry name; manifests record it as `kind`, recipes as `format`
    command: str  # the CLI command that writes it (`ideoquant convert`, `ideoquant gguf`)
    recipe_keys: frozenset[str]  # recipe TOML keys of this format beyond the common ones

    # ---- recipes and options
    def parse_recipe(self, data: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The format's own keys of a recipe file, validated -> `Recipe` fields (`type`, `rules`)."""

    def check_recipe(self, r: "Recipe") -> None:
        """Refuse a recipe (after command-line overrides) this format cannot write."""

    def conversion(self, recipe: "Recipe | str | None", protect, no_protect, options: dict[str, Any]) -> Conversion:
        """`convert`'s format options, parsed and validated before anything is opened."""

    def scheme(self, r: "Recipe") -> str:
        """One line: what this recipe computes with (sensitivity reports it)."""

    # ---- plan and sink
    def plan(self, component: "Component", recipe: "Recipe", layout: str = ...) -> "ComponentPlan": ...

    def write_component(self, plan: "ComponentPlan", sink: Sink) -> tuple[list[dict], list[str]]:
        """(tensor records, files written) of one component. A format may also define `write_components(jobs)`:
        several outputs of one component from one read of the source (GGUF: one per type)."""

    # ---- its own output
    def recognise(self, path: Path) -> list[Recognised]:
        """What this format wrote at `path` (a component folder, an output folder, a file): one entry per variant
        there (a folder of GGUF files of two types holds two); empty when nothing."""

    def load(self, path: Path, compute_dtype: "torch.dtype") -> "torch.nn.Module":
        """The `Ideogram4Transformer2DModel` of one backbone this format wrote (`recognise`'s path)."""

    def check_stored(self, folder: Path, name: str, comp: dict, manifest: dict) -> tuple[list[str], list[str]]: ...

    def load_target(self, folder: Path, name: str, comp: dict) -> Path: ...

    def check_loaded(self, folder: Path, comp: dict, model: "torch.nn.Module") -> list[str]: ...

    # ---- evaluation, inspect, card
    def fake_quantize(self, model: "torch.nn.Module", types: Mapping[str, str],
                      threads: int | None = None) -> dict[str, "torch.nn.Parameter"]:
        """Quantize the named linears of `model` in place the way this format computes with them (module -> the
        dtype its plan gives the weight); returns the weights replaced (`restore` puts them back)."""

    def fit_rows(self) -> list[FitRow]: ...

    # Optional: `torchao_config()`, the torchao config diffusers applies at load time (torchao formats only);
    # `smoothquant = True` where `calibrate` statistics and `convert --smoothquant` apply (INT8);
    # `runs_on_cpu = False` (and `runs_on`, where it does run) when its output cannot run a forward pass on the CPU.

    def card(self, manifest: dict, repo_id: str, base: str, device: str = ..., call: dict | None = None,
             folder: str = "") -> CardText:
        """The format's part of a model card; `folder`: where in the repo the output lies ("" for its root)."""


def get(name: str) -> Format:
    if name not in _MODULES:
        raise IdeoquantError(f"unknown output format '{name}' (known: {', '.join(NAMES)})")
    return import_module(_MODULES[name], __name__).FORMAT


def every() -> list[Format]:
    return [get(n) for n in NAMES]


# ---------------------------------------------------------------- recipes


def load_recipe(name_or_path: "str | Path | Recipe") -> "Recipe":
    """A recipe by name (from the packaged `recipes/`) or by path to a TOML file; its format parses its own keys."""
    if isinstance(name_or_path, recipe_mod.Recipe):
        return name_or_path
    data, path, common = recipe_mod.read_recipe(name_or_path)
    fmt = data["format"]
    if fmt not in _MODULES:
        raise IdeoquantError(f"recipe {path.name}: format must be one of {', '.join(NAMES)}, not '{fmt}'")
    f = get(fmt)
    unknown = set(data) - recipe_mod.COMMON_KEYS - f.recipe_keys
    if unknown:
        raise IdeoquantError(f"recipe {path.name}: unknown key(s) {', '.join(sorted(unknown))} for {fmt} recipes "
                             f"(allowed: {', '.join(sorted(recipe_mod.COMMON_KEYS | f.recipe_keys))})")
    own = {k: v for k, v in data.items() if k in f.recipe_keys}
    return recipe_mod.Recipe(**common, **f.parse_recipe(own, path.name))


def resolve(recipe: "str | Path | Recipe", protect=(), no_protect=(), qtype=None, type_rules=()) -> "Recipe":
    """A recipe (by name, path or object) with the command line's overrides applied (`--protect`, `--no-protect`,
    `--type`, `--type-rule REGEX=TYPE`), checked by its format."""
    r = recipe_mod.apply_overrides(load_recipe(recipe), protect, no_protect, qtype, type_rules)
    get(r.format).check_recipe(r)
    return r


def list_recipes() -> "list[Recipe]":
    return [load_recipe(p) for p in recipe_mod.recipe_files()]


def of(recipe: "str | Path | Recipe | None", default: str | None = None) -> Format:
    """The format a recipe writes; `default` names the format whose own default recipe applies when None."""
    if recipe is None:
        return get(default or NAMES[0])
    return get(load_recipe(recipe).format)


# ---------------------------------------------------------------- an output's own files


def recognise(path: str | Path) -> list[tuple[Format, Recognised]]:
    """Every output a format recognises as its own at `path` (an output folder, a component folder or a file):
    what `load`, `verify`, `eval` and `bench` read. Empty when `path` holds none."""
    path = Path(path)
    return [(f, found) for f in every() for found in f.recognise(path)]


def take_options(fmt: Format, recipe, options: Mapping[str, Any], **defaults) -> dict[str, Any]:
    """`convert`'s options for this format, defaults filled in; an option it does not take is refused."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        name = getattr(recipe, "name", recipe) or fmt.name
        raise IdeoquantError(f"recipe '{name}' is a {fmt.name} recipe, written by `ideoquant {fmt.command}`; it takes "
                             f"no option {', '.join(unknown)}")
    return {**defaults, **options}


# ---------------------------------------------------------------- in-memory fake quantization


def planned_types(component: "Component", recipe: "Recipe", protect: bool = True) -> dict[str, str]:
    """Linear module -> the dtype the recipe's plan gives its weight (`protect=False`: as if nothing were
    protected, what `sensitivity` measures)."""
    from dataclasses import replace

    from .. import model

    r = recipe if protect else replace(recipe, protect=(), no_protect=())
    plan = get(r.format).plan(component, r, "diffusers")
    spec = component.spec
    return {model.module_of(t.name): t.dtype for t in plan.tensors if spec.is_linear_weight(t.name)}


def fake_quantize(model: "torch.nn.Module", recipe: "Recipe | str", types: Mapping[str, str],
                  threads: int | None = None) -> dict[str, "torch.nn.Parameter"]:
    """Quantize these linears of `model` in place as `recipe`'s format computes with them (module -> the dtype
    its plan gives it, `planned_types`); returns the replaced weights, for `restore`."""
    return get(load_recipe(recipe).format).fake_quantize(model, types, threads)


def restore(model: "torch.nn.Module", saved: Mapping[str, "torch.nn.Parameter"]) -> None:
    """Put back the weights `fake_quantize` replaced."""
    modules = dict(model.named_modules())
    for name, p in saved.items():
        modules[name].weight = p

