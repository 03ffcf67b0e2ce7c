"""The ``textinv`` command.  Thin: every subcommand calls the library and prints the result.

Errors a user can cause (:class:`~textinv.errors.TextinvError`) print as one line on stderr and
exit with status 2; there is never a traceback for bad input.
"""
from __future__ import annotations

import json
import sys
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


def _register_world():
    # The mini world is an optional part of a checkout; when present, its import errors must show.
    if (Path(__file__).parent / "world" / "cli.py").is_file():
        from .world.cli import world

        main.add_command(world)


_register_world()
