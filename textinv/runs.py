"""The training-run folder: what a run keeps where, and how each part is written and read.

A run folder (``runs/NAME`` unless ``--out`` says otherwise) holds::

    config.json             the settings it was trained with; it names the trained token
    state.pt                what --resume continues from: step, vectors, optimizer, loss scaler, curve
    NAME.safetensors        the final embedding (.pt, .png by --format; a NAME/ folder for diffusers SDXL)
    embeddings/NAME-STEP.*  the saves every --save-every steps
    log.jsonl               one JSON record a step
    previews/STEP.png       the --preview-every grids
    eval/                   what `textinv eval` and `train --pick-best` measured
    .lock                   held by the process training in it

A run that fails or is interrupted before its first step leaves none of this behind
(:meth:`RunLock.discard`); one interrupted later has its state and a save of its last step.

A folder is a run when its config.json names a token and the steps.  The demo's and ``textinv
bias``'s output folders keep their run(s) in ``run/``.  Every other module asks here for these
names; this one knows files, not training (it imports no trainer).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from . import formats, settings
from .atomic import atomic_path, write_text
from .errors import TextinvError
from .settings import TrainConfig

CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
SAVES_FOLDER = "embeddings"
PREVIEWS_FOLDER = "previews"
EVAL_FOLDER = "eval"
LOCK_FILE = ".lock"
PROBE_FILE = ".write-test"  # written and removed once, to fail before the model loads when --out is not writable
INNER_FOLDER = "run"  # the demo's and bias's output folders: their training run(s)
OWN_NAMES = (CONFIG_FILE, STATE_FILE, LOG_FILE, SAVES_FOLDER, PREVIEWS_FOLDER, EVAL_FOLDER, LOCK_FILE, PROBE_FILE)
MAX_CONFIG_BYTES = 1 << 20


# ------------------------------------------------------------------------------------ layout
def config_file(run) -> Path:
    return Path(run) / CONFIG_FILE


def state_file(run) -> Path:
    return Path(run) / STATE_FILE


def log_file(run) -> Path:
    return Path(run) / LOG_FILE


def saves_folder(run) -> Path:
    return Path(run) / SAVES_FOLDER


def save_file(run, token: str, step: int, suffix: str) -> Path:
    """Where the save of ``step`` goes: ``embeddings/NAME-STEP`` (``suffix``: the format's, see
    :func:`textinv.formats.suffix_for`)."""
    return saves_folder(run) / f"{formats.file_stem(token)}-{step}{suffix}"


def final_file(run, token: str, suffix: str) -> Path:
    return Path(run) / f"{formats.file_stem(token)}{suffix}"


def preview_file(run, step: int) -> Path:
    return Path(run) / PREVIEWS_FOLDER / f"{step:06d}.png"


def previews(run) -> list[Path]:
    """The run's preview grids so far, in step order."""
    return sorted((Path(run) / PREVIEWS_FOLDER).glob("*.png"))


def eval_folder(run) -> Path:
    return Path(run) / EVAL_FOLDER


def inner(folder) -> Path:
    """The run inside the demo's or bias's output folder (bias keeps one run per token there)."""
    return Path(folder) / INNER_FOLDER


# ----------------------------------------------------------------------------- reading a run
def config(folder) -> TrainConfig | None:
    """The settings a run's config.json records (it names the trained token), or None: ``folder``
    is not a run."""
    file = config_file(folder)
    try:
        if not file.is_file() or file.stat().st_size > MAX_CONFIG_BYTES:
            return None
        return settings.recorded(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def has_state(run) -> bool:
    """Whether the run has a state to --resume from."""
    return state_file(run).exists()


def is_state_file(path) -> bool:
    """Whether ``path`` is a run's state file (for --resume, not an embedding)."""
    path = Path(path)
    return path.name == STATE_FILE and config(path.parent) is not None


def folder_of(path) -> Path | None:
    """The run ``path`` stands for: itself, or the ``run/`` of the demo's output folder (a folder
    whose only run is ``run/``); None for anything else."""
    path = Path(path)
    if not path.is_dir():
        return None
    if config(path) is not None:
        return path
    if config(inner(path)) is None:
        return None
    others = [p for p in path.iterdir() if p.is_dir() and p.name != INNER_FOLDER and config(p) is not None]
    return None if others else inner(path)


def final(run, cfg: TrainConfig | None = None) -> Path | None:
    """A run's final embedding (``NAME.ext``, or the ``NAME/`` folder of diffusers SDXL), None before the run ends."""
    run = Path(run)
    cfg = cfg if cfg is not None else config(run)
    if cfg is None:
        return None
    stem = formats.file_stem(cfg.token)
    found = [p for p in sorted(run.iterdir()) if (p.stem if p.is_file() else p.name) == stem
             and p.name != STATE_FILE and not p.name.startswith(".") and formats.is_embedding_candidate(p)]
    want = formats.suffix_for(cfg.format)
    # Two finals (the format changed between runs into the same folder): the configured format's, else the newest.
    found.sort(key=lambda p: (not (p.is_dir() or p.suffix.lower() == want), -p.stat().st_mtime))
    return found[0] if found else None


def saves(run) -> tuple[TrainConfig, list[tuple[int, Path]]]:
    """A run's config and its saves as sorted (step, path): ``embeddings/NAME-STEP.*`` and the final one."""
    run = Path(run)
    cfg = config(run)
    if cfg is None:
        try:
            json.loads(config_file(run).read_text(encoding="utf-8"))
            why = "it names no trained token and steps"
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or str(e)
        raise TextinvError(f"{run}: not a textinv training run ({CONFIG_FILE}: {why})")
    stem = formats.file_stem(cfg.token)
    found: dict[int, Path] = {}
    for p in sorted(saves_folder(run).glob(f"{stem}-*")):
        m = re.fullmatch(rf"{re.escape(stem)}-(\d+)", p.stem if p.is_file() else p.name)
        if m and formats.is_embedding_candidate(p):
            found[int(m.group(1))] = p
    last = final(run, cfg)
    if last is not None:
        step = formats.load(last).meta.get("step")
        found[int(step) if str(step).isdigit() else int(cfg.steps or 0)] = last
    if not found:
        raise TextinvError(f"{run}: no embeddings saved in this run yet")
    return cfg, sorted(found.items())


def in_library(folder) -> list[Path] | None:
    """What a folder met in a library scan stands for when it is a run: its final embedding only
    (nothing while it trains; never its state, log or step saves).  None: not a run, scan it."""
    cfg = config(folder)
    if cfg is None:
        return None
    last = final(folder, cfg)
    return [last] if last is not None else []


# ----------------------------------------------------------------------------- writing a run
def prepare(out: Path, resume: bool) -> None:
    """Make ``out`` and fail in one line, before the model loads, when it is not writable or
    already holds a run that is not being resumed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / PROBE_FILE) as probe:
            probe.write_bytes(b"ok")
        (out / PROBE_FILE).unlink()
    except OSError as e:
        raise TextinvError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    if has_state(out) and not resume:
        raise TextinvError(f"--out {out}: already holds a training run; pass --resume to continue it, or choose another folder")


def write_config(out, settings: dict) -> None:
    write_text(config_file(out), json.dumps(settings, indent=2, default=str))


def write_state(out, *, step: int, params, optimizer, scaler, identity: dict, curve: list) -> None:
    """The resume point, written whole or not at all: a kill mid-write leaves the previous one."""
    with atomic_path(state_file(out)) as tmp:
        torch.save({"step": step, "params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "identity": identity,
                    "eval_curve": torch.tensor(curve, dtype=torch.float64).reshape(-1, 2)}, tmp)


def read_state(out) -> dict:
    """The state :func:`write_state` wrote, read with torch's safe loader (tensors and plain
    containers only); a damaged or foreign file is one line."""
    path = state_file(out)
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TextinvError(f"{path}: cannot resume from this state file ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not (isinstance(st, dict) and isinstance(st.get("identity"), dict)):
        raise TextinvError(f"{path}: not a textinv training state (damaged or foreign); use another --out")
    return st


def append_log(out, record: dict) -> None:
    with open(log_file(out), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(out, start: int) -> None:
    """Keep the log's records of steps 1..start: a resumed run replays nothing twice."""
    log = log_file(out)
    if not log.exists():
        return
    kept = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if int(json.loads(line)["step"]) <= start:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    write_text(log, "".join(k + "\n" for k in kept))


def log_records(out) -> list[dict]:
    """The log's step records, in order (a line cut short by a kill is left out)."""
    log, found = log_file(out), []
    if not log.exists():
        return found
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            found.append(record)
    return found


def recent_losses(out, start: int, window: int) -> list[float]:
    """The last ``window`` losses logged up to ``start`` (the log was trimmed to it)."""
    log = log_file(out)
    if not start or not log.exists():
        return []
    losses = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines()[-window:]:
        try:
            losses.append(float(json.loads(line)["loss"]))
        except (ValueError, KeyError, TypeError):
            continue
    return losses


def curves(out) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The run's logged curves so far: the training loss [(step, loss)] and the early-stopping
    evaluation loss [(step, eval_loss)], scored every --eval-every steps (the web UI plots both)."""
    log = log_file(out)
    losses, evals = [], []
    if not log.exists():
        return losses, evals
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
            losses.append((step, float(record["loss"])))
            if "eval_loss" in record:
                evals.append((step, float(record["eval_loss"])))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return losses, evals


class RunLock:
    """One process at a time owns a run folder: a second ``train`` on it, or a ``--resume`` while
    the first still runs, is refused in one line.  The lock is the kernel's (``flock`` on
    ``.lock``), so a killed run leaves nothing stuck: its lock goes with its process.

    It also notes what the folder held before (nothing, when the lock made it), so that a run that
    fails before its first step can :meth:`discard` what it created and leave the folder as found."""

    def __init__(self, out: Path):
        self.out, self.file = Path(out), None
        self.made: list[Path] = []  # the folders the lock created, innermost first
        self.found: set[str] = set()  # what the folder held before

    def __enter__(self):
        self.made = _missing(self.out)
        try:
            self.found = {p.name for p in self.out.iterdir()} if self.out.is_dir() else set()
        except OSError as e:
            raise TextinvError(f"--out {self.out}: cannot read there ({e.strerror or e})") from None
        try:
            import fcntl  # deferred: POSIX only, not on Windows (handled just below)
        except ImportError:  # not a POSIX system: no locking
            return self
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.file = open(self.out / LOCK_FILE, "a+", encoding="ascii")
        except OSError as e:
            raise TextinvError(f"--out {self.out}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise TextinvError(f"--out {self.out}: another textinv train (pid {holder}) is using this folder; "
                               "wait for it to finish, or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the lock

    def discard(self) -> None:
        """Remove what this attempt created (the lock held): a folder it made goes whole, with the
        parents it made; in a folder that was there, only the run's own files it did not hold go
        (another program's, written there meanwhile, stay).  What cannot be removed stays."""
        made_here = self.out in self.made
        try:
            entries = sorted(self.out.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            if entry.name in self.found or not (made_here or entry.name in OWN_NAMES):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for folder in self.made:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _missing(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    return missing
