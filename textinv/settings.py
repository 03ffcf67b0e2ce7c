"""Every training setting, declared once: the fields of :class:`TrainConfig`.

Each field carries a :class:`Setting` in its metadata: its name in words, its help text, its CLI
spelling, its range or choices, whether a resumed run must keep it (the run's identity), what a
state file written before it existed implies, and where the web form shows it.  Everything else
is derived from here: ``textinv train``'s options (:mod:`textinv.cli`), the columns and options of
``textinv train-many`` (:mod:`textinv.many`), the web form (:mod:`textinv.ui`, :mod:`textinv.app`),
the resume identity (:func:`identity`) and the one validation, :func:`check`, whose one-line
messages the CLI, the manifest's rows and the web UI all show.  A new setting is one new field.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass
from pathlib import Path

from . import data, families, formats
from .errors import TextinvError
from .models import DTYPES, MODEL_HELP

MODES = ("object", "style", "replace")
LR_SCHEDULES = ("constant", "cosine", "linear")
MAX_RESOLUTION = 2048  # SDXL trains at 1024; 2048 px already needs tens of GB per image in the UNet
MAX_SEED = 2**63 - 1
MAIN, MORE = "main", "more"  # where the web form shows a setting: up front, or in its group's folded section
# The web form's groups of settings (Setting.group), in the form's order, with their titles.
WORD, DATA, SCHEDULE, SPEED, SAVING, MEASURING = "word", "data", "schedule", "speed", "saving", "measuring"
GROUPS = {WORD: "Word", DATA: "Data", SCHEDULE: "Schedule", SPEED: "Precision and speed", SAVING: "Saving",
          MEASURING: "Measured saves"}
ALWAYS = object()  # Setting.older: every state file has held this setting
# Help texts the CLI's other commands share with their own --config / --clip-skip.
CONFIG_HELP = "For a single-file --model: a diffusers folder or hub id with the same architecture's configs (needed offline)."
CLIP_SKIP_HELP = ("A1111's Clip skip (SD 1.x/2.x): 2 = the penultimate text-encoder layer, as many fine-tunes expect. "
                  "Default 1.")


@dataclass(frozen=True)
class Setting:
    """What one TrainConfig field is, for every face; see the module's docstring."""

    label: str  # its name in words: the web form's label, and how its messages begin
    help: str  # what it does: the text of --help, and the form's hint
    identity: bool  # a resumed run must keep it (it is in state.pt's identity)
    older: object = ALWAYS  # with identity: the value a state file from before this setting existed implies
    flag: str = ""  # the CLI's option when it is not --field-name
    short: str = ""  # its one-letter CLI alias, e.g. -m
    low: float | None = None  # numbers: the smallest allowed value
    high: float | None = None  # ... and the largest
    high_open: bool = False  # ... ``high`` itself excluded
    choices: tuple = ()
    nonempty: bool = False  # text that must not be blank
    rule: str = ""  # the words for a bad value, where the range's own would say too little
    path: str = ""  # CLI: "path" or "folder" (a click.Path; the value is kept as text)
    off: tuple = ()  # CLI: (flag, help, value): a second flag that sets this value (--no-latent-cache)
    show_default: bool = True  # CLI: --help shows the default (not where the help text says it)
    cli_why_not: str = ""  # not a CLI option, and why
    form: str = ""  # the web form shows it: MAIN or MORE
    group: str = ""  # on the form: its group of settings (GROUPS), a folded section for the MORE ones
    form_why_not: str = ""  # not on the web form, and why
    per_row: bool = False  # textinv train-many: each manifest row gives its own (a column, not an option of the command)
    many_why_not: str = ""  # textinv train-many: not a manifest column, and why
    example: str = ""  # the web form's placeholder
    hint: str = ""  # the web form's hint, where the help text says nothing (default: the help text)


def _setting(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, **spec):
    """A TrainConfig field and its :class:`Setting` (``spec``: Setting's keywords)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"setting": Setting(**spec)})


NOT_A_FLAG = "not a flag yet: the Python API and the web form set it"
THE_APPS = "the app's own: textinv ui --model / --config, one model per app"


@dataclass
class TrainConfig:
    """The settings of one training run: ``train(TrainConfig(...))`` or ``train(images=..., ...)``."""

    images: str = _setting(label="Images", help="Folder of 3–5+ images (jpg/png/webp/bmp; IMG.txt sidecar captions).",
                           identity=True, path="path", form_why_not="the form's picture drop zone or folder box",
                           per_row=True)
    token: str = _setting(label="Token", help="The new trigger word (or, with --mode replace, the existing word to re-learn).",
                          identity=True, nonempty=True, rule="give the new trigger word, e.g. <my-cat>", form=MAIN, group=WORD,
                          example="<my-cat>", per_row=True)
    model: str | None = _setting(None, label="Model", help=MODEL_HELP, identity=True, short="-m", form_why_not=THE_APPS)
    model_config: str | None = _setting(None, label="Model configs", help=CONFIG_HELP, identity=False, flag="--config",
                                        form_why_not=THE_APPS)
    init: str | None = _setting(None, label="Init text", help="Init text; several tokens are spread over the vectors (A1111). "
                                "Default '*', or the word itself in replace mode.", identity=True, form=MAIN, group=WORD,
                                example="cat (default '*')")
    vectors: int = _setting(1, label="Vectors", help="Vectors per token.", identity=True, low=1, high=formats.MAX_VECTORS,
                            form=MAIN, group=WORD)
    encoders: str | None = _setting(None, label="Encoders", help="The text encoders that learn, comma-separated slot "
                                    "names (SD3: clip_l,clip_g,t5; Flux.1: clip_l,t5; SDXL: clip_l,clip_g); the "
                                    "others keep the init text's vectors. Default: all.", identity=True, older=None,
                                    form=MORE, group=WORD, example="all (e.g. t5)")
    per_layer: bool = _setting(False, label="Per layer (P+)", help="P+: learn one set of vectors per UNet cross-attention "
                               "layer (SD 1.x/2.x; saved as --format per-layer, or xti for kohya).", identity=True,
                               older=False, form=MORE, group=WORD)
    mode: str = _setting("object", label="Mode", help="", identity=True, choices=MODES, form=MAIN, group=WORD)
    templates: str | None = _setting(None, label="Templates", help="'object', 'style' or a file of templates with "
                                     "[name]/{} and [filewords]. Default: by --mode.", identity=True, form=MORE, group=WORD)
    steps: int = _setting(500, label="Steps", help="", identity=False, low=1, form=MAIN, group=SCHEDULE,
                          hint="The most a run takes: it stops once the word is learned (Early stopping).")
    lr: str = _setting("5e-3", label="Learning rate", help="A number, or an A1111 schedule like '0.005:100, 1e-3:1000, 1e-5'.",
                       identity=True, form=MORE, group=SCHEDULE)
    lr_t5: str | None = _setting(None, label="T5 learning rate", help="The T5 vectors' learning rate (SD3, Flux.1): "
                                 "a number or a schedule, as --lr. Default: --lr.", identity=True, older=None, form=MORE,
                                 group=SCHEDULE, example="the learning rate")
    batch: int = _setting(4, label="Batch", help="", identity=True, low=1, form=MORE, group=SCHEDULE,
                          hint="Image views per batch.")
    grad_accum: int = _setting(1, label="Gradient accumulation", help="", identity=True, low=1, form=MORE, group=SCHEDULE,
                               hint="Batches averaged per optimizer step: a larger batch in the same memory.")
    timesteps: str = _setting("all", label="Timesteps", help="LOW:HIGH: train on these noise levels only (of 1000), e.g. "
                              "300:1000 to re-learn a word's colours (replace mode).", identity=True, older="all", form=MORE,
                              group=WORD)
    guidance: float = _setting(1.0, label="Training guidance", help="Fit the prediction the sampler uses at this "
                               "classifier-free guidance scale (e.g. 4); 1: the plain loss.", identity=True, older=1.0,
                               low=1, rule="at least 1, where 1 is the plain conditional loss", form=MORE, group=WORD)
    resolution: int | None = _setting(None, label="Resolution", help="Training size in pixels, a multiple of the VAE's "
                                      "factor (default: the model's native size).", identity=True, low=8, high=MAX_RESOLUTION,
                                      rule=f"must be between 8 and {MAX_RESOLUTION} pixels", form=MORE, group=DATA,
                                      example="the model's native size")
    crops: int = _setting(1, label="Crops", help="Views per image: a centre crop plus random crops.", identity=True, low=1,
                          form=MORE, group=DATA)
    flip: bool = _setting(True, label="Flip", help="Also train on mirrored views.", identity=True, form=MORE, group=DATA)
    buckets: bool | None = _setting(None, label="Buckets", help="Aspect-ratio buckets: each image kept whole at about the "
                                    "training area (default: on when some image is not square; off: centre crops).",
                                    identity=True, older=None, form=MORE, group=DATA)
    captions: bool | None = _setting(None, label="Captions", help="Use IMG.txt sidecar captions (A1111's [filewords]; "
                                     "default: on when any image has one).", identity=True, older=None, form=MORE, group=DATA)
    shuffle_captions: bool = _setting(False, label="Shuffle captions", help="Shuffle each caption's comma-separated tags "
                                      "every step.", identity=True, older=False, form=MORE, group=DATA)
    keep_tokens: int = _setting(0, label="Keep tokens", help="With shuffling/dropout: keep the first N tags in place.",
                                identity=True, older=0, low=0, form=MORE, group=DATA)
    caption_dropout: float = _setting(0.0, label="Caption dropout", help="Drop each tag (after --keep-tokens) with this "
                                      "probability, every step.", identity=True, older=0.0, low=0, high=1, high_open=True,
                                      rule="must be a probability in [0, 1)", form=MORE, group=DATA)
    alpha_mask: bool = _setting(False, label="Alpha mask", help="Weight the loss by the images' transparency: a cut-out "
                                "teaches its subject, not its background.", identity=True, older=False, form=MORE, group=DATA)
    lr_warmup: int = _setting(0, label="Warm-up steps", help="Steps of linear warm-up to --lr.", identity=True, older=0,
                              low=0, form=MORE, group=SCHEDULE)
    lr_schedule: str = _setting("constant", label="Learning-rate schedule", help="After the warm-up: keep --lr, or decay it "
                                "to 0 at the last step.", identity=True, older="constant", choices=LR_SCHEDULES, form=MORE,
                                group=SCHEDULE)
    preserve_norm: bool = _setting(False, label="Preserve norm", help="After every step, rescale each learned vector "
                                   "to the median norm of its encoder's vocabulary (OneTrainer's option).",
                                   identity=True, older=False, form=MORE, group=WORD)
    seed: int = _setting(0, label="Seed", help="", identity=True, low=0, high=MAX_SEED, form=MORE, group=SCHEDULE)
    precision: str = _setting("fp32", label="Precision", help="The frozen model's precision (fp16: GPUs only, with loss "
                              "scaling); learned vectors always stay fp32.", identity=True, choices=tuple(DTYPES), form=MORE,
                              group=SPEED)
    clip_skip: int = _setting(1, label="Clip skip", help=CLIP_SKIP_HELP, identity=True, older=1, low=1, show_default=False,
                              form=MORE, group=WORD)
    grad_checkpointing: bool = _setting(False, label="Gradient checkpointing", help="Recompute the UNet's activations in "
                                        "the backward pass: less memory, more time.", identity=False, form=MORE, group=SPEED)
    compile: bool = _setting(False, label="Compile", help="torch.compile the UNet.", identity=False, form=MORE, group=SPEED)
    weight_decay: float = _setting(0.0, label="Weight decay", help="AdamW's weight decay on the learned vectors.",
                                   identity=True, low=0, cli_why_not="the Python API's only: the CLI and the form keep "
                                   "A1111's 0", form_why_not="the Python API's only: the CLI and the form keep A1111's 0")
    early_stop: bool = _setting(True, label="Early stopping", help="Stop once the loss of a fixed evaluation batch has "
                                "flattened (the word is learned); --steps is then the most a run may take. --no-early-stop "
                                "trains exactly --steps.", identity=False, form=MORE, group=SCHEDULE)
    eval_every: int = _setting(5, label="Evaluate every", help="Score the evaluation batch every N steps (early stopping).",
                               identity=True, older=5, low=1, form=MORE, group=SCHEDULE)
    eval_batch: int = _setting(8, label="Evaluation batch", help="Items in the evaluation batch (early stopping).",
                               identity=True, older=8, low=1, rule="at least 1 item, scored every --eval-every steps",
                               form=MORE, group=SCHEDULE)
    save_every: int = _setting(0, label="Save every", help="Also save NAME-STEP every N steps (and a resume point).",
                               identity=False, low=0, rule="0 (off) or a number of steps", form=MORE, group=SAVING)
    preview_every: int = _setting(0, label="Preview every", help="Write a fixed-seed preview grid every N steps.",
                                  identity=False, low=0, rule="0 (off) or a number of steps", form=MORE, group=SAVING)
    preview_prompts: list[str] = _setting(factory=list, label="Preview prompts", help="The previews' prompts, one a line "
                                          "(default: the first template with the trigger).", identity=False,
                                          cli_why_not=NOT_A_FLAG, form=MORE, group=SAVING)
    format: str = _setting("diffusers", label="Format", help="With --per-layer: per-layer (what the default means there) or "
                           "xti (kohya's, SD 1.x/2.x UNets).", identity=False,
                           choices=formats.SAVE_FORMATS + formats.PER_LAYER_FORMATS,
                           form_why_not="the app keeps each embedding in the library in its own format; Download converts")
    out: str | None = _setting(None, label="Output folder", help="Output folder (default runs/TOKEN).", identity=False,
                               path="path", form_why_not="the app gives every run its own folder (WORKDIR/runs/DATE-TOKEN)",
                               per_row=True)
    resume: bool = _setting(False, label="Resume", help="Continue the run in --out from its last save.", identity=False,
                            form_why_not="every run from the form starts in a new folder; the Train tab's "
                            "Resume button goes on with the last run stopped from the page",
                            many_why_not="train-many decides it, from each run folder")
    progress: bool = _setting(True, label="Progress bar", help="Draw a progress bar in the terminal.", identity=False,
                              cli_why_not="the CLI always draws it", form_why_not="the page shows its own progress")
    latent_cache: str | None = _setting(None, label="Latent cache", help="Keep the views' VAE latents here, so the next run on "
                                        "the same images starts at once (default: $TEXTINV_CACHE/latents, else "
                                        "~/.cache/textinv/latents).", identity=False, path="folder",
                                        off=("--no-latent-cache", "Neither read nor keep cached latents.", ""),
                                        form_why_not="the app's process decides it ($TEXTINV_CACHE)")

    def resolved_out(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / formats.file_stem(self.token)

    @property
    def file_format(self) -> str:
        """The format saves are written in: ``format``, except that for a per-layer run the default
        (diffusers, which holds one set of vectors) means textinv's per-layer layout."""
        return "per-layer" if self.per_layer and self.format == "diffusers" else self.format

    def format_for(self, emb) -> str:
        """The format ``emb`` (the run's embedding) is written in: :attr:`file_format`, except that
        for an SD3/Flux.1 embedding the default (diffusers) means its family's own one-file layout
        (``sd3``/``flux``, :func:`textinv.formats.native_format`), which every tool reads whole."""
        fmt, native = self.file_format, formats.native_format(emb)
        return native if fmt == "diffusers" and native in formats.FLOW_LAYOUTS else fmt



@dataclass
class MeasureConfig:
    """``textinv train``'s measured saves (--pick-best, --patience): not settings of the run itself
    (``train_measured`` takes them beside it), declared here so that the web form is generated
    from them as from TrainConfig.  The CLI declares its own options; a test keeps them alike."""

    pick_best: bool = _setting(False, label="Pick best", help="Measure every save (as textinv eval does) and make the "
                               "recommended step the final embedding.", identity=False, form=MORE, group=MEASURING)
    patience: int | None = _setting(None, label="Patience", help="Measure every save and stop once N saves in a row "
                                    "bring no better fidelity × editability score.", identity=False, low=1, form=MORE,
                                    group=MEASURING, example="off (e.g. 3)")
    eval_n: int = _setting(8, label="Images per prompt (measuring)", help="Images per prompt when measuring saves "
                           "(--pick-best / --patience).", identity=False, low=1, form=MORE, group=MEASURING)
    concept: str | None = _setting(None, label="Concept", help="Mini world: the shape the judge should see (default: "
                                   "read off the training images).", identity=False, form=MORE, group=MEASURING)
    clip: str | None = _setting(None, label="CLIP weights", help="CLIP weights (folder or hub id) for measuring saves "
                                "on real models.", identity=False, form=MORE, group=MEASURING)
    dino: str | None = _setting(None, label="DINO weights", help="DINO weights (folder or hub id) for measuring saves "
                                "on real models.", identity=False, form=MORE, group=MEASURING)

    @property
    def measures(self) -> bool:
        """Whether the run's saves are measured (train_measured) rather than a plain run."""
        return self.pick_best or self.patience is not None


# ------------------------------------------------------------------------------ reading the table
def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainConfig)


def spec(f: dataclasses.Field) -> Setting:
    return f.metadata["setting"]


def flag_of(f: dataclasses.Field) -> str:
    """The setting's CLI option, as messages name it: ``--clip-skip``."""
    return spec(f).flag or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field):
    """The default value (a fresh one for lists); dataclasses.MISSING for a required setting."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(TrainConfig) | typing.get_type_hints(MeasureConfig)


def kind_of(f: dataclasses.Field) -> tuple[type, bool]:
    """(the value's type: str, int, float, bool or list; whether None is allowed too)."""
    hint = _hints()[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return list, False
    return (args[0], True) if args else (hint, False)


def cli_fields() -> list[dataclasses.Field]:
    return [f for f in fields() if not spec(f).cli_why_not]


def column_fields() -> list[dataclasses.Field]:
    """The settings a ``textinv train-many`` manifest's columns may set: train's options, less those it decides."""
    return [f for f in cli_fields() if not spec(f).many_why_not]


def many_option_fields() -> list[dataclasses.Field]:
    """``textinv train-many``'s options: every row's defaults (the columns, less each row's own)."""
    return [f for f in column_fields() if not spec(f).per_row]


def required_fields() -> list[dataclasses.Field]:
    return [f for f in fields() if default_of(f) is dataclasses.MISSING]


def form_fields() -> list[dataclasses.Field]:
    return [f for f in fields() if spec(f).form]


def measure_fields() -> tuple[dataclasses.Field, ...]:
    """The measured saves' settings (:class:`MeasureConfig`): the web form shows them after TrainConfig's."""
    return dataclasses.fields(MeasureConfig)


def defaults() -> dict:
    """Every setting that has a default, by field name."""
    return {f.name: default_of(f) for f in fields() if default_of(f) is not dataclasses.MISSING}


# ------------------------------------------------------------------------------ resuming a run
def identity(cfg: TrainConfig) -> dict:
    """What must not change between a run and its resumption (kept in its state file)."""
    return {f.name: str(getattr(cfg, f.name)) for f in fields() if spec(f).identity}


def older_identity() -> dict:
    """A state file from before a setting existed was made with this value of it."""
    return {f.name: str(spec(f).older) for f in fields() if spec(f).identity and spec(f).older is not ALWAYS}


def changed(was: dict, cfg: TrainConfig) -> tuple[str, str, str] | None:
    """The first setting of a run's identity that ``cfg`` changes, as (name, was, now), against the
    identity a state recorded (``was``; a setting it predates: its :attr:`Setting.older`); None: none."""
    older, now = older_identity(), identity(cfg)
    return next(((k, then, now[k]) for k in now if (then := was.get(k, older.get(k))) != now[k]), None)


def recorded(record) -> TrainConfig | None:
    """The settings a run recorded in its config.json, as a TrainConfig, or None where the record
    is not a run's (it must name the trained token and the steps).  Keys this version does not know
    (a newer textinv's) are left out; values are as recorded, unchecked: a reader of a stranger's
    folder checks what it uses."""
    if not (isinstance(record, dict) and isinstance(record.get("token"), str) and record["token"] and "steps" in record):
        return None
    known = {f.name: record[f.name] for f in fields() if f.name in record}
    return TrainConfig(**{"images": "", **known})


# ------------------------------------------------------------------------------ checking
def check(cfg: TrainConfig) -> None:
    """Every setting that can be checked without the model, in one place: the CLI, the web UI and
    Python all call it, so a bad value gets the same one line everywhere.  What depends on the
    model (a multiple of the VAE's factor, the text encoder's layers) is checked once it is loaded."""
    for f in fields():
        value = getattr(cfg, f.name)
        problem = _problem(f, value)
        if problem:
            shown = "" if spec(f).nonempty else f" {value!r}" if isinstance(value, str) else f" {value}"
            where = f.name if spec(f).cli_why_not else flag_of(f)  # a setting the CLI lacks: its Python name
            raise TextinvError(f"{spec(f).label}: {problem} ({where}{shown})")
    if cfg.per_layer and cfg.file_format not in formats.PER_LAYER_FORMATS:
        raise TextinvError(f"--format {cfg.format}: holds one set of vectors; --per-layer saves per-layer (its default) or xti")
    if not cfg.per_layer and cfg.format in formats.PER_LAYER_FORMATS:
        raise TextinvError(f"--format {cfg.format}: holds per-layer (P+) embeddings; add --per-layer to train one")
    if cfg.per_layer and (cfg.compile or cfg.grad_checkpointing):
        raise TextinvError("--per-layer: not with --grad-checkpointing (the recomputed layers would not see their own "
                           "states) or --compile (not supported yet)")
    if cfg.lr_warmup >= cfg.steps:
        raise TextinvError(f"--lr-warmup {cfg.lr_warmup}: must be between 0 and --steps ({cfg.steps}) - 1")
    parse_lr(cfg.lr)
    if cfg.lr_t5 is not None:
        parse_lr(cfg.lr_t5, flag="--lr-t5")
    parse_encoders(cfg.encoders)
    parse_timesteps(cfg.timesteps)
    templates_of(cfg)  # a bad --templates fails before the model loads


def check_measuring(m: MeasureConfig) -> None:
    """The measured saves' values, in the same words as :func:`check` uses for the run's."""
    for f in measure_fields():
        value = getattr(m, f.name)
        problem = _problem(f, value)
        if problem:
            raise TextinvError(f"{spec(f).label}: {problem} ({flag_of(f)} {value!r})")


def _problem(f: dataclasses.Field, value) -> str | None:
    """What is wrong with one setting's value, in words; None: nothing."""
    s, (kind, optional) = spec(f), kind_of(f)
    if value is None and optional:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return "must be a whole number"
    if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        return "must be a number"
    if s.choices and value not in s.choices:
        return f"choose one of {', '.join(s.choices)}"
    if s.nonempty and not str(value).strip():
        return s.rule or "must not be empty"
    if kind in (int, float) and not _within(value, s):
        return s.rule or _range_words(s)
    return None


def _within(x, s: Setting) -> bool:
    if not math.isfinite(x) or (s.low is not None and x < s.low):
        return False
    return s.high is None or (x < s.high if s.high_open else x <= s.high)


def _range_words(s: Setting) -> str:
    if s.high is None:
        return f"at least {s.low}"
    return f"must be in [{s.low}, {s.high})" if s.high_open else f"must be between {s.low} and {s.high}"


def parse_lr(spec: str | float, flag: str = "--lr") -> list[tuple[float, int | None]]:
    """A1111's schedule: ``"0.005:100, 1e-3:1000, 1e-5"`` = 0.005 until step 100, then …
    (``flag``: the option a bad one is named by)."""
    out = []
    try:
        for part in str(spec).split(","):
            rate, _, until = part.strip().partition(":")
            end = int(until) if until.strip() not in ("", "-1") else None
            out.append((float(rate), end))
    except ValueError:
        raise TextinvError(f"{flag} {spec!r}: expected a number or a schedule like '0.005:100, 1e-3:1000, 1e-5'") from None
    if not out or any(r <= 0 or not math.isfinite(r) for r, _ in out):
        raise TextinvError(f"{flag} {spec!r}: learning rates must be positive numbers")
    return out


def parse_encoders(spec: str | None) -> tuple[str, ...] | None:
    """``"clip_l, t5"`` → the slot keys named (None: every encoder of the model).  Whether the model
    has them is checked once it is loaded; here, that each is some family's slot."""
    if spec is None or not str(spec).strip():
        return None
    keys = tuple(k.strip() for k in str(spec).split(","))
    known = dict.fromkeys(s.key for f in families.FAMILIES for s in f.slots)
    bad = next((k for k in keys if k not in known), None)
    if bad is not None or len(set(keys)) != len(keys):
        why = f"no model has a text encoder {bad!r}" if bad is not None else "an encoder named twice"
        raise TextinvError(f"--encoders {spec!r}: {why} (slot names: {', '.join(known)}, comma-separated)")
    return keys


def parse_timesteps(spec: str, total: int | None = None) -> tuple[int, int | None]:
    """``"all"`` or ``"LOW:HIGH"`` (either side may be empty) → the half-open range of training timesteps.
    ``total``: the model's number of timesteps; None (before the model is loaded) checks the form only,
    and an open end stays None.

    Why: what a prompt decides at high noise (layout, colour) and at low noise (texture, detail)
    differ; re-learning a word's colour distribution (replace mode) needs the high-noise steps, and
    the low-noise ones mostly pull the vector towards the details of the few curated pictures."""
    if str(spec).strip().lower() in ("", "all"):
        return 0, total
    low, sep, high = str(spec).partition(":")
    try:
        lo, hi = int(low or 0), int(high) if high else total
    except ValueError:
        lo = hi = -1
    if not sep or not 0 <= lo < (hi if hi is not None else math.inf) <= (total or math.inf):
        most = f" <= {total}" if total else ""
        raise TextinvError(f"--timesteps {spec!r}: expected LOW:HIGH with 0 <= LOW < HIGH{most} (or 'all')")
    return lo, hi


def templates_of(cfg: TrainConfig) -> list[str]:
    """The prompt templates of a run: --templates, else the mode's built-in list."""
    return data.load_templates(cfg.templates or ("style" if cfg.mode == "style" else "object"))
