"""The demo's targets, measured: every unnamed shape of the mini world × several seeds.

For each (concept, seed): render 5 images, train with the demo settings (the model's own, from its
textinv.json), and judge fidelity and editability against the init word's baseline.  Prints the
per-concept table (means over seeds) and the overall means.

``--encoders`` takes several values and repeats everything for each: which text encoder carries a
concept (docs/training.md), e.g. on the Flux.1-shaped model::

    python benchmarks/demo_table.py --model mini-flow --concepts drop arrow --seeds 0 1 --encoders clip_l t5 clip_l,t5

Usage: python benchmarks/demo_table.py [--model mini-flow] [--seeds 0 1 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from textinv import demo
from textinv.world import spec

KEYS = ["fidelity", "baseline_fidelity", "editability", "baseline_editability", "train_steps", "train_seconds"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--concepts", nargs="+", default=spec.unnamed_shapes())
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="textinv-demo-table-")))
    ap.add_argument("--model", default=None, help="default: the built-in mini model")
    ap.add_argument("--encoders", nargs="+", default=[None], help="one table per value (default: every encoder learns)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", default=None)
    ap.add_argument("--lr-t5", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--vectors", type=int, default=None)
    ap.add_argument("--no-captions", action="store_true", help="train on the trigger alone, no IMG.txt captions")
    return ap.parse_args()


def row(label: str, ms: list[dict]) -> str:
    return f"| {label} | " + " | ".join(f"{np.mean([m[k] for m in ms]):.2f}" for k in KEYS) + " |"


def main() -> None:
    args = parse_args()
    base = demo.DemoSettings.for_model(args.model)
    for key in ("steps", "lr", "lr_t5", "batch", "vectors"):
        if getattr(args, key) is not None:
            setattr(base, key, getattr(args, key))
    base.captions = not args.no_captions
    tables = {}
    for encoders in args.encoders:
        settings = dataclasses.replace(base, encoders=encoders or base.encoders)
        rows = tables.setdefault(encoders or "all", {})
        for concept in args.concepts:
            for seed in args.seeds:
                m = demo.run(args.out / f"{encoders or 'all'}-{concept}-{seed}", concept=concept, seed=seed,
                             settings=settings, model=args.model, echo=lambda *_: None, progress=False)
                rows.setdefault(concept, []).append(m)
                print(f"{encoders or 'all':<10}{concept:<8} seed {seed}: fidelity {m['fidelity']:.2f} (baseline "
                      f"{m['baseline_fidelity']:.2f}), editability {m['editability']:.2f}, {m['train_steps']} steps, "
                      f"train {m['train_seconds']:.0f} s", flush=True)
    print("\n| encoders | concept | fidelity | baseline fidelity | editability | baseline editability | steps | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for encoders, rows in tables.items():
        for concept, ms in rows.items():
            print(row(f"{encoders} | {concept}", ms))
        print(row(f"{encoders} | **all**", [m for ms in rows.values() for m in ms]))
    (args.out / "table.json").write_text(json.dumps(tables, indent=1, default=str))
    print(f"\nsettings {base.__dict__} (encoders per table); details in {args.out}")


if __name__ == "__main__":
    main()
