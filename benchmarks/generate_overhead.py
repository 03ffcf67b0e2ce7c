"""What does textinv's generation path cost on top of the plain diffusers pipeline?

On the built-in mini model, same seeds, steps, guidance and image count, times:
  * plain: ``pipe(prompts, negative_prompt=..., generator=[...])`` with no embeddings;
  * textinv: ``textinv.generate`` with 3 embeddings applied (1, 2 and 4 vectors), a weighted
    prompt calling two of them and a negative prompt calling the third — including applying and
    removing the embeddings, parsing, A1111 chunking/weighting and the infotexts (no files written);
  * textinv's prompt work alone (apply + parse + encode + remove), the part that is not sampling.
Prints median wall-clock seconds over ``--repeats`` interleaved runs and the overhead; asserts nothing.
Usage: python benchmarks/generate_overhead.py [-n 8] [--steps 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import textinv.tokens as tk
from textinv import generation, models, prompts
from textinv.formats import Embedding
from textinv.models import load_pipeline

PLAIN = "a photo of a red star on the left"
PROMPT = "a photo of a (cat-toy:1.3) on the left, [soft-style], <shiny>"
NEGATIVE = "(blurry-neg:1.2)"


def embeddings() -> list[Embedding]:
    g = torch.Generator().manual_seed(0)
    return [Embedding(name, {"clip": torch.randn(n, 64, generator=g) * 0.2})
            for name, n in (("cat-toy", 2), ("soft-style", 4), ("blurry-neg", 1))]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_pipeline()
    embs = embeddings()
    g = models.defaults(None).guidance

    def plain():
        gens = [torch.Generator().manual_seed(i) for i in range(args.n)]
        pipe([PLAIN] * args.n, negative_prompt=["blurry"] * args.n, num_inference_steps=args.steps, guidance_scale=g,
             generator=gens)

    def ours():
        generation.generate(PROMPT, NEGATIVE, embeddings=embs, pipe=pipe, n=args.n, steps=args.steps, guidance=g,
                            batch=args.n)

    def prompt_work():
        tk.apply(pipe, embs)
        for text in (PROMPT, NEGATIVE):
            prompts.encode(pipe, prompts.split(pipe, text))
        tk.remove(pipe)

    # interleaved, so that the machine's drifts (other processes, clocks) hit both paths alike
    plain(), ours()
    pairs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        plain()
        t_p = time.perf_counter() - t
        t = time.perf_counter()
        ours()
        pairs.append((t_p, time.perf_counter() - t))
    t_plain, t_ours = statistics.median(p for p, _ in pairs), statistics.median(o for _, o in pairs)
    t_prompt = timed(prompt_work, args.repeats)
    print(f"mini model, {args.n} images × {args.steps} steps, one batch, median of {args.repeats}")
    print(f"  diffusers pipeline, plain prompt, no embeddings : {t_plain:7.3f} s")
    print(f"  textinv.generate, 3 embeddings, weighted prompt : {t_ours:7.3f} s  "
          f"({(t_ours / t_plain - 1) * 100:+.1f} %)")
    print(f"  of which apply + parse + encode + remove         : {t_prompt * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
