"""The web app's logic in plain Python: training and bias jobs, generation, the library folder.

:class:`App` raises :class:`~textinv.errors.TextinvError` for anything a user can get wrong and
needs no Gradio: it is tested without a browser.  :mod:`textinv.ui` puts it in a page.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import bias, data, evaluate, formats, generation, library, runs, settings, sources, tokens, training
from .bias import RECIPES as BIAS_RECIPES  # a value per subfolder, or the word re-learned from one folder
from .data import IMAGE_SUFFIXES, open_image
from .errors import TextinvError
from .formats import file_stem, native_format, suffix_for
from .models import defaults as model_defaults, load_pipeline, name_of
from .training import LOSS_WINDOW
from .world import spec

DEFAULT_LIBRARY = Path("~/.textinv/embeddings")
DEFAULT_WORKDIR = Path("~/.textinv/ui")
MAX_IMAGE_BYTES = 50 << 20
MODEL_DEFAULT_SAMPLER = "(model default)"
EXPORT_FORMATS = formats.SAVE_FORMATS + formats.PER_LAYER_FORMATS  # what textinv convert writes
ALL_FAMILIES, FITS_MODEL = "all families", "fits the model"  # the library's family filter, besides each family
NAME_RE = re.compile(r"[\w][\w.-]*")


# ------------------------------------------------------------------------------------ warnings
_sink = threading.local()


def _route_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings raised while a handler collects them go to that handler (per thread); the others
    to whatever showed warnings before (the router only adds the collecting)."""
    lines = getattr(_sink, "lines", None)
    if lines is not None:
        lines.append(str(message))
    else:
        _route_warning.previous(message, category, filename, lineno, file, line)


_route_warning.previous = warnings.showwarning


def _ensure_router() -> None:
    """Chain the router in front of the current ``showwarning`` (once): a no-op for threads that
    do not collect, so an App used as a library changes nothing else in the process."""
    if warnings.showwarning is not _route_warning:
        _route_warning.previous = warnings.showwarning
        warnings.showwarning = _route_warning


def install_warning_router() -> None:
    """For ``textinv ui`` (a process of its own): route warnings per thread (training and generation
    run at the same time), show repeated ones every time, and quiet Gradio's own deprecations."""
    _ensure_router()
    warnings.simplefilter("always", UserWarning)  # the same bad file twice gives the message twice
    for noisy in (FutureWarning, DeprecationWarning):  # Gradio's plots call pandas APIs pandas 3 deprecates
        warnings.filterwarnings("ignore", category=noisy, module=r"(gradio|pandas)(\.|$)")


@contextmanager
def collecting(into: list | None = None):
    """Collect the warnings this thread raises, e.g. ``skipped notes.png: not a readable image``
    (into ``into`` as they come, when given: a training run's page shows them while it runs)."""
    _ensure_router()
    saved = getattr(_sink, "lines", None)
    _sink.lines = [] if into is None else into
    try:
        yield _sink.lines
    finally:
        _sink.lines = saved


def describe_error(e: BaseException) -> str:
    if isinstance(e, TextinvError):
        return str(e)
    return f"unexpected error: {type(e).__name__}: {' '.join(str(e).split())}"


# ------------------------------------------------------------------------------------ training
@dataclass
class TrainJob:
    """One training run in a background thread; the page polls :meth:`status` and :meth:`curves`."""

    token: str
    out: Path
    total: int
    thread: threading.Thread | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    losses: list[tuple[int, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: str = ""  # the run's one line: images, buckets, captions, model, output
    started: float = field(default_factory=time.time)
    result: object | None = None  # TrainResult
    library_path: Path | None = None
    error: str | None = None
    cfg: settings.TrainConfig | None = None  # what the run was started with: Resume goes on with it
    measuring: settings.MeasureConfig = field(default_factory=settings.MeasureConfig)
    note: str = ""  # what the app decided for the run (saves to measure), shown under its state
    first: tuple[int, float] | None = None  # (step, time) of the first step this job took: the ETA's start

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def on_step(self, step: int, loss: float) -> bool:
        self.losses.append((step, float(loss)))
        if self.first is None:
            self.first = (step, time.time())
        return self.stop_event.is_set()

    def previews(self) -> list[Path]:
        return runs.previews(self.out)

    def curves(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """(training loss, early-stopping evaluation loss) so far, from the run's log (a resumed
        run's earlier steps included); the steps this job heard of where there is no log yet."""
        losses, evals = runs.curves(self.out)
        return (losses or list(self.losses)), evals

    def eta(self) -> str:
        """About how long until the last step, from this job's pace so far ('' before it is known)."""
        if self.first is None or not self.losses or self.losses[-1][0] <= self.first[0]:
            return ""
        step, (step0, t0) = self.losses[-1][0], self.first
        left = (time.time() - t0) / (step - step0) * max(0, self.total - step)
        when = f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"
        sooner = " at most (early stopping may end it sooner)" if self.cfg and self.cfg.early_stop else ""
        return f", about {when} left{sooner}"

    def status(self) -> str:
        """The run's state in a line, and below it what the app decided and the run's summary (images, buckets, model)."""
        return "\n".join(filter(None, [self._state(), self.note, "" if self.error else self.summary]))

    def _state(self) -> str:
        step = self.losses[-1][0] if self.losses else 0
        seconds = time.time() - self.started
        if self.error:
            return f"Training failed: {self.error}"
        if self.running:
            if not self.losses:
                return f"Starting: loading the model and encoding the images ({seconds:.0f} s)…"
            loss = sum(x for _, x in self.losses[-LOSS_WINDOW:]) / len(self.losses[-LOSS_WINDOW:])
            stopping = " — stopping…" if self.stop_event.is_set() else ""
            return (f"Training {self.token}: step {step}/{self.total}, loss {loss:.4f} (mean of the last {LOSS_WINDOW} steps), "
                    f"{seconds:.0f} s{self.eta()}{stopping}")
        if self.result is not None:
            return self._ended(self.result)
        return "Not started."

    def _ended(self, r) -> str:
        """How the run ended: stopped from the page (Resume goes on), learned (early stopping says why), or done."""
        where = f"; added to the library as {self.library_path.name}" if self.library_path else ""
        facts = (f"at step {r.steps}/{self.total} ({r.seconds:.0f} s, loss {r.loss:.4f}, the mean of the last "
                 f"{LOSS_WINDOW} steps): {r.embedding_path}{where}")
        if self.stop_event.is_set() and r.steps < self.total:
            return f"Stopped {facts}. Resume goes on from step {r.steps}."
        if r.stopped:
            return f"Learned: {r.stopped}.\nSaved {facts}"
        return f"Done {facts}"


# ------------------------------------------------------------------------------------ bias
@dataclass
class BiasJob:
    """One bias run (measure, re-learn or apply, measure again) in a background thread; the page polls :meth:`status`."""

    word: str
    attribute: str
    out: Path
    thread: threading.Thread | None = None
    lines: list[str] = field(default_factory=list)  # the run's echo, as it comes
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    result: dict | None = None  # what bias.json holds
    error: str | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    stopped: str | None = None  # why it ended before its results (bias.Stopped's message)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def echo(self, line) -> None:
        self.lines.append(str(line))

    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def status(self, last: int = 8) -> str:
        """The run's state in a line, then its last lines (per prompt: KL and retention) and its warnings."""
        seconds = (self.ended or time.time()) - self.started
        if self.error:
            head = f"Bias run failed: {self.error}"
        elif self.stopped:
            head = (f"Stopped after {seconds:.0f} s ({self.stopped}): no bias.json or report (written only when a run "
                    f"ends); {self.out} keeps its prompts and any trained token's saved state")
        elif self.result is not None:
            head = f"Done in {seconds:.0f} s: {', '.join(p.name for p in self.paths().values())} in {self.out}"
        elif self.running:
            head = f"Measuring the {self.attribute} of {self.word!r} ({seconds:.0f} s)" + ("" if self.lines else ": loading the model…")
            head += " — stopping after the current prompt or training step…" if self.stop_event.is_set() else ""
        else:
            head = "Not started."
        return "\n".join([head] + self.lines[-last:] + [f"warning: {w}" for w in self.warnings])

    def table(self) -> str:
        """The before/after figures (bias.format_table), once done."""
        return bias.format_table(self.result) if self.result is not None else ""

    def prompt_rows(self) -> list[list[str]]:
        """report.html's per-prompt table (bias.report_rows), once done."""
        return bias.report_rows(self.result) if self.result is not None else []

    def paths(self) -> dict[str, Path]:
        """The files written when done: json (bias.json), chart (bias.png, with matplotlib), report (report.html)."""
        if self.result is None:
            return {}
        names = {"json": "bias.json", "chart": "bias.png", "report": "report.html"}
        return {k: self.out / name for k, name in names.items() if (self.out / name).is_file()}


# ------------------------------------------------------------------------------------ the training form
TRISTATE = {"auto": None, "on": True, "off": False}  # a setting the run may decide (buckets, captions): its radio


def form_value(f, raw):
    """One form widget's value as its setting's type: text stripped, an empty box the setting's
    default, numbers from the box's text or float, a tri-state radio's word as None/True/False, a
    list one item a line.  A value that does not convert is kept: :func:`settings.check` names it."""
    kind, optional = settings.kind_of(f)
    if isinstance(raw, str):
        raw = raw.strip()
    if raw is None or (raw == "" and kind is not list):
        default = settings.default_of(f)
        return "" if default is dataclasses.MISSING else default
    if kind is bool:
        return TRISTATE.get(raw, raw) if optional and isinstance(raw, str) else bool(raw)
    if kind is list:
        return [line.strip() for line in raw.splitlines() if line.strip()] if isinstance(raw, str) else list(raw)
    if kind is str:
        return str(raw)
    return _number(raw, kind) if kind in (int, float) else raw


def _number(raw, kind: type):
    if isinstance(raw, bool):
        return raw
    try:
        x = kind(raw) if isinstance(raw, str) else raw
    except ValueError:
        return raw
    if kind is int and isinstance(x, float) and x.is_integer():
        return int(x)
    return float(x) if kind is float and isinstance(x, int) else x


# ------------------------------------------------------------------------------------ the app
class App:
    """The web app's state and actions, independent of Gradio."""

    def __init__(self, library=None, model=None, *, workdir=None, model_config=None, preview_every: int = 20,
                 clip: str | None = None):
        self.library = Path(library or DEFAULT_LIBRARY).expanduser().resolve()
        self.workdir = Path(workdir or DEFAULT_WORKDIR).expanduser().resolve()
        self.model = model
        self.model_config = model_config
        self.clip = clip  # textinv ui --clip: the CLIP weights the Bias tab and measured saves use unless told others
        self.preview_every = preview_every
        for d in (self.library, self.runs, self.outputs, self.downloads, self.uploads):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TextinvError(f"{d}: cannot create this folder ({e.strerror or e})") from None
        self.job: TrainJob | None = None
        self.bias: BiasJob | None = None
        self._pipe = None
        self._pipe_lock = threading.RLock()
        self._job_lock = threading.Lock()
        self._nearest_cache: dict[tuple, str] = {}
        self._family: str | None = None  # the model's, once asked (model_family)

    runs = property(lambda self: self.workdir / "runs")
    outputs = property(lambda self: self.workdir / "outputs")
    downloads = property(lambda self: self.workdir / "downloads")
    uploads = property(lambda self: self.workdir / "uploads")

    @property
    def model_name(self) -> str:
        return name_of(self.model)

    # -- the generation pipeline (shared by Generate and the library's nearest words) ----------
    def pipe(self):
        with self._pipe_lock:
            if self._pipe is None:
                self._pipe = load_pipeline(self.model, config=self.model_config)
            return self._pipe

    def _check_model_free(self) -> None:
        """A bias run holds the pipeline for minutes (it applies and trains tokens in it): say so, rather than wait."""
        job = self.bias
        if job is not None and job.running:
            raise TextinvError(f"the model is busy measuring the bias of {job.word!r} (Bias tab); try again when it ends")

    def check_fits(self, emb) -> None:
        """ModelMismatchError (a TextinvError) unless ``emb`` is made for this app's model."""
        self._check_model_free()
        with self._pipe_lock:
            tokens.state(self.pipe()).check(emb)

    # -- training ------------------------------------------------------------------------------
    def check_images(self, paths) -> tuple[list[Path], list[str]]:
        """(usable images, one message per unusable file)."""
        good, bad = [], []
        for p in map(Path, paths or []):
            try:
                if p.stat().st_size > MAX_IMAGE_BYTES:
                    raise TextinvError(f"{p.name}: {p.stat().st_size / 2**20:.0f} MB is too large for a training image "
                                       f"(limit {MAX_IMAGE_BYTES >> 20} MB)")
                if p.suffix.lower() not in IMAGE_SUFFIXES:
                    raise TextinvError(f"{p.name}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
                with collecting():
                    open_image(p)
                good.append(p)
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds (DecompressionBombError, …)
                bad.append(describe_error(e) if isinstance(e, TextinvError) else f"{p.name}: not a usable image ({describe_error(e)})")
        return good, bad

    def form_defaults(self) -> dict:
        """The training form's starting values: the settings' defaults (the measured saves' too),
        previews and the CLIP weights as this app is set up."""
        measuring = {f.name: settings.default_of(f) for f in settings.measure_fields()}
        return dict(settings.defaults(), **measuring) | dict(preview_every=self.preview_every, clip=self.clip)

    def form_examples(self) -> dict:
        """The training form's placeholders, by setting: the model's own where it says what it can
        learn (the built-in model draws shapes, not cats), else the settings' (<my-cat>, cat)."""
        scope = model_defaults(self.model).scope
        own = dict(scope.examples) if scope else {}
        shown = settings.form_fields() + list(settings.measure_fields())
        return {f.name: own.get(f.name, settings.spec(f).example) for f in shown}

    def start_training(self, images=None, folder: str | None = None, **given) -> TrainJob:
        """Train in the background on dropped ``images`` or a ``folder``.  ``given``: the training
        form's settings (:func:`textinv.settings.form_fields` and the measured saves',
        :func:`textinv.settings.measure_fields`, as its widgets give them: an empty box means the
        default), ``token`` at least; bad values are refused by the CLI's own check."""
        with self._job_lock:
            self._check_no_job()
            cfg, measuring = self._form_config(given)
            settings.check(cfg)
            settings.check_measuring(measuring)
            note = ""
            if measuring.measures and not cfg.save_every:  # as textinv train does
                cfg = dataclasses.replace(cfg, save_every=max(1, cfg.steps // 10))
                note = f"Save every {cfg.save_every} steps: saves to measure for Pick best / Patience"
            run = self.runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{file_stem(cfg.token)}"
            image_dir, notes = self._training_images(images, folder, run)
            cfg = dataclasses.replace(cfg, images=str(image_dir), out=str(run))
            return self._start(TrainJob(cfg.token, run, cfg.steps, warnings=list(notes), cfg=cfg, measuring=measuring,
                                        note=note))

    def resume_training(self) -> TrainJob:
        """Go on with the last run stopped from the page (or failed after a save), from its last save,
        as ``textinv train --resume`` does: bit for bit the run it would have been."""
        with self._job_lock:
            self._check_no_job()
            last = self.job
            if last is None or last.cfg is None:
                raise TextinvError("nothing to resume: no training run was stopped since the app started")
            r = last.result
            if r is not None and (r.steps >= last.total or not last.stop_event.is_set()):
                why = "took all its steps" if r.steps >= last.total else "was learned (early stopping ended it)"
                raise TextinvError(f"nothing to resume: the last run ({last.token}) {why}; start a new one")
            if not runs.has_state(last.out):
                raise TextinvError(f"nothing to resume: the last run ({last.token}) saved no step to go on from")
            cfg = dataclasses.replace(last.cfg, resume=True)
            return self._start(TrainJob(cfg.token, last.out, cfg.steps, cfg=cfg, measuring=last.measuring, note=last.note))

    def _start(self, job: TrainJob) -> TrainJob:
        job.thread = threading.Thread(target=self._train, args=(job,), name=f"textinv-train-{job.token}", daemon=True)
        self.job = job
        job.thread.start()
        return job

    def _form_config(self, given: dict) -> tuple[settings.TrainConfig, settings.MeasureConfig]:
        """The run's settings and its measured saves': the form's values over its defaults, on this app's model."""
        shown = {f.name: f for f in settings.form_fields()}
        measured = {f.name: f for f in settings.measure_fields()}
        unknown = sorted(set(given) - set(shown) - set(measured))
        if unknown:
            raise TypeError(f"start_training: {unknown[0]!r} is not a setting of the training form")
        values = dict(self.form_defaults(), **{name: form_value((shown | measured)[name], v) for name, v in given.items()})
        cfg = settings.TrainConfig(**{k: v for k, v in values.items() if k in shown}, images="", model=self.model,
                                   model_config=self.model_config, progress=False)
        return cfg, settings.MeasureConfig(**{k: v for k, v in values.items() if k in measured})

    def _training_images(self, images, folder: str | None, run: Path) -> tuple[Path, list[str]]:
        """The run's image folder: the given folder, or the dropped images (the usable ones) copied
        into ``run/images``; and a message per dropped file that is not usable."""
        if folder and str(folder).strip():
            source = Path(str(folder).strip()).expanduser()
            if not source.is_dir():
                raise TextinvError(f"Folder {source}: not a folder on this machine")
            if images:
                raise TextinvError("give either dropped images or a folder, not both")
            return source, []
        good, notes = self.check_images(images)
        if not good:
            detail = ("; ".join(notes)) if notes else "drop 3–5 or more pictures of the concept, or give a folder"
            raise TextinvError(f"no usable training images: {detail}")
        image_dir = run / "images"
        image_dir.mkdir(parents=True)
        for i, p in enumerate(good):
            shutil.copyfile(p, image_dir / f"{i:03d}-{file_stem(p.stem)}{p.suffix.lower()}")
        return image_dir, notes

    def _train(self, job: TrainJob) -> None:
        with collecting(into=job.warnings):
            try:
                job.result = self._run(job)
                job.library_path = self._add_trained(job.result)
            except Exception as e:  # noqa: BLE001 - shown in the page; the server goes on
                job.error = describe_error(e)
                if not isinstance(e, TextinvError):
                    traceback.print_exc()

    def _run(self, job: TrainJob):
        """The run as textinv train runs it: plain, or measuring its saves (Pick best, Patience)."""
        cfg, m = job.cfg, job.measuring
        heard = lambda line: setattr(job, "summary", line)  # noqa: E731
        if not m.measures:
            return training.train(cfg, on_step=job.on_step, echo=heard)
        measured = evaluate.train_measured(cfg, concept=m.concept, clip=m.clip or self.clip, dino=m.dino, n=m.eval_n,
                                           patience=m.patience, keep_best=m.pick_best, on_start=heard,
                                           echo=lambda msg: setattr(job, "note", f"measured {msg}"), on_step=job.on_step)
        if m.pick_best:
            job.note = f"Pick best: the final embedding is step {measured.best}'s; report in {measured.written['report']}"
        return measured.result

    def _add_trained(self, result) -> Path:
        """A1111 keeps trained embeddings in its embeddings folder: so do we (an older file of that name goes to .trash)."""
        emb = result.embedding
        path = self.library / f"{file_stem(emb.name)}{suffix_for(native_format(emb), emb)}"
        if path.exists():
            self._to_trash(path)
        return formats.save(emb, path, native_format(emb))

    def _check_no_job(self) -> None:
        """Training and bias runs share the model (and its memory): one at a time."""
        if self.job is not None and self.job.running:
            raise TextinvError(f"a training run ({self.job.token}) is going; stop it first")
        if self.bias is not None and self.bias.running:
            raise TextinvError(f"a bias run ({self.bias.word}) is going; wait for it to end")

    # -- bias ----------------------------------------------------------------------------------
    def start_bias(self, word: str, attribute: str, images_folder: str = "", embedding: str = "", prompts_text: str = "",
                   recipe: str = "per-value", n: int = 60, seed: int = 0, steps: int = 300, named: bool = False,
                   init: str = "majority", **options) -> BiasJob:
        """``textinv bias`` in a background thread, on this app's pipeline; outputs in ``runs/DATE-bias-WORD``.
        ``options``: the form's other textinv bias options (:meth:`_bias_options`)."""
        with self._job_lock:
            self._check_no_job()
            word = (word or "").strip()
            if not word:
                raise TextinvError("Word: give the word to measure, e.g. doctor (ball on the mini model)")
            name, values = bias.parse_attribute((attribute or "").strip(),
                                                lambda a: spec.labels(a) if a in spec.ATTRIBUTES else None)
            if recipe not in BIAS_RECIPES:
                raise TextinvError(f"Recipe {recipe!r}: choose one of {', '.join(BIAS_RECIPES)}")  # the CLI's --recipe
            n, seed, steps = int(n or 0), int(seed or 0), int(steps or 0)
            if n < 1 or steps < 1:
                raise TextinvError("Images per prompt and training steps must be at least 1")
            sources_kw = self._bias_sources(images_folder, embedding, recipe, init)
            more = self._bias_options(**options)
            held_out = [line.strip() for line in (prompts_text or "").splitlines() if line.strip()]
            out = self._new_run_folder(f"{time.strftime('%Y%m%d-%H%M%S')}-bias-{file_stem(word)}")
            prompts = None
            if held_out:
                prompts = out / "held-out-prompts.txt"
                prompts.write_text("\n".join(held_out) + "\n", encoding="utf-8")
            run = bias.BiasRun(word=word, attribute=name, values=values, recipe=recipe, **sources_kw, **more,
                               prompts=str(prompts) if prompts else None, model=self.model, model_config=self.model_config,
                               n=n, seed=seed, steps=steps, named=named, out=str(out))
            job = BiasJob(word, name, out)
            job.thread = threading.Thread(target=self._bias, args=(job, run), name=f"textinv-bias-{word}", daemon=True)
            self.bias = job
            job.thread.start()
            return job

    @staticmethod
    def _bias_sources(images_folder, embedding, recipe: str, init) -> dict:
        """What stands for the word after (a curated folder, or embeddings, or neither) and where per-value tokens start."""
        folder, emb = (str(x or "").strip() for x in (images_folder, embedding))
        if folder and emb:
            raise TextinvError("give either a curated folder (re-learn the word) or existing embedding(s), not both")
        if folder and not Path(folder).expanduser().is_dir():
            raise TextinvError(f"Folder {folder}: not a folder on this machine")
        if emb and not Path(emb).expanduser().exists():
            raise TextinvError(f"Embedding {emb}: no such file or folder on this machine")
        init = (init or "").strip() or "majority"  # an emptied box: the default, as the CLI's
        if init != "majority" and (recipe != "per-value" or not folder):
            raise TextinvError(f"Tokens start from {init!r}: only per-value tokens learned from a curated folder have a start")
        return dict(images=str(Path(folder).expanduser()) if folder else None,
                    embedding=str(Path(emb).expanduser()) if emb else None, init=init)

    def _bias_options(self, templates: str = "", clip: str = "", timesteps: str = "", guidance=None, vectors=1,
                      pack=1) -> dict:
        """textinv bias's --templates, --clip (default: textinv ui --clip), --timesteps, --guidance,
        --vectors and --pack from the form: an empty box is the CLI's default; a bad value is a one-line message."""
        templates, clip, timesteps = (str(x or "").strip() or None for x in (templates, clip, timesteps))
        if templates:
            data.load_templates(templates)
        if timesteps:
            settings.parse_timesteps(timesteps)
        vectors = _number(vectors if vectors not in (None, "") else 1, int)
        if not isinstance(vectors, int) or isinstance(vectors, bool) or not 1 <= vectors <= formats.MAX_VECTORS:
            raise TextinvError(f"Vectors: between 1 and {formats.MAX_VECTORS} (--vectors {vectors})")
        pack = _number(pack if pack not in (None, "") else 1, int)
        if not isinstance(pack, int) or isinstance(pack, bool) or pack < 1:
            raise TextinvError(f"Tokens at a time: at least 1 (--pack {pack})")
        guidance = None if guidance in (None, "") or str(guidance).strip() == "" else _number(str(guidance).strip(), float)
        if guidance is not None and not (isinstance(guidance, float) and math.isfinite(guidance) and guidance >= 1):
            raise TextinvError(f"Training guidance: at least 1, where 1 is the plain conditional loss (--guidance {guidance})")
        return dict(templates=templates, clip=clip or self.clip, timesteps=timesteps, guidance=guidance, vectors=vectors,
                    pack=pack)

    def _new_run_folder(self, name: str) -> Path:
        """runs/NAME, or NAME-2, NAME-3… when a run of that name started within the same second."""
        out, i = self.runs / name, 1
        while True:
            try:
                out.mkdir(parents=True)
                return out
            except FileExistsError:
                i += 1
                out = self.runs / f"{name}-{i}"

    def _bias(self, job: BiasJob, run) -> None:
        with collecting(into=job.warnings):
            try:
                with self._pipe_lock:  # the run applies and trains tokens in the pipeline: no generation meanwhile
                    job.result = bias.run_bias(run, pipe=self.pipe(), echo=job.echo, stop=job.stop_requested)
            except Exception as e:  # noqa: BLE001 - shown in the page; the server goes on
                if isinstance(e, bias.Stopped):
                    job.stopped = str(e)
                else:
                    job.error = describe_error(e)
                if not isinstance(e, TextinvError):
                    traceback.print_exc()
                with self._pipe_lock:  # a run stopped half-way may leave tokens applied: the next use loads a clean one
                    st = tokens.state(self._pipe, create=False) if self._pipe is not None else None
                    if st is not None and st.names:
                        self._pipe = None
            finally:
                job.ended = time.time()

    def close(self, timeout: float = 60) -> None:
        """Stop a running training or bias run and wait for it (the server is shutting down)."""
        for job in (self.job, self.bias):
            if job is not None and job.running:
                job.stop_event.set()
                job.thread.join(timeout)

    def stop_bias(self) -> str:
        """Ask the bias run to end after the prompt it is measuring (or the training step it is taking)."""
        job = self.bias
        if job is None or not job.running:
            return "No bias run is going."
        job.stop_event.set()
        return f"Stopping the bias run of {job.word!r} after the current prompt or training step…"

    def stop_training(self) -> str:
        job = self.job
        if job is None or not job.running:
            return "No training run is going."
        job.stop_event.set()
        return f"Stopping {job.token} after the current step…"

    def export(self, fmt: str) -> Path:
        """The last run's embedding in ``fmt``, as a file to download."""
        job = self.job
        if job is None or job.result is None:
            raise TextinvError("nothing to download yet: train an embedding first (or use the Library tab)")
        return self._export(job.result.embedding, fmt)

    def _export(self, emb, fmt: str, *, preview=None, clip_only: bool = False) -> Path:
        """``emb`` written in ``fmt`` (any format textinv convert writes) under downloads/FORMAT/."""
        if fmt not in EXPORT_FORMATS:
            raise TextinvError(f"format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
        stem = file_stem(emb.name)
        folder = self.downloads / fmt
        if emb.is_sdxl and fmt == "diffusers":  # diffusers' SDXL layout is a two-file folder: send it zipped
            written = formats.save(emb, folder / stem, fmt, clip_only=clip_only)
            return Path(shutil.make_archive(str(folder / stem), "zip", root_dir=written.parent, base_dir=written.name))
        return formats.save(emb, folder / f"{stem}{suffix_for(fmt, emb)}", fmt, preview=preview, clip_only=clip_only)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt: str, negative: str = "", picked=None, *, seed: int = 0, sampler: str | None = None,
                 steps: int = 30, n: int = 4, guidance: float | None = None, clip_skip: int = 1):
        """(Generation, warnings).  No embeddings picked: the whole library, as A1111 loads its folder."""
        if not (prompt or "").strip():
            raise TextinvError("Prompt: empty")
        self._check_model_free()
        n, steps, seed = int(n or 0), int(steps or 0), int(seed or 0)
        if not 1 <= n <= 64:
            raise TextinvError("Images: between 1 and 64")
        entries = self.entries()
        if picked:
            missing = [k for k in picked if k not in entries]
            if missing:
                raise TextinvError(f"{', '.join(missing)}: no longer in the library; refresh the list")
            embeddings = [entries[k] for k in picked]
        else:
            embeddings = [e for e in entries.values() if self._fits(e)]
        sampler = None if sampler in (None, "", MODEL_DEFAULT_SAMPLER) else sampler
        with collecting() as lines, self._pipe_lock:
            result = generation.generate(prompt, (negative or "").strip() or None, embeddings=embeddings or None, model=self.model,
                              pipe=self.pipe(), n=n, seed=seed, steps=steps, guidance=guidance or None, sampler=sampler,
                              out=self.outputs, batch=8, clip_skip=int(clip_skip or 1))
        return result, list(lines)

    def _fits(self, emb) -> bool:
        try:
            self.check_fits(emb)
            return True
        except TextinvError:
            return False

    # -- the library ---------------------------------------------------------------------------
    def scan(self) -> tuple[dict, list[str]]:
        """(key → Embedding for every usable embedding in the library, one line per unusable file).
        A training run kept in the library counts once, as its final embedding."""
        problems: list[str] = []
        with collecting():
            found = sources.load(self.library, on_error=lambda p, e: problems.append(f"not usable: {e}"))
        return {self._key(emb): emb for emb in found}, problems

    def entries(self) -> dict:
        return self.scan()[0]

    def _key(self, emb) -> str:
        rel = Path(emb.path).relative_to(self.library) if emb.path else Path("?")
        return f"{emb.name}  ({rel})"

    def model_family(self) -> str:
        """The loaded model's family in the library's words ("SD 1.x", "the textinv mini model"): which embeddings fit it."""
        if self._family is None:
            self._check_model_free()
            with self._pipe_lock:
                self._family = tokens.state(self.pipe()).family
        return self._family

    def family_choices(self) -> list[str]:
        """The library's family filter: everything, what fits the model, each family the library holds."""
        found = sorted({emb.family for emb in self.entries().values()})
        return [ALL_FAMILIES, FITS_MODEL] + found

    def rows(self, family: str = ALL_FAMILIES) -> tuple[list[list], list[str]]:
        """The library table (trigger, family, vectors, steps, hash, nearest words, file) and warnings;
        ``family``: one family's rows, or those that fit the model (:meth:`family_choices`)."""
        entries, problems = self.scan()
        rows = []
        for emb in entries.values():
            if family == FITS_MODEL and not self._fits(emb) or family not in (ALL_FAMILIES, FITS_MODEL, "", None) \
                    and emb.family != family:
                continue
            r = library.row(emb, self.library)
            rows.append([r["trigger"], r["family"], r["vectors"], "" if r["steps"] is None else str(r["steps"]),
                         r["hash"] or "", self.nearest(emb), r["file"]])
        return rows, problems

    def nearest(self, emb, k: int = 3) -> str:
        """'v0: word, word, word; v1: …' in this app's model, or why not."""
        try:
            stamp = Path(emb.path).stat().st_mtime_ns if emb.path else None
        except OSError:
            stamp = None
        key = (str(emb.path), emb.name, stamp)
        if key not in self._nearest_cache and self.bias is not None and self.bias.running:
            return "— (the model is busy with a bias run)"  # not cached: asked again after the run
        if key not in self._nearest_cache:
            try:
                self.check_fits(emb)
                with self._pipe_lock:
                    near = tokens.nearest_words(emb, self.pipe(), k=k)
                per_vector = next(iter(near.values())) if near else []
                text = "; ".join(f"v{i}: " + ", ".join(w for w, _ in words) for i, words in enumerate(per_vector[:4]))
                if len(per_vector) > 4:
                    text += f"; … ({len(per_vector)} vectors)"
            except TextinvError:
                text = f"— (not for this model: {tokens.describe_widths(emb)})"
            self._nearest_cache[key] = text
        return self._nearest_cache[key]

    def get(self, key: str):
        entries = self.entries()
        if not key:
            raise TextinvError("pick an embedding first")
        if key not in entries:
            raise TextinvError(f"{key}: no longer in the library; refresh the list")
        return entries[key]

    def inspect(self, key: str) -> str:
        emb = self.get(key)
        info = library.describe(Path(emb.path), emb)
        lines = [f"{k}: {v}" for k, v in info.items() if k not in ("norms", "meta", "dtype")]
        lines += [f"norms {slot}: " + " ".join(f"{x:.3g}" for x in norms) for slot, norms in info["norms"].items()]
        lines += [f"meta {k}: {v}" for k, v in info["meta"].items()]
        lines.append(f"nearest words ({self.model_name}): {self.nearest(emb, k=5)}")
        return "\n".join(lines)

    def convert(self, key: str, fmt: str, *, to_single: bool = False, clip_only: bool = False, preview=None) -> Path:
        """textinv convert on a library embedding: any format (per-layer and XTI included), --to-single,
        --clip-only, and --preview (an image file for a PNG card's picture)."""
        emb = self.get(key)
        image = None
        if preview:
            try:
                with Image.open(preview) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise TextinvError(f"{Path(preview).name}: cannot read the card's picture ({e})") from None
        emb = formats.to_single(emb) if to_single else emb  # warns what averaging loses: the page shows it
        return self._export(emb, fmt, preview=image, clip_only=bool(clip_only))

    def _new_name(self, name: str) -> Path:
        name = (name or "").strip()
        if not NAME_RE.fullmatch(name):
            raise TextinvError(f"New name {name!r}: use letters, digits, '-', '_' or '.' (it becomes the trigger word)")
        path = self.library / f"{name}.safetensors"
        if path.exists() or any(e.name.lower() == name.lower() for e in self.entries().values()):
            raise TextinvError(f"{name}: the library already has an embedding of that name; choose another")
        return path

    def _save_new(self, emb, path: Path) -> Path:
        return formats.save(emb, path, native_format(emb))

    def merge(self, keys, weights: str = "", concat: bool = False, name: str = "") -> Path:
        keys = list(keys or [])
        if len(keys) < 2:
            raise TextinvError("merge: pick at least two embeddings")
        path = self._new_name(name)
        embs = [self.get(k) for k in keys]
        ws = None
        if (weights or "").strip():
            if concat:
                raise TextinvError("weights and concatenation exclude each other")
            try:
                ws = [float(w) for w in weights.split(",")]
            except ValueError:
                raise TextinvError(f"Weights: expected numbers like 0.5,0.5, got {weights!r}") from None
        emb = library.concat(embs, name=path.stem) if concat else library.merge(embs, ws, name=path.stem)
        return self._save_new(emb, path)

    def scale(self, key: str, factor, name: str = "") -> Path:
        try:
            value = float(factor)
        except (TypeError, ValueError):
            raise TextinvError(f"Factor: expected a number, got {factor!r}") from None
        path = self._new_name(name)
        return self._save_new(library.scale(self.get(key), value, name=path.stem), path)

    def _to_trash(self, path: Path) -> Path:
        trash = self.library / ".trash"  # hidden: library scans skip it; the user can take files back
        trash.mkdir(exist_ok=True)
        dest = trash / f"{time.strftime('%Y%m%d-%H%M%S')}-{path.name}"
        shutil.move(str(path), dest)
        return dest

    def delete(self, key: str) -> str:
        emb = self.get(key)
        path = Path(emb.path)
        others = [e.name for e in self.entries().values() if e.path == emb.path and e.name != emb.name]
        dest = self._to_trash(path)
        also = f" (with {', '.join(others)}, bundled in the same file)" if others else ""
        return f"Deleted {emb.name}{also}: {path.name} moved to {dest}"

    def add_files(self, paths) -> tuple[list[str], list[str]]:
        """Add uploaded embedding files (any format, PNG cards included): (added, refused), one line each."""
        added, refused = [], []
        for p in map(Path, paths or []):
            name = p.name
            try:
                dest = self.library / file_stem(name)
                if dest.suffix.lower() not in formats.CANDIDATE_SUFFIXES:
                    raise TextinvError(f"{name}: not an embedding file (expected {', '.join(sorted(formats.CANDIDATE_SUFFIXES))})")
                with collecting():
                    found = formats.load_all(p)  # the restricted unpickler: a malicious .pt is refused here
                if not found:
                    raise TextinvError(f"{name}: holds no embedding")
                for emb in found:
                    self.check_fits(emb)
                if dest.exists():
                    raise TextinvError(f"{name}: the library already has a file of that name; delete it first")
                taken = {e.name.lower() for e in self.entries().values()}
                stem_names = [dest.stem if e.source_format not in ("png-card", "lora-bundle") else e.name for e in found]
                clash = [n for n in stem_names if n.lower() in taken]
                if clash:
                    raise TextinvError(f"{name}: the library already has an embedding triggered by {clash[0]!r}; delete or rename it first")
                shutil.copyfile(p, dest)
                added.append(f"added {dest.name}: " + ", ".join(f"{e.name} ({e.family}, {e.num_vectors} vectors)" for e in found))
            except TextinvError as e:
                refused.append(f"refused {e}" if str(e).startswith(name) else f"refused {name}: {e}")
            except Exception as e:  # noqa: BLE001
                refused.append(f"refused {name}: {describe_error(e)}")
        return added, refused


