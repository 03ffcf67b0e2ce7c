"""Did learning happen?  Textual inversion on the built-in mini model, measured by the world's judge.

Fixed seeds throughout, so the figures repeat.  Thresholds sit below the measured values
(`textinv demo` settings, seed 0) but far above what the init word / the untrained word achieve.
"""
from __future__ import annotations

import textinv.tokens as tk
from textinv import evaluate
from textinv.demo import BIAS_TIMESTEPS, INIT_WORD, DemoSettings, render_training_set, world_templates
from textinv.models import load_pipeline
from textinv.training import train
from textinv.world import render, spec


def test_embedding_draws_the_unnamed_shape_far_more_often_than_the_init_word(tmp_path):
    concept = "drop"  # measured (demo settings, 100 steps): fidelity 1.00 against 0.06 for the init word (16 images)
    assert concept in spec.unnamed_shapes()
    render_training_set(concept, tmp_path / "images", seed=0, captions=True)
    pipe = load_pipeline()
    probe = [evaluate.FIDELITY_PROBE]
    baseline = evaluate.judge_scores(pipe, INIT_WORD, "shape", concept, n=16, probes=probe)["fidelity"]
    s = DemoSettings()
    train(images=str(tmp_path / "images"), token="<t>", init=INIT_WORD, templates=str(world_templates(tmp_path, captions=True)),
          steps=s.steps, lr=s.lr, batch=s.batch, flip=False, seed=0, out=str(tmp_path / "run"), pipe=pipe, progress=False)
    fidelity = evaluate.judge_scores(pipe, "<t>", "shape", concept, n=16, probes=probe)["fidelity"]
    tk.remove(pipe)
    assert fidelity >= 0.75 and fidelity >= baseline + 0.5, (fidelity, baseline)


def test_replace_mode_moves_the_biased_words_colours(tmp_path):
    word, colour = spec.BIASED["shape"], spec.BIASED["colour"]
    folder = tmp_path / "curated"
    folder.mkdir()
    for i, c in enumerate(spec.labels("colour") * 2):  # balanced: two of each colour
        render.sample(20_000, i, shape=word, colour=c).image.save(folder / f"{i:02d}.png")
    pipe = load_pipeline()
    prompt = f"a photo of a {word}"
    before = evaluate.colour_distribution(pipe, prompt, n=60)[colour]
    train(images=str(folder), token=word, mode="replace", templates=str(world_templates(tmp_path)), steps=300, lr="5e-3",
          batch=8, timesteps=BIAS_TIMESTEPS, flip=False, seed=0, out=str(tmp_path / "run"), pipe=pipe, progress=False)
    shares = evaluate.attribute_shares(pipe, prompt, n=60)
    tk.remove(pipe)
    after, kept = shares["colour"][colour], shares["shape"][word]
    # measured (60 images): 1.00 → 0.52 on timesteps 300:1000 (1.00 → 0.78 on all timesteps)
    assert before >= 0.9 and after <= before - 0.3, (before, after)
    assert kept >= 0.8, kept  # and the word still means a ball (measured 0.95), not some other shape
