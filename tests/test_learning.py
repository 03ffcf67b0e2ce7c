"""Did learning happen?  Textual inversion on the built-in mini model, measured by the world's judge.

Fixed seeds throughout, so the figures repeat.  The threshold sits below the measured value
(fidelity 0.44 against 0.19 for the init word, `textinv demo` settings, 16 images) but far above
what the init word alone achieves; the demo's own targets (issue 4) are not yet met by this model.
"""
from __future__ import annotations

import textinv.tokens as tk
from textinv import evaluate
from textinv.demo import INIT_WORD, DemoSettings, render_training_set, world_templates
from textinv.models import load_pipeline
from textinv.training import train
from textinv.world import spec


def test_embedding_draws_the_unnamed_shape_far_more_often_than_the_init_word(tmp_path):
    concept = spec.unnamed_shapes()[0]
    render_training_set(concept, tmp_path / "images", seed=0)
    pipe = load_pipeline()
    probe = [evaluate.FIDELITY_PROBE]
    baseline = evaluate.judge_scores(pipe, INIT_WORD, "shape", concept, n=16, probes=probe)["fidelity"]
    s = DemoSettings()
    train(images=str(tmp_path / "images"), token="<t>", init=INIT_WORD, templates=str(world_templates(tmp_path)),
          steps=s.steps, lr=s.lr, batch=s.batch, flip=False, seed=0, out=str(tmp_path / "run"), pipe=pipe, progress=False)
    fidelity = evaluate.judge_scores(pipe, "<t>", "shape", concept, n=16, probes=probe)["fidelity"]
    tk.remove(pipe)
    assert fidelity >= baseline + 0.15, (fidelity, baseline)
