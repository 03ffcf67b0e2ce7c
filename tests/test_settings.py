"""Every training setting is declared once (textinv.settings): every face derives from the table.

These fail when a TrainConfig field is added without saying how the CLI, the web form and a
resumed run treat it, when the CLI and the web UI word a bad value differently, or when a setting's
name is spelled as a string somewhere (a list of names nothing checks against the dataclass).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from textinv import settings
from textinv.app import App, form_value
from textinv.cli import OFF, main, train as train_command, train_many as train_many_command
from textinv.errors import TextinvError
from textinv.training import TrainConfig

FIELDS = dataclasses.fields(TrainConfig)
NAMES = {f.name for f in FIELDS}
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "textinv"
# The settings every state file has held (the first state format): any other identity setting
# needs the value that a state written before it existed implies (Setting.older).
FIRST_IDENTITY = {"images", "token", "model", "init", "vectors", "mode", "templates", "lr", "batch", "grad_accum",
                  "resolution", "crops", "flip", "seed", "precision", "weight_decay"}
MEASURING = {"pick_best", "patience", "eval_n", "concept", "clip", "dino"}  # train's own options: not settings


def test_every_field_declares_its_setting():
    for f in FIELDS:
        s = settings.spec(f)
        assert isinstance(s, settings.Setting) and s.label, f.name
        assert isinstance(s.identity, bool), f.name
        assert s.older is settings.ALWAYS or s.identity, f"{f.name}: an older-state value, but not in the identity"
        assert bool(s.form) != bool(s.form_why_not), f"{f.name}: on the web form (MAIN/MORE), or say why not"
        assert s.form in ("", settings.MAIN, settings.MORE), f.name
        assert bool(s.cli_why_not) or s.help or s.hint or f.name in {"mode", "seed"}, f"{f.name}: say what it does"
        if s.choices:
            assert settings.default_of(f) in s.choices, f.name
        if s.low is not None and settings.default_of(f) is not None:
            assert not settings._problem(f, settings.default_of(f)), f"{f.name}: its default breaks its own range"


def test_every_setting_is_a_train_option_or_says_why():
    options = {p.name: p for p in train_command.params}
    for f in FIELDS:
        s = settings.spec(f)
        if s.cli_why_not:
            assert f.name not in options, f.name
            continue
        opt = options[f.name]
        assert opt.opts[0] == settings.flag_of(f) and (opt.help or "") == s.help, f.name
        default = settings.default_of(f)
        assert opt.required == (default is dataclasses.MISSING), f.name
        if not opt.required and not (opt.is_flag and not opt.secondary_opts):  # a lone flag is off by default
            assert opt.default == default, f.name
    extra = set(options) - NAMES - MEASURING - {"help"}
    assert extra == {f.name + OFF for f in FIELDS if settings.spec(f).off}  # --no-latent-cache


def test_the_measured_saves_declared_for_the_form_are_trains_own_options():
    options = {p.name: p for p in train_command.params}
    assert {f.name for f in settings.measure_fields()} == MEASURING
    for f in settings.measure_fields():
        s, opt = settings.spec(f), options[f.name]
        assert opt.opts[0] == settings.flag_of(f) and opt.help == s.help, f.name
        if not opt.is_flag:  # a lone flag is off by default
            assert opt.default == settings.default_of(f), f.name
        assert s.form and s.group == settings.MEASURING, f.name


def test_the_flags_the_docs_use_are_train_options():
    commands = {"textinv train ": train_command, "textinv train-many ": train_many_command}
    opts = {name: {o for p in c.params for o in p.opts + p.secondary_opts} for name, c in commands.items()}
    used = {name: set() for name in commands}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text(encoding="utf-8").splitlines():
            for name in commands:
                if (line.lstrip() + " ").startswith(name):  # a command line in a code block
                    used[name] |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    used["textinv train "] |= set(re.findall(r"`(--[a-z][a-z0-9-]*)", (ROOT / "docs" / "training.md").read_text(encoding="utf-8")))
    for name in commands:
        assert used[name] <= opts[name], (name, sorted(used[name] - opts[name]))
    assert used["textinv train "] and used["textinv train-many "]


def test_the_identity_of_a_resumed_run_and_what_older_states_imply():
    cfg = TrainConfig(images="imgs", token="<t>")
    ident = settings.identity(cfg)
    assert set(ident) == {f.name for f in FIELDS if settings.spec(f).identity}
    assert {"steps", "out", "resume", "save_every", "early_stop", "progress"}.isdisjoint(ident)  # a resume may change these
    older = settings.older_identity()
    assert set(ident) - FIRST_IDENTITY <= set(older), "a new identity setting needs Setting.older"
    # a state file from the first version, of a run with today's defaults, resumes with today's defaults
    first = {k: v for k, v in ident.items() if k in FIRST_IDENTITY}
    assert {k: first.get(k, older.get(k)) for k in ident} == ident
    assert settings.identity(dataclasses.replace(cfg, lr_schedule="cosine"))["lr_schedule"] == "cosine"


def test_the_form_values_become_settings():
    fields = {f.name: f for f in FIELDS}
    assert form_value(fields["steps"], 20.0) == 20 and isinstance(form_value(fields["steps"], 20.0), int)
    assert form_value(fields["steps"], None) == 500 and form_value(fields["init"], "  ") is None
    assert form_value(fields["guidance"], 2) == 2.0 and form_value(fields["lr"], " 1e-3 ") == "1e-3"
    assert [form_value(fields["buckets"], w) for w in ("auto", "on", "off")] == [None, True, False]
    assert form_value(fields["preview_prompts"], "a <t>\n\n b <t> ") == ["a <t>", "b <t>"]
    assert form_value(fields["steps"], 2.5) == 2.5  # kept, for the check to name
    with pytest.raises(TextinvError, match=r"^Steps: must be a whole number \(--steps 2.5\)$"):
        settings.check(TrainConfig(images="", token="<t>", steps=2.5))


def test_the_form_offers_every_setting_it_declares(tmp_path):
    pytest.importorskip("gradio", reason="the web UI needs gradio")
    from textinv import ui

    app = App(tmp_path / "lib", workdir=tmp_path / "work")
    demo = ui.build(app)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    shown = {f.name for f in FIELDS if settings.spec(f).form}
    assert {n.replace("_", "-") for n in shown} <= ids
    assert {"token", "init", "vectors", "steps", "mode", "lr", "batch", "seed", "clip-skip", "preview-every"} <= ids
    # A number whose default is None (resolution: the model's own) is a text box: a browser posts an
    # empty Number box as 0, which is out of range; an empty text box is the default.
    optional = {f.name for f in FIELDS if settings.spec(f).form and settings.kind_of(f) in ((int, True), (float, True))}
    assert optional == {"resolution"}
    boxes = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert all(type(boxes[n.replace("_", "-")]).__name__ == "Textbox" for n in optional)
    assert form_value(next(f for f in FIELDS if f.name == "resolution"), boxes["resolution"].value) is None


@pytest.mark.parametrize("bad", [
    dict(steps=-5), dict(vectors=0), dict(lr="0.1:ten"), dict(timesteps="1000:300"), dict(timesteps="300"),
    dict(mode="nope"), dict(crops=0), dict(caption_dropout=1.5), dict(seed=-1), dict(guidance=0.5),
    dict(lr_schedule="fast"), dict(clip_skip=-1), dict(precision="fp8"), dict(lr_warmup=600), dict(eval_batch=0),
    dict(token=" "), dict(per_layer=True, compile=True), dict(encoders="clip_l,vae"), dict(lr_t5="fast"),
])
def test_the_cli_and_the_web_ui_say_the_same_about_a_bad_value(tmp_path, bad):
    args = []
    for name, value in bad.items():
        f = next(f for f in FIELDS if f.name == name)
        args += [settings.flag_of(f)] if value is True else [settings.flag_of(f), str(value)]
    res = CliRunner().invoke(main, ["train", "--images", str(tmp_path), "--out", str(tmp_path / "run"),
                                    *(["--token", "<t>"] if "token" not in bad else []), *args])
    with pytest.raises(TextinvError) as ui_error:
        App(tmp_path / "lib", workdir=tmp_path / "work").start_training(folder=str(tmp_path), **{"token": "<t>", **bad})
    assert res.exit_code == 2 and res.output.strip().splitlines() == [f"error: {ui_error.value}"], res.output
    assert not (tmp_path / "run").exists() and not list((tmp_path / "work" / "runs").iterdir())  # refused before any file


# ------------------------------------------------------------------------------ names as strings
# Where a TrainConfig field's name may still be a string: another vocabulary that shares the word.
OTHER_VOCABULARIES = {
    "app.py": ({"images", "steps", "vectors"}, "the run's images/ folder; the library table's columns"),
    "bias.py": ({"images", "seed", "init", "token"}, "the images/ folder; bias.json's keys; a phase's label"),
    "cli.py": ({"format", "vectors", "steps", "model_config"},
               "inspect's and list's rows (an embedding's description); the other commands' --config parameter"),
    "demo.py": ({"images", "token", "init", "seed"}, "the images/ folder and the judge's results; demo.json's keys"),
    "evaluate.py": ({"images", "model", "seed", "guidance", "clip_skip", "init"}, "the evaluation's own keys (eval.json)"),
    "flowmatch.py": ({"mode"}, "the SD3 paper's timestep density named as diffusers' scripts name it"),
    "formats.py": ({"token", "format", "clip_skip"}, "embedding files' own metadata keys"),
    "latents.py": ({"format"}, "the latent cache's file metadata"),
    "many.py": ({"token", "steps", "out"}, "train-many's summary: its columns"),
    "library.py": ({"format", "vectors", "token", "steps"}, "an embedding's description"),
    "models.py": ({"guidance"}, "a model's sampling defaults file"),
    "report.py": ({"images", "model", "guidance", "seed", "init"}, "eval.json's keys"),
    "sources.py": ({"model"}, "the hub's repo type"),
    "tokens.py": ({"token"}, "diffusers' embedding metadata key"),
    "training.py": ({"lr", "mode", "clip_skip"}, "the optimizer's param-group key and log.jsonl's; the embedding's metadata"),
    "ui.py": ({"steps", "vectors"}, "the library table's columns"),
}
OTHER_PACKAGES = {"world": "the mini world's own model training and judging, with settings of their own"}


def _strings(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES:
            yield node.value, node.lineno


def test_no_setting_name_is_spelled_as_a_string_outside_settings():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.as_posix() == "settings.py" or rel.parts[0] in OTHER_PACKAGES:
            continue
        allowed = OTHER_VOCABULARIES.get(rel.as_posix(), (set(), ""))[0]
        found += [f"textinv/{rel}:{line}: {name!r}" for name, line in _strings(path) if name not in allowed]
    assert not found, "refer to settings through textinv.settings (fields, attributes, keywords):\n" + "\n".join(found)


def test_the_scan_sees_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('keep = ("images", "lr_schedule")\nok = cfg.lr_schedule\nalso_ok = dict(lr_schedule=1)\n')
    assert [name for name, _ in _strings(bad)] == ["images", "lr_schedule"]


def test_a_runs_record_reads_back_as_its_settings():
    cfg = TrainConfig(images="imgs", token="<t>", steps=20, lr="1e-3", per_layer=True)
    record = json.loads(json.dumps(dataclasses.asdict(cfg)))  # config.json as training writes it
    assert settings.recorded(record) == cfg
    assert settings.recorded({**record, "from_a_newer_version": 1}) == cfg  # unknown keys are left out
    partial = {key: record[key] for key in ("token", "steps")}
    assert settings.recorded(partial) == TrainConfig(images="", token="<t>", steps=20)
    for not_a_run in ([], {"steps": 20}, {**record, "token": ""}, {**record, "token": 5}, {"token": "<t>"}):
        assert settings.recorded(not_a_run) is None
