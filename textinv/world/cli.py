"""``textinv world ...``: render, sample, judge, train-base, tune-decoder, quality, train-judge.

Learnability (textual inversion of an unnamed shape) is `textinv demo --concept SHAPE`.

Heavy imports (torch, diffusers) happen inside the commands so ``textinv --help`` stays fast.
"""
from __future__ import annotations

from pathlib import Path

import click
from PIL import Image, UnidentifiedImageError

from .. import models
from ..errors import TextinvError
from ..generation import images as generate
from ..images import grid
from . import spec
from .flow_base import train_flow_base
from .judge import judge, load_judge, train_judge
from .quality import format_table, measure
from .render import describe, sample
from .train_base import train_base, tune_decoder


def _choice(attr: str):
    return click.Choice(spec.labels(attr))


@click.group()
def world():
    """The built-in miniature world: renderer, judge and the mini base model."""


@world.command("render")
@click.argument("concept")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("-n", "count", default=5, show_default=True, help="number of images")
@click.option("--colour", "--color", "colour", type=_choice("colour"), help="fix the colour")
@click.option("--size", type=_choice("size"), help="fix the size")
@click.option("--position", type=_choice("position"), help="fix the position")
@click.option("--style", type=_choice("style"), help="fix the fill style")
@click.option("--background", type=_choice("background"), help="fix the background")
@click.option("--seed", default=0, show_default=True)
@click.option("--scale", default=1, show_default=True, help="upscale factor (nearest) for viewing")
@click.option("--captions", is_flag=True,
              help="also write IMG.txt captions naming every other attribute, with [name] for the concept")
def render_cmd(concept, out, count, colour, size, position, style, background, seed, scale, captions):
    """Write a user-like training set of CONCEPT (a shape, or a style) as PNGs into OUT.

    Attributes not fixed by flags vary from image to image.
    """
    fixed = dict(colour=colour, size=size, position=position, style=style, background=background)
    if concept in spec.SHAPES:
        fixed["shape"] = concept
    elif concept in spec.STYLES:
        if style and style != concept:
            raise TextinvError(f"concept {concept!r} is a style; it conflicts with --style {style}")
        fixed["style"] = concept
    else:
        raise TextinvError(f"unknown concept {concept!r}; choose a shape ({', '.join(spec.labels('shape'))}) "
                           f"or a style ({', '.join(spec.labels('style'))})")
    if count < 1:
        raise TextinvError("-n must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        s = sample(seed, i, **fixed)
        img = s.image
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        img.save(out / f"{concept}_{i:03d}.png")
        if captions:
            shape_concept = concept in spec.SHAPES
            caption = describe(s.attrs, noun="[name]" if shape_concept else None, style=None if shape_concept else "[name]")
            (out / f"{concept}_{i:03d}.txt").write_text(caption + "\n")
    click.echo(f"wrote {count} images of {concept} to {out}")


@world.command("sample")
@click.argument("prompt")
@click.option("-n", "count", default=16, show_default=True, help="number of images")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("grid.png"), show_default=True)
@click.option("--model", default="mini", show_default=True, help="model folder, file or hub id")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=30, show_default=True, help="denoising steps")
@click.option("--guidance", default=4.0, show_default=True, help="classifier-free guidance scale")
@click.option("--scale", default=2, show_default=True, help="upscale factor (nearest) of the grid")
def sample_cmd(prompt, count, out, model, seed, steps, guidance, scale):
    """Generate COUNT images of PROMPT with the base model and save them as one grid PNG."""
    if count < 1:
        raise TextinvError("-n must be at least 1")
    pipe = models.load_pipeline(model)
    images = generate(pipe, [prompt] * count, seed=seed, steps=steps, guidance=guidance, progress=True)
    grid(images, scale=scale).save(out)
    click.echo(f"wrote {count} samples of {prompt!r} to {out}")


@world.command("judge")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def judge_cmd(images):
    """Print the judge's attributes for each image."""
    pil = []
    for p in images:
        try:
            pil.append(Image.open(p).convert("RGB"))
        except (UnidentifiedImageError, OSError):
            raise TextinvError(f"{p}: not an image") from None
    model = load_judge()
    for p, r in zip(images, judge(pil, model=model)):
        attrs = " ".join(f"{k}={r[k]}({r['prob'][k]:.2f})" for k in spec.ATTRIBUTE_NAMES)
        click.echo(f"{p}: {attrs}")


@world.command("train-base")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="output folder (default: the package's mini model folder)")
@click.option("--seed", default=0, show_default=True)
@click.option("--images", "n_images", default=60000, show_default=True, help="rendered training images")
@click.option("--vae-steps", default=1200, show_default=True)
@click.option("--minutes", default=88.0, show_default=True,
              help="wall-clock budget of the whole command; the UNet stage fills what render and VAE leave")
@click.option("--unet-minutes", default=None, type=float, help="budget of the UNet+text stage alone (overrides --minutes)")
@click.option("--unet-steps", default=None, type=int, help="fixed number of UNet steps (overrides --unet-minutes)")
@click.option("--batch", default=64, show_default=True)
@click.option("--lr", default=5e-4, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="log and checkpoints (default: OUT.work next to OUT)")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="continue training this saved model (VAE kept) instead of starting from scratch")
@click.option("--arch", type=click.Choice(["sd", "flow"]), default="sd", show_default=True,
              help="flow: a Flux.1-shaped model (CLIP + T5, flow matching) with the mini model's VAE; "
                   "--unet-steps are its transformer steps (default 4000), --out is required")
@click.option("--grow-single", default=0, show_default=True, type=click.IntRange(min=0),
              help="flow, with --init-from: add this many single-stream blocks to its transformer, each starting "
                   "as a pass-through (the grown model draws what the trained one draws), then train")
@click.option("--warmup", default=None, type=click.IntRange(min=0),
              help="flow: learning-rate warm-up steps (default 400 from scratch, 100 when continuing)")
@click.option("--save-every", default=1000, show_default=True, type=click.IntRange(min=1),
              help="flow: write the EMA model to --out every this many steps")
def train_base_cmd(out, seed, n_images, vae_steps, minutes, unet_minutes, unet_steps, batch, lr, workdir, init_from, arch,
                   grow_single, warmup, save_every):
    """Train the mini model (VAE, then UNet + text encoder with EMA) from scratch on the world."""
    if arch == "flow":
        if out is None:
            raise TextinvError("train-base --arch flow: give --out (the flow model is not installed in the package yet)")
        if grow_single and (init_from is None or not (Path(init_from) / "transformer").is_dir()):
            raise TextinvError("--grow-single: grows a trained mini-flow; give its folder with --init-from")
        s = train_flow_base(Path(out), init_from or models.MINI_PATH, seed=seed, n_images=n_images,
                            steps=unet_steps or 4000, batch=batch, lr=lr, warmup=warmup, save_every=save_every,
                            grow=grow_single)
        click.echo(f"trained {s['steps']} transformer steps (loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}); wrote {out}")
        return
    if grow_single:
        raise TextinvError("--grow-single: only with --arch flow")
    out = out or models.MINI_PATH
    if workdir is None and Path(out).resolve() == models.MINI_PATH.resolve():
        workdir = Path("/tmp/textinv-train-base")
    s = train_base(Path(out), seed=seed, n_images=n_images, vae_steps=vae_steps, minutes=minutes, unet_minutes=unet_minutes,
                   unet_steps=unet_steps, batch=batch, lr=lr, text_lr=lr, workdir=workdir,
                   init_from=init_from)
    click.echo(f"trained in {s['minutes']:.1f} min ({s['unet_steps']} UNet steps); wrote {out}")


@world.command("tune-decoder")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="output model folder")
@click.option("--steps", default=2000, show_default=True)
@click.option("--images", "n_images", default=30000, show_default=True, help="rendered training images")
@click.option("--seed", default=0, show_default=True)
@click.option("--lr", default=5e-4, show_default=True)
def tune_decoder_cmd(model, out, steps, n_images, seed, lr):
    """Fine-tune a saved mini model's VAE decoder on today's world; encoder, UNet and text encoder unchanged."""
    s = tune_decoder(model, out, steps=steps, n_images=n_images, seed=seed, lr=lr)
    click.echo(f"tuned the decoder in {s['minutes']:.1f} min ({steps} steps); wrote {out}")


@world.command("quality")
@click.option("--model", default="mini", show_default=True)
@click.option("-n", "per_prompt", default=8, show_default=True, help="images per prompt")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=30, show_default=True)
@click.option("--guidance", default=4.0, show_default=True)
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also save a sample grid PNG")
def quality_cmd(model, per_prompt, seed, steps, guidance, grid_path):
    """Measure the base model with the judge (fixed prompts and seeds) and print the table."""
    res = measure(model, per_prompt=per_prompt, seed=seed, steps=steps, guidance=guidance, grid_path=grid_path)
    click.echo(format_table(res))


@world.command("train-judge")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="output folder (default: the package's judge folder)")
@click.option("--images", "n_images", default=40000, show_default=True)
@click.option("--steps", default=4000, show_default=True)
@click.option("--seed", default=0, show_default=True)
def train_judge_cmd(out, n_images, steps, seed):
    """Train the judge CNN on fresh renders (ground-truth labels only)."""
    acc = train_judge(out, n_images=n_images, steps=steps, seed=seed)
    click.echo("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
