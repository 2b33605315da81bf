#!/usr/bin/env python
"""What an importance matrix buys, measured end to end on the tiny Ideogram 4 with activation-outlier channels.

The model (`testing.build_outlier_checkpoint`) computes the same function as the plain tiny model, but a few input
channels of q/k/v, w1/w3 and llm_cond_proj carry 100x activations read by 100x smaller weight columns, as outlier
channels arise in real transformers. It is calibrated once (`calibrate --imatrix`, sample inputs, seed 0), then
exported at each type with no imatrix, with all-ones weights (stable-diffusion.cpp's converter) and with the
calibrated matrix, and every export is evaluated on held-out inputs (seed 1) against the source: velocity SQNR per
backbone and of the guided velocity g*v_cond + (1-g)*v_uncond (g = 7).

    python scripts/imatrix_eval.py [--types q4_k,q3_k] [--out docs/imatrix_eval.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch

    import ideoquant
    from ideoquant import testing
    from ideoquant.evaluation.calibrate import calibrate_imatrix
    from ideoquant.evaluation.evaluate import evaluate
    from ideoquant.evaluation.inputs import sample_calls
    from ideoquant.formatting import db

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="q4_k,q3_k,q4_k_m")
    ap.add_argument("--out", default=str(ROOT / "docs" / "imatrix_eval.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sample = dict(steps=2, tokens=8, grid=4, batch=2)
    root = Path(tempfile.mkdtemp(prefix="ideoquant-imatrix-"))
    src = testing.build_outlier_checkpoint(root / "src")
    calibrate_imatrix(str(src), root / "calibrated.imatrix.gguf",
                      inputs=sample_calls(testing.TINY_CONFIG, seed=0, **sample))
    outs = []
    for t in a.types.split(","):
        for label, im in (("none", None), ("ones", "ones"), ("calibrated", root / "calibrated.imatrix.gguf")):
            outs.append(root / f"{t}-{label}")
            ideoquant.convert_gguf(str(src), outs[-1], qtype=t, imatrix=im)
    report = evaluate(str(src), outs, baselines=[], inputs=sample_calls(testing.TINY_CONFIG, seed=1, **sample),
                      layer_rows=8)
    rows = ["| type | imatrix | cond SQNR | uncond SQNR | guided SQNR |", "| --- | --- | ---: | ---: | ---: |"]
    for v in report["variants"]:
        t, label = v["name"].rsplit("-", 1)
        c = [x["sqnr_db"] for x in v["components"].values()]
        rows.append(f"| {t.upper()} | {label} | {db(c[0])} | {db(c[1])} | {db(v['guided']['sqnr_db'])} |")
    text = "\n".join(["# Importance matrix on the outlier model", "",
                      f"`python scripts/imatrix_eval.py --types {a.types}`", "", *rows]) + "\n"
    print(text)
    if a.out != "-":
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
