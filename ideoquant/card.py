"""The model card (README.md) for an uploaded output, written from its manifest alone.

Front matter follows the Hub's conventions for quantized releases: `base_model` + `base_model_relation:
quantized` (so the Hub lists it under the base model's quantizations), `pipeline_tag: text-to-image`, and
Ideogram 4's non-commercial licence. The text is a pure function of the manifest (no clock, no machine
details), so the same output always gets the same card.
"""

from __future__ import annotations

import yaml

from . import model

HUB = "https://huggingface.co"
LICENSE_NAME = "ideogram-4-non-commercial"


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _db(x) -> str:
    return "exact" if x is None else f"{x:.1f} dB"


def _license(source: dict, base: str | None) -> dict:
    """Ideogram 4 weights are non-commercial: that licence unless the source card said otherwise (never for
    ideogram-ai/ repos, whatever a derived card claims)."""
    given = source.get("license")
    if given and not (base or "").startswith("ideogram-ai/"):
        if isinstance(given, dict):  # {license, license_name, license_link} as in the source's card data
            return {k: given[k] for k in ("license", "license_name", "license_link") if given.get(k)}
        return {"license": str(given)}
    return {"license": "other", "license_name": LICENSE_NAME,
            "license_link": f"{HUB}/{base or model.DEFAULT_SOURCE}"}


def gguf_types(manifest: dict) -> list[str]:
    """The GGML types of the quantized tensors, lowercase (q4_k, q8_0), in a stable order."""
    found = {t["dtype_out"].lower() for c in manifest["components"].values() for t in c["tensors"]
             if t["decision"] == "quantized"}
    return sorted(found)


def front_matter(manifest: dict) -> dict:
    source = manifest.get("source", {})
    base = source.get("repo_id")
    kind = manifest["kind"]
    meta: dict = {}
    if base:
        meta.update(base_model=base, base_model_relation="quantized")
    if kind == "int8":
        meta["library_name"] = "diffusers"  # stock diffusers + torchao load it; GGUF is detected from the files
    meta["pipeline_tag"] = "text-to-image"
    meta.update(_license(source, base))
    tags = ["ideogram4", "ideogram", "text-to-image", "quantized"]
    tags += ["int8", "torchao", "w8a8"] if kind == "int8" else ["gguf", *gguf_types(manifest)]
    meta["tags"] = tags
    return meta


def _usage(manifest: dict, repo_id: str) -> str:
    base = manifest.get("source", {}).get("repo_id") or model.DEFAULT_SOURCE
    comps = list(manifest["components"])
    if manifest["kind"] == "int8":
        lines = ["```python", "import torch", "from diffusers import Ideogram4Pipeline, Ideogram4Transformer2DModel",
                 ""]
        for c in comps:
            lines.append(f'{c} = Ideogram4Transformer2DModel.from_pretrained(\n    "{repo_id}", subfolder="{c}", '
                         "torch_dtype=torch.bfloat16\n)")
        args = "".join(f"    {c}={c},\n" for c in comps)
        lines += [f'pipe = Ideogram4Pipeline.from_pretrained(\n    "{base}",\n{args}    torch_dtype=torch.bfloat16,\n)',
                  'pipe.to("cuda")', "```", "",
                  "Needs `diffusers>=0.42` and `torchao` (the weights are torchao's INT8 safetensors format; "
                  "activations are quantized per token at run time). The text encoder, VAE and scheduler come "
                  f"from `{base}`."]
        return "\n".join(lines)
    files = {c: next((f for f in manifest["components"][c]["files"] if f.endswith(".gguf")), None) for c in comps}
    lines = ["```python", "import torch", "from diffusers import Ideogram4Pipeline",
             "from huggingface_hub import hf_hub_download", "import ideoquant", ""]
    for c in comps:
        lines.append(f'{c} = ideoquant.load_transformer(hf_hub_download("{repo_id}", "{files[c]}"))')
    args = "".join(f"    {c}={c},\n" for c in comps)
    lines += [f'pipe = Ideogram4Pipeline.from_pretrained(\n    "{base}",\n{args}    torch_dtype=torch.bfloat16,\n)',
              'pipe.to("cuda")', "```", ""]
    layouts = {c["output_layout"] for c in manifest["components"].values()}
    if layouts == {"original"}:
        lines.append("The files use the original Ideogram 4 layout (fused `attention.qkv`, `attention.o`), so "
                     "ComfyUI (with ComfyUI-GGUF) and stable-diffusion.cpp load them as well: one file per backbone, "
                     "`transformer` is the conditional model and `unconditional_transformer` the unconditional one.")
    else:
        lines.append("The files use diffusers tensor names; ComfyUI and stable-diffusion.cpp expect the original "
                     "layout (`ideoquant gguf --layout original`).")
    return "\n".join(lines)


def model_card(manifest: dict, repo_id: str) -> str:
    source = manifest.get("source", {})
    recipe = manifest.get("recipe", {})
    base = source.get("repo_id")
    kind = manifest["kind"]
    comps = manifest["components"]
    what = "INT8 W8A8 (torchao)" if kind == "int8" else "GGUF " + ", ".join(t.upper() for t in gguf_types(manifest))
    tool = manifest.get("tool", {})

    out = ["---", yaml.safe_dump(front_matter(manifest), sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    out.append(f"# {repo_id.split('/')[-1]}")
    out.append("")
    origin = (f"[{base}]({HUB}/{base})" + (f" at commit `{source['commit']}`" if source.get("commit") else "")
              if base else "a local copy of Ideogram 4")
    version = f" {tool['ideoquant']}" if tool.get("ideoquant") else ""
    out.append(f"Ideogram 4's diffusion transformers ({', '.join(f'`{c}`' for c in comps)}) quantized to {what} "
               f"from {origin} with ideoquant{version}.")
    if not base:
        out += ["", "The source was a local checkpoint, so this card names no `base_model`; it is an Ideogram 4 "
                    "checkpoint and carries Ideogram 4's licence."]
    out += ["", "## What was quantized", "",
            f"Recipe `{recipe.get('name')}`: {recipe.get('description', '').strip()}", "",
            f"Recipe source: {recipe.get('source', '').strip()}", ""]
    if kind == "gguf":
        out += [f"Base type `{recipe.get('type')}`"
                + (", rules: " + ", ".join(f"`{r}` → {t}" for r, t in recipe.get("rules", {}).items())
                   if recipe.get("rules") else "") + ".", ""]
    patterns = list(recipe.get("protect", []))
    counts = {n: len(c["protected_modules"]) for n, c in comps.items()}
    if len(set(counts.values())) == 1:
        counted = f"{next(iter(counts.values()))} linear modules per backbone"
    else:
        counted = ", ".join(f"{k} linear modules in `{n}`" for n, k in counts.items())
    if patterns:
        unless = recipe.get("no_protect") or []
        out.append("Protected layers (kept in BF16): " + ", ".join(f"`{p}`" for p in patterns)
                   + (" except " + ", ".join(f"`{p}`" for p in unless) if unless else "") + f": {counted}.")
    else:
        out.append("No linear layers are protected.")
    out.append("Norms, biases and embeddings are never quantized.")

    out += ["", "## Sizes and weight error", "",
            "| component | quantized / kept tensors | before | after | ratio | weight SQNR min | mean |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    files = manifest.get("files", {})
    for name, c in comps.items():
        after = sum(files[f]["size"] for f in c["files"] if f in files) or c["bytes_out"]
        ratio = f"{after / c['bytes_in']:.2f}×" if c["bytes_in"] else "?"
        out.append(f"| `{name}` | {c['tensors_quantized']} / {c['tensors_kept']} | {_human(c['bytes_in'])} | "
                   f"{_human(after)} | {ratio} | {_db(c['weight_sqnr_db_min'])} | {_db(c['weight_sqnr_db_mean'])} |")
    out += ["", "SQNR compares each quantized weight with the source weight (higher is closer); it says nothing "
                "directly about image quality.", "", "## Use", "", _usage(manifest, repo_id), ""]

    lic = _license(source, base)
    out += ["## License", ""]
    if lic.get("license_name") == LICENSE_NAME:
        out.append(f"Ideogram 4 is released under a non-commercial licence ({lic['license_link']}); these quantized "
                   "weights are a derivative and carry the same terms.")
    else:
        out.append(f"Licence of the source: `{lic.get('license')}`.")

    out += ["", "## Provenance", "",
            "Every file in this repo is listed with its size and sha256 in `ideoquant.json` "
            "(`ideoquant verify` checks a download against it).", ""]
    if base:
        out.append(f"- source: `{base}` revision `{source.get('revision')}`, commit `{source.get('commit')}`")
    else:
        out.append("- source: a local checkpoint")
    out.append(f"- created: {manifest.get('created')}")
    versions = ", ".join(f"{k} {v}" for k, v in tool.items() if v)
    out.append(f"- tools: {versions}")
    return "\n".join(out).rstrip() + "\n"
