"""``textinv train-many`` against one ``textinv train`` per concept: wall time, concepts per hour.

Ten shapes of the mini world (the four it has no word for, then named ones), five renders each
(``textinv world render SHAPE -n 5``), each learned as ``<SHAPE>`` from ``shape`` with the same
settings.  Arm 1: ten ``textinv train`` commands, one after the other.  Arm 2: one ``textinv
train-many`` on a manifest of the same ten rows.  Each arm starts with an empty latent cache of its
own and is timed from the first command's start to the last one's end (start-up, model loading,
latent encoding and training: what a user waits for).  Both arms' embeddings are compared byte for
byte, and each one's fidelity is judged (the demo's probe "a photo of a S*", ``-n`` images: the
share the world's judge sees as the shape).  Asserts nothing.

    python benchmarks/train_many.py                    # 10 concepts, --steps 100 --no-early-stop
    python benchmarks/train_many.py --concepts 3 --steps 10 -n 4   # a smoke run of the script
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from textinv import runs, tokens
from textinv.demo import INIT_WORD
from textinv.evaluate import FIDELITY_PROBE, judge_scores
from textinv.formats import load
from textinv.models import load_pipeline
from textinv.world import spec


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", type=int, default=10, help="how many shapes (unnamed ones first)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("-n", type=int, default=16, help="images judged per embedding (0: no judging)")
    ap.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    return ap.parse_args()


def textinv(*args: str, cache: Path) -> None:
    env = dict(os.environ, TEXTINV_CACHE=str(cache))
    subprocess.run([sys.executable, "-m", "textinv", *args], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def timed(arm) -> float:
    t0 = time.perf_counter()
    arm()
    return time.perf_counter() - t0


def main() -> None:
    args = parse()
    work = args.out or Path(tempfile.mkdtemp(prefix="textinv-train-many-"))
    shapes = (spec.unnamed_shapes() + spec.named_shapes())[:args.concepts]
    settings = ("--init", INIT_WORD, "--steps", str(args.steps), "--batch", str(args.batch), "--no-early-stop")
    for shape in shapes:
        textinv("world", "render", shape, "-n", "5", str(work / "images" / shape), cache=work / "cache-render")
    manifest = work / "concepts.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("token", "images")] + [(f"<{s}>", str(work / "images" / s)) for s in shapes])

    def separate():
        for s in shapes:
            textinv("train", "--images", str(work / "images" / s), "--token", f"<{s}>", *settings,
                    "--out", str(work / "separate" / s), cache=work / "cache-separate")

    def together():
        textinv("train-many", str(manifest), *settings, "--out-dir", str(work / "many"), cache=work / "cache-many")

    seconds = {"train × N": timed(separate), "train-many": timed(together)}
    print(f"{len(shapes)} concepts of the mini world, --steps {args.steps} --batch {args.batch} --no-early-stop, "
          f"{len(os.sched_getaffinity(0))} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'':12} {'wall s':>8} {'concepts/hour':>14}")
    for arm, s in seconds.items():
        print(f"{arm:12} {s:8.1f} {len(shapes) * 3600 / s:14.0f}")
    print(f"train-many is {seconds['train × N'] / seconds['train-many']:.2f}× as fast")
    same = [runs.final(work / "separate" / s).read_bytes() == runs.final(work / "many" / s).read_bytes() for s in shapes]
    print(f"embeddings byte-identical: {sum(same)} of {len(shapes)}")
    if args.n:
        judge(work, shapes, args.n)


def judge(work: Path, shapes: list[str], n: int) -> None:
    """Fidelity of each arm's embeddings, the demo's way (same sampling seed for both)."""
    pipe = load_pipeline("mini")
    print(f"{'fidelity':12} " + " ".join(f"{s:>8}" for s in shapes))
    for arm in ("separate", "many"):
        scores = []
        for s in shapes:
            tokens.apply(pipe, load(runs.final(work / arm / s)))
            scores.append(judge_scores(pipe, f"<{s}>", "shape", s, n=n, probes=[FIDELITY_PROBE])["fidelity"])
            tokens.remove(pipe)
        print(f"{arm:12} " + " ".join(f"{x:8.2f}" for x in scores))


if __name__ == "__main__":
    main()
