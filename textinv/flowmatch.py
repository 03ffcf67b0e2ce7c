"""The flow-matching training objective of SD3/SD3.5 and Flux.1, as diffusers' training scripts compute it.

One training step of a rectified-flow model (Esser et al. 2024, "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis", the SD3 paper): pick a noise level σ from the model's training
schedule, mix the clean latents with Gaussian noise along a straight line, ``x_σ = (1 − σ)·x₀ + σ·ε``,
and train the transformer to predict the line's direction ``ε − x₀`` (or, with the SD3 script's
preconditioning, ``x₀`` itself).  The two recipes followed, step for step, are diffusers'
``examples/dreambooth/train_dreambooth_lora_sd3.py`` and
``examples/advanced_diffusion_training/train_dreambooth_lora_flux_advanced.py`` (the one with pure
textual inversion), with diffusers' own helpers where they exist (``training_utils``, the Flux
pipeline's latent packing).  Every random draw takes a ``torch.Generator``, so a resumed run draws
what the uninterrupted one would.

The families differ only in how the transformer is called (a row of :data:`RECIPES`, chosen by the
family's ``joins``): SD3 takes the latents as they are and the schedule's timesteps; Flux.1 takes the
latents packed into 2×2 patches with their positions, timesteps divided by 1000, and (FLUX.1-dev, a
guidance-distilled model) a guidance scale.

Neither script shifts Flux.1's noise levels by image size in training: they index the scheduler's
training sigmas, which with FLUX.1-dev's ``use_dynamic_shifting`` (and schnell's shift 1) are the
plain ``t/1000``.  :func:`resolution_shift` gives the shift the Flux pipeline applies at inference,
for a trainer that wants it; it is not part of either recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
# Not FluxPipeline (its module imports transformers' image processors: a second on every command,
# and their warnings); its latent packing and shift are written here (tests compare them with it).
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from . import families
from .errors import TextinvError

# The scripts' --weighting_scheme values (SD3's four, the Flux script's "none"), and "uniform":
# "logit_normal" and "mode" shape how σ is drawn; "sigma_sqrt" and "cosmap" draw σ uniformly and
# weight the loss instead; "none" and "uniform" do neither.
SCHEMES = ("none", "uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap")
MODE_SCALES = (-1.0, 2 / (math.pi - 2))  # the SD3 paper's bounds on s: outside them "mode" is no density on [0, 1]
FLUX_TIME_SCALE = 1000  # the Flux transformer multiplies its timestep (and guidance) by 1000 itself


# ------------------------------------------------------------------------------------ the schedule
def train_schedule(config) -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler from the model's scheduler config: its ``sigmas``/``timesteps`` are the
    training schedule (SD3: already shifted by the config's ``shift``), as the scripts' untouched
    ``noise_scheduler_copy`` holds them.  A pipeline's own scheduler may have been set up for
    sampling since (fewer steps and a terminal zero), so it is never read."""
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def check_scheme(weighting: str, logit_std: float = 1.0, mode_scale: float = 1.29) -> None:
    """One-line errors for a scheme the recipes do not know, or parameters that give no σ in (0, 1]."""
    if weighting not in SCHEMES:
        raise TextinvError(f"weighting scheme {weighting!r}: expected one of {', '.join(SCHEMES)}")
    if weighting == "logit_normal" and not logit_std >= 0:
        raise TextinvError(f"logit_std {logit_std}: expected 0 or more")
    if weighting == "mode" and not MODE_SCALES[0] <= mode_scale <= MODE_SCALES[1]:
        raise TextinvError(f"mode_scale {mode_scale}: expected {MODE_SCALES[0]:g} to {MODE_SCALES[1]:.4f} "
                           "(the SD3 paper's range)")


def draw_indices(batch: int, num_train_timesteps: int, weighting: str = "none", generator=None,
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 device="cpu") -> torch.Tensor:
    """Indices into the training schedule, one per sample, as both scripts pick them: ``u`` in [0, 1]
    from diffusers' ``compute_density_for_timestep_sampling`` (SD3 paper §3.1: logit-normal, mode
    with heavy tails, or uniform), then ``floor(u · num_train_timesteps)``.  Index 0 is σ = 1.

    The one change: ``u`` = 1 (a sigmoid rounding to 1, or "mode" at u = 0) gives the last index
    instead of one past the end, where the scripts would fail."""
    check_scheme(weighting, logit_std, mode_scale)
    u = compute_density_for_timestep_sampling(weighting, batch, logit_mean=logit_mean, logit_std=logit_std,
                                              mode_scale=mode_scale, device=device, generator=generator)
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def draw(latents: torch.Tensor, num_train_timesteps: int, weighting: str = "none", generator=None,
         **density) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's noise and schedule indices, in the scripts' order (the noise first), from
    ``generator``: with a generator seeded as torch's global one was, what the scripts draw."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
    indices = draw_indices(len(latents), num_train_timesteps, weighting, generator, device=latents.device, **density)
    return noise, indices


def schedule_at(scheduler, indices_or_sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, timestep) per sample: at integer indices, the training schedule's entries (the scripts
    take ``timesteps[indices]`` and look σ up by that timestep: the same entry, the timesteps being
    distinct); float σ are taken as given, with timesteps ``σ · num_train_timesteps`` as the
    scheduler makes them."""
    if torch.is_floating_point(indices_or_sigmas):
        sigmas = indices_or_sigmas.float()
        return sigmas, sigmas * scheduler.config.num_train_timesteps
    indices = indices_or_sigmas.cpu()
    return scheduler.sigmas[indices], scheduler.timesteps[indices]


def resolution_shift(sigmas: torch.Tensor, latents: torch.Tensor, scheduler) -> torch.Tensor:
    """σ shifted for the image size as ``FluxPipeline`` does at inference (``calculate_shift``: mu
    grows linearly with the number of 2×2 latent patches; then the scheduler's ``time_shift``).
    Not part of the diffusers training scripts (see the module docstring): opt-in."""
    cfg = scheduler.config
    patches = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = cfg.base_shift + slope * (patches - cfg.base_image_seq_len)
    return scheduler.time_shift(mu, 1.0, sigmas)


# ------------------------------------------------------------------------------------ the objective
@torch.no_grad()
def to_latents(vae, pixels: torch.Tensor, generator=None, sample: bool = True) -> torch.Tensor:
    """Images in [-1, 1] to the transformer's latents: ``(z − shift_factor) · scaling_factor`` with z
    drawn from the VAE's latent distribution (the scripts), or its mean (``sample=False``).  SD's
    VAEs have no shift_factor: 0."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor


def noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The point at σ on the straight path from the latents (σ = 0) to the noise (σ = 1)."""
    return (1.0 - sigmas) * latents + sigmas * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The path's direction, d x_σ / dσ = ε − x₀: what both scripts train the transformer to predict."""
    return noise - latents


def loss_weights(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (diffusers' ``compute_loss_weighting_for_sd3``): σ⁻² for "sigma_sqrt",
    the cosine map's density for "cosmap" (SD3 paper §3.1), else ones."""
    return compute_loss_weighting_for_sd3(weighting, sigmas)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The scripts' reduction, in float32: the weighted squared error's mean per sample, then over the batch.

    ``mask`` ([B, 1, h, w] in the latents' layout, the predictions being unpacked): each latent
    pixel's share of the error (an alpha mask), the sum of the masked error over the mask's, as
    textinv's UNet loss does (kohya's masked loss); a mask of ones is the plain mean."""
    err = weights.float() * (pred.float() - target.float()) ** 2
    if mask is None:
        return err.reshape(len(target), -1).mean(1).mean()
    share = mask.to(err.device).float().expand_as(err)
    return (err * share).sum() / share.sum().clamp_min(1e-6)


# ------------------------------------------------------------------------------------ the transformers
def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents as Flux's sequence of 2×2 patches, [B, H/2·W/2, 4C] (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The patch sequence back to [B, C, height, width] latents (``FluxPipeline._unpack_latents``,
    given latent sizes and a scale factor of 1: the same as the script's image sizes and 8)."""
    b, _, d = packed.shape
    patches = packed.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def image_ids(latents: torch.Tensor) -> torch.Tensor:
    """Each patch's (0, row, column) position for Flux's rotary embedding (``_prepare_latent_image_ids``)."""
    rows, cols = latents.shape[2] // 2, latents.shape[3] // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(latents.device, latents.dtype)


def text_ids(prompt_embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The text tokens' positions: all zeros, [sequence, 3], as ``FluxPipeline.encode_prompt`` makes them."""
    return torch.zeros(prompt_embeds.shape[1], 3, device=prompt_embeds.device, dtype=dtype)


def flux_guidance(transformer, batch: int, scale: float, device) -> torch.Tensor | None:
    """The guidance input: ``scale`` per sample for a guidance-distilled model (FLUX.1-dev: its
    config says ``guidance_embeds``), None for one without (schnell)."""
    if not getattr(transformer.config, "guidance_embeds", False):
        return None
    return torch.tensor([scale], device=device).expand(batch)


def sd3_prediction(pipe, x: torch.Tensor, timesteps, prompt_embeds, pooled, guidance: float) -> torch.Tensor:
    """The SD3 transformer's prediction at the schedule's timesteps (0 to 1000); no guidance input."""
    return pipe.transformer(hidden_states=x, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                            pooled_projections=pooled, return_dict=False)[0]


def flux_prediction(pipe, x: torch.Tensor, timesteps, prompt_embeds, pooled, guidance: float) -> torch.Tensor:
    """The Flux transformer's prediction, unpacked: packed latents with their ids, timesteps / 1000."""
    if x.shape[2] % 2 or x.shape[3] % 2:
        raise TextinvError(f"Flux.1 latents {x.shape[2]}x{x.shape[3]}: expected even sizes (images in steps of 16)")
    out = pipe.transformer(hidden_states=pack(x), timestep=timesteps / FLUX_TIME_SCALE,
                           guidance=flux_guidance(pipe.transformer, len(x), guidance, x.device),
                           pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                           txt_ids=text_ids(prompt_embeds, x.dtype), img_ids=image_ids(x), return_dict=False)[0]
    return unpack(out, x.shape[2], x.shape[3])


@dataclass(frozen=True)
class Recipe:
    """How one family's transformer is trained, as its diffusers script does it; the defaults are the script's."""

    predict: Callable  # (pipe, x_σ, timesteps, prompt_embeds, pooled, guidance) -> prediction like x_σ
    weighting: str  # the script's default --weighting_scheme
    precondition: bool  # the script's default --precondition_outputs (the Flux script has no such option)
    packing: int = 1  # latent pixels per side of a token beyond the transformer's patch (Flux.1 packs 2×2)


RECIPES = {  # by the family's ``joins``
    "sd3": Recipe(sd3_prediction, weighting="logit_normal", precondition=True),
    "flux": Recipe(flux_prediction, weighting="none", precondition=False, packing=2),
}


def recipe_of(family: families.Family) -> Recipe:
    if family.joins not in RECIPES:
        raise TextinvError(f"{family.name} is not a flow-matching model: the flow objective trains SD3 and Flux.1")
    return RECIPES[family.joins]


def token_side(pipe, family: families.Family | None = None) -> int:
    """Latent pixels per side of one transformer token (its patch, times Flux.1's 2×2 packing):
    latent sizes, and so image sizes over the VAE's factor, must be multiples of it."""
    recipe = recipe_of(family or families.of_pipeline(pipe))
    return int(getattr(pipe.transformer.config, "patch_size", 1) or 1) * recipe.packing


def flow_loss(pipe, latents: torch.Tensor, noise: torch.Tensor, indices_or_sigmas: torch.Tensor,
              prompt_embeds: torch.Tensor, pooled: torch.Tensor, *, family: families.Family | None = None,
              guidance: float = 3.5, weighting: str | None = None, precondition: bool | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar flow-matching loss of one batch through the pipeline's transformer.

    ``latents`` from :func:`to_latents`, ``noise`` and ``indices_or_sigmas`` from :func:`draw` (or
    float σ, e.g. from :func:`resolution_shift`); one prompt row per latent.  ``weighting`` and
    ``precondition`` default to the family's script's (SD3: "logit_normal", preconditioned: the
    prediction is turned into an x₀ estimate, ``x_σ − σ·pred``, and compared with the latents, which
    is the velocity loss weighted by σ²; Flux.1: "none", the velocity).  ``guidance``: FLUX.1-dev's
    guidance input (the script's default 3.5); ignored by models without one.  ``mask``: per-pixel
    weights in the latents' layout (:func:`weighted_mse`); Flux's prediction is unpacked before the
    error is taken, so its mask needs no packing."""
    pred, target, weights = flow_prediction(pipe, latents, noise, indices_or_sigmas, prompt_embeds, pooled,
                                            family=family, guidance=guidance, weighting=weighting,
                                            precondition=precondition)
    return weighted_mse(pred, target, weights, mask)


def flow_prediction(pipe, latents: torch.Tensor, noise: torch.Tensor, indices_or_sigmas: torch.Tensor,
                    prompt_embeds: torch.Tensor, pooled: torch.Tensor, *, family: families.Family | None = None,
                    guidance: float = 3.5, weighting: str | None = None,
                    precondition: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`flow_loss` compares, row by row: (the transformer's prediction, its target, each
    row's loss weight).  Rows are independent: a batch may be reduced in parts (``train-many --pack``)."""
    recipe = recipe_of(family or families.of_pipeline(pipe))
    weighting = recipe.weighting if weighting is None else weighting
    precondition = recipe.precondition if precondition is None else precondition
    check_scheme(weighting)
    if len(prompt_embeds) != len(latents) or len(pooled) != len(latents):
        raise TextinvError(f"{len(latents)} latents but {len(prompt_embeds)} prompt rows and {len(pooled)} pooled")
    dtype = pipe.transformer.dtype
    latents, noise = latents.to(dtype), noise.to(dtype)
    sigmas, timesteps = schedule_at(train_schedule(pipe.scheduler.config), indices_or_sigmas)
    sigmas = sigmas.to(latents.device, dtype).view(-1, *[1] * (latents.ndim - 1))
    x = noisy(latents, noise, sigmas)
    pred = recipe.predict(pipe, x, timesteps.to(latents.device), prompt_embeds, pooled, guidance)
    if precondition:
        pred, target = pred * (-sigmas) + x, latents
    else:
        target = velocity(latents, noise)
    return pred, target, loss_weights(weighting, sigmas)
