"""Base-model quality, measured by the judge on fixed prompts and seeds.

Prompt groups (all from the world table):

* ``named``: "a {colour} {shape}" for every named shape, two colours each -> shape and colour accuracy;
* ``style``: "a {style} {colour} {shape}" for the named styles -> style accuracy (and shape/colour);
* ``layout``: "a {size} {colour} {shape} {position}" -> size and position accuracy;
* ``unnamed``: the generic words alone ("a photo of a shape") -> share of unnamed shapes drawn;
* ``unnamed style``: "a patterned {colour} {shape}" -> share of the unnamed style;
* ``biased``: "a {biased word}" -> share in the dominant colour.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..generation import images as generate
from ..images import grid
from ..models import load_pipeline
from . import spec
from .judge import judge


def prompt_set() -> list[dict]:
    """The fixed list of (group, prompt, expected attributes)."""
    P: list[dict] = []
    colours = spec.labels("colour")
    named = spec.named_shapes()
    k = 0
    for s in named:
        word = spec.SHAPES[s]["words"][0]
        for _ in range(2):
            c = colours[k % len(colours)]
            k += 1
            P.append({"group": "named", "prompt": f"a {c} {word}", "expect": {"shape": s, "colour": c}})
    styles = [st for st in spec.labels("style") if spec.STYLES[st]["named"]]
    k = 0
    for st in styles:
        for s in ("square", "circle", "heart"):
            c = colours[(k * 5 + 1) % len(colours)]
            k += 1
            adj = spec.STYLES[st]["pre"][0]
            P.append({"group": "style", "prompt": f"a {adj} {c} {s}", "expect": {"shape": s, "colour": c, "style": st}})
    sizes, positions = spec.labels("size"), spec.labels("position")
    layout_shapes = ["square", "star", "triangle", "circle", "diamond", "cross"]
    for i, s in enumerate(layout_shapes):
        z, p, c = sizes[i % len(sizes)], positions[i % len(positions)], colours[(i + 2) % len(colours)]
        P.append({"group": "layout",
                  "prompt": f"a {spec.SIZES[z]['words'][0]} {c} {s} {spec.POSITIONS[p]['words'][0]}",
                  "expect": {"shape": s, "colour": c, "size": z, "position": p}})
    for w in spec.GENERIC_SHAPE_WORDS:
        P.append({"group": "unnamed", "prompt": f"a photo of a {w}", "expect": {}})
    for i, s in enumerate(("square", "circle")):
        c = colours[(i + 3) % len(colours)]
        P.append({"group": "unnamed style", "prompt": f"a {spec.GENERIC_STYLE_PRE[0]} {c} {s}", "expect": {"shape": s, "colour": c}})
    b = spec.BIASED["shape"]
    for t in ("a {}", "a photo of a {}"):
        P.append({"group": "biased", "prompt": t.format(b), "expect": {"shape": b}})
    return P


def measure(model="mini", per_prompt: int = 8, seed: int = 0, steps: int = 30, guidance: float = 4.0,
            grid_path: str | Path | None = None, pipe=None, progress: bool = True) -> dict:
    pipe = pipe or load_pipeline(model)
    P = prompt_set()
    prompts = [p["prompt"] for p in P for _ in range(per_prompt)]
    images = generate(pipe, prompts, seed=seed, steps=steps, guidance=guidance, progress=progress)
    verdicts = judge(images)
    rows = []
    for i, p in enumerate(P):
        for j in range(per_prompt):
            rows.append({**p, "judged": verdicts[i * per_prompt + j]})
    res = summarize(rows)
    res["n_images"] = len(images)
    res["settings"] = dict(model=str(model), per_prompt=per_prompt, seed=seed, steps=steps, guidance=guidance)
    if grid_path:
        pick = []
        for i in range(len(P)):
            pick.extend(images[i * per_prompt:i * per_prompt + min(4, per_prompt)])
        grid(pick[:4 * 24], cols=16, scale=2).save(grid_path)
    return res


def _acc(rows, attr, groups=None):
    sel = [r for r in rows if attr in r["expect"] and (groups is None or r["group"] in groups)]
    if not sel:
        return float("nan"), 0
    return float(np.mean([r["judged"][attr] == r["expect"][attr] for r in sel])), len(sel)


def summarize(rows: list[dict]) -> dict:
    res: dict = {"metrics": {}, "per_shape": {}, "unnamed": {}}
    m = res["metrics"]
    m["shape accuracy (named prompts)"] = _acc(rows, "shape", {"named"})
    m["colour accuracy (all prompts naming a colour)"] = _acc(rows, "colour")
    m["style accuracy (named styles)"] = _acc(rows, "style", {"style"})
    m["shape accuracy (style + layout prompts)"] = _acc(rows, "shape", {"style", "layout"})
    m["size accuracy"] = _acc(rows, "size", {"layout"})
    m["position accuracy"] = _acc(rows, "position", {"layout"})
    un = [r for r in rows if r["group"] == "unnamed"]
    unnamed = set(spec.unnamed_shapes())
    m["unnamed shapes under generic words"] = (float(np.mean([r["judged"]["shape"] in unnamed for r in un])) if un else float("nan"), len(un))
    res["unnamed"] = dict(Counter(r["judged"]["shape"] for r in un).most_common())
    us = [r for r in rows if r["group"] == "unnamed style"]
    hidden_styles = set(spec.unnamed_styles())
    m["unnamed style under 'patterned'"] = (float(np.mean([r["judged"]["style"] in hidden_styles for r in us])) if us else float("nan"), len(us))
    bi = [r for r in rows if r["group"] == "biased"]
    m[f"'{spec.BIASED['shape']}' in {spec.BIASED['colour']} (bias)"] = (
        float(np.mean([r["judged"]["colour"] == spec.BIASED["colour"] for r in bi])) if bi else float("nan"), len(bi))
    m[f"'{spec.BIASED['shape']}' shape accuracy"] = _acc(rows, "shape", {"biased"})
    for s in spec.named_shapes():
        sel = [r for r in rows if r["group"] == "named" and r["expect"].get("shape") == s]
        if sel:
            res["per_shape"][s] = float(np.mean([r["judged"]["shape"] == s for r in sel]))
    return res


TARGETS = {
    "shape accuracy (named prompts)": 0.80,
    "colour accuracy (all prompts naming a colour)": 0.85,
    "style accuracy (named styles)": 0.70,
    f"'{spec.BIASED['shape']}' in {spec.BIASED['colour']} (bias)": 0.80,
}


def format_table(res: dict) -> str:
    lines = ["| metric | value | n | target |", "|---|---|---|---|"]
    for k, (v, n) in res["metrics"].items():
        t = TARGETS.get(k)
        lines.append(f"| {k} | {v:.2f} | {n} | {'≥ %.2f' % t if t else ''} |")
    lines.append("")
    lines.append("per named shape (shape accuracy): " + ", ".join(f"{k} {v:.2f}" for k, v in res["per_shape"].items()))
    lines.append("judged shapes under generic words: " + ", ".join(f"{k} {v}" for k, v in res["unnamed"].items()))
    if "n_images" in res:
        s = res["settings"]
        lines.append(f"{res['n_images']} images; model {s['model']}, seed {s['seed']}, {s['steps']} DDIM steps, guidance {s['guidance']}")
    return "\n".join(lines)
