"""The user's own data: aspect-ratio buckets, captions by default, alpha masks, LR schedules, the
run's one-line summary and one loss figure, and plain words when the built-in model cannot learn
or draw what it is given."""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from textinv import data, evaluate, generation, models
from textinv.errors import TextinvError
from textinv.training import (LOSS_WINDOW, PromptTable, TrainConfig, denoising_loss, lr_factor, plan, train)

from conftest import make_sd


def picture(path: Path, w: int, h: int, colour=(200, 40, 40), alpha: bool = False, caption: str | None = None) -> Path:
    """A flat picture with a block in the middle (RGBA: transparent around the block)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((h, w, 4 if alpha else 3), 230, np.uint8)
    if alpha:
        a[..., 3] = 0
    a[h // 4: 3 * h // 4, w // 4: 3 * w // 4, :3] = colour
    if alpha:
        a[h // 4: 3 * h // 4, w // 4: 3 * w // 4, 3] = 255
    Image.fromarray(a).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------- buckets
def test_buckets_hold_about_the_training_area_at_the_images_ratio():
    # SD at 512 (64-pixel grid, as kohya): 4:3 → 576×448, 2:1 → 704×384; a 1:100 strip is capped at 1:4
    step = data.bucket_step(512, 8, 8)
    assert step == 64 and data.bucket_step(1024, 8, 4) == 32 and data.bucket_step(32, 4, 4) == 4
    assert data.bucket_for(640, 480, 512, step) == (576, 448)
    assert data.bucket_for(800, 400, 512, step) == (704, 384)
    assert data.bucket_for(500, 500, 512, step) == (512, 512)
    assert data.bucket_for(5, 500, 512, step) == (256, 1024)
    for w, h in [(640, 480), (480, 640), (1920, 1080), (300, 500)]:
        bw, bh = data.bucket_for(w, h, 512, step)
        assert bw % step == 0 and bh % step == 0
        assert abs(bw * bh / 512**2 - 1) < 0.2  # about the training area
        assert abs(np.log(bw / bh) - np.log(w / h)) < 0.15  # about the image's ratio


def test_a_bucket_view_keeps_the_whole_image_where_a_centre_crop_cuts_it():
    img = Image.new("RGB", (64, 32), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 16, 32))  # the subject: the left quarter
    crop, = data.views(img, 32, flip=False)
    whole, = data.views(img, (64, 32), flip=False)
    assert np.asarray(crop.image).min() == 255  # the centre square misses the subject entirely
    assert np.asarray(whole.image).min() == 0 and whole.size == (64, 32) and whole.crop_top_left == (0, 0)


def test_square_sets_train_exactly_as_before_buckets(tmp_path):
    # all square: --buckets on, off and auto draw the same batches and give the same vectors
    for i in range(3):
        picture(tmp_path / "imgs" / f"{i}.png", 40, 40, colour=(200, 40 * i, 40))
    got = []
    for name, b in (("auto", None), ("off", False), ("on", True)):
        r = train(images=str(tmp_path / "imgs"), token="<s>", steps=3, batch=2, out=str(tmp_path / name), pipe=make_sd(),
                  progress=False, buckets=b)
        got.append(r.embedding.vectors["clip"])
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_mixed_ratios_batch_from_one_bucket_each_step(tmp_path):
    for i, (w, h) in enumerate([(64, 32), (64, 32), (32, 64), (40, 40)]):
        picture(tmp_path / "imgs" / f"{i}.png", w, h)
    pipe = make_sd()
    shapes = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, *a, **k: shapes.append(tuple(x.shape)) or forward(x, *a, **k)
    lines = []
    train(images=str(tmp_path / "imgs"), token="<m>", steps=12, batch=3, out=str(tmp_path / "run"), pipe=pipe, progress=False,
          echo=lines.append, early_stop=False)  # training batches only (the evaluation batch spans buckets)
    factor = pipe.vae_scale_factor
    sizes = {(s[3] * factor, s[2] * factor) for s in shapes}  # (w, h) of each batch: one size per batch
    assert len(sizes) >= 2 and all(s[0] == 3 for s in shapes)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["buckets"]["0.png"][0] > cfg["buckets"]["0.png"][1] and cfg["buckets"]["2.png"][0] < cfg["buckets"]["2.png"][1]
    assert "buckets" in lines[-1] and "×2" in lines[-1]


# -------------------------------------------------------------------------------- captions
def test_captions_are_used_by_default_when_sidecars_exist(tmp_path):
    picture(tmp_path / "imgs" / "a.png", 32, 32, caption="red block, on grass")
    picture(tmp_path / "imgs" / "b.png", 32, 32)
    images = data.load_images(tmp_path / "imgs")
    p = plan(TrainConfig(images=str(tmp_path / "imgs"), token="<c>"), images, [], 32, 8)
    assert p.captioned == 1 and all(t.endswith(", [filewords]") for t in p.templates)
    assert p.captions == ["red block, on grass", ""]  # no caption file: nothing added (not the file name)
    off = plan(TrainConfig(images=str(tmp_path / "imgs"), token="<c>", captions=False), images, [], 32, 8)
    assert off.captioned == 0 and "[filewords]" not in off.templates[0]
    assert data.fill_template(p.templates[0], "<c>", p.captions[1]) == "a photo of a <c>"
    with pytest.raises(TextinvError, match="--captions: no image"):
        plan(TrainConfig(images="x", token="<c>", captions=True), images[1:], [], 32, 8)


def test_the_summary_says_whether_captions_are_used(tmp_path):
    for i in range(2):
        picture(tmp_path / "imgs" / f"{i}.png", 32, 32, caption=f"tag{i}, blue, big")
    lines = []
    train(images=str(tmp_path / "imgs"), token="<c>", steps=2, batch=2, out=str(tmp_path / "run"), pipe=make_sd(), progress=False,
          echo=lines.append, shuffle_captions=True, keep_tokens=1)
    assert "captions from IMG.txt for 2 of 2 (varied every step)" in lines[-1]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["captions_used"] == 2


def test_caption_shuffle_keeps_the_first_tags_and_dropout_drops_the_others():
    rng = random.Random(0)
    caption = "<t>, red, small, on the left, striped, dark background"
    seen = {data.vary_caption(caption, rng, shuffle=True, keep=1) for _ in range(50)}
    assert len(seen) > 10 and all(s.startswith("<t>, ") for s in seen)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in seen)
    dropped = [data.vary_caption(caption, rng, dropout=0.5, keep=1).split(", ") for _ in range(200)]
    assert all(d[0] == "<t>" for d in dropped)
    share = np.mean([len(d) - 1 for d in dropped]) / 5
    assert 0.35 < share < 0.65
    assert data.vary_caption(caption, rng) == caption


def test_varying_captions_reach_the_text_encoder_each_step(sd_pipe):
    from textinv import tokens
    from textinv.formats import Embedding

    tokens.apply(sd_pipe, Embedding("<t>", {"clip": torch.zeros(1, 32)}))
    vary = {"shuffle": True, "keep": 0, "dropout": 0.0}
    table = PromptTable(sd_pipe, ["[name], [filewords]"], "<t>", ["a, b, c, d, e"], vary=vary)
    which, views = torch.tensor([0]), torch.tensor([0])
    outs = [table.encode(which, views, "cpu", random.Random(s))[0] for s in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # other tag orders, other conditioning
    fixed = PromptTable(sd_pipe, ["[name], [filewords]"], "<t>", ["a, b, c, d, e"])
    assert torch.equal(fixed.encode(which, views, "cpu", random.Random(0))[0], fixed.encode(which, views, "cpu")[0])


# ------------------------------------------------------------------------------ alpha mask
def test_alpha_is_kept_beside_the_white_composite(tmp_path):
    item, = data.load_images(picture(tmp_path / "imgs" / "cut.png", 32, 32, alpha=True).parent)
    assert item.alpha is not None and item.image.getpixel((0, 0)) == (255, 255, 255)
    opaque, = data.load_images(picture(tmp_path / "o" / "o.png", 32, 32).parent)
    assert opaque.alpha is None
    view, = data.views(item.image, 32, flip=False, alpha=item.alpha)
    m = data.mask_tensor([view.mask, None], (8, 8))
    assert m.shape == (2, 1, 8, 8) and m[0, 0, 0, 0] == 0 and m[0, 0, 4, 4] == 1 and m[1].min() == 1


def test_masked_loss_ignores_what_the_mask_hides(sd_pipe):
    sched = DDPMScheduler.from_config(sd_pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    noise, t = torch.randn(x.shape, generator=g), torch.tensor([10, 500])
    hidden = torch.randn(2, 77, 32, generator=g)
    ones = torch.ones(2, 1, 8, 8)
    plain = denoising_loss(sd_pipe.unet, sched, x, noise, t, hidden)
    assert torch.allclose(denoising_loss(sd_pipe.unet, sched, x, noise, t, hidden, weight=ones), plain, atol=1e-6)
    half = ones.clone()
    half[..., :, 4:] = 0  # the right half is transparent
    masked = denoising_loss(sd_pipe.unet, sched, x, noise, t, hidden, weight=half)
    pred = sd_pipe.unet(sched.add_noise(x, noise, t), t, hidden).sample
    assert torch.allclose(masked, ((pred - noise) ** 2)[..., :, :4].mean(), atol=1e-5)  # the left half's error alone
    assert not torch.allclose(masked, plain, atol=1e-4)


def test_summary_mentions_transparency_and_alpha_mask_trains(tmp_path):
    picture(tmp_path / "imgs" / "cut.png", 32, 32, alpha=True)
    picture(tmp_path / "imgs" / "plain.png", 32, 32)
    lines = []
    train(images=str(tmp_path / "imgs"), token="<a>", steps=2, batch=2, out=str(tmp_path / "off"), pipe=make_sd(), progress=False,
          echo=lines.append)
    assert "1 with transparency, trained on white (--alpha-mask" in lines[-1]
    train(images=str(tmp_path / "imgs"), token="<a>", steps=2, batch=2, out=str(tmp_path / "on"), pipe=make_sd(), progress=False,
          echo=lines.append, alpha_mask=True)
    assert "alpha mask on 1" in lines[-1]


# ------------------------------------------------------------------------------- schedules
def test_lr_schedules_warm_up_then_decay_to_zero():
    assert [round(lr_factor("constant", 3, s, 10), 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [lr_factor("cosine", 0, s, 100) for s in range(100)]
    lin = [lr_factor("linear", 0, s, 100) for s in range(100)]
    assert cos[0] == 1 and lin[0] == 1 and cos[-1] < 0.01 and lin[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(cos, cos[1:])) and cos[50] == pytest.approx(0.5)


def test_schedule_is_applied_recorded_and_part_of_the_resume_identity(tmp_path):
    picture(tmp_path / "imgs" / "a.png", 32, 32)
    run = tmp_path / "run"
    train(images=str(tmp_path / "imgs"), token="<l>", steps=6, batch=1, lr="0.01", lr_warmup=2, lr_schedule="linear",
          out=str(run), pipe=make_sd(), progress=False, save_every=3)
    lrs = [r["lr"] for r in log(run)]
    assert lrs[0] == pytest.approx(0.01 / 3) and lrs[2] == pytest.approx(0.01) and lrs[-1] < lrs[2]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr_warmup"] == 2 and cfg["lr_schedule"] == "linear"
    with pytest.raises(TextinvError, match="lr_schedule=linear, now lr_schedule=cosine"):
        train(images=str(tmp_path / "imgs"), token="<l>", steps=8, batch=1, lr="0.01", lr_warmup=2, lr_schedule="cosine",
              out=str(run), pipe=make_sd(), progress=False, resume=True)
    with pytest.raises(TextinvError, match="--lr-warmup 9"):
        train(images=str(tmp_path / "imgs"), token="<l>", steps=9, lr_warmup=9, out=str(tmp_path / "r2"), pipe=make_sd())


# ------------------------------------------------------------------- one loss, one summary
def test_the_reported_loss_is_the_mean_of_the_last_steps(tmp_path):
    picture(tmp_path / "imgs" / "a.png", 32, 32)
    r = train(images=str(tmp_path / "imgs"), token="<w>", steps=LOSS_WINDOW + 5, batch=1, out=str(tmp_path / "run"),
              pipe=make_sd(), progress=False)
    losses = [x["loss"] for x in log(tmp_path / "run")]
    assert r.loss == pytest.approx(np.mean(losses[-LOSS_WINDOW:]), abs=1e-5)


def test_the_summary_counts_skipped_files_and_names_model_and_output(tmp_path):
    picture(tmp_path / "imgs" / "a.png", 48, 32)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    lines = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        train(images=str(tmp_path / "imgs"), token="<w>", steps=1, batch=1, out=str(tmp_path / "run"), pipe=make_sd(),
              progress=False, echo=lines.append)
    line = lines[-1]
    assert line.startswith("training '<w>': 1 image from ") and "(1 skipped)" in line
    assert "buckets 40×24" in line or "buckets" in line
    assert "model mini" in line and str(tmp_path / "run") in line


def test_the_summary_says_once_what_the_token_is_called_in_its_files(tmp_path):
    from textinv import formats
    from textinv.training import trigger_note

    picture(tmp_path / "imgs" / "a.png", 32, 32)
    lines = []
    r = train(images=str(tmp_path / "imgs"), token="<my-mug>", steps=1, batch=1, out=str(tmp_path / "run"), pipe=make_sd(),
              progress=False, echo=lines.append)
    assert lines[-1].endswith(f"output {tmp_path / 'run'}/; trigger 'my-mug' (the files are named after the token without "
                              f"its brackets, and A1111 calls an embedding by its file's name)")
    assert r.embedding_path.name == "my-mug.safetensors" and formats.load(r.embedding_path).name == "my-mug"  # as said
    assert "'my-cat' (the files are named after the token made safe as a file name" in trigger_note(
        TrainConfig(images="", token="<my cat>"))
    assert trigger_note(TrainConfig(images="", token="mug")) == ""  # nothing to explain
    assert trigger_note(TrainConfig(images="", token="<my-mug>", format="png")) == ""  # a card keeps the token inside


# ------------------------------------------------------------- honest about the mini model
def _world_images(folder: Path, n: int = 3) -> Path:
    from textinv.demo import render_training_set

    render_training_set("drop", folder, n=n)
    return folder


def test_mini_model_warns_once_about_photos_and_not_about_its_own_renders(tmp_path):
    mini = models.load_pipeline()
    photos = [Image.open(picture(tmp_path / "p" / f"{i}.jpg", 640, 480 + 40 * i)) for i in range(2)]
    note = models.outside_world(mini, images=photos)
    assert note.startswith("2 of 2 images are not pictures of its world") and "--model" in note
    renders = [item.image for item in data.load_images(_world_images(tmp_path / "w"))]
    enlarged = [im.resize((128, 128), Image.Resampling.NEAREST) for im in renders]
    assert models.outside_world(mini, images=renders + enlarged) is None
    assert models.outside_world(make_sd(), images=photos) is None  # a general model takes anything


def test_mini_model_names_prompt_words_it_never_read(tmp_path):
    scope = models.Scope("x", 32, frozenset(["a", "photo", "of"]))
    assert models.outside_words(scope, "a photo of t, (t:1.2) <t>", ["t", "<t>"]) == []  # "t" is not the t in "photo"
    assert models.outside_words(scope, "a photo of a dog AND a cat BREAK", ["t"]) == ["cat", "dog"]
    mini = models.load_pipeline()
    with pytest.warns(UserWarning, match="never read the words beach, dog"):
        generation.generate("a photo of a dog on the beach", pipe=mini, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generation.generate("a photo of a (red:1.2) star on a dark background", negative="blue", pipe=mini, steps=2)


def test_eval_on_the_mini_model_refuses_a_concept_its_judge_cannot_see(tmp_path):
    mini = models.load_pipeline()
    photos = [Image.open(picture(tmp_path / "p" / f"{i}.jpg", 640, 480)) for i in range(3)]
    with pytest.raises(TextinvError, match="not pictures of the mini world.*--model"):
        evaluate.choose_metric(mini, photos)
    assert evaluate.best_step([{"step": 10, "fidelity": 0.0, "editability": 0.0},
                               {"step": 20, "fidelity": 0.0, "editability": 0.3}]) is None


# ------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_buckets_learn_an_off_centre_subject_that_centre_crops_cut_off(tmp_path):
    """Five renders of the unnamed "drop", each at one end of a 2:1 picture.  Centre crops keep
    half a drop at an edge; buckets keep the whole picture.  Measured (seed 0, 100 steps, 32
    images): fidelity 0.91 with buckets, 0.41 with centre crops."""
    from textinv import tokens
    from textinv.demo import INIT_WORD, DemoSettings, render_training_set, world_templates

    wide = tmp_path / "wide"
    wide.mkdir()
    for i, p in enumerate(render_training_set("drop", tmp_path / "src", seed=0, position="center")):
        square = Image.open(p).convert("RGB")
        canvas = Image.new("RGB", (64, 32), square.getpixel((0, 0)))
        canvas.paste(square, (0 if i % 2 == 0 else 32, 0))
        canvas.save(wide / f"{i:02d}.png")
    pipe, s = models.load_pipeline(), DemoSettings()
    fidelity = {}
    for name, buckets in (("buckets", None), ("centre", False)):
        r = train(images=str(wide), token="<t>", init=INIT_WORD, lr=s.lr, batch=s.batch, steps=s.steps,
                  templates=str(world_templates(tmp_path, captions=False)), flip=False, seed=0, buckets=buckets,
                  out=str(tmp_path / name), pipe=pipe, progress=False)
        tokens.apply(pipe, r.embedding_path)
        fidelity[name] = evaluate.judge_scores(pipe, "<t>", "shape", "drop", n=32, probes=[evaluate.FIDELITY_PROBE])["fidelity"]
        tokens.remove(pipe)
    assert fidelity["buckets"] >= 0.8 and fidelity["centre"] <= fidelity["buckets"] - 0.3, fidelity
