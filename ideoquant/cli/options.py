"""Options shared by the commands, declared once (`Annotated` aliases, as huggingface_hub's `hf` CLI does).

Choices are enums, so `--help` lists them and a wrong value is a usage error (exit 2) naming the choices; numbers
carry their valid range. Nothing here imports torch.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..device import DEVICES
from ..formats import catalog

SOURCE_HELP = "Hub repo id (ORG/NAME), local pipeline folder, component folder or .safetensors file."

GGUFType = Enum("GGUFType", {t: t for t in catalog.GGUF_CHOICES}, type=str)
Layout = Enum("Layout", {x: x for x in catalog.GGUF_LAYOUTS}, type=str)
Device = Enum("Device", {x: x for x in DEVICES}, type=str)
Convention = Enum("Convention", {x: x for x in ("llama", "sdcpp")}, type=str)

SourceArg = Annotated[Optional[List[str]], typer.Argument(metavar="SOURCE...",
    help=SOURCE_HELP + " Several local .safetensors files (or a folder of them, as ComfyUI's "
    "models/diffusion_models/) each land in the backbone they hold. [default: ideogram-ai/ideogram-4-fp8]",
    show_default=False)]
RequiredSource = Annotated[str, typer.Argument(metavar="SOURCE", help=SOURCE_HELP, show_default=False)]
Protect = Annotated[List[str], typer.Option(metavar="GLOB", help="Also keep modules matching this glob in BF16 (repeatable).",
                                            show_default=False)]
NoProtect = Annotated[List[str], typer.Option(metavar="GLOB",
    help="Quantize modules matching this glob even if the recipe protects them (repeatable).", show_default=False)]
Components = Annotated[List[str], typer.Option(metavar="NAME", help="Only this backbone (repeatable) [default: both].",
                                               show_default=False)]
Revision = Annotated[Optional[str], typer.Option(metavar="REV", help="Hub branch, tag or commit of SOURCE.", show_default=False)]
Token = Annotated[Optional[str], typer.Option(metavar="TOKEN",
    help="Hugging Face token [default: HF_TOKEN or the `hf auth login` token].", show_default=False)]
Overwrite = Annotated[bool, typer.Option(
    help="Replace an existing output (only once the new one is complete; never a source).")]
DeviceOpt = Annotated[Device, typer.Option(help="Where the math runs.")]
Threads = Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Worker threads [default: the CPUs this process may use].",
                                                show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON (results and errors) instead of tables.")]

# Evaluation inputs: sampled, or recorded by `ideoquant capture`.
Inputs = Annotated[Optional[Path], typer.Option("--inputs", metavar="FILE",
                                                help="Inputs recorded by `ideoquant capture`.", show_default=False)]
Tokens = Annotated[int, typer.Option(metavar="N", min=1, max=4096, help="Sample inputs: text tokens.")]
Grid = Annotated[int, typer.Option(metavar="N", min=1, max=256, help="Sample inputs: image grid side (grid x grid tokens).")]
Batch = Annotated[int, typer.Option(metavar="N", min=1, max=64, help="Sample inputs: prompts per step.")]

Steps = Annotated[int, typer.Option(metavar="N", min=1, max=1000, help="Sample inputs: denoising steps (one call of each backbone per step).")]
