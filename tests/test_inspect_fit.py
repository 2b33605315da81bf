"""`inspect --vram GB` at the real model's shapes, from headers only (sparse files: no weights are written)."""

import json
import struct

import pytest

import ideoquant
from ideoquant import model

GIB = 1 << 30


@pytest.fixture(scope="module")
def real_shaped(tmp_path_factory):
    """A bf16 diffusers-layout pipeline at Ideogram 4's real shapes; each file is a header and a hole."""
    root = tmp_path_factory.mktemp("real")
    spec = model.model_spec({})
    for c in model.COMPONENTS:
        folder = root / c
        folder.mkdir()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in spec.shapes.items():
            n = 2
            for d in shape:
                n *= d
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
        (folder / "config.json").write_text(json.dumps({"_class_name": model.MODEL_CLASS, **spec.config}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": model.PIPELINE_CLASS,
                                                       **{c: ["diffusers", model.MODEL_CLASS] for c in model.COMPONENTS}}))
    return root


def test_vram_table_at_real_shapes(real_shaped):
    report = ideoquant.inspect(str(real_shaped), vram_gb=24)
    rows = {r["type"]: r for r in report["fit"]["types"]}
    params = 2 * 9_279_288_448  # both backbones (real-release.md)
    assert rows["bf16"]["weights_gib"] == pytest.approx(params * 2 / GIB, rel=1e-3)  # everything stays 16-bit
    # Sizes follow the bits per weight: the mixtures (w2 quantized, a few tensors wider) in order, and the pure
    # types (recipe `gguf`: w2 kept in BF16) in order.
    for order in (["q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m"],
                  ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "bf16"], ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]):
        sizes = [rows[t]["weights_gib"] for t in order]
        assert sizes == sorted(sizes), dict(zip(order, sizes))
    # IQ4_XS (4.25 bits per weight) is smaller than Q4_K (4.5); IQ4_NL and NVFP4 are 4.5 bits like Q4_0, and rows
    # that fit Q4_0 fit them (blocks of 32 and 64), so they are the same size.
    assert rows["iq4_xs"]["weights_gib"] < rows["q4_k"]["weights_gib"]
    assert rows["iq4_nl"]["weights_gib"] == rows["nvfp4"]["weights_gib"] == rows["q4_0"]["weights_gib"]
    assert rows["mxfp4"]["weights_gib"] < rows["iq4_nl"]["weights_gib"]
    # On a 24 GB card (22.35 GiB): bf16 fits only one backbone at a time (17.3 GiB each); Q4_K_M fits both.
    assert not rows["bf16"]["fits"] and rows["bf16"]["fits_with_offload"]
    assert rows["q4_k_m"]["fits"]
    on16 = {r["type"]: r for r in ideoquant.inspect(str(real_shaped), vram_gb=16)["fit"]["types"]}
    assert not on16["f16"]["fits_with_offload"] and on16["q4_k_m"]["fits_with_offload"]
    budget = 24e9 / GIB
    for r in rows.values():
        assert r["fits"] == (r["weights_gib"] + 3.0 <= budget + 1e-3)


def test_vram_must_be_a_card_size(real_shaped):
    with pytest.raises(ideoquant.IdeoquantError, match="--vram"):
        ideoquant.inspect(str(real_shaped), vram_gb=0)
