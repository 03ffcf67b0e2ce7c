"""Load any Stable Diffusion pipeline — hub id, local diffusers folder, single-file checkpoint,
or the built-in mini model — through one path.

The mini model is an ordinary diffusers folder shipped as package data; ``"mini"`` (the default)
is only a name for that folder, so nothing downstream knows or cares which model it got.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import diffusers
import diffusers.utils.logging as dlog
import numpy as np
import torch
import transformers.utils.logging as tlog
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open

from . import families, formats
from .errors import TextinvError

MINI_NAME = "mini"
MINI_PATH = Path(__file__).parent / "data" / "mini"
MINI_FLOW_PATH = Path(__file__).parent / "data" / "mini-flow"
BUILT_IN = {MINI_NAME: MINI_PATH, "mini-flow": MINI_FLOW_PATH}  # the mini world's models, by name (docs/mini-world.md)
SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".bin"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SETTINGS_FILE = "textinv.json"  # a model folder's own defaults: {"guidance": 4.0, "family": "..."}
MODEL_HELP = ("Hub id, diffusers folder, single-file checkpoint (.safetensors/.ckpt), 'mini' (the built-in model, the "
              "default) or 'mini-flow' (the built-in Flux.1-shaped model).")


@dataclass(frozen=True)
class Scope:
    """What a narrow model can draw (the built-in mini model: its 32×32 world and 84 words), so
    that photos or prompts outside it get a plain warning instead of a silent embedding of nothing."""

    about: str  # one sentence, shown in the warning
    image_size: int  # it draws (and learns from) pictures of this many pixels a side
    words: frozenset  # every word it has ever read
    examples: tuple = ()  # (training setting, example) pairs: what the web form suggests learning on it


@dataclass(frozen=True)
class ModelDefaults:
    """What a model wants when the user does not say: its own settings file, else A1111's defaults."""

    guidance: float = 7.0  # AUTOMATIC1111's CFG scale
    family: str | None = None  # a name for its text encoder's width, shown by inspect and the library
    scope: Scope | None = None  # None: a general model (anything may be drawn or learned)
    held_out_prompts: tuple = ()  # `textinv bias`: prompts in this model's words, the word written {}
    # A Flux.1-shaped model that is not guidance-distilled (the mini-flow model) is sampled with
    # classifier-free guidance against a negative prompt ("true CFG"); FLUX.1-dev/-schnell are not.
    true_cfg: bool = False
    # The T5 prompt length it was trained with (diffusers' ``max_sequence_length``): T5 pads are
    # encoded and attended without a mask, so sampling at another length changes the picture.
    # None: the pipeline's own default (SD3 256, Flux.1 512).
    t5_length: int | None = None
    # `textinv demo`'s training settings tuned for this model, as (name, value) pairs (the mini world's
    # models: docs/demo.md); names that `textinv.demo.DemoSettings` lacks are ignored there.
    demo: tuple = ()


def defaults(model: str | os.PathLike | None = None) -> ModelDefaults:
    """The defaults of ``--model`` (None: the built-in model), from ``SETTINGS_FILE`` in its folder."""
    try:
        where = Path(resolve_model(model))
    except TextinvError:
        return ModelDefaults()
    settings = where / SETTINGS_FILE
    if not settings.is_file():
        return ModelDefaults()
    try:
        raw = json.loads(settings.read_text(encoding="utf-8"))
        guidance = float(raw.get("guidance", ModelDefaults.guidance))
        family = raw.get("family")
    except (OSError, ValueError, TypeError, AttributeError):
        return ModelDefaults()  # a damaged settings file: A1111's defaults, as for any model
    if not (math.isfinite(guidance) and guidance > 0):
        guidance = ModelDefaults.guidance
    held = raw.get("held_out_prompts")
    held = tuple(str(x) for x in held if "{}" in str(x)) if isinstance(held, list) else ()
    t5 = raw.get("t5_length")
    t5 = t5 if isinstance(t5, int) and not isinstance(t5, bool) and 1 <= t5 <= 4096 else None
    demo = raw.get("demo")
    demo = tuple((str(k), v) for k, v in demo.items() if isinstance(v, (str, int, float, bool))) if isinstance(demo, dict) else ()
    return ModelDefaults(guidance, family if isinstance(family, str) else None, _scope(raw.get("scope")), held,
                         raw.get("true_cfg") is True, t5, demo)


def _scope(raw) -> Scope | None:
    try:
        scope = Scope(str(raw["about"]), int(raw["image_size"]), frozenset(str(w) for w in raw["words"]))
    except (TypeError, KeyError, ValueError):
        return None  # no scope, or a damaged one: treated as a general model
    examples = raw.get("examples")
    if isinstance(examples, dict):  # anything else (damaged): the settings' own examples
        scope = dataclasses.replace(scope, examples=tuple((str(k), v) for k, v in examples.items() if isinstance(v, str)))
    return scope


USE_A_REAL_MODEL = ("for your own pictures and words use a real checkpoint: --model with a hub id "
                    "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), a diffusers folder, or a .safetensors file")


def drawn_at(image, size: int) -> bool:
    """Whether ``image`` is a picture drawn at ``size`` pixels: its short side ``size`` (a render,
    or renders side by side), or all that enlarged by a whole factor k without smoothing (how the
    mini world shows its renders), where every k×k block is one colour (up to a little noise)."""
    w, h = image.size
    k = min(w, h) // size
    if k < 1 or min(w, h) != k * size or w % k or h % k:
        return False
    if k == 1:
        return True
    blocks = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(h // k, k, w // k, k, 3)
    spread = blocks.std(axis=(1, 3)).max(axis=-1)  # per block, the most varying channel
    return float((spread > 12).mean()) <= 0.01  # a photo or a smooth drawing has many mixed blocks


def outside_words(scope: Scope, prompt: str, triggers=()) -> list[str]:
    """The words of ``prompt`` (triggers and A1111 syntax aside) the model has never read."""
    text = prompt
    for t in sorted(triggers, key=len, reverse=True):  # whole words only: a trigger "t" is not the t of "photo"
        text = re.sub(rf"(?<![\w]){re.escape(t)}(?![\w])", " ", text)
    words = re.findall(r"[a-z]+", text.lower())
    return sorted({w for w in words if w not in scope.words and w not in ("and", "break")})


def outside_world(pipe, *, images=(), prompts=(), triggers=()) -> str | None:
    """One sentence when ``pipe``'s model is narrow and these training images or prompts lie
    outside what it draws; None when they fit (or the model is a general one)."""
    scope = pipeline_defaults(pipe).scope
    if scope is None:
        return None
    problems = []
    outside = [im for im in images if not drawn_at(im, scope.image_size)]
    if outside:
        problems.append(f"{len(outside)} of {len(images)} images are not pictures of its world (drawn at "
                        f"{scope.image_size} px), so the embedding cannot learn what they show")
    words = sorted({w for p in prompts for w in outside_words(scope, p, triggers)})
    if words:
        shown = ", ".join(words[:8]) + (", …" if len(words) > 8 else "")
        problems.append(f"it has never read the word{'s' if len(words) > 1 else ''} {shown}")
    if not problems:
        return None
    return f"{'; '.join(problems)}: {scope.about}; {USE_A_REAL_MODEL}"


def warn_outside_world(pipe, *, images=(), prompts=(), triggers=(), where: str = "") -> None:
    """:func:`outside_world` as one warning (the CLI shows it as one line)."""
    note = outside_world(pipe, images=images, prompts=prompts, triggers=triggers)
    if note:
        warnings.warn(f"{where}: {note}" if where else note, stacklevel=2)


def pipeline_defaults(pipe) -> ModelDefaults:
    """The defaults of the model a pipeline was loaded from (diffusers records the folder)."""
    where = getattr(pipe, "name_or_path", None)
    return defaults(where) if where else ModelDefaults()


def name_of(model: str | os.PathLike | None) -> str:
    """How a ``--model`` value is named in reports and metadata."""
    return MINI_NAME if model is None else str(model)


def _register_families() -> None:
    """Each built-in model gets a family of its own, named as its settings say: a row of
    textinv.families shaped like the family whose text encoders it has (their folders and kinds:
    CLIP or T5), with its widths."""
    for path in BUILT_IN.values():
        family = defaults(path).family
        configs = _encoder_configs(path)
        shapes = [f for f in families.FAMILIES
                  if all(s.text_encoder in configs and families.kind_of(configs[s.text_encoder].get("model_type")) == s.kind
                         for s in f.slots)]
        if family and shapes:
            base = max(shapes, key=lambda f: len(f.slots))
            widths = [configs[s.text_encoder].get("hidden_size", configs[s.text_encoder].get("d_model")) for s in base.slots]
            families.register(families.like(base, family, *widths))


def _encoder_configs(path: Path) -> dict:
    """The text encoders' config.json of a model folder, by folder name ({} where unreadable)."""
    configs = {}
    for folder in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        try:
            configs[folder] = json.loads((path / folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
    return configs


def resolve_model(model: str | os.PathLike | None) -> str:
    """Turn the user's ``--model`` value into a folder, file or hub id."""
    name = MINI_NAME if model is None else str(model)
    if name in BUILT_IN:
        path = BUILT_IN[name]
        if not (path / "model_index.json").is_file():
            raise TextinvError(f"the built-in {name} model is not installed at {path} (run `textinv world train-base`)")
        return str(path)
    return str(model)


def _pipeline_class(name: str = "DiffusionPipeline"):
    """diffusers' class of that name (a family row names the one its single-file checkpoints load as)."""
    return getattr(diffusers, name)


def _single_file_family(path: Path) -> families.Family:
    """The family whose checkpoint key a single-file checkpoint holds (SDXL's: a second text
    encoder under ``conditioner.embedders.1``); else SD 1.x, and diffusers' own detection decides
    (a .ckpt is never opened here)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        for family in families.FAMILIES:
            if family.checkpoint_key and any(k.startswith(family.checkpoint_key) for k in keys):
                return family
    return families.SD1


def _quiet_loading() -> None:
    """No per-component "Loading weights" bars: loading takes seconds and the bars bury our output."""
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


_CHATTY_LOGGERS = ("diffusers", "huggingface_hub", "transformers")


@contextlib.contextmanager
def _hushed():
    """The libraries' own log lines ("Couldn't connect to the Hub", "Will try to load from local
    cache", ...) are dropped while a model loads: a failure is reported as our one line, and a
    success needs no commentary.  (Python warnings are left alone: the UI routes them per thread,
    and catching them here would take other threads' too.)"""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _is_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (also when it was set after the import)."""
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _is_hub_id(value: str) -> bool:
    """Whether ``value`` could name a model on the Hub ("name" or "owner/name"); anything else is a path."""
    if value.count("/") > 1 or value.startswith((".", "/", "~")) or "\\" in value:
        return False
    if Path(value).suffix.lower() in SINGLE_FILE_SUFFIXES:
        return False  # "model.safetensors": a file the user expected to be here
    try:
        validate_repo_id(value)
    except Exception:  # HFValidationError: "a/b/", "a--b", spaces, ...
        return False
    return True


def _hub_cache_state(repo_id: str) -> str | None:
    """What the local Hugging Face cache holds of ``repo_id``: "pipeline" (its model_index.json),
    "other" (some files, but no model_index.json), or None (nothing)."""
    found = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(found, str):
        return "pipeline"
    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    return "other" if folder.is_dir() else None


_WHAT_TO_PASS = ("pass a diffusers folder, a single-file checkpoint (.safetensors/.ckpt) with --config, "
                 "a hub id (online or cached), or 'mini'")


def _not_a_pipeline_folder(path: Path, shown: str) -> str:
    """Why a folder is not a diffusers model, and what in or around it would be."""
    checkpoints = sorted(p.name for p in path.iterdir()
                         if p.is_file() and p.suffix.lower() in {".safetensors", ".ckpt"}) if path.is_dir() else []
    if (path.parent / "model_index.json").is_file():
        hint = f"it is the {path.name!r} part of a diffusers model: pass its parent folder"
    elif len(checkpoints) == 1:
        hint = f"for the checkpoint inside, pass {path / checkpoints[0]} (with --config)"
    else:
        hint = _WHAT_TO_PASS
    return f"{shown}: a folder, but not a diffusers model (no model_index.json); {hint}"


# requests', httpx's and Python's names for "the Hub could not be reached"
_NETWORK_ERRORS = {"ConnectionError", "TransportError", "TimeoutException", "Timeout", "TimeoutError"}


def _hub_failure(shown: str, err: BaseException) -> str:
    """One line for a hub id that did not load online: only what the error chain says for sure."""
    chain, seen = [], set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, GatedRepoError):
            return (f"{shown}: a gated model on the Hugging Face Hub: accept its terms on the model page and log in "
                    "(`hf auth login` or HF_TOKEN)")
        if isinstance(e, RepositoryNotFoundError):
            return (f"{shown}: no such local folder or file, and the Hugging Face Hub has no model by that id that "
                    f"you can access (a private one needs `hf auth login` or HF_TOKEN); {_WHAT_TO_PASS}")
        if isinstance(e, RevisionNotFoundError):
            return f"{shown}: the Hugging Face Hub has this model, but not the revision asked for"
        if isinstance(e, EntryNotFoundError):
            return (f"{shown}: on the Hugging Face Hub, but not a diffusers model (no model_index.json); for a "
                    "single-file checkpoint, download the file and pass it with --config")
    for e in chain:
        if isinstance(e, HfHubHTTPError) or _NETWORK_ERRORS & {c.__name__ for c in type(e).__mro__}:
            return (f"{shown}: no such local folder or file, not in the local Hugging Face cache, and the "
                    f"Hugging Face Hub could not be reached ({_first_line(e)})")
    return f"{shown}: cannot load this model from the Hugging Face Hub ({_first_line(err)})"


def load_pipeline(model: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "fp32", device: str = "cpu",
                  config: str | os.PathLike | None = None):
    """Load a text-to-image pipeline; errors are one line naming ``model`` and the problem.

    ``config`` (single-file checkpoints only): a diffusers folder or hub id whose component
    configs describe the checkpoint's architecture.  Without it diffusers fetches a default config
    from the hub, which an offline machine cannot do.
    """
    _quiet_loading()
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    where = resolve_model(model)
    shown = formats.printable(where)  # as the user typed it (the built-in model: its folder)
    path = Path(where)
    if config and not path.is_file():
        raise TextinvError(f"--config {formats.printable(config)}: only for a single-file checkpoint; {shown} is a "
                           "diffusers folder or hub id, which carries its own configs")
    if path.is_dir():
        pipe = _load_folder(where, shown, torch_dtype)
    elif path.is_file():
        pipe = _load_single_file(where, shown, torch_dtype, config)
    elif path.exists():
        raise TextinvError(f"{shown}: not a file or folder (a pipe, device or socket?)")
    elif not _is_hub_id(where):
        raise TextinvError(f"{shown}: no such file or folder")
    else:
        pipe = _load_hub(where, shown, torch_dtype)
    try:
        families.of_pipeline(pipe)
    except TextinvError:
        raise TextinvError(f"{shown}: {type(pipe).__name__} has no CLIP text encoder; textinv needs a Stable "
                           "Diffusion 1.x/2.x/SDXL pipeline") from None
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_folder(where: str, shown: str, torch_dtype):
    path = Path(where)
    if not (path / "model_index.json").is_file():
        raise TextinvError(_not_a_pipeline_folder(path, shown))
    try:
        with _hushed():
            return _pipeline_class().from_pretrained(where, dtype=torch_dtype, safety_checker=None)
    except Exception as e:  # a damaged folder: missing weights, bad JSON, a component diffusers lacks
        raise TextinvError(f"{shown}: cannot load this diffusers folder ({_first_line(e)})") from None


def _load_single_file(where: str, shown: str, torch_dtype, config):
    path = Path(where)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise TextinvError(f"{shown}: not a model checkpoint (expected {', '.join(sorted(SINGLE_FILE_SUFFIXES))})")
    cls = _pipeline_class(_single_file_family(path).pipeline_class)
    extra = {"config": str(config)} if config else {}
    try:
        with _hushed():
            return cls.from_single_file(where, dtype=torch_dtype, **extra)
    except Exception as e:  # diffusers raises many kinds here (OSError, SingleFileComponentError, …)
        hint = "" if config else "; pass --config with a diffusers folder (or hub id) of the same architecture"
        raise TextinvError(f"{shown}: cannot load this single-file checkpoint ({_first_line(e)}){hint}") from None


def _load_hub(where: str, shown: str, torch_dtype):
    offline = _is_offline()
    cached = _hub_cache_state(where)
    if offline and cached is None:
        raise TextinvError(f"{shown}: no such local folder or file, and not a model in the local Hugging Face "
                           f"cache (offline); {_WHAT_TO_PASS}")
    if offline and cached == "other":
        raise TextinvError(f"{shown}: in the local Hugging Face cache, but not as a diffusers model (no "
                           f"model_index.json cached; offline); {_WHAT_TO_PASS}")
    try:
        with _hushed():
            return _pipeline_class().from_pretrained(where, dtype=torch_dtype)
    except Exception as e:
        if offline:
            raise TextinvError(f"{shown}: cannot load this model from the local Hugging Face cache (offline; "
                               f"{_first_line(e)})") from None
        raise TextinvError(_hub_failure(shown, e)) from None


_register_families()
