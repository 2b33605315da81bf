"""The Python snippet of a model card's "Use" section, shared by the formats.

The snippet is generated, not written by hand, so that a test can run exactly it: `pipeline_snippet` with the
card's defaults is what the card shows; the same function with a local base, `device="cpu"` and a tiny call is what
the test executes (tests/test_pipeline.py).
"""

from __future__ import annotations

import json

PROMPT = "A photo of a cat holding a sign that says hello world"
CARD_DEVICE = "cuda"
# The pipeline's own defaults (48 steps with its guidance schedule), spelled out.
CARD_CALL = {"height": 2048, "width": 2048}
IMAGE_FILE = "ideogram4.png"


def pipeline_snippet(imports: list[str], backbone_lines: list[str], components: list[str], base: str,
                     device: str = CARD_DEVICE, call: dict | None = None) -> str:
    """Imports, one line (or statement) per backbone, the pipeline from `base` with both backbones, one image."""
    call = CARD_CALL if call is None else call
    args = "".join(f"    {c}={c},\n" for c in components)
    kwargs = "".join(f", {k}={py(v)}" for k, v in call.items())
    lines = ["import torch", *imports, "", *backbone_lines,
             f"pipe = Ideogram4Pipeline.from_pretrained(\n    {py(str(base))},\n{args}    torch_dtype=torch.bfloat16,\n)",
             f"pipe.to({py(device)})",
             f"image = pipe({py(PROMPT)}{kwargs}).images[0]",
             f"image.save({py(IMAGE_FILE)})"]
    return "\n".join(lines)


def py(value) -> str:
    """A Python literal: strings in double quotes (JSON's escapes are Python's), other values as repr."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def in_folder(folder: str, path: str) -> str:
    """A path in the repo for an output uploaded into `folder` ("" for the repo's root)."""
    return f"{folder.strip('/')}/{path}" if folder else path


def code_block(markdown: str) -> str:
    """The first ```python block of a card's markdown, without the fences."""
    start = markdown.index("```python\n") + len("```python\n")
    return markdown[start:markdown.index("\n```", start)]
