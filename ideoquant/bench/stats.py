"""Paired same-seed statistics: the mean difference of two variants over the (prompt, seed) pairs both have, with a
bootstrap 95 % confidence interval (scipy's `stats.bootstrap`, paired, BCa, a fixed seed), and a plain verdict."""

from __future__ import annotations

import math

import numpy as np

from .metrics import AGAINST_REFERENCE, HIGHER_IS_BETTER

CONFIDENCE = 0.95
RESAMPLES = 9999
SEED = 0
PERFORMANCE = ("seconds_per_image", "seconds_per_step", "load_seconds", "peak_memory_bytes", "weight_bytes")


def paired_ci(a, b, seed: int = SEED) -> tuple[float, float, float]:
    """(mean of a - b, CI low, CI high) over paired samples a[i], b[i]."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a - b
    delta = float(d.mean())
    if len(d) < 2 or np.all(d == d[0]):  # no spread: the bootstrap distribution is one point
        return delta, delta, delta
    res = stats.bootstrap((a, b), _mean_difference, paired=True, vectorized=True, confidence_level=CONFIDENCE,
                          n_resamples=RESAMPLES, method="BCa", rng=np.random.default_rng(seed))
    low, high = (float(x) for x in (res.confidence_interval.low, res.confidence_interval.high))
    return delta, _finite(low, delta), _finite(high, delta)


def mean_ci(x, seed: int = SEED) -> tuple[float, float, float]:
    """(mean, CI low, CI high) of one sample."""
    from scipy import stats

    x = np.asarray(x, dtype=float)
    mean = float(x.mean())
    if len(x) < 2 or np.all(x == x[0]):
        return mean, mean, mean
    res = stats.bootstrap((x,), np.mean, vectorized=True, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
                          method="BCa", rng=np.random.default_rng(seed))
    return mean, _finite(float(res.confidence_interval.low), mean), _finite(float(res.confidence_interval.high), mean)


def _mean_difference(a, b, axis=-1):
    return np.mean(a - b, axis=axis)


def _finite(x: float, fallback: float) -> float:
    return x if math.isfinite(x) else fallback


def verdict(metric: str, low: float, high: float, other: str = "the reference") -> str:
    if low <= 0 <= high:
        return f"indistinguishable from {other}"
    up = low > 0
    return "better" if up == HIGHER_IS_BETTER[metric] else "worse"


def summarize(scores: dict[str, dict[tuple, dict]], metrics: list[str], reference: str, baselines: list[str],
              performance: dict[str, dict] | None = None) -> dict:
    """scores: variant -> (prompt_id, seed) -> {metric: value}. Returns results.json's `summary`."""
    summary = {}
    for v, per_image in scores.items():
        out = {}
        for m in metrics:
            values = {k: s[m] for k, s in per_image.items() if s.get(m) is not None}
            if not values:
                continue
            entry = {"mean": float(np.mean(list(values.values()))), "n": len(values), "delta_vs_reference": None,
                     "ci_low": None, "ci_high": None, "verdict": None}
            if m in AGAINST_REFERENCE:
                _, entry["ci_low"], entry["ci_high"] = mean_ci(list(values.values()))
            elif v != reference:
                ref = {k: s[m] for k, s in scores.get(reference, {}).items() if s.get(m) is not None}
                both = sorted(set(values) & set(ref))
                if both:
                    d, lo, hi = paired_ci([values[k] for k in both], [ref[k] for k in both])
                    entry.update(delta_vs_reference=d, ci_low=lo, ci_high=hi, verdict=verdict(m, lo, hi))
            vs = {}
            for b in baselines:
                if b == v:
                    continue
                other = {k: s[m] for k, s in scores.get(b, {}).items() if s.get(m) is not None}
                both = sorted(set(values) & set(other))
                if both:
                    d, lo, hi = paired_ci([values[k] for k in both], [other[k] for k in both])
                    vs[b] = {"delta": d, "ci_low": lo, "ci_high": hi, "n": len(both), "verdict": verdict(m, lo, hi, b)}
            if vs:
                entry["vs"] = vs
            out[m] = entry
        for name, value in ((performance or {}).get(v) or {}).items():
            if value is None:
                continue
            ref_value = ((performance or {}).get(reference) or {}).get(name)
            out[name] = {"mean": value[0], "n": value[1],
                         "delta_vs_reference": value[0] - ref_value[0] if ref_value and v != reference else None,
                         "ci_low": None, "ci_high": None, "verdict": None}
        summary[v] = out
    return summary
