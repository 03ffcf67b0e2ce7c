"""CPU threads for torch on a machine that other programs share.

torch starts one OpenMP thread per core, and its threads spin while they wait for each other.
Beside another busy program they fight it for the cores: on 2 cores, `textinv demo` took 3.3x its
quiet time beside one CPU-bound process, and 1.4x with one thread fewer
(benchmarks/contention.py).  So a command first looks at how busy the cores are and leaves the busy
ones alone.  A user's own OMP_NUM_THREADS wins; the library leaves threads to its caller.
"""
from __future__ import annotations

import os
import time

import torch

STAT = "/proc/stat"


def _jiffies(stat: str = STAT) -> tuple[int, int] | None:
    """(busy, total) CPU time since boot, all cores, from the first line of /proc/stat (Linux)."""
    try:
        with open(stat) as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def busy_cores(interval: float = 0.15, stat: str = STAT) -> float | None:
    """How many cores other programs keep busy now, measured over ``interval`` seconds; None where
    the system does not say."""
    first = _jiffies(stat)
    time.sleep(interval)
    second = _jiffies(stat)
    if first is None or second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (os.cpu_count() or 1)


def threads_for(cores: int, busy: float | None) -> int:
    """One thread per core that nobody else is using, at least one."""
    if busy is None:
        return cores
    return max(1, min(cores, round(cores - busy)))


def share_cores() -> int | None:
    """Give torch one thread per idle core, unless the user chose (OMP_NUM_THREADS).  The number
    of threads, or None where the user's choice stands."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    n = threads_for(len(os.sched_getaffinity(0)), busy_cores())
    if n < torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
