"""Textual inversion training: a few images in, a few-kB embedding out.

Its settings, :class:`~textinv.settings.TrainConfig`, are declared in :mod:`textinv.settings`.
Read top to bottom: set-up (model, images, latent cache, the new token), the loop, saving.
What makes it fast and safe:

* Only the new vectors are parameters.  They live in :class:`textinv.tokens.TriggerEmbedding`
  beside the frozen token table, so there is no whole-table gradient, no whole-table AdamW state
  and no "restore the other rows" copy after every step.
* Every image view (crops, mirrors) is VAE-encoded once, and kept on disk (:mod:`textinv.latents`):
  a second run on the same images starts at once.  A step draws ``mean + std * noise`` from the
  cached latent distribution.  Frozen networks hold no weight gradients.
* All randomness of step ``s`` comes from a generator seeded by ``(seed, s)``: a run resumed
  from its last save ends with the same embedding, bit for bit on CPU, as one never stopped.
* The learned vectors stay float32 whatever ``--precision`` the model runs in (no NaN from fp16).
* It stops when the word is learned: a fixed evaluation batch is scored every ``eval_every`` steps
  without a gradient, and :mod:`textinv.stopping` reads that curve; ``--steps`` is the ceiling.

SD3/SD3.5 and Flux.1 train through the same steps with their own objective (a row of
:data:`OBJECTIVES`, chosen by the family's ``joins``): the transformer and the flow-matching loss of
diffusers' training scripts (:mod:`textinv.flowmatch`) instead of the UNet and DDPM noise; every
encoder (CLIP-L, CLIP-G, T5) learns its own vectors, or those ``--encoders`` names.

``--per-layer`` (P+, SD 1.x/2.x) learns one set of vectors per UNet cross-attention layer: the word
starts as one copy of its init vectors per layer (:func:`textinv.perlayer.trainable`), the prompts
are encoded once per layer and each layer attends to its own (:class:`PromptTable`,
:class:`textinv.perlayer.LayeredUNet`); the rest of the loop is the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import reduce
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from . import data, families, flowmatch, formats, generation, interrupts, perlayer, prompts, runs, stopping, tokens
from .atomic import atomic_path
from .errors import TextinvError
from .formats import Embedding
from .images import grid
from .latents import encode_views, open_cache
from . import models
from .models import load_pipeline, name_of
from .settings import TrainConfig, changed, check, identity, parse_encoders, parse_lr, parse_timesteps, templates_of

LOSS_WINDOW = 20  # the loss shown (bar and summary) is the mean of the last this-many steps
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what a scheduler config may say the UNet predicts
MAX_SKIPPED_STEPS = 25  # fp16: this many overflowing steps in a row is not a transient, it is the model
EVAL_STREAM = 2**40  # the random stream of the fixed evaluation batch (training draws use the process index)


class TrainingDiverged(TextinvError):
    """The loss or the vectors became NaN/inf."""


@dataclass
class TrainResult:
    out: Path
    embedding_path: Path
    embedding: Embedding
    steps: int
    seconds: float
    loss: float  # the mean of the last LOSS_WINDOW steps' losses (what the progress bar shows)
    is_main_process: bool = True  # with several processes (accelerate launch), only the main one writes
    stopped: str | None = None  # why the run ended before --steps (early stopping, a callback); None: it did not
    eval_loss: float | None = None  # the evaluation batch's loss at the last evaluation (early stopping on)


# ---------------------------------------------------------------------------- small helpers
def lr_at(schedule: list[tuple[float, int | None]], step: int) -> float:
    for rate, end in schedule:
        if end is None or step < end:
            return rate
    return schedule[-1][0]


def lr_factor(kind: str, warmup: int, step: int, total: int) -> float:
    """The schedule's multiplier at ``step`` (0-based): a linear warm-up over ``warmup`` steps, then
    constant, or a cosine / linear decay reaching 0 after the last step (diffusers' and kohya's
    shapes).  It multiplies --lr, which may itself be an A1111 step schedule."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1 - progress
    return 1.0


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def init_vectors(tokenizer, table: torch.Tensor, text: str, n: int) -> torch.Tensor:
    """A1111's rule: vector i copies the init text's token at index i·len/n (zeros if empty)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids if text else []
    if not ids:
        return torch.zeros(n, table.shape[1])
    return torch.stack([table[ids[i * len(ids) // n]].detach().float().cpu() for i in range(n)])


class PromptTable:
    """Every training prompt (template × caption), tokenized once up front.

    A step then gathers ids and runs the text encoders directly, as ``encode_prompt`` would (SD:
    last hidden state; SDXL: both encoders' penultimate states, the second's pooled projection;
    SD3/Flux.1: as :func:`textinv.prompts.encode_flow` joins them) but without tokenizing, twice,
    every prompt of every step.  Each encoder gets the prompt expanded for it (a T5 encoder: no
    75-token chunks), padded to its length (T5: the pipeline's default ``max_sequence_length``, what
    sampling encodes, padding included).  Captions that vary every step (``vary``: shuffled or
    dropped tags) are the exception: those prompts are tokenized per step.
    """

    def __init__(self, pipe, templates: list[str], token: str, captions: list[str], clip_skip: int = 1,
                 vary: dict | None = None, per_layer: bool = False):
        self.captions = sorted(set(captions))
        self.caption_of = torch.tensor([self.captions.index(c) for c in captions])
        filled = [data.fill_template(t, token, c) for t in templates for c in self.captions]
        if not any(token in p for p in filled):
            raise TextinvError(f"--templates: no prompt contains the trigger {token!r} (e.g. {filled[0]!r}); "
                               "put [name] in the templates or in the captions")
        self.pipe, self.templates, self.token, self.vary = pipe, templates, token, vary
        self.shape = (len(templates), len(self.captions))
        self.family = families.of_pipeline(pipe)
        pairs = tokens.slot_pairs(pipe, self.family)
        self.encoders = [(slot, te) for slot, (_, te) in pairs]
        self.lengths = [prompts.t5_length(pipe) if slot.kind == "t5" else tok.model_max_length for slot, (tok, _) in pairs]
        self.clip_skip, self.per_layer = clip_skip, per_layer
        self.filled = filled
        self.tokenize()

    def tokenize(self) -> None:
        """Every prompt's ids, again: the internal tokens' ids change when another word trained
        beside this one leaves the pipeline (``train-many --pack``)."""
        self.ids = [ids.view(*self.shape, -1) for ids in self._ids(self.filled)]

    def _ids(self, texts: list[str]) -> list[torch.Tensor]:
        """Each encoder's ids of ``texts``, each text expanded for that encoder (this word's trigger
        alone, whatever else is applied) and padded to its length."""
        return [tok([tokens.expand(self.pipe, t, i, only=self.token) for t in texts], padding="max_length",
                    max_length=n, truncation=True, return_tensors="pt").input_ids
                for i, ((tok, _), n) in enumerate(zip(tokens.encoder_pairs(self.pipe), self.lengths))]

    def encode(self, template_idx: torch.Tensor, view_idx: torch.Tensor, device, rng=None):
        """Hidden states (and the pooled embedding: SDXL, SD3, Flux.1) of the prompts (template, caption of view);
        with varying captions, ``rng`` (a ``random.Random``) draws each prompt's version.  A
        per-layer word's prompts: ``[layers, B, S, D]``, each cross-attention layer's own states."""
        return self.states(self.rows(template_idx, view_idx, device, rng))

    def rows(self, template_idx: torch.Tensor, view_idx: torch.Tensor, device, rng=None) -> list[torch.Tensor]:
        """Each encoder's token ids of the prompts (template, caption of view), on ``device``."""
        if self.vary and rng is not None:
            texts = [data.fill_template(self.templates[int(t)], self.token,
                                        data.vary_caption(self.captions[int(self.caption_of[v])], rng, **self.vary))
                     for t, v in zip(template_idx, view_idx)]
            return [ids.to(device) for ids in self._ids(texts)]
        return [ids[template_idx, self.caption_of[view_idx]].to(device) for ids in self.ids]

    def states(self, rows: list[torch.Tensor]):
        """The text encoders run on ``rows`` (:meth:`rows`; several words' rows joined, when packed)."""
        if self.per_layer:
            return perlayer.encoder_states(self.pipe, rows[0], self.clip_skip), None
        return self._run(rows)

    @torch.no_grad()
    def unconditional(self, pipe, device):
        """The empty prompt's hidden states (and pooled embedding), as the pipelines' guidance uses."""
        hidden, pooled = self._run([tok([""], padding="max_length", max_length=tok.model_max_length,
                                        return_tensors="pt").input_ids.to(device) for tok, _ in tokens.encoder_pairs(pipe)])
        if pooled is not None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):  # SDXL's default: zeros, not the encoded ""
            return torch.zeros_like(hidden), torch.zeros_like(pooled)
        return hidden, pooled

    def _run(self, rows):
        if self.family.joins != "unet":
            return self._run_flow(rows)
        outs = [prompts.run_encoder(te, r, self.family, slot.key, self.clip_skip) for (slot, te), r in zip(self.encoders, rows)]
        return torch.cat([hidden for hidden, _ in outs], dim=-1), next((p for _, p in outs if p is not None), None)

    def _run_flow(self, rows):
        """SD3/Flux.1: (prompt_embeds, pooled), joined as the pipelines join them (gradients kept)."""
        states, pooled = {}, []
        for (slot, te), r in zip(self.encoders, rows):
            states[slot.key], pool = prompts.run_flow_encoder(te, slot.kind, r, self.family.hidden_layer)
            pooled += [] if pool is None else [pool]
        joined = prompts.join_flow(self.family, states, pooled)
        return joined.embeds, joined.pooled


def guided(unet, pred, noisy, t, uncond, scale: float, kwargs: dict) -> torch.Tensor:
    """The prediction a sampler uses at guidance ``scale``: uncond + scale·(cond − uncond).

    Why: the plain loss fits the *conditional* distribution, but images are sampled with guidance,
    which sharpens whatever the conditional slightly prefers (a word re-learned from a balanced set
    still comes out mostly in its old colour).  Fitting the guided prediction instead fits what the
    sampler will draw.  The unconditional branch is frozen (no gradient): one extra UNet forward."""
    hidden, pooled = uncond
    extra = dict(kwargs)
    if pooled is not None:
        extra["added_cond_kwargs"] = dict(kwargs["added_cond_kwargs"], text_embeds=pooled.expand(len(noisy), -1))
    with torch.no_grad():
        base = unet(noisy, t, hidden.expand(len(noisy), -1, -1), **extra).sample
    return base + scale * (pred - base)


def prediction_target(noise_scheduler, latents, noise, t) -> torch.Tensor:
    """What the UNet is trained to predict, as its scheduler config says (ε, v or x₀)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise TextinvError(f"the model's scheduler says prediction_type {kind!r}; textinv trains "
                       f"{', '.join(PREDICTION_TYPES)} models")


def denoising_loss(unet, noise_scheduler, latents, noise, t, hidden, added_cond=None, uncond=None,
                   guidance: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The step's loss: noise the latents (DDPM), predict, mean squared error to the target.

    The same math as the established recipe (diffusers' and A1111's trainers); tests check it
    against a plain implementation.  ``added_cond``: SDXL's pooled text embedding and time ids.
    ``weight`` ([N, 1, h, w], --alpha-mask): each latent pixel's share of the error, so that a
    cut-out's transparent background teaches nothing (kohya's masked loss).
    """
    pred, target = denoising_prediction(unet, noise_scheduler, latents, noise, t, hidden, added_cond, uncond, guidance)
    return masked_mse(pred, target, weight)


def denoising_prediction(unet, noise_scheduler, latents, noise, t, hidden, added_cond=None, uncond=None,
                         guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`denoising_loss` compares, row by row: (the UNet's prediction, its target)."""
    dev, dtype = hidden.device, unet.dtype
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = prediction_target(noise_scheduler, latents, noise, t)
    noisy, t = noisy.to(dev, dtype), t.to(dev)
    kwargs = {"added_cond_kwargs": added_cond} if added_cond is not None else {}
    pred = unet(noisy, t, hidden.to(dtype), **kwargs).sample
    if uncond is not None:
        pred = guided(unet, pred, noisy, t, uncond, guidance, kwargs)
    return pred, target


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The mean squared error in float32, or with ``weight`` each pixel's error in its share."""
    dev = pred.device
    if weight is None:
        return F.mse_loss(pred.float(), target.to(dev).float())
    w = weight.to(dev).float().expand_as(pred)
    return ((pred.float() - target.to(dev).float()) ** 2 * w).sum() / w.sum().clamp_min(1e-6)


# ------------------------------------------------------------------------------- objectives
def _ddpm_schedule(pipe, cfg: TrainConfig) -> tuple[object, tuple[int, int]]:
    """SD/SDXL: DDPM noise on the model's schedule; --timesteps as its timesteps."""
    # The pipeline's prediction type, said explicitly: from_config drops values a config only
    # holds as defaults of another scheduler class.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config,
                                                prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"))
    if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        prediction_target(noise_scheduler, None, None, None)  # raises, naming the type
    return noise_scheduler, parse_timesteps(cfg.timesteps, noise_scheduler.config.num_train_timesteps)


def _flow_schedule(pipe, cfg: TrainConfig) -> tuple[object, tuple[int, int]]:
    """SD3/Flux.1: the flow-matching training schedule (:func:`textinv.flowmatch.train_schedule`);
    --timesteps LOW:HIGH as the indices of its entries whose timestep (σ·1000) lies in it (index 0
    is pure noise, σ = 1: in every range that reaches the top)."""
    scheduler = flowmatch.train_schedule(pipe.scheduler.config)
    total = scheduler.config.num_train_timesteps
    low, high = parse_timesteps(cfg.timesteps, total)
    t = scheduler.timesteps
    inside = ((t >= low) & ((t < high) | (high == total))).nonzero().flatten()
    if not len(inside):
        raise TextinvError(f"--timesteps {cfg.timesteps}: none of this model's {len(t)} training noise levels lies there")
    return scheduler, (int(inside[0]), int(inside[-1]) + 1)


def _unet_grid(pipe, resolution: int, vae_scale: int) -> tuple[int, int, str]:
    """SD/SDXL: (sizes a multiple of this, the bucket step, what the multiple is)."""
    step = data.bucket_step(resolution, vae_scale, 2 ** (len(pipe.unet.config.block_out_channels) - 1))
    return vae_scale, step, "this model's VAE scale factor"


def _flow_grid(pipe, resolution: int, vae_scale: int) -> tuple[int, int, str]:
    """SD3/Flux.1: a latent has whole transformer tokens (SD3's 2×2 patches, Flux.1's 2×2 packing)."""
    grain = vae_scale * flowmatch.token_side(pipe)
    return grain, data.bucket_step(resolution, grain, 1), "the VAE's scale factor times a transformer token's side"


def _ddpm_draw(model: "_Model", batch: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(*model.timesteps, (batch,), generator=g)


def _flow_draw(model: "_Model", batch: int, g: torch.Generator) -> torch.Tensor:
    """Schedule indices as the family's diffusers script draws them (SD3: logit-normal), within --timesteps."""
    low, high = model.timesteps
    return low + flowmatch.draw_indices(batch, high - low, flowmatch.recipe_of(model.family).weighting, generator=g)


def _ddpm_loss(batches: "_Batches", latents, noise, t, encoded, views, weight) -> torch.Tensor:
    m, (hidden, pooled) = batches.model, encoded
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": batches.time_ids[views].to(m.device, m.dtype)}
    return denoising_loss(m.denoiser, m.noise_scheduler, latents, noise, t, hidden, added, batches.uncond,
                          batches.cfg.guidance, weight)


def _flow_loss(batches: "_Batches", latents, noise, t, encoded, views, weight) -> torch.Tensor:
    m, (embeds, pooled) = batches.model, encoded
    return flowmatch.flow_loss(m.pipe, latents.to(m.device), noise.to(m.device), t, embeds, pooled, family=m.family,
                               mask=weight)


def _ddpm_losses(batches: "_Batches", latents, noise, t, encoded, time_ids, weights: list, sizes: list[int]) -> list:
    """Several runs' rows in one UNet call (``train-many --pack``): each run's loss over its own
    ``sizes`` rows, as :func:`_ddpm_loss` takes it.  ``time_ids``: SDXL's, per row."""
    m, (hidden, pooled) = batches.model, encoded
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids.to(m.device, m.dtype)}
    pred, target = denoising_prediction(m.denoiser, m.noise_scheduler, latents, noise, t, hidden, added, batches.uncond,
                                        batches.cfg.guidance)
    return [masked_mse(p, y, w) for p, y, w in zip(pred.split(sizes), target.split(sizes), weights)]


def _flow_losses(batches: "_Batches", latents, noise, t, encoded, time_ids, weights: list, sizes: list[int]) -> list:
    """Several runs' rows in one transformer call: each run's loss over its own rows, as :func:`_flow_loss`."""
    m, (embeds, pooled) = batches.model, encoded
    pred, target, w = flowmatch.flow_prediction(m.pipe, latents.to(m.device), noise.to(m.device), t, embeds, pooled,
                                                family=m.family)
    return [flowmatch.weighted_mse(p, y, r, mask)
            for p, y, r, mask in zip(pred.split(sizes), target.split(sizes), w.split(sizes), weights)]


def _unet_refusals(cfg: TrainConfig, family: families.Family) -> None:
    """SD/SDXL train with every setting."""


def _flow_refusals(cfg: TrainConfig, family: families.Family) -> None:
    """One line for a setting SD3/Flux.1 training does not take (yet)."""
    name, keeps = family.name, ("diffusers", *formats.FLOW_LAYOUTS)
    refused = [
        (cfg.per_layer, f"--per-layer: P+ gives each UNet cross-attention layer its own vectors; {name} has a transformer"),
        (cfg.guidance != 1, f"--guidance {cfg.guidance:g}: training guidance fits a UNet's guided prediction; {name} "
                            "trains the plain flow-matching loss (FLUX.1-dev's guidance input is 3.5, as in diffusers' script)"),
        (cfg.compile, f"--compile: not for {name} yet (the flow loss runs the pipeline's own transformer)"),
        (cfg.clip_skip != 1, f"--clip-skip {cfg.clip_skip}: {name} takes fixed layers of its encoders, as its pipeline "
                             "does (use 1)"),
        (cfg.format not in keeps, f"--format {cfg.format}: cannot hold the T5 part of a {name} embedding; use "
                                  f"{', '.join(keeps[1:])} (the default writes the model's own layout)"),
    ]
    problem = next((why for bad, why in refused if bad), None)
    if problem:
        raise TextinvError(problem)


@dataclass(frozen=True)
class Objective:
    """How a family's denoiser is trained: one row of :data:`OBJECTIVES`, by the family's ``joins``."""

    refuse: Callable  # (cfg, family): one line for a setting it cannot train with
    schedule: Callable  # (pipe, cfg) -> (its training scheduler, [low, high) of what ``draw`` picks)
    grid: Callable  # (pipe, resolution, vae_scale) -> (image sides' multiple, bucket step, that multiple in words)
    draw: Callable  # (model, batch, generator) -> DDPM timesteps, or flow-schedule indices
    loss: Callable  # (batches, latents, noise, t, (hidden, pooled), views, mask weight) -> the batch's loss
    losses: Callable  # (batches, latents, noise, t, (hidden, pooled), time ids, masks, sizes) -> each part's loss


FLOW = Objective(_flow_refusals, _flow_schedule, _flow_grid, _flow_draw, _flow_loss, _flow_losses)  # SD3, Flux.1: flowmatch's recipe
OBJECTIVES = {"unet": Objective(_unet_refusals, _ddpm_schedule, _unet_grid, _ddpm_draw, _ddpm_loss, _ddpm_losses),
              "sd3": FLOW, "flux": FLOW}


def view_time_ids(pipe, views: list) -> torch.Tensor | None:
    """SDXL's micro-conditioning per view: (original size, crop top-left, target size (h, w): the
    view's own, its bucket's); None for a family without a pooled embedding (SD)."""
    family = families.of_pipeline(pipe)
    if family.pooled is None:
        return None
    dim = getattr(pipe, family.slot(family.pooled).text_encoder).config.projection_dim
    rows = [pipe._get_add_time_ids(v.original_size, v.crop_top_left, v.size[::-1], dtype=torch.float32,
                                   text_encoder_projection_dim=dim) for v in views]
    return torch.cat(rows)


def _diverged(step: int, params, last_good, fp16: bool, table_norm: float) -> TrainingDiverged:
    """Name the real cause of a NaN/inf: the vectors, or the half-precision forward pass."""
    where = f"last good embedding: {last_good or 'none saved yet'}"
    if not all(torch.isfinite(p).all() for p in params):
        return TrainingDiverged(f"step {step}: the vectors became NaN/inf (learning rate too high?); {where}")
    norm = max(float(p.detach().norm(dim=-1).max()) for p in params)
    if norm > 100 * table_norm:
        return TrainingDiverged(f"step {step}: the loss became NaN/inf with vectors of norm {norm:.3g} (the vocabulary's "
                                f"are ~{table_norm:.2g}): the learning rate is too high; {where}")
    if fp16:
        return TrainingDiverged(f"step {step}: the loss became NaN/inf in the float16 forward pass with ordinary vectors "
                                f"(norm {norm:.3g}): the model overflows in half precision; use --precision bf16 or fp32; {where}")
    return TrainingDiverged(f"step {step}: the loss became NaN/inf with ordinary vectors (norm {norm:.3g}): the model "
                            f"weights or the training images hold NaN/inf; {where}")


# ------------------------------------------------------------------------------------ train
def train(config: TrainConfig | None = None, pipe=None, on_save=None, on_step=None, echo=None, alone: bool = False,
          **overrides) -> TrainResult:
    """Train one embedding.  ``train(images=..., token=..., steps=...)`` or ``train(TrainConfig(...))``.

    ``on_save(step, path)`` is called after each ``save_every`` save (the trigger is applied to
    ``pipe`` with the current vectors); returning True stops training there (early stopping).
    ``on_step(step, loss)`` is called after every step (and its preview); returning True stops
    training there, with the final embedding and state at that step (the web UI's Stop button).
    ``echo(line)`` hears what the run is about to do (the model it loads, the one-line summary of
    images, buckets, captions and output) before the first step.  What the model cannot learn
    from these images comes as a warning.

    Ctrl-C or SIGTERM (caught in the main thread, the only one signals reach) saves the last
    completed step as a save point does and raises :class:`textinv.interrupts.Interrupted` saying
    so; ``resume=True`` goes on from there.  A run that fails or is interrupted before its first
    step leaves its folder as it found it (none at all, if there was none).

    Under ``accelerate launch`` the processes train the run together (data-parallel), the main one
    writing; ``alone=True``: this process trains it by itself, on its own device, and writes it
    (``textinv train-many`` gives each process whole runs, :mod:`textinv.many`).
    """
    cfg = dataclasses.replace(config, **overrides) if config else TrainConfig(**overrides)
    check(cfg)  # before anything is written
    dist = PartialState(cpu=not torch.cuda.is_available())  # several CPU processes talk over gloo
    if alone:
        dist = Alone(dist.device)
    lock = runs.RunLock(cfg.resolved_out()) if dist.is_main_process else None
    with interrupts.caught(), lock or contextlib.nullcontext():
        return _train(cfg, pipe, on_save, on_step, dist, echo if dist.is_main_process else None, lock)


@dataclass(frozen=True)
class Alone:
    """What a run asks of accelerate's PartialState, for one process that trains a run by itself
    while others train theirs: it is the main (writing) process of a group of one."""

    device: torch.device
    is_main_process: bool = True
    num_processes: int = 1
    process_index: int = 0

    def wait_for_everyone(self) -> None:
        pass


def _train(cfg: TrainConfig, pipe, on_save, on_step, dist, echo=None, lock: runs.RunLock | None = None) -> TrainResult:
    """The stages, top to bottom: set up (freeze the model, cache the images, add the word), loop, save.
    Nothing done (no step completed) when it fails or is interrupted: ``lock`` discards what the attempt created."""
    run = None
    try:
        if (on_save is not None or on_step is not None) and dist.num_processes > 1:
            raise TextinvError("early stopping, --pick-best or a stop callback needs a single process")
        run = TrainingRun(cfg, pipe, dist, echo, on_save, on_step)
        _steps(run)
    except BaseException:
        if lock is not None and (run is None or run.word.done == run.word.start):
            lock.discard()
        raise
    return run.finish()


def _set_up(cfg: TrainConfig, pipe, echo, dist, out: Path, beside: bool = False) -> tuple[_Model, _Batches, _Word, _Stopper | None]:
    """Everything before the first step: the folder checked, the images, the model, the word and
    its batches, the state resumed (``word.start``), config.json.  ``beside``: see :class:`_Word`."""
    if dist.is_main_process:
        runs.prepare(out, cfg.resume)
    skipped: list[str] = []
    images = data.load_images(cfg.images, skipped=skipped)
    if echo and pipe is None:
        echo(f"loading {name_of(cfg.model)} …")
    model = _frozen_model(cfg, pipe, dist.device)
    the_plan = plan(cfg, images, skipped, model.resolution, model.bucket_step)
    if dist.is_main_process:
        models.warn_outside_world(model.pipe, images=[i.image for i in images], where=f"--images {cfg.images}")
        if echo:
            echo(the_plan.summary(cfg, name_of(cfg.model), out))
    word = _Word(model.pipe, cfg, dist.device, beside)  # before the prompts are tokenized: they name it
    batches = _Batches(cfg, model, the_plan, dist.process_index)
    curve = []
    if cfg.resume and runs.has_state(out):
        word.done, curve = _load_state(out, cfg, word.params, word.optimizer, word.scaler)
    word.start = word.done
    stopper = _Stopper(batches, cfg, curve) if cfg.early_stop else None
    if dist.is_main_process:
        runs.trim_log(out, word.start)  # each step once, after any number of resumes
        config_json = dict(dataclasses.asdict(cfg), resolution=model.resolution, init=word.applied.embedding.meta["init_text"],
                           templates_used=batches.templates, images_used=[str(i.path) for i in images],
                           views=len(batches.views), buckets={str(p.path.name): list(wh) for p, wh in zip(images, the_plan.sizes)},
                           captions_used=the_plan.captioned)
        runs.write_config(out, config_json)
    return model, batches, word, stopper


def _steps(run: "TrainingRun") -> None:
    """The loop (see :func:`_loop`).  Interrupted (Ctrl-C, SIGTERM): the last completed step is saved
    as a save point saves it (a second signal waits for that), and :class:`Interrupted` says so."""
    try:
        _loop(run)
        return
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
    raise interrupts.Interrupted(signum, run.keep())


@dataclass
class _Model:
    """The frozen pipeline and what every step needs from it, looked up once."""

    pipe: object
    denoiser: torch.nn.Module  # the pipeline's UNet or transformer, or its torch.compile'd version
    noise_scheduler: object  # the training schedule (DDPM, or flow matching's)
    timesteps: tuple[int, int]  # train on [low, high): DDPM timesteps, or flow-schedule indices
    resolution: int
    bucket_step: int  # bucket sides are multiples of this (see data.bucket_step)
    device: torch.device
    dtype: torch.dtype  # diffusers' .device/.dtype walk every module: milliseconds per call
    family: families.Family
    objective: Objective


def load_model(cfg: TrainConfig, device) -> object:
    """The pipeline a run of ``cfg`` trains on (its --model, --config, --precision), on ``device``."""
    if cfg.precision == "fp16" and torch.device(device).type == "cpu":
        raise TextinvError("--precision fp16: half precision is for GPUs; on a CPU it runs tens of times slower "
                           "than fp32 (use fp32, or bf16 to halve memory)")
    return load_pipeline(cfg.model, dtype=cfg.precision, device=str(device), config=cfg.model_config)


def _frozen_model(cfg: TrainConfig, pipe, device) -> _Model:
    if pipe is None:
        pipe = load_model(cfg, device)
    family = families.of_pipeline(pipe)
    objective = OBJECTIVES[family.joins]
    objective.refuse(cfg, family)
    net = generation.denoiser(pipe)
    for module in (net, pipe.vae, *[te for _, te in tokens.encoder_pairs(pipe)]):
        module.requires_grad_(False)
        module.eval()
    prompts.check_clip_skip(pipe, cfg.clip_skip)
    if cfg.grad_checkpointing:  # works in eval mode for diffusers' UNet (transformers' encoders need train mode)
        net.enable_gradient_checkpointing()
    noise_scheduler, timesteps = objective.schedule(pipe, cfg)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or generation.default_size(pipe)[0]
    grain, step, what = objective.grid(pipe, resolution, vae_scale)
    if resolution % grain:
        raise TextinvError(f"--resolution {resolution}: must be a multiple of {grain} ({what})")
    denoiser = torch.compile(net) if cfg.compile else net
    if cfg.per_layer:  # the loss gives it each layer's states
        denoiser = perlayer.LayeredUNet(pipe, denoiser)
    return _Model(pipe, denoiser, noise_scheduler, timesteps, resolution, step, net.device, net.dtype, family, objective)


class _Word:
    """The new word: applied to the pipeline, its learned vectors the only parameters (float32),
    their AdamW (a parameter group per learning rate: with --lr-t5, the T5 vectors' own), and the
    fp16 loss scaler; the steps they have taken (``done``), from ``start`` (a resumed state's).
    ``beside``: other words are applied to the pipeline, each training its own block of rows
    (``train-many --pack``); else the pipeline must hold no other word.

    The encoders ``--encoders`` leaves out keep the init text's vectors (OneTrainer's way: an
    embedding has every encoder's part, some of them simply not trained).  ``--preserve-norm``:
    ``norms`` holds each learned encoder's median vocabulary norm, which :func:`_update` restores."""

    def __init__(self, pipe, cfg: TrainConfig, device, beside: bool = False):
        self.start = self.done = 0
        state = tokens.state(pipe)
        learned = _learned(cfg, state)  # before the word is applied: a refusal leaves the pipeline as it was
        emb = _new_embedding(pipe, cfg)
        self.applied = tokens.apply(pipe, emb)[0]
        if len(state.applied) != 1 and not beside:
            raise TextinvError("train on a pipeline without other embeddings applied")
        block_of = dict(zip((enc.slot for enc in state.encoders), state.blocks(emb.name)))
        self.params = []
        for enc in learned:  # the word's own block of each encoder's trigger rows
            block_of[enc.slot].requires_grad_(True)
            self.params.append(block_of[enc.slot])
        groups = _groups(cfg, learned, self.params)
        self.schedules = [schedule for _, schedule in groups]
        self.optimizer = torch.optim.AdamW([{"params": ps, "lr": lr_at(sch, 0)} for ps, sch in groups],
                                           lr=lr_at(self.schedules[0], 0), weight_decay=cfg.weight_decay)
        # float16 gradients below ~6e-8 vanish: scale the loss up (dynamically; a step whose gradients
        # overflow is skipped and the scale lowered), as the established trainers do.  The vectors and
        # AdamW's state are float32 throughout; bf16 has float32's range and needs no scaling.
        self.fp16 = generation.denoiser(pipe).dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)
        self.table_norm = float(state.encoders[0].base.weight.detach().float().norm(dim=-1).mean())
        self.norms = [median_norm(enc.base.weight) for enc in learned] if cfg.preserve_norm else None


def median_norm(table: torch.Tensor) -> float:
    """The median of a token table's row norms (every row, as OneTrainer measures it): what
    --preserve-norm rescales each learned vector to after every step."""
    return float(torch.linalg.vector_norm(table.detach(), dim=-1, dtype=torch.float32).median())


def _learned(cfg: TrainConfig, state: tokens.TriggerState) -> list:
    """The encoders whose vectors learn: every one, or those --encoders names (one line for a name
    this model lacks, or --lr-t5 on a model without T5)."""
    slots = [enc.slot for enc in state.encoders]
    if cfg.lr_t5 is not None and not any(enc.kind == "t5" for enc in state.encoders):
        raise TextinvError(f"--lr-t5 {cfg.lr_t5}: {state.spec.name} has no T5 text encoder (its encoders: {', '.join(slots)})")
    keys = parse_encoders(cfg.encoders)
    if keys is None:
        return list(state.encoders)
    missing = [k for k in keys if k not in slots]
    if missing:
        raise TextinvError(f"--encoders {cfg.encoders}: {state.spec.name} has no {missing[0]} text encoder (its encoders: "
                           f"{', '.join(slots)})")
    return [enc for enc in state.encoders if enc.slot in keys]


def _groups(cfg: TrainConfig, learned: list, params: list) -> list[tuple[list, list]]:
    """The optimizer's parameter groups and each one's --lr schedule: one group, or with --lr-t5 the
    other vectors' (if any learn) and the T5 vectors'."""
    if cfg.lr_t5 is None:
        return [(params, parse_lr(cfg.lr))]
    t5 = [p for enc, p in zip(learned, params) if enc.kind == "t5"]
    rest = [p for enc, p in zip(learned, params) if enc.kind != "t5"]
    groups = [(rest, parse_lr(cfg.lr)), (t5, parse_lr(cfg.lr_t5, flag="--lr-t5"))]
    return [(ps, schedule) for ps, schedule in groups if ps]


@dataclass
class Plan:
    """What a run will train on, decided before any latent is computed (and said in one line)."""

    images: list  # data.TrainImage
    skipped: list[str]  # the files that were not usable, with why
    sizes: list[tuple[int, int]]  # each image's (width, height) at training time: its bucket
    captions: list[str]  # each image's [filewords] text
    captioned: int  # how many images have a sidecar caption that is used (0: captions off)
    templates: list[str]
    resolution: int

    def summary(self, cfg: "TrainConfig", model_name: str, out: Path) -> str:
        n, views = len(self.images), len(self.images) * cfg.crops * (2 if cfg.flip else 1)
        found = f"{n} image{'s' if n != 1 else ''} from {cfg.images}" + (f" ({len(self.skipped)} skipped)" if self.skipped else "")
        buckets = Counter(self.sizes)
        if len(buckets) == 1 and next(iter(buckets))[0] == next(iter(buckets))[1]:
            size = f"{self.resolution}×{self.resolution} squares (centre crops)"
        else:
            size = "buckets " + ", ".join(f"{w}×{h}" + (f" ×{c}" if c > 1 else "") for (w, h), c in sorted(buckets.items()))
        captions = f"captions from IMG.txt for {self.captioned} of {n}" if self.captioned else (
            "captions: file names ([filewords])" if any("[filewords]" in t for t in self.templates) else "no captions")
        if cfg.captions is not False and self.captioned and (cfg.shuffle_captions or cfg.caption_dropout or cfg.keep_tokens):
            captions += " (varied every step)"
        parts = [found, size, f"{views} views", captions]
        rgba = sum(i.alpha is not None for i in self.images)
        if rgba:
            parts.append(f"alpha mask on {rgba}" if cfg.alpha_mask else
                         f"{rgba} with transparency, trained on white (--alpha-mask: the subject only)")
        return f"training {cfg.token!r}: " + ", ".join(parts) + f"; model {model_name}; output {out}/{trigger_note(cfg)}"


def trigger_note(cfg: "TrainConfig") -> str:
    """Why the trained word is called otherwise once written: its files are named after the token
    made safe as a file name (:func:`textinv.formats.file_stem`), and A1111, like textinv's reader,
    calls an embedding by its file's name.  Empty where the two agree, or for a PNG card (it keeps
    the token inside)."""
    stem = formats.file_stem(cfg.token)
    if stem == cfg.token or cfg.file_format == "png":
        return ""
    how = "without its brackets" if stem == cfg.token.strip("<>") else "made safe as a file name"
    return f"; trigger {stem!r} (the files are named after the token {how}, and A1111 calls an embedding by its file's name)"


def plan(cfg: "TrainConfig", images: list, skipped: list[str], resolution: int, step: int) -> Plan:
    """Buckets, captions and templates of a run: the --buckets/--captions defaults decided here."""
    squares = [(resolution, resolution)] * len(images)
    buckets = [data.bucket_for(*i.image.size, resolution, step) for i in images]
    use_buckets = cfg.buckets if cfg.buckets is not None else any(w != h for w, h in buckets)
    sidecars = sum(i.has_sidecar for i in images)
    templates = templates_of(cfg)
    explicit_filewords = any("[filewords]" in t for t in templates)
    use_captions = cfg.captions if cfg.captions is not None else (sidecars > 0 and not cfg.templates)
    if use_captions and cfg.captions and not sidecars:
        raise TextinvError(f"--captions: no image in {cfg.images} has a caption file (IMG.txt beside IMG.png)")
    if use_captions and cfg.templates and not explicit_filewords:
        raise TextinvError(f"--captions: the templates in {cfg.templates} have no [filewords] where a caption could go")
    if use_captions and not explicit_filewords:
        templates = data.FILEWORDS_TEMPLATES["style" if cfg.mode == "style" else "object"]
    if explicit_filewords:  # A1111's [filewords]: the sidecar, else the file name
        captions = [i.caption for i in images]
    else:  # built-in caption templates: an image without a caption file adds nothing to its prompt
        captions = [i.caption if i.has_sidecar else "" for i in images]
    captioned = sidecars if (use_captions or explicit_filewords) else 0
    return Plan(images, skipped, buckets if use_buckets else squares, captions, captioned, templates, resolution)


@dataclass
class Draw:
    """One micro-batch as a run draws it for (step, micro-batch), before the text encoders run."""

    latents: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor  # DDPM timesteps, or flow-schedule indices
    views: torch.Tensor  # indices into the run's views
    rows: list  # each text encoder's token ids of the prompts, on the model's device
    weight: torch.Tensor | None  # --alpha-mask's per-pixel weights, or None


class _Batches:
    """The training data, ready to draw from: every view VAE-encoded once or read from the latent
    cache (per bucket: the views of one batch share a size), every prompt tokenized once, SDXL's
    time ids per view; a batch is one bucket's, drawn from a generator seeded by (seed, step, micro)."""

    def __init__(self, cfg: TrainConfig, model: _Model, plan: Plan, rank: int):
        self.cfg, self.model, self.rank = cfg, model, rank
        self.templates = plan.templates
        self.views, captions = [], []
        for i, item in enumerate(plan.images):
            vs = data.views(item.image, plan.sizes[i], crops=cfg.crops, flip=cfg.flip, seed=cfg.seed * 1000 + i,
                            alpha=item.alpha if cfg.alpha_mask else None)
            self.views += vs
            captions += [plan.captions[i]] * len(vs)
        sizes = sorted({v.size for v in self.views}, key=lambda wh: (wh[0] * wh[1], wh))
        self.buckets = [torch.tensor([k for k, v in enumerate(self.views) if v.size == wh]) for wh in sizes]
        self.share = torch.tensor([len(b) for b in self.buckets], dtype=torch.float)  # a bucket's chance: its views'
        pixels = [data.to_tensor([self.views[k].image for k in members]) for members in self.buckets]
        cache = open_cache(cfg.latent_cache, model.pipe.vae)
        self.latents = encode_views(model.pipe.vae, pixels, cache, progress=cfg.progress and rank == 0)
        self.masks = []
        factor = model.pipe.vae_scale_factor
        for wh, members in zip(sizes, self.buckets):
            bucket_views = [self.views[k] for k in members]
            masked = cfg.alpha_mask and any(v.mask is not None for v in bucket_views)
            self.masks.append(data.mask_tensor([v.mask for v in bucket_views], (wh[0] // factor, wh[1] // factor))
                              if masked else None)
        vary = None
        if plan.captioned and (cfg.shuffle_captions or cfg.keep_tokens or cfg.caption_dropout):
            vary = {"shuffle": cfg.shuffle_captions, "keep": cfg.keep_tokens, "dropout": cfg.caption_dropout}
        self.prompts = PromptTable(model.pipe, self.templates, cfg.token, captions, cfg.clip_skip, vary, cfg.per_layer)
        self.time_ids = view_time_ids(model.pipe, self.views)
        self.uncond = None
        if cfg.guidance > 1:  # the empty prompt's branch is frozen: encode it once
            empty, empty_pooled = self.prompts.unconditional(model.pipe, model.device)
            self.uncond = (empty.to(model.dtype), empty_pooled)

    def loss(self, step: int, micro: int) -> torch.Tensor:
        """The denoising loss of the batch drawn for (step, micro-batch)."""
        d = self.draw(step, micro)
        return self.model.objective.loss(self, d.latents, d.noise, d.t, self.prompts.states(d.rows), d.views, d.weight)

    def draw(self, step: int, micro: int) -> Draw:
        """The batch of (step, micro-batch), from its generator: one bucket's views, templates, noise, timesteps."""
        cfg, m = self.cfg, self.model
        g = step_generator(cfg.seed, step, micro, self.rank)
        b = 0 if len(self.buckets) == 1 else int(torch.multinomial(self.share, 1, generator=g))
        local = torch.randint(len(self.buckets[b]), (cfg.batch,), generator=g)
        idx = self.buckets[b][local]  # indices into self.views
        which = torch.randint(len(self.templates), (cfg.batch,), generator=g)
        mean, std = self.latents[b]
        latents = mean[local] + std[local] * torch.randn(mean[local].shape, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        t = m.objective.draw(m, cfg.batch, g)
        rng = None
        if self.prompts.vary:  # its own stream: varying captions changes no other draw
            rng = random.Random(int(torch.randint(2**62, (1,), generator=step_generator(cfg.seed, step, micro, self.rank + 10**6))))
        rows = self.prompts.rows(which, idx, m.device, rng)
        weight = None if self.masks[b] is None else self.masks[b][local]
        return Draw(latents, noise, t, idx, rows, weight)

    def fixed_eval(self, k: int) -> list[dict]:
        """The evaluation batch of early stopping (:mod:`textinv.stopping`), drawn once from the seed:
        ``k`` items cycling through every view in a seeded order, each with a fixed template, noise
        and timestep (stratified: item i's in the i-th of ``k`` equal slices of the training range).
        The views' latent means are used, not samples; grouped per bucket (one UNet call each)."""
        cfg, m = self.cfg, self.model
        g = step_generator(cfg.seed, 0, 0, EVAL_STREAM)  # a stream no training step draws from
        order = torch.randperm(len(self.views), generator=g)
        picked = order[torch.arange(k) % len(order)]
        which = torch.randint(len(self.templates), (k,), generator=g)
        low, high = m.timesteps
        t = (low + (torch.arange(k) + torch.rand(k, generator=g)) * (high - low) / k).long().clamp(low, high - 1)
        place = {v: (b, j) for b, members in enumerate(self.buckets) for j, v in enumerate(members.tolist())}
        groups = []
        for b in range(len(self.buckets)):  # bucket order: the noise below is drawn in it
            rows = [i for i in range(k) if place[int(picked[i])][0] == b]
            if not rows:
                continue
            local = torch.tensor([place[int(picked[i])][1] for i in rows])
            latents = self.latents[b][0][local]
            groups.append({"bucket": b, "local": local, "idx": picked[rows], "which": which[rows], "t": t[rows],
                           "latents": latents, "noise": torch.randn(latents.shape, generator=g)})
        return groups

    @torch.no_grad()
    def eval_loss(self, groups: list[dict]) -> float:
        """The denoising loss of the fixed evaluation batch with the vectors as they stand."""
        m, total, count = self.model, 0.0, 0
        for gr in groups:
            encoded = self.prompts.encode(gr["which"], gr["idx"], m.device)
            weight = None if self.masks[gr["bucket"]] is None else self.masks[gr["bucket"]][gr["local"]]
            loss = m.objective.loss(self, gr["latents"], gr["noise"], gr["t"], encoded, gr["idx"], weight)
            total, count = total + float(loss) * len(gr["idx"]), count + len(gr["idx"])
        return total / count


def packed_losses(parts: list[tuple[_Batches, Draw]]) -> list[torch.Tensor]:
    """Several runs' micro-batches, each drawn as it is alone, through one pass of the text encoders
    and one denoiser call per latent size (``train-many --pack``): each run's loss, the mean over
    its own rows as alone, so that its vectors get gradient from its own rows only.  The runs share
    the pipeline and what shapes the call (guidance, Clip skip: :func:`textinv.packing.key`)."""
    first = parts[0][0]
    encoded = first.prompts.states([torch.cat(ids) for ids in zip(*(d.rows for _, d in parts))])
    starts = np.cumsum([0] + [len(d.t) for _, d in parts]).tolist()
    sizes: dict[tuple, list[int]] = {}  # the parts of each latent size
    for k, (_, d) in enumerate(parts):
        sizes.setdefault(tuple(d.latents.shape[1:]), []).append(k)
    losses: list = [None] * len(parts)
    for ks in sizes.values():
        rows = torch.cat([torch.arange(starts[k], starts[k + 1]) for k in ks])
        states = encoded if len(ks) == len(parts) else tuple(x if x is None else x[rows.to(x.device)] for x in encoded)
        draws = [parts[k][1] for k in ks]
        time_ids = None if first.time_ids is None else torch.cat([parts[k][0].time_ids[parts[k][1].views] for k in ks])
        got = first.model.objective.losses(first, *(torch.cat([getattr(d, f) for d in draws]) for f in ("latents", "noise", "t")),
                                           states, time_ids, [d.weight for d in draws], [len(d.t) for d in draws])
        for k, loss in zip(ks, got):
            losses[k] = loss
    return losses


def _gradients(cfg: TrainConfig, batches: _Batches, word: _Word, step: int, dist, last_good) -> float:
    """The gradients of one optimizer step, over ``grad_accum`` micro-batches: their mean loss.
    They move no vector, so a step interrupted here has not happened."""
    total = 0.0
    for micro in range(cfg.grad_accum):
        loss = batches.loss(step, micro)
        if not torch.isfinite(loss) and not word.fp16:  # fp16: an overflow is the scaler's to skip
            raise _diverged(step + 1, word.params, last_good, word.fp16, word.table_norm)
        word.scaler.scale(loss / cfg.grad_accum).backward()
        total += loss.item() / cfg.grad_accum
    if dist.num_processes > 1:  # data-parallel: average the (tiny) gradients and the loss over processes
        for p in word.params:
            p.grad = reduce(p.grad, reduction="mean")
        total = reduce(torch.tensor([total], device=dist.device), reduction="mean").item()
    return total


def packed_gradients(packed: list["TrainingRun"]) -> tuple[list[float], dict[int, TextinvError]]:
    """The gradients of one optimizer step of several runs trained together (``train-many --pack``):
    per micro-batch, every run's batch drawn at its own step (:meth:`_Batches.draw`), their losses
    from one pass (:func:`packed_losses`), one backward of their sum, each scaled by its run's loss
    scaler and ``grad_accum``, as :func:`_gradients` scales it alone.  (Each run's mean loss, the
    runs whose loss became NaN/inf with why: left out of the backward, by index.)"""
    totals, failures = [0.0] * len(packed), {}
    for micro in range(max(r.cfg.grad_accum for r in packed)):
        here = [k for k, r in enumerate(packed) if micro < r.cfg.grad_accum and k not in failures]
        if not here:
            break
        losses = packed_losses([(packed[k].batches, packed[k].batches.draw(packed[k].step, micro)) for k in here])
        kept = []
        for k, loss in zip(here, losses):
            r = packed[k]
            if not torch.isfinite(loss) and not r.word.fp16:  # fp16: an overflow is the scaler's to skip
                failures[k] = _diverged(r.step + 1, r.word.params, r.last_good, r.word.fp16, r.word.table_norm)
                continue
            kept.append(r.word.scaler.scale(loss / r.cfg.grad_accum))
            totals[k] += loss.item() / r.cfg.grad_accum
        if kept:
            torch.stack(kept).sum().backward()
    return totals, failures


def _set_rates(word: _Word, cfg: TrainConfig, step: int) -> float:
    """Each parameter group's learning rate at ``step`` (its schedule times --lr-schedule's factor);
    the first group's, which the bar and the log show."""
    factor = lr_factor(cfg.lr_schedule, cfg.lr_warmup, step, cfg.steps)
    rates = [lr_at(schedule, step) * factor for schedule in word.schedules]
    for group, rate in zip(word.optimizer.param_groups, rates):
        group["lr"] = rate
    return rates[0]


def _update(word: _Word) -> tuple[float, bool]:
    """Apply the gradients (then --preserve-norm's rescaling): (the loss scale, whether fp16's
    scaler skipped the step)."""
    scale = word.scaler.get_scale() if word.fp16 else 1.0
    word.scaler.step(word.optimizer)  # without fp16: optimizer.step(); with it: unscale, skip if inf/NaN
    word.scaler.update()
    word.optimizer.zero_grad(set_to_none=True)
    if word.norms is not None:  # OneTrainer's preserve_embedding_norm: every learned vector at the vocabulary's median norm
        with torch.no_grad():
            for p, norm in zip(word.params, word.norms):
                p.copy_(F.normalize(p, dim=-1) * norm)
    return scale, word.fp16 and word.scaler.get_scale() < scale


class _Stopper:
    """Early stopping: the fixed evaluation batch, its loss curve [(step, loss)] and the rule.
    The curve is saved with the training state, so a resumed run decides as an unbroken one."""

    def __init__(self, batches: _Batches, cfg: TrainConfig, curve: list, rule: stopping.Rule = stopping.Rule()):
        self.batches, self.rule, self.curve = batches, rule, list(curve)
        self.groups = batches.fixed_eval(cfg.eval_batch)
        self.ratio = 1.0

    def evaluate(self, step: int) -> bool:
        """Score the evaluation batch at ``step``; True: the rule says the word is learned."""
        self.curve = [c for c in self.curve if c[0] < step] + [(step, self.batches.eval_loss(self.groups))]
        return self.decide()

    @property
    def values(self) -> list[float]:
        return [v for _, v in self.curve]

    def decide(self) -> bool:
        stop, self.ratio = stopping.should_stop(self.values, self.rule)
        return stop

    def reason(self, step: int, ceiling: int) -> str:
        return (f"stopped at step {step} of {ceiling}: the evaluation loss has flattened (the variance of its last "
                f"{self.rule.recent:.0%} is {self.ratio:.3f}× the whole curve's, below {self.rule.threshold:g}); "
                f"--no-early-stop trains all {ceiling} steps")


def _loop(run: "TrainingRun") -> None:
    """A run's steps, from where it starts to ``cfg.steps``, alone: each step's gradients
    (:func:`_gradients`) between the run's bookkeeping (:class:`TrainingRun`).  A step is done
    (``word.done``) once its update, evaluation and log record are: a signal waits for those
    (:func:`textinv.interrupts.held`), so an interrupted run keeps whole steps only."""
    if not run.begin():
        while True:
            lr = run.rate()
            total = _gradients(run.cfg, run.batches, run.word, run.step, run.dist, run.last_good)
            if run.after(total, lr):
                break
    run.close()


class TrainingRun:
    """One run in training: its set-up (:func:`_set_up`: model, data, word, stopper) and the
    bookkeeping around each step's gradients (the rates before; the update, evaluation, log,
    saves, previews and callbacks after), a step at a time, so that :func:`_loop` takes a run's
    steps alone and :mod:`textinv.packing` several runs' together.  ``beside``: other words train
    on the same pipeline (packed); ``position``: the line of its progress bar."""

    def __init__(self, cfg: TrainConfig, pipe, dist, echo=None, on_save=None, on_step=None, beside: bool = False,
                 position: int | None = None):
        self.cfg, self.dist, self.on_save, self.on_step, self.position = cfg, dist, on_save, on_step, position
        self.out, self.main = cfg.resolved_out(), dist.is_main_process
        self.model, self.batches, self.word, self.stopper = _set_up(cfg, pipe, echo, dist, self.out, beside)
        self.step = self.word.start  # the next step to take
        self.t0, self.last_good, self.skipped_in_a_row = time.perf_counter(), None, 0
        self.recent = runs.recent_losses(self.out, self.step, LOSS_WINDOW)  # a resumed run's bar goes on from the same window
        self.last_step, self.stopped, self.progress, self.seconds = cfg.steps, None, None, None
        self.ended: tuple | None = None  # (last step, loss, seconds, why it stopped early or None), once closed

    def begin(self) -> bool:
        """Before the first step: the evaluation curve's first point.  True: nothing to train (a run
        that stopped early here stays stopped, --no-early-stop goes on; no step left)."""
        cfg, stopper, start = self.cfg, self.stopper, self.step
        if stopper is not None:
            if start % cfg.eval_every == 0 and not (stopper.curve and stopper.curve[-1][0] == start):
                stopper.evaluate(start)  # the curve's first point (a run resumed from a state without a curve: its first)
            if start > 0 and stopper.decide():
                self.last_step, self.stopped, self.seconds = start, stopper.reason(start, cfg.steps), 0.0
                return True
        self.progress = _progress(cfg, start, self.position) if self.main else None
        return start >= cfg.steps

    def rate(self) -> float:
        """The next step's learning rates set (before its gradients): the first group's."""
        return _set_rates(self.word, self.cfg, self.step)

    def after(self, total: float, lr: float) -> bool:
        """The step's update, its gradients in (their mean loss ``total``), and what follows it.
        True: the run ends here (its last step, early stopping, a callback)."""
        cfg, word, stopper = self.cfg, self.word, self.stopper
        with interrupts.held():
            scale, skipped = _update(word)
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
            if self.skipped_in_a_row >= MAX_SKIPPED_STEPS or not all(torch.isfinite(p).all() for p in word.params):
                raise _diverged(self.step + 1, word.params, self.last_good, word.fp16, word.table_norm)
            done = self.step = self.step + 1
            self.recent = (self.recent + [total])[-LOSS_WINDOW:]
            learned = stopper is not None and done % cfg.eval_every == 0 and stopper.evaluate(done)
            if learned and done < cfg.steps:
                self.last_step, self.stopped = done, stopper.reason(done, cfg.steps)
            if self.main:
                _log_step(self.out, done, total, lr, time.perf_counter() - self.t0, stopper,
                          {"loss_scale": scale, "skipped": skipped} if word.fp16 else {})
            word.done = done
        if self.main:
            self._written(total, lr)
        return self.stopped is not None or done >= cfg.steps

    def _written(self, total: float, lr: float) -> None:
        """The main process's part of a step's end: the bar, the save point, the preview, ``on_step``."""
        cfg, done, stopper, model, templates = self.cfg, self.step, self.stopper, self.model, self.batches.templates
        self.progress.update(1)
        shown = {"eval": f"{stopper.curve[-1][1]:.4f}", "ratio": f"{stopper.ratio:.2f}"} if stopper is not None else {}
        self.progress.set_postfix(loss=f"{np.mean(self.recent):.4f}", **shown, lr=f"{lr:.2g}", refresh=False)  # the bar redraws on its own clock
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            self.last_good = _save(self.out, model.pipe, self.word.applied, cfg, done, templates=templates)
            _save_state(self.out, cfg, self.word.params, self.word.optimizer, done, self.word.scaler, stopper)
            if self.on_save is not None and self.on_save(done, self.last_good):
                self.last_step, self.stopped = done, self.stopped or f"stopped at step {done} by the measured saves (--patience)"
                return
        if cfg.preview_every and done % cfg.preview_every == 0:
            preview(model.pipe, cfg, templates, runs.preview_file(self.out, done))
        if self.on_step is not None and self.on_step(done, total) and done < cfg.steps and not self.stopped:
            self.last_step, self.stopped = done, f"stopped at step {done} on request"

    def close(self) -> tuple[int, float, float, str | None]:
        """The loop's end: (last step, loss, seconds, why it stopped early or None), kept as ``ended``."""
        if self.progress is not None:
            self.progress.close()
        seconds = self.seconds if self.seconds is not None else time.perf_counter() - self.t0
        self.ended = (self.last_step, float(np.mean(self.recent)) if self.recent else float("nan"), seconds, self.stopped)
        return self.ended

    def keep(self) -> str:
        """Interrupted: the last completed step saved as a save point saves it (a second signal
        waits for that); what was kept, in words (after the bar's last line)."""
        word, cfg = self.word, self.cfg
        if self.progress is not None:
            self.progress.close()
        if not word.done:
            return "interrupted before the first step: nothing to save"
        if self.main and word.done > word.start:
            with interrupts.held(deliver=False):
                _save(self.out, self.model.pipe, word.applied, cfg, word.done, templates=self.batches.templates)
                _save_state(self.out, cfg, word.params, word.optimizer, word.done, word.scaler, self.stopper)
        return f"interrupted at step {word.done} of {cfg.steps}: saved; --resume continues"

    def finish(self) -> TrainResult:
        """After :meth:`close`: the final embedding and its state written (by the main process, a
        Ctrl-C waiting for both), the vectors frozen; the run's result."""
        cfg, word, model, stopper = self.cfg, self.word, self.model, self.stopper
        last_step, loss, seconds, stopped = self.ended
        final = _current(word.applied, cfg, last_step, model.pipe)
        path = runs.final_file(self.out, cfg.token, formats.suffix_for(cfg.format_for(final), final))
        if self.main:
            with interrupts.held():  # the final embedding and its state together: a Ctrl-C waits for both
                formats.save(final, path, cfg.format_for(final), preview=_card_picture(model.pipe, cfg, self.batches.templates))
                _save_state(self.out, cfg, word.params, word.optimizer, last_step, word.scaler, stopper)
        for p in word.params:
            p.requires_grad_(False)
        if self.dist.num_processes > 1:
            # Every process leaves together and closes its process group: a gloo group torn down by the
            # interpreter's exit can abort (SIGABRT) the process that leaves last.
            self.dist.wait_for_everyone()
            torch.distributed.destroy_process_group()
        return TrainResult(self.out, path, final, last_step, seconds, loss, self.main, stopped,
                           stopper.curve[-1][1] if stopper and stopper.curve else None)


def _log_step(out: Path, step: int, loss: float, lr: float, seconds: float, stopper: _Stopper | None, extra: dict) -> None:
    """The step's record in log.jsonl (and the evaluation's, when it was scored at this step)."""
    record = {"step": step, "loss": round(loss, 6), "lr": lr, "seconds": round(seconds, 3)}
    if stopper is not None and stopper.curve[-1][0] == step:
        record |= {"eval_loss": round(stopper.curve[-1][1], 6), "eval_ratio": round(stopper.ratio, 4)}
    runs.append_log(out, record | extra)


# ------------------------------------------------------------------------------- pieces
def _new_embedding(pipe, cfg: TrainConfig) -> Embedding:
    state = tokens.state(pipe)
    tok = state.encoders[0].tokenizer
    ids = tok(cfg.token, add_special_tokens=False).input_ids
    if not cfg.token.strip():
        raise TextinvError("--token: empty")
    existing = len(ids) == 1 and ids[0] < state.encoders[0].base.num_embeddings
    if cfg.mode == "replace" and not existing:
        raise TextinvError(f"--token {cfg.token!r}: --mode replace re-learns an existing single-token word, and this is not one")
    if cfg.mode != "replace" and existing:
        raise TextinvError(f"--token {cfg.token!r} is already a word in this model's vocabulary; choose a new word "
                           f"(e.g. '<{cfg.token}>') or use --mode replace to re-learn it")
    init = cfg.init if cfg.init is not None else (cfg.token if cfg.mode == "replace" else "*")
    vectors = {enc.slot: init_vectors(enc.tokenizer, enc.base.weight, init, cfg.vectors) for enc in state.encoders}
    meta = {"step": 0, "init_text": init, "mode": cfg.mode, "sd_checkpoint_name": name_of(cfg.model), "sd_checkpoint": None}
    if cfg.clip_skip > 1:  # the embedding is meant to be used with the same Clip skip
        meta["clip_skip"] = cfg.clip_skip
    emb = Embedding(cfg.token, vectors, meta=meta)
    return perlayer.trainable(emb, pipe, cfg.file_format) if cfg.per_layer else emb


def _current(applied, cfg: TrainConfig, step: int, pipe) -> Embedding:
    """The word as it stands: its rows of the trigger table, in its layout (``[n, D]``, or
    ``[layers, n, D]`` for a per-layer word)."""
    state = tokens.state(pipe)
    # A per-layer word trains alone (textinv.packing): its block is the whole table, perlayer.rows' rows its own.
    rows = perlayer.rows(pipe, cfg.token) if applied.embedding.layers else slice(None)
    vectors = {enc.slot: block.detach()[rows].clone().float().cpu()
               for enc, block in zip(state.encoders, state.blocks(cfg.token))}
    return Embedding(cfg.token, vectors, meta=dict(applied.embedding.meta, step=step), layers=applied.embedding.layers)


def _save(out: Path, pipe, applied, cfg, step: int, templates=()) -> Path:
    """The save of ``step``, beside the run's others (see :func:`textinv.runs.save_file`)."""
    emb = _current(applied, cfg, step, pipe)
    path = runs.save_file(out, cfg.token, step, formats.suffix_for(cfg.format_for(emb), emb))
    return formats.save(emb, path, cfg.format_for(emb), preview=_card_picture(pipe, cfg, templates))


@torch.no_grad()
def _card_picture(pipe, cfg: TrainConfig, templates) -> "object | None":
    """For --format png: the card shows what the embedding draws (one fixed-seed sample of the
    first preview prompt, as A1111's trainer puts its preview on the card); other formats: None."""
    if cfg.format != "png" or not templates:
        return None
    return _samples(pipe, cfg, _preview_prompts(cfg, templates)[0], 1, 20)[0]


def _preview_prompts(cfg: TrainConfig, templates) -> list[str]:
    """--preview-prompt, else the first template with the trigger (and no caption)."""
    return cfg.preview_prompts or [data.fill_template(templates[0], cfg.token, "")]


def _samples(pipe, cfg: TrainConfig, prompt: str, n: int, steps: int) -> list:
    """``n`` images of ``prompt`` from the run's seed, with its Clip skip (previews and cards alike)."""
    call = generation.clip_skip_kwargs(pipe, [prompt] * n, None, cfg.clip_skip) or {"prompt": [prompt] * n}
    return pipe(**call, num_inference_steps=steps, generator=torch.Generator().manual_seed(cfg.seed)).images


def _save_state(out: Path, cfg: TrainConfig, params, optimizer, step: int, scaler, stopper=None) -> None:
    curve = [c for c in stopper.curve if c[0] <= step] if stopper is not None else []
    runs.write_state(out, step=step, params=params, optimizer=optimizer, scaler=scaler, identity=identity(cfg),
                     curve=curve)


def _load_state(out: Path, cfg: TrainConfig, params, optimizer, scaler) -> tuple[int, list]:
    """Restore the vectors, AdamW and the loss scaler: (the step, the evaluation-loss curve so far)."""
    st, path = runs.read_state(out), runs.state_file(out)
    change = changed(st["identity"], cfg)
    if change:
        k, was, now = change
        raise TextinvError(f"--resume: this run was started with {k}={was}, now {k}={now}; use the same settings or another --out")
    shapes = [tuple(p.shape) for p in params]
    well_formed = (type(st.get("step")) is int and st["step"] >= 0 and isinstance(st.get("optimizer"), dict)
                   and isinstance(st.get("params"), list)
                   and [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in st["params"]] == shapes)
    if not well_formed:
        raise TextinvError(f"{path}: a damaged training state (its step, vectors or optimizer do not fit this run); "
                           "use another --out")
    try:
        with torch.no_grad():
            for p, saved in zip(params, st["params"]):
                p.copy_(saved)
        optimizer.load_state_dict(st["optimizer"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise TextinvError(f"{path}: its optimizer state does not fit this run ({' '.join(str(e).split())[:200]})") from None
    curve = st.get("eval_curve")
    if curve is None:  # a state from before early stopping
        curve = torch.zeros(0, 2, dtype=torch.float64)
    if not (isinstance(curve, torch.Tensor) and curve.ndim == 2 and curve.shape[1] == 2 and torch.isfinite(curve).all()):
        raise TextinvError(f"{path}: a damaged training state (its evaluation-loss curve); use another --out")
    return int(st["step"]), [(int(s), float(v)) for s, v in curve.tolist() if s <= st["step"]]


def _progress(cfg: TrainConfig, start: int, position: int | None = None):
    return tqdm(total=cfg.steps, initial=start, desc=f"training {cfg.token}", unit="step", disable=not cfg.progress,
                dynamic_ncols=True, mininterval=0.5, position=position)


@torch.no_grad()
def preview(pipe, cfg: TrainConfig, templates: list[str], path: Path, n: int = 4, steps: int = 20) -> Path:
    """A fixed-seed grid of the current embedding (same seeds every time: comparable over steps)."""
    prompts = _preview_prompts(cfg, templates)
    images = [im for prompt in prompts for im in _samples(pipe, cfg, prompt, n, steps)]
    with atomic_path(path) as tmp:
        grid(images, cols=n, labels=prompts, label_every=n, scale=max(1, 128 // images[0].width)).save(tmp, format="PNG")
    return path
