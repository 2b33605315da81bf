"""The REPORT folder and `results.json`, the bench's stable interface.

REPORT/
  settings.json          what must match for a rerun to resume (written first)
  images/<variant>/<prompt id>-<seed>.png   one image each, written the moment it exists (PNG text: prompt, seed,
                                            variant, steps, guidance, size, seconds)
  timings/<variant>-<rank>.json   load seconds, peak GPU memory and weight bytes of each process's last load
  scores.jsonl           per-image scores, appended as computed, reused on a rerun when the images are the same
  results.json           the result (below); summary.md and index.html are made from it

results.json (schema 1; fields are only ever added; docs/bench.md is its user-facing description):

    {"schema": 1,
     "settings": {...settings.json...},
     "images": [{"variant", "prompt_id", "seed", "path" (relative to REPORT), "metrics": {name: value},
                 "ocr_text" (what OCR read; prompts with a text only)}],
     "summary": {variant: {metric: {"mean", "n", "delta_vs_reference", "ci_low", "ci_high", "verdict",
                                    "vs": {baseline: {"delta", "ci_low", "ci_high", "n", "verdict"}}}}},
     "metrics": {name: {"higher_is_better", "against_reference", "model"}},
     "prompts": [{"id", "prompt", "text", "group"}],
     "variants": [{"name", "kind", "what"}]}

Metric names are those of `--metrics`: psnr, ssim, lpips (each image against the reference image of the same
prompt and seed), clip, pick (image against its prompt), ocr_ned, ocr_exact (the OCR read against the prompt's
`text`); per variant also seconds_per_image, seconds_per_step, load_seconds, peak_memory_bytes and weight_bytes
(each with "mean" and "n"; the rest null). `delta_vs_reference` is the mean paired same-seed difference
variant - reference with its bootstrap 95 % CI (`ci_low`, `ci_high`); for the metrics measured against the
reference it is null and the CI is that of the mean. `verdict`: "indistinguishable from the reference" when the CI
holds 0, else "better" or "worse" (by the metric's direction); `vs` holds the same paired comparison against each
baseline variant.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from ..errors import IdeoquantError

SCHEMA = 1
SETTINGS = "settings.json"
RESULTS = "results.json"
SCORES = "scores.jsonl"
IMAGES = "images"
TIMINGS = "timings"


def prompts_digest(prompts) -> str:
    data = json.dumps([asdict(p) for p in prompts], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


def image_path(report: Path, variant: str, prompt_id: str, seed: int) -> Path:
    return Path(report) / IMAGES / variant / f"{prompt_id}-{seed}.png"


def check_settings(report: Path, settings: dict) -> bool:
    """True when REPORT already holds a run with these settings (resume), False when it holds none; a run made with
    other settings is refused with one line naming the first setting that differs."""
    path = Path(report) / SETTINGS
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IdeoquantError(f"cannot read {path}: {e}; use --overwrite to start the report afresh") from None
    for key in sorted(set(old) | set(settings)):
        if old.get(key) != settings.get(key):
            raise IdeoquantError(f"{report} was made with other settings: {key} is {_show(old.get(key))} there, "
                                 f"{_show(settings.get(key))} here (use another --out, or --overwrite to start afresh)")
    return True


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def write_json(path: Path, obj) -> None:
    """Whole or not at all: a temporary file beside it, renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class ScoreCache:
    """Per-image scores in REPORT/scores.jsonl, one line per (image, metric), appended as each is computed and
    flushed, so a killed run loses at most the line being written (a torn last line is ignored). A score is reused
    only for the same key (the image bytes, the reference image's bytes and the metric model)."""

    def __init__(self, report: Path):
        self.path = Path(report) / SCORES
        self.scores: dict[tuple, tuple[str, float | None]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    r = json.loads(line)
                    self.scores[(r["variant"], r["prompt_id"], r["seed"], r["metric"])] = (r["key"], r["value"])
                except (ValueError, KeyError, TypeError):
                    continue  # the torn last line of a killed run
        self._file = None

    def get(self, variant: str, prompt_id: str, seed: int, metric: str, key: str):
        """(True, value) when cached for this key, else (False, None)."""
        hit = self.scores.get((variant, prompt_id, seed, metric))
        return (True, hit[1]) if hit is not None and hit[0] == key else (False, None)

    def put(self, variant: str, prompt_id: str, seed: int, metric: str, key: str, value: float | None) -> None:
        self.scores[(variant, prompt_id, seed, metric)] = (key, value)
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  closed in close()
        self._file.write(json.dumps({"variant": variant, "prompt_id": prompt_id, "seed": seed, "metric": metric,
                                     "key": key, "value": value}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
