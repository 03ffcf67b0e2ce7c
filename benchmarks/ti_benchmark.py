"""Where should the defaults sit?  Textual inversion on the mini world, measured by the judge.

Every unnamed shape × {1, 3, 5} training images × {1, 2, 4} vectors × 3 seeds, trained with the
demo's settings (``textinv.demo.DemoSettings``: learning rate, batch, captions) for ``--steps``.  For each
run: the judge's fidelity and editability of the final embedding (``-n`` images per prompt), the
fidelity of every ``--save-every`` save (``--curve-n`` images of "a photo of a S*") to find the
first step reaching fidelity 0.8, and the training seconds (measurements excluded).  The init
word's fidelity/editability per concept and seed is the baseline.

Writes a markdown table (``--table``, default docs/benchmark.md; with --quick, OUT/benchmark.md)
and every number as OUT/results.json.  Runs already in OUT/results.json are not redone, so an
interrupted benchmark continues where it stopped.

    python benchmarks/ti_benchmark.py                 # the full grid (108 runs)
    python benchmarks/ti_benchmark.py --quick         # one small run: a smoke test of the script
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

import textinv.tokens as tk
from textinv import evaluate, generation, models
from textinv.atomic import write_text
from textinv.demo import INIT_WORD, DemoSettings, render_training_set, world_templates
from textinv.models import load_pipeline
from textinv.training import TrainConfig, train
from textinv.world import spec

TARGET = 0.8  # "steps to reach fidelity 0.8"


def parse() -> argparse.Namespace:
    s = DemoSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", nargs="+", default=spec.unnamed_shapes())
    ap.add_argument("--images", type=int, nargs="+", default=[1, 3, 5], help="training images per run")
    ap.add_argument("--vectors", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # 100 steps: in a 300-step trial run (16 runs, saves every 50) mean fidelity was flat from the
    # first save on (0.78, 0.77, 0.73, 0.73, 0.78, 0.74), and 100 steps fit the grid into 30 minutes.
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=s.batch)
    ap.add_argument("--lr", default=s.lr)
    ap.add_argument("--save-every", type=int, default=25, help="measure fidelity every N steps (steps to 0.8)")
    ap.add_argument("-n", type=int, default=8, help="images per prompt for the final embedding")
    ap.add_argument("--curve-n", type=int, default=8, help="images of 'a photo of a S*' at each save")
    ap.add_argument("--sample-steps", type=int, default=20, help="sampling steps per image")
    ap.add_argument("--no-baseline", action="store_true", help="skip the init word's baseline")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 concept, 3 images, 1 vector, 1 seed, 60 steps")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--table", type=Path, default=None, help="markdown output (default docs/benchmark.md)")
    ap.add_argument("--budget-minutes", type=float, default=30.0, help="warn when the projected time exceeds this")
    a = ap.parse_args()
    if a.quick:
        a.concepts, a.images, a.vectors, a.seeds = a.concepts[:1], [3], [1], [0]
        a.steps, a.save_every, a.n, a.curve_n = 60, 30, 4, 4
    a.out = a.out or Path(tempfile.mkdtemp(prefix="textinv-ti-benchmark-"))
    a.table = a.table or (a.out / "benchmark.md" if a.quick else Path(__file__).resolve().parents[1] / "docs" / "benchmark.md")
    return a


def key(concept, images, vectors, seed) -> str:
    return f"{concept}-i{images}-v{vectors}-s{seed}"


def measured_run(pipe, cfg: TrainConfig, metric, measure: dict, curve_n: int) -> dict:
    """Train ``cfg`` on ``pipe`` and measure it: fidelity at every save (``curve_n`` images of "a photo
    of a S*"), fidelity and editability of the final embedding, the first step reaching TARGET, and
    the training seconds without the measurements."""
    curve, eval_seconds = [], 0.0

    def on_save(step, path):
        nonlocal eval_seconds
        t = time.perf_counter()
        r = metric(pipe, cfg.token, probes=metric.fidelity_only(), **dict(measure, n=curve_n))
        curve.append({"step": step, "fidelity": r["fidelity"]})
        eval_seconds += time.perf_counter() - t
        return False

    res = train(cfg, pipe=pipe, on_save=on_save)
    final = metric(pipe, cfg.token, **measure)
    tk.remove(pipe)
    curve.append({"step": res.steps, "fidelity": final["probes"][0]["concept"]})
    return {"fidelity": final["fidelity"], "editability": final["editability"],
            "score": evaluate.tradeoff_score(final["fidelity"], final["editability"]),
            "steps_to_target": next((p["step"] for p in curve if p["fidelity"] >= TARGET), None), "curve": curve,
            "train_seconds": round(res.seconds - eval_seconds, 2), "eval_seconds": round(eval_seconds, 2),
            "file_bytes": res.embedding_path.stat().st_size}


def main() -> None:
    a = parse()
    a.out.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings()
    results_path = a.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}, "baseline": {}}
    pipe = load_pipeline()
    guidance = models.defaults(None).guidance
    templates = world_templates(a.out, settings.captions)
    grid = [(c, k, v, s) for c in a.concepts for s in a.seeds for k in a.images for v in a.vectors]
    todo = [g for g in grid if key(*g) not in results["runs"]]
    print(f"{len(grid)} runs ({len(grid) - len(todo)} already done), {a.steps} steps each, batch {a.batch}, lr {a.lr}; "
          f"work folder {a.out}", flush=True)
    t_start = time.perf_counter()
    for idx, (concept, k, v, seed) in enumerate(todo):
        metric = evaluate.JudgeMetric(concept)
        measure = dict(n=a.n, seed=1000 * seed, steps=a.sample_steps, guidance=guidance)
        if not a.no_baseline and f"{concept}-s{seed}" not in results["baseline"]:
            r = metric(pipe, INIT_WORD, **measure)
            results["baseline"][f"{concept}-s{seed}"] = {"fidelity": r["fidelity"], "editability": r["editability"]}
        folder = a.out / "images" / f"{concept}-s{seed}-i{k}"
        if not folder.is_dir():
            render_training_set(concept, folder, n=k, seed=seed, captions=settings.captions)
        run_dir = a.out / "runs" / key(concept, k, v, seed)
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again (its curve was lost)
        cfg = TrainConfig(images=str(folder), token="<c>", init=INIT_WORD, vectors=v, templates=str(templates),
                          steps=a.steps, lr=a.lr, batch=a.batch, flip=False, seed=seed, save_every=a.save_every,
                          out=str(run_dir), progress=False, early_stop=False)  # the curve over all --steps
        r = measured_run(pipe, cfg, metric, measure, a.curve_n)
        reached = r["steps_to_target"]
        results["runs"][key(concept, k, v, seed)] = {"concept": concept, "images": k, "vectors": v, "seed": seed, **r}
        write_text(results_path, json.dumps(results, indent=1))
        done = idx + 1
        per = (time.perf_counter() - t_start) / done
        print(f"[{done}/{len(todo)}] {key(concept, k, v, seed)}: fidelity {r['fidelity']:.2f}, editability "
              f"{r['editability']:.2f}, to {TARGET}: {reached or '—'}, train {r['train_seconds']:.0f} s; "
              f"{per * (len(todo) - done) / 60:.1f} min left", flush=True)
        if done == 1 and per * len(todo) > 60 * a.budget_minutes:
            print(f"warning: projected {per * len(todo) / 60:.0f} min > {a.budget_minutes:.0f} min budget "
                  f"(lower --steps, -n, --curve-n or --sample-steps, or shrink the grid)", file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - t_start) / 60
    table = markdown(results, a, settings, minutes)
    write_text(a.table, table)
    print("\n" + table)
    print(f"wrote {a.table} and {results_path}")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _f(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(results: dict, a, settings: DemoSettings, minutes: float) -> str:
    runs = [r for r in results["runs"].values() if r["concept"] in a.concepts and r["images"] in a.images
            and r["vectors"] in a.vectors and r["seed"] in a.seeds]
    lines = [
        "# Textual inversion on the mini world: images × vectors",
        "",
        f"`python benchmarks/ti_benchmark.py{' --quick' if a.quick else ''}` — every unnamed shape "
        f"({', '.join(a.concepts)}) × {a.images} training images × {a.vectors} vectors × seeds {a.seeds}; "
        f"{a.steps} steps, batch {a.batch}, lr {a.lr}, init word {INIT_WORD!r}, captions {settings.captions}. "
        f"Judge-measured: fidelity = share of 'a photo of a S*' images showing the shape, editability = share of "
        f"'a blue S*', 'a small S* on the left', 'a striped S*' images showing the shape and the asked attribute "
        f"({a.n} images per prompt, {a.sample_steps} DDIM steps, guidance {models.defaults(None).guidance}). "
        f"Steps to {TARGET}: the first save (every {a.save_every} steps, {a.curve_n} images) whose fidelity reaches "
        f"{TARGET}, median over the runs that reached it. Seconds: training only. "
        f"{len(runs)} runs, {minutes:.0f} min in all on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}).",
        "",
        f"| images | vectors | fidelity | editability | score √(f·e) | steps to {TARGET} (runs reaching it) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in a.images:
        for v in a.vectors:
            rs = [r for r in runs if r["images"] == k and r["vectors"] == v]
            if not rs:
                continue
            reach = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
            lines.append(f"| {k} | {v} | {_f(_mean(r['fidelity'] for r in rs))} ± {_f(float(np.std([r['fidelity'] for r in rs])))} "
                         f"| {_f(_mean(r['editability'] for r in rs))} | {_f(_mean(r['score'] for r in rs))} "
                         f"| {int(statistics.median(reach)) if reach else '—'} ({len(reach)}/{len(rs)}) "
                         f"| {_f(_mean(r['train_seconds'] for r in rs), 0)} |")
    cells = {(k, v): _mean(r["score"] for r in runs if r["images"] == k and r["vectors"] == v) for k in a.images for v in a.vectors}
    cells = {kv: x for kv, x in cells.items() if x is not None}
    if cells:
        most = max(a.images)
        by_v = {v: x for (k, v), x in cells.items() if k == most}
        (bk, bv), best = max(cells.items(), key=lambda kv: kv[1])
        lines += ["", f"Highest mean score: {bk} images, {bv} vectors ({best:.2f}); with {most} images the best vector "
                      f"count is {max(by_v, key=by_v.get)} (demo default: {settings.vectors})."]
    lines += ["", "Per concept (all image counts, vectors and seeds), beside the init word:", "",
              "| concept | fidelity | editability | baseline fidelity | baseline editability |", "|---|---|---|---|---|"]
    for c in a.concepts:
        rs = [r for r in runs if r["concept"] == c]
        bs = [b for key_, b in results["baseline"].items() if key_.startswith(f"{c}-s")]
        if rs:
            lines.append(f"| {c} | {_f(_mean(r['fidelity'] for r in rs))} | {_f(_mean(r['editability'] for r in rs))} "
                         f"| {_f(_mean(b['fidelity'] for b in bs))} | {_f(_mean(b['editability'] for b in bs))} |")
    steps = sorted({p["step"] for r in runs for p in r["curve"]})
    if steps:
        lines += ["", "Mean fidelity at each save (all runs):", "", "| step | " + " | ".join(map(str, steps)) + " |",
                  "|---|" + "---|" * len(steps),
                  "| fidelity | " + " | ".join(_f(_mean(p["fidelity"] for r in runs for p in r["curve"] if p["step"] == s))
                                              for s in steps) + " |"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
