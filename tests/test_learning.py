"""Did learning happen?  Textual inversion on the built-in mini model, measured by the world's judge.

Fixed seeds throughout, so the figures repeat.  Thresholds sit below the measured values
(`textinv demo` settings, seed 0) but far above what the init word / the untrained word achieve.
"""
from __future__ import annotations

import pytest

import textinv.tokens as tk
from textinv import evaluate
from textinv.demo import run_bias
from textinv.models import load_pipeline
from textinv.world import spec

pytestmark = pytest.mark.slow


def test_embedding_draws_the_unnamed_shape_far_more_often_than_the_init_word(demo_word):
    # measured (demo settings, 100 steps): fidelity 1.00 against 0.06 for the init word (16 images)
    assert demo_word.concept in spec.unnamed_shapes()
    pipe = load_pipeline()
    probe = [evaluate.FIDELITY_PROBE]
    baseline = evaluate.judge_scores(pipe, demo_word.init, "shape", demo_word.concept, n=16, probes=probe)["fidelity"]
    tk.apply(pipe, demo_word.path)
    fidelity = evaluate.judge_scores(pipe, "<t>", "shape", demo_word.concept, n=16, probes=probe)["fidelity"]
    tk.remove(pipe)
    assert fidelity >= 0.75 and fidelity >= baseline + 0.5, (fidelity, baseline)


def test_per_value_tokens_even_out_the_biased_words_colours_and_keep_it_a_ball(tmp_path):
    # `textinv demo --bias` = `textinv bias ball --attribute colour --images CURATED`: one token per
    # colour from 6 captioned balls each, every token starting from the colour the model draws for
    # "ball" today (red), used in turn before the word; judged on 3 training and 3 held-out prompts.
    # The full measurement (six colours, 60 images a prompt, 3 seeds) is in docs/evaluation.md; here
    # two colours (red and green, the hardest), the default 300 steps (a red start needs them: at 60
    # every token still drew red) and 12 images a prompt.  Measured: exactly even (1/2 each) on the
    # training and the held-out prompts; every image a ball on the training prompts, 0.97 held out.
    values = ["red", "green"]
    m = run_bias(tmp_path, seed=0, n=12, steps=300, values=values, echo=lambda *_: None, named=False)
    red = spec.BIASED["colour"]
    assert m["init"] == [red] * len(values)
    for group in ("training", "held-out"):
        before = m["before"][group]["pooled"]["distribution"][red]
        after = m["after"][group]["pooled"]["distribution"][red]
        s = m["summary"][group]
        assert before >= 0.9 and after <= 0.5, (group, before, after)
        assert s["kl_ratio"] >= 10, (group, s)
        assert s["retention_after"] >= 0.7, (group, s)  # the word still means a ball, not some other shape
