"""The flow-matching objective against diffusers' SD3 and Flux.1 training scripts, written out by hand.

The references below are the training steps of ``examples/dreambooth/train_dreambooth_lora_sd3.py``
and ``examples/advanced_diffusion_training/train_dreambooth_lora_flux_advanced.py`` (diffusers
commit c56add8, the latest to touch either), as the scripts run them: a deep copy of the untouched
scheduler, torch's global RNG seeded (noise first, then ``u``), σ looked up by timestep, the
transformer called with the scripts' arguments, the scripts' loss reduction.  textinv's
``flow_loss`` with draws from a ``torch.Generator`` seeded alike must give the same loss and the
same gradient with respect to the prompt embeddings (the stand-ins for what the trigger vectors
produce) on the tiny pipelines configured like SD3 medium, FLUX.1-dev and FLUX.1-schnell.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from hypothesis import given, settings
from hypothesis import strategies as st

from textinv import data, families
from textinv import flowmatch as fm
from textinv.errors import TextinvError

from tiny_flow import CLIP_G, CLIP_L, T5_WIDTH, tiny_flux_pipeline, tiny_sd3_pipeline

RTOL, ATOL = 1e-5, 1e-6
BATCH, SEQ = 2, 12
DENSITY = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def dev():
    return tiny_flux_pipeline(guidance=True)


@pytest.fixture(scope="module")
def schnell():
    return tiny_flux_pipeline(guidance=False)


def inputs(pipe, seed: int):
    """Random latents, and random prompt embeddings requiring grad, shaped as the pipeline's encoders give them
    (from another stream than the step's draws with the same seed: the noise must not be the latents)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    pooled_width = CLIP_L + CLIP_G if families.of_pipeline(pipe).joins == "sd3" else CLIP_L
    latents = torch.randn(BATCH, 16, 8, 8, generator=g)
    embeds = torch.randn(BATCH, SEQ, T5_WIDTH, generator=g).requires_grad_()
    pooled = torch.randn(BATCH, pooled_width, generator=g).requires_grad_()
    return latents, embeds, pooled


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a − b| relative to the largest |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------- the references
def script_draws(model_input, scheduler, scheme, seed):
    """The scripts' draws from torch's global RNG: the noise, then u, then the indices and timesteps."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        noise = torch.randn_like(model_input)
        u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=model_input.shape[0], **DENSITY)
    indices = (u * scheduler.config.num_train_timesteps).long()
    return noise, scheduler.timesteps[indices].to(device=model_input.device)


def script_sigmas(scheduler, timesteps, n_dim, dtype):
    """The scripts' ``get_sigmas``: each timestep's σ found by searching the schedule for it."""
    sigmas = scheduler.sigmas.to(dtype=dtype)
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def script_loss(model_pred, target, weighting):
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean()


def sd3_script_step(pipe, model_input, embeds, pooled, scheme, precondition, seed):
    """train_dreambooth_lora_sd3.py's step, from the latents on."""
    scheduler = copy.deepcopy(pipe.scheduler)
    noise, timesteps = script_draws(model_input, scheduler, scheme, seed)
    sigmas = script_sigmas(scheduler, timesteps, model_input.ndim, model_input.dtype)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = pipe.transformer(hidden_states=noisy_model_input, timestep=timesteps, encoder_hidden_states=embeds,
                                  pooled_projections=pooled, return_dict=False)[0]
    if precondition:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = model_input if precondition else noise - model_input
    return script_loss(model_pred, target, weighting)


def flux_script_step(pipe, model_input, embeds, pooled, scheme, guidance_scale, seed):
    """train_dreambooth_lora_flux_advanced.py's step, from the latents on."""
    scheduler = copy.deepcopy(pipe.scheduler)
    vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    text_ids = torch.zeros(embeds.shape[1], 3).to(dtype=embeds.dtype)
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(
        model_input.shape[0], model_input.shape[2] // 2, model_input.shape[3] // 2, model_input.device,
        model_input.dtype)
    noise, timesteps = script_draws(model_input, scheduler, scheme, seed)
    sigmas = script_sigmas(scheduler, timesteps, model_input.ndim, model_input.dtype)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy_model_input, batch_size=model_input.shape[0],
                                        num_channels_latents=model_input.shape[1], height=model_input.shape[2],
                                        width=model_input.shape[3])
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.tensor([guidance_scale]).expand(model_input.shape[0])
    else:
        guidance = None
    model_pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                  pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                  img_ids=latent_image_ids, return_dict=False)[0]
    model_pred = FluxPipeline._unpack_latents(model_pred, height=model_input.shape[2] * vae_scale_factor,
                                              width=model_input.shape[3] * vae_scale_factor,
                                              vae_scale_factor=vae_scale_factor)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    return script_loss(model_pred, noise - model_input, weighting)


def ours(pipe, latents, embeds, pooled, scheme, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    noise, indices = fm.draw(latents, pipe.scheduler.config.num_train_timesteps, scheme, g, **DENSITY)
    return fm.flow_loss(pipe, latents, noise, indices, embeds, pooled, weighting=scheme, **kw)


def compare(pipe, reference, scheme, seed, **kw) -> dict[str, float]:
    """Loss and gradients (prompt embeddings, pooled) of ours and the reference; asserts they agree."""
    latents, embeds, pooled = inputs(pipe, seed)
    e1, p1 = leaves(embeds, pooled)
    mine = ours(pipe, latents, e1, p1, scheme, seed, **kw)
    mine.backward()
    e2, p2 = leaves(embeds, pooled)
    theirs = reference(pipe, latents, e2, p2)
    theirs.backward()
    torch.testing.assert_close(mine, theirs, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(e1.grad, e2.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=RTOL, atol=ATOL)
    assert e1.grad.abs().sum() > 0 and p1.grad.abs().sum() > 0  # the prompt reaches the loss
    return {"loss": rel(mine, theirs), "grad": max(rel(e1.grad, e2.grad), rel(p1.grad, p2.grad))}


# ------------------------------------------------------------------------------------- the equivalences
@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("precondition", [True, False])
def test_sd3_step_is_the_sd3_scripts(sd3, scheme, precondition):
    compare(sd3, lambda p, x, e, q: sd3_script_step(p, x, e, q, scheme, precondition, seed=7), scheme, seed=7,
            precondition=precondition)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_step_is_the_advanced_flux_scripts(request, variant, scheme):
    pipe = request.getfixturevalue(variant)
    compare(pipe, lambda p, x, e, q: flux_script_step(p, x, e, q, scheme, 2.5, seed=11), scheme, seed=11,
            guidance=2.5)


def test_defaults_are_the_scripts_defaults(sd3, dev):
    """SD3's script: logit-normal, preconditioned; the Flux script: "none", guidance 3.5."""
    compare(sd3, lambda p, x, e, q: sd3_script_step(p, x, e, q, "logit_normal", True, seed=3), "logit_normal", seed=3)
    latents, embeds, pooled = inputs(dev, 5)
    g = torch.Generator().manual_seed(5)
    noise, indices = fm.draw(latents, 1000, "none", g)
    plain = fm.flow_loss(dev, latents, noise, indices, embeds, pooled)
    assert plain == fm.flow_loss(dev, latents, noise, indices, embeds, pooled, weighting="none", guidance=3.5,
                                 precondition=False)
    assert plain != fm.flow_loss(dev, latents, noise, indices, embeds, pooled, guidance=1.0)  # dev takes guidance


def test_schnell_takes_no_guidance(schnell):
    latents, embeds, pooled = inputs(schnell, 2)
    noise, indices = fm.draw(latents, 1000, "none", torch.Generator().manual_seed(2))
    assert fm.flux_guidance(schnell.transformer, BATCH, 3.5, "cpu") is None
    assert fm.flow_loss(schnell, latents, noise, indices, embeds, pooled, guidance=1.0) == \
        fm.flow_loss(schnell, latents, noise, indices, embeds, pooled, guidance=7.0)


def test_flux_preconditioned_is_the_sigma_squared_weighted_velocity_loss(dev):
    """x_σ − σ·pred against x₀ is σ·(v − pred): the preconditioned loss is the velocity loss weighted by σ²
    (an option only the SD3 script has; it means the same for Flux.1)."""
    latents, embeds, pooled = inputs(dev, 4)
    noise, indices = fm.draw(latents, 1000, "none", torch.Generator().manual_seed(4))
    sigmas = fm.train_schedule(dev.scheduler.config).sigmas[indices].view(-1, 1, 1, 1)
    x = fm.noisy(latents, noise, sigmas)
    pred = fm.flux_prediction(dev, x, sigmas.flatten() * 1000, embeds, pooled, 3.5)
    expected = fm.weighted_mse(pred, fm.velocity(latents, noise), sigmas**2)
    got = fm.flow_loss(dev, latents, noise, indices, embeds, pooled, precondition=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_float_sigmas_give_what_their_indices_give(sd3, dev):
    for pipe in (sd3, dev):
        latents, embeds, pooled = inputs(pipe, 6)
        noise, indices = fm.draw(latents, 1000, "logit_normal", torch.Generator().manual_seed(6))
        sigmas = fm.train_schedule(pipe.scheduler.config).sigmas[indices]
        assert fm.flow_loss(pipe, latents, noise, indices, embeds, pooled) == \
            fm.flow_loss(pipe, latents, noise, sigmas, embeds, pooled)


def test_a_pipeline_scheduler_set_up_for_sampling_is_not_read(dev):
    latents, embeds, pooled = inputs(dev, 8)
    noise, indices = fm.draw(latents, 1000, "none", torch.Generator().manual_seed(8))
    before = fm.flow_loss(dev, latents, noise, indices, embeds, pooled)
    kept = copy.deepcopy(dev.scheduler)
    try:
        dev.scheduler.set_timesteps(4, mu=1.0)
        assert fm.flow_loss(dev, latents, noise, indices, embeds, pooled) == before
    finally:
        dev.scheduler = kept


# ------------------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("scheme", fm.SCHEMES)
def test_draws_are_diffusers_draws_from_the_global_rng(sd3, scheme):
    """With a generator seeded as the scripts seed torch, the same noise and indices as the scripts'."""
    latents = torch.randn(5, 16, 8, 8)
    scheduler = copy.deepcopy(sd3.scheduler)
    noise_ref, timesteps_ref = script_draws(latents, scheduler, scheme, seed=21)
    noise, indices = fm.draw(latents, 1000, scheme, torch.Generator().manual_seed(21), **DENSITY)
    assert torch.equal(noise, noise_ref)
    assert torch.equal(scheduler.timesteps[indices], timesteps_ref)
    with torch.random.fork_rng():
        torch.manual_seed(22)
        u = compute_density_for_timestep_sampling(scheme, 64, **DENSITY)
    assert torch.equal(fm.draw_indices(64, 1000, scheme, torch.Generator().manual_seed(22), **DENSITY),
                       (u * 1000).long())


def test_u_of_one_gives_the_last_index_not_one_past_it():
    """A logit mean far above 0 rounds sigmoid(u) to 1: the scripts would index past the schedule's end."""
    assert fm.draw_indices(8, 1000, "logit_normal", torch.Generator().manual_seed(0), logit_mean=40.0).eq(999).all()
    assert fm.draw_indices(8, 1000, "logit_normal", torch.Generator().manual_seed(0), logit_mean=-40.0).eq(0).all()


@pytest.mark.parametrize("which", ["sd3", "dev", "schnell"])
def test_schedule_entries_are_the_scripts_timestep_lookup(request, which):
    scheduler = copy.deepcopy(request.getfixturevalue(which).scheduler)
    indices = torch.arange(1000)
    sigmas, timesteps = fm.schedule_at(fm.train_schedule(scheduler.config), indices)
    assert torch.equal(timesteps, scheduler.timesteps[indices])
    assert torch.equal(sigmas, script_sigmas(scheduler, timesteps, 1, torch.float32))


def test_training_sigmas_sd3_shifted_flux_plain(sd3, dev, schnell):
    """SD3's shift 3 is in the training sigmas; FLUX.1-dev (dynamic shifting) and schnell (shift 1) train on t/1000."""
    plain = torch.arange(1000, 0, -1) / 1000
    torch.testing.assert_close(fm.train_schedule(sd3.scheduler.config).sigmas, 3 * plain / (1 + 2 * plain))
    for pipe in (dev, schnell):
        torch.testing.assert_close(fm.train_schedule(pipe.scheduler.config).sigmas, plain)


def test_resolution_shift_is_the_flux_pipelines(dev):
    """The opt-in shift: what FluxPipeline's scheduler does to σ for latents of that size."""
    latents = torch.zeros(1, 16, 64, 48)
    sigmas = torch.linspace(1.0, 1 / 8, 8)
    scheduler = copy.deepcopy(dev.scheduler)
    cfg = scheduler.config
    mu = calculate_shift(32 * 24, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(sigmas=sigmas.numpy(), mu=mu)
    shifted = fm.resolution_shift(sigmas, latents, fm.train_schedule(cfg))
    torch.testing.assert_close(shifted, scheduler.sigmas[:-1])
    assert (shifted > sigmas)[1:].all()  # 768 patches: mu > 0 pushes σ up


@pytest.mark.parametrize("which", ["sd3", "dev"])
def test_vae_latents_shift_then_scale(request, which):
    vae = request.getfixturevalue(which).vae
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert shift and scale != 1
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(9)
        expected = (vae.encode(pixels).latent_dist.sample() - shift) * scale
        mean = vae.encode(pixels).latent_dist.mean
    assert torch.equal(fm.to_latents(vae, pixels, torch.Generator().manual_seed(9)), expected)
    assert torch.equal(fm.to_latents(vae, pixels, sample=False), (mean - shift) * scale)
    torch.testing.assert_close(fm.to_latents(vae, pixels, sample=False), data.encode_latents(vae, pixels, batch=2)[0])


def test_vae_latents_without_shift_factor():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    assert vae.config.shift_factor is None
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    assert torch.equal(fm.to_latents(vae, pixels, sample=False), mean * vae.config.scaling_factor)


def test_packing_round_trips_and_ids_count_patches():
    latents = torch.randn(2, 16, 6, 10)
    packed = fm.pack(latents)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(fm.unpack(packed, 6, 10), latents)
    ids = fm.image_ids(latents)
    assert ids.shape == (15, 3) and ids[:, 0].eq(0).all() and ids[-1].tolist() == [0, 2, 4]
    assert torch.equal(fm.text_ids(torch.zeros(2, 7, 4), torch.float32), torch.zeros(7, 3))


def test_bad_inputs_are_one_line_errors(sd3, dev):
    latents, embeds, pooled = inputs(dev, 0)
    noise, indices = fm.draw(latents, 1000, "none", torch.Generator().manual_seed(0))
    with pytest.raises(TextinvError, match="weighting scheme 'logitnormal'"):
        fm.draw_indices(2, 1000, "logitnormal")
    with pytest.raises(TextinvError, match="mode_scale 2"):
        fm.draw_indices(2, 1000, "mode", mode_scale=2.0)
    with pytest.raises(TextinvError, match="SD 1.x is not a flow-matching model"):
        fm.flow_loss(dev, latents, noise, indices, embeds, pooled, family=families.SD1)
    with pytest.raises(TextinvError, match="2 latents but 1 prompt rows"):
        fm.flow_loss(dev, latents, noise, indices, embeds[:1], pooled)
    with pytest.raises(TextinvError, match="Flux.1 latents 7x8: expected even sizes"):
        fm.flow_loss(dev, latents[:, :, :7], noise[:, :, :7], indices, embeds, pooled)


# ------------------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(scheme=st.sampled_from(fm.SCHEMES), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 64),
       logit_mean=st.floats(-30, 30), logit_std=st.floats(0, 5), mode_scale=st.floats(*fm.MODE_SCALES),
       shift=st.sampled_from([1.0, 3.0]))
def test_sigmas_stay_in_the_unit_interval(scheme, seed, batch, logit_mean, logit_std, mode_scale, shift):
    """Whatever the scheme and its parameters (a logit mean of ±30 rounds u to 0 or 1), σ ∈ (0, 1]."""
    scheduler = fm.train_schedule({"num_train_timesteps": 1000, "shift": shift})
    indices = fm.draw_indices(batch, 1000, scheme, torch.Generator().manual_seed(seed), logit_mean=logit_mean,
                              logit_std=logit_std, mode_scale=mode_scale)
    sigmas, timesteps = fm.schedule_at(scheduler, indices)
    assert ((sigmas > 0) & (sigmas <= 1)).all()
    assert torch.equal(timesteps, sigmas * 1000)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sigma=st.floats(0, 1))
def test_the_path_runs_from_the_latents_to_the_noise(seed, sigma):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    assert torch.equal(fm.noisy(x0, eps, torch.tensor(0.0)), x0)
    assert torch.equal(fm.noisy(x0, eps, torch.tensor(1.0)), eps)
    x = fm.noisy(x0, eps, torch.tensor(sigma))
    torch.testing.assert_close(x - sigma * fm.velocity(x0, eps), x0, rtol=1e-5, atol=1e-5)  # precondition's x₀
    torch.testing.assert_close(x + (1 - sigma) * fm.velocity(x0, eps), eps, rtol=1e-5, atol=1e-5)


def test_packing_ids_and_shift_are_fluxpipelines():
    """flowmatch writes Flux's packing, ids and shift itself (importing FluxPipeline costs every
    command a second): the same numbers as FluxPipeline's own."""
    x = torch.randn(2, 16, 6, 10)
    packed = fm.pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(fm.unpack(packed, 6, 10), x)
    assert torch.equal(fm.image_ids(x), FluxPipeline._prepare_latent_image_ids(2, 3, 5, x.device, x.dtype))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    cfg = scheduler.config
    sigmas = torch.linspace(0.05, 1.0, 7)
    mu = calculate_shift(15, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert torch.allclose(fm.resolution_shift(sigmas, x, scheduler), scheduler.time_shift(mu, 1.0, sigmas))
