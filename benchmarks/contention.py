"""How much slower does textinv get when another CPU-bound process shares the cores?

Runs a textinv command (``demo``: the whole loop in a fresh folder; ``train``: 40 steps on the
built-in model) alone and beside a neighbour that keeps one core busy (a plain Python loop, like a
second program or a compile), under each thread setting in ``--settings``:

* ``default``: textinv's own choice (textinv.cpu: one thread per core that nobody else is using);
* ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep instead of spinning);
* ``threads=N``: ``OMP_NUM_THREADS=N`` (``threads=`` the number of cores is torch's own default,
  one OpenMP thread per core, whose threads spin while they wait).

Prints wall-clock seconds and the beside/alone ratio for each setting side by side; asserts nothing.
Run it on otherwise idle cores.  Usage:
  python benchmarks/contention.py [--command demo|train] [--settings default,threads=2,passive] [--neighbours 1]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def busy(stop) -> None:
    """A CPU-bound neighbour: pure Python arithmetic until told to stop."""
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x = (x * 31 + i) % 1_000_003


def command(kind: str, folder: Path) -> list[str]:
    exe = [sys.executable, "-m", "textinv"]
    if kind == "demo":
        return exe + ["demo", "--out", str(folder / "demo")]
    images = folder / "images"
    subprocess.run(exe + ["world", "render", "drop", "-n", "5", str(images)], check=True, capture_output=True)
    return exe + ["train", "--images", str(images), "--token", "<drop>", "--init", "shape", "--steps", "40",
                  "--no-early-stop", "--out", str(folder / "run")]


def environment(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["HF_HUB_OFFLINE"] = "1"
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif setting.startswith("threads="):
        env["OMP_NUM_THREADS"] = setting.split("=", 1)[1]
    elif setting != "default":
        raise SystemExit(f"unknown setting {setting!r}: default, passive or threads=N")
    return env


def timed(kind: str, setting: str, neighbours: int) -> float:
    stop = multiprocessing.Event()
    workers = [multiprocessing.Process(target=busy, args=(stop,), daemon=True) for _ in range(neighbours)]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command(kind, Path(tmp))
        for w in workers:
            w.start()
        try:
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=environment(setting))
            return time.perf_counter() - start
        finally:
            stop.set()
            for w in workers:
                w.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--command", choices=("demo", "train"), default="train")
    ap.add_argument("--settings", default="default,threads=2,passive")
    ap.add_argument("--neighbours", type=int, default=1, help="CPU-bound processes beside the command")
    args = ap.parse_args()
    print(f"{args.command} on {len(os.sched_getaffinity(0))} cores, beside {args.neighbours} busy process(es)")
    print(f"{'setting':<12}{'alone s':>10}{'beside s':>10}{'beside/alone':>14}{'vs default alone':>18}")
    first = None
    for setting in args.settings.split(","):
        alone = timed(args.command, setting, 0)
        beside = timed(args.command, setting, args.neighbours)
        first = first or alone
        print(f"{setting:<12}{alone:>10.1f}{beside:>10.1f}{beside / alone:>13.2f}x{alone / first:>17.2f}x", flush=True)


if __name__ == "__main__":
    main()
