"""AUTOMATIC1111's embedding cards: an embedding's dict hidden in a PNG, twice.

(a) A text chunk ``sd-ti-embedding``: base64 of the dict's JSON, tensors as ``{"TORCHTENSOR": lists}``.
(b) The pixels, which survive metadata stripping: the zlib-compressed JSON split into low and high
    nibbles, XOR-ed with a linear congruential stream, laid out as two RGB blocks left and right of
    the visible image, each separated from it by a black column (shared/reference/embedding-formats.md).

This module only encodes and decodes; :mod:`textinv.formats` turns the dict into an Embedding.
"""
from __future__ import annotations

import base64
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
def encode(data: dict, visible: Image.Image, shade: np.ndarray) -> tuple[Image.Image, PngInfo]:
    """The card image and its text chunk for ``data`` (tensors allowed), around ``visible``.

    ``shade`` (bytes 0–255) tints the dot pattern of the data blocks (A1111 uses the first vector)."""
    text = json.dumps(data, default=_tensor_json).encode("utf-8")
    low, high = pixel_blocks(text, visible.height, shade)
    canvas = np.zeros((visible.height, low.shape[1] + visible.width + high.shape[1] + 2, 3), dtype=np.uint8)
    canvas[:, :low.shape[1]] = low
    canvas[:, low.shape[1] + 1:low.shape[1] + 1 + visible.width] = np.asarray(visible.convert("RGB"))
    canvas[:, canvas.shape[1] - high.shape[1]:] = high
    info = PngInfo()
    info.add_text(KEY, base64.b64encode(text).decode("ascii"))
    return Image.fromarray(canvas, "RGB"), info


def pixel_blocks(payload: bytes, height: int, shade: np.ndarray) -> tuple[np.ndarray, ...]:
    """The (low-half, high-half) RGB blocks hiding ``payload``: A1111's layout, cyclic padding."""
    data = np.frombuffer(zlib.compress(payload, 9), dtype=np.uint8)
    size = data.size + (height - data.size % height)
    size += 3 * height - size % (3 * height)
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


def default_image(name: str, size: int = 512) -> Image.Image:
    """A plain visible card: a dark gradient tinted by the embedding's name."""
    tint = np.frombuffer(hashlib.sha256(name.encode()).digest()[:3], dtype=np.uint8)
    ramp = np.linspace(0.15, 0.6, size)[:, None, None]
    pixels = (ramp * (64 + tint.astype(np.float64) * 0.75)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(pixels, (size, size, 3)).copy(), "RGB")


def caption(image: Image.Image, title: str, left: str, middle: str, right: str) -> Image.Image:
    """A1111's overlay: the title on top; checkpoint name, [checkpoint hash], "{n}v {steps}s" below."""
    image = image.convert("RGB").copy()
    w, h = image.size
    scale = max(min(w, h) / 512, 0.25)
    draw = ImageDraw.Draw(image, "RGBA")
    band = max(int(64 * scale), 8)
    draw.rectangle((0, 0, w, band), fill=(0, 0, 0, 150))
    draw.rectangle((0, h - band // 2, w, h), fill=(0, 0, 0, 150))
    title_font, foot_font = _font(int(48 * scale)), _font(int(20 * scale))
    margin = int(10 * scale)
    white = (255, 255, 255)
    draw.text((margin, margin // 2), title, font=title_font, fill=white)
    foot_y = h - band // 2 + margin // 2
    draw.text((margin, foot_y), left, font=foot_font, fill=white)
    draw.text((w // 2, foot_y), middle, font=foot_font, fill=white)
    draw.text((w - margin, foot_y), right, font=foot_font, fill=white, anchor="ra")
    return image


def _font(size: int):
    try:
        return ImageFont.load_default(size=max(size, 6))
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()
