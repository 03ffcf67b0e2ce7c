"""The ``textinv`` command.  Thin: every subcommand calls the library and prints the result.

Errors a user can cause (:class:`~textinv.errors.TextinvError`) print as one line on stderr and
exit with status 2; there is never a traceback for bad input.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from .errors import TextinvError

OUTPUT_FORMATS = ["diffusers", "a1111", "kohya", "sdxl", "png"]


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TextinvError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="textinv")
def main():
    """textinv — Textual Inversion: train, store, convert and use embedding files."""
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


# ---------------------------------------------------------------------------------- inspect
def describe(path: Path, emb) -> dict:
    """What `textinv inspect` reports about one embedding (also its --json output)."""
    from . import formats, tokens

    info = {
        "file": str(path),
        "format": emb.source_format,
        "trigger": emb.name,
        "family": emb.family,
        "vectors": {slot: list(t.shape) for slot, t in emb.vectors.items()},
        "dtype": {slot: str(t.dtype).replace("torch.", "") for slot, t in emb.vectors.items()},
        "norms": {slot: [round(float(x), 4) for x in t.float().norm(dim=-1)] for slot, t in emb.vectors.items()},
        "meta": {k: v for k, v in emb.meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    if emb.source_format == "diffusers" and emb.meta.get("token") not in (None, emb.name):
        info["also_triggered_by"] = emb.meta["token"]
    if path.is_file():
        info["size_bytes"] = path.stat().st_size
        info["sha256"] = formats.sha256_file(path)
        info["short_hash"] = info["sha256"][:12]
    info["made_for"] = tokens.describe_widths(emb)
    return info


def _print_info(info: dict, nearest=None) -> None:
    click.secho(info["file"], bold=True)
    rows = [
        ("format", info["format"]),
        ("trigger", info["trigger"] + (f"  (also: {info['also_triggered_by']})" if "also_triggered_by" in info else "")),
        ("family", f"{info['family']}  ({info['made_for']})"),
        ("vectors", ", ".join(f"{s} {v[0]}×{v[1]} {info['dtype'][s]}" for s, v in info["vectors"].items())),
    ]
    for slot, norms in info["norms"].items():
        rows.append((f"norms {slot}", " ".join(f"{x:.3g}" for x in norms)))
    for key in ("step", "sd_checkpoint_name", "sd_checkpoint", "init_text"):
        if info["meta"].get(key) not in (None, ""):
            rows.append((key.replace("sd_checkpoint_name", "base model").replace("sd_checkpoint", "base hash"), info["meta"][key]))
    if "size_bytes" in info:
        rows += [("size", f"{info['size_bytes']:,} bytes"), ("sha256", info["sha256"]), ("A1111 hash", info["short_hash"])]
    for label, value in rows:
        click.echo(f"  {label:<12} {value}")
    for slot, per_vector in (nearest or {}).items():
        click.echo(f"  nearest words ({slot}):")
        for i, words in enumerate(per_vector):
            click.echo(f"    v{i}: " + ", ".join(f"{w} {s:.2f}" for w, s in words))


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", help="Also show each vector's nearest vocabulary words in this model (hub id, folder, file or 'mini').")
@click.option("--top", default=5, show_default=True, help="How many nearest words per vector.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (one object per embedding).")
def inspect(files, model, top, as_json):
    """Describe embedding files: format, trigger, vectors, family, norms, metadata, hashes."""
    from . import formats, tokens

    # Read everything first: a bad file fails the command before anything is printed.
    found = [(Path(f), emb) for f in files for emb in formats.load_all(f)]
    pipe = None
    if model:
        from .models import load_pipeline

        pipe = load_pipeline(model)
    out = []
    for path, emb in found:
        info = describe(path, emb)
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
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), help="Output format (default: from DST's extension).")
@click.option("--name", help="Trigger name to store (default: the source's name).")
@click.option("--select", help="Which embedding to take from a file that bundles several (LoRA).")
@click.option("--preview", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Image shown on a PNG card.")
def convert(src, dst, fmt, name, select, preview):
    """Convert an embedding file to another format (diffusers, a1111, kohya, sdxl, png)."""
    from . import formats

    emb = formats.load(src, name=name, select=select)
    image = None
    if preview is not None:
        from PIL import Image

        try:
            image = Image.open(preview).convert("RGB")
        except OSError as e:
            raise TextinvError(f"{preview}: cannot read preview image ({e})") from None
    written = formats.save(emb, dst, fmt, preview=image)
    click.echo(f"wrote {written} ({formats.detect_format(written)}, trigger {emb.name!r}, {emb.num_vectors} vectors, {emb.family})")


# ------------------------------------------------------------------------------------ train
@main.command()
@click.option("--images", required=True, type=click.Path(path_type=Path), help="Folder of 3–5+ images (jpg/png/webp/bmp; IMG.txt sidecar captions).")
@click.option("--token", required=True, help="The new trigger word (or, with --mode replace, the existing word to re-learn).")
@click.option("--model", "-m", default=None, help="Hub id, diffusers folder, single-file .safetensors/.ckpt, or 'mini' (default).")
@click.option("--init", default=None, help="Init text; several tokens are spread over the vectors (A1111). Default '*', or the word itself in replace mode.")
@click.option("--vectors", default=1, show_default=True, help="Vectors per token.")
@click.option("--mode", type=click.Choice(["object", "style", "replace"]), default="object", show_default=True)
@click.option("--templates", default=None, help="'object', 'style' or a file of templates with [name]/{} and [filewords]. Default: by --mode.")
@click.option("--steps", default=500, show_default=True)
@click.option("--lr", default="5e-3", show_default=True, help="A number, or an A1111 schedule like '0.005:100, 1e-3:1000, 1e-5'.")
@click.option("--batch", default=4, show_default=True)
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--resolution", type=int, default=None, help="Training size in pixels (default: the model's native size).")
@click.option("--crops", default=1, show_default=True, help="Views per image: a centre crop plus random crops.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Also train on mirrored views.")
@click.option("--seed", default=0, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="Model precision; learned vectors always stay fp32.")
@click.option("--grad-checkpointing", is_flag=True, help="Trade compute for memory.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the UNet.")
@click.option("--save-every", default=0, show_default=True, help="Also save NAME-STEP every N steps (and a resume point).")
@click.option("--preview-every", default=0, show_default=True, help="Write a fixed-seed preview grid every N steps.")
@click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default="diffusers", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default runs/TOKEN).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last save.")
def train(images, token, model, init, vectors, mode, templates, steps, lr, batch, grad_accum, resolution, crops, flip,
          seed, precision, grad_checkpointing, compile_, save_every, preview_every, fmt, out, resume):
    """Train a textual inversion embedding from a folder of images."""
    from .training import TrainConfig, train as run

    cfg = TrainConfig(images=str(images), token=token, model=model, init=init, vectors=vectors, mode=mode,
                      templates=templates, steps=steps, lr=lr, batch=batch, grad_accum=grad_accum, resolution=resolution,
                      crops=crops, flip=flip, seed=seed, precision=precision, grad_checkpointing=grad_checkpointing,
                      compile=compile_, save_every=save_every, preview_every=preview_every, format=fmt,
                      out=str(out) if out else None, resume=resume)
    result = run(cfg)
    if result.is_main_process:
        click.echo(f"wrote {result.embedding_path} ({result.steps} steps, {result.seconds:.0f} s, last loss {result.loss:.4f})")


# ------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("textinv-demo"), show_default=True)
@click.option("--concept", default=None, help="Which unnamed shape of the mini world to learn (default: the first).")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", type=int, default=None, help="Training steps (default: the tuned demo setting).")
@click.option("-n", "count", type=int, default=None, help="Images per prompt for the metrics.")
@click.option("--bias", is_flag=True, help="Instead: re-learn the biased word 'ball' from a balanced set (replace mode).")
def demo(out, concept, seed, steps, count, bias):
    """The whole loop on the built-in mini model: render, train, generate, measure."""
    from . import demo as d

    if bias:
        d.run_bias(out, seed=seed, n=count or 60, steps=steps or 300)
        return
    settings = d.DemoSettings()
    if steps:
        settings.steps = steps
    if count:
        settings.n = count
    metrics = d.run(out, concept=concept, seed=seed, settings=settings)
    d.print_summary(metrics)
    click.echo(f"wrote {out}/: images/, run/ (embedding, log), grid.png, metrics.json")


def _register_world():
    # The mini world is an optional part of a checkout; when present, its import errors must show.
    if (Path(__file__).parent / "world" / "cli.py").is_file():
        from .world.cli import world

        main.add_command(world)


_register_world()
