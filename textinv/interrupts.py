"""Ctrl-C and SIGTERM while training: an exception the trainer can answer by saving its work.

Inside :func:`caught`, SIGINT and SIGTERM raise :class:`Interrupted`, a KeyboardInterrupt that
knows its signal, so a command can exit 128 + N as shells expect (130, 143).  Inside :func:`held`
a signal waits for the block's end: an optimizer update or a save is then all or nothing, never
half done.  Python runs signal handlers in the main thread only, so in any other thread (the web
UI's worker) both do nothing; the process's handlers are restored when :func:`caught` ends.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; its text says what was kept."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "interrupted"):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class _Held:
    depth = 0  # how many held() blocks the main thread is in
    pending: int | None = None  # a signal that arrived in one


def _on_signal(signum, frame) -> None:
    if _Held.depth:
        _Held.pending = _Held.pending or signum
        return
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def caught() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the block.  A signal the process ignores
    (nohup, a background job) stays ignored, and one whose handler Python cannot restore is left alone."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    mine = [s for s, handler in previous.items() if handler is not None and handler is not signal.SIG_IGN]
    for s in mine:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, previous[s])


@contextlib.contextmanager
def held(deliver: bool = True) -> Iterator[None]:
    """A signal in the block waits for its end, then raises; ``deliver=False``: it is dropped (the
    caller is already stopping: a second Ctrl-C during the save of the first)."""
    if not _main_thread():
        yield
        return
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        signum = None if _Held.depth else _Held.pending
        if signum:
            _Held.pending = None
    if signum and deliver:
        raise Interrupted(signum)
