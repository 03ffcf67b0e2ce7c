"""When is the word learned?  A stopping rule on a deterministic evaluation loss.

The training loss of textual inversion is useless for deciding when to stop: every step draws new
images, noise and timesteps, and that randomness is far larger than what the vector changes.
Voronov et al., "Is This Loss Informative? Faster Text-to-Image Customization by Tracking
Objective Dynamics" (2023, arXiv:2302.04841) fix the draw instead: the same images, noise,
timesteps and prompts are scored, without a gradient, every few steps.  What is left of that
curve's variation is the vectors' doing; once it flattens, further steps change little.

Their rule (DVAR) stops when the variance of the last ``window`` evaluations falls below
``threshold`` × the variance of the whole curve.  With a fixed window it cannot stop before that
many evaluations, whatever the model: on a model that learns in 30 steps a 300-step window is most
of the run.  Here the window is a fraction of the curve so far (its recent part), which makes the
rule independent of how fast a model learns; ``min_evals`` keeps the first few points (where the
recent part is two or three numbers) from deciding anything, and a curve still reaching new lows
is never stopped.  The numbers below were chosen on the mini world's benchmark grid
(docs/early-stop.md, ``benchmarks/early_stop.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RECENT = 0.5  # the recent part of the curve: its last half
THRESHOLD = 0.1  # stop when the recent variance is below this share of the whole curve's
MIN_EVALS = 10  # evaluations (the step-0 one included) before the rule may stop


@dataclass(frozen=True)
class Rule:
    recent: float = RECENT
    threshold: float = THRESHOLD
    min_evals: int = MIN_EVALS

    def describe(self) -> str:
        return (f"the variance of the last {self.recent:.0%} of the evaluation-loss curve is below "
                f"{self.threshold:g}× the whole curve's and the latest evaluation is not the curve's lowest "
                f"(after at least {self.min_evals} evaluations)")


def variance_ratio(curve: list[float], recent: float = RECENT) -> float:
    """Var(the last ``recent`` share of ``curve``) / Var(``curve``): near 1 while the loss still
    moves as it always did (or only wobbles), near 0 once a drop has flattened."""
    xs = np.asarray(curve, dtype=np.float64)
    k = max(2, int(round(len(xs) * recent)))
    whole = xs.var()
    if len(xs) < 3 or whole <= 0:
        return 1.0
    return float(xs[-k:].var() / whole)


def should_stop(curve: list[float], rule: Rule = Rule()) -> tuple[bool, float]:
    """(stop?, the variance ratio) for the evaluation losses so far, oldest first.

    Never while the latest evaluation is the lowest of the curve: the loss still falls.  Why: the
    first steps move the vectors off the init word and make the curve's biggest drop; a concept
    learned after that can move the loss by far less, a slow creep whose variance looks flat
    beside that first drop (on the benchmark grid the ratio alone stopped 7 of 66 runs at the
    45-step floor, fidelity 0.08–0.75 where a later save reached 0.83–1.0)."""
    ratio = variance_ratio(curve, rule.recent)
    still_falling = len(curve) > 1 and curve[-1] <= min(curve[:-1])
    return len(curve) >= rule.min_evals and ratio < rule.threshold and not still_falling, ratio


def stop_index(curve: list[float], rule: Rule = Rule()) -> int | None:
    """The first evaluation (0-based) at which the rule stops, for a whole logged curve; None: never."""
    return next((i for i in range(len(curve)) if should_stop(curve[:i + 1], rule)[0]), None)
