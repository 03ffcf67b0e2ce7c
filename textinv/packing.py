"""``textinv train-many --pack N``: several concepts trained in one batch, on one pipeline.

Concepts that share the pipeline and every setting that shapes its calls (:func:`key`) train N at a
time.  Each step, every packed concept draws its micro-batch exactly as it would alone (its own
generator, at its own step: concepts resumed at different steps pack together), the batches go
through one text-encoder pass and one denoiser call per latent size
(:func:`textinv.training.packed_losses`), each concept's loss is the mean over its own rows, and one
backward takes their sum (:func:`textinv.training.packed_gradients`): a concept's vectors, a block
of rows of their own in the trigger table (:class:`textinv.tokens.TriggerEmbedding`), get gradient
from its own rows only.  Each keeps its own optimizer, loss scaler, schedule, early stopping, log,
saves, previews, state and folder (:class:`textinv.training.TrainingRun`), and reads its prompts as
if its word were the only one applied.  A concept that stops (its steps done, early stopping, a
failure) leaves the pack, and the next waiting one joins.

What it gives up: bit-identity.  A row computed in a larger batch rounds differently in float32
(matrix products pick their reduction order by size), so a packed concept's embedding is the one it
trains alone to a tolerance, not bit for bit (docs/scale.md#packing; tests/test_pack.py).
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Callable

from . import interrupts, runs, tokens, training
from .errors import TextinvError
from .settings import TrainConfig


def key(cfg: TrainConfig) -> tuple | None:
    """What concepts must share to train in one pack: the pipeline (model, config, precision,
    gradient checkpointing) and what shapes its calls (resolution, guidance, Clip skip, --compile).
    Batch, steps, learning rate, seed, timesteps, images, captions, masks… may differ.  None: the
    concept trains alone (a per-layer word: its layers condition the UNet through one shared table)."""
    if cfg.per_layer:
        return None
    return (cfg.model, cfg.model_config, cfg.precision, cfg.grad_checkpointing, cfg.resolution, cfg.guidance,
            cfg.clip_skip, cfg.compile)


@dataclass
class _Member:
    """A concept in the pack: its place in the list trained, its run, its folder's lock."""

    index: int
    run: training.TrainingRun
    lock: runs.RunLock
    position: int  # its progress bar's line


def train_packed(configs: list[TrainConfig], pipe, size: int, device, echo=None,
                 on_join: Callable[[int], None] | None = None, names: list[str] | None = None, on_step=None) -> list:
    """Train ``configs`` (one :func:`key`, distinct tokens or not) on ``pipe``, which holds no other
    word, ``size`` at a time, in order: each one's :class:`textinv.training.TrainResult`, or its failure
    in one line.  ``on_join(i)`` hears each concept start; ``names`` call them in an interruption's
    message; ``on_step(step, loss)``, after each concept's every step, stops it there when it returns
    True (as ``textinv.training.train``'s).  Ctrl-C or SIGTERM: every packed concept's last completed step is saved (as ``textinv
    train`` saves it) and :class:`textinv.interrupts.Interrupted` says where each stopped."""
    results: list = [None] * len(configs)
    waiting, members = list(range(len(configs))), []
    with interrupts.caught():
        try:
            while waiting or members:
                _fill(configs, pipe, size, device, (echo, on_join, on_step), waiting, members, results)
                if members:
                    _step(pipe, members, results)
        except KeyboardInterrupt as e:
            kept = [f"{(names or [c.token for c in configs])[m.index]}: {m.run.keep().split(';')[0]}" for m in members]
            raise interrupts.Interrupted(getattr(e, "signum", signal.SIGINT),
                                         "; ".join(kept) or "interrupted before any step: nothing to save") from None
        finally:
            while members:
                _leave(pipe, members, members[0], discard=True)
    return results


def _fill(configs, pipe, size, device, calls, waiting, members, results) -> None:
    """Waiting concepts join while the pack has room, in order; one whose token a member trains waits
    for it to leave (two words of one name cannot be applied at once).  ``calls``: (echo, on_join, on_step)."""
    echo, on_join, on_step = calls
    while len(members) < size:
        busy = {m.run.cfg.token.lower() for m in members}
        i = next((i for i in waiting if configs[i].token.lower() not in busy), None)
        if i is None:
            return
        waiting.remove(i)
        if on_join is not None:
            on_join(i)
        free = min(set(range(size)) - {m.position for m in members})
        member = _join(i, configs[i], pipe, device, (echo, on_step), free, results)
        if member is None:
            continue
        members.append(member)
        _resync(members)
        try:
            over = member.run.begin()  # the evaluation curve's first point
        except TextinvError as e:
            results[i] = str(e)
            _leave(pipe, members, member, discard=True)
            continue
        if over:  # nothing left to train (it had stopped early here)
            _finish(pipe, members, member, results)


def _join(i: int, cfg: TrainConfig, pipe, device, calls, position: int, results: list) -> _Member | None:
    """Concept ``i`` set up beside the members (its word applied, its data ready, its state resumed);
    None where that failed (its line in ``results``), leaving its folder and the pipeline as they were."""
    lock = runs.RunLock(cfg.resolved_out())
    try:
        lock.__enter__()
    except TextinvError as e:
        results[i] = str(e)
        return None
    try:
        run = training.TrainingRun(cfg, pipe, training.Alone(device), calls[0], on_step=calls[1], beside=True,
                                   position=position)
    except BaseException as e:
        lock.discard()
        lock.__exit__(None, None, None)
        state = tokens.state(pipe, create=False)
        if state is not None and cfg.token.lower() in state.applied:
            tokens.remove(pipe, cfg.token)
        if not isinstance(e, TextinvError):
            raise
        results[i] = str(e)
        return None
    return _Member(i, run, lock, position)


def _step(pipe, members: list[_Member], results: list) -> None:
    """One step of every member (each at its own step number); a member that ends leaves the pack:
    its steps done or early stopping (its final embedding written), or a failure (its line)."""
    rates = [m.run.rate() for m in members]
    totals, failures = training.packed_gradients([m.run for m in members])
    for k, (m, lr, total) in enumerate(list(zip(members, rates, totals))):
        try:
            if k in failures:
                raise failures[k]
            ends = m.run.after(total, lr)
        except TextinvError as e:
            results[m.index] = str(e)
            _leave(pipe, members, m, discard=True)
            continue
        if ends:
            _finish(pipe, members, m, results)


def _finish(pipe, members: list[_Member], m: _Member, results: list) -> None:
    """A member whose run ended: its final embedding and state written, then it leaves."""
    m.run.close()
    try:
        results[m.index] = m.run.finish()
    except TextinvError as e:
        results[m.index] = str(e)
    _leave(pipe, members, m)


def _leave(pipe, members: list[_Member], m: _Member, discard: bool = False) -> None:
    """``m`` out of the pack: its word off the pipeline, its folder's lock released (``discard``, when
    it did no step: what this attempt created removed, as ``textinv train`` does); the others resynced."""
    members.remove(m)
    if m.run.progress is not None:
        m.run.progress.close()
    if discard and m.run.word.done == m.run.word.start:
        m.lock.discard()
    m.lock.__exit__(None, None, None)
    tokens.remove(pipe, m.run.cfg.token)
    _resync(members)


def _resync(members: list[_Member]) -> None:
    """After a member joined or left: every member's prompts tokenized again (the internal tokens'
    ids move when a word leaves) and its vectors learning (a joiner's set-up freezes the text
    encoders, the other words' blocks with them)."""
    for m in members:
        m.run.batches.prompts.tokenize()
        for p in m.run.word.params:
            p.requires_grad_(True)
