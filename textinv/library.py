"""Embedding libraries: list a folder, merge, concatenate and scale embeddings."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import formats, sources, tokens
from .errors import TextinvError
from .formats import Embedding


def _size(path: Path | None) -> int | None:
    if path is None or not path.exists():
        return None
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def describe(path, emb) -> dict:
    """What `textinv inspect` reports about one embedding (also its --json output); ``path`` is
    how to name it (as the user wrote it), size and hashes are of the file it was read from."""
    info = {
        "file": str(path),
        "format": emb.source_format,
        "trigger": emb.name,
        "family": emb.family,
        "vectors": {slot: list(t.shape[-2:]) for slot, t in emb.vectors.items()},  # [vectors, width]
        "dtype": {slot: str(t.dtype).replace("torch.", "") for slot, t in emb.vectors.items()},
        # per vector; for a per-layer embedding, averaged over its layers (layer_norms has each)
        "norms": {slot: [round(float(x), 4) for x in t.float().norm(dim=-1).reshape(-1, t.shape[-2]).mean(dim=0)]
                  for slot, t in emb.vectors.items()},
        "meta": {k: v for k, v in emb.meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    if emb.layers is not None:
        info["layers"] = list(emb.layers)
        info["layer_norms"] = {slot: [[round(float(x), 4) for x in layer] for layer in t.float().norm(dim=-1)]
                               for slot, t in emb.vectors.items()}
    if emb.extra:  # OneTrainer's output embeddings: vectors that replace the encoder's output, not its input
        info["output_embeddings"] = {k: list(t.shape) for k, t in emb.extra.items()}
    if emb.source_format == "diffusers" and emb.meta.get("token") not in (None, emb.name):
        info["also_triggered_by"] = emb.meta["token"]
    real = Path(emb.path) if emb.path is not None else Path(path)
    if real.is_file():
        info["size_bytes"] = real.stat().st_size
        info["sha256"] = formats.cached_sha256(real)
        info["short_hash"] = formats.short_hash(real)
    info["made_for"] = tokens.describe_widths(emb)
    return info


def rows(folder) -> list[dict]:
    """One row per embedding in a library folder, or of any source :func:`textinv.sources.resolve`
    takes (a file, a training run, a hub id): trigger, family, vectors, steps, size, hash."""
    src = sources.resolve(folder)
    out = []
    for emb in sources.load(src, on_error=sources.warn_skipped):
        r = row(emb, src.path)
        if emb.path is None or Path(emb.path) == src.path:  # not a library folder's file: as the user named it
            r["file"] = src.shown(emb)
        out.append(r)
    return out


def row(emb: Embedding, folder: Path) -> dict:
    """The library table's facts about one embedding found in ``folder`` (also the web UI's table)."""
    step = emb.meta.get("step")
    return {
        "trigger": emb.name, "family": emb.family, "vectors": emb.num_vectors,
        "steps": step if isinstance(step, int) or (isinstance(step, str) and step.isdigit()) else None,
        "size": _size(emb.path), "hash": formats.embedding_hash(emb),
        "file": str(emb.path.relative_to(folder)) if emb.path and folder.is_dir() else str(emb.path or folder),
    }


def _check_same_family(embs: list[Embedding], what: str) -> None:
    first = embs[0]
    for e in embs[1:]:
        if e.widths != first.widths:
            raise TextinvError(f"{what}: {e.name!r} is made for {e.family} ({e.widths}), "
                               f"{first.name!r} for {first.family} ({first.widths}): cannot combine")
        if e.layers != first.layers:
            odd = e if e.layers is not None else first
            raise TextinvError(f"{what}: {odd.name!r} is a per-layer (P+) embedding and the others are not, or have "
                               "other layers: cannot combine (textinv convert --to-single makes a plain one)")
        if set(e.extra) != set(first.extra):  # OneTrainer's output embeddings: combined like the vectors, or not at all
            has = ", ".join(f"{x.name!r} {' + '.join(x.extra) or 'none'}" for x in (e, first))
            raise TextinvError(f"{what}: OneTrainer's output embeddings differ ({has}): cannot combine")


PARTS = ("vectors", "extra")  # an embedding's tensors: its vectors, and OneTrainer's output embeddings


def _combined(embs: list[Embedding], part: str, combine) -> dict:
    """``combine`` (of float tensors) applied to each key of the embeddings' ``part``."""
    return {key: combine([getattr(e, part)[key].float() for e in embs]) for key in getattr(embs[0], part)}


def merge(embs: list[Embedding], weights: list[float] | None = None, *, name: str = "merged") -> Embedding:
    """Weighted average of embeddings with the same family and vector count (default: equal weights)."""
    if len(embs) < 2:
        raise TextinvError("merge: needs at least two embeddings")
    weights = list(weights) if weights is not None else [1.0 / len(embs)] * len(embs)
    if len(weights) != len(embs):
        raise TextinvError(f"--weights: {len(weights)} weights for {len(embs)} embeddings")
    if not all(math.isfinite(w) for w in weights):
        raise TextinvError(f"--weights: not finite: {weights}")
    _check_same_family(embs, "merge")
    counts = {e.num_vectors for e in embs}
    if len(counts) != 1:
        detail = ", ".join(f"{e.name!r} {e.num_vectors}" for e in embs)
        raise TextinvError(f"merge: a weighted average needs equal vector counts ({detail}); use --concat to stack them")
    vectors, extra = (_combined(embs, part, lambda ts: sum(w * t for w, t in zip(weights, ts))) for part in PARTS)
    meta = {"merged_from": [e.name for e in embs], "merge_weights": weights}
    return Embedding(name, vectors, meta, layers=embs[0].layers, extra=extra)


def concat(embs: list[Embedding], *, name: str = "merged") -> Embedding:
    """All vectors of the embeddings, in order, as one embedding (same family required)."""
    if len(embs) < 2:
        raise TextinvError("merge: needs at least two embeddings")
    _check_same_family(embs, "merge --concat")
    total = sum(e.num_vectors for e in embs)
    if total > formats.MAX_VECTORS:
        raise TextinvError(f"merge --concat: {total} vectors, more than the {formats.MAX_VECTORS} a prompt chunk can hold")
    vectors, extra = (_combined(embs, part, lambda ts: torch.cat(ts, dim=-2)) for part in PARTS)
    return Embedding(name, vectors, {"merged_from": [e.name for e in embs]}, layers=embs[0].layers, extra=extra)


def scale(emb: Embedding, factor: float, *, name: str | None = None) -> Embedding:
    """Every vector multiplied by ``factor`` (a common way to weaken or strengthen an embedding)."""
    if not math.isfinite(factor):
        raise TextinvError(f"FACTOR: must be a finite number, got {factor}")
    meta = {k: v for k, v in emb.meta.items() if k in formats.CARRIED_META}
    return Embedding(name or emb.name, {s: t.float() * factor for s, t in emb.vectors.items()}, meta, layers=emb.layers,
                     extra={k: t.float() * factor for k, t in emb.extra.items()})  # OneTrainer's output embeddings too
