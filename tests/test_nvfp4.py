"""NVFP4 W4A4 (`nvfp4-w4a4`): torchao NVFP4Tensor, the bytes torchao's own quantize_ makes, loadable by stock diffusers. torchao
runs NVFP4 matmuls only on Blackwell, so the forward is checked on the CPU with the weights dequantized."""

import json

import pytest
import torch
from diffusers import Ideogram4Transformer2DModel, TorchAoConfig

import ideoquant
from ideoquant import formats, model
from ideoquant.evaluation.runner import velocity
from ideoquant.metrics import sqnr_db
from tests.conftest import load_reference
from tests.torchao_files import bits, stored

# e2m1 keeps one mantissa bit (a 16-value block's scale in e4m3): weight SQNR near 20 dB; a wrong scale, nibble
# order or swizzle gives noise at or below 0 dB.
NVFP4_FORWARD_FLOOR_DB = 10.0


@pytest.fixture(scope="module")
def nvfp4_out(bf16_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("nvfp4") / "out"
    return out, ideoquant.convert(str(bf16_source), out, recipe="nvfp4-w4a4")




def test_equals_torchao_quantize_and_loads(nvfp4_out, bf16_source, monkeypatch):
    """The tensors and metadata of torchao's own `quantize_` (diffusers' TorchAoConfig route) with
    NVFP4DynamicActivationNVFP4WeightConfig() on the same weights; torchao asserts a Blackwell GPU before quantizing,
    the weight math being plain torch, so the reference lifts only that assertion."""
    import torchao.prototype.mx_formats.inference_workflow as workflow
    from torchao.prototype.mx_formats.inference_workflow import NVFP4DynamicActivationNVFP4WeightConfig

    monkeypatch.setattr(workflow, "is_sm_at_least_100", lambda: True)
    out, m = nvfp4_out
    c = "transformer"
    ref = Ideogram4Transformer2DModel.from_pretrained(
        bf16_source, subfolder=c, torch_dtype=torch.bfloat16,
        quantization_config=TorchAoConfig(NVFP4DynamicActivationNVFP4WeightConfig(),
                                          modules_to_not_convert=m["components"][c]["protected_modules"]))
    stock = out.parent / "stock"
    ref.save_pretrained(stock)
    ours, ours_meta = stored(out / c)
    theirs, theirs_meta = stored(stock)
    assert ours.keys() == theirs.keys() and any(k.endswith("._weight_per_tensor_scale") for k in ours)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(bits(ours[k]), bits(theirs[k])), k
    for n in json.loads(theirs_meta["tensor_names"]):
        assert json.loads(ours_meta[n]) == json.loads(theirs_meta[n]), n
    config = json.loads((out / c / "config.json").read_text())["quantization_config"]
    assert config == json.loads((stock / "config.json").read_text())["quantization_config"]
    loaded = Ideogram4Transformer2DModel.from_pretrained(out, subfolder=c, torch_dtype=torch.bfloat16)
    assert type(loaded.layers[0].feed_forward.w1.weight).__name__ == "NVFP4Tensor"
    assert m["kind"] == "float4" and ideoquant.verify(out).ok
    assert [f.name for f, _ in formats.recognise(out)] == ["float4"]


def test_dequantized_forward_matches_source(nvfp4_out, bf16_source, inputs):
    out, _ = nvfp4_out
    q = Ideogram4Transformer2DModel.from_pretrained(out, subfolder="transformer", torch_dtype=torch.bfloat16)
    for mod in q.modules():
        if isinstance(mod, torch.nn.Linear) and type(mod.weight).__name__ == "NVFP4Tensor":
            mod.weight = torch.nn.Parameter(mod.weight.dequantize(torch.bfloat16), requires_grad=False)
    sq = sqnr_db(velocity(load_reference(bf16_source), inputs), velocity(q, inputs))
    assert sq > NVFP4_FORWARD_FLOOR_DB, sq


def test_eval_on_the_cpu_says_where_it_runs(nvfp4_out, bf16_source):
    """torchao's NVFP4 linear cannot run on the CPU (it needs Blackwell): eval says so in one line."""
    from ideoquant.evaluation.evaluate import evaluate

    with pytest.raises(ideoquant.IdeoquantError, match="Blackwell"):
        evaluate(str(bf16_source), [nvfp4_out[0]], baselines=(), steps=1, tokens=8, grid=4)
