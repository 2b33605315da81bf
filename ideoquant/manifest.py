"""Manifest: `ideoquant.json`, one record per output, filled as tensors pass through and written last.

`verify` and `upload` read it back; it is the single description of what an output folder holds.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
from pathlib import Path

from .errors import IdeoquantError
from .plan import ComponentPlan, TensorPlan

MANIFEST = "ideoquant.json"
SCHEMA = 1
_LIBS = ("ideoquant", "torch", "torchao", "diffusers", "safetensors", "gguf", "huggingface_hub", "numpy")


def tool_versions() -> dict[str, str]:
    out = {}
    for lib in _LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def tensor_record(t: TensorPlan, sqnr_db: float | None, sqnr_sample_rows: int | None = None) -> dict:
    """One tensor of the manifest. `sqnr_db` is exact (every element) unless `sqnr_sample_rows` is given: then it is
    an estimate from that many rows, recorded as `sqnr_sample_rows`."""
    record = {
        "name": t.name,
        "sources": [s.name for s in t.sources] if len(t.sources) > 1 or t.sources[0].name != t.name else None,
        "shape": list(t.shape),
        "dtype_in": t.source_dtype,
        "dtype_out": t.dtype,
        "decision": "quantized" if t.quantize else "kept",
        "reason": t.reason,
        "bytes_in": t.bytes_in,
        "bytes_out": t.bytes_out,
        "sqnr_db": sqnr_db,  # null: bit-exact
    }
    if sqnr_sample_rows is not None:
        record["sqnr_sample_rows"] = sqnr_sample_rows
    return record


def component_record(plan: ComponentPlan, tensors: list[dict], files: list[str], seconds: float) -> dict:
    c = plan.component
    quantized = [t["sqnr_db"] for t in tensors if t["decision"] == "quantized" and t["sqnr_db"] is not None]
    return {
        "source_layout": c.layout,
        "source_format": _source_format(c, tensors),
        "output_layout": plan.layout,
        "config": {k: v for k, v in c.config.items() if k not in ("_name_or_path", "quantization_config")},
        "protected_modules": plan.protected,
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "tensors_quantized": sum(t["decision"] == "quantized" for t in tensors),
        "tensors_kept": sum(t["decision"] == "kept" for t in tensors),
        "weight_sqnr_db_min": min(quantized) if quantized else None,
        "weight_sqnr_db_mean": round(sum(quantized) / len(quantized), 3) if quantized else None,
        "seconds": round(seconds, 2),
        "files": files,
        "tensors": tensors,
    }


def build(kind: str, recipe: dict, source: dict, components: dict, files: dict[str, dict], extra=None) -> dict:
    m = {
        "schema": SCHEMA,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": tool_versions(),
        "recipe": recipe,
        "source": source,
        "components": components,
        "files": files,  # relative path -> {"size", "sha256"}; every file in the folder but this one
    }
    if extra:
        m.update(extra)
    m["summary"] = {
        "bytes_in": sum(c["bytes_in"] for c in components.values()),
        "bytes_out": sum(f["size"] for f in files.values()),
        "seconds": round(sum(c["seconds"] for c in components.values()), 2),
    }
    return m


def write(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return path


def read(folder: Path) -> dict:
    """The manifest of an output folder, validated against its schema: anything else is an IdeoquantError naming
    the file and the first field of the wrong shape."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IdeoquantError(f"no {MANIFEST} in {folder}: not an ideoquant output folder")
    try:
        m = json.loads(path.read_text(), parse_constant=_no_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise IdeoquantError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA or "files" not in m:
        raise IdeoquantError(f"{path} is not an ideoquant manifest (schema {SCHEMA})")
    problem = _check(m, _MANIFEST_SCHEMA, "")
    if problem:
        raise IdeoquantError(f"{path} is not a valid ideoquant manifest: {problem}")
    return m


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# ---------------------------------------------------------------- schema
# A small structural schema: a type (or tuple of types), {"key": schema} for objects (keys ending in "?" optional),
# ("dict", value schema) for objects with free keys, ("list", item schema) for lists, ("enum", values).

_INT = ("int",)
_NUM = ("num",)
_STR = ("str",)
_OPT = lambda s: ("opt", s)  # noqa: E731  (None allowed)

_TENSOR = {"name": _STR, "shape": ("list", _INT), "decision": ("enum", ("quantized", "kept")), "dtype_out": _STR,
           "dtype_in?": _OPT(_STR), "reason?": _OPT(_STR), "bytes_in?": _INT, "bytes_out?": _INT,
           "sqnr_db?": _OPT(_NUM), "sqnr_sample_rows?": _INT, "sources?": _OPT(("list", _STR))}
_COMPONENT = {"files": ("list", _STR), "tensors": ("list", _TENSOR), "protected_modules?": ("list", _STR),
              "output_layout?": _OPT(_STR), "source_layout?": _OPT(_STR), "config?": ("dict", ("any",)),
              "bytes_in?": _INT, "bytes_out?": _INT, "tensors_quantized?": _INT, "tensors_kept?": _INT,
              "weight_sqnr_db_min?": _OPT(_NUM), "weight_sqnr_db_mean?": _OPT(_NUM), "seconds?": _NUM}
_MANIFEST_SCHEMA = {
    "schema": _INT, "kind": _STR, "created?": _OPT(_STR), "tool?": ("dict", _OPT(_STR)),
    "recipe?": ("dict", ("any",)), "source?": ("dict", ("any",)),
    "components": ("dict", _COMPONENT),
    "files": ("dict", {"size": _INT, "sha256": _STR}),
    "summary?": ("dict", ("any",)), "smoothquant?": _OPT(("dict", ("any",))),
}


def _check(value, schema, where: str) -> str | None:
    """The first mismatch as 'FIELD: expected ..., got ...', or None."""
    at = where or "the top level"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{at}: expected an object, got {_kind(value)}"
        for key, sub in schema.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return f"{where + '.' if where else ''}{name}: missing"
            problem = _check(value[name], sub, f"{where + '.' if where else ''}{name}")
            if problem:
                return problem
        return None
    tag = schema[0]
    if tag == "any":
        return None
    if tag == "opt":
        return None if value is None else _check(value, schema[1], where)
    if tag == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else f"{at}: expected a whole number >= 0, got {_kind(value)}"
    if tag == "num":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{at}: expected a number, got {_kind(value)}"
    if tag == "str":
        return None if isinstance(value, str) else f"{at}: expected a string, got {_kind(value)}"
    if tag == "enum":
        return None if value in schema[1] else f"{at}: expected one of {', '.join(schema[1])}, got {_kind(value)}"
    if tag == "list":
        if not isinstance(value, list):
            return f"{at}: expected a list, got {_kind(value)}"
        for i, item in enumerate(value):
            problem = _check(item, schema[1], f"{where}[{i}]")
            if problem:
                return problem
        return None
    if tag == "dict":
        if not isinstance(value, dict):
            return f"{at}: expected an object, got {_kind(value)}"
        for k, item in value.items():
            problem = _check(item, schema[1], f"{where}.{k}" if where else k)
            if problem:
                return problem
        return None
    raise AssertionError(schema)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return {"list": "a list", "dict": "an object"}.get(type(value).__name__, type(value).__name__)


def _source_format(c, tensors: list[dict]) -> str | list[str]:
    """`fp8-per-row` (the official release), `fp8-per-tensor` (ComfyUI's scaled files), else the stored dtypes."""
    scales = [t.scale for t in c.tensors.values() if t.scale is not None]
    if not scales:
        return sorted({t["dtype_in"] for t in tensors})
    per_row = all(s.shape and s.shape[0] > 1 for s in scales)
    return "fp8-per-row" if per_row else "fp8-per-tensor"
