"""Generation helpers: fixed-seed batched sampling through any diffusers pipeline, and grids."""
from __future__ import annotations

import math

import torch
from PIL import Image

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 4.0


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
             batch: int = 32, progress: bool = False) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses generator seed ``seed + i`` (reproducible)."""
    images: list[Image.Image] = []
    it = range(0, len(prompts), batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="sample", unit="batch")
    for i in it:
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pil")
        images.extend(out.images)
    return images


def grid(images: list[Image.Image], cols: int | None = None, scale: int = 1, pad: int = 2,
         bg=(128, 128, 128)) -> Image.Image:
    """Tile images into one picture (nearest-neighbour upscaled by ``scale``)."""
    if not images:
        raise ValueError("no images")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].width * scale, images[0].height * scale
    g = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), bg)
    for k, im in enumerate(images):
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        g.paste(im, (pad + (k % cols) * (w + pad), pad + (k // cols) * (h + pad)))
    return g
