"""The same INT8 recipe, applied at load time by diffusers instead of offline (for users who quantize on load)."""

from __future__ import annotations

from . import model
from .encode import int8
from .recipe import Recipe, load_recipe


def pipeline_quantization_config(recipe: str | Recipe = "int8-w8a8", config: dict | None = None):
    """A diffusers `PipelineQuantizationConfig` that quantizes both backbones with torchao like `convert` does.

    `modules_to_not_convert` is the recipe's protected modules expanded against the model's config (default:
    the real Ideogram 4 shape), since diffusers matches them by name, not by glob.
    """
    from diffusers import PipelineQuantizationConfig, TorchAoConfig

    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    spec = model.model_spec(config or {})
    protected = r.protected_modules(sorted(spec.linear_modules))
    return PipelineQuantizationConfig(quant_mapping={
        c: TorchAoConfig(int8.config(), modules_to_not_convert=protected) for c in model.COMPONENTS
    })
