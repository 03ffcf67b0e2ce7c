"""Did learning happen on the Flux.1-shaped built-in model (mini-flow)?  Measured by the world's judge.

The same word as tests/test_learning.py's, trained on mini-flow with its own demo settings (its
textinv.json: ``--lr-t5 0.05``), once per test run (``flow_word``).  Fixed seeds, so the figures
repeat; thresholds sit below the measured values but far above the init word's.
"""
from __future__ import annotations

import pytest

import textinv.tokens as tk
from textinv import evaluate, formats
from textinv.formats import Embedding
from textinv.models import load_pipeline
from textinv.training import init_vectors

pytestmark = pytest.mark.slow
PROBE = [evaluate.FIDELITY_PROBE]


def fidelity(pipe, trigger: str, concept: str, emb=None) -> float:
    if emb is not None:
        tk.apply(pipe, emb)
    try:
        return evaluate.judge_scores(pipe, trigger, "shape", concept, n=16, probes=PROBE)["fidelity"]
    finally:
        tk.remove(pipe)


def test_the_flow_word_draws_the_unnamed_shape_far_more_often_than_the_init_word(flow_word):
    # measured on mini-flow v2 (drop, seed 0, 16 images; 100 steps): fidelity 0.88 against 0.06 for the init word
    pipe = load_pipeline("mini-flow")
    baseline = fidelity(pipe, flow_word.init, flow_word.concept)
    learned = fidelity(pipe, "<t>", flow_word.concept, flow_word.path)
    assert learned >= 0.6 and learned >= baseline + 0.4, (learned, baseline)


def test_on_mini_flow_the_t5_vectors_carry_the_concept(flow_word):
    """The word's T5 part alone draws the shape; its CLIP-L part (Flux.1's CLIP gives only the pooled
    vector) with T5 left at the init word's vector does not: what the encoder table in
    docs/training.md finds, here on one trained word.  Measured on v2: 0.44 and 0.00 (whole word 0.88)."""
    pipe = load_pipeline("mini-flow")
    emb = formats.load(flow_word.path)
    init_t5 = init_vectors(pipe.tokenizer_2, pipe.text_encoder_2.get_input_embeddings().weight, flow_word.init, 1)
    with pytest.warns(UserWarning, match="has no clip_l part: its trigger is left out"):
        t5 = fidelity(pipe, "<t>", flow_word.concept, Embedding("t", {"t5": emb.vectors["t5"]}))
    clip = fidelity(pipe, "<t>", flow_word.concept, Embedding("t", {"clip_l": emb.vectors["clip_l"], "t5": init_t5}))
    assert t5 >= 0.3 and t5 >= clip + 0.25, (t5, clip)
