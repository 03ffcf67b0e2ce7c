"""Early stopping on a fixed evaluation batch: the rule on known curves, and the trainer using it
(on by default, --steps as a ceiling, the log and the bar, bit-identical resume, damaged states)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from textinv import stopping, tokens
from textinv.errors import TextinvError
from textinv.runs import STATE_FILE
from textinv.training import train

from conftest import make_sd
from test_train import shapes


# ----------------------------------------------------------------------------- the rule
def decay(n, tau=5.0, noise=0.0, seed=0, level=1.0):
    rng = np.random.default_rng(seed)
    return list(0.5 + level * np.exp(-np.arange(n) / tau) + noise * rng.standard_normal(n))


def test_variance_ratio_is_small_after_a_drop_and_near_one_on_a_wobble():
    assert stopping.variance_ratio(decay(40, tau=4)) < 0.01  # dropped, then flat
    assert stopping.variance_ratio(decay(40, tau=400)) > 0.2  # still dropping at the same pace
    wobble = [0.3 + 0.01 * x for x in np.random.default_rng(1).standard_normal(400)]
    assert 0.6 < stopping.variance_ratio(wobble) < 1.6  # nothing learned: the recent half moves like the whole
    assert stopping.variance_ratio([0.2] * 30) == 1.0  # no variance at all: no evidence of anything
    assert stopping.variance_ratio([0.2, 0.1]) == 1.0


def test_rule_stops_once_the_curve_has_flattened_and_never_before_min_evals():
    rule = stopping.Rule()
    fast, slow = decay(200, tau=3, noise=1e-4), decay(200, tau=30, noise=1e-4)
    i_fast, i_slow = stopping.stop_index(fast, rule), stopping.stop_index(slow, rule)
    assert i_fast is not None and i_slow is not None
    assert i_fast + 1 >= rule.min_evals  # at least min_evals evaluations, the step-0 one included
    assert i_slow > 5 * i_fast // 2  # the window is a share of the curve: a slower learner stops later
    # The decision at index i sees only the curve up to i (no peeking ahead).
    assert stopping.should_stop(fast[:i_fast + 1], rule)[0] and not stopping.should_stop(fast[:i_fast], rule)[0]
    assert stopping.stop_index(fast[:rule.min_evals - 1], rule) is None


def test_rule_waits_while_a_slow_creep_after_the_first_drop_keeps_reaching_new_lows():
    """The grid's failure case: leaving the init word makes the big drop; the concept is learned
    later, moving the loss by a hair each time.  The variance ratio alone calls that flat."""
    creep = [1.0] + [0.5 - 1e-4 * i for i in range(40)]
    assert stopping.variance_ratio(creep) < stopping.THRESHOLD  # the ratio alone would stop
    assert stopping.stop_index(creep) is None  # but every evaluation is a new low
    settled = creep + [creep[-1] + 1e-5 * (-1) ** i for i in range(1, 9)]  # then it only wobbles
    assert stopping.stop_index(settled) is not None and stopping.stop_index(settled) >= len(creep)


@pytest.mark.parametrize("seed", range(5))
def test_rule_does_not_stop_on_a_curve_that_only_wobbles(seed):
    """A word that learns nothing (the loss only fluctuates) runs to the ceiling."""
    wobble = [0.3 + 0.01 * x for x in np.random.default_rng(seed).standard_normal(100)]
    assert stopping.stop_index(wobble) is None


def test_rule_does_not_stop_before_a_late_drop():
    flat_then_drop = [1.0] * 20 + decay(60, tau=5, level=0.5)[:]
    i = stopping.stop_index(flat_then_drop)
    assert i is None or i > 30  # not on the flat start: the drop is the learning


# ------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """A real learning run on the built-in model, early stopping on (the default)."""
    from textinv.demo import INIT_WORD, render_training_set, world_templates
    from textinv.models import load_pipeline

    root = tmp_path_factory.mktemp("early")
    render_training_set("tee", root / "images", n=3, seed=2, captions=True)
    pipe = load_pipeline()
    kw = dict(images=str(root / "images"), token="<e>", init=INIT_WORD, templates=str(world_templates(root, True)),
              flip=False, seed=2, steps=300, progress=False)
    steps_seen = []
    result = train(**kw, out=str(root / "run"), pipe=pipe, on_step=lambda s, loss: steps_seen.append(s) and False)
    tokens.remove(pipe)
    return dict(root=root, pipe=pipe, kw=kw, result=result, steps_seen=steps_seen)


def test_training_stops_by_itself_where_the_rule_says_on_its_own_curve(mini_run):
    r = mini_run["result"]
    assert r.stopped and r.steps < 300 and "evaluation loss has flattened" in r.stopped and "--no-early-stop" in r.stopped
    assert mini_run["steps_seen"][-1] == r.steps  # no step after the stop
    state = torch.load(r.out / STATE_FILE, weights_only=True)
    curve = state["eval_curve"].tolist()
    assert [int(s) for s, _ in curve] == list(range(0, r.steps + 1, 5))  # step 0, then every --eval-every steps
    index = stopping.stop_index([v for _, v in curve])
    assert index == len(curve) - 1  # stopped at the first evaluation where the rule holds
    log = [json.loads(line) for line in (r.out / "log.jsonl").read_text().splitlines()]
    evals = {rec["step"]: rec["eval_loss"] for rec in log if "eval_loss" in rec}
    assert sorted(evals) == list(range(5, r.steps + 1, 5))
    assert all(abs(evals[int(s)] - v) < 1e-6 for s, v in curve[1:])
    assert r.eval_loss == pytest.approx(curve[-1][1])
    assert json.loads((r.out / "config.json").read_text())["early_stop"] is True


@pytest.mark.long
def test_the_evaluation_batch_draws_nothing_from_training_and_no_early_stop_trains_every_step(mini_run, tmp_path):
    """Training with the evaluation on or off: the same vectors step for step; off trains exactly --steps."""
    pipe, stop = mini_run["pipe"], mini_run["result"].steps
    r = train(**dict(mini_run["kw"], steps=stop + 3), out=str(tmp_path / "off"), pipe=pipe, early_stop=False)
    tokens.remove(pipe)
    assert r.steps == stop + 3 and r.stopped is None and r.eval_loss is None
    log = [json.loads(line) for line in (tmp_path / "off" / "log.jsonl").read_text().splitlines()]
    assert len(log) == stop + 3 and not any("eval_loss" in rec for rec in log)
    on = torch.load(mini_run["result"].out / STATE_FILE, weights_only=True)["params"][0]
    off_at_stop = train(**dict(mini_run["kw"], steps=stop), out=str(tmp_path / "off2"), pipe=pipe, early_stop=False)
    tokens.remove(pipe)
    assert torch.equal(torch.load(tmp_path / "off2" / STATE_FILE, weights_only=True)["params"][0], on)
    assert off_at_stop.steps == stop


def test_a_resumed_run_stops_at_the_same_step_with_the_same_embedding(mini_run, tmp_path):
    pipe, ref = mini_run["pipe"], mini_run["result"]
    cut = (ref.steps // 2) - (ref.steps // 2) % 5 + 3  # a save between two evaluations
    out = tmp_path / "run"
    first = train(**mini_run["kw"], out=str(out), pipe=pipe, save_every=cut, on_step=lambda s, loss: s >= cut)
    tokens.remove(pipe)
    assert first.steps == cut
    resumed = train(**mini_run["kw"], out=str(out), pipe=pipe, resume=True)
    tokens.remove(pipe)
    assert resumed.steps == ref.steps and resumed.stopped
    assert resumed.embedding_path.read_bytes() == ref.embedding_path.read_bytes()
    # Resumed again with early stopping on: it had stopped, it stays stopped; off: it goes on to --steps.
    again = train(**mini_run["kw"], out=str(out), pipe=pipe, resume=True)
    tokens.remove(pipe)
    assert again.steps == ref.steps and again.stopped
    more = train(**dict(mini_run["kw"], steps=ref.steps + 4), out=str(out), pipe=pipe, resume=True, early_stop=False)
    tokens.remove(pipe)
    assert more.steps == ref.steps + 4 and more.stopped is None


def test_a_damaged_evaluation_curve_is_refused_in_one_line(tmp_path):
    pipe = make_sd()
    kw = dict(images=str(shapes(tmp_path / "imgs")), token="<d>", steps=6, batch=2, save_every=3,
              out=str(tmp_path / "run"), progress=False)
    train(**kw, pipe=pipe)
    tokens.remove(pipe)
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    state["eval_curve"] = torch.tensor([[0.0, float("nan")]], dtype=torch.float64)
    torch.save(state, tmp_path / "run" / STATE_FILE)
    with pytest.raises(TextinvError, match="evaluation-loss curve"):
        train(**dict(kw, steps=9), pipe=pipe, resume=True)


def test_options_are_checked(tmp_path):
    for bad in (dict(eval_every=0), dict(eval_batch=0)):
        with pytest.raises(TextinvError, match="--eval-every"):
            train(images=str(tmp_path), token="<x>", **bad)


def test_cli_reports_why_training_stopped(tmp_path):
    from click.testing import CliRunner

    from textinv.cli import main

    model = tmp_path / "model"
    make_sd().save_pretrained(model)
    args = ["train", "--images", str(shapes(tmp_path / "imgs")), "--token", "<c>", "--model", str(model), "--steps", "8", "--batch", "2"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--no-early-stop"])
    assert r.exit_code == 0, r.output
    assert "(8 steps" in r.output and "stopped at" not in r.output
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--no-early-stop" in help_text and "--eval-every" in help_text and "--patience" in help_text


def test_cli_summary_names_the_reason():
    from types import SimpleNamespace

    from textinv.cli import _trained

    r = SimpleNamespace(embedding_path="runs/c/c.safetensors", steps=65, seconds=7.0, loss=0.02,
                        stopped="stopped at step 65 of 500: the evaluation loss has flattened")
    assert _trained(r).splitlines() == ["stopped at step 65 of 500: the evaluation loss has flattened",
                                        "wrote runs/c/c.safetensors (65 steps, 7 s, loss 0.0200: the mean of the last 20 steps, as in the bar)"]
