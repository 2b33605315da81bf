"""Recipes: packaged TOML files, strict parsing, overrides, per-tensor resolution."""

import pytest

from ideoquant import IdeoquantError, model, testing
from ideoquant import formats

plan_int8 = formats.get("int8").plan
from ideoquant.formats import list_recipes, load_recipe
from ideoquant.recipe import RECIPE_DIR, parse_type_rule
from ideoquant.source import open_source


def test_packaged_recipes_ship_inside_the_package():
    assert RECIPE_DIR.parent.name == "ideoquant"
    names = {r.name for r in list_recipes()}
    assert {"int8-w8a8", "int8-w8a8-safe", "gguf", "gguf-q4_k_m"} <= names
    for r in list_recipes():
        assert r.description and r.source
    assert load_recipe("int8-w8a8").protect == ("layers.*.feed_forward.w2", "final_layer.linear")


@pytest.mark.parametrize("text,message", [
    ("name = 'x'\nformat = 'int8'\ndescription='d'\nsource='s'\nprotectt = []\n", "unknown key"),
    ("name = 'x'\nformat = 'int8'\n[[[", "does not parse"),
    ("name = 'x'\nformat = 'fp4'\ndescription='d'\nsource='s'\n", "format must be"),
    ("name = 'x'\nformat = 'int8'\ndescription='d'\n", "'source' must be"),
    ("name = 'x'\nformat = 'int8'\ndescription='d'\nsource='s'\ntype='Q4_K'\n", "unknown key\\(s\\) type for int8 recipes"),
    ("name = 'x'\nformat = 'gguf'\ndescription='d'\nsource='s'\n", "needs 'type'"),
    ("name = 'x'\nformat = 'gguf'\ndescription='d'\nsource='s'\ntype='Q4_K'\n[rules]\n'([' = 'Q8_0'\n", "bad type rule"),
])
def test_bad_recipe_files(tmp_path, text, message):
    f = tmp_path / "r.toml"
    f.write_text(text)
    with pytest.raises(IdeoquantError, match=message):
        load_recipe(f)


def test_pattern_matching_nothing_is_an_error(bf16_source, tmp_path):
    f = tmp_path / "r.toml"
    f.write_text("name='r'\nformat='int8'\ndescription='d'\nsource='s'\nprotect=['layers.*.feed_forwrd.w2']\n")
    comp = open_source(str(bf16_source)).components["transformer"]
    with pytest.raises(IdeoquantError, match="matches no module"):
        plan_int8(comp, load_recipe(f))


def test_overrides_protect_and_no_protect(bf16_source):
    comp = open_source(str(bf16_source)).components["transformer"]
    r = load_recipe("int8-w8a8").with_overrides(protect=["input_proj.weight"], no_protect=["layers.1.feed_forward.w2"])
    plan = plan_int8(comp, r)
    assert plan.protected == ["final_layer.linear", "input_proj", "layers.0.feed_forward.w2"]
    decisions = {t.name: t.dtype for t in plan.tensors}
    assert decisions["layers.1.feed_forward.w2.weight"] == "int8"
    assert decisions["input_proj.weight"] == "BF16"


def test_original_layout_alias_patterns(original_source):
    """`attention.qkv` / `attention.o` (original names) protect the diffusers modules they hold."""
    comp = open_source(str(original_source)).components["transformer"]
    plan = plan_int8(comp, load_recipe("int8-w8a8").with_overrides(protect=["layers.0.attention.qkv"]))
    assert {"layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v"} <= set(plan.protected)


def test_parse_type_rule():
    assert parse_type_rule(r"attention\.o\.weight$=q8_0") == (r"attention\.o\.weight$", "Q8_0")
    assert parse_type_rule("a=b=Q6_K") == ("a=b", "Q6_K")
    for bad in ("Q8_0", "=Q8_0", "x="):
        with pytest.raises(IdeoquantError, match="bad --type-rule"):
            parse_type_rule(bad)


def test_linear_modules_come_from_the_diffusers_class():
    spec = model.model_spec(testing.TINY_CONFIG)
    assert "embed_image_indicator" not in spec.linear_modules  # an nn.Embedding, never quantized by diffusers
    assert "layers.0.attention.to_out.0" in spec.linear_modules
    real = model.model_spec({})
    assert len(real.linear_modules) == 34 * 8 + 7
    assert real.shapes["llm_cond_proj.weight"] == (4608, 53248)
