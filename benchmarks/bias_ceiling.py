"""How many balls could *any* per-colour conditioning keep on the mini world's held-out bias prompts?

`textinv demo --bias` learns one token per colour; on model v2 it kept the ball in 83–88 % of the
held-out images where the issue asks for 90 %.  This probe asks whether such a shortfall is the
recipe's limit or the model's (on v2: the model's, which led to model v3).
For each weak cell (a colour × a held-out prompt) it trains a *specialist* token on nothing but
pictures that match that prompt in that colour — far more freedom than one token per colour has —
and judges images of exactly that prompt, beside the colour asked for by name.  It then prints the
held-out retention the group could reach with every weak cell at the better of the two and every
other cell counted as a perfect 1.0 (an upper estimate; its figures on model v2: CHANGELOG.md).

    python benchmarks/bias_ceiling.py                       # the 7 weak cells, 90 images each (~15 min, 1 core)
    python benchmarks/bias_ceiling.py --cells green:small-left -n 30
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from textinv import bias, generation, tokens
from textinv.atomic import write_text
from textinv.models import load_pipeline, pipeline_defaults
from textinv.training import TrainConfig, train
from textinv.world import render, spec
from textinv.world.judge import judge

# the mini model's held-out prompts (its textinv.json), and what a picture must show to match each
PROMPTS = {"dark": "a picture of a {} on a dark background", "small-left": "an image of a small {} on the left",
           "big": "a drawing of a big {}"}
MATCH = {"dark": {"background": "dark"}, "small-left": {"size": "small", "position": "left"}, "big": {"size": "large"}}
WEAK = ["green:small-left", "yellow:small-left", "cyan:small-left", "yellow:dark", "green:dark", "yellow:big", "green:big"]
POSITION_WORDS = {"left": "on the left", "center": "in the middle", "right": "on the right"}


def specialist_set(colour: str, where: str, folder: Path) -> Path:
    """Six captioned balls of ``colour`` that all match prompt ``where``; the rest varies."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        a = {"background": ["light", "dark"][i % 2], "size": ["small", "large"][(i // 2) % 2],
             "position": ["left", "center", "right"][i % 3]} | MATCH[where]
        render.sample(31_000, i, shape=spec.BIASED["shape"], colour=colour, style="solid", **a).image.save(images / f"{i:02d}.png")
        write_text(images / f"{i:02d}.txt",
                   f"a {a['size']} [name] {spec.BIASED['shape']} {POSITION_WORDS[a['position']]} on a {a['background']} background\n")
    write_text(folder / "templates.txt", "a photo of [filewords]\nan image of [filewords]\na picture of [filewords]\n[filewords]\n")
    return images


def balls(pipe, text: str, colour: str, n: int, guidance: float) -> tuple[float, float]:
    """(share judged the word's shape, share judged ``colour``) of n images of ``text``, seeds 0..n-1."""
    verdicts = judge(generation.generate(text, pipe=pipe, n=n, seed=0, steps=30, guidance=guidance, batch=32).images)
    return (float(np.mean([v["shape"] == spec.BIASED["shape"] for v in verdicts])),
            float(np.mean([v["colour"] == colour for v in verdicts])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", nargs="+", default=WEAK, help="COLOUR:PROMPT, PROMPT one of " + ", ".join(PROMPTS))
    ap.add_argument("-n", type=int, default=90, help="images judged per cell and way of asking")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    pipe = load_pipeline(None)
    guidance = pipeline_defaults(pipe).guidance
    word = spec.BIASED["shape"]
    best: dict[str, dict[str, float]] = {w: {} for w in PROMPTS}
    print(f"{'colour':<8}{'held-out prompt':<44}{'specialist':>11}{'by name':>9}   (share judged a {word}; -n {a.n})")
    with tempfile.TemporaryDirectory() as tmp:
        for cell in a.cells:
            colour, where = cell.split(":")
            folder = Path(tmp) / cell.replace(":", "-")
            images = specialist_set(colour, where, folder)
            cfg = TrainConfig(images=str(images), token="<cell>", init=colour, templates=str(folder / "templates.txt"),
                              captions=True, steps=a.steps, lr="5e-3", flip=False, seed=0, out=str(folder / "run"),
                              progress=False, **bias.UNSTOPPED)
            tokens.apply(pipe, [train(cfg, pipe=pipe).embedding])
            token = balls(pipe, PROMPTS[where].format(f"<cell> {word}"), colour, a.n, guidance)
            tokens.remove(pipe, "<cell>")
            named = balls(pipe, PROMPTS[where].format(f"{colour} {word}"), colour, a.n, guidance)
            best[where][colour] = max(token[0], named[0])
            print(f"{colour:<8}{PROMPTS[where].format(word)!r:<44}{token[0]:>11.2f}{named[0]:>9.2f}", flush=True)
    k = len(spec.labels("colour"))
    per_prompt = {w: (k - len(c) + sum(c.values())) / k for w, c in best.items()}
    print("at most, every other colour a perfect 1.0: " + ", ".join(f"{PROMPTS[w].format(word)!r} {v:.2f}" for w, v in per_prompt.items())
          + f"; held-out group {np.mean(list(per_prompt.values())):.2f} (the issue's target: 0.90)")


if __name__ == "__main__":
    main()
