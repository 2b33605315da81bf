#!/usr/bin/env python
"""A source at Ideogram 4's real size in the layout of the official FP8 release, for benchmarks.

Writes a pipeline folder like `ideogram-ai/ideogram-4-fp8`'s backbones (shared/notes/real-release.md 1.1-1.5):
`model_index.json`, and per backbone one `diffusion_pytorch_model.safetensors` holding the 669 tensors of the real
table (original names, no prefix, fused `layers.N.attention.qkv` in q, k, v row order, `attention.o`, every linear
weight F8_E4M3 with an F32 per-row `.weight_scale`, everything else BF16), an index pointing every key at it, and a
diffusers-style `config.json` without a quantization_config. The values are random (FP8 codes without NaN, scales
of real magnitude); the bytes are streamed to disk a tensor at a time, so memory stays small. 18.6 GB for both
backbones at the real depth (9,289,722,624 bytes of tensor data each).

    python scripts/build_real_source.py /path/to/ideogram-4-fp8-like [--layers 34] [--components transformer]

`--hf-download-records` also writes the records `hf download --local-dir` keeps beside a download (each file's
sha256 as its etag, through huggingface_hub's own writer), as a folder downloaded that way has them; move
`.cache/` away to benchmark a folder of unknown provenance again.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ideoquant import model  # noqa: E402

CHUNK = 64 << 20


def tensors(config: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of the release's backbone file, in the original layout."""
    spec = model.model_spec(config)
    fused: dict[str, list] = {}
    for name, shape in spec.shapes.items():
        out, _ = model.diffusers_to_original(name)
        fused.setdefault(out, []).append((name, shape))
    out = []
    for name, parts in fused.items():
        shape = (sum(s[0] for _, s in parts), *parts[0][1][1:])
        if spec.is_linear_weight(parts[0][0]):
            out += [(name, "F8_E4M3", shape), (name + "_scale", "F32", (shape[0],))]
        else:
            out.append((name, "BF16", shape))
    return out


def write_backbone(folder: Path, config: dict, seed: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = tensors(config)
    size = {"F8_E4M3": 1, "F32": 4, "BF16": 2}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in items:
        n = size[dtype] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "diffusion_pytorch_model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in items:
            n = int(np.prod(shape))
            if dtype == "F8_E4M3":  # random codes with bit 6 clear: |w| <= 1.875 before scaling, no NaN (0x7F/0xFF)
                for a in range(0, n, CHUNK):
                    codes = np.frombuffer(rng.bytes(min(CHUNK, n - a)), np.uint8) & np.uint8(0xBF)
                    f.write(codes.tobytes())
            elif dtype == "F32":  # per-row scales: w = fp8 * scale with |w| ~ 0.02
                f.write(rng.uniform(0.01, 0.03, n).astype(np.float32).tobytes())
            else:  # bf16 norms, biases, the embedding: around 1 or 0
                v = (rng.normal(0, 0.05, n) + (1.0 if "norm" in name else 0.0)).astype(np.float32)
                f.write((v.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": offset}, "weight_map": {name: path.name for name, _, _ in items}}, indent=2))
    (folder / "config.json").write_text(json.dumps({"_class_name": model.MODEL_CLASS, "_diffusers_version": "0.42.0",
                                                    **model.model_spec(config).config}, indent=2))
    return path.stat().st_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=34)
    ap.add_argument("--components", default=",".join(model.COMPONENTS))
    ap.add_argument("--hf-download-records", action="store_true",
                    help="write the records of `hf download --local-dir` (hashes every file once)")
    a = ap.parse_args(argv)
    config = {"num_layers": a.layers}
    t0 = time.perf_counter()
    comps = a.components.split(",")
    for i, c in enumerate(comps):
        n = write_backbone(a.out / c, config, seed=i)
        print(f"{c}: {n:,} bytes ({time.perf_counter() - t0:.0f} s)", flush=True)
    (a.out / "model_index.json").write_text(json.dumps({"_class_name": model.PIPELINE_CLASS,
                                                        "_diffusers_version": "0.42.0",
                                                        **{c: ["diffusers", model.MODEL_CLASS] for c in comps}},
                                                       indent=2))
    if a.hf_download_records:
        record_download(a.out)
    return 0


def record_download(folder: Path) -> None:
    """What `hf download REPO --local-dir folder` leaves beside the files, written by huggingface_hub itself."""
    import hashlib

    from huggingface_hub._local_folder import write_download_metadata

    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        write_download_metadata(folder, path.relative_to(folder).as_posix(), "0" * 40, h.hexdigest())


if __name__ == "__main__":
    raise SystemExit(main())
