"""Side files ideoquant writes and reads back (SmoothQuant statistics, captured evaluation inputs): safetensors
files whose header carries a JSON record under an ideoquant key, so a file from elsewhere is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import IdeoquantError


def read(path: str | Path, key: str, what: str, writer: str):
    """(the JSON record under `key`, {tensor name: tensor}) of a side file; `what` names it in errors, `writer` is
    the command that writes it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise IdeoquantError(f"no such {what} file: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if key not in meta:
                raise IdeoquantError(f"{path} was not written by `{writer}` (no {key} metadata)")
            record = json.loads(meta[key])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError) as e:
        raise IdeoquantError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(record, dict):
        raise IdeoquantError(f"cannot read {path}: its {key} metadata is not a JSON object")
    return record, tensors
