"""ideoquant: offline quantizer for Ideogram 4 (INT8 W8A8 for stock diffusers, bit-exact GGUF).

The data path: source -> plan -> encode -> write -> manifest.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ideoquant")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

from .job import convert, convert_gguf  # noqa: E402
from .errors import IdeoquantError  # noqa: E402
from .load import load_pipeline, load_transformer  # noqa: E402
from .quant_config import pipeline_quantization_config  # noqa: E402
from .recipe import list_recipes, load_recipe  # noqa: E402

__all__ = [
    "IdeoquantError", "convert", "convert_gguf", "list_recipes", "load_pipeline", "load_recipe",
    "load_transformer", "pipeline_quantization_config", "__version__",
]
