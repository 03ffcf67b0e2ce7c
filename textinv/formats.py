"""Read and write every Textual Inversion embedding format users trade.

One in-memory type, :class:`Embedding`; ``load`` detects the format by content (never by
extension) and ``save`` writes any of them atomically.  Pickle-based files are opened with a
restricted unpickler: embedding files come from strangers on the internet.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import EmbeddingFileError

# Width of a token vector -> the model family whose text encoder has that width.
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL (clip_g)"}
SDXL_KEYS = ("clip_l", "clip_g")
SINGLE_KEY = "clip"


def family_of_width(width: int) -> str:
    return FAMILIES.get(width, f"an unknown model family")


@dataclass
class Embedding:
    """A trigger word's learned vectors.

    ``vectors`` maps a text-encoder slot to an ``[n, D]`` tensor: ``{"clip": T}`` for SD 1.x/2.x
    (one encoder), ``{"clip_l": T1, "clip_g": T2}`` for SDXL (same ``n``).  Tensors keep the dtype
    they were stored in so that round trips are bit-exact; users of the vectors cast as needed.
    ``meta`` holds ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``, ``init_text`` and any extra
    keys found in the file (kept on write where the format allows).
    """

    name: str
    vectors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    source_format: str | None = None  # set by load(): "diffusers", "a1111", "kohya", "sdxl", ...
    path: Path | None = None

    @property
    def is_sdxl(self) -> bool:
        return set(self.vectors) == set(SDXL_KEYS)

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {k: int(v.shape[-1]) for k, v in self.vectors.items()}

    @property
    def family(self) -> str:
        if self.is_sdxl:
            return "SDXL"
        return family_of_width(int(self.vectors[SINGLE_KEY].shape[-1]))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def short_hash(path: str | Path) -> str:
    """A1111's TI hash: the first 12 hex digits of the file's sha256."""
    return sha256_file(path)[:12]
