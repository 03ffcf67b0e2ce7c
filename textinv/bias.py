"""Bias: how a word's pictures spread over an attribute's values, before and after re-learning it.

Textual Inversion's bias reduction (Gal et al. 2022, "An Image is Worth One Word"): replace a
model's notion of a word ("doctor") with a fairer one learned from a small curated set.  This module
measures whether that worked:

* the **distribution** of an attribute's values (colour, gender, …) over images generated from
  prompts containing the word, classified by the mini world's judge on the mini model, and by
  CLIP zero-shot on real models ("a photo of a {value} {word}" against the other values, as
  ITI-GEN and Shen et al. classify);
* **KL to uniform** and the **pairwise bias** of Shen et al., "Finetuning Text-to-Image Diffusion
  Models for Fairness" (2023): the mean |freq(i) − freq(j)| over pairs of values;
* **retention**: does the word still mean the word (judge: the share still drawn as the word's
  shape; CLIP: mean similarity to "a photo of a {word}", compared with before);
* on **training prompts** (the templates the word was re-learned with) and **held-out prompts**
  (never trained on): a word debiased only in its training prompt is not debiased.

Two recipes re-learn the word from a curated set (``RECIPES``).  ``per-value`` (the default) is
ITI-GEN's idea (Zhang et al., "ITI-GEN: Inclusive Text-to-Image Generation", 2023): one small
learned token per value, from that value's pictures (``CURATED/VALUE/``), placed before the word,
each starting from the value the model draws most for the word today (:func:`start_word`), and
the word used as ``{<w-v1> w|<w-v2> w|...}`` so that images take the values in turn (the
variant syntax ComfyUI and A1111's Dynamic Prompts read; :func:`textinv.prompts.pick_variant`).
The word itself is untouched, which is what keeps its meaning.  ``replace`` re-learns the word
itself from one flat folder (``train --mode replace``); on the mini world it cannot balance the
colours without losing the ball (docs/evaluation.md has the trade-off).
"""
from __future__ import annotations

import html
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import data, formats, generation, metrics, packing, runs, sources, tokens
from .atomic import atomic_path, write_bytes, write_text
from .errors import TextinvError
from .evaluate import kl_to_uniform, read_prompts, world_sized  # KL to uniform: one home, evaluate's
from .models import load_pipeline, pipeline_defaults
from .prompts import variant_groups
from .spread import ALONE, Share
from .training import TrainConfig, train
from .world import spec
from .world.judge import judge

# Prompts a real model's word is held out on (never in the training templates); the trigger is {}.
HELD_OUT_PROMPTS = ["a portrait of a {}", "an illustration of a {} at work", "a candid picture of a {} outdoors",
                    "a close-up photo of a {} smiling"]
TRAINING_PROMPTS_SHOWN = 3  # how many of the training templates are measured (they are near-paraphrases)


@dataclass(frozen=True)
class Recipe:
    """The training settings a recipe was measured with (on the mini world: docs/evaluation.md)."""

    timesteps: str
    guidance: float


RECIPES = {
    "per-value": Recipe(timesteps="all", guidance=1.0),
    "replace": Recipe(timesteps="300:1000", guidance=1.5),  # colour is settled at high noise
}


# ------------------------------------------------------------------------------------ metrics
def pairwise_bias(dist: dict[str, float]) -> float:
    """Shen et al.'s bias: the mean over value pairs of |freq(i) − freq(j)| (0: balanced)."""
    p = list(dist.values())
    pairs = [abs(a - b) for i, a in enumerate(p) for b in p[i + 1:]]
    return float(np.mean(pairs)) if pairs else 0.0


def distribution(labels: list[str], values: list[str]) -> dict[str, float]:
    return {v: sum(x == v for x in labels) / max(1, len(labels)) for v in values}


def parse_attribute(spec: str, model_values=None) -> tuple[str, list[str]]:
    """``NAME=v1,v2,...`` (or ``NAME`` alone when the judge knows the attribute's values)."""
    name, _, rest = str(spec).partition("=")
    name = name.strip()
    values = [v.strip() for v in rest.split(",") if v.strip()]
    if not values and model_values is not None:
        values = list(model_values(name) or [])
    if not name or len(values) < 2 or len(set(values)) != len(values):
        raise TextinvError(f"--attribute {spec!r}: expected NAME=value1,value2,... with at least two different values")
    return name, values


# -------------------------------------------------------------------------------- classifiers
class JudgeClassifier:
    """The mini world's judge: reads the attribute, and the shape for retention."""

    def __init__(self, attribute: str, values: list[str], word: str):
        if attribute not in spec.ATTRIBUTE_NAMES:
            raise TextinvError(f"--attribute {attribute}: the judge reads {', '.join(spec.ATTRIBUTE_NAMES)}")
        unknown = [v for v in values if v not in spec.labels(attribute)]
        if unknown:
            raise TextinvError(f"--attribute {attribute}: {', '.join(unknown)} not among the judge's values "
                               f"({', '.join(spec.labels(attribute))})")
        self.attribute, self.values = attribute, values
        self.shape = word if word in spec.labels("shape") else None
        self.kind = "judge"

    def __call__(self, images) -> tuple[list[str], list[float] | None]:
        verdicts = judge(images)
        kept = [float(v["shape"] == self.shape) for v in verdicts] if self.shape else None
        return [v[self.attribute] for v in verdicts], kept


class ClipClassifier:
    """CLIP zero-shot: each image gets the value whose "a photo of a {value} {word}" it is closest
    to; retention is its similarity to "a photo of a {word}"."""

    def __init__(self, attribute: str, values: list[str], word: str, clip: str | None = None, device: str = "cpu"):
        self.attribute, self.values, self.kind = attribute, values, "clip"
        self.scorer = metrics.ClipScorer(clip or metrics.DEFAULT_CLIP, device=device)
        self.classes = self.scorer.texts([f"a photo of a {v} {word}" for v in values])
        self.word = self.scorer.texts([f"a photo of a {word}"])[0]

    def __call__(self, images) -> tuple[list[str], list[float]]:
        f = self.scorer.images(images)
        picked = (f @ self.classes.T).argmax(dim=1)
        return [self.values[int(i)] for i in picked], [float(x) for x in f @ self.word]


def classifier_for(pipe, attribute: str, values: list[str], word: str, clip: str | None = None):
    """The judge where the model draws the mini world's pictures (and no --clip), else CLIP."""
    if clip is None and world_sized(pipe):
        return JudgeClassifier(attribute, values, word)
    return ClipClassifier(attribute, values, word, clip, device=str(pipe.unet.device))


# ---------------------------------------------------------------------------------- measuring
def measure(pipe, prompts: dict[str, list[str]], classify, *, n: int = 120, seed: int = 0, steps: int = 30,
            guidance: float | None = None, rewrite=None, echo=None, progress: bool = False, share: Share = ALONE) -> dict:
    """Per prompt and pooled per group: distribution, KL to uniform, pairwise bias, retention.
    ``rewrite``: what a prompt becomes before generation (the word as its per-value variants).
    ``progress``: a bar on stderr while a prompt's images are made (``echo``'s line replaces it).
    ``share``: the prompts spread over the processes of ``accelerate launch`` (:mod:`textinv.spread`),
    each prompt's images made and classified by one of them; every process gets every figure."""
    jobs = [(p, rewrite(p) if rewrite else p) for group_prompts in prompts.values() for p in group_prompts]

    def one(job: tuple[str, str]):  # A1111 weights and {a|b} variants read as generate reads them
        prompt, text = job
        with generation.step_bar(pipe, steps, n, f"  {prompt!r}", progress, leave=False) as bar:
            images = generation.generate(text, pipe=pipe, n=n, seed=seed, steps=steps, guidance=guidance, batch=32,
                                         bar=bar).images
        return classify(images)

    done, out = share.each(jobs, one), {}
    for group, group_prompts in prompts.items():
        rows, pooled_labels, pooled_kept, pooled_options = [], [], [], {}
        for prompt in group_prompts:
            text = rewrite(prompt) if rewrite else prompt
            labels, kept = next(done)
            rows.append(_summary(prompt, labels, kept, classify.values))
            for j, (option, option_labels, option_kept) in enumerate(by_option(text, labels, kept)):
                rows[-1].setdefault("options", []).append({"option": option, **_summary(None, option_labels, option_kept, classify.values)})
                pool = pooled_options.setdefault(j, (option, [], []))
                pool[1].extend(option_labels)
                pool[2].extend(option_kept or [])
            pooled_labels += labels
            pooled_kept += kept or []
            if echo:
                echo(f"  {prompt!r}: KL {rows[-1]['kl']:.3f}, retention {_fmt(rows[-1]['retention'])}")
        out[group] = {"prompts": rows, "pooled": _summary(None, pooled_labels, pooled_kept or None, classify.values)}
        if pooled_options:
            out[group]["pooled"]["options"] = [{"option": o, **_summary(None, la, ke or None, classify.values)}
                                               for o, la, ke in pooled_options.values()]
    return out


def by_option(text: str, labels: list, kept: list | None) -> list[tuple[str, list, list | None]]:
    """The images of each option of the prompt's one ``{a|b}`` group (image i took option i mod k,
    :func:`textinv.prompts.pick_variant`): which value's token, or which named value, lost the word.
    Empty unless the prompt has exactly one group."""
    groups = variant_groups(text)
    if len(groups) != 1:
        return []
    k = len(groups[0])
    return [(option.strip(), labels[j::k], kept[j::k] if kept else None) for j, option in enumerate(groups[0])]


def _summary(prompt, labels, kept, values) -> dict:
    dist = distribution(labels, values)
    row = {"distribution": dist, "kl": kl_to_uniform(dist), "pairwise": pairwise_bias(dist), "n": len(labels),
           "retention": float(np.mean(kept)) if kept else None}
    return row if prompt is None else {"prompt": prompt, **row}


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


# ------------------------------------------------------------------------------------ the run
# Early stopping was chosen on learning new concepts (docs/early-stop.md), not on shifting a word's
# distribution, and the debiasing recipes were measured at a fixed number of steps: a bias run
# trains all of its --steps unless the caller's extra settings say otherwise.
UNSTOPPED = dict(early_stop=False)  # TrainConfig keywords


@dataclass
class BiasRun:
    word: str
    attribute: str
    values: list[str]
    images: str | None = None  # a curated folder: re-learn the word from it
    embedding: str | None = None  # or: an existing replacement embedding, or a folder of per-value ones
    recipe: str = "per-value"  # see RECIPES
    prompts: str | None = None  # a file of held-out prompts ({} / [name] for the word)
    templates: str | None = None  # training templates (default: the built-in object ones)
    model: str | None = None
    model_config: str | None = None
    clip: str | None = None
    n: int = 120
    seed: int = 0
    sample_steps: int = 30
    steps: int = 300
    lr: str = "5e-3"
    timesteps: str | None = None  # None: the recipe's
    guidance: float | None = None  # None: the recipe's
    vectors: int = 1
    init: str = "majority"  # per-value tokens start from: see start_word
    named: bool = False  # also measure the word with each value named ("a green ball"): see run_bias
    pack: int = 1  # per-value tokens trained at a time in one batch (textinv.packing); 1: one after another
    out: str = "bias"
    extra: dict = field(default_factory=dict)  # any other TrainConfig setting

    def recipe_settings(self) -> dict:
        """The recipe's training settings as this run gives them (TrainConfig keywords)."""
        recipe = RECIPES[self.recipe]
        return dict(timesteps=recipe.timesteps if self.timesteps is None else self.timesteps,
                    guidance=recipe.guidance if self.guidance is None else self.guidance)


def prompt_groups(run: BiasRun, pipe, trained_templates: list[str] | None) -> dict[str, list[str]]:
    templates = trained_templates or data.load_templates(run.templates or "object")
    training = []
    article = "an" if run.word[:1].lower() in "aeiou" else "a"
    for t in templates:  # [filewords] stands for a caption: here the word alone ("a photo of [filewords]")
        p = data.fill_template(t.replace("[filewords]", f"{article} [name]") if "[name]" not in t else t, run.word, "")
        if p not in training:
            training.append(p)
    held = read_prompts(run.prompts) if run.prompts else (pipeline_defaults(pipe).held_out_prompts or HELD_OUT_PROMPTS)
    held = [p.replace("{}", run.word) for p in held]
    clash = sorted(set(held) & set(training))
    if clash:
        raise TextinvError(f"--prompts: {clash[0]!r} is also a training prompt; held-out prompts must be new")
    return {"training": training[:TRAINING_PROMPTS_SHOWN], "held-out": held}


# -------------------------------------------------------------------- the per-value recipe
def value_token(word: str, value: str) -> str:
    return f"<{word}-{value}>".replace(" ", "-")


def variants(word: str, names: list[str]) -> str:
    """The word as the variant group of its per-value tokens, ``{<w-a> w|<w-b> w|...}``, or of its
    values by name, ``{a w|b w|...}``."""
    return "{" + "|".join(f"{name} {word}" for name in names) + "}"


def whole_word(word: str) -> re.Pattern:
    """``word`` standing alone: not inside another word, a trigger (<ball-red>) or a hyphenated name."""
    return re.compile(rf"(?<![\w<-]){re.escape(word)}(?![\w>-])")


def rewriter(word: str, expression: str):
    """Every whole-word use of ``word`` in a prompt becomes ``expression``."""
    pattern = whole_word(word)
    return lambda prompt: pattern.sub(lambda _m: expression, prompt)


def value_folders(images: str, values: list[str]) -> dict[str, Path]:
    root = Path(images)
    if not root.is_dir():
        raise TextinvError(f"--images {images}: no such folder")
    missing = [v for v in values if not (root / v).is_dir()]
    if missing:
        raise TextinvError(f"--images {images}: the per-value recipe learns one token per value from a subfolder named "
                           f"after it, and {', '.join(v + '/' for v in missing)} is missing (or use --recipe replace "
                           f"with one flat folder)")
    return {v: root / v for v in values}


def start_word(init: str, value: str, before: dict | None) -> str:
    """Where a value's token starts.  ``majority`` (the default): the value the model draws most for
    the word before re-learning (the word's pooled distribution over every measured prompt), so
    that each token starts as the model's own picture of the word and learns only the move to its
    value.  On the mini world this kept more balls than starting from each value's own word, whose
    pictures are entangled with other shapes ("green" draws discs): on held-out prompts 0.85 / 0.83
    / 0.88 against 0.80 / 0.79 / 0.84 (seeds 0–2, docs/evaluation.md); it needs the default 300
    steps to move off the majority (at 60 every token still drew red).  ``value``: each token from
    its own value's word.  Anything else: that text, for every token."""
    if init == "value":
        return value
    if init != "majority":
        return init
    counts: dict[str, float] = {}
    for group in (before or {}).values():
        for v, share in group["pooled"]["distribution"].items():
            counts[v] = counts.get(v, 0.0) + share
    if not counts or max(counts.values()) == 0:
        return value  # nothing measured (or nothing recognised): the value itself
    return max(counts, key=counts.get)


def _asking(stop):
    """A training's on_step that stops it (its state saved) when ``stop()`` says so."""
    return None if stop is None else (lambda step, loss: stop())


def learn_per_value(run: BiasRun, pipe, out: Path, echo=None, before: dict | None = None,
                    stop=None, share: Share = ALONE) -> tuple[list, float]:
    """One token per value, from ``CURATED/VALUE/``, trained before the word ("a photo of a
    <ball-green> ball"), starting from :func:`start_word`.  Captions (IMG.txt) should describe
    everything but the attribute, so that the token learns the attribute and nothing else.
    ``run.pack`` tokens at a time train in one batch (:mod:`textinv.packing`), in packs made from
    the values' order alone, so that the result does not depend on the number of processes.
    ``share``: the packs spread over the processes, each trained whole by one of them (as
    ``train-many`` deals its rows); every process gets every token, the main one shelves them."""
    folders = value_folders(run.images, run.values)
    packs = [run.values[i:i + run.pack] for i in range(0, len(run.values), run.pack)]

    def one(values: list[str]) -> list[tuple]:
        results = _learn_values(run, pipe, out, {v: folders[v] for v in values}, echo, before, stop)
        return [(r.embedding, r.seconds, r.embedding_path.name, r.embedding_path.read_bytes()) for r in results]

    found, seconds = [], 0.0
    for learned in share.each(packs, one):
        seconds += max(spent for _, spent, _, _ in learned)  # a pack's tokens train at once
        for embedding, _, name, content in learned:
            found.append(embedding)
            if share.is_main:
                shelf = out / "embeddings"
                shelf.mkdir(exist_ok=True)
                write_bytes(shelf / name, content)
    return found, seconds


def _learn_values(run: BiasRun, pipe, out: Path, folders: dict[str, Path], echo, before: dict | None, stop) -> list:
    """These values' tokens, trained together by this process alone in ``out``'s run folders (one
    value: as ``textinv train`` trains it); the model left without them."""
    configs = [_value_config(run, out, value, folder, echo, before) for value, folder in folders.items()]
    if len(configs) == 1:
        results = [train(configs[0], pipe=pipe, echo=echo, on_step=_asking(stop), alone=True)]
        tokens.remove(pipe, configs[0].token)
    else:
        results = packing.train_packed(configs, pipe, len(configs), pipe.device, echo=echo, on_step=_asking(stop))
        failed = next((r for r in results if isinstance(r, str)), None)
        if failed is not None:
            raise TextinvError(failed)
    for cfg, result in zip(configs, results):
        _stop_after_training(stop, cfg.token, result)
    return results


def _value_config(run: BiasRun, out: Path, value: str, folder: Path, echo, before: dict | None) -> TrainConfig:
    """The training of one value's token, in its run folder (resumed where it has a state)."""
    token = value_token(run.word, value)
    where = runs.inner(out) / formats.file_stem(token)
    images, templates, captions = per_value_data(run, folder, where)
    init = start_word(run.init, value, before)
    if echo:
        echo(f"{token}: starting from {init!r}")
    return TrainConfig(images=str(images), token=token, init=init, model=run.model, model_config=run.model_config,
                       templates=str(templates), captions=captions, steps=run.steps, lr=run.lr,
                       vectors=run.vectors, flip=False, seed=run.seed, out=str(where),
                       resume=runs.has_state(where), progress=echo is not None,
                       **{**run.recipe_settings(), **UNSTOPPED, **run.extra})


def per_value_data(run: BiasRun, folder: Path, where: Path) -> tuple[Path, Path, bool]:
    """The images, templates file and captions switch of one value's token.

    Templates with ``[filewords]`` take the captions whole, the word in them preceded by the
    token ("a small [name] ball on the left"): the images are copied to ``where/images`` with
    their captions rewritten.  Other templates get the token before the word, and captions (if
    any) are appended as A1111's ``, [filewords]``."""
    lines = data.load_templates(run.templates or "object")
    word = whole_word(run.word)
    with_token = lambda text: word.sub(lambda _m: f"[name] {run.word}", text)  # noqa: E731
    pictures = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in data.IMAGE_SUFFIXES]
    captioned = [p for p in pictures if data.sidecar_caption(p) is not None]
    where.mkdir(parents=True, exist_ok=True)
    templates = where / "templates.txt"
    if captioned and any("[filewords]" in t for t in lines):
        images = where / "images"
        images.mkdir(exist_ok=True)
        for p in pictures:
            caption = data.sidecar_caption(p) or ""
            if not word.search(caption):
                raise TextinvError(f"{p.with_suffix('.txt')}: the caption {caption!r} does not name {run.word!r}; the "
                                   f"token is learned where the word stands")
            shutil.copyfile(p, images / p.name)
            write_text(images / f"{p.stem}.txt", with_token(caption))
        write_text(templates, "\n".join(lines) + "\n")
        return images, templates, True
    body = [re.sub(r"\[name\]|\{\}", lambda _m: f"[name] {run.word}", t) for t in lines]
    write_text(templates, "\n".join(t + (", [filewords]" if captioned else "") for t in body) + "\n")
    return folder, templates, bool(captioned)


def per_value_set(embs: list, run: BiasRun, where: str) -> list:
    """An existing per-value set, in the order of the values: each value's embedding is the one
    whose name ends with it (<ball-green>, ball-green, green)."""
    def key(name: str) -> str:
        return name.strip("<>").lower()

    ordered = []
    for v in run.values:
        hit = [e for e in embs if key(e.name) == v.lower() or key(e.name).endswith("-" + v.lower())]
        if len(hit) != 1:
            raise TextinvError(f"-e {where}: {'no' if not hit else 'more than one'} embedding named after the value "
                               f"{v!r} (e.g. {value_token(run.word, v)}); a per-value set has one for each of "
                               f"{', '.join(run.values)}")
        ordered.append(hit[0])
    return ordered


def check(run: BiasRun) -> None:
    """Every setting that can be wrong, in one line, before minutes of measuring."""
    if run.images and run.embedding:
        raise TextinvError("--images (re-learn the word) and -e (an existing embedding) exclude each other")
    if run.recipe not in RECIPES:
        raise TextinvError(f"--recipe {run.recipe!r}: choose one of {', '.join(RECIPES)}")
    if run.n < 1:
        raise TextinvError(f"-n {run.n}: at least 1")
    if run.pack < 1:
        raise TextinvError(f"--pack {run.pack}: at least 1")
    if not run.init.strip():
        raise TextinvError("--init: empty; use majority, value or a word")
    if run.recipe == "replace" and run.init != "majority":
        raise TextinvError(f"--init {run.init}: only the per-value recipe has tokens to start; replace starts from the word itself")
    if run.images and run.recipe == "per-value":
        value_folders(run.images, run.values)


class Stopped(TextinvError):
    """A bias run stopped on request (``stop``): bias.json and the report, written only at the end,
    are not; a token being trained has its state saved, so the same ``--out`` resumes it."""


def _stoppable(echo, stop):
    """``echo`` that, after each line (a phase begins, a prompt is measured), ends the run if ``stop()`` says so."""
    def say(line) -> None:
        if echo is not None:
            echo(line)
        if stop is not None and stop():
            raise Stopped("stopped on request after: " + " ".join(str(line).split()))
    return say


def _stop_after_training(stop, token: str, result) -> None:
    if stop is not None and stop():
        raise Stopped(f"stopped on request at step {result.steps} of training {token!r} (its state is saved in {result.out})")


def run_bias(run: BiasRun, pipe=None, echo=None, stop=None, share: Share = ALONE) -> dict:
    """Measure before, re-learn (or apply ``embedding``), measure after; write bias.json, the chart
    and report.html in ``run.out``.  Returns what bias.json holds.  ``stop()``, asked after every
    prompt measured and every training step, ends the run with :class:`Stopped` (the web UI's Stop).
    ``share``: the prompts and the tokens to learn spread over the processes of ``accelerate
    launch`` (:mod:`textinv.spread`); only the main process speaks and writes."""
    echo = echo if share.is_main else None
    say = _stoppable(echo, stop)
    check(run)
    t0 = time.perf_counter()
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = pipe or load_pipeline(run.model, config=run.model_config, device=share.device or "cpu")
    classify = classifier_for(pipe, run.attribute, run.values, run.word, run.clip)
    guidance = pipeline_defaults(pipe).guidance
    trained_templates = data.load_templates(run.templates) if run.templates else None
    groups = prompt_groups(run, pipe, trained_templates)
    kw = dict(n=run.n, seed=run.seed, steps=run.sample_steps, guidance=guidance, echo=say, progress=echo is not None,
              share=share)
    say(f"before: {run.attribute} of {run.word!r} ({classify.kind}, {run.n} images a prompt)")
    before = measure(pipe, groups, classify, **kw)
    named = None
    if run.named:  # the hard-prompt baseline, and how well the model draws the word in each value at all
        ask = variants(run.word, run.values)
        say(f"asked by name: {run.word!r} as {ask}")
        named = measure(pipe, groups, classify, rewrite=rewriter(run.word, ask), **kw)
    after, seconds, source, use, applied = None, 0.0, None, None, []
    if run.images or run.embedding:
        applied, seconds, source = new_word(run, pipe, out, echo=echo, before=before, stop=stop, share=share)
        after, use = measure_after(run, pipe, applied, groups, classify, say, **kw)
    result = {"word": run.word, "attribute": run.attribute, "values": run.values, "classifier": classify.kind,
              "n": run.n, "seed": run.seed, "prompts": groups, "before": before, "named": named, "after": after, "embedding": source,
              "recipe": run.recipe if run.images else None, "use": use,
              "init": [e.meta.get("init_text") for e in applied] if run.images and run.recipe == "per-value" else None,
              "train_seconds": round(seconds, 1), "seconds": round(time.perf_counter() - t0, 1)}
    if after is not None:
        result["summary"] = {g: _compare(before[g]["pooled"], after[g]["pooled"], classify.kind) for g in groups}
        warning = unmoved_warning(run, result["summary"])
        if warning:
            result["warning"] = warning
            if echo is not None:  # not say: everything is measured now, a stop request no longer ends the run
                echo("warning: " + warning)
    if share.is_main:
        write_outputs(result, out)
    return result


def new_word(run: BiasRun, pipe, out: Path, echo=None, before: dict | None = None, stop=None,
             share: Share = ALONE) -> tuple[list, float, str]:
    """What stands for the word after: per-value tokens or the word re-learned from ``run.images``
    (in ``out``), or ``run.embedding``.  (embeddings, seconds of training, where they are)
    ``share``: who trains (:func:`learn_per_value`; the replace recipe's one word: the main process,
    the others waiting for it)."""
    say = echo or (lambda *_: None)
    if run.images and run.recipe == "per-value":
        say(f"learning one token per {run.attribute} value from {run.images}/VALUE/ ({len(run.values)} × {run.steps} steps)")
        applied, seconds = learn_per_value(run, pipe, out, echo=echo, before=before, stop=stop, share=share)
        return applied, seconds, str(out / "embeddings")
    if run.images:
        say(f"re-learning {run.word!r} from {run.images} (replace mode, {run.steps} steps)")

        def one(word: str):
            result = train(replace_config(run, out, progress=echo is not None), pipe=pipe, echo=echo,
                           on_step=_asking(stop), alone=True)
            tokens.remove(pipe, word)
            _stop_after_training(stop, word, result)
            return [result.embedding], result.seconds, str(result.embedding_path)

        return next(share.each([run.word], one))
    embs = sources.load(run.embedding)
    if len(embs) == 1:
        embs[0].name = run.word
    else:
        embs = per_value_set(embs, run, run.embedding)
    return embs, 0.0, run.embedding


def replace_config(run: BiasRun, out: Path, progress: bool = False) -> TrainConfig:
    """The replace recipe: the word itself re-learned from one flat folder, in ``out/run``."""
    where = runs.inner(out)
    return TrainConfig(images=run.images, token=run.word, mode="replace", model=run.model, model_config=run.model_config,
                       templates=run.templates, steps=run.steps, lr=run.lr, vectors=run.vectors, flip=False, seed=run.seed,
                       out=str(where), resume=runs.has_state(where), progress=progress,
                       **{**run.recipe_settings(), **UNSTOPPED, **run.extra})


def measure_after(run: BiasRun, pipe, applied: list, groups: dict, classify, say, **kw) -> tuple[dict, str | None]:
    """The word's distribution with ``applied`` in the model; several embeddings (per-value
    tokens) are used in turn as a variant group.  (what measure gives, that variant group or None)"""
    use = None
    if len(applied) > 1:
        use = variants(run.word, [e.name for e in applied])
        say(f"the word is used as {use}")
    tokens.apply(pipe, applied)
    try:
        say(f"after: {run.attribute} of {run.word!r} with the re-learned word")
        return measure(pipe, groups, classify, rewrite=rewriter(run.word, use) if use else None, **kw), use
    finally:
        tokens.remove(pipe, [e.name for e in applied])


def unmoved_warning(run: BiasRun, summary: dict) -> str | None:
    """What to say when the word re-learned from ``run.images`` is as biased as before; else None."""
    if not (run.images and unmoved(summary)):
        return None
    why = "; a majority start needs its steps" if run.recipe == "per-value" and run.init == "majority" else ""
    return (f"the re-learned word is as biased as before: train longer (--steps, now {run.steps}{why}) "
            f"or check the curated folder")


def unmoved(summary: dict) -> bool:
    """No group's KL fell by a tenth: the tokens (or the re-learned word) did not move the balance."""
    return bool(summary) and all(s["kl_after"] > 0.9 * s["kl_before"] > 0 for s in summary.values())


def _compare(b: dict, a: dict, kind: str) -> dict:
    row = {"kl_before": b["kl"], "kl_after": a["kl"], "kl_ratio": b["kl"] / max(a["kl"], 1e-9),
           "pairwise_before": b["pairwise"], "pairwise_after": a["pairwise"]}
    if b["retention"] is not None and a["retention"] is not None:
        row |= {"retention_before": b["retention"], "retention_after": a["retention"]}
        if kind == "clip":  # a similarity: how much of it is left
            row["retention_ratio"] = a["retention"] / max(b["retention"], 1e-9)
    return row


# ------------------------------------------------------------------------------------ outputs
def format_table(result: dict) -> str:
    """The pooled figures per prompt group, before → after."""
    lines = [f"{result['attribute']} of {result['word']!r} ({result['classifier']}, {result['n']} images a prompt)"]
    head = f"{'group':<10}{'value':<12}{'before':>8}{'after':>8}"
    lines.append(head)
    for g, b in result["before"].items():
        a = (result["after"] or {}).get(g)
        for v in result["values"]:
            after = f"{a['pooled']['distribution'][v]:>8.2f}" if a else f"{'':>8}"
            lines.append(f"{g:<10}{v:<12}{b['pooled']['distribution'][v]:>8.2f}{after}")
    if result.get("use"):
        lines.append(f"after: the word used as {result['use']}")
    for g, s in (result.get("summary") or {}).items():
        ret = ""
        if "retention_after" in s:
            ret = f", retention {s['retention_before']:.2f} → {s['retention_after']:.2f}"
        lower = "evened out" if s["kl_after"] < 1e-12 < s["kl_before"] else f"{s['kl_ratio']:.1f}× lower"  # not 1e9×
        lines.append(f"{g}: KL {s['kl_before']:.3f} → {s['kl_after']:.3f} ({lower}), pairwise "
                     f"{s['pairwise_before']:.3f} → {s['pairwise_after']:.3f}{ret}")
    for g, m in (result.get("named") or {}).items():
        lines.append(f"{g}, asked by name: KL {m['pooled']['kl']:.3f}, retention {_fmt(m['pooled']['retention'])}")
    lines += _per_value_lines(result)
    if result.get("warning"):
        lines.append(f"warning: {result['warning']}")
    return "\n".join(lines)


def _per_value_lines(result: dict) -> list[str]:
    """Asked by name ("a green ball") and, after, each value's token: the share still the word
    (retention) and the share judged that value.  The named column is what the model can draw at
    all: a token that keeps the word less often than its value's name did is the recipe's loss,
    one that keeps it as often is the model's limit."""
    phases = [(name, result.get(key)) for name, key in (("by name", "named"), ("token", "after"))]
    phases = [(name, m) for name, m in phases if m and all(len(g["pooled"].get("options", [])) == len(result["values"]) for g in m.values())]
    if not phases:
        return []
    lines = ["per value (share still the word / share judged the value): " + ", ".join(n for n, _ in phases)]
    for g in result["before"]:
        for j, v in enumerate(result["values"]):
            cells = []
            for _name, m in phases:
                o = m[g]["pooled"]["options"][j]
                cells.append(f"{_fmt(o['retention']):>7} / {o['distribution'][v]:.2f}")
            lines.append(f"{g:<10}{v:<12}" + "   ".join(cells))
    return lines


def plot(result: dict, path: Path) -> Path | None:
    """Bars per value: before, asked by name (--named) and after, one panel per prompt group (None
    without matplotlib)."""
    try:
        import matplotlib  # deferred: the 'eval' extra, only for the bias chart
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # deferred: the 'eval' extra, only for the bias chart

    groups = list(result["before"])
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.2), sharey=True, squeeze=False)
    x = np.arange(len(result["values"]))
    for ax, g in zip(axes[0], groups):
        bars = [("before", result["before"], "#999999"), ("asked by name", result.get("named"), "#a0c0e0"),
                ("after", result["after"], "#3060c0")]
        bars = [b for b in bars if b[1]]
        width = 0.8 / len(bars)
        for i, (label, m, colour) in enumerate(bars):
            shares = [m[g]["pooled"]["distribution"][v] for v in result["values"]]
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, shares, width, label=label, color=colour)
        ax.axhline(1 / len(x), color="k", lw=0.8, ls="--", label="uniform")
        ax.set_xticks(x, result["values"], rotation=30)
        ax.set_title(f"{g} prompts")
    axes[0][0].set_ylabel(f"share of images ({result['attribute']})")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def report_rows(result: dict) -> list[list[str]]:
    """report.html's table (also the web UI's), a row per prompt: group, prompt, KL before and after,
    retention before, asked by name and after ('' where not measured)."""
    rows = []
    for g, b in result["before"].items():
        for i, row in enumerate(b["prompts"]):
            a = result["after"][g]["prompts"][i] if result["after"] else None
            named = result["named"][g]["prompts"][i] if result.get("named") else None
            rows.append([g, row["prompt"], f"{row['kl']:.3f}", "" if a is None else f"{a['kl']:.3f}", _fmt(row["retention"]),
                         "" if named is None else _fmt(named["retention"]), "" if a is None else _fmt(a["retention"])])
    return rows


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    paths = {"json": out / "bias.json", "chart": out / "bias.png", "report": out / "report.html"}
    write_text(paths["json"], json.dumps(result, indent=2))
    chart = plot(result, paths["chart"])
    rows = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in report_rows(result)]
    img = '<img src="bias.png" alt="distribution before and after">' if chart else "<p>(pip install 'textinv[eval]' for the chart)</p>"
    page = (f"<!doctype html><meta charset=utf-8><title>bias of {html.escape(result['word'])}</title>"
            f"<h1>{html.escape(result['attribute'])} of “{html.escape(result['word'])}”</h1>"
            f"<pre>{html.escape(format_table(result))}</pre>{img}"
            "<table border=1 cellpadding=4><tr><th>group</th><th>prompt</th><th>KL before</th><th>KL after</th>"
            "<th>retention before</th><th>retention asked by name</th><th>retention after</th></tr>" + "".join(rows) + "</table>")
    write_text(paths["report"], page)
    if chart is None:
        del paths["chart"]
    return paths
