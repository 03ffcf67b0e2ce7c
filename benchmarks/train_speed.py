"""textinv's training loop against the common recipe, same model, batch and step count.

The reference loop does what diffusers' textual_inversion.py (and most tutorials) do: VAE-encode
the batch every step, put the whole token table in AdamW, and copy the original rows back over
every untouched row after each step.  textinv's loop is ``textinv.train`` itself.

Prints steps/s (steady state, after warm-up steps) and peak memory above the starting point for
both, and their ratio; and the *floor*, the text encoder and UNet forward/backward alone, which
bounds what any loop on this model can reach.  Asserts nothing.

    python benchmarks/train_speed.py                 # the built-in mini model
    python benchmarks/train_speed.py --model PATH --steps 60 --batch 4
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from textinv import data
from textinv.models import load_pipeline
from textinv.training import train


class PeakMemory:
    """Peak resident memory (CPU: sampled /proc RSS; CUDA: the allocator's peak) above the start."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.mb = (self.peak - self.start) / 2**20


def synthetic_images(folder: Path, n: int = 5, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((size, size, 3), 230, np.uint8)
        x, y = rng.integers(4, size // 2, 2)
        a[y : y + size // 3, x : x + size // 3] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def reference_loop(pipe, folder: Path, token: str, steps: int, batch: int, lr: float, warmup: int, seed: int = 0) -> float:
    """The common recipe; returns steady-state steps/s."""
    from diffusers import DDPMScheduler

    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    tok.add_tokens([token])
    tid = tok.convert_tokens_to_ids(token)
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    table = te.get_input_embeddings().weight
    with torch.no_grad():
        table[tid] = table[tok.convert_tokens_to_ids("*</w>")]
    orig = table.detach().clone()
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    te.requires_grad_(False)
    te.get_input_embeddings().requires_grad_(True)
    optimizer = torch.optim.AdamW(te.get_input_embeddings().parameters(), lr=lr, weight_decay=0.0)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    res = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    images = [i.image for i in data.load_images(folder)]
    templates = data.OBJECT_TEMPLATES
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[tid] = False
    g = torch.Generator().manual_seed(seed)
    dev = unet.device
    t_start = None
    for step in range(steps):
        if step == warmup:
            t_start = time.perf_counter()
        idx = torch.randint(len(images), (batch,), generator=g)
        views = [data.variants(images[int(i)], res, flip=False)[0] for i in idx]
        flips = torch.rand(batch, generator=g) < 0.5
        pixels = data.to_tensor([v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else v for v, f in zip(views, flips)])
        latents = vae.encode(pixels.to(dev)).latent_dist.sample(generator=g).cpu() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noisy = sched.add_noise(latents, noise, t).to(dev)
        prompts = [templates[int(k)].replace("[name]", token) for k in torch.randint(len(templates), (batch,), generator=g)]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        hidden = te(ids.to(dev))[0]
        loss = F.mse_loss(unet(noisy, t.to(dev), hidden).sample.float(), noise.to(dev).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            te.get_input_embeddings().weight[keep] = orig[keep]
    return (steps - warmup) / (time.perf_counter() - t_start)


def floor_loop(pipe, steps: int, batch: int, warmup: int, seed: int = 0) -> float:
    """The work every textual-inversion loop must do: text encoder and UNet forward, backward to
    the prompt's input vectors.  No data, no noise schedule, no optimizer: an upper bound on the
    steps/s of any loop on this model, and so on the ratio any loop can reach over the reference."""
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    for m in (te, unet, pipe.vae):
        m.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    ids = tok(["a photo of a shape"] * batch, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids.to(unet.device)
    size = int(unet.config.sample_size)
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(unet.device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(unet.device)
    table = te.get_input_embeddings()
    vector = torch.zeros(table.embedding_dim, device=unet.device, requires_grad=True)
    hook = table.register_forward_hook(lambda _m, _i, out: out + vector)  # a trainable input, as a trigger row is
    try:
        t_start = None
        for step in range(steps):
            if step == warmup:
                t_start = time.perf_counter()
            loss = F.mse_loss(unet(latents, t, te(ids)[0]).sample.float(), latents.float())
            loss.backward()
            vector.grad = None
    finally:
        hook.remove()
    return (steps - warmup) / (time.perf_counter() - t_start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the built-in mini model")
    ap.add_argument("--images", type=Path, default=None, help="default: 5 synthetic images")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="textinv-bench-"))
    folder = args.images or synthetic_images(tmp / "images")
    print(f"model {args.model or 'mini'}, batch {args.batch}, {args.steps} steps ({args.warmup} warm-up), "
          f"device {args.device}, torch threads {torch.get_num_threads()}")

    pipe = load_pipeline(args.model, device=args.device)
    with PeakMemory(args.device) as mem_ours:
        train(images=str(folder), token="<bench>", steps=args.steps, batch=args.batch, flip=True, out=str(tmp / "run"),
              pipe=pipe, progress=False)
    log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    ours = (args.steps - args.warmup) / (log[-1]["seconds"] - log[args.warmup - 1]["seconds"])

    pipe = load_pipeline(args.model, device=args.device)
    with PeakMemory(args.device) as mem_ref:
        ref = reference_loop(pipe, folder, "<bench>", args.steps, args.batch, 5e-3, args.warmup)

    pipe = load_pipeline(args.model, device=args.device)
    floor = floor_loop(pipe, args.steps, args.batch, args.warmup)

    print(f"{'loop':<12}{'steps/s':>10}{'peak MB':>10}")
    print(f"{'textinv':<12}{ours:>10.2f}{mem_ours.mb:>10.0f}")
    print(f"{'reference':<12}{ref:>10.2f}{mem_ref.mb:>10.0f}")
    print(f"{'floor':<12}{floor:>10.2f}{'':>10}   (text encoder + UNet forward/backward only: no loop is faster)")
    print(f"speed ratio textinv/reference: {ours / ref:.2f}x  (the floor's: {floor / ref:.2f}x; "
          f"textinv runs at {ours / floor:.0%} of the floor)")


if __name__ == "__main__":
    main()
