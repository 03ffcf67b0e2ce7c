"""Figures for models configured like the real checkpoints (issue 13); asserts nothing.

1. SDXL with the legacy ``eos_token_id: 2`` (SDXL base 1.0's config): the largest difference in
   latents, at a seed, between an embedding applied by textinv and A1111's semantics (its vectors
   written into ordinary vocabulary rows, the prompt naming those words); beside it, diffusers'
   own ``load_textual_inversion`` on the same model.
2. Half precision on a tiny model: fp32, fp16 (loss scaling) and bf16 runs of the same training —
   NaN/inf seen, how far the vectors moved, skipped steps, the final loss scale.

Uses the test suite's tiny model builders (tests/conftest.py).  Usage: python benchmarks/real_configs.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import textinv.tokens as tk  # noqa: E402
from conftest import make_sd, make_sdxl  # noqa: E402
from textinv import training  # noqa: E402
from textinv.formats import Embedding  # noqa: E402

WORDS = ["zebra", "quartz"]


def latents(pipe, prompt):
    g = torch.Generator().manual_seed(3)
    return pipe(prompt, num_inference_steps=4, generator=g, output_type="latent").images


def sdxl_figures() -> None:
    g = torch.Generator().manual_seed(7)
    emb = Embedding("xl-cat", {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)})
    print("SDXL, an embedding in 'a photo of xl-cat' vs its vectors spliced at in-vocabulary ids (A1111/ComfyUI):")
    for legacy in (True, False):
        ref = make_sdxl(legacy=legacy)
        for slot, (tok, te) in zip(("clip_l", "clip_g"), tk.encoder_pairs(ref)):
            ids = tok(" ".join(WORDS), add_special_tokens=False).input_ids
            with torch.no_grad():
                te.get_input_embeddings().weight[ids] = emb.vectors[slot]
        want = latents(ref, f"a photo of {' '.join(WORDS)}")
        ours = make_sdxl(legacy=legacy)
        tk.apply(ours, emb)
        theirs = make_sdxl(legacy=legacy)
        for slot, (tok, te) in zip(("clip_l", "clip_g"), tk.encoder_pairs(theirs)):
            theirs.load_textual_inversion(emb.vectors[slot].clone(), token="xl-cat", tokenizer=tok, text_encoder=te)
        a = (latents(ours, "a photo of xl-cat") - want).abs().max().item()
        b = (latents(theirs, "a photo of xl-cat") - want).abs().max().item()
        label = "eos_token_id 2 (legacy, SDXL base 1.0)" if legacy else "eos_token_id 49407 (fixed)     "
        print(f"  {label}: max |Δ latents| textinv {a:.2e}   diffusers' loader {b:.2e}")


def photos(folder: Path) -> str:
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate(((40, 48), (48, 40), (24, 24))):
        a = np.full((h, w, 3), 230, np.uint8)
        a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (200, 30 + 60 * i, 30)
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return str(folder)


def precision_figures(steps: int = 40) -> None:
    print(f"\nTiny SD model, {steps} steps, batch 2, lr 5e-2, 2 vectors (the model in that precision, vectors fp32):")
    with tempfile.TemporaryDirectory() as tmp:
        images = photos(Path(tmp) / "imgs")
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            pipe = make_sd().to(dtype=dtype)
            start = training.init_vectors(pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight, "*", 2)
            res = training.train(images=images, token="<h>", vectors=2, steps=steps, batch=2, lr="5e-2", precision=name,
                                 out=str(Path(tmp) / name), pipe=pipe, progress=False)
            log = [json.loads(line) for line in (res.out / "log.jsonl").read_text().splitlines()]
            v = res.embedding.vectors["clip"]
            nan = sum(not np.isfinite(r["loss"]) for r in log) + int(not torch.isfinite(v).all())
            skipped = sum(r.get("skipped", False) for r in log)
            scale = log[-1].get("loss_scale", "-")
            print(f"  {name}: NaN/inf {nan}, |Δ vectors| max {float((v - start).abs().max()):.3f}, mean loss first/last 10 steps "
                  f"{np.mean([r['loss'] for r in log[:10]]):.4f}/{np.mean([r['loss'] for r in log[-10:]]):.4f}, "
                  f"skipped steps {skipped}, loss scale {scale}")


if __name__ == "__main__":
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # pipe.to(dtype) on the test models: diffusers' casting advice, not ours
    torch.set_num_threads(2)
    sdxl_figures()
    precision_figures()
