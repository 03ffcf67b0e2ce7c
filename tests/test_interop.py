"""Files textinv writes load in diffusers itself, with the same prompt embeddings, and back."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import textinv.tokens as tk
from textinv import formats
from textinv.formats import Embedding

from conftest import make_sd, make_sdxl


def encode(pipe, prompt):
    return pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt="low quality")


def test_textinv_file_loads_in_diffusers_with_identical_prompt_embeddings(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = Embedding("my-cat", {"clip": torch.randn(3, 32, generator=g)})
    path = formats.save(emb, tmp_path / "my-cat.safetensors")  # default format: diffusers
    theirs = make_sd()
    theirs.load_textual_inversion(str(path))  # diffusers reads the token from the file
    ours = make_sd()
    tk.apply(ours, path)
    for prompt in ["a photo of my-cat", "my-cat, on the moon"]:
        a, b = encode(ours, prompt), encode(theirs, prompt)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_diffusers_written_file_loads_in_textinv(tmp_path):
    # What diffusers' textual_inversion.py training script writes: {placeholder: [n, D]}, metadata format=pt.
    vec = torch.randn(2, 32)
    save_file({"<cat-toy>": vec}, str(tmp_path / "learned_embeds.safetensors"), metadata={"format": "pt"})
    emb = formats.load(tmp_path / "learned_embeds.safetensors")
    assert emb.source_format == "diffusers" and emb.name == "learned_embeds"
    assert torch.equal(emb.vectors["clip"], vec)
    pipe, ref = make_sd(), make_sd()
    tk.apply(pipe, emb)  # answers to the file stem (A1111 rule) and to the stored token (diffusers)
    ref.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    assert torch.equal(encode(pipe, "a <cat-toy> toy")[0], encode(ref, "a <cat-toy> toy")[0])
    assert torch.equal(encode(pipe, "a learned_embeds toy")[0], encode(ref, "a <cat-toy> toy")[0])


@pytest.mark.parametrize("legacy", [False, True], ids=["fixed eos_token_id", "eos_token_id 2"])
def test_sdxl_single_file_applies_to_both_encoders_like_diffusers_two_calls(tmp_path, legacy):
    g = torch.Generator().manual_seed(1)
    emb = Embedding("xl-cat", {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)})
    path = formats.save(emb, tmp_path / "xl-cat.safetensors", "sdxl")
    ours = make_sdxl(legacy=legacy)
    tk.apply(ours, path)
    theirs = make_sdxl(legacy=legacy)  # diffusers needs two calls, one per text encoder (its known pain point)
    theirs.load_textual_inversion(emb.vectors["clip_l"].clone(), token="xl-cat", text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(emb.vectors["clip_g"].clone(), token="xl-cat", text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
    kw = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    a, b = ours.encode_prompt("a photo of xl-cat", **kw), theirs.encode_prompt("a photo of xl-cat", **kw)
    assert torch.equal(a[0], b[0])  # the hidden states always agree
    # The pooled output agrees where the config pools at the end token.  With the legacy
    # eos_token_id 2 (SDXL base 1.0), diffusers' loader pools at the trigger (its id is the
    # largest); textinv pools at the end token, as A1111 and ComfyUI do (test_sdxl_conditioning).
    assert torch.equal(a[2], b[2]) != legacy
