"""Train the built-in mini text-to-image model from scratch on the miniature world.

Recipe (one call of :func:`train_base`, CLI ``textinv world train-base``):

1. render a dataset of world images with several captions each (deterministic by seed);
2. train a small AutoencoderKL (32x32x3 -> 8x8x4), MSE + L1 + small KL; set ``scaling_factor``
   so that scaled latents have unit std;
3. encode every image once (posterior mean and std kept; a fresh posterior sample per step);
4. train UNet2DConditionModel + CLIPTextModel jointly with the VAE frozen: DDPM epsilon loss with
   min-SNR(5) weighting, 10 % caption dropout (classifier-free guidance), AdamW with warmup and
   cosine decay, EMA of UNet and text encoder;
5. save a diffusers Stable Diffusion folder (fp16 safetensors, DDIM scheduler config).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from multiprocessing import get_context
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..errors import TextinvError
from . import render, spec

PACKAGE_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "mini" / "tokenizer"

VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=spec.IMAGE_SIZE,
)
UNET_CONFIG = dict(
    sample_size=spec.IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(96, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    projection_dim=64,
)
SCHEDULER_TRAIN = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULER_SHIP = dict(SCHEDULER_TRAIN, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def log(msg: str, logfile: Path | None = None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if logfile is not None:
        with open(logfile, "a") as f:
            f.write(line + "\n")


def _render_chunk(args):
    seed, start, n, ncap = args
    S = spec.IMAGE_SIZE
    imgs = np.zeros((n, S, S, 3), np.uint8)
    caps = []
    for j in range(n):
        s = render.sample(seed, start + j)
        imgs[j] = np.asarray(s.image)
        cs = [s.caption]
        for k in range(1, ncap):
            cs.append(render.make_caption(s.attrs, np.random.default_rng([seed, start + j, 1000 + k])))
        caps.append(cs)
    return imgs, caps


def render_dataset(n: int, seed: int, ncap: int = 4, workers: int = 2):
    """``n`` images (uint8) with ``ncap`` captions each, rendered in parallel."""


    chunk = 2000
    jobs = [(seed, s, min(chunk, n - s), ncap) for s in range(0, n, chunk)]
    imgs, caps = [], []
    with get_context("fork").Pool(workers) as pool:
        for im, cp in tqdm(pool.imap(_render_chunk, jobs), total=len(jobs), desc="render", unit="chunk"):
            imgs.append(im)
            caps.extend(cp)
    return np.concatenate(imgs), caps


def build_models(seed: int):

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return vae, unet, te


def _lr_at(step: int, total: int, warmup: int, base: float, final_frac: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(vae, imgs: np.ndarray, steps: int, batch: int, lr: float, seed: int, logfile=None, kl_weight=1e-6,
              decoder_only: bool = False):
    """MSE + L1 + small KL.  ``decoder_only``: the encoder (so the latent space, and every UNet
    trained on it) stays as it is; only how latents are drawn back into pixels is learned."""

    g = torch.Generator().manual_seed(seed)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()) if decoder_only else list(vae.parameters())
    for p in vae.parameters():
        p.requires_grad_(not decoder_only)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x_all = torch.from_numpy(imgs)
    vae.train()
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in bar:
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, steps, 200, lr)
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x = x_all[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        y = vae.decode(z).sample
        rec = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec + kl_weight * kl * z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
            log(f"vae step {step} rec {rec.item():.5f} kl/dim {kl.item():.4f}", logfile)
    vae.eval()
    return vae


@torch.no_grad()
def encode_all(vae, imgs: np.ndarray, batch: int = 512):
    means, stds = [], []
    for i in range(0, len(imgs), batch):
        x = torch.from_numpy(imgs[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        d = vae.encode(x).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def save_pipeline(out: Path, vae, unet, te, dtype=torch.float16, copy_tokenizer: bool = True) -> None:
    """Write a diffusers Stable Diffusion folder (weights in ``dtype``)."""

    out.mkdir(parents=True, exist_ok=True)
    for name, m in (("vae", vae), ("unet", unet), ("text_encoder", te)):
        _save_weights(m, out / name, dtype)
    declare_float32(out / "text_encoder")
    DDIMScheduler(**SCHEDULER_SHIP).save_pretrained(out / "scheduler")
    tok_dir = out / "tokenizer"
    if copy_tokenizer and tok_dir.resolve() != PACKAGE_TOKENIZER.resolve():
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        shutil.copytree(PACKAGE_TOKENIZER, tok_dir)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "textinv.json").write_text(json.dumps(model_settings(), indent=2, ensure_ascii=False) + "\n")


def declare_float32(folder: Path) -> None:
    """fp16 on disk, but a transformers model's config declares float32, so that a plain
    from_pretrained() (no torch_dtype) gives a consistent fp32 pipeline: transformers 5 would
    otherwise load the text encoder in fp16 while diffusers loads the rest in fp32."""
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save_weights(model, folder: Path, dtype) -> None:
    """One part of a model folder, in ``dtype`` (a copy: the model being trained stays fp32)."""


    mc = copy.deepcopy(model).to(dtype)
    if hasattr(mc, "_internal_dict"):  # diffusers records where a model came from (--init-from): not ours to ship
        mc._internal_dict = FrozenDict({k: v for k, v in mc._internal_dict.items() if k != "_name_or_path"})  # read-only: rebuilt
    mc.save_pretrained(folder, safe_serialization=True)


def model_settings() -> dict:
    """The mini model's own defaults (read by ``textinv.models.defaults``), written beside every
    model this trains so that a retrained one keeps them: guidance 4, the world it can draw (its
    whole vocabulary, and what the web form suggests learning: a shape of its own, from the word
    "shape", not a cat), and the held-out prompts ``textinv bias`` measures the biased word in."""
    words = spec.vocabulary()
    return {
        "family": "the textinv mini model",
        "guidance": 4.0,
        "note": "A model's own defaults, read by textinv.models.defaults(); any model folder may carry this file.",
        "scope": {
            "about": "the built-in mini model draws only its own world: 32×32 pictures of simple coloured shapes "
                     f"(circle, star, heart, …) on a plain background, named with a vocabulary of {len(words)} words "
                     "(docs/mini-world.md)",
            "image_size": spec.IMAGE_SIZE,
            "words": words,
            "examples": {"token": "<my-shape>", "init": "shape"},
        },
        "held_out_prompts": list(spec.BIAS_HELD_OUT),
    }


def _diffusers_version() -> str:

    return diffusers.__version__


class EMA:
    def __init__(self, model, decay: float):

        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1 - d)


def _tokenized_captions(caps) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(ids [images, captions, 77], captions per image, the empty prompt's ids)."""

    tok = CLIPTokenizer.from_pretrained(str(PACKAGE_TOKENIZER))
    flat = [c for cs in caps for c in cs]
    ids = tok(flat, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ncap = len(caps[0])
    empty_ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    return ids.view(len(caps), ncap, 77), ncap, empty_ids


def _vae_stage(init_from, seed: int, imgs, vae_steps: int, vae_batch: int, logfile):
    """The VAE (trained, or a saved model's), logged with its reconstruction error, and every
    image's latent mean/std: (vae, unet, te, (mean, std, scaling), reconstruction mse)."""
    t0 = time.time()
    vae, unet, te, mean, std, sf = _vae_models(init_from, seed, imgs, vae_steps, vae_batch, logfile)
    mse = _recon_mse(vae, imgs)
    log(f"vae done in {time.time() - t0:.0f}s; scaling_factor {sf:.4f}; recon mse(mean) {mse:.5f}", logfile)
    return vae, unet, te, (mean, std, sf), mse


def _vae_models(init_from, seed: int, imgs, vae_steps: int, vae_batch: int, logfile):
    if init_from is not None:  # continue training a saved model (its VAE stays as it is)
        init_from = Path(init_from)
        vae = AutoencoderKL.from_pretrained(init_from / "vae", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(init_from / "unet", torch_dtype=torch.float32)
        te = CLIPTextModel.from_pretrained(init_from / "text_encoder", torch_dtype=torch.float32)
        vae.eval()
        for p in vae.parameters():
            p.requires_grad_(False)
        mean, std = encode_all(vae, imgs)
        log(f"continuing from {init_from}", logfile)
        return vae, unet, te, mean, std, float(vae.config.scaling_factor)
    vae, unet, te = build_models(seed)
    train_vae(vae, imgs, vae_steps, vae_batch, 1e-3, seed, logfile)
    for p in vae.parameters():
        p.requires_grad_(False)
    mean, std = encode_all(vae, imgs)
    sf = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=sf)
    return vae, unet, te, mean, std, sf


def _unet_optimizer(unet, te, lr: float, text_lr: float) -> torch.optim.AdamW:
    """AdamW over both networks; each group keeps its ``base`` rate for the warm-up/cosine schedule."""
    return torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": lr, "base": lr, "weight_decay": 0.01},
            {"params": list(te.parameters()), "lr": text_lr, "base": text_lr, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.99),
    )


def _unet_loss(unet, te, sched, w_t, latents, captions, batch: int, cond_drop: float, g) -> torch.Tensor:
    """One batch's min-SNR-weighted epsilon loss: random images, one of their captions (dropped to
    the empty caption with probability ``cond_drop``), a fresh posterior sample and noise level."""
    mean, std, sf = latents
    ids, ncap, empty_ids = captions
    idx = torch.randint(0, len(mean), (batch,), generator=g)
    ci = torch.randint(0, ncap, (batch,), generator=g)
    tokens = ids[idx, ci]
    drop = torch.rand(batch, generator=g) < cond_drop
    tokens[drop] = empty_ids
    z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    pred = unet(sched.add_noise(z, noise, t), t, te(tokens).last_hidden_state).sample
    return (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * w_t[t]).mean()


def _fitted_total(step: int, started: float, unet_minutes: float, bar, logfile) -> int:
    """The step count that fits the wall-clock budget, re-estimated as the machine's load changes."""
    per = (time.time() - started) / step
    total = max(step + 1, 60, int(unet_minutes * 60 / per))
    bar.total = total
    bar.refresh()
    if step == 30:
        log(f"unet: {per:.3f}s/step -> {total} steps for {unet_minutes} min", logfile)
    return total


def _unet_stage(vae, unet, te, latents, captions, *, seed, unet_steps, unet_minutes, batch, lr, text_lr, warmup, ema_decay,
                cond_drop, ckpt_every_min, workdir, logfile):
    """UNet + text encoder with EMA, min-SNR-5 weighting and caption dropout, for ``unet_steps`` or
    the wall-clock budget; checkpoints every ``ckpt_every_min``.  (ema unet, ema text, steps, losses)"""
    sched = DDPMScheduler(**SCHEDULER_TRAIN)
    acp = sched.alphas_cumprod.float()
    snr = acp / (1 - acp)
    w_t = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weighting for epsilon prediction
    unet.train()
    te.train()
    ema_u, ema_t = EMA(unet, ema_decay), EMA(te, ema_decay)
    opt = _unet_optimizer(unet, te, lr, text_lr)
    g = torch.Generator().manual_seed(seed + 1)
    total = unet_steps or 10 ** 9
    t_unet = last_ckpt = time.time()
    bar = tqdm(desc="unet+text", total=unet_steps, mininterval=10)
    step, losses = 0, []
    while step < total:
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, total, warmup, pg["base"])
        loss = _unet_loss(unet, te, sched, w_t, latents, captions, batch, cond_drop, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        ema_u.update(unet, step)
        ema_t.update(te, step)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if unet_steps is None and (step == 30 or step % 100 == 0):
            total = _fitted_total(step, t_unet, unet_minutes, bar, logfile)
        if step % 200 == 0:
            log(f"unet step {step}/{total} loss {np.mean(losses[-200:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"elapsed {(time.time() - t_unet) / 60:.1f} min", logfile)
        if ckpt_every_min and time.time() - last_ckpt > ckpt_every_min * 60:
            save_pipeline(workdir / "ckpt", vae, ema_u.model, ema_t.model)
            (workdir / "ckpt" / "STEP").write_text(str(step))
            log(f"checkpoint at step {step} -> {workdir / 'ckpt'}", logfile)
            last_ckpt = time.time()
    bar.close()
    return ema_u, ema_t, step, losses


def _recon_mse(vae, imgs: np.ndarray) -> float:
    """The VAE's reconstruction error (posterior mean) on the first 256 images."""
    with torch.no_grad():
        x = torch.from_numpy(imgs[:256]).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        return F.mse_loss(rec, x).item()


def train_base(
    out: Path,
    seed: int = 0,
    n_images: int = 60000,
    vae_steps: int = 1200,
    vae_batch: int = 64,
    minutes: float = 88.0,
    unet_minutes: float | None = None,
    unet_steps: int | None = None,
    batch: int = 64,
    lr: float = 5e-4,
    text_lr: float = 5e-4,
    warmup: int = 400,
    ema_decay: float = 0.999,
    cond_drop: float = 0.1,
    ckpt_every_min: float = 10.0,
    workdir: Path | None = None,
    threads: int = 2,
    init_from: Path | None = None,
) -> dict:
    """Run the whole recipe; returns a summary dict.

    The UNet stage runs ``unet_steps`` steps if given (exactly reproducible), else it fills the
    wall-clock left of ``minutes`` for the whole command (or ``unet_minutes`` for the stage alone);
    the step count it reached is in the summary, so ``--unet-steps`` can replay the run.
    """
    torch.set_num_threads(threads)
    t_start = time.time()
    out = Path(out)
    workdir = Path(workdir) if workdir else out.parent / (out.name + ".work")
    workdir.mkdir(parents=True, exist_ok=True)
    logfile = workdir / "train.log"
    log(f"train-base seed={seed} n_images={n_images} out={out}", logfile)

    imgs, caps = render_dataset(n_images, seed + 1000)
    log(f"rendered {len(imgs)} images in {time.time() - t_start:.0f}s; e.g. {caps[0][0]!r}", logfile)
    captions = _tokenized_captions(caps)

    vae, unet, te, latents, vae_mse = _vae_stage(init_from, seed, imgs, vae_steps, vae_batch, logfile)
    if init_from is not None:
        warmup = min(warmup, 100)

    if unet_minutes is None:  # what is left of the whole command's budget (2 min kept for saving)
        unet_minutes = max(1.0, minutes - (time.time() - t_start) / 60 - 2.0)
    log(f"unet stage: {unet_steps or 'fit'} steps, budget {unet_minutes:.1f} min", logfile)
    ema_u, ema_t, step, losses = _unet_stage(
        vae, unet, te, latents, captions, seed=seed, unet_steps=unet_steps, unet_minutes=unet_minutes, batch=batch, lr=lr,
        text_lr=text_lr, warmup=warmup, ema_decay=ema_decay, cond_drop=cond_drop, ckpt_every_min=ckpt_every_min,
        workdir=workdir, logfile=logfile)
    save_pipeline(out, vae, ema_u.model, ema_t.model)
    summary = {
        "seed": seed, "n_images": n_images, "unet_minutes": unet_minutes, "vae_steps": vae_steps, "unet_steps": step, "batch": batch,
        "lr": lr, "text_lr": text_lr, "scaling_factor": latents[2], "vae_recon_mse": vae_mse,
        "final_loss": float(np.mean(losses[-200:])), "minutes": (time.time() - t_start) / 60,
        "init_from": str(init_from) if init_from else None,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: {summary}", logfile)
    return summary


def tune_decoder(model: Path, out: Path, steps: int = 2000, n_images: int = 30000, seed: int = 0, lr: float = 5e-4,
                 batch: int = 64, threads: int = 2) -> dict:
    """Teach a saved model's VAE decoder the world as it is now, encoder frozen.

    The latent space stays exactly as it was, so the UNet and text encoder keep working unchanged
    and are copied as they are.  (Model v3: the v2 decoder, trained when 90 % of balls were red,
    blurred away the highlight that makes a small yellow or cyan disc a ball.)
    """

    torch.set_num_threads(threads)
    t_start = time.time()
    model, out = Path(model), Path(out)
    if not (model / "vae" / "config.json").is_file():

        raise TextinvError(f"{model}: not a model folder (no vae/config.json)")
    imgs, _ = render_dataset(n_images, seed + 5000)
    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32)
    train_vae(vae, imgs, steps, batch, lr, seed, decoder_only=True)
    part = out.parent / (out.name + ".partial")  # a whole model folder or none: renamed into place at the end
    if part.exists():
        shutil.rmtree(part)
    try:
        shutil.copytree(model, part)
        _save_weights(vae, part / "vae", torch.float16)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    part.rename(out)
    return {"steps": steps, "n_images": n_images, "seed": seed, "lr": lr, "minutes": (time.time() - t_start) / 60}
