"""`ideoquant sensitivity`: a deliberately fragile layer ranks first; the recipe written from it protects it."""

import json

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ideoquant import model, testing
from ideoquant.cli import app
from ideoquant.errors import IdeoquantError
from ideoquant import formats
from ideoquant.formats import load_recipe
from ideoquant.evaluation.sensitivity import group_of, select, sensitivity, write_recipe
from ideoquant.source import open_source

FRAGILE = "layers.1.feed_forward.w2"
SAMPLE = dict(steps=1, tokens=8, grid=4, batch=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_fragile(path):
    """The tiny model with one deliberately fragile layer: in layers.1.feed_forward.w2, one column per 32 (one per
    GGUF block) is 100x the largest weight, and the w3 rows feeding those columns are zero. The bf16 model computes
    exactly what it computed before (those columns only ever see zeros), but the per-row int8 scale, and the block
    scales of every GGUF type, are set by the huge columns: the rest of each row quantizes to almost nothing. Its
    branch's output norm is scaled up 10x so that what the layer computes matters to the velocity."""
    path = testing.build_checkpoint(path, max_shard_size="100MB")
    cols = list(range(0, testing.TINY_CONFIG["intermediate_size"], 32))
    for c in model.COMPONENTS:
        f = path / c / "diffusion_pytorch_model.safetensors"
        sd = load_file(f)
        w3 = sd["layers.1.feed_forward.w3.weight"].float()
        w3[cols] = 0
        w2 = sd[FRAGILE + ".weight"].float()
        w2[:, cols] = 100 * w2.abs().max()
        sd["layers.1.feed_forward.w3.weight"], sd[FRAGILE + ".weight"] = w3.bfloat16(), w2.bfloat16()
        sd["layers.1.ffn_norm2.weight"] = sd["layers.1.ffn_norm2.weight"] * 10  # and its branch carries weight
        save_file(sd, f, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def fragile_source(tmp_path_factory):
    return build_fragile(tmp_path_factory.mktemp("fragile") / "src")


@pytest.fixture(scope="module")
def int8_report(fragile_source):
    return sensitivity(str(fragile_source), "int8-w8a8", **SAMPLE)


def test_int8_ranks_the_fragile_layer_first(int8_report):
    units = int8_report["units"]
    assert len(units) == 23 and [u["rank"] for u in units] == list(range(1, 24))
    assert units[0]["unit"] == FRAGILE
    assert units[0]["sqnr_db_min"] < units[1]["sqnr_db_min"] - 10  # by a wide margin
    assert set(units[0]["sqnr_db"]) == set(model.COMPONENTS)
    assert units[0]["protected_by_recipe"]  # int8-w8a8 already keeps every w2 in bf16; measured anyway
    assert units[0]["types"] == ["int8"]
    assert units[0]["extra_bytes"] == 2 * (256 * 512 * 2 - (256 * 512 + 256 * 5))  # both backbones, bf16 - int8
    assert abs(sum(u["noise_share"] for u in units) - 1) < 1e-3


def test_written_recipe_keeps_the_base_protections_and_adds(int8_report, fragile_source, tmp_path):
    """int8-w8a8 already protects every w2 (the fragile one included) and final_layer.linear: the written recipe
    keeps all of them and adds the two most fragile layers int8-w8a8 quantizes."""
    fresh = [u["unit"] for u in int8_report["units"] if not u["protected_by_recipe"]]
    assert FRAGILE not in fresh and len(fresh) == 23 - 3
    r = write_recipe(int8_report, tmp_path / "int8-fragile.toml", protect_top=2)
    assert r.name == "int8-fragile" and r.format == "int8"
    assert r.protect == ("layers.*.feed_forward.w2", "final_layer.linear", *fresh[:2])
    assert "ideoquant sensitivity" in r.source and "int8-w8a8" in r.description
    comp = open_source(str(fragile_source)).components["transformer"]
    plan = formats.get("int8").plan(comp, load_recipe(tmp_path / "int8-fragile.toml"))
    dtypes = {t.name: t.dtype for t in plan.tensors}
    for name in ["layers.0.feed_forward.w2", FRAGILE, "final_layer.linear", *fresh[:2]]:
        assert dtypes[name + ".weight"] == "BF16", name
    assert sorted(plan.protected) == sorted(["layers.0.feed_forward.w2", FRAGILE, "final_layer.linear", *fresh[:2]])
    assert dtypes[fresh[2] + ".weight"] != "BF16"  # the next one stays quantized
    # A budget protects the longest prefix of the (not yet protected) ranking that fits.
    by = {u["unit"]: u for u in int8_report["units"]}
    first = by[fresh[0]]["extra_bytes"]
    assert [u["unit"] for u in select(int8_report, budget_gb=first / 1e9)] == [fresh[0]]
    assert select(int8_report, budget_gb=(first - 1) / 1e9) == []
    with pytest.raises(IdeoquantError, match="exactly one"):
        select(int8_report)


def test_gguf_groups_rank_w2_first_and_recipe_plans(fragile_source, tmp_path):
    report = sensitivity(str(fragile_source), "gguf-q4_k_m", group=True, components=["transformer"], **SAMPLE)
    units = {u["unit"]: u for u in report["units"]}
    assert report["units"][0]["unit"] == "layers.*.feed_forward.w2" == group_of(FRAGILE)
    assert units["layers.*.feed_forward.w2"]["types"] == ["Q6_K"]  # the recipe's rule for w2
    assert units["layers.*.attention.to_q"]["types"] == ["Q5_K"]
    assert units["input_proj"]["types"] == ["Q8_0"]  # 64 columns: Q4_K falls back, as in the plan
    r = write_recipe(report, tmp_path / "g.toml", protect_top=1, name="gguf-fragile")
    assert r.type == "Q4_K" and dict(r.rules) == dict(load_recipe("gguf-q4_k_m").rules)
    comp = open_source(str(fragile_source)).components["transformer"]
    plan = formats.get("gguf").plan(comp, r)  # original layout
    # gguf-q4_k_m's own final_layer.linear stays protected; the w2 group is added.
    assert plan.protected == ["final_layer.linear", "layers.0.feed_forward.w2", "layers.1.feed_forward.w2"]
    assert r.protect == ("final_layer.linear", "layers.*.feed_forward.w2")


def test_cli_sensitivity(fragile_source, tmp_path):
    out, png = tmp_path / "r.toml", tmp_path / "s.png"
    res = CliRunner().invoke(app, ["sensitivity", str(fragile_source), "--components", "unconditional_transformer",
                                   "--steps", "1", "--tokens", "4", "--grid", "2", "--write-recipe", str(out),
                                   "--protect-top", "1", "--plot", str(png), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    fresh = [u["unit"] for u in rep["units"] if not u["protected_by_recipe"]]
    assert rep["units"][0]["unit"] == FRAGILE and rep["units"][0]["protected_by_recipe"]
    expected = ["layers.*.feed_forward.w2", "final_layer.linear", fresh[0]]
    assert rep["written_recipe"]["protect"] == expected and list(load_recipe(out).protect) == expected
    assert png.read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(app, ["sensitivity", str(fragile_source), "--write-recipe", str(out)])
    assert res.exit_code == 2 and "--protect-top" in res.output
