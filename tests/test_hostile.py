"""Hostile input and faults: no crash, no traceback, nothing lost — from any file, image, option or disk.

Crash-prone cases (forged pickles) run in a subprocess, so a crash fails a test instead of the run.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from textinv import atomic, data, formats, training
from textinv.cli import main
from textinv.errors import TextinvError
from textinv.formats import Embedding
from textinv.interrupts import Interrupted
from textinv.runs import RunLock
from textinv.training import train

import hostile
from conftest import Touch, make_sd, malicious_pt

TESTS = Path(__file__).parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(TESTS.parent), OMP_NUM_THREADS="1")


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=TESTS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    expect = hostile.build(folder)
    marker = folder.parent / "pwned"
    malicious_pt(folder / "runs-code.pt", marker)  # a payload that would create `marker`
    expect["runs-code.pt"] = ["never allowed"]
    hostile.flow_pt(folder / "flow-runs-code.pt", Touch("system", marker))  # the same beside SD3/Flux.1 parts
    hostile.flow_pt(folder / "flow-runs-code-legacy.pt", Touch("exec", marker), key="t5_out", zipped=False)
    expect["flow-runs-code.pt"] = expect["flow-runs-code-legacy.pt"] = ["never allowed"]
    return folder, expect, marker


def test_every_hostile_file_gives_its_one_line_outcome_and_nothing_runs(corpus):
    folder, expect, marker = corpus
    res = run_python(f"""
        import json, sys
        from click.testing import CliRunner
        from textinv.cli import main
        out = {{}}
        for name in {sorted(expect)!r}:
            r = CliRunner().invoke(main, ["inspect", {str(folder)!r} + "/" + name])
            out[name] = [r.exit_code, r.output, repr(r.exception) if r.exit_code not in (0, 2) else None]
        print(json.dumps(out))
    """)
    assert res.returncode == 0, f"the reading process died ({res.returncode}): {res.stderr[-2000:]}"
    results = json.loads(res.stdout.strip().splitlines()[-1])
    for name, words in expect.items():
        code, output, exc = results[name]
        assert "Traceback" not in output and exc is None, (name, output, exc)
        assert "\x1b" not in output, (name, output)  # no terminal escape reaches the screen
        if words is None:
            assert code == 0, (name, output)
            continue
        lines = output.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, output)
        for w in words:
            assert w in lines[0], (name, w, lines[0])
    assert not marker.exists()
    card = results["escape-name.png"][1]
    assert "\\x1b[2J\\x1b[31mevil\\nerror: forged line" in card and "\nerror: forged" not in card


def test_list_of_a_folder_of_all_of_them_completes_and_reports_each_bad_file(corpus):
    folder, expect, marker = corpus
    res = subprocess.run([sys.executable, "-m", "textinv", "list", str(folder)], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "\x1b" not in res.stdout + res.stderr
    loads = sum(words is None for words in expect.values())  # one embedding each
    assert "good" in res.stdout and "\\x1b[2J" in res.stdout and res.stdout.strip().endswith(f"{loads} embeddings")
    skipped = [line for line in res.stderr.splitlines() if line.startswith("warning: skipped ")]
    bad = [n for n, words in expect.items() if words is not None and n != "folder.pt"]  # a folder is searched, not read
    for name in bad:
        shown = formats.printable(name)
        assert any(f"{shown}: " in line for line in skipped), (name, skipped)
    assert len(skipped) == len(bad) and not marker.exists()


def test_fuzzed_files_and_pickle_streams_never_escape_as_anything_but_our_error():
    """Hypothesis, in a subprocess (TEXTINV_FUZZ=long for a longer run; the CI profile is bounded)."""
    res = subprocess.run([sys.executable, str(TESTS / "fuzz_formats.py")], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"fuzzing failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert min(summary["examples"].values()) >= 100
    assert set(summary["outcomes"]) <= {"loaded", "refused"} and summary["outcomes"]["refused"] > 0


# ------------------------------------------------------------------------------- training images
def test_training_folder_names_every_file_it_skips_and_refuses_bombs(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "ok.png")
    Image.new("RGB", (32, 32), (30, 200, 30)).save(folder / "also.tiff")
    (folder / "ok.txt").write_text("a red block")  # a caption: no word about it
    (folder / "vector.svg").write_text("<svg/>")
    (folder / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (folder / "sub").mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    Image.new("1", (9000, 9000)).save(folder / "bomb.png")  # 81 megapixels: over the limit, never decoded
    (folder / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning) as caught:
        images = data.load_images(folder)
    said = [str(w.message) for w in caught]
    assert sorted(i.path.name for i in images) == ["also.tiff", "ok.png"]
    for name in ("vector.svg", "phone.heic", "sub/", "pipe.png", "zero.jpg", "bomb.png"):
        assert any(name in s for s in said), (name, said)
    assert not any("ok.txt" in s or ".DS_Store" in s for s in said)
    assert any("megapixel" in s for s in said)


def test_pillow_warnings_name_the_file(tmp_path, monkeypatch):
    path = tmp_path / "odd.png"
    Image.new("RGB", (16, 16)).save(path)
    real_open = Image.open

    def open_with_a_warning(*a, **k):
        import warnings

        warnings.warn("Corrupt EXIF data.  Expecting to read 4 bytes but only got 0.", UserWarning)
        return real_open(*a, **k)

    monkeypatch.setattr(Image, "open", open_with_a_warning)
    with pytest.warns(UserWarning, match=r"^odd.png: Corrupt EXIF"):
        data.open_image(path)


# ---------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("args, words", [
    (["train", "--resolution", "-8"], "--resolution"), (["train", "--resolution", "100000"], "--resolution"),
    (["train", "--seed", "-1"], "--seed"), (["train", "--save-every", "-1"], "--save-every"),
    (["train", "--preview-every", "-1"], "--preview-every"), (["train", "--guidance", "nan"], "--guidance"),
    (["generate", "a", "--guidance", "nan"], "--guidance"), (["generate", "a", "--guidance", "inf"], "--guidance"),
    (["generate", "a", "--seed", "-5"], "--seed"), (["eval", "x", "--guidance", "-1"], "--guidance"),
    (["train", "--crops", "0"], "--crops"), (["inspect"], "FILES"),
])
def test_bad_option_values_are_one_line_at_parse_time(args, words):
    if args[0] == "train":
        args = [*args, "--images", "x", "--token", "<t>"]
    res = CliRunner().invoke(main, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.output


def test_resolution_must_be_a_multiple_of_the_vae_factor(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (32, 32)).save(imgs / "a.png")
    with pytest.raises(TextinvError, match="multiple of 2"):
        train(images=str(imgs), token="<r>", steps=1, resolution=15, out=str(tmp_path / "run"), pipe=make_sd(), progress=False)
    for bad in (dict(seed=-1), dict(save_every=-1), dict(preview_every=-2), dict(resolution=7), dict(resolution=10**5)):
        with pytest.raises(TextinvError):
            train(images=str(imgs), token="<r>", steps=1, out=str(tmp_path / "r2"), pipe=make_sd(), progress=False, **bad)


# ------------------------------------------------------------------------------------------ disks
def _raise_on_write(code):
    def write(self, data):
        raise OSError(code, os.strerror(code))
    return write


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied")])
def test_full_or_read_only_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, code, words):
    src = formats.save(Embedding("x", {"clip": torch.ones(1, 8)}), tmp_path / "x.safetensors")
    monkeypatch.setattr(Path, "write_bytes", _raise_on_write(code))
    for dst in ("out.pt", "out.safetensors"):
        res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o" / dst)])
        assert res.exit_code == 2 and res.output.count("\n") == 1 and words in res.output, res.output
    monkeypatch.undo()
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o" / "card.png")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and words in res.output, res.output
    assert list((tmp_path / "o").iterdir()) == []  # no partial file, no temporary


def test_parent_is_a_file_and_destination_is_a_folder(tmp_path):
    src = formats.save(Embedding("x", {"clip": torch.ones(1, 8)}), tmp_path / "x.pt")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.pt").mkdir()
    for dst, words in ((tmp_path / "afile" / "y.pt", "is a file, not a folder"), (tmp_path / "adir.pt", "is a folder")):
        res = CliRunner().invoke(main, ["convert", str(src), str(dst)])
        assert res.exit_code == 2 and res.output.count("\n") == 1 and words in res.output, res.output
    with pytest.raises(TextinvError, match="is a folder"):
        atomic.write_bytes(tmp_path / "adir.pt", b"x")


def test_bomb_images_as_preview_and_from_png_are_one_line(tmp_path):
    Image.new("1", (14000, 14000)).save(tmp_path / "bomb.png")
    src = formats.save(Embedding("x", {"clip": torch.ones(1, 8)}), tmp_path / "x.pt")
    for args in (["convert", str(src), str(tmp_path / "c.png"), "--preview", str(tmp_path / "bomb.png")],
                 ["generate", "--from-png", str(tmp_path / "bomb.png")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and res.output.count("\n") == 1 and "bomb" in res.output, res.output


# ------------------------------------------------------------------------- run folders, resume, locks
def _imgs(tmp_path) -> str:
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (200, 30 * i, 30)).save(folder / f"{i}.png")
    return str(folder)


def test_a_run_folder_is_owned_by_one_process_and_a_killed_owner_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from textinv.runs import RunLock
        with RunLock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(120)
    """)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (False, True):
            with pytest.raises(TextinvError, match=rf"another textinv train \(pid {holder.pid}\) is using this folder"):
                train(images=_imgs(tmp_path), token="<l>", steps=1, out=str(out), resume=resume, pipe=make_sd(), progress=False)
    finally:
        holder.kill()
        holder.wait()
    res = train(images=_imgs(tmp_path), token="<l>", steps=1, out=str(out), pipe=make_sd(), progress=False)
    assert res.embedding_path.is_file()
    with RunLock(out):  # released when the run ended
        pass


def test_log_holds_each_step_once_after_resumes(tmp_path):
    out = tmp_path / "run"
    kw = dict(images=_imgs(tmp_path), token="<g>", batch=1, save_every=2, out=str(out), progress=False)
    train(steps=3, pipe=make_sd(), **kw)  # saves a resume point at step 2, ends at 3
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss"')  # a line cut short by a kill
    train(steps=6, resume=True, pipe=make_sd(), **kw)
    train(steps=8, resume=True, pipe=make_sd(), **kw)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_damaged_or_foreign_state_is_one_line(tmp_path):
    out = tmp_path / "run"
    kw = dict(images=_imgs(tmp_path), token="<s>", batch=1, out=str(out), progress=False)
    train(steps=2, pipe=make_sd(), **kw)
    state = out / "state.pt"
    good = state.read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "foreign": formats.torch_zip_bytes({"unrelated": torch.ones(3)}),
        "wrong shapes": None,
    }
    for what, content in cases.items():
        if content is None:  # a real state whose vectors do not fit this run
            state.write_bytes(good)
            st = torch.load(state, weights_only=True)
            st["params"] = [torch.zeros(5, 5)]
            torch.save(st, state)
        else:
            state.write_bytes(content)
        with pytest.raises(TextinvError) as err:
            train(steps=4, resume=True, pipe=make_sd(), **kw)
        assert "\n" not in str(err.value) and "state" in str(err.value), (what, str(err.value))


@pytest.mark.parametrize("args", [["--steps", "-5"], ["--images", "EMPTY"], ["--model", "nosuch/model"]],
                         ids=["bad-steps", "no-images", "no-model"])
def test_a_run_that_fails_before_its_first_step_leaves_no_folder_behind(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    given = {"--images": _imgs(tmp_path), "--token": "<gone>", "--steps": "2"} | dict(zip(args[::2], args[1::2]))
    res = CliRunner().invoke(main, ["train", *[x for pair in given.items() for x in pair]])
    lines = [line for line in res.output.splitlines() if not line.startswith("loading ")]  # the trainer's announcement
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert not (tmp_path / "runs").exists()  # neither runs/gone/ nor the runs/ it would have made


def test_a_failed_start_in_an_existing_folder_removes_only_what_it_created(tmp_path, monkeypatch):
    imgs = _imgs(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    real = data.load_images

    def meanwhile(*args, **kwargs):  # another program writes there while the run starts
        (mine / "editor.swp").write_text("not the run's")
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "load_images", meanwhile)
    (tmp_path / "none").mkdir()
    with pytest.raises(TextinvError, match="no .jpg"):
        train(images=str(tmp_path / "none"), token="<m>", steps=2, out=str(mine), pipe=make_sd(), progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["editor.swp", "notes.txt"]  # the .lock went
    monkeypatch.undo()
    run = tmp_path / "run"
    train(images=imgs, token="<m>", steps=2, batch=1, out=str(run), pipe=make_sd(), progress=False)
    (run / ".lock").unlink()  # e.g. a run copied from elsewhere
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(TextinvError, match="--resume: this run was started with lr="):
        train(images=imgs, token="<m>", steps=4, batch=1, lr="0.5", resume=True, out=str(run), pipe=make_sd(), progress=False)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_ctrl_c_before_the_first_step_leaves_no_folder_behind(tmp_path, monkeypatch):
    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training._Batches, "loss", ctrl_c)
    with pytest.raises(Interrupted, match="^interrupted before the first step: nothing to save$"):
        train(images=_imgs(tmp_path), token="<c>", steps=3, out=str(tmp_path / "new" / "run"), pipe=make_sd(), progress=False)
    assert not (tmp_path / "new").exists()


def test_previews_are_written_atomically(tmp_path, monkeypatch):
    seen = []
    real = atomic.atomic_path

    def spy(path):
        seen.append(Path(path).name)
        return real(path)

    import textinv.training as training

    monkeypatch.setattr(training, "atomic_path", spy)
    train(images=_imgs(tmp_path), token="<p>", steps=2, batch=1, preview_every=2, out=str(tmp_path / "run"),
          pipe=make_sd(), progress=False)
    assert "000002.png" in seen and (tmp_path / "run" / "previews" / "000002.png").is_file()


# ------------------------------------------------------------------------------- metadata types
def test_meta_of_another_type_in_a_strangers_file_is_left_out_not_a_crash_later(tmp_path):
    """A step or Clip skip that is not a number once failed writing (int() of a list, of 'abc', of inf)."""
    bad_meta = {"textinv.step": "[1, 2]", "textinv.clip_skip": '"x"', "textinv.name": '{"a": 1}', "textinv.init_text": "7"}
    save_file({"clip_l": torch.ones(1, 768), "t5": torch.ones(1, 4096)}, str(tmp_path / "flux.safetensors"), bad_meta)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(1, 768)}, "name": "x", "step": "abc",
                "clip_skip": float("nan")}, tmp_path / "a1111.pt")
    torch.save({"clip_l": torch.ones(1, 768), "t5": torch.ones(1, 4096), "step": float("inf")}, tmp_path / "flow.pt")
    torch.save({"emb_params": torch.ones(1, 768), "step": 120.0}, tmp_path / "float-step.pt")  # a whole number: kept
    for src in ("flux.safetensors", "a1111.pt", "flow.pt"):
        emb = formats.load(tmp_path / src)
        assert not {"step", "clip_skip"} & set(emb.meta), (src, emb.meta)
        assert src != "flux.safetensors" or not {"stored_name", "init_text"} & set(emb.meta), emb.meta
        for dst in ("out.pt", "out.png", "out.safetensors"):
            res = CliRunner().invoke(main, ["convert", str(tmp_path / src), str(tmp_path / dst)])
            assert res.exit_code == 0 and res.stdout.startswith("wrote "), (src, dst, res.output)
    assert formats.load(tmp_path / "float-step.pt").meta["step"] == 120
