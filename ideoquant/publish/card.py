"""The model card (README.md) for an uploaded output, written from its manifest alone.

Front matter follows the Hub's conventions for quantized releases: `base_model` + `base_model_relation:
quantized` (so the Hub lists it under the base model's quantizations), `pipeline_tag: text-to-image`, and
Ideogram 4's non-commercial licence. The text is a pure function of the manifest (no clock, no machine
details), so the same output always gets the same card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import yaml

from .. import formats, model
from ..formats import usage
from ..load import BASE_PIPELINES, DEFAULT_BASE_PIPELINE
from ..formatting import db, human_bytes

HUB = "https://huggingface.co"
LICENSE_NAME = "ideogram-4-non-commercial"


@dataclass(frozen=True)
class BenchSection:
    """What `ideoquant upload --bench REPORT` adds to the card: markdown (the bench's summary tables and a link to
    the grid) and the image grid itself, uploaded beside the card at GRID_PATH."""
    markdown: str
    grid_png: bytes
    GRID_PATH: ClassVar[str] = "ideoquant-bench.png"


def _human(n: int | None) -> str:
    return "?" if n is None else human_bytes(n)


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


def _format_text(manifest: dict, repo_id: str = "", base: str | None = None, **snippet) -> formats.CardText:
    """The format's card text; `base` is the pipeline the text encoder, tokenizer, VAE and scheduler come from (a
    diffusers-layout repo: never the quantized source, which stock diffusers cannot load)."""
    return formats.get(manifest["kind"]).card(manifest, repo_id, str(base or DEFAULT_BASE_PIPELINE), **snippet)


def usage_code(manifest: dict, repo_id: str, base: str | None = None, *, device: str = usage.CARD_DEVICE,
               call: dict | None = None) -> str:
    """The Python code of the card's "Use" section. With the defaults it is exactly what the card shows; a test
    runs it with a local base, `device="cpu"` and a tiny `call`."""
    return usage.code_block(_format_text(manifest, repo_id, base, device=device, call=call).usage)


def base_note(base: str | None) -> str:
    """What the base pipeline is and what it needs."""
    base = str(base or DEFAULT_BASE_PIPELINE)
    need = BASE_PIPELINES.get(base)
    others = [f"`{b}` ({why})" for b, why in BASE_PIPELINES.items() if b != base]
    return (f"The text encoder, tokenizer, VAE and scheduler come from `{base}`"
            + (f": {need}." if need else ", a diffusers-layout Ideogram 4 pipeline.")
            + " The backbones are this repo's, so the base's own transformers are never downloaded."
            + (" Any diffusers-layout Ideogram 4 pipeline works as the base, e.g. " + "; ".join(others) + "." if others
               else "")
            + f" `{model.DEFAULT_SOURCE}` does not: its transformers are fused FP8 and its text encoder is FP8 "
              "weight-only, which stock diffusers and transformers cannot load.")


def front_matter(manifest: dict) -> dict:
    source = manifest.get("source", {})
    base = source.get("repo_id")
    text = _format_text(manifest)
    meta: dict = {}
    if base:
        meta.update(base_model=base, base_model_relation="quantized")
    if text.library_name:
        meta["library_name"] = text.library_name
    meta["pipeline_tag"] = "text-to-image"
    meta.update(_license(source, base))
    meta["tags"] = ["ideogram4", "ideogram", "text-to-image", "quantized", *text.tags]
    return meta


def model_card(manifest: dict, repo_id: str, base_pipeline: str | None = None,
               bench: BenchSection | None = None) -> str:
    """The card; `base_pipeline` is the pipeline its code loads the rest of Ideogram 4 from (default
    `DEFAULT_BASE_PIPELINE`); `bench`: image-level results of `ideoquant bench`, shown after the weight error."""
    source = manifest.get("source", {})
    recipe = manifest.get("recipe", {})
    base = source.get("repo_id")
    comps = manifest["components"]
    text = _format_text(manifest, repo_id, base_pipeline)
    what = text.what
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
    out += text.recipe_lines
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
                   f"{_human(after)} | {ratio} | {db(c['weight_sqnr_db_min'])} | {db(c['weight_sqnr_db_mean'])} |")
    out += ["", "SQNR compares each quantized weight with the source weight (higher is closer); it says nothing "
                "directly about image quality.", ""]
    if bench is not None:
        out += [bench.markdown.rstrip(), ""]
    out += ["## Use", "", text.usage, "", base_note(base_pipeline), ""]
    warnings = manifest.get("warnings") or []
    if warnings:
        out += ["**Warning:** " + w for w in warnings] + [""]

    out += _license_lines(source, base)
    out += ["", "## Provenance", "",
            "Every file in this repo is listed with its size and sha256 in `ideoquant.json` "
            "(`ideoquant verify` checks a download against it).", ""]
    out += _provenance_lines(manifest)
    return "\n".join(out).rstrip() + "\n"


def _license_lines(source: dict, base: str | None) -> list[str]:
    lic = _license(source, base)
    if lic.get("license_name") == LICENSE_NAME:
        return ["## License", "", f"Ideogram 4 is released under a non-commercial licence ({lic['license_link']}); "
                "these quantized weights are a derivative and carry the same terms."]
    return ["## License", "", f"Licence of the source: `{lic.get('license')}`."]


def _provenance_lines(manifest: dict) -> list[str]:
    source, tool = manifest.get("source", {}), manifest.get("tool", {})
    base = source.get("repo_id")
    lines = [f"- source: `{base}` revision `{source.get('revision')}`, commit `{source.get('commit')}`" if base
             else "- source: a local checkpoint", f"- created: {manifest.get('created')}"]
    return lines + ["- tools: " + ", ".join(f"{k} {v}" for k, v in tool.items() if v)]


def collection_card(outputs: dict[str, dict], repo_id: str, base_pipeline: str | None = None) -> str:
    """The one card of a repo holding several outputs, one folder each ({folder: manifest}, all from one source):
    what each folder holds, its sizes and weight error, and how to load it."""
    first = next(iter(outputs.values()))
    source = first.get("source", {})
    base = source.get("repo_id")
    texts = {f: _format_text(m, repo_id, base_pipeline, folder=f) for f, m in outputs.items()}
    meta = front_matter(first)
    libraries = {t.library_name for t in texts.values()}
    if libraries != {meta.get("library_name")}:  # INT8 (diffusers) next to GGUF (none): no one library loads all
        meta.pop("library_name", None)
    meta["tags"] = list(dict.fromkeys(tag for f, m in outputs.items() for tag in front_matter(m)["tags"]))
    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
           f"# {repo_id.split('/')[-1]}", ""]
    origin = (f"[{base}]({HUB}/{base})" + (f" at commit `{source['commit']}`" if source.get("commit") else "")
              if base else "a local copy of Ideogram 4")
    version = first.get("tool", {}).get("ideoquant")
    out += [f"Ideogram 4's diffusion transformers quantized from {origin} with ideoquant"
            + (f" {version}" if version else "") + f", {len(outputs)} outputs, one folder each:", "",
            "| folder | format | recipe | " + " | ".join(f"`{c}`" for c in first["components"])
            + " | weight SQNR min |", "| --- | --- | --- | " + " | ".join("---:" for _ in first["components"])
            + " | ---: |"]
    for f, m in outputs.items():
        files = m.get("files", {})
        sizes = [sum(files[x]["size"] for x in c["files"] if x in files) or c["bytes_out"]
                 for c in m["components"].values()]
        worst = [c["weight_sqnr_db_min"] for c in m["components"].values() if c["weight_sqnr_db_min"] is not None]
        out.append(f"| [`{f}/`]({HUB}/{repo_id}/tree/main/{f}) | {texts[f].what} | `{m.get('recipe', {}).get('name')}`"
                   f" | " + " | ".join(_human(n) for n in sizes) + f" | {db(min(worst) if worst else None)} |")
    out += ["", "Each folder has its own `ideoquant.json`: every tensor's fate and error, and every file's size and "
                "sha256 (`ideoquant verify FOLDER` checks a download against it). SQNR compares each quantized weight "
                "with the source weight (higher is closer); it says nothing directly about image quality.", "",
            "## Use"]
    for f, text in texts.items():
        out += ["", f"### `{f}/`: {text.what}", "", text.usage]
        out += ["**Warning:** " + w for w in outputs[f].get("warnings") or []]
    out += ["", base_note(base_pipeline), ""]
    out += _license_lines(source, base)
    out += ["", "## Provenance", ""] + _provenance_lines(first)
    return "\n".join(out).rstrip() + "\n"
