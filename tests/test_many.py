"""textinv train-many: the manifest, bad rows, the same files as textinv train, resuming after a kill,
and whole concepts spread over two processes."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from textinv import many, runs, settings, stopping, training
from textinv.cli import main, train as train_command, train_many as train_many_command
from textinv.demo import render_training_set
from textinv.errors import TextinvError
from textinv.settings import TrainConfig

from conftest import one_thread, red_blocks, torchrun_train

MEASURING = {"pick_best", "patience", "eval_n", "concept", "clip", "dino"}  # train's own options: not settings
QUICK = {"model": "mini", "steps": 6, "batch": 2, "early_stop": False, "init": "shape"}
QUICK_FLAGS = ("--model", "mini", "--steps", "6", "--batch", "2", "--no-early-stop", "--init", "shape")


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def concepts(tmp_path: Path, names=("drop", "arrow")) -> list[dict]:
    """A manifest's rows: a mini-world shape each, five pictures."""
    for n in names:
        render_training_set(n, tmp_path / "images" / n)
    return [{"token": f"<{n}>", "images": str(tmp_path / "images" / n)} for n in names]


def summary_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_columns_are_field_names_or_flags_and_the_command_line_fills_the_rest(tmp_path):
    imgs = str(red_blocks(tmp_path / "imgs"))
    rows = [{"token": "<a>", "images": imgs, "--lr": "0.01", "grad-accum": "2", "flip": "no", "config": ""},
            {"token": "<b>", "images": imgs, "--lr": "", "grad-accum": "", "flip": "", "config": "", "out": str(tmp_path / "b")}]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"token": "<a>", "images": imgs, "lr": 0.01, "grad_accum": 2, "flip": False}) + "\n\n"
                     + json.dumps({"token": "<b>", "images": imgs, "lr": None, "out": str(tmp_path / "b")}) + "\n")
    for manifest in (write_csv(tmp_path / "m.csv", rows), jsonl):
        a, b = many.prepare(manifest, {"steps": 7, "lr": "0.002", "init": "shape"}, tmp_path / "all")
        assert (a.row, a.config.lr, a.config.grad_accum, a.config.flip, a.config.steps, a.config.init) == (1, "0.01", 2, False, 7, "shape")
        assert (b.row, b.config.lr, b.config.grad_accum, b.config.flip, b.config.model_config) == (2, "0.002", 1, True, None)
        assert a.config.out == str(tmp_path / "all" / "a") and b.config.out == str(tmp_path / "b"), manifest.suffix
        assert not (a.done or a.saved or a.config.resume)


def test_bad_rows_are_one_line_each_and_nothing_is_trained(tmp_path):
    imgs = str(red_blocks(tmp_path / "imgs"))
    rows = [{"token": "<a>", "images": imgs, "lr": "fast", "steps": "", "flip": ""},
            {"token": "", "images": imgs, "lr": "", "steps": "", "flip": ""},
            {"token": "<c>", "images": str(tmp_path / "none"), "lr": "", "steps": "", "flip": ""},
            {"token": "<d>", "images": imgs, "lr": "", "steps": "ten", "flip": ""},
            {"token": "<e>", "images": imgs, "lr": "", "steps": "", "flip": "maybe"},
            {"token": "<f>", "images": imgs, "lr": "", "steps": "", "flip": ""},
            {"token": "f", "images": imgs, "lr": "", "steps": "", "flip": ""}]  # the same folder: runs/f
    out = tmp_path / "runs"
    res = CliRunner().invoke(main, ["train-many", str(write_csv(tmp_path / "m.csv", rows)), "--out-dir", str(out),
                                    "--model", "mini"])
    assert res.exit_code == 2
    lines = res.stderr.splitlines()
    assert lines == [
        "manifest row 1 (token <a>): --lr 'fast': expected a number or a schedule like '0.005:100, 1e-3:1000, 1e-5'",
        "manifest row 2: --token: missing (every row gives its own)",
        f"manifest row 3 (token <c>): --images {tmp_path / 'none'}: not a folder",
        "manifest row 4 (token <d>): Steps: must be a whole number (--steps 'ten')",
        "manifest row 5 (token <e>): Flip: must be true or false (--flip 'maybe')",
        f"manifest row 7 (token f): out {out / 'f'}: row 6 trains there too; give one of them its own out",
        f"error: {tmp_path / 'm.csv'}: 6 problems in the manifest; nothing was trained"], res.stderr
    assert not out.exists()
    res = CliRunner().invoke(main, ["train-many", str(write_csv(tmp_path / "n.csv", [{"token": "<a>", "images": imgs,
                                                                                      "lrr": "1", "resume": "1"}]))])
    assert res.exit_code == 2 and res.stderr.splitlines()[:2] == [
        "manifest: column 'lrr': not a textinv train option (did you mean lr?)",
        "manifest: column 'resume': train-many decides it, from each run folder"], res.stderr


def test_concepts_train_as_separate_train_calls_bit_for_bit_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
    """Two concepts on one loaded pipeline give the files two separate runs give (the first
    concept's word is gone before the second's is added: training refuses a pipeline with another)."""
    rows = concepts(tmp_path)
    manifest = write_csv(tmp_path / "m.csv", rows)
    res = CliRunner().invoke(main, ["train-many", str(manifest), "--out-dir", str(tmp_path / "many"), *QUICK_FLAGS,
                                    "--preview-every", "6"])
    assert res.exit_code == 0, res.output
    for row in rows:
        alone = training.train(TrainConfig(**row, **QUICK, out=str(tmp_path / "alone" / row["token"].strip("<>")),
                                           preview_every=6, progress=False))
        here = runs.final(tmp_path / "many" / row["token"].strip("<>"))
        assert here.read_bytes() == alone.embedding_path.read_bytes(), row["token"]
        assert sorted(p.name for p in here.parent.iterdir()) == sorted(p.name for p in alone.out.iterdir())
        assert runs.preview_file(here.parent, 6).read_bytes() == runs.preview_file(alone.out, 6).read_bytes()
    table = summary_rows(tmp_path / "many" / "m-summary.csv")
    assert [(r["row"], r["token"], r["steps"], r["stop"], r["note"]) for r in table] == [
        ("1", "<drop>", "6", "all steps", "trained"), ("2", "<arrow>", "6", "all steps", "trained")]
    again = CliRunner().invoke(main, ["train-many", str(manifest), "--out-dir", str(tmp_path / "many"), *QUICK_FLAGS,
                                      "--preview-every", "6"])
    assert again.exit_code == 0 and "loading" not in again.stderr, again.output
    assert [r["note"] for r in summary_rows(tmp_path / "many" / "m-summary.csv")] == ["done before"] * 2
    rerun = summary_rows(tmp_path / "many" / "m-summary.csv")
    assert [{k: v for k, v in r.items() if k != "note"} for r in rerun] == [{k: v for k, v in r.items() if k != "note"}
                                                                           for r in table]
    longer = many.prepare(manifest, dict(QUICK, steps=8), tmp_path / "many")
    assert [(c.saved, c.done, c.config.resume) for c in longer] == [(6, False, True)] * 2  # --steps raised: goes on
    monkeypatch.setattr(stopping, "should_stop", lambda curve, rule=None: (True, 0.0))  # as if it had stopped early
    stopped = many.prepare(manifest, dict(QUICK, steps=8, early_stop=True), tmp_path / "many")
    assert [(c.saved, c.done) for c in stopped] == [(6, True)] * 2
    with pytest.raises(many.ManifestError) as refused:
        many.prepare(manifest, dict(QUICK, batch=3), tmp_path / "many")
    assert refused.value.problems[0].endswith("holds a run started with batch=2, this row has batch=3; give the row "
                                              "another out, or remove that folder")


def test_train_many_takes_train_options_as_every_rows_defaults_but_not_each_rows_own():
    train_opts = {p.name for p in train_command.params}
    many_opts = {p.name for p in train_many_command.params}
    assert many_opts - train_opts == {"manifest", "out_dir", "pack"}  # --pack: how many train at once (test_pack.py)
    assert train_opts - many_opts == {"images", "token", "out", "resume", *MEASURING}
    assert {f.name for f in settings.column_fields()} == {f.name for f in settings.cli_fields()} - {"resume"}


def test_a_concept_that_fails_is_a_line_of_the_summary_and_the_next_one_trains(tmp_path):
    rows = concepts(tmp_path, ("drop",))
    rows.insert(0, {"token": "shape", "images": rows[0]["images"]})  # a word the model has: found once it is loaded
    manifest = write_csv(tmp_path / "m.csv", rows)
    res = CliRunner().invoke(main, ["train-many", str(manifest), "--out-dir", str(tmp_path / "many"), *QUICK_FLAGS])
    assert res.exit_code == 2 and res.stderr.splitlines()[-1] == ("error: 1 of 2 concepts failed (their notes above); "
                                                                  "the same command retries them"), res.output
    table = summary_rows(tmp_path / "many" / "m-summary.csv")
    assert [(r["token"], r["stop"], r["steps"]) for r in table] == [("shape", "failed", ""), ("<drop>", "all steps", "6")]
    assert "already a word in this model's vocabulary" in table[0]["note"]
    assert not (tmp_path / "many" / "shape").exists()  # a run that failed before its first step leaves nothing


def test_trained_seconds_add_up_the_attempts():
    records = [{"step": 1, "seconds": 0.5}, {"step": 2, "seconds": 1.0}, {"step": 3, "seconds": 0.25},
               {"step": 4, "seconds": 0.75}]
    assert many.trained_seconds(records) == 1.75


def test_a_manifest_is_csv_or_json_lines(tmp_path):
    (tmp_path / "m.txt").write_text("token,images\n")
    with pytest.raises(TextinvError, match=r"\.csv file .* or \.jsonl"):
        many.prepare(tmp_path / "m.txt")
    (tmp_path / "m.jsonl").write_text('{"token": "<a>"\n[1, 2]\n')
    with pytest.raises(many.ManifestError) as bad:
        many.prepare(tmp_path / "m.jsonl")
    assert [p.split(":")[0] for p in bad.value.problems] == ["manifest row 1", "manifest row 2"]


def train_many_process(manifest: Path, out: Path, *flags) -> subprocess.Popen:
    """``textinv train-many MANIFEST --out-dir OUT FLAGS`` started as a command, one thread, offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "textinv", "train-many", str(manifest), "--out-dir", str(out), *flags]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def killed_after(manifest: Path, out: Path, flags: tuple, concept: str, steps: int) -> None:
    """train-many killed (SIGKILL) once ``concept``'s log holds ``steps`` steps; fails if it ended first."""
    victim, log = train_many_process(manifest, out, *flags), runs.log_file(out / concept)
    deadline = time.time() + 300
    while victim.poll() is None and time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= steps):
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "train-many ended before the kill"


@pytest.mark.long
def test_killed_and_run_again_it_trains_nothing_twice_and_ends_with_the_same_files(tmp_path):
    rows = concepts(tmp_path, ("drop", "arrow", "tee"))
    manifest = write_csv(tmp_path / "m.csv", rows)
    flags = ("--model", "mini", "--steps", "30", "--batch", "1", "--save-every", "5", "--no-early-stop")
    ref = train_many_process(manifest, tmp_path / "ref", *flags)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    killed_after(manifest, tmp_path / "run", flags, "arrow", 12)  # the second concept: its last save is step 10's
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "drop").rglob("*")}
    again = train_many_process(manifest, tmp_path / "run", *flags)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "drop").rglob("*")} == first  # not touched
    table, ref_table = summary_rows(tmp_path / "run" / "m-summary.csv"), summary_rows(tmp_path / "ref" / "m-summary.csv")
    assert [r["note"] for r in table] == ["done before", "resumed from step 10", "trained"]
    same = lambda t: [(r["token"], r["steps"], r["stop"], r["loss"]) for r in t]  # noqa: E731
    assert same(table) == same(ref_table)
    for name in ("drop", "arrow", "tee"):
        assert runs.final(tmp_path / "run" / name).read_bytes() == runs.final(tmp_path / "ref" / name).read_bytes(), name
        steps = [r["step"] for r in runs.log_records(tmp_path / "run" / name)]
        assert steps == list(range(1, 31)), name


@pytest.mark.long
def test_two_processes_train_whole_concepts_round_robin_and_gather_the_summary(tmp_path):
    rows = concepts(tmp_path, ("drop", "arrow", "tee"))
    manifest = write_csv(tmp_path / "m.csv", rows)
    res = torchrun_train(str(manifest), "--out-dir", str(tmp_path / "two"), *QUICK_FLAGS, command="train-many")
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    out, err = res.stdout.decode(), res.stderr.decode()
    assert out.count("wrote ") == 1 and out.count("<arrow>") == 1  # the main process reports, once
    assert "[process 1] row 2: <arrow>" in err and "[process 0] row 3: <tee>" in err and "[process 1] row 3" not in err
    with one_thread():  # as each launched process
        one = many.train_many(manifest, QUICK, tmp_path / "one")
    assert [o.note for o in one.outcomes] == ["trained"] * 3
    for name in ("drop", "arrow", "tee"):
        assert runs.final(tmp_path / "two" / name).read_bytes() == runs.final(tmp_path / "one" / name).read_bytes(), name
    same = lambda t: [(r["token"], r["steps"], r["stop"], r["loss"], r["note"]) for r in t]  # noqa: E731
    assert same(summary_rows(tmp_path / "two" / "m-summary.csv")) == same(summary_rows(tmp_path / "one" / "m-summary.csv"))
