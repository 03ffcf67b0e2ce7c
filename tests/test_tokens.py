"""Trigger words: apply, expand, replace mode, remove, SDXL, chunking, family errors."""
from __future__ import annotations

import types
import warnings

import pytest
import torch

import textinv.tokens as tk
from textinv.errors import ModelMismatchError, TextinvError
from textinv.formats import Embedding

from conftest import make_sd, text_encoder, tokenizer


def emb(name, n=1, width=32, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return Embedding(name, {"clip": torch.randn(n, width, generator=g)}, **kw)


def sdxl_emb(name, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Embedding(name, {"clip_l": torch.randn(n, 32, generator=g), "clip_g": torch.randn(n, 48, generator=g)})


def encode(pipe, prompt, negative=None):
    pos, neg = pipe.encode_prompt(prompt, "cpu", 1, negative is not None, negative_prompt=negative)
    return pos if negative is None else (pos, neg)


def input_rows(pipe, prompt):
    """The token vectors the text encoder sees for ``prompt`` (after trigger expansion)."""
    ids = pipe.tokenizer(tk.expand(pipe, prompt), add_special_tokens=False).input_ids
    return pipe.text_encoder.get_input_embeddings()(torch.tensor(ids))


def test_trigger_vectors_reach_the_encoder_in_all_syntaxes(sd_pipe):
    e = emb("my-cat", n=3)
    tk.apply(sd_pipe, e)
    for prompt in ["my-cat", "My-Cat", "<my-cat>", "embedding:my-cat", "embedding:my-cat.safetensors", "MY-CAT"]:
        rows = input_rows(sd_pipe, prompt)
        assert torch.equal(rows, e.vectors["clip"]), prompt
    # in context: 'a photo of' + 3 vectors + ','
    rows = input_rows(sd_pipe, "a photo of my-cat, outdoors")
    assert rows.shape[0] == 3 + 3 + 2
    assert torch.equal(rows[3:6], e.vectors["clip"])


def test_matching_is_whole_word_and_longest_wins(sd_pipe):
    cat, cat_toy = emb("cat", seed=1), emb("cat-toy", n=2, seed=2)
    tk.apply(sd_pipe, [cat, cat_toy])
    st = tk.state(sd_pipe)
    assert [h[4].embedding.name for h in st.find("a cat-toy and a cat")] == ["cat-toy", "cat"]
    assert st.find("cats, category, concat") == []
    assert torch.equal(input_rows(sd_pipe, "cat-toy"), cat_toy.vectors["clip"])


def test_pipeline_prompt_and_negative_prompt_use_the_embedding(sd_pipe):
    plain_pos, plain_neg = encode(sd_pipe, "a photo of a thing", negative="blurry thing")
    tk.apply(sd_pipe, [emb("thing", seed=3), emb("blurry", seed=4)])
    pos, neg = encode(sd_pipe, "a photo of a thing", negative="blurry thing")
    assert not torch.allclose(pos, plain_pos) and not torch.allclose(neg, plain_neg)
    images = sd_pipe("a photo of a thing", negative_prompt="blurry", num_inference_steps=2,
                     height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_same_prompt_embeddings_as_diffusers_own_loader():
    e = emb("my-cat", n=1, seed=5)
    ours = make_sd()
    tk.apply(ours, e)
    theirs = make_sd()
    theirs.load_textual_inversion({"my-cat": e.vectors["clip"][0].clone()}, token="my-cat")
    for prompt in ["a photo of my-cat", "my-cat on the beach"]:
        assert torch.equal(encode(ours, prompt), encode(theirs, prompt))


def test_multi_vector_matches_diffusers_expansion():
    e = emb("toy", n=3, seed=6)
    ours, theirs = make_sd(), make_sd()
    tk.apply(ours, e)
    theirs.load_textual_inversion({"<toy>": e.vectors["clip"].clone()}, token="<toy>")
    assert torch.equal(encode(ours, "a <toy> on a table"), encode(theirs, "a <toy> on a table"))


def test_remove_restores_tokenizer_and_table_exactly(sd_pipe):
    before_len, before_vocab = len(sd_pipe.tokenizer), sd_pipe.tokenizer.get_vocab()
    base = sd_pipe.text_encoder.get_input_embeddings()
    base_weight = base.weight.detach().clone()
    ref = encode(sd_pipe, "a photo of my-cat and a dog")
    tk.apply(sd_pipe, [emb("my-cat", n=4), emb("dog", n=2, seed=1)])
    assert len(sd_pipe.tokenizer) == before_len + 6
    assert not torch.equal(encode(sd_pipe, "a photo of my-cat and a dog"), ref)
    tk.remove(sd_pipe, "my-cat")  # partial: the other stays, multi-vector tokens all gone
    assert len(sd_pipe.tokenizer) == before_len + 2
    assert tk.state(sd_pipe, create=False).names == ["dog"]
    tk.remove(sd_pipe)
    assert len(sd_pipe.tokenizer) == before_len and sd_pipe.tokenizer.get_vocab() == before_vocab
    assert sd_pipe.text_encoder.get_input_embeddings() is base
    assert torch.equal(base.weight, base_weight)
    assert torch.equal(encode(sd_pipe, "a photo of my-cat and a dog"), ref)
    assert "maybe_convert_prompt" not in vars(sd_pipe)
    # and it can be applied again afterwards (diffusers leaves t_1… behind and then fails)
    tk.apply(sd_pipe, emb("my-cat", n=4))
    assert len(sd_pipe.tokenizer) == before_len + 4


def test_apply_remove_cycles_reuse_tokenizer_states_and_respect_outside_changes(sd_pipe, monkeypatch):
    tok = sd_pipe.tokenizer
    original = dict(vars(tok))
    cat = emb("my-cat", n=2)
    tk.apply(sd_pipe, cat)
    tk.remove(sd_pipe)
    # remove puts back the very objects the tokenizer had, not a copy of them
    assert all(vars(tok)[k] is v for k, v in original.items()) and vars(tok).keys() == original.keys()
    # the same embeddings again (textinv.generate, call after call): no tokenizer rebuilt
    loads = []
    real_loads = tk.pickle.loads
    monkeypatch.setattr(tk.pickle, "loads", lambda b: loads.append(1) or real_loads(b))
    for _ in range(3):
        tk.apply(sd_pipe, cat)
        assert torch.equal(input_rows(sd_pipe, "my-cat"), cat.vectors["clip"])
        tk.remove(sd_pipe)
    assert loads == []
    # a token someone else adds meanwhile survives the next cycle, and the triggers still work
    tok.add_tokens(["<user-word>"])
    n = len(tok)
    tk.apply(sd_pipe, cat)
    assert len(tok) == n + 2 and tok.convert_tokens_to_ids("<user-word>") == n - 1
    assert torch.equal(input_rows(sd_pipe, "my-cat"), cat.vectors["clip"])
    tk.remove(sd_pipe)
    assert len(tok) == n and tok.convert_tokens_to_ids("<user-word>") == n - 1


def test_replace_mode_changes_only_the_existing_word(sd_pipe):
    doctor = emb("doctor", seed=7)
    prompts = ["a photo of a doctor", "a photo of a nurse", "a photo of doctors", "a photo of a doctoral student"]
    before = {p: encode(sd_pipe, p) for p in prompts}
    tk.apply(sd_pipe, doctor)
    after = {p: encode(sd_pipe, p) for p in prompts}
    assert not torch.allclose(after[prompts[0]], before[prompts[0]])
    for p in prompts[1:]:
        assert torch.equal(after[p], before[p]), p
    assert torch.equal(input_rows(sd_pipe, "Doctor"), doctor.vectors["clip"])
    tk.remove(sd_pipe, "doctor")
    assert torch.equal(encode(sd_pipe, prompts[0]), before[prompts[0]])


def test_width_mismatch_names_both_families():
    sd2 = types.SimpleNamespace(tokenizer=tokenizer(), text_encoder=text_encoder(1024))
    with pytest.raises(ModelMismatchError) as err:
        tk.apply(sd2, emb("x", width=768))
    msg = str(err.value)
    assert "768-wide: made for SD 1.x" in msg and "1024-wide: SD 2.x" in msg
    assert len(sd2.tokenizer) == 49408  # nothing applied


def test_nothing_partially_applied(sd_pipe):
    good, bad = emb("good"), emb("bad", width=48)
    with pytest.raises(ModelMismatchError):
        tk.apply(sd_pipe, [good, bad])
    assert len(sd_pipe.tokenizer) == 49408
    assert not isinstance(sd_pipe.text_encoder.get_input_embeddings(), tk.TriggerEmbedding)
    nan = emb("nan")
    nan.vectors["clip"][0, 0] = float("nan")
    with pytest.raises(TextinvError, match="NaN"):
        tk.apply(sd_pipe, nan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = tk.apply(sd_pipe, [good, bad], on_mismatch="skip")
    assert [a.embedding.name for a in applied] == ["good"]
    assert any("skipped" in str(w.message) and "48-wide" in str(w.message) for w in caught)


def test_sdxl_takes_clip_l_and_clip_g(sdxl_pipe):
    e = sdxl_emb("xl-thing", n=2)
    ref = sdxl_pipe.encode_prompt("a xl-thing", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    tk.apply(sdxl_pipe, e)
    for tok, te, slot in [(sdxl_pipe.tokenizer, sdxl_pipe.text_encoder, "clip_l"),
                          (sdxl_pipe.tokenizer_2, sdxl_pipe.text_encoder_2, "clip_g")]:
        ids = tok(tk.expand(sdxl_pipe, "xl-thing"), add_special_tokens=False).input_ids
        assert torch.equal(te.get_input_embeddings()(torch.tensor(ids)), e.vectors[slot])
    out = sdxl_pipe.encode_prompt("a xl-thing", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert not torch.allclose(out[0], ref[0])
    with pytest.raises(ModelMismatchError, match="made for SD 1.x"):
        tk.apply(sdxl_pipe, emb("sd1", width=768))
    with pytest.raises(ModelMismatchError, match="made for SDXL"):
        tk.apply(make_sd(), e)
    tk.remove(sdxl_pipe)
    out = sdxl_pipe.encode_prompt("a xl-thing", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])


def test_embedding_never_straddles_a_chunk(sd_pipe):
    tk.apply(sd_pipe, emb("trio", n=3))
    filler = " ".join(["red"] * 74)
    chunks = tk.chunk_ids(sd_pipe, f"{filler} trio blue")
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    trio_ids = sd_pipe.tokenizer.convert_tokens_to_ids(tk.state(sd_pipe).applied["trio"].tokens)
    eos = sd_pipe.tokenizer.eos_token_id
    assert chunks[0][75] == eos  # padded where the embedding would have started
    assert chunks[1][1:4] == trio_ids  # whole embedding at the start of the next chunk
    # one fewer filler word: it fits exactly at the end of the first chunk
    chunks = tk.chunk_ids(sd_pipe, " ".join(["red"] * 72) + " trio")
    assert chunks[0][73:76] == trio_ids


def test_nearest_words_finds_the_word_an_embedding_copies(sd_pipe):
    table = sd_pipe.text_encoder.get_input_embeddings().weight.detach()
    star = sd_pipe.tokenizer.convert_tokens_to_ids("star</w>")
    e = Embedding("s", {"clip": table[star : star + 1].clone() + 1e-4})
    near = tk.nearest_words(e, sd_pipe, k=3)
    assert near["clip"][0][0][0] == "star" and near["clip"][0][0][1] > 0.99


def test_shipped_clip_tokenizer_is_the_real_49408_token_vocabulary():
    tok = tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a red star").input_ids == [49406, 320, 1125, 539, 320, 736, 1565, 49407]


def test_a_half_precision_pipeline_keeps_its_dtype_while_triggers_are_applied(sd_pipe):
    # transformers reads a model's dtype off its first parameter; the float32 trigger rows must not be it,
    # or diffusers casts the prompt embeddings and latents to float32 and the half-precision UNet fails.
    sd_pipe.to(dtype=torch.float16)
    tk.apply(sd_pipe, emb("thing", n=2))
    assert sd_pipe.text_encoder.dtype == torch.float16
    assert sd_pipe.text_encoder.get_input_embeddings().extra.dtype == torch.float32
    out = sd_pipe("a thing", num_inference_steps=1, output_type="latent").images
    assert out.dtype == torch.float16
