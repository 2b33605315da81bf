"""The GGUF types beyond the original set (IQ4_NL, IQ4_XS, MXFP4, NVFP4, the low-bit IQ family) through the whole
command line: bytes equal to ggml's reference vectors, files every reader decodes, the file type llama.cpp gives
them, the sd.cpp-only warning, and the IQ4 files in diffusers."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ideoquant
from ideoquant import imatrix, model, testing
from ideoquant.cli.app import app
from ideoquant.encode import ggml
from ideoquant.evaluation.runner import velocity
from ideoquant.metrics import sqnr_db
from tests.conftest import load_reference
from tests.test_gguf_reference_export import reference_source  # noqa: F401  (fixture: ggml's input as a model)

DATA = Path(__file__).parent / "data" / "ggml"
ORIGINAL = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"}
NEW = [t for t in ggml.QTYPES if t not in ORIGINAL]
SDCPP_ONLY = {"MXFP4", "NVFP4", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M"}  # consumers.md
# llama.cpp's llama_ftype for a file of one type (gguf-py's LlamaFileType): MXFP4 is its MOSTLY_MXFP4_MOE
FILE_TYPE = {t: gguf.LlamaFileType["MOSTLY_MXFP4_MOE" if t == "MXFP4" else f"MOSTLY_{t}"] for t in NEW}
TILES = 2


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def linear_columns():
    """Every linear weight of the reference source, by its original-layout name: its number of columns."""
    config = {**testing.TINY_CONFIG, "llm_features_dim": np.load(DATA / "q8_0.npz")["x"].shape[1],
              "num_attention_heads": 1}
    return {model.diffusers_to_original(f"{n}.weight")[0]: mod.in_features
            for n, mod in testing.build_model(config).named_modules() if isinstance(mod, torch.nn.Linear)}


def _imatrix_file(path: Path, w: np.ndarray, others: dict[str, int] | None = None) -> Path:
    """An imatrix whose llama.cpp weights for llm_cond_proj are exactly `w`, and ones for `others`."""
    entries = {n: imatrix.Entry(np.ones((1, cols), np.float32), np.ones(1, np.float32))
               for n, cols in (others or {}).items()}
    entries["llm_cond_proj.weight"] = imatrix.Entry(w[None, :].astype(np.float32), np.ones(1, np.float32))
    imatrix.write_gguf(path, imatrix.ImportanceMatrix(entries, ["reference"], 1, 512))
    return path


@pytest.mark.parametrize("qtype", NEW)
def test_cli_export_equals_ggml_and_every_tensor_decodes(reference_source, linear_columns, tmp_path, qtype):
    """`ideoquant gguf --type <t>` on a model holding ggml's input: the tensor's bytes are ggml's, the file type is
    llama.cpp's, gguf-py decodes every tensor, and a type only stable-diffusion.cpp reads is warned about."""
    needs = ggml.registry.TYPES[qtype].needs_imatrix
    ref = np.load(DATA / (f"{qtype.lower()}_imat_act.npz" if needs else f"{qtype.lower()}.npz"))
    extra = ["--imatrix", _imatrix_file(tmp_path / "w.imatrix.gguf", ref["imatrix"], linear_columns)] if needs else []
    out = tmp_path / "out"
    r = _cli("gguf", reference_source, "--type", qtype.lower(), "--out", out, *extra)
    assert r.exit_code == 0, r.output
    f = out / f"ideogram4-transformer-{qtype}.gguf"
    reader = gguf.GGUFReader(str(f))
    assert reader.fields["general.file_type"].contents() == FILE_TYPE[qtype]
    t = next(t for t in reader.tensors if t.name == "llm_cond_proj.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType[qtype]
    assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), np.tile(ref["q"], (TILES, 1)).reshape(-1))
    types = set()
    for t in reader.tensors:
        y = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert np.isfinite(y).all() and y.size == int(np.prod(t.shape)), t.name
        types.add(gguf.GGMLQuantizationType(t.tensor_type).name)
    assert qtype in types
    warned = "only stable-diffusion.cpp reads" in r.output
    assert warned == bool(types & SDCPP_ONLY), (types, r.output)


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS"])
def test_iq4_loads_in_diffusers_and_matches_the_dequantized_weights(bf16_source, inputs, tmp_path, qtype):
    """load_transformer (diffusers' GGUF layers) runs the file; the same model with every quantized linear replaced
    by gguf-py's dequantization of its bytes gives the same output."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    ideoquant.convert_gguf(str(bf16_source), tmp_path / "out", qtype=qtype.lower())
    q = ideoquant.load_transformer(tmp_path / "out" / f"ideogram4-transformer-{qtype}.gguf")
    ref = load_reference(bf16_source)
    source_out = velocity(ref, inputs)
    modules = dict(ref.named_modules())
    seen = set()
    for name, mod in q.named_modules():
        if isinstance(mod, GGUFLinear) and hasattr(mod.weight, "quant_type"):
            seen.add(gguf.GGMLQuantizationType(int(mod.weight.quant_type)).name)
            w = gguf.quants.dequantize(mod.weight.data.numpy().view(np.uint8), int(mod.weight.quant_type))
            with torch.no_grad():
                modules[name].weight.copy_(torch.from_numpy(w).reshape(modules[name].weight.shape))
    assert qtype in seen
    got = velocity(q, inputs)
    assert 20 < sqnr_db(source_out, got) < 60  # quantized: close to the source, not equal to it
    same = sqnr_db(velocity(ref, inputs), got)
    # IQ4_NL: equal (None). IQ4_XS: 50.6 dB, because diffusers' IQ4_XS decoder multiplies d by the 6-bit scale in
    # float16 (its weights differ from gguf-py's by up to 3e-5 on 0.09); far above the 20-40 dB of the quantization.
    assert same is None or same > 45, same


def test_types_and_misspellings_refused_in_one_line(bf16_source, tmp_path):
    for bad in ("iq4_nls", "nvfp8", "iq4-xs"):
        r = _cli("gguf", bf16_source, "--type", bad, "--out", tmp_path / "out")
        assert r.exit_code == 2 and r.output.count("error:") == 1, r.output
    r = _cli("gguf", bf16_source, "--type", "q8_0", "--type-rule", r"attention\.o=iq4_nlx", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "iq4_nlx" in r.output, r.output
    assert not (tmp_path / "out").exists()


NEEDS = [t for t in ggml.QTYPES if ggml.registry.TYPES[t].needs_imatrix]


def _one_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("qtype", NEEDS)
def test_type_that_needs_an_imatrix_is_refused_before_the_source_is_read(tmp_path, qtype):
    """No imatrix, or `--imatrix ones`, for a type that needs one: one line saying how to make one, before the source
    is even looked for (it does not exist here), nothing written; the same when a rule asks for the type."""
    missing = tmp_path / "no-such-source"
    out = tmp_path / "out"
    _one_error(_cli("gguf", missing, "--type", qtype.lower(), "--out", out), qtype, "ideoquant calibrate")
    _one_error(_cli("gguf", missing, "--type", qtype.lower(), "--imatrix", "ones", "--out", out), qtype,
               "--imatrix ones", "ideoquant calibrate")
    _one_error(_cli("gguf", missing, "--type", "q8_0,iq4_xs", "--type-rule", f"attention\\.o={qtype.lower()}",
                    "--out", out), qtype, "ideoquant calibrate")
    assert not out.exists()


def test_imatrix_that_misses_a_tensor_the_type_needs_is_refused(reference_source, tmp_path):
    """An imatrix with an entry for llm_cond_proj only, for a type that needs weights on every linear."""
    w = np.ones(np.load(DATA / "q8_0.npz")["x"].shape[1], np.float32)
    out = tmp_path / "out"
    r = _cli("gguf", reference_source, "--type", NEEDS[0].lower(), "--imatrix",
             _imatrix_file(tmp_path / "w.imatrix.gguf", w), "--out", out)
    _one_error(r, "imatrix has no entry for", NEEDS[0])
    assert not out.exists()


def test_multi_type_pass_and_recipe_file_with_new_types(bf16_source, tmp_path):
    """One pass writes IQ4_XS, a mixture and NVFP4, each equal to its own single pass; a recipe file and a type rule
    name new types, and rows a type cannot take fall back with the reason recorded."""
    out = tmp_path / "many"
    r = _cli("gguf", bf16_source, "--type", "iq4_xs,q4_k_m,nvfp4", "--out", out)
    assert r.exit_code == 0, r.output
    single = tmp_path / "single"
    ideoquant.convert_gguf(str(bf16_source), single, qtype="iq4_xs")
    name = "ideogram4-transformer-IQ4_XS.gguf"
    assert (out / "IQ4_XS" / name).read_bytes() == (single / name).read_bytes()
    assert (out / "NVFP4" / "ideogram4-transformer-NVFP4.gguf").is_file()
    assert (out / "Q4_K_M" / "ideogram4-transformer-Q4_K_M.gguf").is_file()

    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "mine"\nformat = "gguf"\ndescription = "d"\nsource = "s"\ntype = "IQ4_XS"\n'
                      "[rules]\n'attention\\.(qkv|to_q|to_k|to_v)\\.weight$' = \"IQ4_NL\"\n")
    m = ideoquant.convert_gguf(str(bf16_source), tmp_path / "r", recipe=str(recipe),
                               type_rules=[r"feed_forward\.w1\.weight$=mxfp4"])
    types = {t["name"]: (t["dtype_out"], t["reason"]) for t in m["components"]["transformer"]["tensors"]}
    assert types["layers.0.attention.qkv.weight"][0] == "IQ4_NL"
    assert types["layers.0.feed_forward.w1.weight"][0] == "MXFP4"
    assert types["layers.0.attention.o.weight"][0] == "IQ4_XS"
    dtype, why = types["input_proj.weight"]  # 64 inputs: not a multiple of 256
    assert dtype == "IQ4_NL" and "not a multiple of 256" in why, why
    assert any("only stable-diffusion.cpp reads" in w for w in m["warnings"])


def test_fake_quantizer_refuses_a_type_that_needs_an_imatrix():
    """sensitivity and eval's in-memory quantizer has no importance matrix: one clear error, weights untouched."""
    from ideoquant import formats

    m = testing.build_model(testing.TINY_CONFIG)
    before = m.input_proj.weight
    with pytest.raises(ideoquant.IdeoquantError, match="importance matrix"):
        formats.get("gguf").fake_quantize(m, {"input_proj": "Q8_0", "layers.0.attention.to_out.0": NEEDS[0]})
    assert m.input_proj.weight is before
