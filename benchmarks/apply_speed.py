"""How long does applying a library of embeddings take?  (issue: ≤ 1 s for 50 on CPU)

Builds a Stable Diffusion pipeline whose text encoder has the full-size SD 1.x token table
(49,408 × 768, the real CLIP tokenizer) and random small other parts, then times:
  * textinv.apply of 50 embeddings (1–4 vectors each) in one call, and one call per embedding;
  * textinv.remove of all of them;
  * diffusers' own pipe.load_textual_inversion, one call per embedding (for comparison).
Prints the figures; asserts nothing.  Usage: python benchmarks/apply_speed.py [--count 50]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import textinv.tokens as tk
from textinv.formats import Embedding
from textinv.models import MINI_PATH


def full_size_pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                                      num_attention_heads=12, max_position_embeddings=77)).eval()
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, cross_attention_dim=768,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(MINI_PATH / "tokenizer"),
                                   unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def library(count: int) -> list[Embedding]:
    g = torch.Generator().manual_seed(0)
    return [Embedding(f"emb-{i}", {"clip": torch.randn(1 + i % 4, 768, generator=g)}) for i in range(count)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(2)
    embs = library(args.count)
    vectors = sum(e.num_vectors for e in embs)
    pipe = full_size_pipe()
    print(f"{args.count} embeddings, {vectors} vectors, token table 49408×768, torch threads {torch.get_num_threads()}")

    t_one = timed(lambda: tk.apply(pipe, embs))
    prompt = "a photo of emb-7 next to emb-42, emb-3 style"
    enc = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    t_remove = timed(lambda: tk.remove(pipe))
    t_each = timed(lambda: [tk.apply(pipe, e) for e in embs])
    t_remove_each = timed(lambda: [tk.remove(pipe, e.name) for e in embs])
    print(f"textinv.apply, one call        : {t_one:7.3f} s")
    print(f"textinv.apply, one call each   : {t_each:7.3f} s")
    print(f"textinv.remove, all at once    : {t_remove:7.3f} s")
    print(f"textinv.remove, one call each  : {t_remove_each:7.3f} s")

    ref = full_size_pipe()
    t_diffusers = timed(lambda: [ref.load_textual_inversion({e.name: e.vectors["clip"].clone()}, token=e.name) for e in embs])
    print(f"diffusers load_textual_inversion, one call each: {t_diffusers:7.3f} s  ({t_diffusers / args.count:.3f} s per call)")
    same = torch.equal(enc, ref.encode_prompt(prompt, "cpu", 1, False)[0])
    print(f"same prompt embeddings as diffusers for {prompt!r}: {same}")


if __name__ == "__main__":
    main()
