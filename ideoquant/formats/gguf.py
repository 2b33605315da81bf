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
from ..encode import ggml, kernels
from ..encode.finite import check_finite
from ..encode.fp8 import dequantize_fp8r
from ..errors import IdeoquantError
from ..metrics import ErrorStats
from ..plan import PROTECTED_DTYPE, ComponentPlan, TensorPlan, numel, protected_modules, row_blocks
from ..recipe import Recipe, parse_type_table
from ..source import FileMaps
from ..write.gguf import GGUFFile, read_metadata
from . import CardText, Conversion, FitRow, Output, Recognised, Sink, catalog, get, resolve, take_options, usage

ARCH = "ideogram4"  # general.architecture; ComfyUI-GGUF PRs #455/#460 list it, #459 lists "ideogram" (`--arch`)
KEY_COMPONENT = "ideogram4.component"
KEY_CONFIG = "ideogram4.diffusers_config"  # the component's diffusers config.json, as JSON text
KEY_LAYOUT = "ideogram4.layout"
KEY_RECIPE = "ideoquant.recipe"
KEY_VERSION = "ideoquant.version"
LAYOUTS = catalog.GGUF_LAYOUTS
TYPES = catalog.GGUF_CHOICES
MIXTURES = catalog.GGUF_MIXTURES
FILE_TYPES = catalog.GGUF_FILE_TYPES
PLAIN = catalog.GGUF_PLAIN
FALLBACK = catalog.GGUF_FALLBACK
OTHER_DTYPE = "F32"  # norms, biases, the image-indicator embedding (small; F32 as ComfyUI-GGUF keeps them)


@dataclass(frozen=True)
class Options:
    label: str  # names the files and the file type: Q4_K, Q4_K_M, ...
    importance: "Importance | None" = None  # importance weights for ggml's weighted quantizers
    arch: str = ARCH  # written as general.architecture (only ComfyUI-GGUF reads it)


# What a layout's files will not do, said when they are written (recorded in the manifest, printed by the CLI).
LAYOUT_WARNINGS = {
    "diffusers": "--layout diffusers: these GGUF files use diffusers tensor names (to_q/to_k/to_v/to_out.0). "
                 "ComfyUI loads them with only 'missing/unexpected key' warnings and produces wrong images, "
                 "ComfyUI-GGUF (with an ideogram4 entry) crashes in the forward pass, and stable-diffusion.cpp has "
                 "no mapping for these names; only ideoquant.load_transformer (diffusers) runs them. Use the "
                 "default --layout original for ComfyUI and stable-diffusion.cpp.",
}


def check_arch(arch: str) -> str:
    """`general.architecture` as given: a short lowercase name (ideogram4, ideogram)."""
    if not re.fullmatch(r"[a-z][a-z0-9_.-]{0,63}", arch or ""):
        raise IdeoquantError(f"--arch '{arch}' is not an architecture name (lowercase letters, digits, '_', '-', "
                             "'.'; e.g. ideogram4 or ideogram)")
    return arch


def layout_warnings(layout: str) -> list[str]:
    return [LAYOUT_WARNINGS[layout]] if layout in LAYOUT_WARNINGS else []


def reader_warnings(plans: dict[str, ComponentPlan]) -> list[str]:
    """A warning when the files hold a type that only stable-diffusion.cpp reads (MXFP4, NVFP4, the IQ3/IQ2/IQ1
    family): diffusers refuses them, ComfyUI-GGUF decodes them only through gguf-py's numpy fallback."""
    only = sorted({t.dtype for p in plans.values() for t in p.tensors if t.dtype in catalog.GGUF_SDCPP_ONLY})
    if not only:
        return []
    return [f"{', '.join(only)}: only stable-diffusion.cpp reads {'this type' if len(only) == 1 else 'these types'}. "
            "diffusers (and so ideoquant.load_transformer) refuses these files, and ComfyUI-GGUF decodes them only "
            "through gguf-py's numpy fallback (very slow); IQ4_XS or IQ4_NL are read by all three."]


IMATRIX_HOWTO = ("make one with `ideoquant calibrate SOURCE --imatrix FILE` (or llama-imatrix / sd-cli) and pass "
                 "`--imatrix FILE`")


def needed_importance(recipes: list[Recipe]) -> list[str]:
    """The types these recipes name that are written only with an importance matrix."""
    named = {q for r in recipes for q in [r.type, *(t for _, t in r.rules)] if q}
    return sorted(q for q in named if q in ggml.registry.TYPES and ggml.registry.TYPES[q].needs_imatrix)


def check_importance(recipes: list[Recipe], imatrix: str | Path | None) -> None:
    """Refuse, before the source is read, a type that needs an importance matrix without a real one (`imatrix`: the
    `--imatrix` value). `ones` does not count: it satisfies ggml's assertion but carries no activation statistics,
    which is what these grids need (the README's importance-matrix section says why)."""
    needed = needed_importance(recipes)
    ones = imatrix is not None and str(imatrix).strip().lower() == "ones"
    if needed and (imatrix is None or ones):
        given = "--imatrix ones is not an importance matrix" if ones else "no --imatrix given"
        raise IdeoquantError(f"{', '.join(needed)} needs an importance matrix ({given}): {IMATRIX_HOWTO}")


def check_importance_coverage(plans: dict[str, ComponentPlan], importance: "Importance | None") -> None:
    """Every tensor planned in a type that needs importance weights must have them in the imatrix."""
    if importance is None or importance.matrix is None:
        return
    for name, plan in plans.items():
        for t in plan.tensors:
            if t.quantize and ggml.registry.TYPES[t.dtype].needs_imatrix and (
                    importance.vector(_imatrix_name(t), t.shape[-1], name == "unconditional_transformer") is None):
                raise IdeoquantError(f"the imatrix has no entry for {_imatrix_name(t)} ({name}), which {t.dtype} "
                                     f"needs: {IMATRIX_HOWTO} from this source, or give that tensor another type "
                                     f"with --type-rule")


def _imatrix_name(t: TensorPlan) -> str:
    """The original-layout name imatrix tools key a tensor by."""
    return model.diffusers_to_original(t.sources[0].name)[0]


@dataclass(frozen=True)
class Importance:
    """What `--imatrix` gave: all-ones weights (stable-diffusion.cpp's converter without a file), or a file's
    entries, turned into ggml's vector as llama-quantize (`llama`) or sd-cli (`sdcpp`) derives it."""

    matrix: object | None  # imatrix.ImportanceMatrix; None: all ones
    convention: str = "llama"
    record: dict | None = None  # for the manifest: file name, sha256, what it was computed from

    def vector(self, tensor: str, n_cols: int, uncond: bool) -> np.ndarray | None:
        from .. import imatrix

        if self.matrix is None:
            return imatrix.ones(n_cols)
        return imatrix.weights(self.matrix, tensor, n_cols, self.convention, uncond=uncond)


def load_importance(spec: str | Path | None, convention: str = "llama") -> Importance | None:
    """`--imatrix ones` or an imatrix file (llama.cpp GGUF or `.dat`, stable-diffusion.cpp `.dat`)."""
    from .. import imatrix
    from ..write.hashing import sha256_file

    if spec is None:
        return None
    if str(spec).strip().lower() == "ones":
        return Importance(None, convention, {"kind": "ones", "note": "every weight 1.0, as stable-diffusion.cpp's "
                                                                     "converter passes without an imatrix file"})
    path = Path(spec)
    if not path.is_file():
        raise IdeoquantError(f"no such imatrix file: {path} (give a file, or 'ones')")
    if convention not in imatrix.CONVENTIONS:
        raise IdeoquantError(f"unknown imatrix convention '{convention}': choose {', '.join(imatrix.CONVENTIONS)}")
    m = imatrix.read(path)
    return Importance(m, convention, {"kind": "file", "file": path.name, "sha256": sha256_file(path),
                                      "format": m.source_format, "convention": convention,
                                      "datasets": list(m.datasets), "chunk_count": m.chunk_count,
                                      "chunk_size": m.chunk_size, "entries": len(m.entries)})


def gguf_recipe(qtype: str | None = None, recipe: str | Recipe | None = None, type_rules=(), protect=(),
                no_protect=()) -> tuple[Recipe, str]:
    """`--type` is shorthand: a type name (q4_k, q8_0, bf16, ...) sets the base type of recipe `gguf` (or of the
    given recipe); a mixture (q4_k_m, ...) is a recipe of its own. Without a type (None) the recipe's own type is
    used (recipe `gguf`: Q4_K). Returns the recipe and the label that names the files (Q4_K, Q4_K_M, ...)."""
    if qtype is None:
        r = resolve(recipe or "gguf", protect, no_protect, None, type_rules)
        if r.format != FORMAT.name:
            raise IdeoquantError(f"recipe '{r.name}' is an {r.format} recipe; use it with "
                                 f"`ideoquant {get(r.format).command}`")
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


def gguf_filename(component: str, label: str, layout: str = "original") -> str:
    """`ideogram4-transformer-Q4_K.gguf`: names say component and type, and a layout other than the original
    (`ideogram4-transformer-Q4_K-diffusers.gguf`), which ComfyUI and stable-diffusion.cpp cannot use."""
    return f"ideogram4-{component}-{label}" + ("" if layout == "original" else f"-{layout}") + ".gguf"


def file_label(qtype_option: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "", qtype_option).upper()


def output_config(plan: ComponentPlan) -> dict:
    return {k: v for k, v in plan.component.config.items() if k not in ("_name_or_path", "quantization_config")}


class GGUFFormat:
    name = "gguf"
    command = "gguf"
    recipe_keys = frozenset({"type", "rules"})

    # ------------------------------------------------------------ recipe and options

    def parse_recipe(self, data, where: str) -> dict:
        return parse_type_table(data, where)

    def check_recipe(self, r: Recipe) -> None:
        if r.type is None:
            raise IdeoquantError(f"recipe '{r.name}': a gguf recipe needs 'type'")

    def conversion(self, recipe, protect, no_protect, options) -> Conversion:
        opts = take_options(self, recipe, options, qtype=None, type_rules=(), layout="original", imatrix=None,
                            imatrix_convention="llama", arch=ARCH)
        qtype, layout, arch = opts["qtype"], opts["layout"], opts["arch"]
        types = [t.strip() for t in qtype.split(",")] if isinstance(qtype, str) else list(qtype or [None])
        if len(types) > 1 and (len(set(t.lower() for t in types)) != len(types) or "" in types):
            raise IdeoquantError(f"--type lists each type once: {','.join(types)}")
        chosen = [gguf_recipe(t, recipe, opts["type_rules"], protect, no_protect) for t in types]
        check_arch(arch)
        check_importance([r for r, _ in chosen], opts["imatrix"])

        def outputs(src) -> list[Output]:
            importance = load_importance(opts["imatrix"], opts["imatrix_convention"])
            out = []
            for r, label in chosen:
                plans = {name: self.plan(c, r, layout) for name, c in src.components.items()}
                check_importance_coverage(plans, importance)
                extra = {"gguf": {"arch": arch, "layout": layout, "label": label},
                         "warnings": layout_warnings(layout) + reader_warnings(plans)}
                if importance is not None:
                    extra["imatrix"] = importance.record
                out.append(Output(r, plans, Options(label, importance, arch), label if len(chosen) > 1 else "",
                                  extra))
            return out

        return Conversion([r for r, _ in chosen], outputs, several=len(chosen) > 1, inputs=(opts["imatrix"],))

    def scheme(self, r: Recipe) -> str:
        rules = "".join(f", {t} for /{x}/" for x, t in r.rules)
        return f"GGUF {r.type} weight-only{rules} (ideoquant.gguf quantize + dequantize)"

    # ------------------------------------------------------------ plan

    def plan(self, component, recipe: Recipe, layout: str = "original") -> ComponentPlan:
        if recipe.format != self.name:
            raise IdeoquantError(f"recipe '{recipe.name}' is an {recipe.format} recipe; "
                                 f"use it with `ideoquant {get(recipe.format).command}`")
        if layout not in LAYOUTS:
            raise IdeoquantError(f"unknown layout '{layout}': choose original or diffusers")
        for qtype in [recipe.type, *(t for _, t in recipe.rules)]:
            if qtype not in ggml.QTYPES:  # recipes are checked when loaded; this guards a Recipe built in code
                raise IdeoquantError(f"unknown GGUF type '{qtype}': choose from "
                                     f"{', '.join(q.lower() for q in ggml.QTYPES)}")
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
            while qtype in FALLBACK and shape[-1] % ggml.type_size(qtype)[0]:
                qtype = FALLBACK[qtype]
            if qtype != wanted:
                why += f"; rows of {shape[-1]} are not a multiple of {ggml.type_size(wanted)[0]}, so {qtype}"
            if qtype in PLAIN:
                nbytes = numel(shape) * PLAIN[qtype]
            else:
                block, size = ggml.type_size(qtype)
                nbytes = numel(shape) // block * size
            tensors.append(TensorPlan(out, tuple(srcs), shape, qtype not in PLAIN, qtype, why, nbytes))
        return ComponentPlan(component, "gguf", layout, tensors, sorted(protected))

    # ------------------------------------------------------------ sink

    def write_component(self, plan: ComponentPlan, sink: Sink) -> tuple[list[dict], list[str]]:
        return self.write_components([(plan, sink)])[0]

    def write_components(self, jobs: list[tuple[ComponentPlan, Sink]]) -> list[tuple[list[dict], list[str]]]:
        """One component written to several outputs (one per type) from one read of the source: each block is read,
        checked and widened once, then encoded once per distinct type."""
        name = jobs[0][0].component.name
        files = []
        try:
            for plan, sink in jobs:
                label = sink.options.label
                files.append(GGUFFile(sink.staging / gguf_filename(name, label, plan.layout),
                                      check_arch(getattr(sink.options, "arch", ARCH)),
                                      gguf_metadata(plan, sink.source, sink.recipe, label),
                                      [(t.name, t.shape, t.dtype) for t in plan.tensors]))
            records = _write_tensors(jobs, files, name)
            for f in files:
                f.close()
        except BaseException:
            for f in files:
                f.abort()
            raise
        results = []
        for (plan, sink), f, recs in zip(jobs, files, records):
            sink.hasher.add_known(sink.key(f.path.name), f.path, f.sha256)
            folder = sink.staging / name
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(output_config(plan), indent=2, sort_keys=True) + "\n")
            sink.hasher.add(sink.key(f"{name}/config.json"), folder / "config.json")
            results.append((recs, [f.path.name, f"{name}/config.json"]))
        return results

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

    def recognise(self, path: Path) -> list[Recognised]:
        """A `.gguf` file (its backbone from `ideogram4.component`, else the file name), or a folder of them: one
        entry per type label; files of one folder and label are one variant."""
        files = [path] if path.suffix == ".gguf" and path.is_file() else sorted(path.glob("*.gguf")) if path.is_dir() \
            else []
        groups: dict[str, Recognised] = {}
        for f in files:
            meta = read_metadata(f)
            component = meta.get(KEY_COMPONENT) or next((c for c in sorted(model.COMPONENTS, key=len, reverse=True)
                                                           if f"-{c}-" in f.name), "transformer")
            if component not in model.COMPONENTS:
                raise IdeoquantError(f"{f.name}: component '{component}' is not an Ideogram 4 backbone")
            label = f.stem.split(f"-{component}-", 1)[-1] if f"-{component}-" in f.stem else f.stem
            group = groups.setdefault(label, Recognised({}, label, f.parent.resolve()))
            if component in group.paths and group.paths[component] != f:
                raise IdeoquantError(f"two {component} files for one variant: {group.paths[component]} and {f}")
            group.paths[component] = f
        return list(groups.values())

    def load(self, path: Path, compute_dtype: torch.dtype) -> torch.nn.Module:
        return load_gguf_transformer(path, compute_dtype)

    def check_loaded(self, folder: Path, comp: dict, m) -> list[str]:
        return []  # the loader itself checks every tensor against the model (names and shapes)

    # ------------------------------------------------------------ evaluation, inspect, model card

    def fake_quantize(self, m: torch.nn.Module, types, threads: int | None = None) -> dict:
        """Each weight quantized and dequantized at its planned type (`ideoquant.gguf`), which is what diffusers'
        GGUFLinear computes with; plain types (BF16, F16) leave the weight as is."""
        from .. import gguf as gguf_api

        needs = sorted({q for q in types.values() if ggml.registry.TYPES[q].needs_imatrix})
        if needs:  # no importance weights here: ggml asserts them, or the type is not worth measuring without
            raise IdeoquantError(f"{', '.join(needs)} needs an importance matrix, which this measurement does not "
                                 "have: measure with another type (e.g. iq4_xs)")
        modules = dict(m.named_modules())
        saved = {}
        for n, qtype in types.items():
            if ggml.registry.TYPES[qtype].plain:
                continue
            mod = modules[n]
            w = mod.weight
            saved[n] = w
            q = gguf_api.quantize(w.detach().float().cpu().numpy(), qtype, threads=threads)
            deq = torch.from_numpy(ggml.dequantize(q, qtype)).reshape(w.shape).to(device=w.device, dtype=w.dtype)
            mod.weight = torch.nn.Parameter(deq, requires_grad=False)
        return saved

    def fit_rows(self) -> list[FitRow]:
        return [FitRow(t, gguf_recipe(t)[0]) for t in TYPES]


    def card(self, m: dict, repo_id: str, base: str, device: str = usage.CARD_DEVICE,
             call: dict | None = None, folder: str = "") -> CardText:
        comps = list(m["components"])
        types = gguf_types(m)
        recipe = m.get("recipe", {})
        files = {c: usage.in_folder(folder, _gguf_file(m["components"][c])) for c in comps}
        backbones = [f"{c} = ideoquant.load_transformer(hf_hub_download({usage.py(repo_id)}, {usage.py(files[c])}))"
                     for c in comps]
        code = usage.pipeline_snippet(["from diffusers import Ideogram4Pipeline",
                                       "from huggingface_hub import hf_hub_download", "import ideoquant"],
                                      backbones, comps, base, device, call)
        lines = ["```python", code, "```", "",
                 "Stock diffusers 0.42 cannot read an Ideogram 4 GGUF file (`from_single_file` does not support the "
                 "class yet), so `ideoquant.load_transformer` builds each backbone with diffusers' own GGUF layers "
                 "(`pip install ideoquant`); the weights stay quantized and are dequantized per layer at run time.",
                 ""]
        lines += [f"**{w}**\n" for w in m.get("warnings") or [] if w.startswith(tuple(catalog.GGUF_SDCPP_ONLY))]
        layouts = {c["output_layout"] for c in m["components"].values()}
        arch = m.get("gguf", {}).get("arch", ARCH)
        if layouts == {"original"}:
            lines += ["The files use the original Ideogram 4 layout (fused `attention.qkv`, `attention.o`), one file "
                      "per backbone: `transformer` is the conditional model, `unconditional_transformer` the "
                      "unconditional one.", "",
                      "- **stable-diffusion.cpp** loads them: `--diffusion-model` (transformer) and "
                      "`--uncond-diffusion-model` (unconditional_transformer). It recognises the model by its tensor "
                      "names and does not read `general.architecture`.",
                      f"- **ComfyUI** builds its Ideogram 4 model from these tensors, but needs ComfyUI-GGUF to read "
                      f"GGUF, and ComfyUI-GGUF as released refuses architectures it does not list: these files say "
                      f"`general.architecture = {arch}`, which its pull requests #455 and #460 add (#459 adds "
                      f"`ideogram`; `ideoquant gguf --arch ideogram` writes that spelling).", ""]
        else:
            lines += ["**These files use diffusers tensor names** (`--layout diffusers`): only diffusers (through "
                      "ideoquant) runs them. ComfyUI loads them with warnings and produces wrong images, and "
                      "stable-diffusion.cpp does not map these names; use the original layout "
                      "(`ideoquant gguf --layout original`) for those.", ""]
        im = m.get("imatrix") or {}
        if im.get("kind") == "ones":
            lines.append("The quantized bytes equal ggml's weighted quantizers with all-ones importance weights "
                         "(`ggml_quantize_chunk` with an imatrix of ones): what stable-diffusion.cpp's own converter "
                         "writes.")
        elif im:
            lines.append(f"The quantized bytes equal ggml's weighted quantizers (`ggml_quantize_chunk` with an "
                         f"importance matrix): `{im.get('file')}` (sha256 `{im.get('sha256')}`), computed from "
                         f"{', '.join(im.get('datasets') or ['unrecorded inputs'])}, weights derived as "
                         f"{'llama-quantize' if im.get('convention') == 'llama' else 'sd-cli'} does.")
        else:
            lines.append("The quantized bytes equal ggml's reference quantizers (`quantize_row_*_ref`, no importance "
                         "weights). stable-diffusion.cpp's own converter uses ggml's weighted path with all-ones "
                         "weights, so its bytes differ slightly (`ideoquant gguf --imatrix ones` writes those); "
                         "Q8_0 bytes are identical.")
        rules = recipe.get("rules") or {}
        recipe_lines = [f"Base type `{recipe.get('type')}`"
                        + (", rules: " + ", ".join(f"`{r}` → {t}" for r, t in rules.items()) if rules else "") + ".",
                        ""]
        # library_name: none; the Hub detects GGUF from the files
        return CardText("GGUF " + ", ".join(t.upper() for t in types), ["gguf", *types], None, recipe_lines,
                        "\n".join(lines).rstrip())


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


# The manifest's per-tensor SQNR: exact (every row decoded) for a tensor of at most EXACT_SQNR_ELEMENTS elements,
# where decoding costs about what encoding does (Q4_K: ~85 M elements per CPU-second, so ~12 ms for the largest;
# this covers every tensor of the tiny models and the real model's norms and small projections); above it, an
# estimate from every row block's rows 0, k, 2k, ... with k rows about SAMPLE_ELEMENTS elements (one row in 113 of a
# 4608-wide tensor, whatever the block size), whose count the manifest records (sqnr_sample_rows).
EXACT_SQNR_ELEMENTS = 1 << 20
SAMPLE_ELEMENTS = 1 << 19


class _Output:
    """One output file of a component: its planned tensors, importance vectors, open file and running state."""

    def __init__(self, plan: ComponentPlan, sink: Sink, f: GGUFFile, uncond: bool):
        self.tensors, self.file, self.sink = plan.tensors, f, sink
        importance: Importance | None = sink.options.importance
        self.importance = importance
        # ggml's importance vector per tensor, keyed by the original-layout name the imatrix tools use.
        self.vectors = [importance.vector(_imatrix_name(t), t.shape[-1], uncond)
                        if importance is not None and t.quantize and ggml.has_imatrix_path(t.dtype) else None
                        for t in plan.tensors]
        self.stats = [ErrorStats() for _ in plan.tensors]
        self.measured_rows = [0 for _ in plan.tensors]
        self.records: list[dict] = []

    def row_bytes(self, i: int) -> int:
        t = self.tensors[i]
        return t.bytes_out // t.shape[0] if len(t.shape) > 1 else t.bytes_out


def _write_tensors(jobs: list[tuple[ComponentPlan, Sink]], files: list[GGUFFile], component: str) -> list[list[dict]]:
    """Every row block of every tensor encoded on the pool and written to its place in each output file by the worker
    that encoded it, in one stream: memory is a few blocks, and no thread waits for another's write."""
    uncond = component == "unconditional_transformer"
    outputs = [_Output(plan, sink, f, uncond) for (plan, sink), f in zip(jobs, files)]
    first = outputs[0]
    for o in outputs[1:]:
        if [(t.name, t.shape) for t in o.tensors] != [(t.name, t.shape) for t in first.tensors]:
            raise IdeoquantError("outputs of one pass must share the tensor layout (one --layout for every --type)")
    pool, reporter = first.sink.pool, first.sink.reporter
    remaining = [sum(1 for _ in row_blocks([t], first.sink.block_elements)) for t in first.tensors]
    offsets: dict[tuple[int, int], int] = {}  # (tensor, source index) -> first row of that source in the tensor
    for i, t in enumerate(first.tensors):
        row = 0
        for k, s in enumerate(t.sources):
            offsets[i, k] = row
            row += s.shape[0] if s.shape else 0
    maps = FileMaps(first.sink.source.reads)
    exact_sqnr = [numel(t.shape) <= EXACT_SQNR_ELEMENTS for t in first.tensors]

    def blocks():
        for i, t in enumerate(first.tensors):
            for k, s in enumerate(t.sources):
                for rows in s.row_ranges(first.sink.block_elements):
                    yield i, k, s, rows

    def encode(block):
        i, k, src, rows = block
        ws = pool.workspace()
        name = first.tensors[i].name
        fp8 = src.scale is not None and rows is not None
        q8_0 = None  # FP8 rows' Q8_0 bytes, encoded in the dequantization's call while each slice is in cache
        if fp8:
            shape = (rows[1] - rows[0], *src.shape[1:])
            out = ws.take("fp8", shape, torch.float32)
            wants_q8_0 = next((o for o in outputs if o.tensors[i].dtype == "Q8_0"), None)
            if wants_q8_0 is not None and len(shape) == 2 and ggml.can_quantize("Q8_0", shape[1]):
                q8_0 = ws.take("gguf Q8_0 from fp8", (shape[0], wants_q8_0.row_bytes(i)), torch.uint8).numpy()
                data = dequantize_fp8r(*src.read_fp8(rows, maps), out, src.name, q8_0=q8_0)
            else:
                data = src.read(rows, maps, out)
        else:
            data = src.read(rows, maps)
        if src.scale is None:  # FP8 is checked for NaN/Inf as it is dequantized
            check_finite(name, data)
        x = _float32_rows(data, ws)
        start = offsets[i, k] + (rows[0] if rows else 0)
        done_types: dict[tuple, tuple[np.ndarray, float, float]] = {}
        energies = []
        for o in outputs:
            t, vec = o.tensors[i], o.vectors[i]
            rb = o.row_bytes(i)
            key = (t.dtype, id(vec))
            if key not in done_types:  # outputs wanting the same bytes share one encode
                if t.dtype == "Q8_0" and q8_0 is not None:  # Q8_0 has no weighted path: vec makes no difference
                    dest = q8_0
                else:
                    dest = ws.take(f"gguf {t.dtype} {len(done_types)}", (x.shape[0], rb), torch.uint8).numpy()
                    _encode_rows(data, x, t.dtype, vec, dest)
                done_types[key] = (dest, *_error_energies(x, dest, t.dtype, exact_sqnr[i]))
            dest, signal, noise, measured = done_types[key]
            o.file.write(t.name, dest, start * rb)
            energies.append((signal, noise, measured))
        maps.release(src, rows)
        return energies, x.size

    def done(block, result) -> None:
        i, _, src, _ = block
        energies, n = result
        reporter.advance(component, src.nbytes * n // max(1, numel(src.shape)))
        remaining[i] -= 1
        for o, (signal, noise, measured) in zip(outputs, energies):
            o.stats[i].add_energies(signal, noise)
            o.measured_rows[i] += measured
            if remaining[i] == 0:
                t = o.tensors[i]
                sampled = not exact_sqnr[i] and t.dtype != "F32"  # F32 is exact by construction
                record = manifest.tensor_record(t, o.stats[i].sqnr_db, o.measured_rows[i] if sampled else None)
                if o.importance is not None and t.quantize:
                    record["imatrix"] = o.vectors[i] is not None  # False: not in the file, ggml's unweighted path
                o.records.append(record)

    try:
        pool.run(encode, blocks(), done)
    finally:
        maps.close()
    for o in outputs:
        if len(o.records) != len(o.tensors):
            raise RuntimeError(f"GGUF {component}: encoded {len(o.records)} of {len(o.tensors)} planned tensors")
    return [o.records for o in outputs]


def _float32_rows(data: torch.Tensor, ws) -> np.ndarray:
    """The block as float32 rows [r, cols] (a view when it already is; bf16 widened in this thread's buffer)."""
    cols = data.shape[-1] if data.dim() else 1
    if data.dtype == torch.float32:
        return data.reshape(-1, cols).contiguous().numpy()
    out = ws.take("f32", (data.numel() // cols, cols), torch.float32).numpy()
    if data.dtype == torch.bfloat16:
        kernels.widen_bf16(data.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(out.shape), out)
    else:
        out[...] = data.reshape(out.shape).numpy()
    return out


def _encode_rows(data: torch.Tensor, x: np.ndarray, dtype: str, vec, dest: np.ndarray) -> None:
    """The GGUF bytes of these rows into `dest` [r, row bytes]."""
    if dtype == "F32":
        dest.view(np.float32)[...] = x
    elif dtype == "BF16" and data.dtype == torch.bfloat16:  # bf16 kept as bf16: the same bits
        dest.view(np.uint16)[...] = data.reshape(x.shape).contiguous().view(torch.int16).numpy().view(np.uint16)
    else:
        ggml.encode(x, dtype, vec, out=dest)


def _error_energies(x: np.ndarray, q: np.ndarray, dtype: str, exact: bool) -> tuple[float, float, int]:
    """Signal and noise energies of the block's rows, and how many rows they cover: every row when `exact`, else one
    row per SAMPLE_ELEMENTS elements. F32 is exact by construction: no noise, nothing measured."""
    if dtype == "F32":
        return 0.0, 0.0, 0
    step = 1 if exact else max(1, SAMPLE_ELEMENTS // x.shape[-1])
    ref = np.ascontiguousarray(x[::step])
    diff = (ggml.decode(np.ascontiguousarray(q[::step]), dtype).reshape(ref.shape) - ref).reshape(-1)
    rows = ref.shape[0]
    ref = ref.reshape(-1)
    return float(np.dot(ref, ref)), float(np.dot(diff, diff)), rows


def load_gguf_transformer(path: str | Path, compute_dtype: torch.dtype = torch.bfloat16, config: dict | None = None):
    """An Ideogram4Transformer2DModel from a GGUF file of either layout (original fused qkv, or diffusers names).

    The config comes from the file's `ideogram4.diffusers_config` key, else from `config`, else from the tensor
    shapes. Quantized linear weights stay quantized (GGUFLinear dequantizes per forward pass).
    """
    from accelerate import init_empty_weights
    from diffusers import GGUFQuantizationConfig, Ideogram4Transformer2DModel
    from diffusers.models.model_loading_utils import load_gguf_checkpoint, load_model_dict_into_meta
    from diffusers.quantizers import DiffusersAutoQuantizer
    from diffusers.quantizers.gguf.utils import GGUFParameter

    path = Path(path)
    if not path.is_file():
        raise IdeoquantError(f"no such GGUF file: {path}")
    meta = read_metadata(path)
    try:
        checkpoint = load_gguf_checkpoint(str(path))
    except (ValueError, OSError) as e:
        raise IdeoquantError(f"cannot load GGUF file {path}: {str(e).splitlines()[0]}") from None
    state = {}
    for name, t in checkpoint.items():
        parts = model.original_to_diffusers(name)
        if len(parts) == 1:
            state[parts[0][0]] = t
            continue
        rows = t.shape[0] // len(parts)  # GGUF quants are per row: row blocks of the bytes are row blocks of the weight
        for new, i in parts:
            piece = t.data[i * rows : (i + 1) * rows].clone()
            state[new] = GGUFParameter(piece, quant_type=t.quant_type) if isinstance(t, GGUFParameter) else piece
    if config is None and KEY_CONFIG in meta:
        config = json.loads(meta[KEY_CONFIG])
    if config is None:
        shapes = {k: _logical_shape(v) for k, v in state.items()}
        config = model.infer_config(shapes)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    quantizer = DiffusersAutoQuantizer.from_config(GGUFQuantizationConfig(compute_dtype=compute_dtype))
    with init_empty_weights():
        m = Ideogram4Transformer2DModel.from_config(config)
    expected = set(m.state_dict())
    missing = sorted(expected - set(state))
    if missing or set(state) - expected:
        raise IdeoquantError(f"{path.name} is not an Ideogram 4 backbone for this config "
                             f"(missing {missing[:1]}, unexpected {sorted(set(state) - expected)[:1]})")
    quantizer.preprocess_model(model=m, device_map=None, state_dict=state, keep_in_fp32_modules=[])
    load_model_dict_into_meta(m, state, dtype=compute_dtype, device_map={"": torch.device("cpu")},
                              hf_quantizer=quantizer, keep_in_fp32_modules=[], unexpected_keys=[])
    quantizer.postprocess_model(m)
    m.hf_quantizer = quantizer
    return m.eval()


def _logical_shape(t) -> tuple[int, ...]:
    return tuple(getattr(t, "quant_shape", None) or t.shape)


FORMAT = GGUFFormat()
