"""The ``textinv`` command.  Thin: every subcommand calls the library and prints the result.

Errors a user can cause (:class:`~textinv.errors.TextinvError`) print as one line on stderr and
exit with status 2; there is never a traceback for bad input.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path

import click
from PIL import Image
from transformers.utils import logging as transformers_logging

from . import cpu, evaluate, formats, generation, library, many, report, runs, samplers, settings, sources, spread, tokens, training
from . import bias as word_bias  # aliased: bias, demo and ui are the names of commands here
from . import demo as mini_demo
from . import ui as webui
from .errors import TextinvError
from .formats import file_stem, printable
from .interrupts import Interrupted
from .models import MODEL_HELP, load_pipeline
from .settings import CLIP_SKIP_HELP, CONFIG_HELP, MAX_SEED, TrainConfig
from .training import LOSS_WINDOW
from .world import spec
from .world.cli import world

OUTPUT_FORMATS = ["diffusers", "a1111", "kohya", "sdxl", "png", "sd3", "flux", "onetrainer", "comfyui"]
CONVERT_FORMATS = OUTPUT_FORMATS + ["xti", "per-layer"]  # per-layer (P+) embeddings too
SEED = click.IntRange(0, MAX_SEED)


class _Finite(click.ParamType):
    """A float that is a real number (not nan/inf) and not below ``low``."""

    name = "number"

    def __init__(self, low: float = 0.0):
        self.low = low

    def convert(self, value, param, ctx):
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x) or x < self.low:
            self.fail(f"{value!r}: must be a finite number >= {self.low:g}", param, ctx)
        return x

# What every command that takes an embedding accepts (textinv.sources.resolve); kept a string, not a
# Path, so that URLs and RUN@STEP survive as typed.
SOURCE_HELP = "a file, library folder, training run (RUN@STEP: one of its saves), hub id user/repo[/file] or URL"

# Every command that takes --model takes --config (a single-file checkpoint offline needs it).
config_option = click.option("--config", "model_config", default=None, help=CONFIG_HELP)
clip_skip_option = click.option("--clip-skip", type=int, default=None, help=CLIP_SKIP_HELP)


class _Group(click.Group):
    def main(self, *args, **kwargs):
        """Usage errors (a bad option value, an unknown option) as one line too, not click's four."""
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.ClickException as e:
            click.echo(f"error: {printable(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort as e:  # Ctrl-C (click's blank line has closed the terminal's ^C)
            why = e.__cause__ if isinstance(e.__cause__, Interrupted) else Interrupted()  # a run's says what it saved
            click.echo(f"error: {printable(why)}", err=True)
            sys.exit(why.exit_code)  # 130, or 143 for SIGTERM during training
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TextinvError as e:
            click.echo(f"error: {printable(e)}", err=True)
            sys.exit(2)
        except OSError as e:  # a disk or file the library did not name itself: full, read-only, gone
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {printable(where)}{printable(e.strerror or e)}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory (a smaller --resolution, --batch or -n?)", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="textinv")
def main():
    """textinv — Textual Inversion: train, store, convert and use embedding files."""
    warnings.showwarning = _show_warning
    cpu.share_cores()  # beside another busy program, fewer torch threads are faster (textinv.cpu)
    # the libraries' notices (e.g. "requires torchvision") are not the user's business; transformers
    # read the variable when textinv imported it, so it is told as well
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        transformers_logging.set_verbosity_error()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {printable(' '.join(str(message).split()))}", err=True)


@contextlib.contextmanager
def _processes():
    """The processes ``accelerate launch`` started for a command (one, run plainly: textinv.spread);
    only the main one prints, warnings included."""
    with spread.launched() as share, warnings.catch_warnings():
        if not share.is_main:
            warnings.simplefilter("ignore")
        yield share


# ---------------------------------------------------------------------------------- inspect
def _print_info(info: dict, nearest=None) -> None:
    click.secho(printable(info["file"]), bold=True)
    rows = [
        ("format", info["format"]),
        ("trigger", info["trigger"] + (f"  (also: {info['also_triggered_by']})" if "also_triggered_by" in info else "")),
        ("family", f"{info['family']}  ({info['made_for']})"),
        ("vectors", ", ".join(f"{s} {v[0]}×{v[1]} {info['dtype'][s]}" for s, v in info["vectors"].items())),
    ]
    if "layers" in info:  # a per-layer (P+) embedding
        layers = info["layers"]
        rows[-1] = ("vectors", ", ".join(f"{s} {len(layers)}×{v[0]}×{v[1]} {info['dtype'][s]} (layers × vectors × width)"
                                         for s, v in info["vectors"].items()))
        rows.append(("layers", f"{len(layers)} cross-attention layers, {layers[0]} … {layers[-1]}"
                     if len(layers) > 1 else f"1 cross-attention layer, {layers[0]}"))
    if "output_embeddings" in info:
        rows.append(("output", ", ".join(f"{k} {v[0]}×{v[1]}" for k, v in info["output_embeddings"].items())
                     + "  (OneTrainer's output embeddings: only OneTrainer uses them)"))
    for slot, norms in info["norms"].items():
        rows.append((f"norms {slot}", " ".join(f"{x:.3g}" for x in norms) + ("  (layer average)" if "layers" in info else "")))
    for key in ("step", "sd_checkpoint_name", "sd_checkpoint", "init_text"):
        if info["meta"].get(key) not in (None, ""):
            rows.append((key.replace("sd_checkpoint_name", "base model").replace("sd_checkpoint", "base hash"), info["meta"][key]))
    if "size_bytes" in info:
        rows += [("size", f"{info['size_bytes']:,} bytes"), ("sha256", info["sha256"]), ("A1111 hash", info["short_hash"])]
    for label, value in rows:
        click.echo(f"  {label:<12} {printable(value)}")
    for slot, per_vector in (nearest or {}).items():
        click.echo(f"  nearest words ({slot}):")
        for i, words in enumerate(per_vector):
            click.echo(f"    v{i}: " + ", ".join(f"{w} {s:.2f}" for w, s in words))


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--model", "-m", help="Also show each vector's nearest vocabulary words in this model. " + MODEL_HELP)
@click.option("--top", default=5, show_default=True, help="How many nearest words per vector.")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (one object per embedding).")
def inspect(files, model, top, model_config, as_json):
    """Describe embeddings: format, trigger, vectors, family, norms, metadata, hashes.

    FILES: embedding files, library folders, training runs (RUN@STEP: one save), hub ids or URLs."""
    # Read everything first: a bad file fails the command before anything is printed.
    found = []
    for f in files:
        src = sources.resolve(f)
        embs = sources.load(src)
        if not embs:
            raise TextinvError(f"{formats.printable(f)}: no embedding files in this folder")
        found += [(src.shown(emb), emb) for emb in embs]
    pipe = None
    if model:
        pipe = load_pipeline(model, config=model_config)
    out = []
    for path, emb in found:
        info = library.describe(path, emb)
        near = tokens.nearest_words(emb, pipe, k=top) if pipe is not None else None
        if near:
            info["nearest"] = near
        out.append(info)
        if not as_json:
            _print_info(info, near)
    if as_json:
        click.echo(json.dumps(out if len(out) != 1 else out[0], indent=2))


# ---------------------------------------------------------------------------------- convert
@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(CONVERT_FORMATS), help="Output format (default: from DST's extension).")
@click.option("--name", help="Trigger name to store (default: the source's name).")
@click.option("--select", help="Which embedding to take from a file that bundles several (LoRA).")
@click.option("--preview", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Image shown on a PNG card.")
@click.option("--to-single", is_flag=True,
              help="A per-layer (P+/XTI) embedding: average its layers into a plain one, for tools that read only those (loses the per-layer detail).")
@click.option("--clip-only", is_flag=True,
              help="Write only the CLIP parts (an SD3/Flux.1 embedding without its T5 part, as A1111 reads SD3 ones; or an SDXL one as --format sd3).")
def convert(src, dst, fmt, name, select, preview, to_single, clip_only):
    """Convert an embedding to another format (diffusers, a1111, kohya, sdxl, png; SD3/Flux.1: sd3, flux,
    onetrainer, comfyui; per-layer: xti, per-layer).

    A format that cannot hold every part writes the others and says in one line what it left out.
    SRC: an embedding file, a training run (RUN@STEP: one save), a hub id or a URL."""
    emb = sources.load_one(src, name=name, select=select)
    if to_single:
        emb = formats.to_single(emb)
    image = None
    if preview is not None:
        try:
            with Image.open(preview) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise TextinvError(f"{preview}: cannot read preview image ({e})") from None
    _save_as(emb, dst, fmt, preview=image, clip_only=clip_only)


def _vector_count(emb) -> str:
    """"2 vectors", or "2 vectors × 16 layers" for a per-layer embedding."""
    text = f"{emb.num_vectors} vector{'s' if emb.num_vectors != 1 else ''}"
    return text + (f" × {len(emb.layers)} layers" if emb.layers is not None else "")


# ------------------------------------------------------------------------------------ train
# textinv train's options are TrainConfig's fields (textinv.settings): their types show a range or
# choices in --help as click's own would, but only convert the value; settings.check judges it, so
# that a bad value gets the same one line here as in the web UI.
class _IntIn(click.IntRange):
    def convert(self, value, param, ctx):
        return click.INT.convert(value, param, ctx)


class _FloatIn(click.FloatRange):
    def convert(self, value, param, ctx):
        return click.FLOAT.convert(value, param, ctx)


class _OneOf(click.Choice):
    def convert(self, value, param, ctx):
        return value


OFF = "__off"  # the parameter name of a setting's second flag (--no-latent-cache): FIELD__off


def _option_type(f, s: settings.Setting):
    kind, _ = settings.kind_of(f)
    if s.path:
        return click.Path(path_type=Path, file_okay=s.path != "folder")
    if s.choices:
        return _OneOf(list(s.choices))
    if kind in (int, float) and (s.low is not None or s.high is not None):
        if kind is int:
            return _IntIn(s.low, s.high)
        return _FloatIn(s.low, s.high, max_open=s.high_open)
    return {int: click.INT, float: click.FLOAT, str: click.STRING}.get(kind)


def _setting_option(f):
    """The click option of one setting: --name, a --name/--no-name pair for a boolean that defaults
    to on or to auto, a plain flag for one that defaults to off."""
    s, default, flag = settings.spec(f), settings.default_of(f), settings.flag_of(f)
    required = default is dataclasses.MISSING
    if settings.kind_of(f)[0] is bool:
        names = [flag] if default is False else [f"{flag}/--no-{flag[2:]}"]
        kw = dict(is_flag=True) if default is False else dict(default=default)
    else:
        names, kw = [flag], dict(type=_option_type(f, s)) | ({} if required else dict(default=default))
    return click.option(*names, *([s.short] if s.short else []), f.name, required=required, help=s.help or None,
                        show_default=s.show_default, **kw)


def _setting_options(command, fields=None):
    """Decorate ``command`` with an option per setting the CLI offers (or per one of ``fields``), in
    TrainConfig's order."""
    for f in reversed(settings.cli_fields() if fields is None else fields):
        s = settings.spec(f)
        if s.off:
            command = click.option(s.off[0], f.name + OFF, is_flag=True, help=s.off[1])(command)
        command = _setting_option(f)(command)
    return command


def _train_config(given: dict) -> TrainConfig:
    """TrainConfig from textinv train's options."""
    return TrainConfig(**_setting_values(given))


def _setting_values(given: dict, fields=None) -> dict:
    """The settings textinv train's options (or those of ``fields``) gave, by field name: paths as
    text, a second flag (--no-latent-cache) as its value."""
    values = {}
    for f in settings.cli_fields() if fields is None else fields:
        s, value = settings.spec(f), given[f.name]
        if s.off and given[f.name + OFF]:
            if value is not None:
                raise click.UsageError(f"{settings.flag_of(f)} and {s.off[0]}: give one")
            value = s.off[2]
        values[f.name] = str(value) if s.path and isinstance(value, Path) else value
    return values


@main.command()
@_setting_options
@click.option("--pick-best", is_flag=True, help="Measure every save (as textinv eval does) and make the recommended step the final embedding.")
@click.option("--patience", type=click.IntRange(min=1), default=None,
              help="Measure every save and stop once N saves in a row bring no better fidelity × editability score.")
@click.option("--eval-n", default=8, show_default=True, help="Images per prompt when measuring saves (--pick-best / --patience).")
@click.option("--concept", default=None, help="Mini world: the shape the judge should see (default: read off the training images).")
@click.option("--clip", default=None, help="CLIP weights (folder or hub id) for measuring saves on real models.")
@click.option("--dino", default=None, help="DINO weights (folder or hub id) for measuring saves on real models.")
def train(pick_best, patience, eval_n, concept, clip, dino, **given):
    """Train a textual inversion embedding from a folder of images."""
    cfg = _train_config(given)
    settings.check(cfg)  # the web UI's words for a bad value, before anything is loaded or written
    measure = pick_best or patience is not None
    if measure and not cfg.save_every:
        cfg = dataclasses.replace(cfg, save_every=max(1, cfg.steps // 10))
        click.echo(f"--save-every {cfg.save_every}: saves to measure for --pick-best/--patience", err=True)
    echo = lambda line: click.echo(formats.printable(line), err=True)  # noqa: E731
    if not measure:
        result = training.train(cfg, echo=echo)
        if result.is_main_process:
            click.echo(_trained(result))
        return
    measured = evaluate.train_measured(cfg, concept=concept, clip=clip, dino=dino, n=eval_n,
                                       patience=patience, keep_best=pick_best,
                                       echo=lambda msg: click.echo(f"\n  measured {msg}", err=True), on_start=echo)
    result = measured.result
    click.echo(_trained(result))
    if pick_best:
        best = measured.best
        note = "the last step's" if best == result.steps else f"step {best}'s (the last step's is in {runs.saves_folder(result.out)})"
        click.echo(f"--pick-best: {result.embedding_path} holds {note} embedding")
    click.echo(report.format_table(measured.evaluation.result))
    paths = measured.written
    click.echo(f"wrote {paths['report']}, {paths['curve']}, {paths['metrics']}")


# ------------------------------------------------------------------------------- train-many
def _many_options(command):
    return _setting_options(command, settings.many_option_fields())


@main.command("train-many")
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"), show_default=True,
              help="Each row's run goes to OUT_DIR/TOKEN (unless the row gives its out); the summary to "
                   "OUT_DIR/MANIFEST-summary.csv.")
@click.option("--pack", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train up to N concepts at a time in one batch (those of one model, resolution, guidance and "
                   "Clip skip): faster on a GPU; each embedding equals it trained alone to float32 rounding, not bit "
                   "for bit. 1: one after another, the files exactly as textinv train writes them (docs/scale.md).")
@_many_options
def train_many(manifest, out_dir, pack, **given):
    """Train a concept per row of MANIFEST, loading the model once.

    MANIFEST: a .csv file (a header row) or .jsonl (a JSON object a line); columns: token, images and
    any train option (lr or --lr). The options here apply to every row that leaves them empty. Run it
    again after a stop: it trains what is left, from the step each concept reached (docs/scale.md)."""
    echo = lambda line: click.echo(formats.printable(line), err=True)  # noqa: E731
    summary = many.train_many(manifest, _setting_values(given, settings.many_option_fields()), out_dir, echo=echo,
                              pack=pack)
    if not summary.is_main_process:
        return
    click.echo(many.format_table(summary))
    click.echo(f"wrote {printable(summary.csv)}")
    if summary.failed:
        raise TextinvError(f"{len(summary.failed)} of {len(summary.outcomes)} concepts failed (their notes above); "
                           "the same command retries them")


def _trained(result) -> str:
    line = (f"wrote {printable(result.embedding_path)} ({result.steps} steps, {result.seconds:.0f} s, "
            f"loss {result.loss:.4f}: the mean of the last {LOSS_WINDOW} steps, as in the bar)")
    return f"{result.stopped}\n{line}" if result.stopped else line


# ------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("textinv-demo"), show_default=True)
@click.option("--concept", default=None, help="Which unnamed shape of the mini world to learn: drop (default), arrow, bowtie or tee.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--steps", type=int, default=None, help="Training steps (default: the tuned demo setting).")
@click.option("-n", "count", type=int, default=None, help="Images per prompt for the metrics.")
@click.option("--bias", is_flag=True, help="Instead: debias the word 'ball' from a curated set (textinv bias ball --attribute colour --images ...).")
@click.option("--model", "-m", type=click.Choice(["mini", "mini-flow"]), default="mini", show_default=True,
              help="Which built-in model of the mini world: mini (SD-shaped) or mini-flow (Flux.1-shaped).")
def demo(out, concept, seed, steps, count, bias, model):
    """The whole loop on a built-in model and its world: render, train, generate, measure."""
    if bias:
        mini_demo.run_bias(out, seed=seed, n=count or 60, steps=steps or 300, model=model)
        return
    settings = mini_demo.DemoSettings.for_model(model)
    if steps:
        settings.steps = steps
    if count:
        settings.n = count
    metrics = mini_demo.run(out, concept=concept, seed=seed, settings=settings, model=model)
    mini_demo.print_summary(metrics)
    click.echo(f"wrote {out}/: images/, run/ (embedding, log), grid.png, metrics.json")


# ------------------------------------------------------------------------------------- bias
@main.command()
@click.argument("word")
@click.option("--attribute", "attribute", required=True,
              help="NAME=value1,value2,... to measure (e.g. gender=man,woman); on the mini model NAME alone takes the judge's values.")
@click.option("--images", default=None, help="A curated folder: re-learn WORD from it and measure after (per-value: one subfolder per value).")
@click.option("--recipe", type=click.Choice(["per-value", "replace"]), default="per-value", show_default=True,
              help="per-value: a learned token per value, used in turn before WORD; replace: re-learn WORD itself from a flat folder.")
@click.option("--embedding", "-e", "embedding", default=None, help="Or: an existing replacement embedding for WORD, or a folder of per-value ones, to measure after.")
@click.option("--prompts", "prompts_file", default=None, help="Held-out prompts, one a line, WORD written {} (default: the model's own or a generic set).")
@click.option("--templates", default=None, help="Training templates ('object', 'style' or a file); their prompts are the training group.")
@click.option("--model", "-m", default=None, help=MODEL_HELP)
@config_option
@click.option("--clip", default=None, help="CLIP weights for zero-shot classification (folder or hub id; default on real models: openai/clip-vit-base-patch32).")
@click.option("-n", "count", type=click.IntRange(min=1), default=120, show_default=True, help="Images per prompt.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Training steps (with --images).")
@click.option("--timesteps", default=None, help="Training noise levels (see textinv train; default: the recipe's, all / 300:1000).")
@click.option("--guidance", "train_guidance", type=_Finite(1.0), default=None, help="Training guidance (see textinv train; default: the recipe's, 1 / 1.5).")
@click.option("--vectors", type=click.IntRange(1, 75), default=1, show_default=True)
@click.option("--pack", type=click.IntRange(min=1), default=1, show_default=True,
              help="Per-value tokens trained at a time in one batch (faster where memory allows; equal to one at a time to float32 rounding).")
@click.option("--init", default="majority", show_default=True,
              help="Per-value tokens start from: majority (the value the model draws most for WORD today), value (each its own value's word), or a word.")
@click.option("--named", is_flag=True,
              help="Also measure WORD with each value named in turn ('a woman doctor'): the hard-prompt baseline, and how often the model keeps the word in each value at all.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default bias-WORD).")
def bias(word, attribute, images, recipe, embedding, prompts_file, templates, model, model_config, clip, count, seed, steps, timesteps,
         train_guidance, vectors, pack, init, named, out):
    """Measure a word's bias over an attribute; with --images re-learn it from a curated set and measure again."""
    name, values = word_bias.parse_attribute(attribute, lambda a: spec.labels(a) if a in spec.ATTRIBUTES else None)
    run = word_bias.BiasRun(word=word, attribute=name, values=values, images=images, embedding=embedding, recipe=recipe, prompts=prompts_file,
                    templates=templates, model=model, model_config=model_config, clip=clip, n=count, seed=seed, steps=steps,
                    timesteps=timesteps, guidance=train_guidance, vectors=vectors, pack=pack, init=init, named=named,
                    out=str(out or f"bias-{file_stem(word)}"))
    with _processes() as share:
        result = word_bias.run_bias(run, echo=lambda line: click.echo(printable(line), err=True), share=share)
    if share.is_main:
        click.echo(word_bias.format_table(result))
        click.echo(f"wrote {run.out}/bias.json, bias.png, report.html")


main.add_command(world)


# --------------------------------------------------------------------------------- generate
def _sampler_help() -> str:
    return "A1111 sampler name: " + ", ".join(f"'{n}'" for n in samplers.names()) + " (default: the model's own scheduler)."


@main.command()
@click.argument("prompt", required=False)
@click.option("--negative", default=None, help="Negative prompt (weights and embedding triggers work here too).")
@click.option("--embeddings", "-e", multiple=True, metavar="SOURCE", help=f"Embeddings: {SOURCE_HELP} (repeatable).")
@click.option("--model", "-m", default=None, help=MODEL_HELP)
@click.option("-n", "count", default=1, show_default=True, help="Number of images; image i uses seed SEED+i.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--steps", default=30, show_default=True)
@click.option("--guidance", type=_Finite(), default=None, help="CFG scale (default: the model's own, else 7 as in A1111).")
@click.option("--sampler", default=None, help=_sampler_help())
@click.option("--size", default=None, help="WxH, e.g. 512x512 (default: the model's native size).")
@click.option("--batch", default=8, show_default=True, help="Images per pipeline call.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs"), show_default=True)
@click.option("--from-png", "from_png", type=click.Path(path_type=Path), default=None,
              help="Re-create an image from its A1111 'parameters' chunk (PROMPT is then not given).")
@clip_skip_option
@config_option
def generate(prompt, negative, embeddings, model, count, seed, steps, guidance, sampler, size, batch, out, from_png, clip_skip,
             model_config):
    """Generate images; PROMPT uses A1111 syntax: (word:1.2), (word), [word], embedding triggers."""
    if from_png is not None and prompt is not None:
        raise TextinvError("--from-png takes its prompt from the image; give no PROMPT")
    if from_png is not None and clip_skip is not None:
        raise TextinvError("--from-png takes Clip skip from the image's parameters; give no --clip-skip")
    if from_png is None and prompt is None:
        raise TextinvError("PROMPT: missing (or use --from-png IMAGE)")
    with _processes() as share:  # under accelerate launch: the batches spread, the main process writes
        if from_png is not None:
            result = generation.regenerate(from_png, embeddings=list(embeddings), model=model, out=out,
                                           progress=share.is_main, model_config=model_config, share=share)
        else:
            result = generation.generate(prompt, negative, embeddings=list(embeddings), model=model, n=count, seed=seed,
                                         steps=steps, guidance=guidance, sampler=sampler, size=size, out=out, batch=batch,
                                         progress=share.is_main, clip_skip=1 if clip_skip is None else clip_skip,
                                         model_config=model_config, share=share)
    if not share.is_main:
        return
    for path in result.files:
        click.echo(f"wrote {path}")
    if result.grid is not None:
        click.echo(f"wrote {result.grid} (grid)")
    if result.used:
        click.echo(f"embeddings used: {', '.join(result.used)}")


# --------------------------------------------------------------------------------------- ui
@main.command()
@click.option("--library", type=click.Path(path_type=Path), default=Path("~/.textinv/embeddings"), show_default=True,
              help="Embeddings folder: the Library tab's table; trained embeddings are added to it.")
@click.option("--model", "-m", default=None, help=MODEL_HELP)
@config_option
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("~/.textinv/ui"), show_default=True,
              help="Where training runs, generated images and downloads go (runs/, outputs/, downloads/).")
@click.option("--port", default=7860, show_default=True, help="Port on 127.0.0.1 (the app is never served beyond this machine).")
@click.option("--max-upload-mb", default=200, show_default=True, help="Larger uploads are refused in the page.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--clip", default=None, help="CLIP weights (folder or hub id) for the Bias tab's classifier and the Train "
              "tab's measured saves on real models (default: openai/clip-vit-base-patch32; each form can change it).")
def ui(library, model, model_config, workdir, port, max_upload_mb, open_browser, clip):
    """A local web app (Gradio) on 127.0.0.1: train, generate, measure a word's bias and manage the embeddings library."""
    webui.launch(library, model, workdir=workdir, model_config=model_config, port=port, max_upload_mb=max_upload_mb,
                 open_browser=open_browser, clip=clip)


# ------------------------------------------------------------------------- library commands
@main.command("list")
@click.argument("folder")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_(folder, as_json):
    """Table of a library folder (or any embedding source: a run, a hub id…): trigger, family, vectors, steps, size, short hash."""
    table = library.rows(folder)
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    head = ["trigger", "family", "vectors", "steps", "size", "hash", "file"]
    cells = [[printable(r["trigger"]), r["family"], str(r["vectors"]), "" if r["steps"] is None else str(r["steps"]),
              "" if r["size"] is None else f"{r['size']:,}", r["hash"] or "", printable(r["file"])] for r in table]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    for line in [head] + cells:
        click.echo("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    click.echo(f"{len(table)} embedding{'s' if len(table) != 1 else ''}")


def _save_as(emb, out: Path, fmt, **options) -> None:
    """Write ``emb`` and say what the written file holds (read back: a format may leave a part out)."""
    written = formats.save(emb, out, fmt, **options)
    found = formats.load_all(written)  # one read (a LoRA bundle holds several: ours is the one named so)
    back = next((e for e in found if e.name == emb.name), found[0])
    click.echo(f"wrote {formats.printable(written)} ({back.source_format}, trigger {emb.name!r}, "
               f"{_vector_count(back)}, {back.family})")


def _trigger_of(out: Path) -> str:
    return out.stem if out.suffix else out.name


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--weights", default=None, help="Comma-separated weights, one per file (default: equal).")
@click.option("--concat", is_flag=True, help="Stack all vectors into one longer embedding instead of averaging.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output file (format from its extension).")
@click.option("--format", "fmt", type=click.Choice(CONVERT_FORMATS), default=None)
def merge(files, weights, concat, out, fmt):
    """Merge embeddings: a weighted average (same family and vector count) or --concat."""
    if weights is not None and concat:
        raise TextinvError("--weights and --concat exclude each other")
    ws = None
    if weights is not None:
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError:
            raise TextinvError(f"--weights: expected numbers like 0.5,0.5, got {weights!r}") from None
    embs = [sources.load_one(f) for f in files]
    name = _trigger_of(out)
    emb = library.concat(embs, name=name) if concat else library.merge(embs, ws, name=name)
    _save_as(emb, out, fmt)


@main.command()
@click.argument("file")
@click.argument("factor", type=str)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output file (format from its extension).")
@click.option("--format", "fmt", type=click.Choice(CONVERT_FORMATS), default=None)
def scale(file, factor, out, fmt):
    """Multiply every vector of an embedding by FACTOR."""
    try:
        value = float(factor)
    except ValueError:
        raise TextinvError(f"FACTOR: expected a number, got {factor!r}") from None
    emb = library.scale(sources.load_one(file), value, name=_trigger_of(out))
    _save_as(emb, out, fmt)


@main.command()
@click.argument("file")
@click.option("--model", "-m", default=None, help=MODEL_HELP)
@click.option("--top", default=5, show_default=True, help="Words per vector.")
@config_option
def nearest(file, model, top, model_config):
    """The vocabulary words closest (cosine) to each vector of an embedding."""
    if top < 1:
        raise TextinvError(f"--top: must be at least 1, got {top}")
    emb = sources.load_one(file)
    near = tokens.nearest_words(emb, load_pipeline(model, config=model_config), k=top)
    if not near:
        raise TextinvError(f"{file}: {tokens.describe_widths(emb)}; the model has no matching text encoder")
    for slot, per_vector in near.items():
        click.echo(f"{emb.name} ({slot}):")
        for i, words in enumerate(per_vector):
            click.echo(f"  v{i}: " + ", ".join(f"{w} {s:.2f}" for w, s in words))


# ------------------------------------------------------------- eval, train --pick-best (issue 6)
@main.command("eval")
@click.argument("target")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Training images (default: the run's own).")
@click.option("--model", "-m", default=None, help="Default: the run's model. " + MODEL_HELP)
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Editing prompts, one a line, the trigger written {} / [name] / S* (default: the paper's; the judge's on the mini world).")
@click.option("-n", "count", default=16, show_default=True, help="Images per prompt.")
@click.option("--concept", default=None, help="Measure with the mini world's judge, for this shape (default when the model draws 32×32: the shape the judge sees in the training images).")
@click.option("--clip", default=None, help="CLIP weights, folder or hub id (default for other models: openai/clip-vit-base-patch32).")
@click.option("--dino", default=None, help="DINO weights, folder or hub id (default for other models: facebook/dino-vits16).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Image i of every prompt uses seed SEED+i.")
@click.option("--steps", default=30, show_default=True, help="Sampling steps per image.")
@click.option("--guidance", type=_Finite(), default=None, help="CFG scale (default as textinv generate: the model's own, else 7).")
@click.option("--tolerance", default=0.05, show_default=True, help="Best-step rule: the earliest step within this fraction of the best score.")
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="Also measure the init word.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default RUN/eval, or NAME-eval beside a file).")
@clip_skip_option
@config_option
def eval_(target, images, model, prompts_file, count, concept, clip, dino, seed, steps, guidance, tolerance, baseline, out,
          clip_skip, model_config):
    """Measure an embedding or every save of a training run: fidelity, editability, the trade-off curve, the best step.

    TARGET: a run folder or the demo's output folder (every save), RUN@STEP, an embedding file, a hub id or a URL."""
    if not 0 <= tolerance < 1:
        raise TextinvError(f"--tolerance {tolerance}: must be in [0, 1)")
    src = sources.resolve(target)
    with _processes() as share:  # under accelerate launch: each measurement's prompts spread
        ev = evaluate.evaluate_path(src, images=images, model=model, concept=concept, clip=clip, dino=dino,
                                    prompts_file=prompts_file, n=count, seed=seed, steps=steps, guidance=guidance,
                                    baseline=baseline, tolerance=tolerance,
                                    echo=lambda msg: click.echo(f"measured {msg}", err=True),
                                    clip_skip=clip_skip, model_config=model_config, share=share)
    if not share.is_main:
        return
    if out is None:  # RUN/eval; NAME-eval beside a file; a download's in the current folder
        if src.run is not None and src.step is None:
            out = runs.eval_folder(src.run)
        elif src.remote:
            out = Path(f"{formats.file_stem(src.name or src.path.stem)}-eval")
        else:
            out = src.path.parent / f"{src.path.stem}-eval"
    click.echo(report.format_table(ev.result))
    r = ev.result
    if r["best_step"] is not None and len(r["points"]) > 1:
        click.echo(f"recommended step: {r['best_step']} ({r['rule']})")
    elif r["best_step"] is None and r["points"]:
        click.echo("no step recommended: every save scores 0 (fidelity × editability), so nothing this metric "
                   "can see was learned")
    paths = report.write_outputs(ev, out)
    click.echo(f"wrote {paths['report']}, {paths['curve']}, {paths['metrics']}")
