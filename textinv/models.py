"""Load any Stable Diffusion pipeline — hub id, local diffusers folder, single-file checkpoint,
or the built-in mini model — through one path.

The mini model is an ordinary diffusers folder shipped as package data; ``"mini"`` (the default)
is only a name for that folder, so nothing downstream knows or cares which model it got.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import formats
from .errors import TextinvError

MINI_NAME = "mini"
MINI_PATH = Path(__file__).parent / "data" / "mini"
SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".bin"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SETTINGS_FILE = "textinv.json"  # a model folder's own defaults: {"guidance": 4.0, "family": "..."}
MODEL_HELP = "Hub id, diffusers folder, single-file checkpoint (.safetensors/.ckpt), or 'mini' (the built-in model, the default)."


@dataclass(frozen=True)
class ModelDefaults:
    """What a model wants when the user does not say: its own settings file, else A1111's defaults."""

    guidance: float = 7.0  # AUTOMATIC1111's CFG scale
    family: str | None = None  # a name for its text encoder's width, shown by inspect and the library


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
    return ModelDefaults(guidance, family if isinstance(family, str) else None)


def pipeline_defaults(pipe) -> ModelDefaults:
    """The defaults of the model a pipeline was loaded from (diffusers records the folder)."""
    where = getattr(pipe, "name_or_path", None)
    return defaults(where) if where else ModelDefaults()


def name_of(model: str | os.PathLike | None) -> str:
    """How a ``--model`` value is named in reports and metadata."""
    return MINI_NAME if model is None else str(model)


def _register_families() -> None:
    """The built-in model's text-encoder width gets its name (its settings say which)."""
    try:
        width = json.loads((MINI_PATH / "text_encoder" / "config.json").read_text())["hidden_size"]
    except (OSError, ValueError, KeyError):
        return
    family = defaults(MINI_NAME).family
    if family:
        formats.register_family(int(width), family)


def resolve_model(model: str | os.PathLike | None) -> str:
    """Turn the user's ``--model`` value into a folder, file or hub id."""
    if model is None or str(model) == MINI_NAME:
        if not (MINI_PATH / "model_index.json").is_file():
            raise TextinvError(f"the built-in mini model is not installed at {MINI_PATH} (run `textinv world train-base`)")
        return str(MINI_PATH)
    return str(model)


def _pipeline_classes():
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline


def _single_file_is_sdxl(path: Path) -> bool:
    """SDXL checkpoints carry a second text encoder under ``conditioner.embedders.1``."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith("conditioner.embedders.1") for k in f.keys())
    return False  # .ckpt: diffusers' own detection decides below


def _quiet_loading() -> None:
    """No per-component "Loading weights" bars: loading takes seconds and the bars bury our output."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def load_pipeline(model: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "fp32", device: str = "cpu",
                  config: str | os.PathLike | None = None):
    """Load a text-to-image pipeline; errors are one line naming ``model`` and the problem.

    ``config`` (single-file checkpoints only): a diffusers folder or hub id whose component
    configs describe the checkpoint's architecture.  Without it diffusers fetches a default config
    from the hub, which an offline machine cannot do.
    """
    DiffusionPipeline, SDPipeline, SDXLPipeline = _pipeline_classes()
    _quiet_loading()
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    where = resolve_model(model)
    path = Path(where)
    if config and not path.is_file():
        raise TextinvError(f"--config {config}: only for a single-file checkpoint; {where} is a diffusers folder or hub id, "
                           "which carries its own configs")
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise TextinvError(f"{where}: not a diffusers model folder (no model_index.json)")
            pipe = DiffusionPipeline.from_pretrained(where, dtype=torch_dtype, safety_checker=None)
        elif path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise TextinvError(f"{where}: not a model checkpoint (expected {', '.join(sorted(SINGLE_FILE_SUFFIXES))})")
            cls = SDXLPipeline if _single_file_is_sdxl(path) else SDPipeline
            extra = {"config": str(config)} if config else {}
            try:
                pipe = cls.from_single_file(where, dtype=torch_dtype, **extra)
            except Exception as e:  # diffusers raises many kinds here (OSError, SingleFileComponentError, …)
                hint = "" if config else "; pass --config with a diffusers folder (or hub id) of the same architecture"
                raise TextinvError(f"{where}: cannot load this single-file checkpoint ({str(e).splitlines()[0]}){hint}") from None
        elif path.suffix.lower() in SINGLE_FILE_SUFFIXES or where.startswith((".", "/", "~")):
            raise TextinvError(f"{where}: no such file or folder")
        else:
            pipe = DiffusionPipeline.from_pretrained(where, dtype=torch_dtype)
    except TextinvError:
        raise
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only models already in the local cache can load)" if offline else ""
        raise TextinvError(f"{where}: cannot load model{hint}: {str(e).splitlines()[0]}") from None
    if getattr(pipe, "text_encoder", None) is None:
        raise TextinvError(f"{where}: {type(pipe).__name__} has no CLIP text encoder; textinv needs a Stable Diffusion 1.x/2.x/SDXL pipeline")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


_register_families()
