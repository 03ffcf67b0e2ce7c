"""``textinv train-many`` against one ``textinv train`` per concept: wall time, concepts per hour,
training samples per second.

Ten shapes of the mini world (the four it has no word for, then named ones), five renders each
(``textinv world render SHAPE -n 5``), each learned as ``<SHAPE>`` from ``shape`` with the same
settings.  Arm 1: ten ``textinv train`` commands, one after the other.  Arm 2: one ``textinv
train-many`` on a manifest of the same ten rows.  Arm 3: the same ``textinv train-many --pack N``
(N concepts at a time in one batch; ``--pack``, default all of them).  Each arm starts with an empty
latent cache of its own and is timed from the first command's start to the last one's end (start-up,
model loading, latent encoding and training: what a user waits for).  Arm 2's embeddings are compared
with arm 1's byte for byte, arm 3's to float32 rounding (the largest difference, relative to the
largest entry), and each arm's fidelity is judged (the demo's probe "a photo of a S*", ``-n`` images:
the share the world's judge sees as the shape).

Then the training loops alone, in this process on one loaded pipeline and a warm latent cache:
training samples per second (concepts × steps × batch over the time of setting them up, training
and saving them) with the concepts one at a time and N at a time, for each N of ``--packs`` (after a
short warm-up run).  ``--rates-only`` skips the arms (``benchmarks/gpu_check.sh`` runs it so).
Asserts nothing.

    python benchmarks/train_many.py                    # 10 concepts, --steps 100 --no-early-stop
    python benchmarks/train_many.py --concepts 2 --steps 3 -n 2 --packs 1,2   # a smoke run of the script
    python benchmarks/train_many.py --rates-only --device cuda --packs 1,2,5,10
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

import torch

from textinv import formats, packing, runs, tokens, training
from textinv.demo import INIT_WORD
from textinv.evaluate import FIDELITY_PROBE, judge_scores
from textinv.formats import load
from textinv.models import load_pipeline
from textinv.settings import TrainConfig
from textinv.world import spec

def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", type=int, default=10, help="how many shapes (unnamed ones first)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pack", type=int, default=None, help="arm 3's --pack (default: every concept at once)")
    ap.add_argument("--packs", default="1,2,5,10", help="concepts at a time, for the samples per second")
    ap.add_argument("--rates-only", action="store_true", help="only the samples per second (no arms, no judging)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the arms' commands stay on the CPU too
    work = args.out or Path(tempfile.mkdtemp(prefix="textinv-train-many-"))
    shapes = (spec.unnamed_shapes() + spec.named_shapes())[:args.concepts]
    for shape in shapes:
        textinv("world", "render", shape, "-n", "5", str(work / "images" / shape), cache=work / "cache-render")
    device = f"{args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else args.device
    print(f"{len(shapes)} concepts of the mini world, --steps {args.steps} --batch {args.batch} --no-early-stop, "
          f"device {device}, {len(os.sched_getaffinity(0))} CPU cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    try:
        if not args.rates_only:
            arms(args, work, shapes)
        rates(args, work, shapes, [int(n) for n in args.packs.split(",")])
    except KeyboardInterrupt:  # a time limit (gpu_check.sh) or Ctrl-C: the rows printed so far stand
        print("interrupted: the rows above are what was measured", file=sys.stderr)
        sys.exit(130)


def arms(args, work: Path, shapes: list[str]) -> None:
    """The three arms, each as a user runs it; their embeddings compared, their fidelity judged."""
    settings = ("--init", INIT_WORD, "--steps", str(args.steps), "--batch", str(args.batch), "--no-early-stop")
    manifest = work / "concepts.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("token", "images")] + [(f"<{s}>", str(work / "images" / s)) for s in shapes])
    pack = args.pack or len(shapes)

    def separate():
        for s in shapes:
            textinv("train", "--images", str(work / "images" / s), "--token", f"<{s}>", *settings,
                    "--out", str(work / "separate" / s), cache=work / "cache-separate")

    def together(folder: str, *more: str):
        return lambda: textinv("train-many", str(manifest), *settings, *more, "--out-dir", str(work / folder),
                               cache=work / f"cache-{folder}")

    labels = {"separate": f"{len(shapes)} × train", "many": "train-many", "packed": f"--pack {pack}"}
    seconds = {"separate": timed(separate), "many": timed(together("many")), "packed": timed(together("packed", "--pack", str(pack)))}
    print(f"{'':14} {'wall s':>8} {'concepts/hour':>14} {'samples/s':>10} {'speed-up':>9}")
    for arm, s in seconds.items():
        print(f"{labels[arm]:14} {s:8.1f} {len(shapes) * 3600 / s:14.0f} {len(shapes) * args.steps * args.batch / s:10.1f} "
              f"{seconds['separate'] / s:8.2f}×")
    same = [runs.final(work / "separate" / s).read_bytes() == runs.final(work / "many" / s).read_bytes() for s in shapes]
    print(f"train-many embeddings byte-identical to train's: {sum(same)} of {len(shapes)}")
    print(f"--pack {pack} embeddings: largest difference to train's, relative to the largest entry: "
          f"{max(difference(work / 'separate' / s, work / 'packed' / s) for s in shapes):.1e}")
    if args.n:
        judge(work, shapes, args.n, labels)


def difference(a: Path, b: Path) -> float:
    va, vb = formats.load(runs.final(a)).vectors, formats.load(runs.final(b)).vectors
    return max(float((va[k] - vb[k]).abs().max() / vb[k].abs().max()) for k in vb)


def rates(args, work: Path, shapes: list[str], packs: list[int]) -> None:
    """Training samples per second on one loaded pipeline, the concepts ``n`` at a time for each ``n``
    of ``packs``: setting them up (latents from a warm cache), training and saving them, timed together."""
    os.environ["TEXTINV_CACHE"] = str(work / "cache-rates")
    dev = torch.device(args.device)
    pipe = training.load_model(TrainConfig(images="", token="", model="mini"), dev)

    def configs(folder: str, steps: int) -> list[TrainConfig]:
        return [TrainConfig(images=str(work / "images" / s), token=f"<{s}>", model="mini", init=INIT_WORD, steps=steps,
                            batch=args.batch, early_stop=False, progress=False, out=str(work / folder / s)) for s in shapes]

    packing.train_packed(configs("rates-warm-up", min(args.steps, 5)), pipe, max(packs), dev)  # the cache, kernels
    print(f"training loops on one loaded pipeline: {len(shapes)} concepts × {args.steps} steps × batch {args.batch}")
    print(f"{'at a time':>10} {'s':>8} {'samples/s':>10} {'vs one':>8}")
    first = None
    for n in packs:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        s = timed(lambda: packing.train_packed(configs(f"rates-{n}", args.steps), pipe, n, dev))
        rate = len(shapes) * args.steps * args.batch / s
        first = first or rate
        print(f"{n:>10} {s:8.1f} {rate:10.1f} {rate / first:7.2f}×", flush=True)


def judge(work: Path, shapes: list[str], n: int, labels: dict) -> None:
    """Fidelity of each arm's embeddings, the demo's way (same sampling seed for every arm)."""
    pipe = load_pipeline("mini")
    print(f"{'fidelity':14} " + " ".join(f"{s:>8}" for s in shapes) + f" {'mean':>8}")
    for arm, label in labels.items():
        scores = []
        for s in shapes:
            tokens.apply(pipe, load(runs.final(work / arm / s)))
            scores.append(judge_scores(pipe, f"<{s}>", "shape", s, n=n, probes=[FIDELITY_PROBE])["fidelity"])
            tokens.remove(pipe)
        print(f"{label:14} " + " ".join(f"{x:8.2f}" for x in scores) + f" {sum(scores) / len(scores):8.2f}")


if __name__ == "__main__":
    main()
