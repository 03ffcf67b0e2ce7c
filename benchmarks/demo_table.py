"""The demo's targets, measured: every unnamed shape of the mini world × several seeds.

For each (concept, seed): render 5 images, train with the demo settings, and judge fidelity and
editability against the init word's baseline.  Prints the per-concept table (means over seeds)
and the overall means.  Usage: python benchmarks/demo_table.py [--seeds 0 1 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from textinv import demo
from textinv.world import spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--concepts", nargs="+", default=spec.unnamed_shapes())
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="textinv-demo-table-")))
    ap.add_argument("--model", default=None, help="default: the built-in mini model")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--vectors", type=int, default=None)
    ap.add_argument("--no-captions", action="store_true", help="train on the trigger alone, no IMG.txt captions")
    args = ap.parse_args()
    settings = demo.DemoSettings()
    for key in ("steps", "lr", "batch", "vectors"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    settings.captions = not args.no_captions
    rows = {}
    for concept in args.concepts:
        for seed in args.seeds:
            m = demo.run(args.out / f"{concept}-{seed}", concept=concept, seed=seed, settings=settings,
                         model=args.model, echo=lambda *_: None)
            rows.setdefault(concept, []).append(m)
            print(f"{concept:<8} seed {seed}: fidelity {m['fidelity']:.2f} (baseline {m['baseline_fidelity']:.2f}), "
                  f"editability {m['editability']:.2f}, train {m['train_seconds']:.0f} s", flush=True)
    print(f"\n| concept | fidelity | baseline fidelity | editability | baseline editability | train s |")
    print("|---|---|---|---|---|---|")
    keys = ["fidelity", "baseline_fidelity", "editability", "baseline_editability", "train_seconds"]
    for concept, ms in rows.items():
        print(f"| {concept} | " + " | ".join(f"{np.mean([m[k] for m in ms]):.2f}" for k in keys) + " |")
    allm = [m for ms in rows.values() for m in ms]
    print("| **all** | " + " | ".join(f"{np.mean([m[k] for m in allm]):.2f}" for k in keys) + " |")
    (args.out / "table.json").write_text(json.dumps({c: ms for c, ms in rows.items()}, indent=1, default=str))
    print(f"\nsettings {settings.__dict__}; details in {args.out}")


if __name__ == "__main__":
    main()
