"""The published Ideogram 4 layouts (/work/shared/notes/real-release.md), as tiny replicas: each goes through
`convert` and `convert_gguf` into the right components, or is refused by name."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import ideoquant
from ideoquant import model, testing
from ideoquant.cli.app import app
from ideoquant.errors import IdeoquantError
from ideoquant.source import open_source

NF4 = "a 4-bit NF4 checkpoint: quantizing it again compounds the error; use ideogram-ai/ideogram-4-fp8"
BIASED = ["input_proj", "llm_cond_proj", "t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj",
          "final_layer.linear", "final_layer.adaln_modulation"]


def release_names(num_layers: int) -> dict[str, str]:
    """{name: dtype} of one backbone of ideogram-ai/ideogram-4-fp8, spelled out from the notes' §1.4 table."""
    names = {"llm_cond_norm.weight": "BF16", "embed_image_indicator.weight": "BF16"}
    for m in BIASED:
        names.update({f"{m}.weight": "F8_E4M3", f"{m}.weight_scale": "F32", f"{m}.bias": "BF16"})
    for n in range(num_layers):
        p = f"layers.{n}"
        for m in ("attention.qkv", "attention.o", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                  "adaln_modulation"):
            names.update({f"{p}.{m}.weight": "F8_E4M3", f"{p}.{m}.weight_scale": "F32"})
        names[f"{p}.adaln_modulation.bias"] = "BF16"
        for norm in ("attention.norm_q", "attention.norm_k", "attention_norm1", "ffn_norm1", "attention_norm2",
                     "ffn_norm2"):
            names[f"{p}.{norm}.weight"] = "BF16"
    return names


def _header(path):
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return json.loads(path.read_bytes()[8:8 + n])


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {
        "comfy": testing.build_checkpoint(root / "diffusion_models", layout="comfy"),
        "diffsynth": testing.build_checkpoint(root / "diffsynth", layout="diffsynth"),
        "no_class": testing.build_checkpoint(root / "no_class", layout="official", class_name=None),
    }


def test_real_depth_release_has_669_tensors():
    """model.py's names, mapped to the original layout with one scale per linear, are the release's 669."""
    spec = model.model_spec(model.DEFAULT_CONFIG)
    original = {model.diffusers_to_original(k)[0] for k in spec.shapes}
    scales = {model.diffusers_to_original(f"{m}.weight")[0] + "_scale" for m in spec.linear_modules}
    assert len(original) == 458 and len(scales) == 211
    assert original | scales == set(release_names(34))


def test_official_fp8_replica_is_exact(fp8_source, bf16_source):
    assert json.loads((fp8_source / "model_index.json").read_text())["_class_name"] == "Ideogram4Pipeline"
    for c in model.COMPONENTS:
        folder = fp8_source / c
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"]
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config
        assert {"num_attention_heads", "attention_head_dim", "num_layers", "intermediate_size", "adaln_dim",
                "in_channels", "llm_features_dim", "rope_theta", "mrope_section", "norm_eps"} <= set(config)
        header = _header(folder / "diffusion_pytorch_model.safetensors")
        assert header.pop("__metadata__") == {"format": "pt"}
        want = release_names(testing.TINY_CONFIG["num_layers"])
        assert {k: v["dtype"] for k, v in header.items()} == want
        h = testing.TINY_CONFIG["attention_head_dim"] * testing.TINY_CONFIG["num_attention_heads"]
        assert header["layers.0.attention.qkv.weight"]["shape"] == [3 * h, h]
        for k, v in header.items():
            if k.endswith(".weight_scale"):
                assert v["shape"] == header[k[: -len("_scale")]]["shape"][:1], k  # per row: [out]
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert index["weight_map"] == {k: "diffusion_pytorch_model.safetensors" for k in want}


def test_official_fp8_reads_as_q_k_v_rows(fp8_source, bf16_source):
    """The canonical to_q/to_k/to_v are the fused tensor's row thirds, dequantized as w = fp8 * scale[:, None]
    (computed here with safetensors and torch), and each is close to the diffusers model's own weight."""
    comp = open_source(fp8_source).components["transformer"]
    assert comp.layout == "original" and comp.fp8
    with safe_open(fp8_source / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        qkv = f.get_tensor("layers.1.attention.qkv.weight").float() * f.get_tensor(
            "layers.1.attention.qkv.weight_scale")[:, None]
        o = f.get_tensor("layers.1.attention.o.weight").float() * f.get_tensor("layers.1.attention.o.weight_scale")[:, None]
    ref = {}
    for shard in (bf16_source / "transformer").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            ref.update({k: f.get_tensor(k).float() for k in f.keys() if k.startswith("layers.1.attention")})
    for i, p in enumerate("qkv"):
        ours = comp.tensors[f"layers.1.attention.to_{p}.weight"].read()
        assert torch.equal(ours, qkv.chunk(3)[i])
        true = ref[f"layers.1.attention.to_{p}.weight"]
        assert (ours - true).norm() < 0.1 * true.norm()
    assert torch.equal(comp.tensors["layers.1.attention.to_out.0.weight"].read(), o)


def _gguf_tensor(path, name):
    r = gguf.GGUFReader(path)
    kv = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("ideogram4.")}
    return kv, np.asarray(next(t for t in r.tensors if t.name == name).data)


def _check_components(folder, m, reference):
    """Both backbones, each labelled as itself: the kept embed_image_indicator of each output equals its source."""
    assert list(m["components"]) == list(model.COMPONENTS)
    for c in model.COMPONENTS:
        want = reference[c]
        kv, got = _gguf_tensor(folder / f"ideogram4-{c}-Q8_0.gguf", "embed_image_indicator.weight")
        assert kv["ideogram4.component"] == c
        assert np.array_equal(got.reshape(want.shape), want.float().numpy()), c


@pytest.fixture(scope="module")
def indicators(bf16_source):
    out = {}
    for c in model.COMPONENTS:
        for shard in (bf16_source / c).glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                if "embed_image_indicator.weight" in f.keys():
                    out[c] = f.get_tensor("embed_image_indicator.weight")
    return out


@pytest.mark.parametrize("case", ["comfy_folder", "comfy_files", "comfy_files_reversed", "diffsynth", "no_class",
                                  "official"])
def test_layouts_convert_to_the_right_components(case, replicas, fp8_source, indicators, tmp_path):
    comfy = sorted(replicas["comfy"].glob("*.safetensors"))
    source = {"comfy_folder": replicas["comfy"], "comfy_files": [str(p) for p in comfy],
              "comfy_files_reversed": [str(p) for p in comfy[::-1]], "diffsynth": replicas["diffsynth"],
              "no_class": replicas["no_class"], "official": fp8_source}[case]
    m = ideoquant.convert_gguf(source, tmp_path / "g", qtype="q8_0")
    _check_components(tmp_path / "g", m, indicators)
    i = ideoquant.convert(source, tmp_path / "i")
    assert list(i["components"]) == list(model.COMPONENTS)
    for c in model.COMPONENTS:
        with safe_open(tmp_path / "i" / c / "diffusion_pytorch_model.safetensors", "pt") as f:
            assert torch.equal(f.get_tensor("embed_image_indicator.weight"), indicators[c])
    notes = " | ".join(i["source"].get("notes", []))
    if case.startswith("comfy"):
        assert "model_type ideogram4_uncond" in notes and "per-tensor scalar scales" in notes
    if case == "no_class":
        assert "config.json has no _class_name; recognised as Ideogram4Transformer2DModel by its tensors" in notes
    if case == "official":
        assert "per-row scales" in notes


def test_comfy_files_from_stock_diffusers_close(replicas, tmp_path, inputs, one_torch_thread, bf16_source):
    """The INT8 output of the ComfyUI files loads in stock diffusers and is close to the model each branch is."""
    from diffusers import Ideogram4Transformer2DModel

    from ideoquant.evaluation.runner import velocity
    from ideoquant.metrics import sqnr_db
    from tests.conftest import load_reference

    ideoquant.convert([str(p) for p in replicas["comfy"].glob("*.safetensors")], tmp_path / "i")
    for c in model.COMPONENTS:
        q = Ideogram4Transformer2DModel.from_pretrained(tmp_path / "i", subfolder=c, torch_dtype=torch.bfloat16)
        sq = {r: sqnr_db(velocity(load_reference(bf16_source, r), inputs), velocity(q, inputs))
              for r in model.COMPONENTS}
        assert sq[c] > 25 and sq[c] > max(sq.values()) - 1e-9, (c, sq)  # closest to its own branch


def _copy_comfy(replicas, tmp_path, names: dict[str, str], model_types: dict[str, str | None]):
    """The ComfyUI files under other names and with other `model_type` metadata (None: left out)."""
    from safetensors.torch import load_file, save_file

    out = []
    for src, new in names.items():
        f = replicas["comfy"] / src
        with safe_open(f, "pt") as h:
            meta = h.metadata()
        meta.pop("model_type")
        if model_types.get(src):
            meta["model_type"] = model_types[src]
        save_file(load_file(f), tmp_path / new, metadata=meta)
        out.append(tmp_path / new)
    return out


COND, UNCOND = "ideogram4_fp8_scaled.safetensors", "ideogram4_unconditional_fp8_scaled.safetensors"


def test_branch_from_file_name_when_metadata_is_missing(replicas, tmp_path, indicators):
    files = _copy_comfy(replicas, tmp_path, {COND: "a.safetensors", UNCOND: "b-unconditional.safetensors"}, {})
    m = ideoquant.convert_gguf([str(f) for f in files], tmp_path / "g", qtype="q8_0")
    _check_components(tmp_path / "g", m, indicators)
    assert any("'unconditional' in the file name" in n for n in m["source"]["notes"])
    assert any("taken as the conditional backbone" in n for n in m["source"]["notes"])


def test_branch_from_metadata_beats_a_plain_name(replicas, tmp_path, indicators):
    files = _copy_comfy(replicas, tmp_path, {COND: "x.safetensors", UNCOND: "y.safetensors"},
                        {COND: "ideogram4_cond", UNCOND: "ideogram4_uncond"})
    m = ideoquant.convert_gguf([str(f) for f in files[::-1]], tmp_path / "g", qtype="q8_0")
    _check_components(tmp_path / "g", m, indicators)


def test_unconditional_file_is_never_the_conditional_backbone(replicas, tmp_path):
    lone = _copy_comfy(replicas, tmp_path, {UNCOND: "u.safetensors"}, {UNCOND: "ideogram4_uncond"})[0]
    m = ideoquant.convert_gguf(lone, tmp_path / "g", qtype="q8_0")
    assert list(m["components"]) == ["unconditional_transformer"]
    # Two files of one branch: a clash, named.
    two = _copy_comfy(replicas, tmp_path, {COND: "c1.safetensors", UNCOND: "c2.safetensors"},
                      {COND: "ideogram4_uncond", UNCOND: "ideogram4_uncond"})
    with pytest.raises(IdeoquantError, match="two sources for the unconditional_transformer backbone"):
        open_source([str(f) for f in two])
    # Metadata and name disagree: ask instead of guessing.
    bad = _copy_comfy(replicas, tmp_path, {COND: "my_unconditional.safetensors"}, {COND: "ideogram4_cond"})[0]
    with pytest.raises(IdeoquantError, match="metadata says model_type ideogram4_cond .* name says unconditional"):
        open_source(bad)
    # A pipeline that needs both backbones names the missing one.
    with pytest.raises(IdeoquantError, match="missing component 'transformer'"):
        open_source(lone, components=["transformer"])


def test_cli_takes_several_sources(replicas, tmp_path):
    files = [str(p) for p in sorted(replicas["comfy"].glob("*.safetensors"))]
    r = CliRunner().invoke(app, ["gguf", *files, "--out", str(tmp_path / "g"), "--type", "q8_0"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "g").glob("*.gguf")) == [
        "ideogram4-transformer-Q8_0.gguf", "ideogram4-unconditional_transformer-Q8_0.gguf"]
    r = CliRunner().invoke(app, ["inspect", *files, "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.stdout)["components"]) == sorted(model.COMPONENTS)
    r = CliRunner().invoke(app, ["convert", files[0], files[0], "--out", str(tmp_path / "i")])
    assert r.exit_code == 2 and "given twice" in r.output


@pytest.mark.parametrize("layout,kwargs", [
    ("nf4", {}), ("nf4", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}),
    ("nf4-diffusers", {}), ("nf4-diffusers", {"quantization_config": {}}),
])
def test_nf4_releases_are_refused_by_name(layout, kwargs, tmp_path):
    src = testing.build_checkpoint(tmp_path / "nf4", layout=layout, **kwargs)
    for call in (lambda: ideoquant.convert(src, tmp_path / "i"),
                 lambda: ideoquant.convert_gguf(src, tmp_path / "g", qtype="q8_0")):
        with pytest.raises(IdeoquantError) as e:
            call()
        assert NF4 in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "i").exists() and not (tmp_path / "g").exists()


@pytest.mark.parametrize("layout,fmt,message", [
    ("comfy", "nvfp4", "an NVFP4 checkpoint .* use ideogram4_fp8_scaled.safetensors"),
    ("int8_convrot", "bf16", "an INT8 checkpoint .* use ideogram4_fp8_scaled.safetensors"),
])
def test_comfy_nvfp4_and_int8_are_refused_by_name(layout, fmt, message, tmp_path):
    src = testing.build_checkpoint(tmp_path / "src", layout=layout, fmt=fmt)
    for s in (src, *(sorted(src.glob("*.safetensors")) if src.is_dir() else ())):
        with pytest.raises(IdeoquantError, match=message):
            ideoquant.convert_gguf(s, tmp_path / "g", qtype="q8_0")


def test_comfy_folder_skips_refused_variants_with_a_note(replicas, tmp_path):
    """ComfyUI's diffusion_models/ with the fp8 and the nvfp4 files: the fp8 ones are used, the others noted."""
    folder = tmp_path / "diffusion_models"
    shutil.copytree(replicas["comfy"], folder)
    testing.build_checkpoint(folder, layout="comfy", fmt="nvfp4")
    src = open_source(folder)
    assert sorted(src.components) == sorted(model.COMPONENTS)
    assert all(f.name.endswith("fp8_scaled.safetensors") for c in src.components.values() for f in c.files)
    assert sum("NVFP4" in n for n in src.describe()["notes"]) == 2


def test_text_encoder_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"language_model.model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4)}, tmp_path / "te.safetensors")
    with pytest.raises(IdeoquantError, match="text-encoder file"):
        open_source(tmp_path / "te.safetensors")


def test_different_class_name_on_ideogram4_tensors_is_noted(bf16_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bf16_source, src)
    for c in model.COMPONENTS:
        cfg = json.loads((src / c / "config.json").read_text())
        cfg["_class_name"] = "SomethingElse"
        (src / c / "config.json").write_text(json.dumps(cfg))
    notes = open_source(src).describe()["notes"]
    assert "transformer: config.json names SomethingElse; recognised as Ideogram4Transformer2DModel" in notes[0]


def test_wrapper_prefix_is_stripped(replicas, tmp_path, indicators):
    """An optional `model.diffusion_model.` wrapper on every key (Wan2GP strips it too) reads as the bare file."""
    from safetensors.torch import load_file, save_file

    f = replicas["comfy"] / UNCOND
    with safe_open(f, "pt") as h:
        meta = h.metadata()
    save_file({"model.diffusion_model." + k: v for k, v in load_file(f).items()}, tmp_path / "w.safetensors",
              metadata=meta)
    comp = open_source(tmp_path / "w.safetensors").components["unconditional_transformer"]
    assert torch.equal(comp.tensors["embed_image_indicator.weight"].read(), indicators["unconditional_transformer"])
