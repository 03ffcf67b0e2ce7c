"""``textinv bias`` on one process against two (``torchrun``, CPU processes over gloo): wall time,
and whether the two give exactly the same report.

The run is ``textinv demo --bias``'s on the mini model, as a command: the word "ball", its colour,
re-learned from the curated set (a token per colour, per-value recipe), with the world's
captioned templates, measured before, asked by name (``--named``) and after.  Arm 1: ``python -m
textinv bias …``; arm 2: the same command under ``torchrun --nproc_per_node 2``, which spreads
each measurement's prompts and the colour tokens over the two processes (``textinv/spread.py``).
Every process runs ``--threads`` torch threads (``OMP_NUM_THREADS``); each arm starts with an empty
latent cache of its own and is timed from the command's start to its end (start-up, model
loading, measuring and training: what a user waits for).  The arms' bias.json (less its seconds
and paths), report.html, chart and tokens are compared byte for byte.  Asserts nothing.

    python benchmarks/bias_spread.py                                    # 6 colours, -n 60, --steps 300
    python benchmarks/bias_spread.py --values red,blue -n 2 --steps 2 --no-named   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from textinv.demo import DemoSettings, render_bias_set, world_templates
from textinv.world import spec

COMPARED = ("report.html", "bias.png")  # besides bias.json and the tokens


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", default=",".join(spec.labels("colour")), help="colours (default: all six)")
    ap.add_argument("-n", type=int, default=60, help="images per prompt (textinv demo --bias: 60)")
    ap.add_argument("--steps", type=int, default=300, help="training steps per token (textinv demo --bias: 300)")
    ap.add_argument("--named", action=argparse.BooleanOptionalAction, default=True, help="also measure asked by name")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each arm, alternating (the median is compared)")
    ap.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    return ap.parse_args()


def command(args, work: Path, out: Path) -> list[str]:
    curated, templates = work / "curated", work / "templates.txt"
    return ["-m", "textinv", "bias", spec.BIASED["shape"], "--attribute", f"colour={args.values}", "--images", str(curated),
            "--templates", str(templates), "--init", DemoSettings().bias_init, "-n", str(args.n), "--steps", str(args.steps),
            *(["--named"] if args.named else []), "--out", str(out)]


def run(args, work: Path, processes: int, name: str) -> float:
    """One arm into WORK/NAME with its own empty latent cache; its wall time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TEXTINV_CACHE=str(work / f"cache-{name}"))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *launcher, *command(args, work, work / name)], env=env, capture_output=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{name}: exit {done.returncode}\n{done.stderr.decode()[-3000:]}")
    return seconds


def identical(a: Path, b: Path) -> list[str]:
    """What differs between two arms' outputs (empty: nothing)."""
    def figures(folder: Path) -> dict:
        result = json.loads((folder / "bias.json").read_text())
        for key in ("seconds", "train_seconds", "embedding"):  # the time taken, where the tokens are
            result.pop(key)
        return result

    differ = [] if figures(a) == figures(b) else ["bias.json"]
    tokens = sorted(p.name for p in (a / "embeddings").glob("*")) if (a / "embeddings").is_dir() else []
    for name in [*COMPARED, *(f"embeddings/{t}" for t in tokens)]:
        if (a / name).read_bytes() != (b / name).read_bytes():
            differ.append(name)
    return differ


def main() -> None:
    args = parse()
    work = args.out or Path(tempfile.mkdtemp(prefix="textinv-bias-spread-"))
    render_bias_set(work / "curated")
    world_templates(work, captions=True)
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeat):
        for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
            times[processes].append(run(args, work, processes, f"p{processes}-{r}"))
    values = args.values.split(",")
    print(f"textinv bias ball, {len(values)} colours, -n {args.n}, --steps {args.steps}{', --named' if args.named else ''}; "
          f"{len(os.sched_getaffinity(0))} CPU cores, {args.threads} torch thread(s) a process, {args.repeat} run(s) an arm")
    print(f"{'':12} {'wall s':>8}   runs")
    for processes, seconds in times.items():
        runs = ", ".join(f"{s:.1f}" for s in seconds)
        print(f"{processes} process{'es' if processes > 1 else '':2} {statistics.median(seconds):8.1f}   {runs}")
    print(f"2 processes take {statistics.median(times[2]) / statistics.median(times[1]):.2f}× the time of 1 "
          f"({statistics.median(times[1]) / statistics.median(times[2]):.2f}× as fast)")
    differ = identical(work / "p1-0", work / "p2-0")
    print("bit-identical: yes (bias.json figures, report.html, bias.png, every token)" if not differ
          else f"bit-identical: NO, differ: {', '.join(differ)}")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
