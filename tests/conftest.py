pytest_plugins = ["tests.conftest_hub"]

import logging  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
import torch  # noqa: E402

from ideoquant import testing  # noqa: E402
from ideoquant.evaluation.inputs import sample_inputs

# Fuzzing explores new inputs on every local run; in CI (CI=true) it replays one fixed, seeded set, so a submission's
# result does not depend on the draw.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# torchao's optional CUDA kernels and torch's pytree notices log at import; they are not test output.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def bf16_source(tmp_path_factory):
    """Tiny Ideogram 4 pipeline folder, both backbones, bf16, sharded into several files."""
    return testing.build_checkpoint(tmp_path_factory.mktemp("src") / "bf16", fmt="bf16", max_shard_size="1MB")


@pytest.fixture(scope="session")
def fp8_source(tmp_path_factory):
    """The same model as `ideogram-ai/ideogram-4-fp8` ships it: original fused names, every linear weight
    float8_e4m3fn with a float32 per-row `weight_scale`, one file per backbone plus its index, no
    quantization_config (testing.build_checkpoint layout "official")."""
    return testing.build_checkpoint(tmp_path_factory.mktemp("src") / "fp8", fmt="fp8", layout="official")


@pytest.fixture(scope="session")
def original_source(tmp_path_factory):
    """One .safetensors file in the original layout: fused qkv, attention.o, per-backbone prefixes."""
    return testing.build_checkpoint(tmp_path_factory.mktemp("src") / "orig", fmt="bf16", layout="original")


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's matmuls are faster on one thread, and much faster when another process holds a core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def inputs():
    return sample_inputs(testing.TINY_CONFIG)


def load_reference(folder, component="transformer"):
    """Source model loaded the way users load it (never build + .to(bf16): the rotary buffer would differ)."""
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel.from_pretrained(folder, subfolder=component, torch_dtype=torch.bfloat16)
