"""Image grids: what a person looks at after training or generating."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont


def grid(images: list[Image.Image], cols: int | None = None, labels: list[str] | None = None, label_every: int = 1,
         scale: int = 1, pad: int = 2) -> Image.Image:
    """Images in rows of ``cols``; ``labels[k]`` is written above every ``label_every``-th image's row.

    ``scale`` enlarges small images (the mini world's 32×32) with nearest-neighbour so pixels stay crisp.
    """
    if not images:
        raise ValueError("no images for the grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = -(-len(images) // cols)
    label_h = 14 if labels else 0
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad + label_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (w + pad), pad + r * (h + pad + label_h)
        if labels and i % label_every == 0:
            k = i // label_every
            if k < len(labels):
                draw.text((x, y), labels[k], fill=(0, 0, 0), font=font)
        canvas.paste(img.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (x, y + label_h))
    return canvas
