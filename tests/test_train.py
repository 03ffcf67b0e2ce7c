"""Training on tiny random pipelines: options, resume bit-exactness, faults and bad input.

Learning itself (did the embedding capture the concept?) is tested on the mini model in
test_learning.py; here the model is random and only the machinery is checked.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textinv import formats, runs, tokens, training
from textinv.data import filewords, fill_template, load_images, load_templates
from textinv.errors import TextinvError
from textinv.interrupts import Interrupted
from textinv.training import TrainingDiverged, init_vectors, lr_at, parse_lr, parse_timesteps, train

from conftest import make_sd, make_sdxl, torchrun_train


def shapes(folder: Path, n: int = 3, size=(40, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((*size, 3), 230, np.uint8)
        a[8:30, 6 + 4 * i : 28 + 4 * i] = (200, 30, 30)
        Image.fromarray(a).save(folder / f"{i:03d}-a red block.png")
    return folder


def test_lr_schedule_string_as_a1111():
    s = parse_lr("0.005:100, 1e-3:1000, 1e-5")
    assert [lr_at(s, k) for k in (0, 99, 100, 999, 1000, 10**6)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert lr_at(parse_lr("0.01"), 5000) == 0.01
    for bad in ("fast", "0.1:ten", "-1", ""):
        with pytest.raises(TextinvError, match="--lr"):
            parse_lr(bad)


def test_timesteps_range_is_parsed_checked_and_used(tmp_path):
    assert parse_timesteps("all", 1000) == (0, 1000) and parse_timesteps("300:1000", 1000) == (300, 1000)
    assert parse_timesteps(":500", 1000) == (0, 500) and parse_timesteps("700:", 1000) == (700, 1000)
    for bad in ("300", "1000:300", "0:2000", "a:b", "-5:10", "500:500"):
        with pytest.raises(TextinvError, match="--timesteps"):
            parse_timesteps(bad, 1000)
    pipe = make_sd()
    seen = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda sample, t, *a, **k: seen.append(t.clone()) or forward(sample, t, *a, **k)
    train(images=str(shapes(tmp_path / "imgs")), token="<t>", steps=5, batch=4, timesteps="990:1000",
          out=str(tmp_path / "run"), pipe=pipe, progress=False)
    t = torch.cat(seen)
    # 5 steps × batch 4, and the early-stopping evaluation batch (8) at steps 0 and 5: all in the range
    assert len(t) == 20 + 2 * 8 and t.min() >= 990 and t.max() < 1000


@pytest.mark.parametrize("make", [make_sd, make_sdxl])
def test_guidance_fits_the_guided_prediction_with_a_frozen_empty_prompt_branch(tmp_path, make):
    pipe = make()
    calls = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda sample, t, hidden, *a, **k: calls.append((hidden.requires_grad, torch.is_grad_enabled())) or forward(sample, t, hidden, *a, **k)
    images = str(shapes(tmp_path / "imgs"))
    kw = dict(steps=3, batch=2, pipe=pipe, progress=False, early_stop=False)  # only the training steps' calls
    plain = train(images=images, token="<t>", out=str(tmp_path / "plain"), **kw)
    assert len(calls) == 3
    calls.clear()
    cfg = train(images=images, token="<t>", guidance=4.0, out=str(tmp_path / "cfg"), **kw)
    # per step: the trigger's branch (with gradient) and the empty prompt's (no gradient, one extra forward)
    assert calls == [(True, True), (False, False)] * 3
    a, b = formats.load(plain.embedding_path), formats.load(cfg.embedding_path)
    assert all(torch.isfinite(v).all() for v in b.vectors.values())
    assert any(not torch.allclose(a.vectors[k], b.vectors[k]) for k in a.vectors)  # a different objective, other vectors
    for bad in (0.5, float("nan")):
        with pytest.raises(TextinvError, match="--guidance"):
            train(images=images, token="<t>", steps=1, guidance=bad, out=str(tmp_path / "bad"), pipe=pipe, progress=False)


def test_multi_token_init_spreads_over_vectors_like_a1111(sd_pipe):
    table = sd_pipe.text_encoder.get_input_embeddings().weight
    ids = sd_pipe.tokenizer("red star", add_special_tokens=False).input_ids
    v = init_vectors(sd_pipe.tokenizer, table, "red star", 4)  # indices 0,0,1,1
    assert torch.equal(v, table[[ids[0], ids[0], ids[1], ids[1]]])
    assert torch.equal(init_vectors(sd_pipe.tokenizer, table, "", 2), torch.zeros(2, table.shape[1]))


def test_templates_and_filewords(tmp_path):
    assert fill_template("a photo of a [name], [filewords]", "<t>", "red block") == "a photo of a <t>, red block"
    assert fill_template("{} in the style of [filewords]", "<t>", "") == "<t> in the style of"
    assert fill_template("a photo of [filewords]", "<t>", "a red [name] on the left") == "a photo of a red <t> on the left"
    (tmp_path / "00012-a red block.png").write_bytes(b"")
    (tmp_path / "7-blue_ring.png").write_bytes(b"")
    (tmp_path / "7-blue_ring.txt").write_text("  a  ring,\n blue ")
    assert filewords(tmp_path / "00012-a red block.png") == "a red block"
    assert filewords(tmp_path / "7-blue_ring.png") == "a ring, blue"
    f = tmp_path / "t.txt"
    f.write_text("# mine\n[name] on a table\n\n")
    assert load_templates(f) == ["[name] on a table"]
    f.write_text("no placeholder\n")
    with pytest.raises(TextinvError, match="no template contains"):
        load_templates(f)


def test_run_writes_embedding_intermediates_previews_log_and_config(tmp_path):
    imgs = shapes(tmp_path / "imgs")
    (imgs / "000-a red block.txt").write_text("a crimson block")
    res = train(images=str(imgs), token="<blk>", init="square", vectors=2, steps=6, batch=2, save_every=3,
                preview_every=6, out=str(tmp_path / "run"), pipe=make_sd(), progress=False)
    out = tmp_path / "run"
    assert res.embedding_path == out / "blk.safetensors"
    emb = formats.load(res.embedding_path)
    assert emb.num_vectors == 2 and emb.meta["step"] == 6 and emb.meta["init_text"] == "square"
    assert formats.load(out / "embeddings" / "blk-3.safetensors").meta["step"] == 3
    assert (out / "previews" / "000006.png").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and all({"loss", "lr", "seconds"} <= set(r) for r in log)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["token"] == "<blk>" and cfg["resolution"] == 16 and cfg["views"] == 6  # 3 images × (crop + mirror)
    # the vectors moved away from their init, and only they did
    pipe = make_sd()
    table = pipe.text_encoder.get_input_embeddings().weight
    assert not torch.equal(emb.vectors["clip"], init_vectors(pipe.tokenizer, table, "square", 2))


def test_existing_word_needs_replace_mode_and_replace_learns_it(tmp_path):
    imgs = shapes(tmp_path / "imgs")
    with pytest.raises(TextinvError, match="already a word"):
        train(images=str(imgs), token="ball", steps=1, out=str(tmp_path / "a"), pipe=make_sd(), progress=False)
    res = train(images=str(imgs), token="ball", mode="replace", steps=3, batch=2, out=str(tmp_path / "b"),
                pipe=make_sd(), progress=False)
    assert res.embedding.name == "ball" and res.embedding.meta["init_text"] == "ball"
    pipe = make_sd()
    before = pipe.encode_prompt("a red ball", "cpu", 1, False)[0]
    tokens.apply(pipe, res.embedding_path)
    after = pipe.encode_prompt("a red ball", "cpu", 1, False)[0]
    assert not torch.allclose(before, after)


def test_unwritable_output_fails_before_training(tmp_path):
    imgs = shapes(tmp_path / "imgs")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TextinvError, match="--out"):
        train(images=str(imgs), token="<x>", steps=1, out=str(blocker / "run"), pipe=make_sd(), progress=False)


def test_divergence_stops_with_clear_message_and_keeps_last_good_save(tmp_path):
    imgs = shapes(tmp_path / "imgs")
    with pytest.raises(TrainingDiverged) as err:
        train(images=str(imgs), token="<x>", steps=20, lr="1e30", batch=2, save_every=1, out=str(tmp_path / "run"),
              pipe=make_sd(), progress=False)
    msg = str(err.value)
    assert "NaN" in msg or "inf" in msg
    saved = sorted((tmp_path / "run" / "embeddings").glob("*.safetensors"))
    assert saved and str(saved[-1].name) in msg
    assert formats.load(saved[-1]).vectors["clip"].isfinite().all()
    assert not (tmp_path / "run" / "x.safetensors").exists()


def _bad_image_corpus(folder: Path) -> dict[str, str]:
    folder.mkdir()
    base = Image.new("RGB", (40, 24), (200, 30, 30))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    buf = io.BytesIO()
    base.save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((24, 40), 40000, np.uint16)).save(folder / "sixteen.png")
    pal = base.convert("P")
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    frames = [base, Image.new("RGB", (40, 24), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    base.save(folder / "rotated.jpg", exif=exif)
    (folder / "notes.md").write_text("not an image")
    return {"corrupt.png": "skipped", "truncated.jpg": "skipped", "dot.png": "skipped"}


def test_bad_images_are_converted_or_skipped_with_named_warnings(tmp_path):
    skipped = _bad_image_corpus(tmp_path / "imgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = load_images(tmp_path / "imgs")
    messages = " | ".join(str(w.message) for w in caught)
    for name in skipped:
        assert name in messages
    assert "anim.gif" in messages  # first frame used, with a warning
    names = sorted(i.path.name for i in items)
    assert names == ["anim.gif", "cmyk.jpg", "palette.png", "rotated.jpg", "sixteen.png"]
    assert all(i.image.mode == "RGB" for i in items)
    rotated = next(i for i in items if i.path.name == "rotated.jpg")
    assert rotated.image.size == (24, 40)  # EXIF orientation applied
    sixteen = next(i for i in items if i.path.name == "sixteen.png")
    assert sixteen.image.getpixel((0, 0))[0] == round(40000 / 65535 * 255)
    for name in ("corrupt.png", "truncated.jpg", "dot.png"):
        (tmp_path / "only").mkdir(exist_ok=True)
        (tmp_path / "only" / name).write_bytes((tmp_path / "imgs" / name).read_bytes())
    with pytest.raises(TextinvError, match="none usable"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_images(tmp_path / "only")


def test_sdxl_trains_clip_l_and_clip_g_together(tmp_path):
    imgs = shapes(tmp_path / "imgs")
    res = train(images=str(imgs), token="<xl>", init="square", vectors=2, steps=3, batch=2, format="sdxl",
                out=str(tmp_path / "run"), pipe=make_sdxl(), progress=False)
    emb = formats.load(res.embedding_path)
    assert emb.is_sdxl and emb.widths == {"clip_l": 32, "clip_g": 48} and emb.num_vectors == 2
    pipe = make_sdxl()
    tokens.apply(pipe, emb)
    assert "<|ti:xl:1|>" in tokens.expand(pipe, "a photo of <xl>")


RESUME_SETTINGS = ("--steps", "30", "--batch", "2", "--save-every", "3", "--lr", "0.02:8, 5e-3")
QUICK_SETTINGS = ("--steps", "30", "--batch", "1")  # on the built-in model: a second of training


def _cli_train(model, imgs: Path, out: Path, *extra, settings=RESUME_SETTINGS) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "textinv", "train", "--model", str(model), "--images", str(imgs), "--token", "<r>",
           *settings, "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _signal_after_step(proc: subprocess.Popen, out: Path, step: int, sig: int) -> None:
    """Send ``sig`` to a training ``proc`` once its log holds ``step`` steps (none if it ends first)."""
    log = runs.log_file(out)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= step:
            proc.send_signal(sig)
            return
        time.sleep(0.005)


@pytest.mark.long
def test_resume_after_sigkill_gives_the_same_embedding_bit_for_bit(tmp_path):
    model = tmp_path / "model"
    make_sd().save_pretrained(model)
    imgs = shapes(tmp_path / "imgs")
    ref = _cli_train(model, imgs, tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    kill_after = 8  # between the saves at steps 6 and 9: the resumed run replays steps 7 and 8
    victim = _cli_train(model, imgs, tmp_path / "run")
    _signal_after_step(victim, tmp_path / "run", kill_after, signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"run finished before the kill at step {kill_after}"
    assert not (tmp_path / "run" / "r.safetensors").exists()
    resumed = _cli_train(model, imgs, tmp_path / "run", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    a = (tmp_path / "ref" / "r.safetensors").read_bytes()
    b = (tmp_path / "run" / "r.safetensors").read_bytes()
    assert a == b, f"killed after step {kill_after}: resumed embedding differs"
    again = _cli_train(model, imgs, tmp_path / "run")  # without --resume: refuses to overwrite the run
    assert again.wait(timeout=120) == 2 and b"--resume" in again.stderr.read()


@pytest.mark.long
def test_ctrl_c_and_sigterm_save_the_last_step_and_resume_ends_bit_for_bit(tmp_path):
    """Ctrl-C, or a SIGTERM (here: of the resumed run), loses no work: the run saves its last
    completed step as a save point does, says which in one line and exits 128 + N; --resume then
    ends exactly where a run that nothing stopped ends (trained beside it, on the built-in model)."""
    if signal.SIG_IGN in (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)):
        pytest.skip("signals are ignored here, and so in the runs this test would start")
    imgs = shapes(tmp_path / "imgs")
    ref = _cli_train("mini", imgs, tmp_path / "ref", settings=QUICK_SETTINGS)
    out, step = tmp_path / "run", 0
    for sig, resume in ((signal.SIGINT, ()), (signal.SIGTERM, ("--resume",))):
        victim = _cli_train("mini", imgs, out, *resume, settings=QUICK_SETTINGS)
        _signal_after_step(victim, out, step + 3, sig)
        err = victim.communicate(timeout=120)[1].decode()
        assert victim.returncode == 128 + sig, f"{sig.name}: ended before it came, after step {step + 3}? {err[-2000:]}"
        said = re.fullmatch(r"error: interrupted at step (\d+) of 30: saved; --resume continues", err.splitlines()[-1])
        assert said and step + 3 <= int(said[1]) < 30, err[-2000:]
        step = int(said[1])
        assert runs.read_state(out)["step"] == step
        assert [json.loads(line)["step"] for line in runs.log_file(out).read_text().splitlines()] == list(range(1, step + 1))
        assert formats.load(runs.save_file(out, "<r>", step, ".safetensors")).meta["step"] == step
        assert runs.final(out) is None  # not finished: a save, not a final embedding
    resumed = _cli_train("mini", imgs, out, "--resume", settings=QUICK_SETTINGS)
    for run in (ref, resumed):
        assert run.wait(timeout=300) == 0, run.stderr.read().decode()[-2000:]
    assert runs.final(out).read_bytes() == runs.final(tmp_path / "ref").read_bytes(), f"interrupted at step {step}: differs"


def _interrupt(monkeypatch, target, name: str, when):
    """Wrap ``target.name`` so that before its call number ``when`` (from 1) it is interrupted: ``when``
    maps the call number to an action (None: none)."""
    real, calls = getattr(target, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        act = when(calls[0])
        if act is not None:
            act()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)


def _ctrl_c():
    signal.raise_signal(signal.SIGINT)


def _keyboard_interrupt():
    raise KeyboardInterrupt


def test_an_interrupted_step_is_not_saved_half_done_and_a_second_ctrl_c_waits_for_the_save(tmp_path, monkeypatch):
    """Interrupted in a step's gradients, the run keeps the step before; a Ctrl-C during the update
    waits for it (the step counts); one during the interruption's save waits for the save; resuming
    after both ends exactly where the unbroken run ends."""
    before = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or before is signal.SIG_IGN:
        pytest.skip("Ctrl-C does not reach this test's thread")
    imgs = shapes(tmp_path / "imgs")
    kw = dict(images=str(imgs), token="<x>", steps=6, batch=2, lr="0.02", progress=False)
    ref = train(out=str(tmp_path / "ref"), save_every=1, pipe=make_sd(), **kw)
    out = tmp_path / "run"
    with monkeypatch.context() as m:  # in step 3's gradients: steps 1-2 are done
        _interrupt(m, training._Batches, "loss", lambda n: _keyboard_interrupt if n == 3 else None)
        with pytest.raises(Interrupted, match=r"^interrupted at step 2 of 6: saved; --resume continues$"):
            train(out=str(out), pipe=make_sd(), **kw)
    assert runs.read_state(out)["step"] == 2
    with monkeypatch.context() as m:  # in step 5's update, then again while that is saved
        _interrupt(m, torch.optim.AdamW, "step", lambda n: _ctrl_c if n == 3 else None)
        _interrupt(m, runs, "write_state", lambda n: _ctrl_c)
        with pytest.raises(Interrupted, match=r"^interrupted at step 5 of 6: saved; --resume continues$") as e:
            train(out=str(out), resume=True, pipe=make_sd(), **kw)
    assert e.value.exit_code == 130 and runs.read_state(out)["step"] == 5
    for step in (2, 5):
        saved = formats.load(runs.save_file(out, "<x>", step, ".safetensors")).vectors["clip"]
        assert torch.equal(saved, formats.load(runs.save_file(tmp_path / "ref", "<x>", step, ".safetensors")).vectors["clip"])
    assert [json.loads(line)["step"] for line in runs.log_file(out).read_text().splitlines()] == [1, 2, 3, 4, 5]
    res = train(out=str(out), resume=True, pipe=make_sd(), **kw)
    assert torch.equal(res.embedding.vectors["clip"], ref.embedding.vectors["clip"])
    assert signal.getsignal(signal.SIGINT) is before  # the process's own handler is back


@pytest.mark.long
def test_two_processes_train_data_parallel_and_write_once(tmp_path):
    """What `accelerate launch` / torchrun does on several GPUs, here with two CPU processes (gloo)."""
    model = tmp_path / "model"
    make_sd().save_pretrained(model)
    imgs = shapes(tmp_path / "imgs")
    res = torchrun_train("--model", str(model), "--images", str(imgs), "--token", "<d>", "--steps", "4", "--batch", "2",
                         "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert res.stdout.decode().count("wrote ") == 1  # only the main process reports and writes
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 4
    assert formats.load(tmp_path / "run" / "d.safetensors").num_vectors == 1


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_pretokenized_prompts_encode_exactly_like_encode_prompt(kind):
    from textinv.training import PromptTable

    pipe = make_sd(32) if kind == "sd" else make_sdxl(32, 48)
    emb = formats.Embedding("<t>", {"clip": torch.randn(2, 32)} if kind == "sd"
                            else {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)})
    tokens.apply(pipe, emb)
    templates, captions = ["a photo of a [name]", "[name], [filewords]"], ["red block", "blue", "red block"]
    table = PromptTable(pipe, templates, "<t>", captions)
    which, views = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0, 1, 1])
    hidden, pooled = table.encode(which, views, "cpu")
    prompts = [fill_template(templates[int(t)], "<t>", captions[int(v)]) for t, v in zip(which, views)]
    if kind == "sd":
        want = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        assert pooled is None
    else:
        want, _, want_pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
        assert torch.equal(pooled, want_pooled)
    assert torch.equal(hidden, want)
