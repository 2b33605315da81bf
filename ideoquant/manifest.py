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


def tensor_record(t: TensorPlan, sqnr_db: float | None) -> dict:
    return {
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


def component_record(plan: ComponentPlan, tensors: list[dict], files: list[str], seconds: float) -> dict:
    c = plan.component
    quantized = [t["sqnr_db"] for t in tensors if t["decision"] == "quantized" and t["sqnr_db"] is not None]
    return {
        "source_layout": c.layout,
        "source_format": "fp8-per-row" if c.fp8 else sorted({t["dtype_in"] for t in tensors}),
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
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IdeoquantError(f"no {MANIFEST} in {folder}: not an ideoquant output folder")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise IdeoquantError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA or "files" not in m:
        raise IdeoquantError(f"{path} is not an ideoquant manifest (schema {SCHEMA})")
    return m
