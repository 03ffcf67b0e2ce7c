"""The judge: a small CNN that reads the world's attributes off an image.

Trained only on rendered images with ground-truth labels (never on model outputs), with light
augmentation (blur, noise, contrast) so it stays fair on slightly soft generated images.

    from textinv.world.judge import load_judge, judge
    judge(list_of_pil_images)  # -> [{"shape": "star", "colour": "red", ..., "prob": {...}}, ...]
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..errors import TextinvError
from . import spec
from .render import render_set, sample_attributes, sample_rng
from .train_base import render_dataset

JUDGE_PATH = Path(__file__).resolve().parent.parent / "data" / "judge"


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class JudgeNet(nn.Module):
    def __init__(self, heads: dict[str, int], width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 16
            _block(w, 2 * w), nn.MaxPool2d(2),      # 8
            _block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({k: nn.Linear(256, n) for k, n in heads.items()})
        self.head_labels: dict[str, list[str]] = {}

    def forward(self, x):  # x: N×3×32×32 in [-1, 1]
        h = self.fc(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}


def to_tensor(images) -> torch.Tensor:
    """PIL images / uint8 N×H×W×3 arrays / float tensors in [-1,1] or [0,1] -> N×3×S×S in [-1, 1]."""
    S = spec.IMAGE_SIZE
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.max() > 1.5:
            x = x / 127.5 - 1
        elif x.min() >= 0:
            x = x * 2 - 1
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    else:
        arrs = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (S, S):
                im = im.resize((S, S), Image.BOX if im.width > S else Image.BILINEAR)
            arrs.append(np.asarray(im))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != S:
        x = F.interpolate(x, size=(S, S), mode="area")
    return x


def load_judge(path: str | Path | None = None) -> JudgeNet:
    path = Path(path) if path else JUDGE_PATH
    cfg_file, w_file = path / "config.json", path / "judge.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise TextinvError(f"{path}: no judge weights (run `textinv world train-judge`)")
    cfg = json.loads(cfg_file.read_text())
    labels = cfg["labels"]
    for k, v in labels.items():
        if v != spec.labels(k):
            raise TextinvError(f"{path}: judge labels for {k} do not match the world table; retrain the judge")
    net = JudgeNet({k: len(v) for k, v in labels.items()}, width=cfg["width"])
    sd = {k: v.float() for k, v in load_file(str(w_file)).items()}
    net.load_state_dict(sd)
    net.head_labels = labels
    return net.eval()


_CACHE: dict[str, JudgeNet] = {}


@torch.no_grad()
def judge(images, model: JudgeNet | None = None, batch: int = 256) -> list[dict]:
    """Attributes of each image: ``{attribute: label, ..., "prob": {attribute: p}}``."""
    if model is None:
        if "default" not in _CACHE:
            _CACHE["default"] = load_judge()
        model = _CACHE["default"]
    x = to_tensor(images)
    out: list[dict] = [dict() for _ in range(len(x))]
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        for k, lg in logits.items():
            p = lg.softmax(-1)
            conf, idx = p.max(-1)
            for j in range(len(lg)):
                r = out[i + j]
                r[k] = model.head_labels[k][int(idx[j])]
                r.setdefault("prob", {})[k] = float(conf[j])
    return out


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur / noise / contrast jitter so the judge tolerates soft generated images."""
    n = len(x)
    blur = torch.rand(n, generator=g) < 0.4
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        xb = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
        a = torch.rand(int(blur.sum()), 1, 1, 1, generator=g)
        x = x.clone()
        x[blur] = a * xb + (1 - a) * x[blur]
    scale = 1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    shift = 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    noise = torch.randn(x.shape, generator=g) * (0.06 * torch.rand(n, 1, 1, 1, generator=g))
    return (x * scale + shift + noise).clamp(-1.2, 1.2)


def train_judge(out: str | Path | None = None, n_images: int = 40000, steps: int = 4000, batch: int = 128,
                lr: float = 2e-3, seed: int = 0, width: int = 32, progress: bool = True) -> dict:
    """Train the judge on fresh renders and save fp16 safetensors + config to ``out``."""
    torch.manual_seed(seed)
    out = Path(out) if out else JUDGE_PATH
    imgs, _ = render_dataset(n_images, seed + 5000, ncap=1, workers=2)
    labels = _labels_for(n_images, seed + 5000)
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    y_all = {k: torch.from_numpy(v) for k, v in labels.items()}
    heads = {k: len(spec.labels(k)) for k in spec.ATTRIBUTE_NAMES}
    net = JudgeNet(heads, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="judge", mininterval=5, disable=not progress)
    net.train()
    for step in bar:
        for pg in opt.param_groups:
            pg["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x = augment(x_all[idx], g)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[k], y_all[k][idx]) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(out / "judge.safetensors"))
    cfg = {"width": width, "image_size": spec.IMAGE_SIZE, "labels": {k: spec.labels(k) for k in heads},
           "trained_on": f"{n_images} renders, seed {seed + 5000}, {steps} steps of {batch}"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return evaluate(load_judge(out), n=1000, seed=seed + 90000)


def _labels_for(n: int, seed: int) -> dict[str, np.ndarray]:
    idx = {k: {v: i for i, v in enumerate(spec.labels(k))} for k in spec.ATTRIBUTE_NAMES}
    labs = {k: np.zeros(n, np.int64) for k in spec.ATTRIBUTE_NAMES}
    for i in range(n):
        a = sample_attributes(sample_rng(seed, i))
        for k in spec.ATTRIBUTE_NAMES:
            labs[k][i] = idx[k][a[k]]
    return labs


def evaluate(model: JudgeNet | None = None, n: int = 500, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` fresh renders."""
    imgs, labs, _ = render_set(n, seed)
    res = judge(imgs, model=model)
    acc = {}
    for k in spec.ATTRIBUTE_NAMES:
        names = spec.labels(k)
        acc[k] = float(np.mean([r[k] == names[int(t)] for r, t in zip(res, labs[k])]))
    return acc
