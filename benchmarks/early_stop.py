"""Does early stopping stop where the word is learned?  The mini world's benchmark grid, judge-measured.

Every unnamed shape × {1, 3, 5} training images × {1, 2, 4} vectors × 3 seeds, trained with
``textinv train``'s defaults (batch, learning rate, early stopping on, ``--steps 500`` as the
ceiling) on the demo's captioned pictures.  For each run:

* **auto stop**: where the trainer stopped by itself (:mod:`textinv.stopping`), its wall time
  (evaluations included), and the judge's fidelity/editability of that embedding;
* **best save**: the same run resumed with ``early_stop=False`` (bit-identical to an unbroken run)
  to ``--horizon`` steps, saves every 5 steps (to measure any step later); the saves at ``--measure-steps`` are measured and
  the existing best-step rule (``textinv eval``'s recommended step) picks one;
* **fixed 500**: for ``--full-seeds`` the run goes on to 500 steps (the old default), measured too.

Measurements use one sampling seed per run (the same images at every step: paired comparisons).
Writes OUT/results.json (an interrupted run continues) and a markdown table (``--table``).

    python benchmarks/early_stop.py                       # the grid: about 75 min on 2 cores
    python benchmarks/early_stop.py --shard 0/2 & python benchmarks/early_stop.py --shard 1/2
    python benchmarks/early_stop.py --table docs/early-stop.md   # write the table from OUT/results.json
    python benchmarks/early_stop.py --quick               # a smoke run of the script
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import textinv.tokens as tk
from textinv import evaluate, formats, models, stopping
from textinv.atomic import write_text
from textinv.demo import INIT_WORD, render_training_set, world_templates
from textinv.models import load_pipeline
from textinv.training import TrainConfig, train
from textinv.world import spec

TOKEN = "<c>"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", nargs="+", default=spec.unnamed_shapes())
    ap.add_argument("--images", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--vectors", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--full-seeds", type=int, nargs="*", default=[0], help="seeds whose runs also go on to 500 steps")
    ap.add_argument("--ceiling", type=int, default=500, help="--steps of the auto-stopped run (the old fixed default)")
    ap.add_argument("--horizon", type=int, default=100, help="train every run this far for the best-save comparison")
    ap.add_argument("--measure-steps", type=int, nargs="+", default=[25, 50, 100], help="saves measured for the best save")
    ap.add_argument("-n", type=int, default=8, help="images per editing prompt per measurement")
    ap.add_argument("--fidelity-n", type=int, default=24, help="images of 'a photo of a S*' per measurement (fidelity)")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th grid point starting at K (parallel processes)")
    ap.add_argument("--quick", action="store_true", help="1 concept, 1 image count, 1 vector count, 1 seed")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "textinv-early-stop")
    ap.add_argument("--table", type=Path, default=None, help="only write this markdown table from OUT/results.json")
    ap.add_argument("--overhead", action="store_true",
                    help="time 40 steps with the evaluation on and off, interleaved, 3 times each (the evaluation's cost)")
    ap.add_argument("--replay", action="store_true",
                    help="re-decide every finished run's stop with the current rule (textinv.stopping), from its saves")
    ap.add_argument("--more-fidelity", type=int, default=0, metavar="N",
                    help="measure N more fidelity images of every finished run's stop, saves and fixed-500 embedding "
                         "(seeds after the first --fidelity-n: the pooled figure is exactly an (fidelity-n + N)-image "
                         "measurement) and re-pick the best save with the pooled figures")
    a = ap.parse_args()
    if a.quick:
        a.concepts, a.images, a.vectors, a.seeds, a.full_seeds = a.concepts[:1], [3], [1], [0], [0]
    return a


def key(concept, images, vectors, seed) -> str:
    return f"{concept}-i{images}-v{vectors}-s{seed}"


def measure(pipe, metric, path_or_none, opts) -> dict:
    """Judge fidelity/editability of the embedding at ``path`` (None: the one applied now)."""
    if path_or_none is not None:
        tk.apply(pipe, formats.load(path_or_none, name=TOKEN))
    opts = dict(opts)
    fidelity_n = opts.pop("fidelity_n")
    try:
        fid = metric(pipe, TOKEN, probes=metric.fidelity_only(), **dict(opts, n=fidelity_n))["fidelity"]
        edit = metric(pipe, TOKEN, probes=[p for p in metric.probes if p.want], **opts)["editability"]
    finally:
        tk.remove(pipe)
    return {"fidelity": fid, "editability": edit, "score": evaluate.tradeoff_score(fid, edit)}


def run_config(a, concept, k, v, seed, **over) -> TrainConfig:
    """One grid point's training settings: ``textinv train``'s defaults on the demo's captioned pictures."""
    return TrainConfig(images=str(a.out / "images" / f"{concept}-s{seed}-i{k}"), token=TOKEN, init=INIT_WORD, vectors=v,
                       templates=str(a.out / "templates.txt"), flip=False, seed=seed, progress=False, **over)


def one_run(pipe, a, concept, k, v, seed) -> dict:
    folder = a.out / "images" / f"{concept}-s{seed}-i{k}"
    if not folder.is_dir():
        render_training_set(concept, folder, n=k, seed=seed, captions=True)
    run = a.out / "runs" / key(concept, k, v, seed)
    shutil.rmtree(run, ignore_errors=True)
    metric = evaluate.JudgeMetric(concept)
    opts = dict(n=a.n, fidelity_n=a.fidelity_n, seed=1000 * seed, steps=a.sample_steps, guidance=models.defaults(None).guidance)
    cfg = run_config(a, concept, k, v, seed, steps=a.ceiling, save_every=5, out=str(run))
    res = train(cfg, pipe=pipe)
    auto = {"step": res.steps, "seconds": round(res.seconds, 2), "stopped": res.stopped is not None,
            **measure(pipe, metric, None, opts)}
    tk.remove(pipe)
    curve = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    seconds = res.seconds  # training time of the run so far, all parts
    if res.steps < a.horizon:
        seconds += train(cfg, pipe=pipe, resume=True, early_stop=False, steps=a.horizon).seconds
        tk.remove(pipe)
        shutil.copy(run / "c.safetensors", run / "embeddings" / f"c-{a.horizon}.safetensors")  # the last step is no save
    saves = {}
    for s in a.measure_steps:
        path = run / "embeddings" / f"c-{s}.safetensors"
        if path.is_file():
            saves[s] = measure(pipe, metric, path, opts)
    best = evaluate.best_step([{"step": s, **m} for s, m in saves.items()])
    out = {"concept": concept, "images": k, "vectors": v, "seed": seed, "auto": auto, "saves": saves, "best_step": best,
           "best": saves.get(best), "eval_curve": [[c["step"], c["eval_loss"]] for c in curve if "eval_loss" in c]}
    if seed in a.full_seeds:
        if max(res.steps, a.horizon) < a.ceiling:
            seconds += train(cfg, pipe=pipe, resume=True, early_stop=False, steps=a.ceiling).seconds
            tk.remove(pipe)
        out["fixed"] = {"step": a.ceiling, "seconds": round(seconds, 2), **measure(pipe, metric, run / "c.safetensors", opts)}
    return out


def main() -> None:
    a = parse()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.replay:
        replay(a)
        return
    if a.more_fidelity:
        more_fidelity(a)
        return
    if a.overhead:
        overhead(a)
        return
    if a.table:
        kept = a.table.read_text() if a.table.is_file() else ""
        kept = kept[kept.index("\n## ") + 1:] if "\n## " in kept else ""  # the hand-written sections stay
        write_text(a.table, markdown(a) + ("\n" + kept if kept else ""))
        print(a.table.read_text())
        return
    shard, shards = (int(x) for x in a.shard.split("/"))
    results_path = a.out / f"results-{shard}of{shards}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    pipe = load_pipeline()
    world_templates(a.out, True)  # OUT/templates.txt, which run_config names
    grid = [(c, k, v, s) for s in a.seeds for c in a.concepts for k in a.images for v in a.vectors][shard::shards]
    todo = [g for g in grid if key(*g) not in results]
    print(f"{len(grid)} runs in this shard ({len(grid) - len(todo)} done); work folder {a.out}", flush=True)
    t0 = time.perf_counter()
    for i, g in enumerate(todo):
        r = one_run(pipe, a, *g)
        results[key(*g)] = r
        write_text(results_path, json.dumps(results, indent=1))
        left = (time.perf_counter() - t0) / (i + 1) * (len(todo) - i - 1) / 60
        best = r["best"] or {}
        print(f"[{i + 1}/{len(todo)}] {key(*g)}: auto stop {r['auto']['step']} (fidelity {r['auto']['fidelity']:.2f}, "
              f"score {r['auto']['score']:.2f}); best save {r['best_step']} (fidelity {best.get('fidelity', 0):.2f}, "
              f"score {best.get('score', 0):.2f}); {left:.0f} min left", flush=True)


def overhead(a) -> None:
    """Seconds per step with the evaluation (every 5 steps, 8 items; 40 steps: the rule cannot stop yet)
    and without, interleaved in one process, for batch 4 (the default) and 1."""
    folder = a.out / "images" / "overhead"
    if not folder.is_dir():
        render_training_set(a.concepts[0], folder, n=3, seed=0, captions=True)
    pipe, templates = load_pipeline(), world_templates(a.out, True)
    for batch in (4, 1):
        times = {True: [], False: []}
        for rep in range(3):
            for on in (True, False):
                r = train(images=str(folder), token=TOKEN, init=INIT_WORD, templates=str(templates), flip=False, steps=40,
                          batch=batch, early_stop=on, out=str(a.out / "overhead" / f"{batch}-{on}-{rep}"), progress=False, pipe=pipe)
                tk.remove(pipe)
                times[on].append(r.seconds / 40)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"batch {batch}: {off:.4f} s/step without the evaluation, {on:.4f} with it: +{on / off - 1:.0%}")


def eval_curve(pipe, a, r, run: Path) -> list[tuple[int, float]]:
    """The run's evaluation-loss curve recomputed from its saves (every 5 steps) with the trainer's own
    evaluation batch and code: the same numbers the trainer logs (checked against its log: equal to
    the log's 6 decimals), so the rule decides on them exactly as it would in training."""
    import torch

    from textinv import data, training as T

    cfg = run_config(a, r["concept"], r["images"], r["vectors"], r["seed"], out=str(a.out / "scratch"))
    model = T._frozen_model(cfg, pipe, torch.device("cpu"))
    word = T._Word(model.pipe, cfg, torch.device("cpu"))
    batches = T._Batches(cfg, model, T.plan(cfg, data.load_images(cfg.images), [], model.resolution, model.bucket_step), 0)
    groups = batches.fixed_eval(cfg.eval_batch)
    curve = [(0, batches.eval_loss(groups))]
    try:
        for step in range(cfg.eval_every, a.ceiling, cfg.eval_every):
            path = run / "embeddings" / f"c-{step}.safetensors"
            if not path.is_file():
                break
            with torch.no_grad():
                word.params[0].copy_(formats.load(path, name=TOKEN).vectors["clip"])
            curve.append((step, batches.eval_loss(groups)))
    finally:
        tk.remove(pipe)
    logged = dict(r["eval_curve"])
    assert all(abs(logged[s] - v) < 1e-6 for s, v in curve if s in logged), "recomputed curve differs from the log"
    return curve


def replay(a) -> None:
    """Apply the current stopping rule to every finished run: its stop step, measured (saves every 5
    steps are kept; a run whose curve ends before the rule stops is trained on, 100 steps at a time)."""
    pipe = load_pipeline()
    rule = stopping.Rule()
    for results_path in sorted(a.out.glob("results-*of*.json")):
        results = json.loads(results_path.read_text())
        for name, r in results.items():
            run = a.out / "runs" / name
            while True:
                curve = eval_curve(pipe, a, r, run)
                i = stopping.stop_index([v for _, v in curve], rule)
                last = curve[-1][0]
                if i is not None or last + 5 >= a.ceiling:
                    break
                import torch

                if torch.load(run / "state.pt", weights_only=True)["step"] > last:  # a save is missing: cannot go on
                    raise SystemExit(f"{name}: no save at step {last + 5} but the run went further; rerun it")
                cfg = run_config(a, r["concept"], r["images"], r["vectors"], r["seed"], steps=min(a.ceiling, last + 105),
                                 save_every=5, out=str(run), resume=True, early_stop=False)
                train(cfg, pipe=pipe)
                tk.remove(pipe)
                shutil.copy(run / "c.safetensors", run / "embeddings" / f"c-{cfg.steps}.safetensors")
            step = curve[i][0] if i is not None else a.ceiling
            known = {r["auto"]["step"]: r["auto"], **{int(k): m for k, m in r["saves"].items()}}
            if "fixed" in r:
                known[a.ceiling] = r["fixed"]
            if step in known:
                m = {k: known[step][k] for k in ("fidelity", "editability", "score")}
                seconds = r["auto"]["seconds"] / max(1, r["auto"]["step"]) * step
                r["auto"] = {"step": step, "seconds": round(seconds, 2), "stopped": i is not None, "rule": rule.describe(), **m}
            else:
                metric = evaluate.JudgeMetric(r["concept"])
                opts = dict(n=a.n, fidelity_n=r.get("fidelity_n", a.fidelity_n), seed=1000 * r["seed"], steps=a.sample_steps,
                            guidance=models.defaults(None).guidance)
                path = run / "embeddings" / f"c-{step}.safetensors"
                m = measure(pipe, metric, path if path.is_file() else run / "c.safetensors", opts)
                per_step = r["auto"]["seconds"] / max(1, r["auto"]["step"])
                r["auto"] = {"step": step, "seconds": round(per_step * step, 2), "stopped": i is not None,
                             "replayed": True, "rule": rule.describe(), **m}
                print(f"{name}: stop {step}, fidelity {m['fidelity']:.2f} (best save {r['best']['fidelity']:.2f})", flush=True)
            write_text(results_path, json.dumps(results, indent=1))


def more_fidelity(a) -> None:
    """Finer fidelity for every finished run: 24 images resolve 0.042, coarser than the 0.02 target.
    Image ``i`` of a measurement is sampled with seed ``base + i`` (``generation.images``), so measuring
    N images from ``base + fidelity_n`` and pooling gives exactly the (fidelity_n + N)-image measurement,
    paired across the run's steps as before.  Editability keeps its images; the best save is re-picked
    by the same rule on the pooled scores."""
    import torch

    shard, shards = (int(x) for x in a.shard.split("/"))
    pipe = load_pipeline()
    for results_path in sorted(a.out.glob("results-*of*.json"))[shard::shards]:  # one writer per file
        results = json.loads(results_path.read_text())
        names = sorted(results)
        for i, name in enumerate(names):
            r = results[name]
            run = a.out / "runs" / name
            have = r.get("fidelity_n", a.fidelity_n)
            if have >= a.fidelity_n + a.more_fidelity:
                continue
            metric = evaluate.JudgeMetric(r["concept"])
            opts = dict(n=a.more_fidelity, seed=1000 * r["seed"] + have, steps=a.sample_steps,
                        guidance=models.defaults(None).guidance)
            last = torch.load(run / "state.pt", weights_only=True)["step"]

            def path_of(step: int) -> Path:
                p = run / "embeddings" / f"c-{step}.safetensors"
                if p.is_file():
                    return p
                if step == last:
                    return run / "c.safetensors"
                raise SystemExit(f"{name}: no embedding of step {step}")

            cache: dict[int, float] = {}
            records = [(r["auto"]["step"], r["auto"]), *((int(s), m) for s, m in r["saves"].items())]
            if "fixed" in r:
                records.append((r["fixed"]["step"], r["fixed"]))
            for step, m in records:
                if step not in cache:
                    tk.apply(pipe, formats.load(path_of(step), name=TOKEN))
                    try:
                        cache[step] = metric(pipe, TOKEN, probes=metric.fidelity_only(), **opts)["fidelity"]
                    finally:
                        tk.remove(pipe)
                m["fidelity"] = (m["fidelity"] * have + cache[step] * a.more_fidelity) / (have + a.more_fidelity)
                m["score"] = evaluate.tradeoff_score(m["fidelity"], m["editability"])
            r["best_step"] = evaluate.best_step([{"step": int(s), **m} for s, m in r["saves"].items()])
            r["best"] = r["saves"].get(str(r["best_step"]))  # JSON keys: always strings
            r["fidelity_n"] = have + a.more_fidelity
            write_text(results_path, json.dumps(results, indent=1))
            print(f"[{i + 1}/{len(names)}] {name}: stop {r['auto']['step']} fidelity {r['auto']['fidelity']:.3f}, "
                  f"best save {r['best_step']} {r['best']['fidelity']:.3f} ({have + a.more_fidelity} images)", flush=True)


def load_results(out: Path) -> dict:
    merged = {}
    for p in sorted(out.glob("results-*of*.json")):
        merged.update(json.loads(p.read_text()))
    return merged


def fixed_steps(runs: list[dict], ceiling: int) -> list[tuple[int, list[tuple[float, float]]]]:
    """(step, [(fidelity there, best save's fidelity)]) for each measured save and the fixed ceiling:
    how a rule that ignores the curve would fare on the same test."""
    steps = sorted({int(s) for r in runs for s in r["saves"]})
    out = [(s, [(r["saves"][str(s)]["fidelity"], r["best"]["fidelity"]) for r in runs if r["best"] and str(s) in r["saves"]])
           for s in steps]
    out.append((ceiling, [(r["fixed"]["fidelity"], r["best"]["fidelity"]) for r in runs if r["best"] and "fixed" in r]))
    return out


def _f(x, d=2):
    return "—" if x is None else f"{x:.{d}f}"


def markdown(a) -> str:
    runs = list(load_results(a.out).values())
    if not runs:
        sys.exit(f"no results in {a.out}")
    rule = stopping.Rule()
    fidelity_n = sorted({r.get("fidelity_n", a.fidelity_n) for r in runs})
    close = [r for r in runs if r["best"] and r["auto"]["fidelity"] >= r["best"]["fidelity"] - 0.02]
    med = statistics.median(r["auto"]["step"] for r in runs)
    fixed = [r for r in runs if "fixed" in r]
    lines = [
        "# Early stopping on the mini world",
        "",
        f"`python benchmarks/early_stop.py` — {len(runs)} runs: every unnamed shape × {sorted({r['images'] for r in runs})} "
        f"images × {sorted({r['vectors'] for r in runs})} vectors × seeds {sorted({r['seed'] for r in runs})}, "
        f"`textinv train`'s defaults (batch {TrainConfig.batch}, lr {TrainConfig.lr}, early stopping on, --steps "
        f"{a.ceiling} as the ceiling; evaluation batch of {TrainConfig.eval_batch} every {TrainConfig.eval_every} steps) "
        f"on the demo's captioned pictures. Rule: stop when {rule.describe()}. Judge-measured: fidelity from "
        f"{'/'.join(map(str, fidelity_n))} images of 'a photo of a S*', editability from {a.n} images of each editing prompt, one sampling "
        f"seed per run (the same images at every step). Best save: the best-step rule of `textinv eval` over the saves "
        f"at steps {a.measure_steps}. {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})."
        + (f" {sum('rule' in r['auto'] for r in runs)} runs' stops were re-decided with this rule by `--replay` on "
           "their evaluation curves recomputed from their saves (the trainer's own numbers: asserted equal to its "
           "log); their seconds to stop are the run's seconds per step × the stop step." if any('rule' in r['auto'] for r in runs) else ""),
        "",
        f"- **Median stop: step {med:g}** ({a.ceiling / med:.1f}× fewer steps than the fixed {a.ceiling}); "
        f"runs that stopped before the ceiling: {sum(r['auto']['stopped'] for r in runs)}/{len(runs)}.",
        f"- **Fidelity at the stop within 0.02 of the best save (or above it): {len(close)}/{len(runs)} runs "
        f"({len(close) / len(runs):.0%})**.",
        "- The same test for stopping at one fixed step in every run: " + "; ".join(
            f"step {step}: {sum(f >= b - 0.02 for f, b in pairs)}/{len(pairs)} ({sum(f >= b - 0.02 for f, b in pairs) / len(pairs):.0%})"
            for step, pairs in fixed_steps(runs, a.ceiling) if pairs) + ".",
        "",
        "| images | vectors | stop step (median, range) | s to stop | fidelity stop / best | editability stop / best | score stop / best | best step (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    for k in sorted({r["images"] for r in runs}):
        for v in sorted({r["vectors"] for r in runs}):
            rs = [r for r in runs if r["images"] == k and r["vectors"] == v and r["best"]]
            if not rs:
                continue
            steps = [r["auto"]["step"] for r in rs]
            lines.append(
                f"| {k} | {v} | {statistics.median(steps):g} ({min(steps)}–{max(steps)}) | {_f(mean([r['auto']['seconds'] for r in rs]), 1)} "
                f"| {_f(mean([r['auto']['fidelity'] for r in rs]))} / {_f(mean([r['best']['fidelity'] for r in rs]))} "
                f"| {_f(mean([r['auto']['editability'] for r in rs]))} / {_f(mean([r['best']['editability'] for r in rs]))} "
                f"| {_f(mean([r['auto']['score'] for r in rs]))} / {_f(mean([r['best']['score'] for r in rs]))} "
                f"| {statistics.median(r['best_step'] for r in rs):g} |")
    if fixed:
        lines += ["", f"Against the fixed {a.ceiling} steps ({len(fixed)} runs: seeds {sorted({r['seed'] for r in fixed})}):", "",
                  "| | steps (median) | seconds (mean) | fidelity | editability | score |", "|---|---|---|---|---|---|"]
        for name, get in (("auto stop", lambda r: r["auto"]), ("best save", lambda r: dict(r["best"], step=r["best_step"], seconds=None)),
                          (f"fixed {a.ceiling}", lambda r: r["fixed"])):
            rows = [get(r) for r in fixed]
            secs = [x["seconds"] for x in rows if x.get("seconds") is not None]
            lines.append(f"| {name} | {statistics.median(x['step'] for x in rows):g} | {_f(mean(secs), 1) if secs else '—'} "
                         f"| {_f(mean([x['fidelity'] for x in rows]))} | {_f(mean([x['editability'] for x in rows]))} "
                         f"| {_f(mean([x['score'] for x in rows]))} |")
    worse = sorted((r for r in runs if r["best"] and r not in close), key=lambda r: r["auto"]["fidelity"] - r["best"]["fidelity"])
    if worse:
        lines += ["", "Runs whose stop is more than 0.02 below the best save's fidelity:", ""]
        lines += [f"- {key(r['concept'], r['images'], r['vectors'], r['seed'])}: stop {r['auto']['step']} fidelity "
                  f"{r['auto']['fidelity']:.2f}, best save {r['best_step']} {r['best']['fidelity']:.2f}" for r in worse]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
