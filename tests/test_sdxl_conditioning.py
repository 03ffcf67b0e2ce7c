"""SDXL conditioning with trigger words equals AUTOMATIC1111's, on encoders configured like the real ones.

SDXL base 1.0's text encoder configs carry the legacy ``eos_token_id: 2``; transformers' CLIP then
pools at ``argmax(input_ids)``.  A1111 and ComfyUI never add token ids: they splice an embedding's
vectors in at in-vocabulary positions, so their pooled output stays at the end token.  The
reference here does exactly that — it writes the vectors into the rows of ordinary vocabulary
words and prompts with those words — and textinv's trigger words must condition the UNet the same.
"""
from __future__ import annotations

import pytest
import torch

import textinv
import textinv.tokens as tk
from textinv import prompts, training
from textinv.formats import Embedding

from conftest import make_sdxl

# Ordinary single-token words whose rows the A1111-style reference overwrites with the vectors.
SPLICE_WORDS = ["zebra", "quartz"]


def xl_embedding(n: int = 2) -> Embedding:
    g = torch.Generator().manual_seed(7)
    return Embedding("xl-cat", {"clip_l": torch.randn(n, 32, generator=g), "clip_g": torch.randn(n, 48, generator=g)})


def spliced(emb: Embedding, legacy: bool):
    """A1111's semantics: the vectors at in-vocabulary ids, the prompt naming those words."""
    pipe = make_sdxl(legacy=legacy)
    for slot, (tok, te) in zip(("clip_l", "clip_g"), tk.encoder_pairs(pipe)):
        ids = tok(" ".join(SPLICE_WORDS[: emb.num_vectors]), add_special_tokens=False).input_ids
        assert len(ids) == emb.num_vectors and max(ids) < 49407
        with torch.no_grad():
            te.get_input_embeddings().weight[ids] = emb.vectors[slot]
    return pipe, " ".join(SPLICE_WORDS[: emb.num_vectors])


def latents(pipe, prompt, **kw):
    g = torch.Generator().manual_seed(3)
    return pipe(prompt, num_inference_steps=3, generator=g, output_type="latent", **kw).images


@pytest.mark.parametrize("legacy", [True, False], ids=["eos_token_id 2 (SDXL base 1.0)", "fixed eos_token_id"])
def test_applied_trigger_conditions_sdxl_like_a1111_splicing(legacy):
    emb = xl_embedding()
    ref, words = spliced(emb, legacy)
    ours = make_sdxl(legacy=legacy)
    assert ours.text_encoder_2.config.eos_token_id == (2 if legacy else 49407)
    tk.apply(ours, emb)
    kw = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    for template in ["a photo of {}", "{}, on the moon, highly detailed"]:
        a = ours.encode_prompt(template.format("xl-cat"), **kw)
        b = ref.encode_prompt(template.format(words), **kw)
        assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[2], b[2], atol=1e-6), template
    delta = (latents(ours, "a photo of xl-cat") - latents(ref, f"a photo of {words}")).abs().max().item()
    assert delta <= 1e-5, delta
    # The weighted/long-prompt encoder (textinv generate) and the training prompt table agree too.
    a_w = prompts.encode(ours, prompts.split(ours, "a photo of (xl-cat:1.2)"))
    b_w = prompts.encode(ref, prompts.split(ref, f"a photo of ({words}:1.2)"))
    assert torch.allclose(a_w.embeds, b_w.embeds, atol=1e-6) and torch.allclose(a_w.pooled, b_w.pooled, atol=1e-6)
    hidden, pooled = training.PromptTable(ours, ["a photo of [name]"], "xl-cat", [""]).encode(
        torch.tensor([0]), torch.tensor([0]), "cpu")
    b = ref.encode_prompt(f"a photo of {words}", **kw)
    assert torch.allclose(hidden, b[0], atol=1e-6) and torch.allclose(pooled, b[2], atol=1e-6)

def test_without_the_fix_a_legacy_config_pools_at_the_trigger():
    """The failure the hook prevents, shown on transformers itself: the trigger wins the argmax."""
    emb = xl_embedding()
    ours = make_sdxl(legacy=True)
    tk.apply(ours, emb)
    enc = tk.state(ours).encoders[1]
    kw = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    fixed = ours.encode_prompt("a photo of xl-cat", **kw)[2]
    enc.pooling_fix.remove()
    broken = ours.encode_prompt("a photo of xl-cat", **kw)[2]
    assert not torch.allclose(fixed, broken, atol=1e-3)


def test_remove_takes_the_pooling_hook_away():
    pipe = make_sdxl(legacy=True)
    module = pipe.text_encoder_2.text_model
    before = dict(module._forward_hooks)
    tk.apply(pipe, xl_embedding())
    assert len(module._forward_hooks) == len(before) + 1
    tk.remove(pipe)
    assert dict(module._forward_hooks) == before


def test_generate_with_a_trigger_matches_the_spliced_reference():
    emb = xl_embedding(1)
    ref, words = spliced(emb, legacy=True)
    ours = make_sdxl(legacy=True)
    a = textinv.generate("a photo of xl-cat", embeddings=[emb], pipe=ours, steps=3, seed=5, guidance=5.0)
    b = textinv.generate(f"a photo of {words}", pipe=ref, steps=3, seed=5, guidance=5.0)
    import numpy as np

    assert np.abs(np.asarray(a.images[0], dtype=int) - np.asarray(b.images[0], dtype=int)).max() <= 1
