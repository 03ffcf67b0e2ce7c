"""AUTOMATIC1111's embedding cards: an embedding's dict hidden in a PNG, twice.

(a) A text chunk ``sd-ti-embedding``: base64 of the dict's JSON, tensors as ``{"TORCHTENSOR": lists}``.
(b) The pixels, which survive metadata stripping: the zlib-compressed JSON split into low and high
    nibbles, XOR-ed with a linear congruential stream, laid out as two RGB blocks left and right of
    the visible image, each separated from it by a black column (shared/reference/embedding-formats.md).

This module only encodes and decodes; :mod:`textinv.formats` turns the dict into an Embedding.
"""
from __future__ import annotations

import base64
import colorsys
import hashlib
import json
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

KEY = "sd-ti-embedding"


class DamagedCard(ValueError):
    """A card whose text chunk is there but cannot be decoded."""


# ----------------------------------------------------------------------------------------- reading
def decode(im: Image.Image, max_bytes: int) -> bytes | None:
    """The card's JSON bytes: the text chunk first, the pixels as a fallback (A1111's order);
    None when the image holds no card."""
    text = dict(getattr(im, "text", None) or {})  # tEXt, zTXt and iTXt chunks
    if KEY in text:
        try:
            return base64.b64decode(str(text[KEY]), validate=False)
        except Exception as err:
            raise DamagedCard(f"damaged {KEY} text chunk ({err})") from None
    return bytes_from_pixels(im, max_bytes)


def loads(raw: bytes):
    """JSON with A1111's tensor objects as float32 tensors (they travel as float64 lists)."""
    def tensors(obj):
        if "TORCHTENSOR" in obj:
            return torch.from_numpy(np.array(obj["TORCHTENSOR"], dtype=np.float64)).float()
        return obj

    return json.loads(raw.decode("utf-8"), object_hook=tensors)


def bytes_from_pixels(im: Image.Image, max_bytes: int) -> bytes | None:
    """Undo the pixel encoding: None if the image holds no readable data (or more than ``max_bytes``)."""
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    lit = (arr > 0).all(axis=2)  # crop the black border: bounding box of fully lit pixels
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return None
    arr = arr[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] & 0x0F
    separators = np.flatnonzero(arr.sum(axis=(0, 2)) == 0)
    if separators.size < 2:
        return None
    low, high = arr[:, :separators[0]], arr[:, separators[-1] + 1:]
    if low.shape != high.shape or low.size == 0:
        return None
    low = low.reshape(-1) ^ lcg_nibbles(low.size)
    high = high.reshape(-1) ^ lcg_nibbles(high.size)
    stream = zlib.decompressobj()
    try:
        data = stream.decompress(((high << 4) | low).tobytes(), max_bytes)
    except zlib.error:
        return None
    if not stream.eof:
        return None  # truncated data, or more than max_bytes: not a card we read
    return data


_LCG_A, _LCG_C, _LCG_M = 1664525, 1013904223, 2**32
_lcg_cache = np.zeros(0, dtype=np.uint8)


def lcg_nibbles(count: int) -> np.ndarray:
    """Low 4 bits of A1111's generator stream (x <- a*x + c mod 2^32 from 0; output x mod 255).

    Vectorised by jumping ahead a block at a time: x[k+B] = A_B*x[k] + C_B, so the stream for a
    full-size card costs milliseconds instead of seconds of Python looping.
    """
    global _lcg_cache
    if count <= _lcg_cache.size:
        return _lcg_cache[:count]
    block = 4096
    xs, x = [], 0
    for _ in range(block):
        x = (_LCG_A * x + _LCG_C) % _LCG_M
        xs.append(x)
    jump_a, jump_c = 1, 0
    for _ in range(block):
        jump_a, jump_c = (_LCG_A * jump_a) % _LCG_M, (_LCG_A * jump_c + _LCG_C) % _LCG_M
    current = np.array(xs, dtype=np.uint64)
    parts = [current]
    for _ in range((count - 1) // block):
        current = (current * np.uint64(jump_a) + np.uint64(jump_c)) % np.uint64(_LCG_M)
        parts.append(current)
    _lcg_cache = ((np.concatenate(parts) % np.uint64(255)) & np.uint64(0x0F)).astype(np.uint8)
    return _lcg_cache[:count]


# ----------------------------------------------------------------------------------------- writing
CARD_SIZE = 512  # a title card is this square (larger for embeddings too big to fit beside it)
MIN_PREVIEW_HEIGHT = 512  # smaller previews are scaled up, so that the caption stays legible


def payload(data: dict) -> bytes:
    """The JSON a card carries for ``data`` (tensors as A1111's ``{"TORCHTENSOR": lists}``)."""
    return json.dumps(data, default=_tensor_json).encode("utf-8")


def encode(data: dict | bytes, visible: Image.Image, shade: np.ndarray) -> tuple[Image.Image, PngInfo]:
    """The card image and its text chunk for ``data`` (a dict, tensors allowed, or its
    :func:`payload`), around ``visible``.

    ``shade`` (bytes 0–255) tints the dot pattern of the data blocks (A1111 uses the first vector)."""
    text = data if isinstance(data, bytes) else payload(data)
    low, high = pixel_blocks(text, visible.height, shade)
    canvas = np.zeros((visible.height, low.shape[1] + visible.width + high.shape[1] + 2, 3), dtype=np.uint8)
    canvas[:, :low.shape[1]] = low
    canvas[:, low.shape[1] + 1:low.shape[1] + 1 + visible.width] = np.asarray(visible.convert("RGB"))
    canvas[:, canvas.shape[1] - high.shape[1]:] = high
    info = PngInfo()
    info.add_text(KEY, base64.b64encode(text).decode("ascii"))
    return Image.fromarray(canvas, "RGB"), info


def _block_width(compressed_bytes: int, height: int) -> int:
    """Width of each data block for a zlib stream of that length (the padding of :func:`pixel_blocks`)."""
    size = compressed_bytes + (height - compressed_bytes % height)
    size += 3 * height - size % (3 * height)
    return size // (3 * height)


def square_visible_size(text: bytes, side: int = CARD_SIZE) -> tuple[int, int]:
    """(width, height) of the visible part that makes the whole card square: ``side`` × ``side``
    when the data blocks leave it most of the width, else the next larger square that does."""
    compressed = len(zlib.compress(text, 9))
    while True:
        width = side - 2 * _block_width(compressed, side) - 2
        if width >= 0.6 * side:
            return width, side
        side += 256


def pixel_blocks(payload: bytes, height: int, shade: np.ndarray) -> tuple[np.ndarray, ...]:
    """The (low-half, high-half) RGB blocks hiding ``payload``: A1111's layout, cyclic padding."""
    data = np.frombuffer(zlib.compress(payload, 9), dtype=np.uint8)
    size = 3 * height * _block_width(data.size, height)
    blocks = []
    for half, pattern in ((data & 0x0F, shade), (data >> 4, shade[::-1])):
        nibbles = np.resize(half, size) ^ lcg_nibbles(size)
        block = nibbles.reshape(height, -1, 3)
        dots = _dot_pattern(block.shape[0], block.shape[1], pattern) << 4
        blocks.append(block | dots[..., None])
    return blocks[0], blocks[1]


def _dot_pattern(height: int, width: int, shade: np.ndarray) -> np.ndarray:
    """High-nibble decoration: a grid of dots shaded from the first vector, never 0.

    A nonzero high nibble keeps every data pixel "lit", so a reader's black-border crop can
    never eat into the data blocks.
    """
    y, x = np.mgrid[0:height, 0:width]
    row = (y + 6) // 8
    x_shift = x + 6 + 4 * (row % 2 == 0)
    col = x_shift // 8
    dy, dx = (y + 6) % 8 - 3, x_shift % 8 - 3
    inside = dy * dy + dx * dx <= 9
    levels = 2 + (shade.astype(np.int64) * 13 // 255)
    dot = levels[(col * (height // 8 + 2) + row) % levels.size]
    return np.where(inside, dot, 1).astype(np.uint8)


def _tensor_json(obj):
    if isinstance(obj, torch.Tensor):
        return {"TORCHTENSOR": obj.detach().cpu().float().tolist()}
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# ------------------------------------------------------------------------------------ the picture
def _hue(name: str) -> float:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[0] / 255


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255


def title_card(name: str, details: list[str], size: tuple[int, int] = (CARD_SIZE, CARD_SIZE)) -> Image.Image:
    """The visible card of an embedding without a preview: its trigger large and centred, each of
    ``details`` (e.g. model family, vector count) in small type below, on a quiet background whose
    hue comes from the name (so cards of different embeddings are told apart at a glance)."""
    w, h = size
    hue = _hue(name)
    top, bottom, glow = _rgb(hue, 0.45, 0.26), _rgb(hue + 0.06, 0.55, 0.09), _rgb(hue, 0.35, 0.42)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    t = (y / max(h - 1, 1))[..., None]
    pixels = top * (1 - t) + bottom * t
    r = np.hypot((x - w / 2) / (0.55 * w), (y - 0.44 * h) / (0.45 * h))[..., None]
    pixels += (glow - pixels) * 0.55 * np.clip(1 - r, 0, 1) ** 2  # soft light behind the title
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    scale = min(w, h) / CARD_SIZE
    margin = int(36 * scale)
    lines, font = _fit_title(draw, name, w - 2 * margin, int(88 * scale), max(int(26 * scale), 8))
    small = _font(max(int(19 * scale), 8))
    gap = int(14 * scale)
    line_h = _points(font) * 1.15
    detail_h = _points(small) * 1.5
    block = line_h * len(lines) + 2 * gap + detail_h * len(details)
    cy = 0.46 * h - block / 2 + line_h / 2
    for line in lines:
        draw.text((w / 2, cy), line, font=font, fill=(250, 250, 250), anchor="mm")
        cy += line_h
    rule_y = cy - line_h / 2 + gap
    half = min(max(draw.textlength(lines[0], font=font) * 0.35, 24 * scale), w / 2 - margin)
    draw.line((w / 2 - half, rule_y, w / 2 + half, rule_y), fill=tuple(int(c) for c in _rgb(hue, 0.35, 0.85)),
              width=max(int(2 * scale), 1))
    cy = rule_y + gap + detail_h / 2
    for text in details:
        draw.text((w / 2, cy), _clip(draw, text, small, w - 2 * margin), font=small, fill=(214, 214, 220),
                  anchor="mm")
        cy += detail_h
    return image


def _largest_fitting(draw, lines: list[str], width: float, largest: int, smallest: int):
    """The largest font from ``largest`` down to ``smallest`` in which every line fits ``width``."""
    for size in range(largest, smallest - 1, -2):
        font = _font(size)
        if all(draw.textlength(line, font=font) <= width for line in lines):
            return font
    return None


def _fit_line(draw, text: str, width: float, largest: int, smallest: int):
    """(text, font): ``text`` in the largest type that fits ``width``; at the smallest, cut short."""
    font = _largest_fitting(draw, [text], width, largest, smallest)
    if font is not None:
        return text, font
    font = _font(smallest)
    return _clip(draw, text, font, width), font


def _fit_title(draw, name: str, width: int, largest: int, smallest: int):
    """The name in the largest type that fits ``width``: one line, or two when that allows
    markedly larger type, else one line cut short."""
    one = _largest_fitting(draw, [name], width, largest, smallest)
    cut = _split_point(name)
    two = None
    if cut and (one is None or _points(one) < 0.75 * largest):
        two = _largest_fitting(draw, [name[:cut], name[cut:]], width, int(0.75 * largest), smallest)
    if two is not None and (one is None or _points(two) > 1.3 * _points(one)):
        return [name[:cut], name[cut:]], two
    if one is not None:
        return [name], one
    font = _font(smallest)
    return [_clip(draw, name, font, width)], font


def _split_point(name: str) -> int | None:
    """Where to break a long name: after the separator (space, - or _) nearest its middle."""
    cuts = [i + 1 for i, c in enumerate(name) if c in " -_." and 0 < i < len(name) - 1]
    return min(cuts, key=lambda i: abs(i - len(name) / 2)) if cuts else len(name) // 2 or None


def _clip(draw, text: str, font, width: float) -> str:
    """``text`` cut short with an ellipsis so that it fits ``width``."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def fit_preview(image: Image.Image) -> Image.Image:
    """A preview as the card shows it: RGB, whole, scaled up to :data:`MIN_PREVIEW_HEIGHT` when
    smaller (a 64-pixel sample would make an unreadable caption); by a whole factor, pixels stay
    crisp squares, as small models' renders are shown."""
    image = image.convert("RGB")
    if image.height < MIN_PREVIEW_HEIGHT:
        factor = MIN_PREVIEW_HEIGHT / image.height
        smooth = Image.NEAREST if factor.is_integer() else Image.LANCZOS
        image = image.resize((max(round(image.width * factor), 1), MIN_PREVIEW_HEIGHT), smooth)
    return image


def caption(image: Image.Image, title: str, left: str, right: str) -> Image.Image:
    """A1111's overlay on a preview: the title in a band on top; below, ``left`` (the base model)
    and ``right`` (e.g. "2 vectors · 500 steps") in a footer band."""
    image = image.convert("RGB").copy()
    w, h = image.size
    scale = max(min(w, h) / CARD_SIZE, 0.25)
    draw = ImageDraw.Draw(image, "RGBA")
    margin = max(int(14 * scale), 2)
    foot_font = _font(int(19 * scale))
    band = max(int(60 * scale), 8)
    foot = max(int(34 * scale), 6)
    draw.rectangle((0, 0, w, band), fill=(0, 0, 0, 140))
    draw.rectangle((0, h - foot, w, h), fill=(0, 0, 0, 140))
    white = (255, 255, 255)
    line, title_font = _fit_line(draw, title, w - 2 * margin, int(40 * scale), max(int(18 * scale), 6))
    draw.text((margin, band / 2), line, font=title_font, fill=white, anchor="lm")
    right_w = draw.textlength(right, font=foot_font)
    draw.text((w - margin, h - foot / 2), right, font=foot_font, fill=white, anchor="rm")
    room = w - 3 * margin - right_w
    if left and room > 0:
        draw.text((margin, h - foot / 2), _clip(draw, left, foot_font, room), font=foot_font, fill=(220, 220, 220),
                  anchor="lm")
    return image


def _font(size: int):
    try:
        return ImageFont.load_default(size=max(size, 6))
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _points(font) -> float:
    return float(getattr(font, "size", 11))  # the bitmap fallback font is about 11 pixels tall
