"""Learnability check: can textual inversion find a token that makes the mini model draw one
specific unnamed shape?

Self-contained (does not use the toolkit's trainer): freeze the pipeline, add one token whose
input-embedding row is a separate ``nn.Parameter`` spliced into the frozen embedding table,
train it on a few rendered images of the target shape with "a photo of a <t>"-style prompts,
then generate with the judge counting the share of images that show the target, versus the same
prompts with the init word.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import spec

TOKEN = "<ti-check>"


class SplicedEmbedding(nn.Module):
    """A frozen embedding table plus one trainable row for ``new_id`` (which may be past its end)."""

    def __init__(self, base: nn.Embedding, new_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.new_id = new_id
        self.vec = nn.Parameter(init.detach().clone().float())

    @property
    def weight(self):  # for code that inspects .weight (dtype/device)
        return self.base.weight

    def forward(self, ids):
        e = self.base(ids.clamp(max=self.base.num_embeddings - 1))
        m = (ids == self.new_id)[..., None]
        return torch.where(m, self.vec.to(e.dtype).expand_as(e), e)


def add_token(pipe, init_word: str):
    tok, te = pipe.tokenizer, pipe.text_encoder
    if TOKEN not in tok.get_vocab():
        tok.add_tokens([TOKEN])
    new_id = tok.convert_tokens_to_ids(TOKEN)
    init_ids = tok(init_word, add_special_tokens=False).input_ids
    emb = te.get_input_embeddings()
    base = emb.base if isinstance(emb, SplicedEmbedding) else emb
    init = base.weight[init_ids].mean(0)
    sp = SplicedEmbedding(base, new_id, init)
    te.set_input_embeddings(sp)
    return sp


def train_token(pipe, images, steps: int = 400, lr: float = 5e-3, batch: int = 10, seed: int = 0,
                init_word: str = "shape", progress: bool = True):
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    from .judge import to_tensor

    g = torch.Generator().manual_seed(seed)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
        m.eval()
    sp = add_token(pipe, init_word)
    sp.vec.requires_grad_(True)
    x = to_tensor(images)
    with torch.no_grad():
        lat = pipe.vae.encode(x).latent_dist
        mean, std = lat.mean, lat.std
    sf = pipe.vae.config.scaling_factor
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    templates = [t.format(np=TOKEN) for t in spec.TEMPLATES]
    ids_all = pipe.tokenizer(templates, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    opt = torch.optim.AdamW([sp.vec], lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="ti-check", mininterval=5, disable=not progress)
    losses = []
    for step in bar:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        zt = sched.add_noise(z, noise, t)
        ids = ids_all[torch.randint(0, len(ids_all), (batch,), generator=g)]
        cond = pipe.text_encoder(ids).last_hidden_state
        loss = F.mse_loss(pipe.unet(zt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    sp.vec.requires_grad_(False)
    return sp


def run_check(model="mini", target: str = "bowtie", init_word: str = "shape", steps: int = 400, lr: float = 5e-3,
              count: int = 32, seed: int = 0, n_train: int = 5, guidance: float = 4.0, pipe=None, progress: bool = True) -> dict:
    from ..models import load_pipeline
    from ..generation import images as generate
    from .judge import judge
    from .render import sample

    torch.set_num_threads(2)
    t0 = time.time()
    pipe = pipe or load_pipeline(model)
    train = [sample(seed + 777, i, shape=target).image for i in range(n_train)]
    train_token(pipe, train, steps=steps, lr=lr, seed=seed, init_word=init_word, progress=progress)

    def share(prompt, **want):
        imgs = generate(pipe, [prompt] * count, seed=seed + 100, guidance=guidance)
        v = judge(imgs)
        ok = [r["shape"] == target and all(r[k] == w for k, w in want.items()) for r in v]
        return float(np.mean(ok))

    res = {
        "target": target,
        f"fidelity 'a photo of a {TOKEN}'": share(f"a photo of a {TOKEN}"),
        f"baseline 'a photo of a {init_word}'": share(f"a photo of a {init_word}"),
        f"compose 'a blue {TOKEN}' (shape and colour)": share(f"a blue {TOKEN}", colour="blue"),
        f"compose 'a small {TOKEN} on the left' (shape, size, position)": share(
            f"a small {TOKEN} on the left", size="small", position="left"),
        f"compose 'a striped {TOKEN}' (shape and style)": share(f"a striped {TOKEN}", style="striped"),
        "minutes": round((time.time() - t0) / 60, 1),
    }
    return res
