"""`ideoquant bench`: image-level quality of quantized outputs, measured the way the study behind the default recipe
measured it (arXiv 2606.12280): the same prompts and seeds for every variant, images scored against the reference
(SOURCE as released) by library metrics, paired same-seed bootstrap confidence intervals on the differences.

Modules: `prompts` (the built-in set and `--prompts FILE`), `run` (generation, resumable, split across processes
by accelerate), `metrics` (PSNR, SSIM, CLIPScore, PickScore, LPIPS, OCR, each through its library), `stats`
(paired bootstrap), `results` (the stable `results.json`), `report` (index.html, summary.md).

The heavy dependencies are the `bench` extra (`pip install "ideoquant[bench]"`); they are imported where used.
"""
