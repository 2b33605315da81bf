"""ideoquant: offline quantizer for Ideogram 4 (INT8 W8A8 for stock diffusers, bit-exact GGUF).

The data path: source -> plan -> encode -> write -> manifest. The public API:

- `convert(source, out, recipe=...)`: the one conversion entry point, dispatching on the recipe's format (INT8 W8A8
  in torchao's safetensors format, GGUF, ...); returns the manifest.
- `convert_gguf(source, out, qtype=...)`: `convert` with GGUF's options: one GGUF per backbone.
- `inspect(source, recipe=...)`: what a source holds and what a recipe does to it (headers only).
- `verify(folder)`: an output folder against its manifest; `upload(folder, repo_id)`: to the Hub with a card.
- `evaluate(source, quantized)`, `sensitivity(source, recipe)`, `calibrate(source, out)`: evidence of quality.
- `load_transformer(path)`, `load_pipeline(quantized, base)`, `pipeline_quantization_config(recipe)`: loading.
- `Recipe`, `load_recipe`, `list_recipes`: recipes.

The public names are imported on first use: `import ideoquant` (and `ideoquant --help`) stays instant instead of
paying torch's import up front.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from .errors import IdeoquantError

try:
    __version__ = version("ideoquant")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

_LAZY = {
    "convert": ".job",
    "convert_gguf": ".job",
    "inspect": ".inspection",
    "verify": ".publish.verify",
    "upload": ".publish.upload",
    "evaluate": ".evaluation.evaluate",
    "sensitivity": ".evaluation.sensitivity",
    "calibrate": ".evaluation.calibrate",
    "load_transformer": ".load",
    "load_pipeline": ".load",
    "pipeline_quantization_config": ".load",
    "Recipe": ".recipe",
    "load_recipe": ".formats",
    "list_recipes": ".formats",
}

__all__ = ["IdeoquantError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ideoquant' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
