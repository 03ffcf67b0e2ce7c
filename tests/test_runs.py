"""The training-run folder (textinv.runs): one module knows its layout; its state is read back as
written, safely; a library scan counts a run once, as its final embedding."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import textinv
from textinv import formats, runs
from textinv.errors import TextinvError

PACKAGE = Path(textinv.__file__).parent
# Model folders (the built-in model, the mini world's judge and base model) have a config.json of their own.
MODEL_FOLDER_CODE = {"models.py", "world/judge.py", "world/train_base.py", "world/flow_base.py"}


def _string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_no_module_but_runs_spells_the_run_folders_file_names():
    names = {runs.STATE_FILE, runs.LOG_FILE, runs.LOCK_FILE, runs.PROBE_FILE, runs.CONFIG_FILE}
    spelled = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "runs.py":
            continue
        found = _string_literals(path) & (names - {runs.CONFIG_FILE} if rel in MODEL_FOLDER_CODE else names)
        if found:
            spelled[rel] = sorted(found)
    assert spelled == {}


def _handmade_run(folder: Path, token: str = "<my.cat>") -> Path:
    runs.write_config(folder, {"token": token, "steps": 30, "format": "a1111"})
    for step in (10, 20):
        formats.save(formats.Embedding("x", {"clip": torch.randn(1, 32)}, meta={"step": step}),
                     runs.save_file(folder, token, step, formats.suffix_for("a1111")))
    formats.save(formats.Embedding("x", {"clip": torch.randn(1, 32)}, meta={"step": 30}),
                 runs.final_file(folder, token, formats.suffix_for("a1111")))
    return folder


def test_saves_are_named_and_listed_by_step_and_a_library_counts_the_run_once(tmp_path):
    run = _handmade_run(tmp_path / "lib" / "cat")
    assert runs.save_file(run, "<my.cat>", 10, ".pt") == run / "embeddings" / "my.cat-10.pt"
    assert runs.final(run) == run / "my.cat.pt" and runs.folder_of(run) == run
    cfg, saves = runs.saves(run)
    assert cfg.token == "<my.cat>" and [(s, p.name) for s, p in saves] == [(10, "my.cat-10.pt"), (20, "my.cat-20.pt"),
                                                                               (30, "my.cat.pt")]
    assert runs.in_library(run) == [run / "my.cat.pt"] and runs.in_library(run.parent) is None
    assert [e.path for e in textinv.load_all(run.parent)] == [run / "my.cat.pt"]
    # the file layer alone knows no runs: it reads every save
    assert len(formats.load_all(run.parent)) == 3


def test_the_configured_formats_final_wins_over_another_format_left_in_the_folder(tmp_path):
    run = _handmade_run(tmp_path / "cat")
    formats.save(formats.Embedding("x", {"clip": torch.randn(1, 32)}), run / "my.cat.safetensors")  # newer
    assert runs.final(run) == run / "my.cat.pt"
    runs.write_config(run, {"token": "<my.cat>", "steps": 30})  # the default format: diffusers
    assert runs.final(run) == run / "my.cat.safetensors"


def test_a_state_is_read_back_as_written_and_a_foreign_one_is_one_line(tmp_path):
    params = [torch.nn.Parameter(torch.randn(2, 8))]
    optimizer = torch.optim.AdamW(params)
    params[0].grad = torch.ones(2, 8)
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert not runs.has_state(tmp_path)
    runs.write_state(tmp_path, step=7, params=params, optimizer=optimizer, scaler=scaler, identity={"seed": "0"},
                     curve=[(0, 1.5), (5, 1.25)])
    assert runs.has_state(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporaries
    st = runs.read_state(tmp_path)
    assert st["step"] == 7 and st["identity"] == {"seed": "0"} and torch.equal(st["params"][0], params[0].detach())
    assert st["eval_curve"].tolist() == [[0.0, 1.5], [5.0, 1.25]]
    assert st["optimizer"]["state"][0]["exp_avg"].shape == (2, 8)

    torch.save({"unrelated": torch.ones(3)}, runs.state_file(tmp_path))
    with pytest.raises(TextinvError, match="not a textinv training state") as err:
        runs.read_state(tmp_path)
    assert "\n" not in str(err.value)
    runs.state_file(tmp_path).write_bytes(b"\x00" * 10)
    with pytest.raises(TextinvError, match="cannot resume from this state file"):
        runs.read_state(tmp_path)


def test_the_log_is_trimmed_to_a_resumed_step_and_gives_the_recent_losses(tmp_path):
    for step in range(1, 6):
        runs.append_log(tmp_path, {"step": step, "loss": step / 10})
    with open(runs.log_file(tmp_path), "a") as f:
        f.write('{"step": 6, "lo')  # cut short by a kill
    runs.trim_log(tmp_path, 4)
    assert [json.loads(line)["step"] for line in runs.log_file(tmp_path).read_text().splitlines()] == [1, 2, 3, 4]
    assert runs.recent_losses(tmp_path, 4, 3) == [0.2, 0.3, 0.4]
    assert runs.recent_losses(tmp_path, 0, 3) == []  # a fresh run starts a new window


def test_an_existing_run_is_resumed_or_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    runs.prepare(out, resume=False)
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe is gone
    runs.state_file(out).write_bytes(b"x")
    runs.prepare(out, resume=True)
    with pytest.raises(TextinvError, match="already holds a training run; pass --resume"):
        runs.prepare(out, resume=False)
