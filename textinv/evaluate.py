"""How good is an embedding?  Fidelity (does it draw the concept?) and editability (does it still
obey the rest of the prompt?), the two axes of the Textual Inversion paper.

On the built-in mini world both are measured by the world's judge, an attribute classifier
trained on rendered images only: fidelity is the share of "a photo of a S*" images it calls the
concept; editability the share of composed prompts ("a blue S*", "a small S* on the left", …)
whose images show the concept *and* the asked-for attribute.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import generation


@dataclass
class Probe:
    """A prompt with ``{}`` for the trigger, and the attributes its images must show."""

    template: str
    want: dict[str, str] = field(default_factory=dict)

    def prompt(self, trigger: str) -> str:
        return self.template.format(trigger)


FIDELITY_PROBE = Probe("a photo of a {}")
EDIT_PROBES = [
    Probe("a blue {}", {"colour": "blue"}),
    Probe("a small {} on the left", {"size": "small", "position": "left"}),
    Probe("a striped {}", {"style": "striped"}),
]


def judge_scores(pipe, trigger: str, attribute: str, value: str, *, n: int = 16, seed: int = 0,
                 probes: list[Probe] | None = None, steps: int = generation.DEFAULT_STEPS,
                 guidance: float = generation.DEFAULT_GUIDANCE, keep_images: bool = False) -> dict:
    """Judge-measured fidelity and editability of ``trigger`` for a concept ``attribute == value``."""
    from .world.judge import judge

    probes = probes or [FIDELITY_PROBE, *EDIT_PROBES]
    rows, pictures = [], {}
    for probe in probes:
        prompt = probe.prompt(trigger)
        imgs = generation.images(pipe, [prompt] * n, seed=seed, steps=steps, guidance=guidance)
        verdicts = judge(imgs)
        concept = [v[attribute] == value for v in verdicts]
        asked = [all(v[k] == w for k, w in probe.want.items()) for v in verdicts]
        rows.append({"prompt": prompt, "want": probe.want, "concept": float(np.mean(concept)),
                     "attribute": float(np.mean(asked)), "both": float(np.mean([c and a for c, a in zip(concept, asked)]))})
        if keep_images:
            pictures[prompt] = imgs
    fid = [r["concept"] for r, p in zip(rows, probes) if not p.want]
    edit = [r["both"] for r, p in zip(rows, probes) if p.want]
    out = {"fidelity": float(np.mean(fid)) if fid else None, "editability": float(np.mean(edit)) if edit else None,
           "probes": rows}
    if keep_images:
        out["images"] = pictures
    return out


def colour_distribution(pipe, prompt: str, *, n: int = 64, seed: int = 0, steps: int = generation.DEFAULT_STEPS,
                        guidance: float = generation.DEFAULT_GUIDANCE) -> dict[str, float]:
    """Share of each colour (by the judge) among ``n`` images of ``prompt``."""
    from .world import spec
    from .world.judge import judge

    verdicts = judge(generation.images(pipe, [prompt] * n, seed=seed, steps=steps, guidance=guidance))
    colours = spec.labels("colour")
    return {c: sum(v["colour"] == c for v in verdicts) / n for c in colours}


def kl_to_uniform(dist: dict[str, float]) -> float:
    """KL(p ‖ uniform) in nats: 0 for a perfectly balanced distribution, ln K for a single colour."""
    k = len(dist)
    return float(sum(p * np.log(p * k) for p in dist.values() if p > 0))
