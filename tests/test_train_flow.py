"""Training SD3 and Flux.1 embeddings: the same trainer, the flow-matching objective, every encoder.

The pipelines are tiny random ones with the real configs (tiny_flow.py); only the machinery is
checked here: every encoder's vectors learn and are written in the family's own layout, the first
step's gradient equals one computed by hand (the conditioning built as test_flow_use.py's reference
builds it, the vectors spliced per token, then :func:`textinv.flowmatch.flow_loss`), the per-encoder
settings, resume bit for bit, and the one-line refusals.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from textinv import families, flowmatch, formats, generation, prompts, tokens, training
from textinv.cli import main
from textinv.errors import TextinvError
from textinv.formats import Embedding
from textinv.training import TrainConfig, init_vectors, train

from conftest import make_sd, red_blocks, torchrun_train
from test_eval import tiny_clip, tiny_dino  # noqa: F401 - fixtures
from test_flow_use import reference
from tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

MAKERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}  # flux: FLUX.1-dev's config (guidance input)
QUICK = dict(token="<blk>", init="red block", batch=2, resolution=32, progress=False, early_stop=False)


@pytest.fixture(scope="module")
def imgs(tmp_path_factory) -> Path:
    return red_blocks(tmp_path_factory.mktemp("flow") / "imgs")


def run(kind: str, imgs: Path, out: Path, pipe=None, **settings):
    return train(images=str(imgs), out=str(out), pipe=pipe or MAKERS[kind](), **(QUICK | settings))


def start_vectors(kind: str, init: str = "red block", n: int = 1, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Each encoder's init vectors, by A1111's rule on a fresh pipeline (what training starts from)."""
    pipe = MAKERS[kind](dtype=dtype)
    return {s.key: init_vectors(tok, te.get_input_embeddings().weight, init, n)
            for s, (tok, te) in tokens.slot_pairs(pipe)}


# ------------------------------------------------------------------------------------- (a) it learns
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_every_encoder_learns_and_the_file_is_the_familys_own_layout(kind, imgs, tmp_path):
    res = run(kind, imgs, tmp_path / "run", steps=3, vectors=2)
    family = families.SD3 if kind == "sd3" else families.FLUX
    start = start_vectors(kind, n=2)
    emb = formats.load(res.embedding_path)
    assert res.embedding_path.suffix == ".safetensors" and emb.source_format == kind
    assert list(emb.vectors) == list(family.keys) and emb.num_vectors == 2
    for slot in family.keys:
        assert torch.equal(emb.vectors[slot], res.embedding.vectors[slot])
        assert (emb.vectors[slot] - start[slot]).abs().min() > 0, slot  # every vector of every encoder moved
    fresh = MAKERS[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a part missing would warn that its trigger is left out
        tokens.apply(fresh, emb)
    assert all("<|ti:blk:1|>" in tokens.expand(fresh, "a photo of <blk>", i) for i in range(len(family.slots)))


# -------------------------------------------------------------------------- (b) the first gradient
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_first_gradient_equals_one_through_flow_loss_on_spliced_conditioning(kind, imgs, tmp_path, monkeypatch):
    seen = {}
    real_loss, real_update = flowmatch.flow_loss, training._update

    def loss(pipe, latents, noise, t, embeds, pooled, **kw):
        seen.setdefault("draw", (latents.clone(), noise.clone(), t.clone(), kw))
        return real_loss(pipe, latents, noise, t, embeds, pooled, **kw)

    def update(word):
        seen.setdefault("grads", [p.grad.clone() for p in word.params])
        seen.setdefault("vectors", [p.detach().clone() for p in word.params])
        return real_update(word)

    monkeypatch.setattr(flowmatch, "flow_loss", loss)
    monkeypatch.setattr(training, "_update", update)
    (tmp_path / "one.txt").write_text("a photo of [name]\n")
    run(kind, imgs, tmp_path / "run", steps=1, vectors=2, templates=str(tmp_path / "one.txt"))
    latents, noise, t, kw = seen["draw"]
    assert kw["mask"] is None and kw["family"].joins == kind

    pipe = MAKERS[kind]()  # untouched: the vectors go in per token, by a hook (the reference)
    family = families.of_pipeline(pipe)
    for _, te in tokens.encoder_pairs(pipe):  # a fresh T5's stack looks tokens up in a tied copy of its table:
        te.set_input_embeddings(te.get_input_embeddings())  # one module, which the reference's hook sees
    leaves = {s.key: v.clone().requires_grad_(True) for s, v in zip(family.slots, seen["vectors"])}
    embeds, pooled = reference.__wrapped__(pipe, "a photo of <blk>", [Embedding("<blk>", leaves)],
                                           prompts.t5_length(pipe))
    b = len(latents)
    want = flowmatch.flow_loss(pipe, latents, noise, t, embeds.expand(b, -1, -1), pooled.expand(b, -1))
    want.backward()
    worst = 0.0
    for s, got in zip(family.slots, seen["grads"]):
        ref = leaves[s.key].grad
        assert ref.abs().max() > 0, s.key
        # rtol 1e-5, and entries near zero measured against the gradient's scale (batched and single
        # encoder passes round differently in float32)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    print(f"{kind}: the first gradient's largest difference from the reference, over its largest entry: {worst:.1e}")


# ------------------------------------------------------------------------- (c) per-encoder settings
def test_encoders_t5_keeps_the_clip_vectors_at_their_init(imgs, tmp_path):
    res = run("flux", imgs, tmp_path / "run", steps=2, encoders="t5")
    start = start_vectors("flux")
    assert torch.equal(res.embedding.vectors["clip_l"], start["clip_l"])
    assert (res.embedding.vectors["t5"] - start["t5"]).abs().min() > 0


def test_lr_t5_scales_the_t5_step_alone(imgs, tmp_path):
    start = start_vectors("sd3")
    same = run("sd3", imgs, tmp_path / "same", steps=1, lr="0.01").embedding.vectors
    double = run("sd3", imgs, tmp_path / "double", steps=1, lr="0.01", lr_t5="0.02").embedding.vectors
    for slot in ("clip_l", "clip_g"):
        assert torch.equal(same[slot], double[slot])
    torch.testing.assert_close(double["t5"] - start["t5"], 2 * (same["t5"] - start["t5"]), rtol=1e-3, atol=1e-6)


def test_preserve_norm_keeps_every_vector_at_its_vocabularys_median_norm(imgs, tmp_path):
    res = run("sd3", imgs, tmp_path / "run", steps=2, vectors=3, preserve_norm=True)
    pipe = tiny_sd3_pipeline()
    for s, (_, te) in tokens.slot_pairs(pipe):
        median = te.get_input_embeddings().weight.detach().float().norm(dim=-1).median()
        norms = res.embedding.vectors[s.key].norm(dim=-1)
        torch.testing.assert_close(norms, median.expand(3), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------- (d) resume
def test_a_run_stopped_at_step_3_and_resumed_ends_bit_for_bit_as_one_never_stopped(imgs, tmp_path):
    settings = dict(steps=5, early_stop=True, eval_every=2, save_every=2, lr="0.02")
    whole = run("sd3", imgs, tmp_path / "whole", **settings)
    stopped = run("sd3", imgs, tmp_path / "parts", on_step=lambda step, loss: step == 3, **settings)
    assert stopped.steps == 3
    resumed = run("sd3", imgs, tmp_path / "parts", resume=True, **settings)
    assert resumed.steps == 5
    for slot, v in whole.embedding.vectors.items():
        assert torch.equal(resumed.embedding.vectors[slot], v), slot
    assert resumed.eval_loss == whole.eval_loss and np.isfinite(whole.eval_loss)


# ---------------------------------------------------------------- noise levels, bf16, masks, captions
def test_timesteps_keep_the_draws_within_those_noise_levels(imgs, tmp_path, monkeypatch):
    drawn, real_loss = [], flowmatch.flow_loss

    def loss(pipe, latents, noise, t, *args, **kw):
        drawn.append(t)
        return real_loss(pipe, latents, noise, t, *args, **kw)

    monkeypatch.setattr(flowmatch, "flow_loss", loss)
    run("sd3", imgs, tmp_path / "run", steps=6, batch=4, timesteps="600:1000")
    schedule = flowmatch.train_schedule(tiny_sd3_pipeline().scheduler.config)  # SD3's: shifted, 1000 → ~1
    first_out = int((schedule.timesteps >= 600).sum())  # the indices from here on are below 600
    t = torch.cat(drawn)
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < first_out
    assert (schedule.timesteps[t] >= 600).all() and len(set(t.tolist())) > 1


def test_a_bf16_model_trains_float32_vectors(imgs, tmp_path):
    res = run("flux", imgs, tmp_path / "run", steps=2, pipe=tiny_flux_pipeline(dtype=torch.bfloat16))
    start = start_vectors("flux", dtype=torch.bfloat16)
    for slot, v in res.embedding.vectors.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all() and not torch.equal(v, start[slot]), slot

def test_alpha_masks_and_captions_reach_the_flux_loss(tmp_path, monkeypatch):
    folder = tmp_path / "cutouts"
    folder.mkdir()
    for i in range(2):
        a = np.zeros((32, 32, 4), np.uint8)
        a[8:24, 4 + 4 * i:20 + 4 * i] = (200, 30, 30, 255)  # a red block, transparent around it
        Image.fromarray(a).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red block")
    masks, real_loss = [], flowmatch.flow_loss

    def loss(pipe, latents, *args, mask=None, **kw):
        masks.append((tuple(latents.shape), mask))
        return real_loss(pipe, latents, *args, mask=mask, **kw)

    monkeypatch.setattr(flowmatch, "flow_loss", loss)
    res = train(images=str(folder), out=str(tmp_path / "run"), pipe=tiny_flux_pipeline(), steps=2, alpha_mask=True,
                **QUICK)
    (shape, mask), = masks[:1]
    assert mask is not None and mask.shape == (shape[0], 1, *shape[2:]) and 0 < float(mask.mean()) < 1
    assert res.embedding_path.is_file()


def test_a_mask_of_ones_is_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    weights = torch.rand(2, 1, 1, 1, generator=g)
    plain = flowmatch.weighted_mse(pred, target, weights)
    torch.testing.assert_close(flowmatch.weighted_mse(pred, target, weights, torch.ones(2, 1, 4, 4)), plain)
    half = torch.ones(2, 1, 4, 4)
    half[..., :2] = 0  # only the right half counts
    torch.testing.assert_close(flowmatch.weighted_mse(pred, target, weights, half),
                               flowmatch.weighted_mse(pred[..., 2:], target[..., 2:], weights))


# ------------------------------------------------------------------------------------ (e) refusals
@pytest.mark.parametrize("kind, settings, says", [
    ("flux", dict(per_layer=True, format="per-layer"), "--per-layer: P+"),
    ("sd3", dict(guidance=2.0), "--guidance 2: training guidance"),
    ("flux", dict(compile=True), "--compile: not for Flux.1"),
    ("flux", dict(clip_skip=2), "--clip-skip 2: Flux.1 takes fixed layers"),
    ("sd3", dict(format="a1111"), "--format a1111: cannot hold the T5 part"),
    ("flux", dict(encoders="clip_g"), "--encoders clip_g: Flux.1 has no clip_g text encoder"),
    ("sd3", dict(resolution=40), "--resolution 40: must be a multiple of 16"),
    ("sd3", dict(timesteps="0:1"), "--timesteps 0:1: none of this model's"),
    ("sd", dict(lr_t5="1e-3"), "--lr-t5 1e-3: SD 1.x has no T5 text encoder"),
])
def test_what_flow_training_does_not_take_is_one_line(kind, settings, says, imgs, tmp_path):
    pipe = make_sd() if kind == "sd" else MAKERS[kind]()
    with pytest.raises(TextinvError) as e:
        run(kind, imgs, tmp_path / "run", pipe=pipe, steps=1, **settings)
    assert str(e.value).startswith(says) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


def test_the_settings_are_checked_before_the_model_loads():
    cfg = TrainConfig(images="", token="<t>")
    for bad, says in ((dict(encoders="clip_l,vae"), "--encoders 'clip_l,vae': no model has a text encoder 'vae'"),
                      (dict(encoders="t5,t5"), "--encoders 't5,t5': an encoder named twice"),
                      (dict(lr_t5="fast"), "--lr-t5 'fast': expected a number")):
        with pytest.raises(TextinvError, match="^" + says):
            training.check(dataclasses.replace(cfg, **bad))


# --------------------------------------------------------------------------------------- the CLI
def test_textinv_train_model_takes_a_flux_folder(imgs, tmp_path):
    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    res = CliRunner().invoke(main, ["train", "--model", str(tmp_path / "flux"), "--images", str(imgs), "--token", "<blk>",
                                    "--steps", "2", "--batch", "1", "--resolution", "32", "--no-early-stop",
                                    "--encoders", "clip_l,t5", "--lr-t5", "1e-3", "--preserve-norm",
                                    "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    emb = formats.load(tmp_path / "run" / "blk.safetensors")
    assert emb.source_format == "flux" and set(emb.vectors) == {"clip_l", "t5"}


# ------------------------------------------------- the SD trainer's other settings, on flow models
def test_grad_accum_resumes_bit_for_bit_on_flux(imgs, tmp_path):
    """Several micro-batches per step (their mean gradient), stopped at a save and resumed."""
    settings = dict(steps=4, grad_accum=2, batch=1, save_every=2, lr="0.02")
    whole = run("flux", imgs, tmp_path / "whole", **settings)
    assert whole.steps == 4 and np.isfinite(whole.loss)
    run("flux", imgs, tmp_path / "parts", **(settings | {"steps": 2}))
    resumed = run("flux", imgs, tmp_path / "parts", resume=True, **settings)
    for slot, v in whole.embedding.vectors.items():
        assert torch.equal(resumed.embedding.vectors[slot], v), slot
    one = run("flux", imgs, tmp_path / "one", **(settings | {"grad_accum": 1}))
    assert not torch.equal(one.embedding.vectors["t5"], whole.embedding.vectors["t5"])  # the second micro-batch counts


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_gradient_checkpointing_recomputes_the_transformer_in_the_backward_pass(kind, imgs, tmp_path):
    counts, results = {}, {}
    for flag in (False, True):
        pipe = MAKERS[kind]()
        block = pipe.transformer.transformer_blocks[0]
        calls, forward = [], block.forward
        block.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # (hooks do not fire in a recompute)
        results[flag] = run(kind, imgs, tmp_path / f"run{flag}", pipe=pipe, steps=2, batch=1, grad_checkpointing=flag)
        counts[flag] = len(calls)
    assert counts[False] == 2 and counts[True] == 4  # each step's forward runs again during backward
    for slot, v in results[False].embedding.vectors.items():  # the same gradients
        torch.testing.assert_close(results[True].embedding.vectors[slot], v, rtol=1e-5, atol=1e-6)


def test_pick_best_and_patience_measure_a_flux_run(imgs, tmp_path, tiny_clip, tiny_dino, monkeypatch):
    """--pick-best judges every save (samples from the Flux pipeline itself) and keeps the best as the
    run's file; --patience stops the run when the measured saves stop improving."""
    monkeypatch.setattr(generation, "default_size", lambda pipe: (32, 32))  # the tiny model's 1024 px: minutes
    model = tmp_path / "flux"
    tiny_flux_pipeline().save_pretrained(model)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "train", "--images", str(imgs), "--token", "<blk>", "--init", "red block", "--model", str(model),
        "--steps", "8", "--batch", "1", "--resolution", "32", "--save-every", "2", "--out", str(out), "--pick-best",
        "--patience", "1", "--eval-n", "2", "--clip", str(tiny_clip), "--dino", str(tiny_dino), "--no-early-stop"])
    assert res.exit_code == 0, res.output
    picked = json.loads((out / "eval" / "metrics.json").read_text())
    # the tiny random model draws the same pictures whatever the vectors: step 4 does not improve on 2
    assert [p["step"] for p in picked["points"]] == [2, 4]
    assert "stopped at step 4 by the measured saves (--patience)" in res.output
    final = formats.load(out / "blk.safetensors")
    assert final.family == families.FLUX.name and set(final.vectors) == {"clip_l", "t5"}
    assert final.meta["step"] == picked["best_step"] == 2
    assert torch.equal(final.vectors["t5"], formats.load(out / "embeddings" / "blk-2.safetensors").vectors["t5"])


@pytest.mark.long
def test_two_processes_train_a_flux_embedding_data_parallel(imgs, tmp_path):
    """`accelerate launch` / torchrun on a Flux.1 model: two CPU processes (gloo), one file written."""
    model = tmp_path / "flux"
    tiny_flux_pipeline().save_pretrained(model)
    res = torchrun_train("--model", str(model), "--images", str(imgs), "--token", "<d>", "--steps", "3", "--batch", "2",
                         "--resolution", "32", "--no-early-stop", "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert res.stdout.decode().count("wrote ") == 1
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3
    emb = formats.load(tmp_path / "run" / "d.safetensors")
    assert emb.family == families.FLUX.name and set(emb.vectors) == {"clip_l", "t5"}


def test_buckets_give_flux_whole_packed_tokens_at_each_images_ratio(tmp_path, monkeypatch):
    """Images of three ratios in buckets: each step's latents are whole 2×2 patches (Flux.1 packs
    them), wider for the wide image and taller for the tall one."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(64, 32), (32, 64), (48, 48)]):
        Image.fromarray(np.full((h, w, 3), 40 * (i + 1), np.uint8)).save(folder / f"{i}.png")
    shapes, pack = [], flowmatch.pack
    monkeypatch.setattr(flowmatch, "pack", lambda latents: shapes.append(tuple(latents.shape[-2:])) or pack(latents))
    lines = []
    run("flux", folder, tmp_path / "run", steps=6, batch=1, resolution=48, buckets=True, echo=lines.append)
    assert "bucket" in " ".join(lines)
    assert all(h % 2 == 0 and w % 2 == 0 for h, w in shapes)
    assert any(w > h for h, w in shapes) and any(h > w for h, w in shapes)
