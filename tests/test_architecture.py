"""The layout's promises: library calls leave the process as they found it, and the streaming unit (the row block)
never changes a byte of the output."""

import gc
import logging
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import ideoquant
from ideoquant import formats


def _process_state() -> dict:
    return {
        "gc": gc.isenabled(),
        "switch_interval": sys.getswitchinterval(),
        "torch_threads": torch.get_num_threads(),
        "warning_filters": list(warnings.filters),
        "threads": sorted(t.name for t in threading.enumerate()),
        "loggers": {n: logging.getLogger(n).level for n in ("torchao", "diffusers", "torch")},
        "frozen": gc.get_freeze_count(),
    }


def test_library_calls_leave_the_process_as_they_found_it(bf16_source, tmp_path):
    # A state a caller may have chosen, distinct from every default the library could set.
    torch.set_num_threads(2)
    sys.setswitchinterval(0.004)
    before = _process_state()
    ideoquant.convert(bf16_source, tmp_path / "int8", max_shard_size="1MB")
    ideoquant.convert_gguf(bf16_source, tmp_path / "gguf", qtype="q4_k_m", threads=2)
    from ideoquant import gguf

    gguf.quantize(torch.randn(64, 512), "Q4_K", threads=2)
    assert _process_state() == before


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.suffix in (".gguf", ".safetensors")}


@pytest.mark.parametrize("kind,qtype", [("int8", None), ("gguf", "q8_0"), ("gguf", "q4_k"), ("gguf", "q5_k"),
                                        ("gguf", "q6_k"), ("gguf", "q4_k_m")])
def test_small_row_blocks_write_the_same_bytes_as_one_block(bf16_source, fp8_source, tmp_path, monkeypatch, kind,
                                                            qtype):
    """Tensors split over many row blocks (two rows each, on both workers) give the bytes of a run where every
    tensor is one block."""
    source = fp8_source if kind == "int8" else bf16_source
    outs = {}
    for name, block in (("one", 1 << 24), ("many", 1100)):
        monkeypatch.setattr(formats, "BLOCK_ELEMENTS", block)
        out = tmp_path / name
        if kind == "int8":
            ideoquant.convert(source, out, threads=2)
        else:
            ideoquant.convert_gguf(source, out, qtype=qtype, threads=2)
        outs[name] = _weights(out)
    assert outs["one"].keys() == outs["many"].keys() and outs["one"]
    for f in outs["one"]:
        assert outs["one"][f] == outs["many"][f], f


def _format_name_comparisons(path: Path, names: set[str]) -> list[str]:
    """`x == "int8"`, `fmt in ("int8", "gguf")`, `r["format"] != "gguf"`: comparisons with a format's name."""
    import ast

    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                hits.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_no_module_outside_formats_compares_a_format_name():
    """A format owns its whole surface: the rest of the package asks the registry (`formats.get`, `recognise`,
    the Format protocol) instead of testing which format it has."""
    root = Path(ideoquant.__file__).parent
    names = set(formats.NAMES)
    hits = [h for p in sorted(root.rglob("*.py")) if "formats" not in p.relative_to(root).parts
            for h in _format_name_comparisons(p, names)]
    assert hits == []
    # The check finds what it looks for.
    sample = root.parent / "tests" / "data" / "_format_compare_sample.py"
    assert sample.is_file() and len(_format_name_comparisons(sample, names)) == 3
