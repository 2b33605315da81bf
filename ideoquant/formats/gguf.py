"""GGUF: one file per backbone, laid out for stable-diffusion.cpp and ComfyUI, bytes equal to ggml's quantizers.

Everything ideoquant knows about GGUF lives here: the `--type` choices and their llama.cpp file types, the
fallbacks for rows a type cannot take, the metadata keys, the architecture string, the file names, the plan rules,
the sink, the verify hook and the model-card text. The encoders themselves are `encode.ggml` (pure).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__, manifest, model
from ..encode import ggml
from ..encode.finite import check_finite
from ..errors import IdeoquantError
from ..metrics import ErrorStats
from ..plan import PROTECTED_DTYPE, ComponentPlan, TensorPlan, numel, protected_modules, row_blocks
from ..recipe import Recipe, resolve
from ..write.gguf import GGUFFile
from . import CardText, Sink, catalog

ARCH = "ideogram4"
KEY_COMPONENT = "ideogram4.component"
KEY_CONFIG = "ideogram4.diffusers_config"  # the component's diffusers config.json, as JSON text
KEY_LAYOUT = "ideogram4.layout"
KEY_RECIPE = "ideoquant.recipe"
KEY_VERSION = "ideoquant.version"
LAYOUTS = catalog.GGUF_LAYOUTS
TYPES = catalog.GGUF_TYPES
MIXTURES = catalog.GGUF_MIXTURES
FILE_TYPES = catalog.GGUF_FILE_TYPES
PLAIN = catalog.GGUF_PLAIN
FALLBACK = catalog.GGUF_FALLBACK
OTHER_DTYPE = "F32"  # norms, biases, the image-indicator embedding (small; F32 as ComfyUI-GGUF keeps them)


@dataclass(frozen=True)
class Options:
    label: str  # names the files and the file type: Q4_K, Q4_K_M, ...


def gguf_recipe(qtype: str | None = None, recipe: str | Recipe | None = None, type_rules=(), protect=(),
                no_protect=()) -> tuple[Recipe, str]:
    """`--type` is shorthand: q8_0/q4_k/q5_k/q6_k set the base type of recipe `gguf` (or of `recipe`); a mixture
    (q4_k_m) is a recipe of its own. Without `--type` (None) the recipe's own type is used (recipe `gguf`: Q4_K).
    Returns the recipe and the label that names the files (Q4_K, Q4_K_M, ...)."""
    if qtype is None:
        r = resolve(recipe or "gguf", protect, no_protect, None, type_rules)
        mixture = {v: k for k, v in MIXTURES.items()}.get(r.name) if r.path is None else None
        return r, (mixture or r.type or "").upper()
    q = qtype.strip().lower()
    if q not in TYPES:
        raise IdeoquantError(f"unknown --type '{qtype}': choose from {', '.join(TYPES)}")
    if q in MIXTURES:
        if recipe is not None and getattr(recipe, "name", recipe) != MIXTURES[q]:
            raise IdeoquantError(f"--type {q} is the recipe {MIXTURES[q]}; give --recipe or --type {q}, not both")
        return resolve(MIXTURES[q], protect, no_protect, None, type_rules), q.upper()
    return resolve(recipe or "gguf", protect, no_protect, q, type_rules), q.upper()


def block_size(qtype: str) -> tuple[int, int]:
    """(elements per block, bytes per block) from gguf-py's table."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


def read_metadata(path: str | Path) -> dict:
    """The GGUF key/value pairs as Python values (strings, numbers, lists)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise IdeoquantError(f"cannot read GGUF file {path}: {e}") from None
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def gguf_filename(component: str, label: str) -> str:
    """`ideogram4-transformer-Q4_K.gguf`: names say component and type."""
    return f"ideogram4-{component}-{label}.gguf"


def file_label(qtype_option: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "", qtype_option).upper()


def output_config(plan: ComponentPlan) -> dict:
    return {k: v for k, v in plan.component.config.items() if k not in ("_name_or_path", "quantization_config")}


class GGUFFormat:
    name = "gguf"

    # ------------------------------------------------------------ plan

    def plan(self, component, recipe: Recipe, layout: str = "original") -> ComponentPlan:
        if recipe.format != "gguf":
            raise IdeoquantError(f"recipe '{recipe.name}' is an {recipe.format} recipe; "
                                 f"use it with `ideoquant {'convert' if recipe.format == 'int8' else recipe.format}`")
        if layout not in LAYOUTS:
            raise IdeoquantError(f"unknown layout '{layout}': choose original or diffusers")
        for qtype in [recipe.type, *(t for _, t in recipe.rules)]:
            if qtype not in FALLBACK:
                raise IdeoquantError(f"unknown GGUF type '{qtype}': choose from "
                                     f"{', '.join(q.lower() for q in FALLBACK)}")
        spec = component.spec
        protected = protected_modules(component, recipe)
        groups: dict[str, list] = {}
        for name, src in component.tensors.items():
            out = model.diffusers_to_original(name)[0] if layout == "original" else name
            groups.setdefault(out, []).append(src)
        tensors = []
        for out, srcs in groups.items():
            shape = (sum(s.shape[0] for s in srcs), *srcs[0].shape[1:])
            names = [s.name for s in srcs]
            if not spec.is_linear_weight(names[0]):
                tensors.append(TensorPlan(out, tuple(srcs), shape, False, OTHER_DTYPE,
                                          "not a linear weight (norm, bias or embedding)", numel(shape) * 4))
                continue
            hit = [protected[model.module_of(n)] for n in names if model.module_of(n) in protected]
            if hit:
                tensors.append(TensorPlan(out, tuple(srcs), shape, False, PROTECTED_DTYPE,
                                          f"protected by recipe pattern '{hit[0]}'", numel(shape) * 2, hit[0]))
                continue
            qtype, why = recipe.type_for(out, *names)
            wanted = qtype
            while qtype in FALLBACK and shape[-1] % block_size(qtype)[0]:
                qtype = FALLBACK[qtype]
            if qtype != wanted:
                why += f"; rows of {shape[-1]} are not a multiple of {block_size(wanted)[0]}, so {qtype}"
            if qtype in PLAIN:
                nbytes = numel(shape) * PLAIN[qtype]
            else:
                block, size = block_size(qtype)
                nbytes = numel(shape) // block * size
            tensors.append(TensorPlan(out, tuple(srcs), shape, qtype not in PLAIN, qtype, why, nbytes))
        return ComponentPlan(component, "gguf", layout, tensors, sorted(protected))

    # ------------------------------------------------------------ sink

    def write_component(self, plan: ComponentPlan, sink: Sink) -> tuple[list[dict], list[str]]:
        label = sink.options.label
        name = plan.component.name
        filename = gguf_filename(name, label)
        f = GGUFFile(sink.staging / filename, ARCH, gguf_metadata(plan, sink.source, sink.recipe, label),
                     [(t.name, t.shape, t.dtype) for t in plan.tensors])
        try:
            records = _write_tensors(plan.tensors, f, name, sink)
            f.close()
        except BaseException:
            f.abort()
            raise
        sink.hasher.add(filename, sink.staging / filename)
        folder = sink.staging / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(output_config(plan), indent=2, sort_keys=True) + "\n")
        sink.hasher.add(f"{name}/config.json", folder / "config.json")
        return records, [filename, f"{name}/config.json"]

    # ------------------------------------------------------------ verify

    def check_stored(self, folder: Path, name: str, comp: dict, manifest_: dict) -> tuple[list[str], list[str]]:
        import gguf

        rel = _gguf_file(comp)
        if rel is None:
            return [f"{name}: the manifest lists no .gguf file for this component"], []
        try:
            stored = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name
                      for t in gguf.GGUFReader(str(folder / rel)).tensors}
        except Exception as e:  # noqa: BLE001  gguf-py raises ValueError, IndexError... on damaged files
            return [f"{name}: cannot read {rel}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"], []
        problems = []
        for t in comp["tensors"]:
            if t["name"] not in stored:
                problems.append(f"{name}: {t['name']} is not in {rel}")
            elif stored[t["name"]] != t["dtype_out"]:
                problems.append(f"{name}: {t['name']} is {stored[t['name']]} in {rel}, "
                                f"the manifest says {t['dtype_out']}")
        for k in sorted(set(stored) - {t["name"] for t in comp["tensors"]}):
            problems.append(f"{name}: {rel} holds {k}, which is not in the manifest")
        if problems:
            return problems, []
        counts: dict[str, int] = {}
        for v in stored.values():
            counts[v] = counts.get(v, 0) + 1
        return [], [f"{name}: GGML types as recorded (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                    + ")"]

    def load_target(self, folder: Path, name: str, comp: dict) -> Path:
        return folder / _gguf_file(comp)

    def check_loaded(self, folder: Path, comp: dict, m) -> list[str]:
        return []  # the loader itself checks every tensor against the model (names and shapes)

    # ------------------------------------------------------------ model card

    def card(self, m: dict, repo_id: str, base: str) -> CardText:
        comps = list(m["components"])
        types = gguf_types(m)
        recipe = m.get("recipe", {})
        files = {c: _gguf_file(m["components"][c]) for c in comps}
        lines = ["```python", "import torch", "from diffusers import Ideogram4Pipeline",
                 "from huggingface_hub import hf_hub_download", "import ideoquant", ""]
        for c in comps:
            lines.append(f'{c} = ideoquant.load_transformer(hf_hub_download("{repo_id}", "{files[c]}"))')
        args = "".join(f"    {c}={c},\n" for c in comps)
        lines += [f'pipe = Ideogram4Pipeline.from_pretrained(\n    "{base}",\n{args}    torch_dtype=torch.bfloat16,\n)',
                  'pipe.to("cuda")', "```", ""]
        layouts = {c["output_layout"] for c in m["components"].values()}
        if layouts == {"original"}:
            lines.append("The files use the original Ideogram 4 layout (fused `attention.qkv`, `attention.o`), so "
                         "ComfyUI (with ComfyUI-GGUF) and stable-diffusion.cpp load them as well: one file per "
                         "backbone, `transformer` is the conditional model and `unconditional_transformer` the "
                         "unconditional one.")
        else:
            lines.append("The files use diffusers tensor names; ComfyUI and stable-diffusion.cpp expect the original "
                         "layout (`ideoquant gguf --layout original`).")
        rules = recipe.get("rules") or {}
        recipe_lines = [f"Base type `{recipe.get('type')}`"
                        + (", rules: " + ", ".join(f"`{r}` → {t}" for r, t in rules.items()) if rules else "") + ".",
                        ""]
        # library_name: none; the Hub detects GGUF from the files
        return CardText("GGUF " + ", ".join(t.upper() for t in types), ["gguf", *types], None, recipe_lines,
                        "\n".join(lines))


def gguf_types(m: dict) -> list[str]:
    """The GGML types of the quantized tensors, lowercase (q4_k, q8_0), in a stable order."""
    return sorted({t["dtype_out"].lower() for c in m["components"].values() for t in c["tensors"]
                   if t["decision"] == "quantized"})


def _gguf_file(comp: dict) -> str | None:
    return next((f for f in comp["files"] if f.endswith(".gguf")), None)


def gguf_metadata(plan: ComponentPlan, src, recipe: Recipe, label: str) -> dict:
    """The key/value pairs of one backbone's file: llama.cpp's general.* keys and ideoquant's own."""
    import gguf as ggufpy

    name = plan.component.name
    kv = {
        "general.name": f"Ideogram 4 {name} {label}",
        "general.quantization_version": ggufpy.GGML_QUANT_VERSION,
        "general.file_type": int(ggufpy.LlamaFileType[FILE_TYPES[label]]),
        "general.quantized_by": f"ideoquant {__version__}",
    }
    if src.repo_id:
        org, repo = src.repo_id.split("/", 1)
        kv.update({
            "general.base_model.count": 1,
            "general.base_model.0.name": repo,
            "general.base_model.0.organization": org,
            "general.base_model.0.repo_url": f"https://huggingface.co/{src.repo_id}",
        })
        if src.commit:
            kv["general.base_model.0.version"] = src.commit
    kv.update({KEY_COMPONENT: name, KEY_LAYOUT: plan.layout,
               KEY_CONFIG: json.dumps(output_config(plan), sort_keys=True),
               KEY_RECIPE: recipe.name, KEY_VERSION: __version__})
    return kv


def encode_block(block: torch.Tensor, dtype: str) -> tuple[np.ndarray, torch.Tensor]:
    """(flat uint8 bytes, the float values they decode to) for one block of rows of a GGUF tensor."""
    if dtype in ggml.QTYPES:
        rows = block.reshape(-1, block.shape[-1]).to(torch.float32).numpy()
        q = ggml.quantize(rows, dtype, threads=1)
        return q.reshape(-1), torch.from_numpy(ggml.dequantize(q, dtype))
    kept = block.to(torch.bfloat16 if dtype == "BF16" else torch.float32).contiguous()
    return kept.reshape(-1).view(torch.uint8).numpy(), kept


def _write_tensors(tensors: list[TensorPlan], f: GGUFFile, component: str, sink: Sink) -> list[dict]:
    """Every row block of every tensor encoded on the pool, in one stream; a tensor is written once its last block
    is in (its encoded bytes are the memory bound)."""
    stats = [ErrorStats() for _ in tensors]
    outs: dict[int, np.ndarray] = {}
    pos = [0] * len(tensors)
    records: list[dict] = []

    def encode(block):
        i, src, rows = block
        data = src.read(rows)
        check_finite(tensors[i].name, data)
        q, approx = encode_block(data, tensors[i].dtype)
        s = ErrorStats()
        s.add(data, approx)
        return q, s, data.numel()

    def done(block, result) -> None:
        i, src, _ = block
        q, s, n = result
        t = tensors[i]
        out = outs.setdefault(i, np.empty(t.bytes_out, np.uint8))
        out[pos[i] : pos[i] + q.size] = q
        pos[i] += q.size
        stats[i].add_energies(s.signal, s.noise)
        sink.reporter.advance(component, src.nbytes * n // max(1, numel(src.shape)))
        if pos[i] == out.size and _last_block(t, src, block):
            f.write(t.name, outs.pop(i))
            records.append(manifest.tensor_record(t, stats[i].sqnr_db))

    sink.pool.run(encode, row_blocks(tensors, sink.block_elements), done)
    if len(records) != len(tensors):
        raise RuntimeError(f"GGUF {component}: encoded {len(records)} of {len(tensors)} planned tensors")
    return records


def _last_block(t: TensorPlan, src, block) -> bool:
    rows = block[2]
    return src is t.sources[-1] and (rows is None or rows[1] == src.shape[0])


FORMAT = GGUFFormat()
