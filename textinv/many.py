"""``textinv train-many``: many concepts, one manifest, the model loaded once.

A manifest is a CSV file (a header row) or JSON Lines (one object a line), one row per concept.
Its columns are ``textinv train``'s options, named by their TrainConfig field or their flag
(``lr``, ``--lr``, ``grad_accum``, ``--grad-accum``, ``config``); an empty cell takes the value the
command line gave, else the setting's default.  Every row names its ``token`` and ``images``; its
run goes to ``out``, by default OUT_DIR/<token as a file name>.  Paths are read as on the command line.

Why one process for many concepts: loading the model (and the VAE that fills the latent cache) is
most of the time of a short run.  Each concept is still trained by :func:`textinv.training.train`,
so its run folder is exactly what ``textinv train`` writes, file for file.

Every row is read and checked before anything is trained (:func:`prepare`): a bad one is one line,
and none is trained.  Resuming is a plan, not a flag: a concept whose folder holds a finished run is
skipped, one with a state goes on from it, the others start; so a train-many killed at any point
and run again trains nothing twice (a kill -9 loses the steps after the last ``--save-every``
save, as ``textinv train`` does; Ctrl-C and SIGTERM save the step they stop at).

``pack`` N > 1 (``--pack``) trains up to N concepts of the same model and call-shaping settings at a
time in one batch (:mod:`textinv.packing`): faster on a large GPU, each embedding the one it trains
alone to float32 rounding rather than bit for bit; resuming works the same way.

Under ``accelerate launch`` each process trains whole concepts, rows 0, N, 2N, … for the first of N
processes, on its own device (``train(alone=True)``); the summary is gathered on the main one.
The summary (:class:`Summary`) is read off the run folders, so it is the same after a kill and a rerun.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from . import formats, interrupts, models, packing, runs, settings, spread, stopping, tokens, training
from .atomic import write_text
from .data import IMAGE_SUFFIXES
from .errors import TextinvError
from .settings import TrainConfig

TRUE, FALSE = ("1", "true", "t", "yes", "y", "on"), ("0", "false", "f", "no", "n", "off")
SUMMARY_COLUMNS = ("row", "token", "steps", "stop", "loss", "seconds", "note", "out")
EARLY, ALL_STEPS, FAILED = "early stop", "all steps", "failed"  # a concept's stop reason
DONE_BEFORE = "done before"


class ManifestError(TextinvError):
    """Bad rows of a manifest: ``problems`` holds one line each; nothing was trained."""

    def __init__(self, path, problems: list[str]):
        super().__init__(f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the manifest; "
                         "nothing was trained")
        self.problems = problems


@dataclass
class Concept:
    """One row, planned: its settings (``resume`` set where its folder holds a state), the steps its
    folder has saved, and whether it is finished (nothing left to train)."""

    row: int  # from 1, in the manifest's order
    config: TrainConfig
    saved: int = 0
    done: bool = False


@dataclass
class Outcome:
    """A concept's line of the summary."""

    row: int
    token: str
    steps: int | None  # the steps its embedding has
    stop: str  # EARLY, ALL_STEPS or FAILED
    loss: float | None  # the mean of the last LOSS_WINDOW steps' losses, as textinv train reports it
    seconds: float | None  # training time, summed over the attempts (its log's)
    note: str  # trained, resumed from step N, done before, or what failed
    out: str


@dataclass
class Summary:
    outcomes: list[Outcome]
    seconds: float  # this command's wall time
    processes: int
    csv: Path
    is_main_process: bool = True

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.stop == FAILED]


# ------------------------------------------------------------------------------ the manifest
def spellings(fields=None) -> dict[str, dataclasses.Field]:
    """Every column name a setting answers to: its field name, its flag, the flag without dashes
    (``fields``: those of :func:`textinv.settings.column_fields`)."""
    found = {}
    for f in settings.column_fields() if fields is None else fields:
        flag = settings.flag_of(f)
        found.update({f.name: f, flag: f, flag[2:]: f})
    return found


def read_rows(path) -> tuple[list[str], list[dict | str]]:
    """The manifest's columns and its rows ({column: cell}, or a row's problem in words), blank rows
    left out: CSV or JSON Lines, by the file's suffix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise TextinvError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise TextinvError(f"{path}: the manifest is not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path, text)
    if suffix in (".jsonl", ".ndjson"):
        return _json_rows(text)
    raise TextinvError(f"{path}: a manifest is a .csv file (a header row, a row per concept) or .jsonl (a JSON object a line)")


def _csv_rows(path: Path, text: str) -> tuple[list[str], list[dict | str]]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
        columns = [c.strip() for c in reader.fieldnames or []]
        found = []
        for cells in reader:
            if not any((v or "").strip() for k, v in cells.items() if k is not None):
                continue
            found.append(f"{len(cells[None])} more cell(s) than columns" if None in cells
                         else dict(zip(columns, cells.values())))
    except csv.Error as e:
        raise TextinvError(f"{path}: not a readable CSV file ({e})") from None
    return columns, found


def _json_rows(text: str) -> tuple[list[str], list[dict | str]]:
    columns, found = {}, []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            found.append(f"not JSON ({e})")
            continue
        if not isinstance(row, dict):
            found.append("not a JSON object ({...})")
            continue
        columns.update(dict.fromkeys(str(k) for k in row))
        found.append({str(k): v for k, v in row.items()})
    return list(columns), found


def column_problems(columns: list[str]) -> list[str]:
    """A line for each column that is not a setting, or that names one another column names too."""
    known, options, problems, seen = spellings(), spellings(settings.cli_fields()), [], {}
    for c in columns:
        f = known.get(c)
        if f is None:
            ours = settings.spec(options[c]).many_why_not if c in options else ""
            near = [] if ours else difflib.get_close_matches(c, list(known), n=1)
            why = ours or "not a textinv train option"
            problems.append(f"manifest: column {formats.printable(c)!r}: {why}" + (f" (did you mean {near[0]}?)" if near else ""))
        elif f.name in seen:
            problems.append(f"manifest: columns {seen[f.name]!r} and {c!r} both set {settings.flag_of(f)}")
        else:
            seen[f.name] = c
    return problems


def cell_value(f: dataclasses.Field, raw):
    """A cell as its setting's type, parsed as the command line parses it; None: not set (an empty
    cell, JSON null).  What is not a number stays text, for :func:`textinv.settings.check` to name."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    kind, flag, label = settings.kind_of(f)[0], settings.flag_of(f), settings.spec(f).label
    if isinstance(raw, (dict, list)):
        raise TextinvError(f"{label}: one value, not a JSON {type(raw).__name__} ({flag})")
    text = raw.strip() if isinstance(raw, str) else None
    if kind is bool:
        if isinstance(raw, bool) or (text is not None and text.lower() in TRUE + FALSE):
            return raw if isinstance(raw, bool) else text.lower() in TRUE
        raise TextinvError(f"{label}: must be true or false ({flag} {formats.printable(raw)!r})")
    if text is None:
        return str(raw) if kind is str else raw  # JSON's own numbers; check() judges them
    for parse in {int: (int,), float: (float,)}.get(kind, ()):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def row_config(n: int, cells: dict, defaults: dict, out_dir) -> TrainConfig:
    """Row ``n``'s settings: its cells over ``defaults`` (the command line's), checked as ``textinv
    train`` checks them, with ``out`` defaulting to OUT_DIR/<token as a file name>.  A problem is one
    line that names the row (and its token, where it has one)."""
    known, values, problem = spellings(), dict(defaults), None
    for column, raw in cells.items():
        try:
            value = cell_value(known[column], raw)
        except TextinvError as e:
            problem = problem or str(e)
            continue
        if value is not None:
            values[known[column].name] = value
    required = settings.required_fields()
    cfg = TrainConfig(**{f.name: "" for f in required} | values)  # a missing one is said below, by its flag
    try:
        missing = next((f for f in required if not str(getattr(cfg, f.name)).strip()), None)
        if problem or missing:
            raise TextinvError(problem or f"{settings.flag_of(missing)}: missing (every row gives its own)")
        cfg = dataclasses.replace(cfg, out=cfg.out or str(Path(out_dir) / formats.file_stem(cfg.token)))
        settings.check(cfg)
        images = Path(cfg.images)
        if not images.is_dir():
            raise TextinvError(f"--images {cfg.images}: not a folder")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir() if not p.name.startswith(".")):
            raise TextinvError(f"--images {cfg.images}: no .jpg/.png/.webp/.bmp/.gif files")
    except TextinvError as e:
        raise TextinvError(f"{where(n, cfg)}: {e}") from None
    return cfg


def where(n: int, cfg: TrainConfig | None = None) -> str:
    """How a problem names row ``n``: by its number, and its token where it has one."""
    token = str(cfg.token).strip() if cfg is not None else ""
    return f"manifest row {n}" + (f" (token {formats.printable(token)})" if token else "")


# --------------------------------------------------------------------------------- the plan
def saved(cfg: TrainConfig) -> tuple[int, bool]:
    """(the step the run in ``cfg``'s folder has saved, whether it is finished).  Finished: its final
    embedding is of the state's step, and that step is --steps or early stopping's (the rule
    :func:`textinv.training.train` applies to a resumed run that had stopped).  A folder that holds
    another run (other settings) is refused, as ``train --resume`` would refuse it."""
    out = cfg.resolved_out()
    if not runs.has_state(out):
        return 0, False
    st = runs.read_state(out)
    change = settings.changed(st["identity"], cfg)
    if change:
        name, was, now = change
        raise TextinvError(f"{out}: holds a run started with {name}={was}, this row has {name}={now}; "
                           "give the row another out, or remove that folder")
    step, last = int(st["step"]), runs.final(out, cfg)
    written = None if last is None else str(formats.load(last).meta.get("step"))  # a format may not keep the step
    if last is None or (written.isdigit() and int(written) != step):  # no final, or not the state's (a kill between the two)
        return step, False
    if step >= cfg.steps:
        return step, True
    curve = [float(v) for _, v in st["eval_curve"].tolist()] if "eval_curve" in st else []
    return step, cfg.early_stop and stopping.should_stop(curve)[0]


def prepare(path, defaults: dict | None = None, out_dir="runs") -> list[Concept]:
    """Every row of the manifest at ``path``, checked and planned; :class:`ManifestError` (a line
    for each problem) before anything is trained."""
    columns, rows = read_rows(path)
    problems = column_problems(columns)
    if not rows:
        problems.append("manifest: no rows (a row per concept: token, images, …)")
    concepts, outs, unknown = [], {}, set(columns) - set(spellings())
    for n, cells in enumerate(rows, start=1):
        if isinstance(cells, str) or unknown & set(cells):
            problems += [f"{where(n)}: {cells}"] if isinstance(cells, str) else []  # a bad column: said once, above
            continue
        try:
            cfg = row_config(n, cells, defaults or {}, out_dir)
        except TextinvError as e:
            problems.append(str(e))
            continue
        out = cfg.resolved_out().resolve()
        try:
            if out in outs:
                raise TextinvError(f"out {cfg.resolved_out()}: row {outs[out]} trains there too; give one of them its own out")
            outs[out] = n
            step, done = saved(cfg)
        except TextinvError as e:
            problems.append(f"{where(n, cfg)}: {e}")
            continue
        concepts.append(Concept(n, dataclasses.replace(cfg, resume=step > 0), step, done))
    if problems:
        raise ManifestError(path, problems)
    return concepts


# ---------------------------------------------------------------------------------- the run
def train_many(path, defaults: dict | None = None, out_dir="runs", echo=None, pack: int = 1) -> Summary:
    """Train every concept of the manifest at ``path`` (see the module's docstring); the summary is
    written to OUT_DIR/<manifest>-summary.csv.  ``echo(line)`` hears the plan, each concept's start
    and every bad row; ``defaults``: settings for every row that does not set them (field names).
    ``pack``: how many concepts train at a time in one batch (:mod:`textinv.packing`); 1: one after
    another, each exactly as ``textinv train`` trains it."""
    if not (isinstance(pack, int) and pack >= 1):
        raise TextinvError(f"--pack {pack}: a whole number, 1 or more (1: one concept at a time)")
    t0, state = time.perf_counter(), PartialState(cpu=not torch.cuda.is_available())
    say = echo if state.is_main_process else None
    try:
        concepts = prepare(path, defaults, out_dir)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except ManifestError as e:
        for line in e.problems if say else ():
            say(line)
        raise
    except OSError as e:
        raise TextinvError(f"--out-dir {out_dir}: cannot write there ({e.strerror or e})") from None
    if say:
        say(plan_line(concepts, state.num_processes, pack))
    with spread.launched() as share:  # rows 1, 1+N, … to the first of N processes; gathered in row order
        mine = _train_share(share.mine(concepts), state, echo, pack)
        outcomes = share.gather(sorted(mine, key=lambda o: o.row))
    summary = Summary(outcomes, time.perf_counter() - t0, state.num_processes,
                      Path(out_dir) / f"{Path(path).stem}-summary.csv", state.is_main_process)
    if state.is_main_process:
        write_text(summary.csv, summary_csv(summary.outcomes))
    return summary


def plan_line(concepts: list[Concept], processes: int, pack: int = 1) -> str:
    done = sum(c.done for c in concepts)
    resumed = sum(c.saved > 0 and not c.done for c in concepts)
    fresh = len(concepts) - done - resumed
    spread = f" over {processes} processes" if processes > 1 else ""
    packed = f", up to {pack} at a time in one batch" if pack > 1 else ""
    return (f"train-many: {len(concepts)} concept{'s' if len(concepts) != 1 else ''}{spread}: {fresh} to train, "
            f"{resumed} to resume, {done} done before{packed}")


def _by_model(concepts: list[Concept]) -> list[list[Concept]]:
    """The concepts grouped by the pipeline they train on (first seen, first), each group in row order."""
    groups: dict[tuple, list[Concept]] = {}
    for c in concepts:
        cfg = c.config  # gradient checkpointing is switched on in the pipeline's own UNet: its own group
        groups.setdefault((cfg.model, cfg.model_config, cfg.precision, cfg.grad_checkpointing), []).append(c)
    return list(groups.values())


def _train_share(concepts: list[Concept], state, echo, pack: int = 1) -> list[Outcome]:
    """This process's concepts, trained on one pipeline per model (loaded only when some concept
    needs it), one after another or ``pack`` at a time; a concept that fails is a line of the
    summary, and the next one goes on."""
    outcomes, say = [], _prefixed(echo, state)
    for group in _by_model(concepts):
        outcomes += [outcome(c.row, c.config, DONE_BEFORE) for c in group if c.done]
        todo = [c for c in group if not c.done]
        if not todo:
            continue
        if say:
            say(f"loading {models.name_of(todo[0].config.model)} …")
        try:
            pipe = training.load_model(todo[0].config, state.device)
        except TextinvError as e:
            outcomes += [failed(c, str(e)) for c in todo]
            continue
        for together in _packs(todo, pack):
            if pack > 1 and packing.key(together[0].config) is not None:
                outcomes += _train_packed(together, pipe, state, say, pack)
            else:
                outcomes += [_train_one(c, pipe, state, say) for c in together]
        del pipe
    return outcomes


def _packs(concepts: list[Concept], pack: int) -> list[list[Concept]]:
    """The concepts of one pipeline as they train: with ``pack`` 1 each alone, in row order; else
    those of one :func:`textinv.packing.key` together (first seen, first), and alone those it leaves out."""
    if pack == 1:
        return [[c] for c in concepts]
    keyed: dict = {}
    for c in concepts:
        k = packing.key(c.config)
        keyed.setdefault(("alone", c.row) if k is None else k, []).append(c)
    return list(keyed.values())


def _prefixed(echo, state):
    if echo is None or state.num_processes == 1:
        return echo
    return lambda line: echo(f"[process {state.process_index}] {line}")


def _train_one(c: Concept, pipe, state, say) -> Outcome:
    """One concept, as ``textinv train`` trains it, on the loaded pipeline, which it leaves as it
    found it (the trained word removed)."""
    cfg = dataclasses.replace(c.config, progress=c.config.progress and state.is_main_process)
    if say:
        say(_starting(c))
    try:
        training.train(cfg, pipe=pipe, echo=say, alone=True)
    except interrupts.Interrupted as e:
        what = str(e).split(";")[0]
        raise interrupts.Interrupted(e.signum, f"row {c.row} ({cfg.token}): {what}; the same textinv train-many "
                                               "goes on from there") from None
    except TextinvError as e:
        return failed(c, str(e))
    finally:
        tokens.remove(pipe)
    return outcome(c.row, cfg, _trained(c))


def _starting(c: Concept) -> str:
    return f"row {c.row}: {c.config.token}" + (f", resumed from step {c.saved}" if c.saved else "")


def _trained(c: Concept) -> str:
    """A concept's note once trained (here)."""
    return f"resumed from step {c.saved}" if c.saved else "trained"


def _train_packed(concepts: list[Concept], pipe, state, say, pack: int) -> list[Outcome]:
    """Concepts of one :func:`textinv.packing.key`, ``pack`` at a time in one batch, on the loaded
    pipeline, which they leave as they found it."""
    configs = [dataclasses.replace(c.config, progress=c.config.progress and state.is_main_process) for c in concepts]

    def joined(i: int) -> None:
        if say:
            say(_starting(concepts[i]))

    try:
        results = packing.train_packed(configs, pipe, pack, state.device, echo=say, on_join=joined,
                                       names=[f"row {c.row} ({c.config.token})" for c in concepts])
    except interrupts.Interrupted as e:
        raise interrupts.Interrupted(e.signum, f"{e}; the same textinv train-many goes on from there") from None
    return [failed(c, r) if isinstance(r, str) else outcome(c.row, cfg, _trained(c))
            for c, cfg, r in zip(concepts, configs, results)]


# ------------------------------------------------------------------------------ the summary
def outcome(row: int, cfg: TrainConfig, note: str) -> Outcome:
    """A finished concept's summary line, read off its run folder: the same whether it was trained
    in one go, resumed, or trained by an earlier train-many."""
    records = runs.log_records(cfg.resolved_out())
    steps = records[-1]["step"] if records else 0
    losses = [float(r["loss"]) for r in records[-training.LOSS_WINDOW:] if "loss" in r]
    return Outcome(row, cfg.token, steps, EARLY if steps < cfg.steps else ALL_STEPS,
                   sum(losses) / len(losses) if losses else None, trained_seconds(records), note, str(cfg.resolved_out()))


def failed(c: Concept, why: str) -> Outcome:
    return Outcome(c.row, c.config.token, None, FAILED, None, None, " ".join(why.split()), str(c.config.resolved_out()))


def trained_seconds(records: list[dict]) -> float:
    """The training time a run's log holds, over all its attempts: a record's ``seconds`` count from
    its attempt's start, so a drop marks a resumed attempt."""
    total, last = 0.0, 0.0
    for r in records:
        now = float(r.get("seconds", 0.0))
        total += now - last if now >= last else now
        last = now
    return total


def summary_csv(outcomes: list[Outcome]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for o in outcomes:
        writer.writerow([o.row, o.token, "" if o.steps is None else o.steps, o.stop,
                         "" if o.loss is None else f"{o.loss:.6f}", "" if o.seconds is None else f"{o.seconds:.1f}",
                         o.note, o.out])
    return buffer.getvalue()


def format_table(summary: Summary) -> str:
    """The summary as a table, and a line with the wall time and the rate."""
    head = ["row", "token", "steps", "stop", "loss", "time", "note"]
    cells = [[str(o.row), formats.printable(o.token), "" if o.steps is None else str(o.steps), o.stop,
              "" if o.loss is None else f"{o.loss:.4f}", "" if o.seconds is None else f"{o.seconds:.1f} s",
              formats.printable(o.note)] for o in summary.outcomes]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + cells]
    trained = sum(o.note != DONE_BEFORE and o.stop != FAILED for o in summary.outcomes)
    rate = f", {trained * 3600 / summary.seconds:.0f} concepts/hour" if trained and summary.seconds > 0 else ""
    lines.append(f"{trained} trained, {len(summary.failed)} failed, "
                 f"{sum(o.note == DONE_BEFORE for o in summary.outcomes)} done before, in {summary.seconds:.0f} s{rate}")
    return "\n".join(lines)
