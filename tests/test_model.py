"""ideoquant.model's spec, spelled out from the config, against the diffusers class itself."""

import pytest
import torch
from diffusers import Ideogram4Transformer2DModel

from ideoquant import model, testing

CONFIGS = [
    {},  # the real model: every constructor default
    dict(testing.TINY_CONFIG),
    # every width different, so a swapped dimension cannot go unnoticed
    dict(in_channels=64, num_layers=3, attention_head_dim=64, num_attention_heads=3, intermediate_size=320,
         adaln_dim=96, llm_features_dim=448),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["real", "tiny", "distinct"])
def test_spec_is_the_diffusers_state_dict(config):
    with torch.device("meta"):
        m = Ideogram4Transformer2DModel.from_config(config)
    spec = model.model_spec(config)
    # same names in the same (registration) order, same shapes
    assert list(spec.shapes.items()) == [(n, tuple(p.shape)) for n, p in m.state_dict().items()]
    assert spec.linear_modules == {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert {k: spec.config[k] for k in model.DEFAULT_CONFIG} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in m.config.items() if k in model.DEFAULT_CONFIG}


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_converting_does_not_import_diffusers(tmp_path, fmt):
    """The convert path must stay free of the diffusers import (4.5 s of CPU): it needs only torch, safetensors
    and torchao's serialization, for a bf16 source and for the FP8 release alike."""
    import subprocess
    import sys

    src = tmp_path / "src"
    testing.build_checkpoint(src, fmt=fmt)
    code = (f"import sys, ideoquant; ideoquant.convert({str(src)!r}, {str(tmp_path / 'out')!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'accelerate', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
