"""The web UI's actions without a browser: textinv.ui.App on the mini model, and train(on_step=...)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textinv import formats
from textinv.errors import TextinvError
from textinv.formats import Embedding

from conftest import malicious_pt
from test_eval import tiny_clip  # noqa: F401  (a fixture)

pytest.importorskip("gradio", reason="the web UI needs gradio (pip install -e '.[test]')")

from textinv import ui  # noqa: E402

MINI_WIDTH = 64


def mini_emb(name: str, n: int = 1, seed: int = 0) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    return Embedding(name, {"clip": torch.randn(n, MINI_WIDTH, generator=g) * 0.3}, {"step": 7})


@pytest.fixture
def app(tmp_path):
    return ui.App(tmp_path / "library", None, workdir=tmp_path / "work")


def add_card_and_blob(app, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    card = formats.save(mini_emb("card-shape", 2), folder / "card.png", "png")
    plain = formats.save(mini_emb("blob"), folder / "blob.pt")
    added, refused = app.add_files([card, plain])
    assert not refused, refused
    return added


def pictures(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        a = np.full((32, 32, 3), 230, np.uint8)
        a[8:24, 4 + 2 * i : 20 + 2 * i] = (200, 30, 30)
        Image.fromarray(a).save(folder / f"{i}.png")
        out.append(folder / f"{i}.png")
    return out


def test_check_images_names_each_bad_file(tmp_path, app):
    good = pictures(tmp_path)
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "notes.txt").write_text("hello")
    ok, bad = app.check_images(good + [tmp_path / "notes.png", tmp_path / "notes.txt"])
    assert ok == good
    assert len(bad) == 2 and bad[0].startswith("notes.png: not a readable image") and bad[1].startswith("notes.txt: not an image file")


def test_training_input_errors_are_messages(tmp_path, app):
    with pytest.raises(TextinvError, match="no usable training images: x.png"):
        (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
        app.start_training([tmp_path / "x.png"], token="<t>")
    with pytest.raises(TextinvError, match="Token"):
        app.start_training(pictures(tmp_path / "a"), token=" ")
    with pytest.raises(TextinvError, match="not a folder"):
        app.start_training(None, str(tmp_path / "missing"), token="<t>")
    with pytest.raises(TextinvError, match="--lr"):
        app.start_training(pictures(tmp_path / "b"), token="<t>", lr="fast")
    with pytest.raises(TextinvError, match="nothing to download yet"):
        ui.App(tmp_path / "lib", workdir=tmp_path / "w").export("a1111")


def test_add_files_refuses_malicious_wrong_family_and_junk_and_adds_cards(tmp_path, app):
    marker = tmp_path / "PWNED"
    malicious_pt(tmp_path / "evil.pt", marker)
    sd15 = formats.save(Embedding("sd15", {"clip": torch.randn(2, 768)}), tmp_path / "sd15.pt")
    (tmp_path / "readme.txt").write_text("hi")
    photo = pictures(tmp_path / "p", 1)[0]
    card = formats.save(mini_emb("card-shape", 2), tmp_path / "card.png", "png")
    plain = formats.save(mini_emb("blob"), tmp_path / "blob.pt")
    added, refused = app.add_files([tmp_path / "evil.pt", sd15, tmp_path / "readme.txt", photo, card, plain])
    assert not marker.exists()
    assert refused[0].startswith("refused evil.pt: ") and "never allowed" in refused[0]
    assert refused[1].startswith("refused sd15.pt: ") and "768-wide: made for SD 1.x" in refused[1]
    assert refused[2].startswith("refused readme.txt: not an embedding file")
    assert refused[3].startswith("refused 0.png")
    assert len(refused) == 4
    assert added == ["added card.png: card-shape (the textinv mini model, 2 vectors)",
                     "added blob.pt: blob (the textinv mini model, 1 vectors)"]
    again, refused = app.add_files([plain])
    assert not again and "already has a file of that name" in refused[0]


def test_library_table_inspect_convert_scale_merge_delete(app, tmp_path):
    add_card_and_blob(app, tmp_path / "files")
    rows, problems = app.rows()
    table = {r[0]: r for r in rows}
    assert {"card-shape", "blob"} <= set(table) and not problems
    trig, family, vectors, steps, short, near, file = table["card-shape"]
    assert (family, vectors, steps, file) == ("the textinv mini model", 2, "7", "card.png")
    assert len(short) == 12 and near.startswith("v0: ") and "; v1: " in near
    keys = {e.name: k for k, e in app.entries().items()}
    details = app.inspect(keys["blob"])
    assert "trigger: blob" in details and "short_hash: " in details and "nearest words (mini): v0: " in details
    for fmt, detected in {"diffusers": "diffusers", "a1111": "a1111", "kohya": "kohya", "png": "png-card"}.items():
        out = app.convert(keys["blob"], fmt)
        assert formats.load(out).name == "blob" and formats.detect_format(out) == detected
    with pytest.raises(TextinvError, match="format 'sdxl' needs an SDXL embedding"):
        app.convert(keys["blob"], "sdxl")
    scaled = app.scale(keys["blob"], "0.5", "blob-half")
    assert torch.allclose(formats.load(scaled).vectors["clip"], app.entries()[keys["blob"]].vectors["clip"].float() * 0.5)
    with pytest.raises(TextinvError, match="already has an embedding of that name"):
        app.scale(keys["blob"], 2, "blob-half")
    with pytest.raises(TextinvError, match="Factor"):
        app.scale(keys["blob"], "big", "blob-big")
    with pytest.raises(TextinvError, match="equal vector counts"):
        app.merge([keys["blob"], keys["card-shape"]], name="mix")
    merged = app.merge([keys["blob"], keys["card-shape"]], concat=True, name="stack")
    assert formats.load(merged).num_vectors == 3
    message = app.delete(keys["blob"])
    assert "moved to" in message and not (app.library / "blob.pt").exists()
    assert list((app.library / ".trash").glob("*-blob.pt"))
    assert "blob" not in {e.name for e in app.entries().values()}
    with pytest.raises(TextinvError, match="no longer in the library"):
        app.inspect(keys["blob"])


def test_generate_uses_the_library_and_writes_parameters(app, tmp_path):
    from textinv import pngmeta

    add_card_and_blob(app, tmp_path / "files")
    with pytest.raises(TextinvError, match="Prompt"):
        app.generate("  ")
    result, notes = app.generate("a card-shape", n=2, steps=4, seed=3)
    assert result.used == ["card-shape"] and len(result.files) == 2 and not notes
    prompt, _, params = pngmeta.parse_parameters(pngmeta.read_parameters(result.files[0]))
    assert prompt == "a card-shape" and params["Seed"] == "3" and "card-shape" in params["TI hashes"]
    key = next(k for k, e in app.entries().items() if e.name == "card-shape")
    picked, _ = app.generate("a card-shape", picked=[key], n=1, steps=2, sampler="Euler a")
    assert picked.used == ["card-shape"] and "Sampler: Euler a" in picked.parameters[0]
    with pytest.raises(TextinvError, match="no longer in the library"):
        app.generate("a card-shape", picked=["gone  (gone.pt)"], n=1, steps=2)


def test_training_thread_stops_on_request_and_adds_the_embedding_to_the_library(tmp_path, app):
    import time

    job = app.start_training(pictures(tmp_path / "imgs"), token="<stop-me>", init="shape", steps=5000, preview_every=0)
    with pytest.raises(TextinvError, match="a training run .* is going"):
        app.start_training(pictures(tmp_path / "more"), token="<other>")
    deadline = time.time() + 120
    while not job.losses and job.running and time.time() < deadline:
        time.sleep(0.2)
    assert "Stopping <stop-me>" in app.stop_training()
    job.thread.join(120)
    assert job.error is None and not job.running
    assert 1 <= job.result.steps < 5000 and job.status().startswith(f"Stopped at step {job.result.steps}/5000")
    assert job.library_path == app.library / "stop-me.safetensors"
    assert formats.load(job.library_path).meta["step"] == job.result.steps
    assert app.export("png").name == "stop-me.png" and app.stop_training() == "No training run is going."


def test_train_on_step_stops_with_the_final_embedding_at_that_step(tmp_path):
    from conftest import make_sd

    from textinv.training import train

    seen = []

    def on_step(step, loss):
        seen.append((step, loss))
        return step == 3

    pictures(tmp_path / "imgs")
    result = train(images=str(tmp_path / "imgs"), token="<stopme>", steps=10, batch=1, out=str(tmp_path / "run"),
                   progress=False, pipe=make_sd(), on_step=on_step)
    assert [s for s, _ in seen] == [1, 2, 3] and all(np.isfinite(l) for _, l in seen)
    assert result.steps == 3 and formats.load(result.embedding_path).meta["step"] == 3


def test_cli_ui_command_is_registered():
    from click.testing import CliRunner

    from textinv.cli import main

    out = CliRunner().invoke(main, ["ui", "--help"])
    assert out.exit_code == 0
    for option in ("--library", "--model", "--workdir", "--port", "--max-upload-mb"):
        assert option in out.output


def test_generate_with_clip_skip_writes_it_and_bad_values_are_messages(tmp_path):
    from textinv.ui import App

    app = App(tmp_path / "lib", workdir=tmp_path / "work")
    result, _ = app.generate("a red ball", n=1, steps=2, clip_skip=2)
    assert "Clip skip: 2" in result.parameters[0]
    with pytest.raises(TextinvError, match="--clip-skip 99"):
        app.generate("a red ball", n=1, steps=2, clip_skip=99)
    with pytest.raises(TextinvError, match="Clip skip: at least 1"):
        app.start_training(folder=str(tmp_path), token="<x>", clip_skip=-1)


def test_the_page_hears_the_runs_summary_and_the_mini_models_limits_while_it_runs(tmp_path, app):
    import time

    photo = tmp_path / "photos" / "cat.jpg"
    photo.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(photo)
    job = app.start_training([photo], token="<cat>", steps=5000, preview_every=0)
    deadline = time.time() + 120
    while not job.losses and job.running and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert any("not pictures of its world" in w and "--model" in w for w in job.warnings)  # before the run ends
        assert "buckets" in job.summary and "\n" + job.summary in job.status()
    finally:
        app.stop_training()
        job.thread.join(120)


def test_the_train_form_suggests_what_the_model_can_learn_and_stop_works_only_while_a_run_goes(tmp_path, app):
    import threading

    import gradio as gr

    demo = ui.build(app)
    boxes = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    # the built-in model draws shapes, not cats: its settings file says what to learn on it
    assert (boxes["token"].placeholder, boxes["init"].placeholder) == ("<my-shape>", "shape")
    real = ui.App(tmp_path / "lib2", str(tmp_path / "a-real-model"), workdir=tmp_path / "work2").form_examples()
    assert (real["token"], real["init"]) == ("<my-cat>", "cat (default '*')")  # a general model: the generic ones
    stop = boxes["stop"]
    assert stop.interactive is False  # nothing runs
    on_load = [f for f in demo.fns.values() if f.outputs == [stop]]
    assert len(on_load) == 1 and on_load[0].fn() == gr.update(interactive=False)  # a reloaded page, nothing running
    release = threading.Event()  # a training run in progress, without its minutes of work
    job = ui.TrainJob("<t>", tmp_path / "run", 10, thread=threading.Thread(target=release.wait, daemon=True))
    job.thread.start()
    app.job = job
    try:
        assert on_load[0].fn() == gr.update(interactive=True)  # a reloaded page can stop the run
        follow = ui._follow(gr, ui._Page(gr, app), job)
        assert next(follow)[-1] == gr.update(interactive=True)  # while it runs
    finally:
        release.set()
        job.thread.join(10)
    assert list(follow)[-1][-1] == gr.update(interactive=False)  # once it has ended


# ------------------------------------------------------------------------------------ bias
def test_bias_input_errors_are_one_line_messages(tmp_path, app):
    emb = formats.save(mini_emb("ball"), tmp_path / "ball.pt")
    bad = {
        "Word: give the word": dict(word=" ", attribute="colour"),
        "--attribute 'gender': expected NAME=value1": dict(word="ball", attribute="gender"),
        "--attribute 'g=a,a'": dict(word="ball", attribute="g=a,a"),
        "Recipe 'mixed'": dict(word="ball", attribute="colour", recipe="mixed"),
        "at least 1": dict(word="ball", attribute="colour", n=0),
        "not both": dict(word="ball", attribute="colour", images_folder=str(tmp_path), embedding=str(emb)),
        "not a folder on this machine": dict(word="ball", attribute="colour", images_folder=str(tmp_path / "missing")),
        "no such file or folder": dict(word="ball", attribute="colour", embedding=str(tmp_path / "gone.pt")),
        "Tokens start from 'value': only per-value tokens learned from a curated folder": dict(word="ball", attribute="colour", init="value"),
        "Tokens start from 'red'": dict(word="ball", attribute="colour", images_folder=str(tmp_path), recipe="replace", init="red"),
    }
    for message, kw in bad.items():
        with pytest.raises(TextinvError, match=message) as e:
            app.start_bias(**kw)
        assert "\n" not in str(e.value)
    assert app.bias is None and not list(app.runs.iterdir())  # nothing started, no run folder left behind


def test_the_bias_form_hands_its_start_and_named_choice_to_the_run(tmp_path, app, monkeypatch):
    from textinv import bias

    runs = []
    monkeypatch.setattr(bias, "run_bias", lambda run, pipe=None, echo=None, stop=None: runs.append(run) or {})
    monkeypatch.setattr(app, "pipe", lambda: None)
    for init, named, expected in (("value", True, "value"), ("  ", False, "majority")):
        job = app.start_bias("ball", "colour", images_folder=str(tmp_path), init=init, named=named)
        job.thread.join(30)
        assert (runs[-1].init, runs[-1].named, runs[-1].images) == (expected, named, str(tmp_path))


def test_bias_and_training_refuse_each_other_and_a_bias_run_holds_the_model(tmp_path, app):
    import threading

    job = app.start_training(pictures(tmp_path / "imgs"), token="<busy>", steps=5000, preview_every=0)
    try:
        with pytest.raises(TextinvError, match=r"a training run \(<busy>\) is going"):
            app.start_bias("ball", "colour")
    finally:
        app.stop_training()
        job.thread.join(120)
    release = threading.Event()  # a bias run in progress, without its minutes of work
    app.bias = ui.BiasJob("ball", "colour", tmp_path, thread=threading.Thread(target=release.wait, daemon=True))
    app.bias.thread.start()
    try:
        with pytest.raises(TextinvError, match=r"a bias run \(ball\) is going"):
            app.start_training(pictures(tmp_path / "more"), token="<other>")
        with pytest.raises(TextinvError, match=r"a bias run \(ball\) is going"):
            app.start_bias("ball", "colour")
        with pytest.raises(TextinvError, match="the model is busy measuring the bias of 'ball'"):
            app.generate("a ball", n=1, steps=2)
        assert app.bias.status().startswith("Measuring the colour of 'ball'")
    finally:
        release.set()
        app.bias.thread.join(10)


def test_a_bias_run_in_the_app_writes_json_chart_and_report(tmp_path, app, tiny_clip, monkeypatch):  # noqa: F811
    import json

    from conftest import make_sd

    from textinv import metrics, tokens

    monkeypatch.setattr(metrics, "DEFAULT_CLIP", str(tiny_clip))  # a real model's zero-shot classifier, tiny and offline
    app._pipe = make_sd()
    emb = formats.save(Embedding("x", {"clip": torch.randn(1, 32)}), tmp_path / "x.safetensors")
    job = app.start_bias("doctor", "gender=man,woman", embedding=str(emb), prompts_text="a portrait of a {}\n\n", n=2, named=True)
    job.thread.join(120)
    assert job.error is None and not job.running, job.status()
    assert job.out.parent == app.runs and job.out.name.endswith("-bias-doctor")
    saved = json.loads((job.out / "bias.json").read_text())
    assert saved["prompts"]["held-out"] == ["a portrait of a doctor"] and saved["n"] == 2
    assert set(job.paths()) == {"json", "chart", "report"}
    status = job.status()
    assert status.startswith("Done in ") and "bias.json, bias.png, report.html" in status and "KL" in status
    assert "held-out: KL " in job.table() and "gender of 'doctor'" in job.table()
    assert saved["named"]["held-out"]["prompts"][0]["n"] == 2 and "held-out, asked by name: KL" in job.table()  # the checkbox
    assert not tokens.state(app._pipe).names  # the pipeline is clean for Generate
    failed = app.start_bias("doctor", "gender=man,woman", embedding=str(emb), prompts_text="a photo of a {}", n=2)
    failed.thread.join(120)
    assert failed.status().startswith("Bias run failed: --prompts: 'a photo of a doctor' is also a training prompt")
    assert failed.result is None and not failed.paths() and failed.out != job.out  # a run folder each, even within a second


# ------------------------------------------------------------------------------------ the CLI's options in the page
# The only textinv bias options the page has no control for, and why; textinv train's are the settings'
# own Setting.form_why_not (the app's model, every run in its own folder, …).
BIAS_APP_OWNS = {
    "model": "the app's model (textinv ui --model)",
    "model_config": "the app's model (textinv ui --config)",
    "out": "every bias run gets its own folder, WORKDIR/runs/DATE-bias-WORD",
}


def _control_id(param, prefix: str = "") -> str:
    """The page's element for a CLI option: its long name (--clip-skip: #clip-skip; -n: #n), after ``prefix``."""
    import click

    if isinstance(param, click.Argument):
        return prefix + param.name
    long = [o for o in param.opts if o.startswith("--")]
    return prefix + (long[0][2:] if long else param.opts[0].lstrip("-"))


def _page_ids(app) -> set:
    return {getattr(b, "elem_id", None) for b in ui.build(app).blocks.values()} - {None}


def test_every_train_and_bias_option_has_a_control_in_the_page(app):
    from textinv import settings
    from textinv.cli import OFF, bias as bias_command, train as train_command

    ids = _page_ids(app)
    declared = {f.name: settings.spec(f) for f in settings.fields()}
    missing, owned = [], []
    for p in train_command.params:
        s = declared.get(p.name.removesuffix(OFF))
        if s is not None and s.form_why_not:
            owned.append(p.name)  # the setting says why the form has no box for it
        elif _control_id(p) not in ids:
            missing.append(f"textinv train {p.opts[0]}: no #{_control_id(p)}")
    for p in bias_command.params:
        if p.name not in BIAS_APP_OWNS and _control_id(p, "bias-") not in ids:
            missing.append(f"textinv bias {p.opts[0]}: no #{_control_id(p, 'bias-')}")
    assert not missing, missing
    assert len(owned) <= 8, owned  # a short list: what the app itself owns (model, folders, the format it keeps)
    assert {"pick_best", "patience", "eval_n", "concept", "clip", "dino", "resume"} - set(owned) <= \
        {p.name for p in train_command.params}


def test_the_form_groups_every_setting_and_a_new_one_appears_with_no_ui_code(tmp_path, monkeypatch):
    import dataclasses

    from textinv import settings

    for f in settings.form_fields() + list(settings.measure_fields()):
        assert settings.spec(f).group in settings.GROUPS, f"{f.name}: in one of the form's groups"

    @dataclasses.dataclass
    class Extended(settings.TrainConfig):  # a setting added to TrainConfig, and nothing else
        sharpness: int = settings._setting(2, label="Sharpness", help="A new setting.", identity=False, low=0,
                                           form=settings.MORE, group=settings.DATA)

    monkeypatch.setattr(settings, "TrainConfig", Extended)
    settings._hints.cache_clear()
    try:
        app = ui.App(tmp_path / "lib", workdir=tmp_path / "work")
        demo = ui.build(app)
        boxes = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        assert boxes["sharpness"].label == "Sharpness" and boxes["sharpness"].value == 2
        cfg, _ = app._form_config({"token": "<t>", "sharpness": 5.0})
        assert cfg.sharpness == 5
        with pytest.raises(TextinvError, match=r"^Sharpness: at least 0 \(--sharpness -1\)$"):
            settings.check(app._form_config({"token": "<t>", "sharpness": -1})[0])
    finally:
        monkeypatch.undo()
        settings._hints.cache_clear()


def test_the_measured_saves_reach_the_run_and_bad_ones_are_one_line(tmp_path, app, monkeypatch):
    from textinv import evaluate

    with pytest.raises(TextinvError, match=r"^Patience: at least 1 \(--patience 0\)$"):
        app.start_training(folder=str(tmp_path), token="<t>", patience="0")
    seen = []

    def measured(cfg, **kw):
        seen.append((cfg, kw))
        raise TextinvError("measured")  # the run's settings are what this test is about

    monkeypatch.setattr(evaluate, "train_measured", measured)
    clip_app = ui.App(tmp_path / "lib2", workdir=tmp_path / "work2", clip="/weights/clip")
    job = clip_app.start_training(pictures(tmp_path / "imgs"), token="<m>", steps=50, pick_best=True, eval_n="3", dino="d")
    job.thread.join(30)
    cfg, kw = seen[0]
    assert cfg.save_every == 5 and "Save every 5 steps" in job.status()  # as textinv train: saves to measure
    assert (kw["keep_best"], kw["n"], kw["clip"], kw["dino"], kw["patience"]) == (True, 3, "/weights/clip", "d", None)
    assert kw["on_step"] == job.on_step  # the Stop button reaches a measured run too


# ------------------------------------------------------------------------------------ the live view, stop and resume
def test_the_live_plot_holds_the_evaluation_curve_and_the_status_says_why_a_run_stopped(tmp_path, app):
    import json
    import time
    from types import SimpleNamespace

    import gradio as gr

    from textinv import settings

    out = tmp_path / "run"
    out.mkdir()
    log = [{"step": s, "loss": 0.5 / s} | ({"eval_loss": 0.3 / s} if s % 5 == 0 else {}) for s in range(1, 21)]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    cfg = settings.TrainConfig(images="", token="<t>", steps=500)
    job = ui.TrainJob("<t>", out, 500, cfg=cfg)
    frame = ui._Page(gr, app).loss_frame(job)
    assert len(frame[frame.curve == ui.LOSS]) == 20 and list(frame[frame.curve == ui.EVAL].step) == [5, 10, 15, 20]
    job.first = (1, time.time() - 10)
    job.losses = [(1, 0.5), (11, 0.1)]
    assert job.eta() == ", about 8 min left at most (early stopping may end it sooner)"  # 1 s a step, 489 to go
    why = "stopped at step 60 of 500: the evaluation loss has flattened (…); --no-early-stop trains all 500 steps"
    job.result = SimpleNamespace(steps=60, seconds=12.0, loss=0.1, embedding_path=out / "t.safetensors", stopped=why)
    assert job.status().startswith(f"Learned: {why}.\nSaved at step 60/500")


def test_resume_goes_on_from_the_stopped_step_bit_for_bit(tmp_path, app):
    import dataclasses

    from textinv import training

    with pytest.raises(TextinvError, match="nothing to resume: no training run was stopped"):
        app.resume_training()
    job = app.start_training(pictures(tmp_path / "imgs"), token="<res>", init="shape", steps=4, batch=1, eval_every=2,
                             preview_every=0)
    job.stop_event.set()  # Stop, before the first step has ended: the run stops there
    job.thread.join(120)
    assert job.error is None and job.result.steps == 1
    assert job.status().startswith("Stopped at step 1/4") and "Resume goes on from step 1" in job.status()
    again = app.resume_training()
    with pytest.raises(TextinvError, match=r"^a training run \(<res>\) is going; stop it first$"):
        app.start_training(pictures(tmp_path / "more"), token="<other>")  # one line, not queued
    again.thread.join(120)
    assert again.error is None and again.out == job.out and again.result.steps == 4 and again.status().startswith("Done")
    losses, evals = again.curves()
    assert [s for s, _ in losses] == [1, 2, 3, 4] and [s for s, _ in evals] == [2, 4]  # the whole run, as logged
    straight = training.train(dataclasses.replace(job.cfg, out=str(tmp_path / "straight")))
    assert torch.equal(again.result.embedding.vectors["clip"], straight.embedding.vectors["clip"])
    with pytest.raises(TextinvError, match=r"nothing to resume: the last run \(<res>\) took all its steps"):
        app.resume_training()


def test_a_reloaded_page_or_a_second_browser_follows_the_apps_run(tmp_path, app):
    import threading

    import gradio as gr

    demo = ui.build(app)
    boxes = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    follow = next(f for f in demo.fns.values() if any(event == "load" for _, event in f.targets)
                  and boxes["loss-plot"] in f.outputs)
    assert list(follow.fn()) == [("", gr.skip(), gr.skip(), gr.skip(), gr.update(interactive=False))]  # nothing runs
    release = threading.Event()  # a run started by another page, without its minutes of work
    app.job = ui.TrainJob("<t>", tmp_path / "run", 10, thread=threading.Thread(target=release.wait, daemon=True))
    app.job.thread.start()
    page = follow.fn()
    try:
        first = next(page)
        assert first[0].startswith("Starting") and first[-1] == gr.update(interactive=True)  # live, and Stop works
    finally:
        release.set()
        app.job.thread.join(10)
    # every start is answered at once (the App refuses a second run in one line): none waits in a queue behind a run
    for elem in ("start", "train-resume", "bias-start"):
        starts = [f for f in demo.fns.values() if any(b is boxes[elem]._id for b, _ in f.targets)]
        assert starts and all(f.concurrency_limit is None for f in starts), elem


# ------------------------------------------------------------------------------------ bias: options, stop, report
def test_the_bias_form_hands_every_option_to_the_run_and_refuses_bad_ones(tmp_path, monkeypatch):
    from textinv import bias

    app = ui.App(tmp_path / "lib", workdir=tmp_path / "work", clip="/weights/clip")
    runs = []
    monkeypatch.setattr(bias, "run_bias", lambda run, pipe=None, echo=None, stop=None: runs.append(run) or {})
    monkeypatch.setattr(app, "pipe", lambda: None)
    job = app.start_bias("ball", "colour", templates="style", timesteps="300:1000", guidance="1.5", vectors=2.0)
    job.thread.join(30)
    r = runs[-1]
    assert (r.templates, r.timesteps, r.guidance, r.vectors, r.clip) == ("style", "300:1000", 1.5, 2, "/weights/clip")
    job = app.start_bias("ball", "colour", clip=" ", guidance="", timesteps="", vectors=None)
    job.thread.join(30)
    assert (runs[-1].clip, runs[-1].guidance, runs[-1].timesteps, runs[-1].vectors) == ("/weights/clip", None, None, 1)
    for bad, message in ((dict(vectors=0), r"^Vectors: between 1 and 75"), (dict(guidance="0.5"), r"^Training guidance"),
                         (dict(timesteps="9:3"), r"^--timesteps '9:3'"), (dict(templates="nope"), r"^--templates nope")):
        with pytest.raises(TextinvError, match=message):
            app.start_bias("ball", "colour", **bad)


def test_a_stopped_bias_run_says_so_in_one_line_and_writes_no_half_report(tmp_path, app):
    from textinv import tokens

    assert app.stop_bias() == "No bias run is going."
    job = app.start_bias("ball", "colour", prompts_text="a {} on the left", n=1)
    assert "Stopping the bias run of 'ball'" in app.stop_bias()
    job.thread.join(120)
    head = job.status().splitlines()[0]
    assert head.startswith("Stopped after ") and "stopped on request after: before: colour of 'ball'" in head
    assert "no bias.json or report" in head and job.error is None and job.result is None and not job.paths()
    assert sorted(p.name for p in job.out.iterdir()) == ["held-out-prompts.txt"]  # nothing half-written
    assert not tokens.state(app.pipe()).names  # the model is clean for the next use


def test_a_finished_bias_run_shows_the_reports_table_in_the_page(tmp_path, app):
    import gradio as gr

    job = app.start_bias("ball", "colour", prompts_text="a {} on the left", n=1)
    job.thread.join(120)
    assert job.error is None, job.status()
    *_, last = list(ui._follow_bias(gr, ui._Page(gr, app), job))
    status, table, chart, files, per_prompt, stop = last
    assert status.startswith("Done in ") and "colour of 'ball'" in table and chart.endswith("bias.png")
    assert list(per_prompt.columns) == ui.BIAS_HEADERS and "a ball on the left" in set(per_prompt.prompt)
    assert stop == gr.update(interactive=False)


# ------------------------------------------------------------------------------------ library: export, families
def test_the_library_exports_any_format_with_a_card_picture_and_filters_by_family(tmp_path, app):

    add_card_and_blob(app, tmp_path / "files")
    sd15 = formats.save(Embedding("sd15", {"clip": torch.randn(2, 768)}), app.library / "sd15.pt")  # another family
    keys = {e.name: k for k, e in app.entries().items()}
    assert app.model_family() == "the textinv mini model"
    assert app.family_choices() == [ui.ALL_FAMILIES, ui.FITS_MODEL] + sorted({"the textinv mini model", "SD 1.x"})
    assert {r[0] for r in app.rows(ui.FITS_MODEL)[0]} == {"card-shape", "blob"}
    assert {r[0] for r in app.rows(formats.load(sd15).family)[0]} == {"sd15"}
    picture = tmp_path / "pic.png"
    Image.fromarray(np.full((40, 40, 3), (10, 200, 10), np.uint8)).save(picture)
    card = app.convert(keys["blob"], "png", preview=str(picture))
    with Image.open(card) as im:
        assert im.getpixel((im.width // 2, im.height // 2))[1] > 150  # the picture is the card's
    layered = Embedding("layered", {"clip": torch.randn(16, 1, MINI_WIDTH)}, {}, layers=list(formats.SD_LAYERS))
    for fmt in ("xti", "per-layer"):
        written = app._export(layered, fmt)
        assert formats.load(written).layers == list(formats.SD_LAYERS), fmt
    with pytest.raises(TextinvError, match="format 'pdf'"):
        app.convert(keys["blob"], "pdf")


def test_cli_ui_takes_clip_and_hands_it_to_the_tabs(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from textinv.cli import main

    seen = {}
    monkeypatch.setattr(ui, "launch", lambda *a, **kw: seen.update(kw))
    out = CliRunner().invoke(main, ["ui", "--clip", "/weights/clip", "--workdir", str(tmp_path)])
    assert out.exit_code == 0, out.output and seen["clip"] == "/weights/clip"
    app = ui.App(tmp_path / "lib", workdir=tmp_path / "w", clip="/weights/clip")
    assert app.form_defaults()["clip"] == "/weights/clip"  # the Train tab's measured saves
    boxes = {b.elem_id: b for b in ui.build(app).blocks.values() if getattr(b, "elem_id", None)}
    assert boxes["bias-clip"].value == boxes["clip"].value == "/weights/clip"
