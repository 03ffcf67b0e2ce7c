"""How good is an embedding?  Fidelity (does it draw the concept?) and editability (does it still
obey the rest of the prompt?), the two axes of the Textual Inversion paper.

On the built-in mini world both are measured by the world's judge, an attribute classifier
trained on rendered images only: fidelity is the share of "a photo of a S*" images it calls the
concept; editability the share of composed prompts ("a blue S*", "a small S* on the left", …)
whose images show the concept *and* the asked-for attribute.
"""
from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data, formats, generation, metrics, runs, sources, tokens, training
from .errors import TextinvError
from .metrics import mean_pairwise_cosine, without_trigger
from .models import USE_A_REAL_MODEL, defaults, drawn_at, load_pipeline, name_of
from .prompts import check_clip_skip
from .report import write_outputs
from .settings import TrainConfig
from .spread import ALONE, Share
from .world import spec
from .world.judge import judge


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
                 guidance: float | None = None, keep_images: bool = False, clip_skip: int = 1, bar=None,
                 share: Share = ALONE) -> dict:
    """Judge-measured fidelity and editability of ``trigger`` for a concept ``attribute == value``.
    ``bar``: a :func:`textinv.generation.step_bar` over every probe's ``n`` images, to advance.
    ``share``: the probes spread over the processes (:mod:`textinv.spread`); every process gets
    every figure (and with ``keep_images`` every image)."""
    probes = probes or [FIDELITY_PROBE, *EDIT_PROBES]

    def one(probe: Probe):
        prompt = probe.prompt(trigger)
        imgs = generation.images(pipe, [prompt] * n, seed=seed, steps=steps, guidance=guidance, clip_skip=clip_skip,
                                 bar=bar)
        verdicts = judge(imgs)
        concept = [v[attribute] == value for v in verdicts]
        asked = [all(v[k] == w for k, w in probe.want.items()) for v in verdicts]
        row = {"prompt": prompt, "want": probe.want, "concept": float(np.mean(concept)),
               "attribute": float(np.mean(asked)), "both": float(np.mean([c and a for c, a in zip(concept, asked)]))}
        return row, imgs if keep_images else None

    done = list(share.each(probes, one))
    rows = [row for row, _ in done]
    fid = [r["concept"] for r, p in zip(rows, probes) if not p.want]
    edit = [r["both"] for r, p in zip(rows, probes) if p.want]
    out = {"fidelity": float(np.mean(fid)) if fid else None, "editability": float(np.mean(edit)) if edit else None,
           "probes": rows}
    if keep_images:
        out["images"] = {row["prompt"]: imgs for row, imgs in done}
    return out


def attribute_shares(pipe, prompt: str, *, n: int = 64, seed: int = 0, steps: int = generation.DEFAULT_STEPS,
                     guidance: float | None = None) -> dict[str, dict[str, float]]:
    """Per attribute (shape, colour, …), the share of each value (by the judge) among ``n`` images of ``prompt``."""
    verdicts = judge(generation.images(pipe, [prompt] * n, seed=seed, steps=steps, guidance=guidance))
    return {name: {v: sum(x[name] == v for x in verdicts) / n for v in spec.labels(name)} for name in spec.ATTRIBUTE_NAMES}


def colour_distribution(pipe, prompt: str, **kwargs) -> dict[str, float]:
    """Share of each colour (by the judge) among ``n`` images of ``prompt``."""
    return attribute_shares(pipe, prompt, **kwargs)["colour"]


def kl_to_uniform(dist: dict[str, float]) -> float:
    """KL(p ‖ uniform) in nats: 0 for a perfectly balanced distribution, ln K for a single colour."""
    k = len(dist)
    return float(sum(p * np.log(p * k) for p in dist.values() if p > 0))


# ------------------------------------------------------------------------------------------
# Metric backends: the world's judge (mini world) and the paper's CLIP/DINO similarities
# ------------------------------------------------------------------------------------------
# The paper's prompts: reconstruction "a photo of S*"; editing prompts from its figures.
PAPER_RECONSTRUCTION = "a photo of {}"
PAPER_EDIT_PROMPTS = ["a photo of {} on the moon", "an oil painting of {}", "Elmo holding a {}"]
TRIGGER_PLACEHOLDERS = ("[name]", "<S*>", "S*", "{}")  # replaced in this order
THUMB = 128  # report thumbnails: longest side in pixels


def read_prompts(path) -> list[str]:
    """A prompts file: one prompt a line, ``#`` comments; the trigger written ``{}``, ``[name]`` or ``S*``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TextinvError(f"--prompts {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for no, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for ph in TRIGGER_PLACEHOLDERS[:-1]:
            line = line.replace(ph, "{}")
        if line.count("{}") != 1 or line.replace("{}", "").count("{") or line.count("}") != 1:
            raise TextinvError(f"--prompts {path}:{no}: write the trigger once as {{}}, [name] or S* in {line!r}")
        out.append(line)
    if not out:
        raise TextinvError(f"--prompts {path}: no prompts in the file")
    return out


def judge_probes(templates: list[str]) -> list[Probe]:
    """Probes for the judge from plain prompts: the world's attribute words a prompt names
    ("a blue {}" → colour blue) are what its images must show; a prompt naming none measures fidelity."""
    probes = []
    for t in templates:
        want, text = {}, t.lower()
        for attr in ("colour", "size", "position", "style", "background"):
            for value, entry in spec.ATTRIBUTES[attr].items():
                words = entry.get("words", []) + entry.get("pre", []) + entry.get("post", [])
                if any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text) for w in words):
                    want[attr] = value
                    break
        probes.append(Probe(t, want))
    if all(p.want for p in probes):
        probes.insert(0, FIDELITY_PROBE)
    return probes


def _thumbs(images, k: int = 8) -> list[bytes]:
    """The first ``k`` images as small PNG bytes (what the report shows; kept for every step)."""
    out = []
    for im in images[:k]:
        im = im.convert("RGB")
        if max(im.size) > THUMB:
            im = im.copy()
            im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class JudgeMetric:
    """Fidelity and editability counted by the mini world's judge (see :func:`judge_scores`)."""

    backend = "judge"
    labels = {"fidelity": "fidelity (judge: concept drawn)", "editability": "editability (judge: concept + asked attribute)"}

    def __init__(self, concept: str, probes: list[Probe] | None = None, attribute: str = "shape"):
        self.concept, self.attribute = concept, attribute
        self.probes = probes or [FIDELITY_PROBE, *EDIT_PROBES]

    def describe(self) -> dict:
        return {"backend": self.backend, "concept": self.concept, "prompts": [p.template for p in self.probes],
                "fidelity": "share of images of the prompts naming only the concept that the judge calls the concept",
                "editability": "share of images of the composed prompts showing the concept and every asked attribute"}

    def templates(self, probes=None) -> list[Probe]:
        """What one measurement generates ``n`` images of."""
        return list(probes or self.probes)

    def __call__(self, pipe, trigger: str, *, n: int, seed: int, steps: int, guidance: float, probes=None,
                 clip_skip: int = 1, bar=None, share: Share = ALONE) -> dict:
        out = judge_scores(pipe, trigger, self.attribute, self.concept, n=n, seed=seed, probes=self.templates(probes),
                           steps=steps, guidance=guidance, keep_images=True, clip_skip=clip_skip, bar=bar, share=share)
        out["thumbs"] = {p: _thumbs(imgs) for p, imgs in out.pop("images").items()}
        return out

    def fidelity_only(self) -> list[Probe]:
        return [p for p in self.probes if not p.want]


class PaperMetric:
    """The paper's protocol: CLIP image similarity to the training images (fidelity), CLIP text
    similarity to the editing prompts without S* (editability), and DINO image similarity."""

    backend = "clip"
    labels = {"fidelity": "image similarity (CLIP)", "editability": "text similarity (CLIP)"}

    def __init__(self, training_images, clip, dino=None, edit_prompts: list[str] | None = None,
                 reconstruction: str = PAPER_RECONSTRUCTION):
        if not training_images:
            raise TextinvError("--images: no training images to compare with")
        self.clip, self.dino = clip, dino
        self.reconstruction = reconstruction
        self.edit_prompts = edit_prompts or list(PAPER_EDIT_PROMPTS)
        self.train_clip = clip.images(training_images)
        self.train_dino = dino.images(training_images) if dino is not None else None

    def describe(self) -> dict:
        return {"backend": self.backend, "clip_weights": self.clip.source, "dino_weights": self.dino.source if self.dino else None,
                "reconstruction": self.reconstruction, "prompts": self.edit_prompts,
                "fidelity": "mean over (generated, training) image pairs of the CLIP image cosine similarity",
                "editability": "mean over editing prompts and their images of the CLIP cosine similarity between "
                               "the image and the prompt with S* removed",
                "dino": "as fidelity, with DINO CLS embeddings",
                "averaging": "per-pair cosines averaged (the paper's code: (A @ B.T).mean() of normalised embeddings)"}

    def fidelity_only(self) -> list[str]:
        return [self.reconstruction]

    def templates(self, probes=None) -> list[str]:
        """What one measurement generates ``n`` images of."""
        return list(probes) if probes is not None else [self.reconstruction, *self.edit_prompts]

    def __call__(self, pipe, trigger: str, *, n: int, seed: int, steps: int, guidance: float, probes=None,
                 clip_skip: int = 1, bar=None, share: Share = ALONE) -> dict:
        """The figures of ``n`` images of each template; ``share``: the templates spread over the
        processes (:mod:`textinv.spread`), every process getting every figure."""
        def one(template: str):
            prompt = template.format(trigger)
            imgs = generation.images(pipe, [prompt] * n, seed=seed, steps=steps, guidance=guidance, clip_skip=clip_skip,
                                     bar=bar)
            return self._row(template, prompt, imgs, trigger), _thumbs(imgs)

        done = list(share.each(self.templates(probes), one))
        rows = [row for row, _ in done]
        fidelity = next((r["image_similarity"] for r in rows if "image_similarity" in r), None)
        edit = [r["text_similarity"] for r in rows if "text_similarity" in r]
        return {"fidelity": fidelity, "editability": float(np.mean(edit)) if edit else None,
                "dino": next((r["dino_similarity"] for r in rows if "dino_similarity" in r), None),
                "probes": rows, "thumbs": {row["prompt"]: thumbs for row, thumbs in done}}

    def _row(self, template: str, prompt: str, imgs, trigger: str) -> dict:
        """One template's figures: image similarities for the reconstruction prompt, text
        similarity for an editing one."""
        feats = self.clip.images(imgs)
        if template == self.reconstruction:
            row = {"prompt": prompt, "image_similarity": mean_pairwise_cosine(feats, self.train_clip)}
            if self.dino is not None:
                row["dino_similarity"] = mean_pairwise_cosine(self.dino.images(imgs), self.train_dino)
            return row
        text = without_trigger(prompt, trigger)
        return {"prompt": prompt, "text": text, "text_similarity": mean_pairwise_cosine(feats, self.clip.texts([text]))}


def world_sized(pipe) -> bool:
    """Whether the model draws pictures of the mini world's size (then the judge can read them)."""
    return generation.default_size(pipe)[0] == spec.IMAGE_SIZE


def _check_judge_can_see(pipe, training_images) -> None:
    """The judge reads only the mini world's shapes: refuse, in one line, to score a concept it
    cannot see (a user's photos) rather than print zeros."""
    outside = [im for im in training_images if not drawn_at(im, spec.IMAGE_SIZE)]
    if outside:
        raise TextinvError(
            f"--images: {len(outside)} of {len(training_images)} training images are not pictures of the mini world, and on a "
            f"model that draws 32×32 textinv measures with the world's judge, which sees only its shapes "
            f"({', '.join(spec.labels('shape'))}): nothing of this concept can be measured here; "
            f"{USE_A_REAL_MODEL} (measured with CLIP/DINO), or pass --concept SHAPE to score one of the world's shapes")


def infer_concept(images) -> str:
    """The shape the judge sees in most training images (at least 60 % of them must agree)."""
    verdicts = Counter(v["shape"] for v in judge(images))
    shape, count = verdicts.most_common(1)[0]
    if count < 0.6 * len(images):
        seen = ", ".join(f"{k} {c}" for k, c in verdicts.most_common())
        raise TextinvError(f"--images: the judge sees no single shape in the training images ({seen}); pass --concept SHAPE")
    return shape


def choose_metric(pipe, training_images, *, concept: str | None = None, clip: str | None = None,
                  dino: str | None = None, prompts: list[str] | None = None, device: str = "cpu"):
    """The metric backend, by one rule:

    1. ``--clip``/``--dino`` given: the paper's CLIP/DINO similarities;
    2. ``--concept`` given: the world's judge;
    3. otherwise the judge when the model draws at the mini world's size (32×32) — the concept is
       then the shape the judge sees in the training images — else the paper's metrics with the
       default CLIP ViT-B/32 and DINO ViT-S/16 weights.
    """
    if concept and (clip or dino):
        raise TextinvError("--concept (the judge) and --clip/--dino (CLIP metrics) exclude each other; choose one")
    if concept or (not clip and not dino and world_sized(pipe)):
        if concept and concept not in spec.labels("shape"):
            raise TextinvError(f"--concept {concept!r}: choose one of the world's shapes {', '.join(spec.labels('shape'))}")
        if not concept:
            _check_judge_can_see(pipe, training_images)
        concept = concept or infer_concept(training_images)
        return JudgeMetric(concept, judge_probes(prompts) if prompts else None)
    clip_scorer = metrics.ClipScorer(clip or metrics.DEFAULT_CLIP, device=device)
    dino_scorer = metrics.DinoScorer(dino or metrics.DEFAULT_DINO, device=device)
    return PaperMetric(training_images, clip_scorer, dino_scorer, prompts)


# ------------------------------------------------------------------------------------------
# The trade-off over a run's saves, and the recommended step
# ------------------------------------------------------------------------------------------
BEST_STEP_RULE = ("score = sqrt(fidelity × editability) (geometric mean: unchanged in order by each axis's scale, "
                  "zero when either axis is); the recommended step is the earliest save whose score is within "
                  "{tol:.0%} of the highest score")


def tradeoff_score(fidelity: float | None, editability: float | None) -> float:
    if fidelity is None or editability is None:
        return 0.0
    return float(np.sqrt(max(fidelity, 0.0) * max(editability, 0.0)))


def best_step(points: list[dict], tolerance: float = 0.05) -> int | None:
    """The recommended step (see :data:`BEST_STEP_RULE`): the earliest step whose trade-off score is
    at least ``(1 - tolerance)`` × the best score.  ``points``: dicts with step, fidelity, editability."""
    scored = sorted((p["step"], tradeoff_score(p.get("fidelity"), p.get("editability"))) for p in points)
    if not scored:
        return None
    top = max(s for _, s in scored)
    if top <= 0:
        return None  # nothing measured above zero: no step to recommend
    return next(step for step, s in scored if s >= (1 - tolerance) * top)


class StepTracker:
    """Measures the embedding at each save (``train(on_save=...)`` or over a run's files) and
    says when to stop: ``patience`` saves in a row without a higher trade-off score."""

    def __init__(self, metric, pipe, trigger: str, *, n: int = 8, seed: int = 0, steps: int = generation.DEFAULT_STEPS,
                 guidance: float | None = None, patience: int | None = None, echo=None,
                 clip_skip: int = 1, progress: bool = False, share: Share = ALONE):
        self.metric, self.pipe, self.trigger, self.clip_skip = metric, pipe, trigger, clip_skip
        self.share = share  # the processes a measurement's prompts are spread over (textinv.spread)
        self.n, self.seed, self.steps, self.guidance, self.patience = n, seed, steps, guidance, patience
        self.echo, self.progress = echo, progress
        self.points: list[dict] = []
        self.thumbs: dict[int, dict[str, list[bytes]]] = {}

    def bar(self, what: str):
        """With ``progress``: the bar of one measurement (every prompt's images this process makes),
        gone once it is done (the measurement's line takes its place)."""
        images = self.n * len(self.share.mine(self.metric.templates()))
        return generation.step_bar(self.pipe, self.steps, images, f"measuring {what}", self.progress, leave=False)

    def measure(self, step: int, trigger: str | None = None) -> dict:
        with self.bar(f"step {step}") as bar:
            r = self.metric(self.pipe, trigger or self.trigger, n=self.n, seed=self.seed, steps=self.steps,
                            guidance=self.guidance, clip_skip=self.clip_skip, bar=bar, share=self.share)
        point = {"step": step, "fidelity": r["fidelity"], "editability": r["editability"],
                 "score": tradeoff_score(r["fidelity"], r["editability"]), "probes": r["probes"]}
        if r.get("dino") is not None:
            point["dino"] = r["dino"]
        self.points = [p for p in self.points if p["step"] != step] + [point]
        self.points.sort(key=lambda p: p["step"])
        self.thumbs[step] = r["thumbs"]
        if self.echo:
            extra = f", dino {point['dino']:.3f}" if "dino" in point else ""
            self.echo(f"step {step}: fidelity {_fmt(point['fidelity'])}, editability {_fmt(point['editability'])}{extra}, "
                      f"score {point['score']:.3f}")
        return point

    def __call__(self, step: int, path=None) -> bool:
        """``on_save`` for :func:`textinv.training.train`: measure; True = stop training."""
        self.measure(step)
        return self.should_stop()

    def should_stop(self) -> bool:
        if not self.patience or len(self.points) <= self.patience:
            return False
        scores = [p["score"] for p in self.points]
        best_before = max(scores[:-self.patience])
        return best_before > 0 and max(scores[-self.patience:]) <= best_before  # nothing learned yet: go on

    def has(self, step: int) -> bool:
        return any(p["step"] == step for p in self.points)

    def evaluation(self, *, target, model, images, training, baseline: dict | None = None, tolerance: float = 0.05,
                   extra_thumbs: dict | None = None) -> "Evaluation":
        """Everything measured so far, with the recommended step, as an :class:`Evaluation`."""
        result = {"target": str(target), "model": name_of(model), "images": str(images), "trigger": self.trigger,
                  "metric": self.metric.describe(), "labels": self.metric.labels, "n": self.n, "seed": self.seed,
                  "sampling_steps": self.steps, "guidance": self.guidance, "clip_skip": self.clip_skip,
                  "points": self.points, "baseline": baseline,
                  "best_step": best_step(self.points, tolerance), "rule": BEST_STEP_RULE.format(tol=tolerance),
                  "tolerance": tolerance}
        return Evaluation(result, dict(extra_thumbs or self.thumbs), _thumbs(training, k=len(training)))


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def run_embeddings(run_dir) -> tuple[TrainConfig, list[tuple[int, "object"]]]:
    """A training run's recorded settings and its saved embeddings as (step, path), intermediate and final."""
    return runs.saves(run_dir)


# ------------------------------------------------------------------------------------------
# textinv eval: a run folder (every save) or one embedding file
# ------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    result: dict  # what metrics.json holds
    thumbs: dict = field(default_factory=dict)  # step (or "baseline") → prompt → PNG bytes
    training: list = field(default_factory=list)  # training images as PNG bytes


def default_guidance(model) -> float:
    """The guidance ``textinv generate`` uses for this model: its own default, else A1111's."""
    return defaults(model).guidance


@dataclass
class _Subject:
    """What :func:`evaluate_path` measures: the saves as (step, path), by which trigger, the init
    word (the baseline), the Clip skip it was made with, and its run's settings (None: none)."""

    saves: list
    trigger: str
    init: str | None
    clip_skip: object
    cfg: TrainConfig | None


def _subject(src, target) -> _Subject:
    """A run's every save, or one embedding (a save picked with RUN@STEP keeps its run's config)."""
    if target.is_dir() and runs.config_file(target).is_file():
        cfg, saves = run_embeddings(target)
        return _Subject(saves, cfg.token, cfg.init, cfg.clip_skip, cfg)
    found = sources.load(src)
    if len(found) != 1:
        raise TextinvError(f"{target}: holds {len(found)} embeddings; pass one embedding file or a training run folder")
    emb, cfg = found[0], runs.config(src.run) if src.run is not None else None
    trigger, init = emb.name, emb.meta.get("init_text")
    if cfg is not None:  # RUN@STEP: the run's own images, model and trigger, as for the whole run
        trigger, init = cfg.token, cfg.init
    step = emb.meta.get("step")
    return _Subject([(int(step) if str(step).isdigit() else 0, target)], trigger, init, emb.meta.get("clip_skip"), cfg)


def _run_settings(cfg: TrainConfig | None, images, model, model_config):
    """The images and model asked for, else the run's own."""
    if cfg is not None:
        images = images or cfg.images or None
        if model is None:
            model, model_config = cfg.model, model_config or cfg.model_config
    return images, model, model_config


def _measure_saves(tracker: StepTracker, pipe, saves, trigger: str) -> None:
    for step, path in saves:
        emb = formats.load(path, name=trigger)
        tokens.apply(pipe, emb)
        try:
            tracker.measure(step)
        finally:
            tokens.remove(pipe, trigger)


def _baseline(tracker: StepTracker, init: str, echo=None) -> tuple[dict, dict]:
    """The init word measured as the embedding was (what training started from): (figures, thumbnails)."""
    t = tracker
    with t.bar(f"the init word {init!r}") as bar:
        r = t.metric(t.pipe, init, n=t.n, seed=t.seed, steps=t.steps, guidance=t.guidance, clip_skip=t.clip_skip, bar=bar,
                     share=t.share)
    base = {"init": init, "fidelity": r["fidelity"], "editability": r["editability"],
            "score": tradeoff_score(r["fidelity"], r["editability"]), "probes": r["probes"]}
    if r.get("dino") is not None:
        base["dino"] = r["dino"]
    if echo:
        echo(f"baseline (init {init!r}): fidelity {_fmt(base['fidelity'])}, editability {_fmt(base['editability'])}")
    return base, r["thumbs"]


def evaluate_path(target, *, images=None, model=None, concept: str | None = None, clip: str | None = None,
                  dino: str | None = None, prompts_file=None, n: int = 16, seed: int = 0,
                  steps: int = generation.DEFAULT_STEPS, guidance: float | None = None, baseline: bool = True,
                  tolerance: float = 0.05, pipe=None, echo=None, clip_skip: int | None = None,
                  model_config=None, share: Share = ALONE) -> Evaluation:
    """Measure a training run's saves (the trade-off curve and the recommended step) or one embedding.
    ``share``: each measurement's prompts spread over the processes of ``accelerate launch``
    (:mod:`textinv.spread`); every process gets the whole evaluation, only the main one speaks."""
    echo = echo if share.is_main else None
    # A file or folder, a hub id or URL, RUN@STEP (one save), a run or the demo's folder (every save).
    src = sources.resolve(target)
    target = src.run if src.run is not None and src.step is None else src.path
    if not target.exists():
        raise TextinvError(f"{target}: no such file or folder")
    if n < 1 or steps < 1:
        raise TextinvError(f"-n and --steps must be at least 1 (got {n}, {steps})")
    subject = _subject(src, target)
    images, model, model_config = _run_settings(subject.cfg, images, model, model_config)
    if clip_skip is None:  # measure the embedding as it was trained
        clip_skip = int(subject.clip_skip or 1)
    if not images:
        raise TextinvError("--images: needed (the training images to compare with / to read the concept from)")
    training_images = [item.image for item in data.load_images(images)]
    if pipe is None:
        pipe = load_pipeline(model, device=share.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                             config=model_config)
    if guidance is None:
        guidance = default_guidance(model)
    check_clip_skip(pipe, clip_skip)
    prompts = read_prompts(prompts_file) if prompts_file else None
    metric = choose_metric(pipe, training_images, concept=concept, clip=clip, dino=dino, prompts=prompts,
                           device=str(generation.denoiser(pipe).device))
    tracker = StepTracker(metric, pipe, subject.trigger, n=n, seed=seed, steps=steps, guidance=guidance, echo=echo,
                          clip_skip=clip_skip, progress=echo is not None,  # a bar a measurement, where lines are heard
                          share=share)
    _measure_saves(tracker, pipe, subject.saves, subject.trigger)
    thumbs, base, init = dict(tracker.thumbs), None, subject.init
    if baseline and init and init.strip() not in ("", "*"):
        base, thumbs["baseline"] = _baseline(tracker, init, echo)
    return tracker.evaluation(target=target, model=model, images=images, training=training_images, baseline=base,
                              tolerance=tolerance, extra_thumbs=thumbs)


def pick_best(tracker: StepTracker, result, cfg, tolerance: float = 0.05) -> tuple[int, "object"]:
    """``textinv train --pick-best``: the recommended step's embedding becomes the run's final file
    (``result.embedding_path``); the last step's embedding stays as ``embeddings/NAME-LAST``."""
    if not tracker.has(result.steps):
        tracker.measure(result.steps)  # the trigger still holds the final vectors
    best = best_step(tracker.points, tolerance)
    if best is None or best == result.steps:
        return result.steps, result.embedding_path
    fmt = cfg.format_for(result.embedding)
    suffix = formats.suffix_for(fmt, result.embedding)
    last = runs.save_file(result.out, cfg.token, result.steps, suffix)
    if not last.exists():
        formats.save(result.embedding, last, fmt)
    chosen = formats.load(runs.save_file(result.out, cfg.token, best, suffix), name=result.embedding.name)
    formats.save(chosen, result.embedding_path, fmt)
    return best, result.embedding_path


@dataclass
class MeasuredRun:
    """``textinv train --pick-best/--early-stop``: the run, its measurements, and what was written."""

    result: "object"  # training.TrainResult
    evaluation: Evaluation
    best: int | None  # with keep_best: the step whose embedding became the final one
    written: dict  # report, curve, metrics paths


def train_measured(cfg, *, concept=None, clip=None, dino=None, n: int = 8, patience: int | None = None,
                   keep_best: bool = False, echo=None, on_start=None, on_step=None) -> MeasuredRun:
    """Train while measuring every save (the trade-off curve); stop early after ``patience`` saves
    without a better score; with ``keep_best`` make the recommended step the final embedding.
    The report goes to RUN/eval.  ``on_step``: as :func:`textinv.training.train`'s (the web UI's Stop)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(cfg.model, dtype=cfg.precision, device=device, config=cfg.model_config)
    training_images = [item.image for item in data.load_images(cfg.images)]
    metric = choose_metric(pipe, training_images, concept=concept, clip=clip, dino=dino, device=device)
    tracker = StepTracker(metric, pipe, cfg.token, n=n, seed=cfg.seed, guidance=default_guidance(cfg.model),
                          clip_skip=cfg.clip_skip, patience=patience, echo=echo)
    result = training.train(cfg, pipe=pipe, on_save=tracker, on_step=on_step, echo=on_start)
    best = None
    if keep_best:
        best, _ = pick_best(tracker, result, cfg)
    elif not tracker.has(result.steps):
        tracker.measure(result.steps)
    ev = tracker.evaluation(target=result.out, model=cfg.model, images=cfg.images, training=training_images)
    return MeasuredRun(result, ev, best, write_outputs(ev, runs.eval_folder(result.out)))
