"""Evaluation: the paper's metric math, CLIP/DINO loading, the best-step rule, early stopping,
`textinv eval` on runs, and (on the mini model) judge metrics that tell learned from untrained."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textinv import evaluate, formats
from textinv.errors import TextinvError
from textinv.training import train

from conftest import make_sd


def blocks(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((32, 32, 3), 230, np.uint8)
        a[6:26, 4 + 2 * i:24 + 2 * i] = (200, 30, 30)
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    return folder


# ------------------------------------------------------------------------ training hook
def test_on_save_sees_every_save_and_can_stop_training_early(tmp_path):
    seen = []

    def on_save(step, path):
        seen.append((step, Path(path).name))
        return step >= 4

    res = train(images=str(blocks(tmp_path / "imgs")), token="<blk>", init="square", steps=8, batch=2, save_every=2,
                out=str(tmp_path / "run"), pipe=make_sd(), progress=False, on_save=on_save)
    assert seen == [(2, "blk-2.safetensors"), (4, "blk-4.safetensors")]
    assert res.steps == 4 and formats.load(res.embedding_path).meta["step"] == 4
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert torch.equal(formats.load(res.embedding_path).vectors["clip"],
                       formats.load(tmp_path / "run" / "embeddings" / "blk-4.safetensors").vectors["clip"])
