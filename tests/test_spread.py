"""Image-heavy commands spread over processes (textinv.spread): two CPU processes over gloo, as
`accelerate launch` runs them on two GPUs, must give exactly the files one process gives."""
from __future__ import annotations

import json

import pytest
import torch

from textinv import formats, spread
from textinv.demo import render_bias_set, render_training_set

from click.testing import CliRunner

from textinv.cli import main

from conftest import launch, one_thread


@pytest.mark.parametrize("jobs", [0, 1, 2, 5, 7])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_round_robin_shares_put_back_together_are_the_jobs_in_order(jobs, count):
    items = [f"job {k}" for k in range(jobs)]
    shares = [spread.Share(index, count).mine(items) for index in range(count)]
    assert spread.interleave(shares) == items
    assert shares[0] == items[::count] and sum(map(len, shares)) == jobs


def test_alone_every_job_is_done_when_its_result_is_asked_for():
    """A caller's lines and stop checks come between the jobs, as before there were processes."""
    done = []
    results = spread.ALONE.each(["a", "b"], lambda job: done.append(job) or job.upper())
    assert done == []
    assert next(results) == "A" and done == ["a"]
    assert list(results) == ["B"] and done == ["a", "b"]


def test_a_plain_process_is_alone_and_has_nothing_to_close():
    with spread.launched() as share:
        assert share == spread.ALONE and share.is_main and share.device is None
        assert share.gather(["x"], everywhere=False) == ["x"]


def _both(command: str, *args: str, out) -> tuple:
    """The command run plainly into OUT/one (here, in this process, on one thread as each launched
    process has: a CPU's sums can depend on its thread count) and by two processes into OUT/two:
    (what the first printed on stdout, the second's completed process)."""
    with one_thread():
        one = CliRunner().invoke(main, [command, *args, "--out", str(out / "one")])
    assert one.exit_code == 0, one.output[-3000:]
    two = launch(command, *args, "--out", str(out / "two"))
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    return one.stdout, two


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.long
def test_generate_on_two_processes_writes_the_files_of_one(tmp_path):
    """Five images in batches of two: process 0 makes images 0-1 and 4, process 1 images 2-3."""
    one, two = _both("generate", "a red ball on the left", "-n", "5", "--batch", "2", "--steps", "2", out=tmp_path)
    files = _files(tmp_path / "one")
    assert sorted(files) == ["00000-0.png", "00001-1.png", "00002-2.png", "00003-3.png", "00004-4.png", "grid-00000.png"]
    assert _files(tmp_path / "two") == files  # byte for byte, the grid and every image's parameters included
    assert two.stdout.decode().replace("/two/", "/one/") == one  # the main process reports, once


@pytest.mark.long
def test_eval_on_two_processes_gives_the_figures_and_report_of_one(tmp_path):
    render_training_set("drop", tmp_path / "imgs", n=2)
    emb = formats.save(formats.Embedding("<d>", {"clip": torch.randn(1, 64) * 0.3}, {"step": 5, "init_text": "shape"}),
                       tmp_path / "d.safetensors")
    one, two = _both("eval", str(emb), "--images", str(tmp_path / "imgs"), "-n", "2", "--steps", "2", out=tmp_path)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")  # metrics.json, curve.png, report.html
    assert two.stdout.decode().replace("/two/", "/one/") == one
    assert two.stderr.decode().count("measured step 5:") == 1  # only the main process speaks


@pytest.mark.long
def test_bias_on_two_processes_measures_and_learns_what_one_does(tmp_path):
    """One training and one held-out prompt (a process each) and two value tokens (a process each,
    trained whole): the report, the chart, the tokens and every figure are one process's."""
    curated = render_bias_set(tmp_path / "curated")
    (tmp_path / "templates.txt").write_text("a photo of a [name]\n")
    (tmp_path / "held-out.txt").write_text("a drawing of a big {}\n")
    one, two = _both("bias", "ball", "--attribute", "colour=red,blue", "--images", str(curated), "-n", "2",
                     "--steps", "2", "--templates", str(tmp_path / "templates.txt"),
                     "--prompts", str(tmp_path / "held-out.txt"), out=tmp_path)
    for name in ("report.html", "bias.png", "embeddings/ball-red.safetensors", "embeddings/ball-blue.safetensors"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    ran = [json.loads((tmp_path / name / "bias.json").read_text()) for name in ("one", "two")]
    for result in ran:  # what differs: the time taken, and where the tokens are
        del result["seconds"], result["train_seconds"], result["embedding"]
    assert ran[0] == ran[1] and ran[0]["after"] is not None
    assert two.stdout.decode().replace("/two/", "/one/") == one
