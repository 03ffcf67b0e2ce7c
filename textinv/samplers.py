"""Samplers by their AUTOMATIC1111 names, built from the pipeline's own scheduler config."""
from __future__ import annotations

import re

import diffusers

from .errors import TextinvError

# A1111 name → (diffusers scheduler class, options)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),  # needs torchsde
    "UniPC": ("UniPCMultistepScheduler", {}),
}


def names() -> list[str]:
    return list(SAMPLERS)


def make(pipe, name: str):
    """A new scheduler for ``pipe``: an A1111 sampler name (any case) or a diffusers class name."""
    key = next((k for k in SAMPLERS if k.lower() == name.strip().lower()), None)
    if key is not None:
        cls_name, options = SAMPLERS[key]
    elif hasattr(diffusers, name) and name.endswith("Scheduler"):
        cls_name, options = name, {}
    else:
        raise TextinvError(f"--sampler: unknown sampler {name!r} (choose from: {', '.join(SAMPLERS)})")
    if cls_name == "DPMSolverSDEScheduler":
        try:
            import torchsde  # noqa: F401  # deferred: the 'samplers' extra, only for DPM++ SDE
        except ImportError:
            raise TextinvError(f"--sampler: {key!r} needs the torchsde package (pip install torchsde)") from None
    config = dict(pipe.scheduler.config)
    for k in ("use_karras_sigmas", "algorithm_type"):
        config.pop(k, None)
    try:
        return getattr(diffusers, cls_name).from_config(config, **options)
    except ImportError as e:  # LMS needs scipy, DPM++ SDE torchsde: optional packages
        missing = re.search(r"requires the (\w+) library", str(e))
        need = missing.group(1) if missing else "an optional package"
        raise TextinvError(f"--sampler: {key or name!r} needs {need} (pip install {need})") from None


def name_of(scheduler) -> str:
    """The A1111 name of a scheduler, or its class name when it has none."""
    cls_name = type(scheduler).__name__
    config = scheduler.config
    for key, (c, options) in SAMPLERS.items():
        if c == cls_name and all(config.get(k, v if k != "use_karras_sigmas" else False) == v for k, v in options.items()):
            return key
    return cls_name
