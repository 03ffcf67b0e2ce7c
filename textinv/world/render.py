"""Procedural renderer of the miniature world: attributes -> RGB image + caption.

Deterministic by seed: ``sample(seed, index)`` always returns the same attributes, image and
caption.  Shapes are drawn 4x supersampled with Pillow and box-downsampled (antialiasing).
Fill patterns are aligned to the absolute 32x32 pixel grid (period 4 = one latent cell).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm import tqdm

from . import spec

SS = 4  # supersampling factor


@dataclass
class Sample:
    attrs: dict[str, str]
    image: Image.Image
    caption: str


# ---------------------------------------------------------------------------------------------
# attributes and captions
# ---------------------------------------------------------------------------------------------
def sample_rng(seed: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 7919])


def sample_attributes(rng: np.random.Generator, **fixed: str | None) -> dict[str, str]:
    """Draw a full attribute set; keyword arguments fix attributes (None = random)."""
    a: dict[str, str] = {}
    for name in spec.ATTRIBUTE_NAMES:
        a[name] = fixed.get(name) or None  # type: ignore[assignment]
    if a["shape"] is None:
        a["shape"] = str(rng.choice(spec.labels("shape")))
    if a["colour"] is None:
        if a["shape"] == spec.BIASED["shape"] and rng.random() < spec.BIASED["share"]:
            a["colour"] = spec.BIASED["colour"]
        elif a["shape"] == spec.BIASED["shape"]:
            others = [c for c in spec.labels("colour") if c != spec.BIASED["colour"]]
            a["colour"] = str(rng.choice(others))
        else:
            a["colour"] = str(rng.choice(spec.labels("colour")))
    for name in ("size", "position", "style", "background"):
        if a[name] is None:
            a[name] = str(rng.choice(spec.labels(name)))
    for name, value in a.items():
        if value not in spec.ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(spec.labels(name))}")
    return a


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def make_caption(a: dict[str, str], rng: np.random.Generator) -> str:
    """A varied English caption; unnamed shapes/styles get generic words only."""
    sh = spec.SHAPES[a["shape"]]
    st = spec.STYLES[a["style"]]
    noun = _pick(rng, sh["words"]) if sh["named"] else _pick(rng, spec.GENERIC_SHAPE_WORDS)
    pre: list[str] = []
    post: list[str] = []
    if rng.random() < spec.MENTION["size"]:
        pre.append(_pick(rng, spec.SIZES[a["size"]]["words"]))
    if rng.random() < st["mention"]:
        pre_words = st["pre"] if st["named"] else spec.GENERIC_STYLE_PRE
        post_words = st["post"] if st["named"] else spec.GENERIC_STYLE_POST
        if post_words and (not pre_words or rng.random() < 0.3):
            post.append(_pick(rng, post_words))
        else:
            pre.append(_pick(rng, pre_words))
    named_colour = rng.random() < spec.MENTION["colour"]  # drawn always: the stream stays the same
    b = spec.BIASED
    if b["others_named"] and a["shape"] == b["shape"] and a["colour"] != b["colour"]:
        named_colour = True
    if named_colour:
        pre.append(_pick(rng, spec.COLOURS[a["colour"]]["words"]))
    describe = spec.MENTION["descriptor" if sh["named"] else "descriptor_unnamed"]
    if rng.random() < describe:  # the first descriptor is the specific one
        post.insert(0, sh["desc"][0] if rng.random() < 0.75 else _pick(rng, sh["desc"]))
    if rng.random() < spec.MENTION["position"]:
        post.append(_pick(rng, spec.POSITIONS[a["position"]]["words"]))
    if rng.random() < spec.MENTION["background"]:
        post.append(_pick(rng, spec.BACKGROUNDS[a["background"]]["words"]))
    np_ = " ".join(pre + [noun])
    if post:
        np_ += " " + " ".join(post)
    text = _pick(rng, spec.TEMPLATES).format(np=np_)
    return _articles(text)


def describe(a: dict[str, str], noun: str | None = None, style: str | None = None) -> str:
    """A complete, careful caption of a render, every attribute named and no shape descriptor
    (what a user writes in an IMG.txt beside a training picture); ``noun``/``style`` stand in for
    the shape's/style's word, e.g. "[name]" for the concept being taught."""
    sh, st = spec.SHAPES[a["shape"]], spec.STYLES[a["style"]]
    noun = noun or (sh["words"][0] if sh["named"] else spec.GENERIC_SHAPE_WORDS[0])
    words = [spec.SIZES[a["size"]]["words"][0]]
    if style:
        words.append(style)
    elif a["style"] != "solid":  # plain is the default look: left unsaid
        words.append((st["pre"] if st["named"] else spec.GENERIC_STYLE_PRE)[0])
    words += [spec.COLOURS[a["colour"]]["words"][0], noun, spec.POSITIONS[a["position"]]["words"][0],
              spec.BACKGROUNDS[a["background"]]["words"][0]]
    return _articles("a " + " ".join(w for w in words if w))


def _articles(text: str) -> str:
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][:1] in "aeiou" else "a"
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# geometry (unit radius, y down), then drawing
# ---------------------------------------------------------------------------------------------
def _poly(kind: str) -> list[list[tuple[float, float]]] | None:
    if kind == "square":
        s = 0.8
        return [[(-s, -s), (s, -s), (s, s), (-s, s)]]
    if kind == "triangle":
        return [[(math.cos(t) * 1.05, math.sin(t) * 1.05 + 0.15) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]]
    if kind == "star":
        pts = []
        for i in range(10):
            r = 1.05 if i % 2 == 0 else 0.45
            t = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(t), r * math.sin(t) + 0.05))
        return [pts]
    if kind == "cross":
        w, L = 0.33, 0.95
        return [[(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w), (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w)]]
    if kind == "diamond":
        return [[(0, -1.0), (0.72, 0), (0, 1.0), (-0.72, 0)]]
    if kind == "bowtie":
        return [[(-0.95, -0.8), (0, -0.18), (0.95, -0.8), (0.95, 0.8), (0, 0.18), (-0.95, 0.8)]]
    if kind == "arrow":
        return [[(-0.95, -0.3), (0.1, -0.3), (0.1, -0.85), (0.98, 0), (0.1, 0.85), (0.1, 0.3), (-0.95, 0.3)]]
    if kind == "tee":
        return [[(-0.92, -0.88), (0.92, -0.88), (0.92, -0.34), (0.28, -0.34), (0.28, 0.92), (-0.28, 0.92), (-0.28, -0.34), (-0.92, -0.34)]]
    return None


def _shape_mask(kind: str, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """L-mode mask at supersampled resolution."""
    n = spec.IMAGE_SIZE * SS
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    ca, sa = math.cos(angle), math.sin(angle)

    def tr(p):
        x, y = p
        return ((cx + r * (x * ca - y * sa)) * SS, (cy + r * (x * sa + y * ca)) * SS)

    def disc(px, py, rr, fill=255):
        x, y = tr((px, py))
        R = rr * r * SS
        d.ellipse([x - R, y - R, x + R, y + R], fill=fill)

    polys = _poly(kind)
    if polys is not None:
        for p in polys:
            d.polygon([tr(q) for q in p], fill=255)
    elif kind in ("circle", "ball"):
        disc(0, 0, 0.95)
    elif kind == "heart":
        disc(-0.45, -0.3, 0.5)
        disc(0.45, -0.3, 0.5)
        d.polygon([tr(q) for q in [(-0.93, -0.15), (0.93, -0.15), (0, 0.95)]], fill=255)
    elif kind == "moon":
        disc(0, 0, 0.97)
        disc(0.5, -0.2, 0.8, fill=0)
    elif kind == "drop":
        disc(0, 0.32, 0.64)
        d.polygon([tr(q) for q in [(0, -1.0), (0.6, 0.12), (-0.6, 0.12)]], fill=255)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return m


def _pattern(style: str) -> np.ndarray | None:
    n = spec.IMAGE_SIZE * SS
    yy, xx = np.mgrid[0:n, 0:n] // SS  # pixel coordinates at IMAGE_SIZE
    if style == "striped":
        return (yy // 2) % 2 == 0
    if style == "checkered":
        return ((xx // 2) + (yy // 2)) % 2 == 0
    return None


_PATTERNS: dict[str, np.ndarray | None] = {}


def render_image(a: dict[str, str], rng: np.random.Generator) -> Image.Image:
    """Render attributes with small random jitter (size, position, rotation) from ``rng``."""
    S = spec.IMAGE_SIZE
    sh = spec.SHAPES[a["shape"]]
    r = spec.SIZES[a["size"]]["radius"] * float(rng.uniform(0.92, 1.08))
    cx = spec.POSITIONS[a["position"]]["x"] * S + float(rng.uniform(-1.0, 1.0))
    cy = S / 2 + float(rng.uniform(-1.5, 1.5))
    angle = math.radians(float(rng.uniform(-8, 8)))
    mask = _shape_mask(sh["kind"], cx, cy, r, angle)
    style = a["style"]
    if style != "solid":
        e = int(round(1.6 * SS))
        inner = mask.filter(ImageFilter.MinFilter(2 * e + 1))
        ring = ImageChops.subtract(mask, inner)
        if style == "outline":
            mask = ring
        else:
            if style not in _PATTERNS:
                _PATTERNS[style] = _pattern(style)
            pat = _PATTERNS[style]
            inner_np = np.asarray(inner) * pat
            mask = Image.fromarray(np.maximum(np.asarray(ring), inner_np).astype(np.uint8))
    n = S * SS
    img = Image.new("RGB", (n, n), spec.BACKGROUNDS[a["background"]]["rgb"])
    img.paste(spec.COLOURS[a["colour"]]["rgb"], (0, 0), mask)
    if sh["kind"] == "ball":  # specular highlight: what makes a ball a ball
        hl = Image.new("L", (n, n), 0)
        hd = ImageDraw.Draw(hl)
        hx, hy, hr = (cx - 0.38 * r) * SS, (cy - 0.38 * r) * SS, 0.3 * r * SS
        hd.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=235)
        img.paste((255, 255, 255), (0, 0), hl)
    return img.reduce(SS)


def sample(seed: int, index: int = 0, **fixed: str | None) -> Sample:
    """The ``index``-th sample of the world with ``seed`` (attributes may be fixed)."""
    rng = sample_rng(seed, index)
    a = sample_attributes(rng, **fixed)
    cap = make_caption(a, rng)
    img = render_image(a, rng)
    return Sample(a, img, cap)


def render_set(n: int, seed: int, progress: bool = False, **fixed) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """``n`` samples as (uint8 N×S×S×3, {attribute: int labels}, captions)."""
    S = spec.IMAGE_SIZE
    imgs = np.zeros((n, S, S, 3), np.uint8)
    labs = {k: np.zeros(n, np.int64) for k in spec.ATTRIBUTE_NAMES}
    index = {k: {v: i for i, v in enumerate(spec.labels(k))} for k in spec.ATTRIBUTE_NAMES}
    caps = []
    it = range(n)
    if progress:
        it = tqdm(it, desc="render", unit="img", mininterval=2)
    for i in it:
        s = sample(seed, i, **fixed)
        imgs[i] = np.asarray(s.image)
        for k in spec.ATTRIBUTE_NAMES:
            labs[k][i] = index[k][s.attrs[k]]
        caps.append(s.caption)
    return imgs, labs, caps
