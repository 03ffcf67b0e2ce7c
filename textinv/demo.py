"""`textinv demo`: the whole Textual Inversion loop on the built-in mini model, in minutes on a CPU.

1. Render 5 pictures of a shape the model can draw but has no word for (a user's "cat toy").
2. Train a new word for it, starting from the generic word "shape".
3. Generate the word alone and composed with attributes the model knows ("a blue S*", "a small S*
   on the left", "a striped S*"), and let the world's judge count how often the concept appears
   (fidelity) and how often the composed attribute appears with it (editability) — beside the
   same prompts with the init word, the baseline.

`textinv demo --bias` is the Textual Inversion paper's "doctor" bias reduction in miniature
(Gal et al. 2022, "An Image is Worth One Word"): the model's "ball" is almost always
red; one small token per colour, learned from a curated set and used in turn before the word
(``textinv bias``'s per-value recipe), evens out its colours and keeps it a ball.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import click

from . import bias, evaluate, generation, runs, tokens
from .atomic import write_text
from .images import grid
from .models import defaults, load_pipeline
from .training import TrainConfig, train
from .world import render, spec

INIT_WORD = "shape"
DEFAULT_CONCEPT = "drop"  # the unnamed shape the mini model learns best (docs/mini-world.md has all four)


@dataclass
class DemoSettings:
    """Training settings for the mini model, chosen from measurements (see docs/benchmark.md)."""

    # 100: in docs/benchmark.md (108 runs, model v2) mean fidelity is 0.97 at step 50 and at 100
    # (0.81 at 25); on model v1 a 300-step trial stayed flat to the end.  More steps only cost time.
    steps: int = 100
    lr: str = "5e-3"  # 0.02 overshoots: the mini model's token rows have norms ~0.2 (measured: fidelity 0.17 vs 0.42)
    batch: int = 8
    vectors: int = 1  # 2 or 4 vectors scored the same within noise (docs/benchmark.md): one keeps files smallest
    n: int = 16  # images per prompt for the metrics
    captions: bool = True  # IMG.txt beside each picture naming its colour, size, … so the word learns the shape only
    encoders: str | None = None  # which encoders learn (None: every one the model has)
    lr_t5: str | None = None  # the T5 vectors' learning rate (None: lr)
    bias_init: str = "majority"  # `demo --bias`: where each per-value token starts (textinv bias --init)
    # `demo --bias`: per-value tokens trained at a time (textinv bias --pack); the mini models train all six
    # colours in one batch at once in less memory than one SD 1.5 token's.
    bias_pack: int = 6

    @classmethod
    def for_model(cls, model: str | None = None) -> "DemoSettings":
        """These defaults with the model's own demo settings over them (its textinv.json "demo")."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in defaults(model).demo if k in names})


def world_templates(out: Path, captions: bool = False) -> Path:
    """The mini world's caption templates as a textinv template file: the trigger alone in the
    noun phrase ("a photo of a [name]"), or the whole captioned phrase ("a photo of [filewords]")."""
    path = out / "templates.txt"
    lines = [t.replace("a {np}", "[filewords]") if captions else t.replace("{np}", "[name]") for t in spec.TEMPLATES]
    write_text(path, "\n".join(lines) + "\n")
    return path


def render_training_set(concept: str, folder: Path, n: int = 5, seed: int = 0, captions: bool = False,
                        **fixed) -> list[Path]:
    """``n`` renders of ``concept``; with ``captions``, an IMG.txt beside each one describing
    everything but the shape, which is ``[name]`` (as a user captions their photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        s = render.sample(10_000 + seed, i, shape=concept, **fixed)
        path = folder / f"{i:02d}.png"
        s.image.save(path)
        if captions:
            write_text(path.with_suffix(".txt"), render.describe(s.attrs, "[name]") + "\n")
        paths.append(path)
    return paths


def run(out: Path, concept: str | None = None, seed: int = 0, settings: DemoSettings | None = None,
        model: str | None = None, echo=click.echo, progress: bool = True) -> dict:
    """The demo's four phases, each announced by ``echo``; with ``progress``, bars on stderr for
    the sampling and the training.  An earlier training in ``out`` is reused (continued if it was
    cut short), and said to be."""
    settings = settings or DemoSettings.for_model(model)
    concept = concept or DEFAULT_CONCEPT
    if concept not in spec.unnamed_shapes():
        raise click.BadParameter(f"{concept!r}: choose one of the unnamed shapes {', '.join(spec.unnamed_shapes())}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    token = f"<{concept}>"
    echo(f"1/4 rendering 5 training images of an unnamed shape → {out / 'images'}, and loading the model")
    render_training_set(concept, out / "images", seed=seed, captions=settings.captions)
    pipe = load_pipeline(model)
    echo(f"2/4 baseline: the init word {INIT_WORD!r} alone")
    base = _judged(pipe, INIT_WORD, concept, settings, seed, f"baseline {INIT_WORD!r}", progress)
    run_folder = runs.inner(out)
    reused = runs.has_state(run_folder)
    if reused:
        echo(f"3/4 training {token}: reusing the earlier training in {run_folder}, continued if it was cut short "
             f"(delete that folder or pass --out elsewhere to train afresh)")
    else:
        echo(f"3/4 training {token} (until learned: early stopping, at most {settings.steps} steps)")
    cfg = TrainConfig(images=str(out / "images"), token=token, model=model, init=INIT_WORD, vectors=settings.vectors,
                      templates=str(world_templates(out, settings.captions)), steps=settings.steps, lr=settings.lr, batch=settings.batch,
                      encoders=settings.encoders, lr_t5=settings.lr_t5, flip=False, seed=seed, out=str(run_folder),
                      resume=reused, progress=progress)
    result = train(cfg, pipe=pipe)
    echo("4/4 generating and judging")
    learned = _judged(pipe, token, concept, settings, seed, f"judging {token}", progress)
    tokens.remove(pipe)

    rows = []
    labels = []
    for prompt, imgs in list(learned.pop("images").items()) + list(base.pop("images").items()):
        rows += imgs[:8]
        labels.append(prompt)
    grid(rows, cols=8, labels=labels, label_every=8, scale=3).save(out / "grid.png")
    metrics = {
        "concept": concept, "token": token, "init": INIT_WORD, "seed": seed, "settings": settings.__dict__,
        "fidelity": learned["fidelity"], "editability": learned["editability"],
        "baseline_fidelity": base["fidelity"], "baseline_editability": base["editability"],
        "probes": learned["probes"], "baseline_probes": base["probes"],
        "train_steps": result.steps, "train_seconds": round(result.seconds, 1), "reused_training": reused,
        "total_seconds": round(time.perf_counter() - t0, 1), "embedding": str(result.embedding_path),
    }
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _judged(pipe, trigger: str, concept: str, settings: DemoSettings, seed: int, what: str, progress: bool) -> dict:
    """The judge's scores of ``trigger`` (every probe's images kept), under one bar for the phase."""
    probes, steps = [evaluate.FIDELITY_PROBE, *evaluate.EDIT_PROBES], generation.DEFAULT_STEPS
    with generation.step_bar(pipe, steps, settings.n * len(probes), what, progress) as bar:
        # Sampling seeds 1000·seed … : the demo's seeds 0, 1, 2 judge disjoint sets of images.
        return evaluate.judge_scores(pipe, trigger, "shape", concept, n=settings.n, seed=1000 * seed, probes=probes,
                                     steps=steps, keep_images=True, bar=bar)


def print_summary(m: dict, echo=click.echo) -> None:
    echo(f"\nconcept: an unnamed shape ({m['concept']}), trigger {m['token']}, init word {m['init']!r}")
    echo(f"{'prompt':<34}{'concept':>9}{'+attribute':>12}   baseline ({m['init']})")
    for r, b in zip(m["probes"], m["baseline_probes"]):
        extra = f"{r['both']:>12.2f}" if r["want"] else f"{'':>12}"
        bextra = f" / {b['both']:.2f}" if b["want"] else ""
        echo(f"{r['prompt']:<34}{r['concept']:>9.2f}{extra}   {b['concept']:.2f}{bextra}")
    echo(f"fidelity    {m['fidelity']:.2f}   (baseline {m['baseline_fidelity']:.2f})")
    echo(f"editability {m['editability']:.2f}   (baseline {m['baseline_editability']:.2f})")
    reused = " (the earlier run's, reused)" if m.get("reused_training") else ""
    echo(f"training {m.get('train_steps', '?')} steps{reused}, {m['train_seconds']:.0f} s, total {m['total_seconds']:.0f} s; "
         f"embedding {m['embedding']}")


CURATED_PER_VALUE = 6  # curated balls per colour: both sizes × three positions, backgrounds alternating


def render_bias_set(folder: Path, seed: int = 0) -> Path:
    """A small curated set, one subfolder per colour (what ``--recipe per-value`` reads): six balls of
    each colour that vary everything else the world has — both sizes, three positions, both
    backgrounds — in the word's usual solid fill (the model draws "ball" solid 95 % of the time),
    each captioned with everything but its colour ("a small ball on the left on a dark
    background").  Measured (docs/evaluation.md): without the sizes and positions covered and
    named, the learned tokens carried a size of their own and drew few small balls."""
    combos = [(size, pos) for size in spec.labels("size") for pos in spec.labels("position")]
    for c, colour in enumerate(spec.labels("colour")):
        (folder / colour).mkdir(parents=True, exist_ok=True)
        for i in range(CURATED_PER_VALUE):
            size, position = combos[i % len(combos)]
            background = spec.labels("background")[(i + c) % 2]
            render.sample(20_000 + seed, c + 6 * i, shape=spec.BIASED["shape"], colour=colour, style="solid", size=size,
                          position=position, background=background).image.save(folder / colour / f"{i:02d}.png")
            words = [spec.SIZES[size]["words"], spec.POSITIONS[position]["words"], spec.BACKGROUNDS[background]["words"]]
            size_w, pos_w, bg_w = (w[(i + c) % len(w)] for w in words)
            write_text(folder / colour / f"{i:02d}.txt", f"a {size_w} {spec.BIASED['shape']} {pos_w} {bg_w}\n")
    return folder


def run_bias(out: Path, seed: int = 0, n: int = 60, steps: int = 300, lr: str | None = None, model: str | None = None,
             echo=click.echo, values: list[str] | None = None, named: bool = True) -> dict:
    """``textinv bias ball --attribute colour --images CURATED --named`` on the mini world's biased
    word: the same command, with the curated set rendered and the world's templates; the learning
    rates the model's demo settings give (``lr`` None)."""
    tuned = DemoSettings.for_model(model)
    out.mkdir(parents=True, exist_ok=True)
    echo(f"rendering the curated set, {CURATED_PER_VALUE} pictures of {spec.BIASED['shape']!r} per colour → {out / 'curated'}, "
         f"and loading the model")
    curated = render_bias_set(out / "curated", seed)
    run = bias.BiasRun(word=spec.BIASED["shape"], attribute="colour", values=values or spec.labels("colour"), images=str(curated),
                       templates=str(world_templates(out, captions=True)), model=model, n=n, seed=seed, steps=steps,
                       lr=lr or tuned.lr, named=named, out=str(out), init=tuned.bias_init, pack=tuned.bias_pack, extra=dict(lr_t5=tuned.lr_t5) if tuned.lr_t5 else {})
    result = bias.run_bias(run, echo=echo)
    echo("\n" + bias.format_table(result))
    echo(f"wrote {out}/bias.json, bias.png, report.html")
    return result
