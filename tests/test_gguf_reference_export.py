"""The whole GGUF export path against ggml's own bytes: a tiny Ideogram 4 whose `llm_cond_proj` rows are the rows of
ggml's reference inputs (`tests/data/ggml/`), exported with each type (and each importance vector) by `ideoquant
gguf`; the tensor in the written file must hold exactly the bytes ggml's `ggml_quantize_chunk` produced."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import ideoquant
from ideoquant import imatrix, testing

DATA = Path(__file__).parent / "data" / "ggml"
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]
WEIGHTED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TILES = 2  # hidden = 128 rows = the 64 reference rows twice


@pytest.fixture(scope="module")
def reference_source(tmp_path_factory):
    """A transformer component folder (float32) whose llm_cond_proj.weight is the reference input, tiled."""
    x = np.load(DATA / "q8_0.npz")["x"]  # every file but *_special shares this x
    config = {**testing.TINY_CONFIG, "llm_features_dim": x.shape[1], "num_attention_heads": 1}
    m = testing.build_model(config)
    with torch.no_grad():
        m.llm_cond_proj.weight.copy_(torch.from_numpy(np.tile(x, (TILES, 1))))
    folder = tmp_path_factory.mktemp("ref") / "transformer"
    m.save_pretrained(folder)
    return folder


def _exported(folder: Path) -> np.ndarray:
    f = next(folder.glob("*.gguf"))
    t = next(t for t in gguf.GGUFReader(str(f)).tensors if t.name == "llm_cond_proj.weight")
    return np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)


def _imatrix_file(tmp_path: Path, w: np.ndarray) -> Path:
    """An imatrix whose llama.cpp weights for llm_cond_proj are exactly `w` (sums of w over one row)."""
    entry = imatrix.Entry(w[None, :].astype(np.float32), np.ones(1, np.float32))
    path = tmp_path / "ref.imatrix.gguf"
    imatrix.write_gguf(path, imatrix.ImportanceMatrix({"llm_cond_proj.weight": entry}, ["reference"], 1, 512))
    return path


@pytest.mark.parametrize("qtype", TYPES)
def test_exported_bytes_equal_ggml(reference_source, tmp_path, qtype):
    ref = np.load(DATA / f"{qtype.lower()}.npz")
    out = tmp_path / "out"
    m = ideoquant.convert_gguf(reference_source, out, qtype="q8_0", type_rules=[rf"llm_cond_proj\.weight$={qtype}"])
    record = next(t for t in m["components"]["transformer"]["tensors"] if t["name"] == "llm_cond_proj.weight")
    assert record["dtype_out"] == qtype
    assert np.array_equal(_exported(out), np.tile(ref["q"], (TILES, 1)).reshape(-1))


@pytest.mark.parametrize("flavour", ["ones", "act"])
@pytest.mark.parametrize("qtype", WEIGHTED)
def test_exported_bytes_equal_ggml_weighted(reference_source, tmp_path, qtype, flavour):
    ref = np.load(DATA / f"{qtype.lower()}_imat_{flavour}.npz")
    spec = "ones" if flavour == "ones" else _imatrix_file(tmp_path, ref["imatrix"])
    out = tmp_path / "out"
    m = ideoquant.convert_gguf(reference_source, out, qtype="q8_0", type_rules=[rf"llm_cond_proj\.weight$={qtype}"],
                               imatrix=spec)
    assert np.array_equal(_exported(out), np.tile(ref["q"], (TILES, 1)).reshape(-1))
    assert m["imatrix"]["kind"] == ("ones" if flavour == "ones" else "file")
    record = next(t for t in m["components"]["transformer"]["tensors"] if t["name"] == "llm_cond_proj.weight")
    assert record["imatrix"] is True
