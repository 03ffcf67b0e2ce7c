"""The Textual Inversion paper's metrics, with CLIP and DINO image encoders from any folder or hub id.

* **Image similarity** (reconstruction, "CLIP-I"): the mean cosine similarity between the CLIP
  image embedding of every generated image of "a photo of S*" and every training image.
* **Text similarity** (editability, "CLIP-T"): for an editing prompt ("a photo of S* on the
  moon"), the mean cosine similarity between the CLIP embedding of each generated image and the
  CLIP text embedding of the prompt with S* removed ("a photo of on the moon").
* **DINO similarity**: as image similarity, with the CLS token of a self-supervised DINO ViT
  (ViT-S/16 as DreamBooth reports it), which is more sensitive to the subject's identity.

Averaging: every metric is the mean over all *pairs* of the per-pair cosine similarities
(``mean_pairwise_cosine``), as the paper's evaluation code does (``(A @ B.T).mean()`` of
L2-normalised embeddings); not the cosine between mean embeddings, which is larger.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np
import torch
import transformers  # its Auto* classes load on first use, not at every command's start-up
import transformers.utils.logging as tlog

from .errors import TextinvError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the paper's evaluator: CLIP ViT-B/32
DEFAULT_DINO = "facebook/dino-vits16"  # DreamBooth's DINO metric: ViT-S/16


def normalise(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if x.ndim == 1:
        x = x[None]
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_pairwise_cosine(a, b) -> float:
    """Mean over all pairs (i, j) of cos(a_i, b_j): the paper's averaging."""
    return float((normalise(a) @ normalise(b).T).mean())


def cosine_of_means(a, b) -> float:
    """cos(mean a, mean b) of the normalised rows — shown for contrast, not used."""
    return float(normalise(normalise(a).mean(0)) @ normalise(normalise(b).mean(0)).T)


def without_trigger(prompt: str, trigger: str) -> str:
    """The prompt with the trigger removed, as the paper scores text similarity.

    "a photo of <cat> on the moon" → "a photo of on the moon"; "Elmo holding a <cat>" → "Elmo holding a".
    """
    out = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", " ", prompt, flags=re.IGNORECASE)
    return re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", out)).strip(" ,")


@contextlib.contextmanager
def _quiet():
    """No "Loading weights" bars or backend notices while loading (the user's settings are restored)."""
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _load(kind: str, option: str, source: str, device: str):
    """(model, image processor, tokenizer or None) from a folder or hub id; one-line errors."""
    try:
        with _quiet():
            model = transformers.AutoModel.from_pretrained(str(source)).to(device).eval()
            processor = transformers.AutoImageProcessor.from_pretrained(str(source))
            tokenizer = None
            if kind == "CLIP":
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        looks_local = str(source).startswith((".", "/", "~")) or Path(str(source)).is_absolute()
        if looks_local and not Path(str(source)).expanduser().exists():
            raise TextinvError(f"{option} {source}: no such folder (pass a folder holding {kind} weights, or a hub id)") from None
        if offline and not Path(str(source)).exists():
            raise TextinvError(f"{option} {source}: the {kind} weights the metrics need are not in the local Hugging Face cache, "
                               f"and HF_HUB_OFFLINE=1 forbids downloading them; download them once online "
                               f"(`hf download {source}`) or pass {option} with a local folder") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TextinvError(f"{option} {source}: cannot load {kind} weights: {first}") from None
    if kind == "CLIP" and not hasattr(model, "get_image_features"):
        raise TextinvError(f"{option} {source}: not a CLIP model ({type(model).__name__})")
    return model, processor, tokenizer


class ClipScorer:
    """CLIP image and text embeddings (L2-normalised), from a folder or a hub id."""

    def __init__(self, source: str = DEFAULT_CLIP, device: str = "cpu", option: str = "--clip"):
        self.source, self.device = str(source), device
        self.model, self.processor, self.tokenizer = _load("CLIP", option, source, device)

    @torch.no_grad()
    def images(self, images, batch: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch):
            px = self.processor(images=[im.convert("RGB") for im in images[i:i + batch]], return_tensors="pt")
            f = self.model.get_image_features(pixel_values=px["pixel_values"].to(self.device))
            out.append(_pooled(f))
        return normalise(torch.cat(out).cpu())

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        f = self.model.get_text_features(**{k: v.to(self.device) for k, v in ids.items()})
        return normalise(_pooled(f).cpu())


class DinoScorer:
    """The CLS token of a DINO / DINOv2 ViT (L2-normalised), from a folder or a hub id."""

    def __init__(self, source: str = DEFAULT_DINO, device: str = "cpu", option: str = "--dino"):
        self.source, self.device = str(source), device
        self.model, self.processor, _ = _load("DINO", option, source, device)

    @torch.no_grad()
    def images(self, images, batch: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch):
            px = self.processor(images=[im.convert("RGB") for im in images[i:i + batch]], return_tensors="pt")
            out.append(self.model(pixel_values=px["pixel_values"].to(self.device)).last_hidden_state[:, 0])
        return normalise(torch.cat(out).cpu())


def _pooled(f) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features (4.x: the tensor itself)."""
    return f if isinstance(f, torch.Tensor) else f.pooler_output
