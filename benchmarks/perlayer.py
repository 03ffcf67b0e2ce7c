"""Does P+ (``textinv train --per-layer``) learn better than plain textual inversion on the mini world?

Each unnamed shape × seed is trained twice with the same images, settings and seeds — plain TI and
per-layer (one set of vectors per cross-attention layer; the mini model has 7) — and measured the
same way as benchmarks/ti_benchmark.py does (its ``measured_run``): the judge's fidelity and
editability of the final embedding, the fidelity of every save (steps to 0.8), training seconds
(measurements excluded) and the file's size.  Prints the two side by side, with the issue's targets.

Runs already in OUT/results.json are not redone, so an interrupted benchmark continues.

    python benchmarks/perlayer.py --out /tmp/perlayer                  # all 4 shapes × seeds 0, 1
    python benchmarks/perlayer.py --out /tmp/perlayer --concepts drop tee
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from textinv import evaluate, models
from textinv.atomic import write_text
from textinv.demo import INIT_WORD, DemoSettings, render_training_set, world_templates
from textinv.models import load_pipeline
from textinv.training import TrainConfig
from textinv.world import spec

from ti_benchmark import TARGET, _f, _mean, measured_run

METHODS = {"plain": False, "per-layer": True}


def parse() -> argparse.Namespace:
    s = DemoSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", nargs="+", default=spec.unnamed_shapes())
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--images", type=int, default=5, help="training images per run")
    ap.add_argument("--vectors", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=s.batch)
    ap.add_argument("--lr", default=s.lr)
    ap.add_argument("--save-every", type=int, default=25, help="measure fidelity every N steps (steps to 0.8)")
    ap.add_argument("-n", type=int, default=8, help="images per prompt for the final embedding")
    ap.add_argument("--curve-n", type=int, default=8, help="images of 'a photo of a S*' at each save")
    ap.add_argument("--sample-steps", type=int, default=20, help="sampling steps per image")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary folder)")
    a = ap.parse_args()
    a.out = a.out or Path(tempfile.mkdtemp(prefix="textinv-perlayer-"))
    return a


def main() -> None:
    a = parse()
    a.out.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings()
    results_path = a.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    pipe = load_pipeline()
    guidance = models.defaults(None).guidance
    templates = world_templates(a.out, settings.captions)
    grid = [(c, s, m) for c in a.concepts for s in a.seeds for m in METHODS]
    todo = [g for g in grid if "-".join(map(str, g)) not in results]
    print(f"{len(grid)} runs ({len(grid) - len(todo)} already done), {a.steps} steps each; work folder {a.out}", flush=True)
    t_start = time.perf_counter()
    for idx, (concept, seed, method) in enumerate(todo):
        folder = a.out / "images" / f"{concept}-s{seed}"
        if not folder.is_dir():
            render_training_set(concept, folder, n=a.images, seed=seed, captions=settings.captions)
        name = f"{concept}-{seed}-{method}"
        cfg = TrainConfig(images=str(folder), token="<c>", init=INIT_WORD, vectors=a.vectors, templates=str(templates),
                          steps=a.steps, lr=a.lr, batch=a.batch, flip=False, seed=seed, save_every=a.save_every,
                          out=str(a.out / "runs" / name), progress=False, per_layer=METHODS[method], early_stop=False)
        shutil.rmtree(cfg.out, ignore_errors=True)  # an interrupted run starts again (its curve was lost)
        measure = dict(n=a.n, seed=1000 * seed, steps=a.sample_steps, guidance=guidance)
        r = measured_run(pipe, cfg, evaluate.JudgeMetric(concept), measure, a.curve_n)
        results[name] = {"concept": concept, "seed": seed, "method": method, **r}
        write_text(results_path, json.dumps(results, indent=1))
        done = idx + 1
        left = (time.perf_counter() - t_start) / done * (len(todo) - done) / 60
        print(f"[{done}/{len(todo)}] {name}: fidelity {r['fidelity']:.2f}, editability {r['editability']:.2f}, "
              f"to {TARGET}: {r['steps_to_target'] or '—'}, {r['train_seconds'] / a.steps:.3f} s/step; ~{left:.0f} min left",
              flush=True)
    print("\n" + table(results, a, (time.perf_counter() - t_start) / 60))


def table(results: dict, a, minutes: float) -> str:
    runs = {m: [r for r in results.values() if r["method"] == m and r["concept"] in a.concepts and r["seed"] in a.seeds]
            for m in METHODS}
    lines = [
        f"{len(a.concepts)} shapes ({', '.join(a.concepts)}) × seeds {a.seeds}; {a.images} images, {a.vectors} vector(s), "
        f"{a.steps} steps, batch {a.batch}, lr {a.lr}, init {INIT_WORD!r}; judge: {a.n} images per prompt, saves every "
        f"{a.save_every} steps ({a.curve_n} images); {minutes:.0f} min on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}).",
        "",
        f"| | fidelity | editability | score √(f·e) | steps to {TARGET} (runs reaching it) | file | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, rs in runs.items():
        if not rs:
            continue
        reach = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
        lines.append(f"| {m} | {_f(_mean(r['fidelity'] for r in rs))} ± {_f(float(np.std([r['fidelity'] for r in rs])))} "
                     f"| {_f(_mean(r['editability'] for r in rs))} | {_f(_mean(r['score'] for r in rs))} "
                     f"| {int(statistics.median(reach)) if reach else '—'} ({len(reach)}/{len(rs)}) "
                     f"| {statistics.median(r['file_bytes'] for r in rs):.0f} B "
                     f"| {_f(_mean(r['train_seconds'] / a.steps for r in rs), 3)} |")
    lines += ["", "Per shape (fidelity / editability / steps to 0.8, mean over seeds):", "",
              "| shape | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for c in a.concepts:
        cells = []
        for m in METHODS:
            rs = [r for r in runs[m] if r["concept"] == c]
            reach = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
            cells.append(f"{_f(_mean(r['fidelity'] for r in rs))} / {_f(_mean(r['editability'] for r in rs))} / "
                         f"{_f(_mean(reach), 0) if len(reach) == len(rs) and rs else '—'}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    steps = sorted({p["step"] for rs in runs.values() for r in rs for p in r["curve"]})
    if steps:
        lines += ["", "Mean fidelity at each save:", "", "| step | " + " | ".join(map(str, steps)) + " |",
                  "|---|" + "---|" * len(steps)]
        for m, rs in runs.items():
            lines.append(f"| {m} | " + " | ".join(_f(_mean(p["fidelity"] for r in rs for p in r["curve"] if p["step"] == s))
                                                  for s in steps) + " |")
    lines += ["", verdict(runs)]
    return "\n".join(lines) + "\n"


def verdict(runs: dict) -> str:
    """The issue's targets: P+ reaches plain TI's fidelity in no more steps, with editability ≥ plain's − 0.02."""
    plain, layered = runs["plain"], runs["per-layer"]
    if not plain or not layered:
        return ""
    pairs = {(r["concept"], r["seed"]): r for r in plain}
    slower = [r for r in layered if (r["concept"], r["seed"]) in pairs
              and (r["steps_to_target"] or 10**9) > (pairs[r["concept"], r["seed"]]["steps_to_target"] or 10**9)]
    edit = _mean(r["editability"] for r in layered) - _mean(r["editability"] for r in plain)
    return (f"Targets: steps to {TARGET} no more than plain TI's in {len(layered) - len(slower)} of {len(layered)} "
            f"paired runs; editability {edit:+.3f} against plain TI (target ≥ −0.02): "
            f"{'met' if edit >= -0.02 else 'not met'}.")


if __name__ == "__main__":
    main()
