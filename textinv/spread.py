"""Image-heavy work spread over the processes of ``accelerate launch`` (or torchrun).

A command lists its *jobs* the same way whatever the number of processes: ``generate``'s are the
batches of its images, ``eval``'s and ``bias``'s the prompts of a measurement (a prompt's ``n``
images, made and classified as one process makes them).  Process p of N does jobs p, p+N, p+2N, …
(round robin, as ``train-many`` deals its rows), and what the jobs give back is gathered in the
jobs' order.  A job's images keep their seeds (image i of a prompt: SEED+i) and their batch, so the
gathered results are exactly one process's: CPU and GPU kernels round differently by batch size,
which is why a batch, never a single image, is the smallest job.  Only what a job gives back
travels (labels, scores, thumbnails, a batch's pictures for the main process to write); the main
process alone prints and writes.

Alone (a plain command, the library, the web UI) the share is :data:`ALONE`: every job, each done
when its result is asked for, so that a caller's lines and stop checks come between jobs as before.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import PartialState

# How long a process may wait for the others at a gather: while another trains a whole token
# (``bias``), far longer than torch's default (30 minutes for gloo, 10 for NCCL).
WAIT = timedelta(hours=24)


@dataclass(frozen=True)
class Share:
    """This process's place among the launched ones: its index, how many there are, its device
    (None alone: the command's own default) and the gloo group results are gathered over (objects
    travel on the CPU, whatever the devices)."""

    index: int = 0
    count: int = 1
    device: str | None = None
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def mine(self, jobs) -> list:
        """This process's jobs: p, p+N, p+2N, … of ``jobs``."""
        return list(jobs)[self.index::self.count]

    def each(self, jobs, work):
        """``work(job)``'s result for every job, in the jobs' order: alone one at a time, as they are
        asked for; with several processes this one's jobs first, then everyone's, gathered."""
        if self.count == 1:
            return map(work, jobs)
        return iter(self.gather([work(job) for job in self.mine(jobs)]))

    def gather(self, results: list, everywhere: bool = True) -> list:
        """Every process's ``results`` (of its :meth:`mine` jobs, in order) as one list in the jobs'
        order: on every process, or (``everywhere=False``) on the main one, the others getting []."""
        if self.count == 1:
            return list(results)
        parts = [None] * self.count
        if everywhere:
            torch.distributed.all_gather_object(parts, results, group=self.group)
        else:
            torch.distributed.gather_object(results, parts if self.is_main else None, dst=0, group=self.group)
            if not self.is_main:
                return []
        return interleave(parts)

    def close(self, wait: bool = True) -> None:
        """Leave together (``wait``) and close the process group, as training does: a gloo group
        torn down by the interpreter's exit can abort (SIGABRT) the process that leaves last."""
        if self.count == 1:
            return
        if wait:
            torch.distributed.barrier(group=self.group)
        torch.distributed.destroy_process_group()


ALONE = Share()


def interleave(parts: list[list]) -> list:
    """Round-robin shares put back in order: job k is share k mod N's item k div N."""
    count = len(parts)
    return [parts[k % count][k // count] for k in range(sum(len(p) for p in parts))]


def here() -> Share:
    """This process's share: :data:`ALONE` unless ``accelerate launch`` / torchrun started several
    (then accelerate's process group, over gloo between CPU processes, and a gloo group of our own)."""
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return ALONE
    group = torch.distributed.new_group(backend="gloo", timeout=WAIT)
    return Share(state.process_index, state.num_processes, str(state.device), group)


@contextlib.contextmanager
def launched():
    """:func:`here`'s share for a command; at its end the processes leave together and close their
    group (on an error each closes its own at once: the launcher ends the others)."""
    share = here()
    try:
        yield share
    except BaseException:
        share.close(wait=False)
        raise
    share.close()
