"""ideoquant: offline quantizer for Ideogram 4 (INT8 W8A8 for stock diffusers, bit-exact GGUF).

The data path: source -> plan -> encode -> write -> manifest.

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
    "list_recipes": ".recipe",
    "load_recipe": ".recipe",
    "load_pipeline": ".load",
    "load_transformer": ".load",
    "pipeline_quantization_config": ".quant_config",
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
