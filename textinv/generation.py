"""Generation with trigger words: fixed-seed, batched sampling through any diffusers pipeline."""
from __future__ import annotations

import torch
from PIL import Image

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 4.0


@torch.no_grad()
def images(pipe, prompts: list[str], *, seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
           negative: str | None = None, batch: int = 32, progress: bool = False) -> list[Image.Image]:
    """One image per prompt; image ``i`` always uses seed ``seed + i``, whatever the batching."""
    from tqdm.auto import tqdm

    out: list[Image.Image] = []
    bar = tqdm(total=len(prompts), desc="generating", unit="image", disable=not progress, mininterval=0.5)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        neg = [negative] * len(chunk) if negative else None
        out += pipe(chunk, negative_prompt=neg, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
        bar.update(len(chunk))
    bar.close()
    return out
