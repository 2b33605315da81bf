"""Per-image metrics, each computed by the library that defines it (the `bench` extra):

- psnr, ssim: torchmetrics, the image against the reference image of the same prompt and seed (no model weights).
- lpips: the `lpips` package (AlexNet features), against the reference image.
- clip: torchmetrics' CLIPScore (100 x max(cosine, 0)) of the image and its prompt; default
  `openai/clip-vit-large-patch14`.
- pick: PickScore (`yuvalkirstain/PickScore_v1`, a CLIP-H fine-tune, with the processor of
  `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`) through transformers: logit scale x cosine(image, prompt).
- ocr_ned, ocr_exact: RapidOCR's read of the image (its models ship in the wheel) against the prompt's `text`:
  normalized edit distance (torchmetrics' character edit distance / the longer length) and exact match, both
  after case folding and collapsing whitespace.

Every model is named by `--metric-model NAME=PATH` or its default Hub name and loaded by the same code either way.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import IdeoquantError

METRICS = ("psnr", "ssim", "lpips", "clip", "pick", "ocr_ned", "ocr_exact")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "clip": True, "pick": True, "ocr_ned": False,
                    "ocr_exact": True}
AGAINST_REFERENCE = frozenset({"psnr", "ssim", "lpips"})
DEFAULT_MODELS = {
    "clip": "openai/clip-vit-large-patch14",
    "pick": "yuvalkirstain/PickScore_v1",
    "pick-processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "lpips": "alex",  # torchvision's ImageNet AlexNet (downloaded by torchvision), or a local state dict file
}
OCR_READ = "ocr_text"  # not a metric: what OCR read, kept for the report (results.json: images[].ocr_text)


def parse_metrics(spec: str | None) -> list[str]:
    names = list(METRICS) if not spec else [m.strip().lower() for m in spec.split(",") if m.strip()]
    if "ocr" in names:  # shorthand for both OCR numbers
        i = names.index("ocr")
        names[i : i + 1] = ["ocr_ned", "ocr_exact"]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise IdeoquantError(f"unknown metric '{bad[0] if bad else spec}': choose from {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


def parse_metric_models(specs) -> dict[str, str]:
    """`NAME=PATH` specs over the defaults. A local PickScore folder holding its own processor serves as the
    processor too."""
    given = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        name = name.strip().lower()
        if not sep or not path or name not in DEFAULT_MODELS:
            raise IdeoquantError(f"--metric-model '{spec}': give NAME=PATH with NAME one of "
                                 f"{', '.join(DEFAULT_MODELS)}")
        given[name] = path
    if "pick" in given and "pick-processor" not in given and any(
            (Path(given["pick"]) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        given["pick-processor"] = given["pick"]
    return DEFAULT_MODELS | given


def need(module: str, metric: str):
    """Import a bench dependency, or one error line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise IdeoquantError(f"the {metric} metric needs the bench extra: pip install \"ideoquant[bench]\" (missing: "
                             f"{module.split('.')[0]})") from None


MODULES = {"psnr": "torchmetrics.functional.image", "ssim": "torchmetrics.functional.image", "lpips": "lpips",
           "clip": "torchmetrics.functional.multimodal", "pick": "transformers",
           "ocr_ned": "rapidocr_onnxruntime", "ocr_exact": "rapidocr_onnxruntime"}


def check_extras(metrics: list[str]) -> None:
    """Every library the metrics need imports (one error line naming the extra otherwise): checked before any
    image is generated, so a missing extra never costs a run."""
    for m in metrics:
        need(MODULES[m], m)
    if any(m.startswith("ocr") for m in metrics):
        need("torchmetrics.functional.text", "ocr_ned")


def to_tensor(image) -> torch.Tensor:
    """A PIL image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


@dataclass
class Scorer:
    names: tuple[str, ...]  # the metrics it produces
    key: str  # what its numbers depend on besides the images (the model)
    against_reference: bool
    fn: Callable = field(repr=False)  # (image, reference image or None, Prompt) -> {name: value}


def scorers(metrics: list[str], models: dict[str, str], device: str = "cpu") -> list[Scorer]:
    """The scorers for `metrics`, their models loaded now (a missing extra or model fails before any scoring)."""
    out = []
    if "psnr" in metrics or "ssim" in metrics:
        out.append(_pixel_scorer([m for m in ("psnr", "ssim") if m in metrics]))
    if "lpips" in metrics:
        out.append(_lpips_scorer(models["lpips"], device))
    if "clip" in metrics:
        out.append(_clip_scorer(models["clip"], device))
    if "pick" in metrics:
        out.append(_pick_scorer(models["pick"], models["pick-processor"], device))
    if "ocr_ned" in metrics or "ocr_exact" in metrics:
        out.append(_ocr_scorer([m for m in ("ocr_ned", "ocr_exact") if m in metrics]))
    return out


def _pixel_scorer(names: list[str]) -> Scorer:
    image_fn = need("torchmetrics.functional.image", names[0])

    def fn(image, reference, prompt):
        x = to_tensor(image)[None].double() / 255
        y = to_tensor(reference)[None].double() / 255
        out = {}
        if "psnr" in names:
            psnr = float(image_fn.peak_signal_noise_ratio(x, y, data_range=1.0))
            out["psnr"] = psnr if np.isfinite(psnr) else None  # identical images: no finite PSNR
        if "ssim" in names:
            out["ssim"] = float(image_fn.structural_similarity_index_measure(x, y, data_range=1.0))
        return out

    return Scorer(tuple(names), "torchmetrics", True, fn)


def lpips_model(path: str, device: str = "cpu"):
    """`lpips.LPIPS(net="alex")`: its calibrated linear layers from the package; AlexNet's ImageNet features from
    torchvision (`alex`, downloaded on first use) or from a local file of torchvision's AlexNet state dict
    (.safetensors, or .pth read with weights_only)."""
    lpips = need("lpips", "lpips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path == DEFAULT_MODELS["lpips"]:
            net = _load("LPIPS AlexNet (torchvision)", path, lambda: lpips.LPIPS(net="alex", verbose=False))
        else:
            net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
            state = _read_state(path)
            features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
            if not features:
                raise IdeoquantError(f"--metric-model lpips={path}: not a torchvision AlexNet state dict "
                                     "(no features.* tensors)")
            for i in range(1, net.net.N_slices + 1):
                block = getattr(net.net, f"slice{i}")
                mine = set(block.state_dict())
                block.load_state_dict({k: v for k, v in features.items() if k in mine}, strict=True)
    return net.eval().to(device)


def _read_state(path: str) -> dict:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise IdeoquantError(f"cannot read the LPIPS backbone {path}: {' '.join(str(e).split())[:200]}") from None


def _lpips_scorer(path: str, device: str) -> Scorer:
    net = lpips_model(path, device)

    @torch.no_grad()
    def fn(image, reference, prompt):
        x = to_tensor(image)[None].float().to(device) / 127.5 - 1
        y = to_tensor(reference)[None].float().to(device) / 127.5 - 1
        return {"lpips": float(net(x, y))}

    return Scorer(("lpips",), f"lpips alex {path}", True, fn)


def _features(out) -> torch.Tensor:
    """transformers 5's CLIPModel.get_*_features return an output object whose pooler_output is the projected
    embedding; earlier versions returned the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _TensorFeatures(torch.nn.Module):
    """A CLIPModel whose get_*_features return the embedding tensor, as torchmetrics' CLIPScore (<= 1.9) expects;
    with transformers 5 it otherwise fails ('BaseModelOutputWithPooling' object has no attribute 'norm',
    Lightning-AI/torchmetrics PR #3428)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _features(self.model.get_text_features(*args, **kwargs))


def _load(what: str, name: str, load: Callable):
    try:
        return load()
    except (OSError, ValueError) as e:
        raise IdeoquantError(f"cannot load the {what} model {name}: {' '.join(str(e).split())[:300]} (point to a "
                             f"local copy with --metric-model, or leave the metric out with --metrics)") from None


def clip_model_and_processor(name: str, device: str = "cpu"):
    """What torchmetrics' CLIPScore runs: the CLIP model (as above) and its processor, from a Hub name or folder."""
    transformers = need("transformers", "clip")
    model = _load("CLIP", name, lambda: transformers.CLIPModel.from_pretrained(name))
    processor = _load("CLIP", name, lambda: transformers.CLIPProcessor.from_pretrained(name))
    return _TensorFeatures(model.eval().to(device)), processor


def _clip_scorer(name: str, device: str) -> Scorer:
    clip_fn = need("torchmetrics.functional.multimodal", "clip")
    loaded = clip_model_and_processor(name, device)

    @torch.no_grad()
    def fn(image, reference, prompt):
        with warnings.catch_warnings():  # prompts longer than CLIP's 77 tokens are truncated, as the metric does
            warnings.simplefilter("ignore")
            score = clip_fn.clip_score(to_tensor(image)[None].to(device), [prompt.prompt],
                                       model_name_or_path=lambda: loaded)
        return {"clip": float(score)}

    return Scorer(("clip",), f"clip {name}", False, fn)


def _pick_scorer(name: str, processor_name: str, device: str) -> Scorer:
    transformers = need("transformers", "pick")
    model = _load("PickScore", name, lambda: transformers.AutoModel.from_pretrained(name)).eval().to(device)
    processor = _load("PickScore processor", processor_name,
                      lambda: transformers.AutoProcessor.from_pretrained(processor_name))

    @torch.no_grad()
    def fn(image, reference, prompt):
        pixels = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"].to(device)
        text = processor(text=[prompt.prompt], padding=True, truncation=True,
                         max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        img = _features(model.get_image_features(pixel_values=pixels))
        txt = _features(model.get_text_features(input_ids=text["input_ids"].to(device),
                                                attention_mask=text["attention_mask"].to(device)))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return {"pick": float(model.logit_scale.exp() * (img * txt).sum(-1))}

    return Scorer(("pick",), f"pick {name} {processor_name}", False, fn)


def normalize_text(s: str) -> str:
    return " ".join(s.casefold().split())


def ocr_engine():
    rapidocr = need("rapidocr_onnxruntime", "ocr")
    return rapidocr.RapidOCR()


def read_text(engine, image) -> str:
    """Every line RapidOCR finds, in its reading order, joined by spaces."""
    result, _ = engine(np.asarray(image.convert("RGB")))
    return " ".join(r[1] for r in result or ())


def ocr_scores(read: str, expected: str) -> dict:
    from torchmetrics.functional.text import edit_distance

    a, b = normalize_text(read), normalize_text(expected)
    longest = max(len(a), len(b))
    ned = float(edit_distance([a], [b])) / longest if longest else 0.0
    return {"ocr_ned": ned, "ocr_exact": float(a == b)}


def _ocr_scorer(names: list[str]) -> Scorer:
    need("torchmetrics.functional.text", names[0])
    engine = ocr_engine()

    def fn(image, reference, prompt):
        if not prompt.text:
            return {}
        read = read_text(engine, image)
        scores = ocr_scores(read, prompt.text)
        return {**{n: scores[n] for n in names}, OCR_READ: read}

    return Scorer((*names, OCR_READ), "rapidocr", False, fn)
