"""Evidence of quality: inputs, the runner and layer taps, baselines, `evaluate`, `sensitivity`, `calibrate`, plots."""
