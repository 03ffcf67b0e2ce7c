"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one.

The file ends up with the mode ``open()`` would give it (0666 less the process umask, typically
0644): the private temporary file's 0600 would otherwise survive the rename, and a web UI or a
tool running as another user could not read what we wrote."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import TextinvError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it.

    A disk that is full or read-only, a parent that is a file, a destination that is a folder:
    one :class:`TextinvError` naming ``path`` and the problem, and nothing left behind."""
    path = Path(path)
    if path.is_dir():
        raise TextinvError(f"{path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise TextinvError(f"{path}: cannot write there ({_reason(e)})") from None
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TextinvError(f"{path}: cannot write ({_reason(e)})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOTDIR or isinstance(e, FileExistsError):
        return "a part of the path is a file, not a folder"
    return {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EISDIR: "it is a folder", errno.EACCES: "permission denied",
            errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ≥ 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
