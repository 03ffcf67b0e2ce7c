"""Training as the real checkpoints need it: precision, SDXL micro-conditioning, CLIP skip, prediction
types, gradient checkpointing, and the proof that the fast loop trains what the common recipe trains."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from textinv import data, formats, tokens
from textinv.errors import TextinvError
from textinv.formats import Embedding
from textinv.training import PromptTable, TrainingDiverged, denoising_loss, init_vectors, prediction_target, train, view_time_ids

from conftest import make_sd, make_sdxl


def photos(folder: Path, sizes=((40, 48), (48, 40), (24, 24))) -> Path:
    """Non-square and small pictures, as users' photos are."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        a = np.full((h, w, 3), 230, np.uint8)
        a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (200, 30 + 60 * i, 30)
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


def vectors_after_each_step(pipe):
    seen = []

    def on_step(step, loss):
        seen.append(torch.cat([e.text_encoder.get_input_embeddings().extra.detach().clone().flatten()
                               for e in tokens.state(pipe).encoders]))
    return seen, on_step


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_training_moves_fp32_vectors_without_nan(tmp_path, dtype):
    pipe = make_sd().to(dtype=dtype)
    seen, on_step = vectors_after_each_step(pipe)
    before = init_vectors(pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight, "*", 2).flatten()
    res = train(images=str(photos(tmp_path / "imgs")), token="<h>", vectors=2, steps=6, batch=2, lr="5e-2",
                precision="fp16" if dtype == torch.float16 else "bf16", out=str(tmp_path / "run"), pipe=pipe,
                progress=False, on_step=on_step)
    after = res.embedding.vectors["clip"]
    assert after.dtype == torch.float32 and torch.isfinite(after).all()
    assert (after.flatten() - before).abs().max() > 1e-3  # the vectors moved
    assert all(torch.isfinite(v).all() for v in seen) and all(torch.isfinite(torch.tensor(r["loss"])) for r in log(res.out))
    extra = pipe.text_encoder.get_input_embeddings()
    assert extra.weight.dtype == dtype if hasattr(extra, "weight") else True
    if dtype == torch.float16:
        assert all("loss_scale" in r for r in log(res.out))


def test_fp16_step_whose_scaled_gradients_overflow_is_skipped_and_the_scale_lowered(tmp_path):
    pipe = make_sd().to(dtype=torch.float16)
    forward, calls = pipe.unet.forward, [0]

    def overflowing_on_step_3(*a, **k):
        out = forward(*a, **k)
        calls[0] += 1
        if calls[0] == 3:  # its gradient becomes inf on the way back
            out.sample.register_hook(lambda g: torch.full_like(g, float("inf")))
        return out

    pipe.unet.forward = overflowing_on_step_3
    seen, on_step = vectors_after_each_step(pipe)
    res = train(images=str(photos(tmp_path / "imgs")), token="<h>", steps=5, batch=2, lr="5e-2", precision="fp16",
                out=str(tmp_path / "run"), pipe=pipe, progress=False, on_step=on_step, early_stop=False)  # its hooks count training passes
    records = log(res.out)
    assert [r["skipped"] for r in records] == [False, False, True, False, False]
    assert torch.equal(seen[2], seen[1])  # the overflowed step changed nothing
    assert not torch.equal(seen[3], seen[2])  # and training went on
    assert records[3]["loss_scale"] == records[2]["loss_scale"] / 2  # the scale was halved


def test_fp16_forward_that_always_overflows_is_reported_as_such(tmp_path):
    pipe = make_sd().to(dtype=torch.float16)
    forward = pipe.unet.forward

    def overflowing(*a, **k):
        out = forward(*a, **k)
        out.sample = out.sample * float("inf")
        return out

    pipe.unet.forward = overflowing
    with pytest.raises(TrainingDiverged, match="overflows in half precision; use --precision bf16 or fp32"):
        train(images=str(photos(tmp_path / "imgs")), token="<h>", steps=40, batch=1, precision="fp16",
              out=str(tmp_path / "run"), pipe=pipe, progress=False)


def test_vae_with_force_upcast_encodes_in_fp32_and_goes_back_to_fp16():
    pipe = make_sd().to(dtype=torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    seen = []
    pipe.vae.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    mean, std = data.encode_latents(pipe.vae, torch.zeros(2, 3, 16, 16))
    # one VAE call per view (so cached and uncached latents agree bit for bit), each in fp32
    assert seen == [torch.float32] * 2 and pipe.vae.dtype == torch.float16
    pipe.vae.register_to_config(force_upcast=False)
    data.encode_latents(pipe.vae, torch.zeros(1, 3, 16, 16))
    assert seen[-1] == torch.float16


def test_fp16_on_a_cpu_is_refused_in_one_line_when_textinv_loads_the_model(tmp_path):
    model = tmp_path / "model"
    make_sd().save_pretrained(model)
    with pytest.raises(TextinvError, match="half precision is for GPUs"):
        train(images=str(photos(tmp_path / "imgs")), token="<h>", steps=1, model=str(model), precision="fp16",
              out=str(tmp_path / "run"), progress=False)
    with pytest.raises(TextinvError, match="--precision 'fp8'"):
        train(images=str(photos(tmp_path / "imgs")), token="<h>", steps=1, precision="fp8", out=str(tmp_path / "r2"),
              pipe=make_sd(), progress=False)


# ---------------------------------------------------------------------- SDXL micro-conditioning
def test_views_know_their_original_size_and_crop_as_sdxl_scripts_pass_them():
    img = Image.new("RGB", (48, 40))  # w 48, h 40: the centre square starts 4 px in
    centre, mirror = data.views(img, 64)
    assert centre.original_size == (40, 48) and centre.crop_top_left == (0, 6)  # 4 px * 64/40
    assert mirror.crop_top_left == (0, 6)  # symmetric crop: the mirror sits at the same offset
    crops = data.views(Image.new("RGB", (100, 60)), 30, crops=4, flip=True, seed=3)
    for plain, flipped in zip(crops[::2], crops[1::2]):
        top, left = plain.crop_top_left
        assert flipped.crop_top_left[0] == top  # mirroring moves the crop sideways only
        assert 0 <= left <= 100 * 30 / 48 and 0 <= flipped.crop_top_left[1] <= 100 * 30 / 48
    assert len({v.crop_top_left for v in crops}) > 2  # random crops are not all at (0, 0)


def _time_ids_seen(tmp_path, name: str, **options) -> set:
    pipe = make_sdxl()
    seen = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: seen.append(k["added_cond_kwargs"]["time_ids"].clone()) or forward(*a, **k)
    train(images=str(photos(tmp_path / "imgs")), token="<x>", steps=6, batch=4, resolution=64, flip=False,
          out=str(tmp_path / name), pipe=pipe, progress=False, **options)
    return {tuple(int(v) for v in r) for r in torch.cat(seen)}


def test_sdxl_training_passes_each_views_size_and_crop(tmp_path):
    # centre crops: every view 64×64, a side crop says where it was cut
    rows = _time_ids_seen(tmp_path, "crops", buckets=False)
    expected = {(40, 48, 0, 6, 64, 64), (48, 40, 6, 0, 64, 64), (24, 24, 0, 0, 64, 64)}  # 4 px * 64/40 = 6.4
    assert rows <= expected and len(rows) >= 2
    # buckets: each image whole, the target size its bucket's (h, w) at about 64² pixels, no crop
    rows = _time_ids_seen(tmp_path, "buckets")
    expected = {(40, 48, 0, 0, 60, 72), (48, 40, 0, 0, 72, 60), (24, 24, 0, 0, 64, 64)}
    assert rows <= expected and len(rows) >= 2


# ---------------------------------------------------------------------------------- CLIP skip
def test_clip_skip_encodes_like_a1111_and_diffusers():
    from textinv import prompts

    pipe = make_sd(legacy=True)
    tokens.apply(pipe, Embedding("<t>", {"clip": torch.randn(1, 32)}))
    table = PromptTable(pipe, ["a photo of [name]"], "<t>", [""], clip_skip=2)
    hidden, _ = table.encode(torch.tensor([0]), torch.tensor([0]), "cpu")
    # A1111's "Clip skip: 2": hidden_states[-2], then the final layer norm.  (diffusers' own
    # clip_skip=1 means the same, but its pipelines reach for text_encoder.text_model, which
    # transformers 5's CLIPTextModel no longer has: textinv encodes it itself.)
    ids = pipe.tokenizer(tokens.expand(pipe, "a photo of <t>"), padding="max_length", max_length=77, return_tensors="pt").input_ids
    by_hand = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    want = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(by_hand)
    assert torch.allclose(hidden, want, atol=1e-6)
    assert not torch.allclose(hidden, pipe.encode_prompt("a photo of <t>", "cpu", 1, False)[0], atol=1e-3)
    enc = prompts.encode(pipe, prompts.split(pipe, "a photo of <t>"), clip_skip=2)
    assert torch.allclose(enc.embeds, want, atol=1e-6)


def test_clip_skip_is_checked_and_recorded_in_the_embedding(tmp_path):
    imgs = str(photos(tmp_path / "imgs"))
    for bad, pipe, words in ((3, make_sd(), "between 1 and 2"), (2, make_sdxl(), "SDXL already")):
        with pytest.raises(TextinvError, match=words):
            train(images=imgs, token="<c>", steps=1, clip_skip=bad, out=str(tmp_path / f"bad{bad}"), pipe=pipe, progress=False)
    res = train(images=imgs, token="<c>", steps=2, batch=1, clip_skip=2, out=str(tmp_path / "run"), pipe=make_sd(),
                progress=False, format="a1111", preview_every=2)
    assert (res.out / "previews" / "000002.png").is_file()  # previews are drawn with the same Clip skip
    assert formats.load(res.embedding_path).meta["clip_skip"] == 2
    path = formats.save(formats.load(res.embedding_path), tmp_path / "c.safetensors")
    assert formats.load(path).meta["clip_skip"] == 2
    with pytest.raises(TextinvError, match="clip_skip=2, now clip_skip=1"):
        train(images=imgs, token="<c>", steps=4, batch=1, clip_skip=1, out=str(tmp_path / "run"), pipe=make_sd(),
              progress=False, resume=True, format="a1111")


# ------------------------------------------------------------------- prediction types, checkpointing
def test_prediction_types_give_their_targets_and_unknown_ones_a_clear_error(tmp_path):
    x, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    for kind, want in (("epsilon", eps), ("sample", x)):
        assert torch.equal(prediction_target(DDPMScheduler(prediction_type=kind), x, eps, t), want)
    v = DDPMScheduler(prediction_type="v_prediction")
    ab = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(prediction_target(v, x, eps, t), ab.sqrt() * eps - (1 - ab).sqrt() * x, atol=1e-6)
    pipe = make_sd()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="flow_prediction")
    with pytest.raises(TextinvError, match="prediction_type 'flow_prediction'"):
        train(images=str(photos(tmp_path / "imgs")), token="<p>", steps=1, out=str(tmp_path / "run"), pipe=pipe, progress=False)


def test_gradient_checkpointing_recomputes_the_unet_in_the_backward_pass(tmp_path):
    imgs = str(photos(tmp_path / "imgs"))
    counts = {}
    for flag in (False, True):
        pipe = make_sd()
        block = pipe.unet.down_blocks[1].resnets[0]  # after the first cross-attention: on the gradient's path
        calls, forward = [], block.forward
        block.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # (hooks do not fire in a recompute)
        train(images=imgs, token="<g>", steps=2, batch=1, grad_checkpointing=flag, out=str(tmp_path / f"run{flag}"),
              pipe=pipe, progress=False, early_stop=False)  # training passes only
        counts[flag] = len(calls)
    assert counts[False] == 2 and counts[True] == 4  # each step's forward runs again during backward


# ------------------------------------------------------------------------ the recipe's math, by hand
def _recipe(pipe, sdxl: bool, token: str, init: dict, prompt: str, x0, eps, t, time_ids):
    """diffusers' textual_inversion script's step, written out: add the token, resize the table,
    encode, DDPM-noise by the formula, predict, MSE to the target.  Returns (loss, grads per encoder)."""
    pairs = tokens.encoder_pairs(pipe)
    ids, tables = [], []
    for (tok, te), vec in zip(pairs, init):
        tok.add_tokens([token])
        te.resize_token_embeddings(len(tok))
        table = te.get_input_embeddings().weight
        new = tok.convert_tokens_to_ids(token)
        with torch.no_grad():
            table[new] = vec
        table.requires_grad_(True)
        tables.append((table, new))
        ids.append(tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids)
    if sdxl:
        outs = [te(i, output_hidden_states=True) for (_, te), i in zip(pairs, ids)]
        hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        cond = {"added_cond_kwargs": {"text_embeds": outs[1][0].expand(len(x0), -1), "time_ids": time_ids}}
    else:
        hidden, cond = pairs[0][1](ids[0])[0], {}
    ab = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = eps if pipe.scheduler.config.prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    pred = pipe.unet(noisy, t, hidden.expand(len(x0), -1, -1), **cond).sample
    loss = F.mse_loss(pred, target)
    loss.backward()
    return loss, [table.grad[new] for table, new in tables]


@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
def test_textinv_loss_and_gradient_equal_the_common_recipe(kind):
    sdxl = kind == "sdxl"
    make = (lambda: make_sdxl(legacy=False)) if sdxl else (lambda: make_sd(legacy=True))  # see note below
    ours, theirs = make(), make()
    if kind == "sd-v":
        for p in (ours, theirs):
            p.scheduler = type(p.scheduler).from_config(p.scheduler.config, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    # Latents: the recipe samples the VAE's distribution and scales; textinv caches mean and std (scaled).
    dist = theirs.vae.encode(pixels).latent_dist
    z = torch.randn(dist.mean.shape, generator=g)
    x0_recipe = (dist.mean + dist.std * z) * theirs.vae.config.scaling_factor
    mean, std = data.encode_latents(ours.vae, pixels)
    x0 = mean + std * z
    assert torch.allclose(x0, x0_recipe, atol=1e-5)
    eps, t = torch.randn(x0.shape, generator=g), torch.tensor([17, 803])
    slots = ["clip_l", "clip_g"] if sdxl else ["clip"]
    init = [init_vectors(tok, te.get_input_embeddings().weight, "shape", 1)[0] for tok, te in tokens.encoder_pairs(ours)]
    views = [data.View(Image.new("RGB", (64, 64)), (40, 48), (0, 6))] * 2
    time_ids = view_time_ids(ours, views)

    tokens.apply(ours, Embedding("<t>", {s: v[None] for s, v in zip(slots, init)}))
    extras = [e.text_encoder.get_input_embeddings().extra for e in tokens.state(ours).encoders]
    for p in extras:
        p.requires_grad_(True)
    hidden, pooled = PromptTable(ours, ["a photo of [name]"], "<t>", [""]).encode(torch.tensor([0, 0]), torch.tensor([0, 0]), "cpu")
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
    loss = denoising_loss(ours.unet, DDPMScheduler.from_config(ours.scheduler.config), x0, eps, t, hidden, added)
    loss.backward()

    ref_loss, ref_grads = _recipe(theirs, sdxl, "<t>", init, "a photo of <t>", x0, eps, t,
                                  torch.tensor([[40, 48, 0, 6, 64, 64]] * 2, dtype=torch.float32))
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-7), (loss.item(), ref_loss.item())
    for p, ref in zip(extras, ref_grads):
        assert p.grad.abs().max() > 0
        assert torch.allclose(p.grad[0], ref, rtol=1e-4, atol=1e-8), (p.grad[0] - ref).abs().max()
# Note: the SDXL recipe runs on encoders with the fixed eos_token_id.  With the legacy id 2 the recipe
# (which adds token ids) pools at the trigger — the failure test_sdxl_conditioning pins down — while
# textinv pools at the end token, as A1111, ComfyUI and kohya's pool workaround do.
