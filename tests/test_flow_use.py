"""Trigger words in SD3 and Flux.1 pipelines, against a reference that splices the vectors per token.

The reference is what ComfyUI does with an embedding (comfy/sd1_clip.py, per tokenizer): the text
around the trigger is tokenised on its own, the embedding's vectors take the trigger's place as
rows of the token-embedding output, and an encoder the file has no part for gets no trigger at all.
It is written here with plain tokenizers and a forward hook, with diffusers' start/end tokens and
padding (CLIP: 77 tokens; T5: ``max_sequence_length``), and the conditioning is assembled as
diffusers' pipelines do.  textinv's applied pipeline must give exactly the same tensors (max |Δ| = 0),
and the same latents at a fixed seed; ``remove`` must give the untouched pipeline back.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import textinv
import textinv.tokens as tk
from textinv import families, prompts
from textinv.formats import Embedding

from tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

STEPS = dict(num_inference_steps=2, height=32, width=32, output_type="latent")


def emb(name, pipe, n, seed, parts=None):
    """An embedding of ``n`` random vectors for the pipeline's encoders (or only ``parts``)."""
    g = torch.Generator().manual_seed(seed)
    slots = [e for e in tk.state(pipe).encoders if parts is None or e.slot in parts]
    return Embedding(name, {e.slot: torch.randn(n, e.width, generator=g) * 0.3 for e in slots})


# ------------------------------------------------------------------------------------- the reference
def spliced(tok, kind: str, prompt: str, embeddings: dict[str, torch.Tensor | None], length: int):
    """(ids, {position: vector}) of ``prompt`` as ComfyUI tokenises it for one encoder: words that
    are trigger names give their vectors (none when the embedding has no part for this encoder),
    the text between them is tokenised piece by piece; then diffusers' specials and padding."""
    ids, rows, text = [], {}, []
    placeholder = tok.convert_tokens_to_ids(tok.tokenize("photo"))[0]  # any in-vocabulary id that ends nothing

    def flush():
        if text:
            ids.extend(tok(" ".join(text), add_special_tokens=False)["input_ids"])
            text.clear()

    for word in prompt.split(" "):
        if word in embeddings:
            flush()
            for v in embeddings[word] if embeddings[word] is not None else []:
                rows[len(ids)] = v
                ids.append(placeholder)
        else:
            text.append(word)
    flush()
    if kind == "clip":  # a start token first: every row moves one on
        ids = ([tok.bos_token_id] + ids)[: length - 1] + [tok.eos_token_id]
        rows = {p + 1: v for p, v in rows.items()}
    else:
        ids = ids[: length - 1] + [tok.eos_token_id]
    ids = ids + [tok.pad_token_id] * (length - len(ids))
    return torch.tensor([ids]), {p: v for p, v in rows.items() if p < length - 1}


def run_spliced(te, ids, rows, **kwargs):
    """The text encoder on ``ids`` with the token-embedding rows at ``rows`` replaced."""
    def hook(module, args, out):
        out = out.clone()
        for p, v in rows.items():
            out[0, p] = v.to(out.dtype)
        return out

    handle = te.get_input_embeddings().register_forward_hook(hook)
    try:
        return te(ids, **kwargs)
    finally:
        handle.remove()


@torch.no_grad()  # as the pipelines run: autograd-free kernels differ in the last bits
def reference(pipe, prompt: str, embs: list[Embedding], t5_length: int):
    """(prompt_embeds, pooled) as diffusers' SD3/Flux pipelines assemble them, from spliced encoders."""
    family = families.of_pipeline(pipe)
    outs = {}
    for slot in family.slots:
        tok, te = getattr(pipe, slot.tokenizer), getattr(pipe, slot.text_encoder)
        vectors = {e.name: (e.vectors[slot.key].float() if slot.key in e.vectors else None) for e in embs}
        ids, rows = spliced(tok, slot.kind, prompt, vectors, 77 if slot.kind == "clip" else t5_length)
        out = run_spliced(te, ids, rows, output_hidden_states=slot.kind == "clip")
        outs[slot.key] = out
    if family is families.FLUX:
        return outs["t5"][0], outs["clip_l"].pooler_output
    clip = torch.cat([outs["clip_l"].hidden_states[-2], outs["clip_g"].hidden_states[-2]], dim=-1)
    t5 = outs["t5"][0]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([outs["clip_l"][0], outs["clip_g"][0]], dim=-1)


@torch.no_grad()
def encode(pipe, prompt, negative=None, t5_length=77):
    if families.of_pipeline(pipe) is families.SD3:
        pe, ne, pp, npp = pipe.encode_prompt(prompt, None, None, negative_prompt=negative or "",
                                             do_classifier_free_guidance=True, max_sequence_length=t5_length)
        return pe, pp, ne, npp
    pe, pp, _ = pipe.encode_prompt(prompt, None, max_sequence_length=t5_length)
    return pe, pp


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


@pytest.fixture(params=["sd3", "flux"])
def pipe(request, sd3, flux):
    p = {"sd3": sd3, "flux": flux}[request.param]
    yield p
    tk.remove(p)


# ------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("t5_length", [77, 256])
def test_conditioning_equals_the_per_token_splice_reference(pipe, t5_length):
    cat, dog = emb("mycat", pipe, 2, seed=1), emb("mydog", pipe, 3, seed=2)
    prompt = "a photo of mycat and mydog on the beach, watercolor style"
    textinv.apply(pipe, [cat, dog])
    got = encode(pipe, prompt, t5_length=t5_length)
    want = reference(pipe, prompt, [cat, dog], t5_length)
    assert got[0].shape == want[0].shape
    assert (got[0] - want[0]).abs().max().item() == 0 and (got[1] - want[1]).abs().max().item() == 0
    # ... and it is not the prompt without them
    tk.remove(pipe)
    plain = encode(pipe, prompt, t5_length=t5_length)
    assert (plain[0] - want[0]).abs().max().item() > 1e-3


def test_negative_prompts_take_triggers_too_in_sd3(sd3):
    bad = emb("blurry-thing", sd3, 1, seed=3)
    textinv.apply(sd3, bad)
    try:
        pe, pp, ne, npp = encode(sd3, "a photo of a cat", negative="blurry-thing low quality")
        want = reference(sd3, "blurry-thing low quality", [bad], 77)
        assert (ne - want[0]).abs().max().item() == 0 and (npp - want[1]).abs().max().item() == 0
    finally:
        tk.remove(sd3)


# Flux.1's CLIP part alone would be one 768-wide tensor: an SD 1.x file (see the formats tests).
@pytest.mark.parametrize("which, part", [("sd3", "clip"), ("sd3", "t5"), ("flux", "t5")])
def test_a_partial_embedding_leaves_its_trigger_out_of_the_encoders_it_lacks(which, part, request):
    pipe = request.getfixturevalue(which)
    keys = [e.slot for e in tk.state(pipe).encoders if (e.kind == "t5") == (part == "t5")]
    only = emb("mycat", pipe, 2, seed=4, parts=keys)
    with pytest.warns(UserWarning, match="has no .* part: its trigger is left out"):
        textinv.apply(pipe, only)
    got = encode(pipe, "a photo of mycat on the beach")
    want = reference(pipe, "a photo of mycat on the beach", [only], 77)
    tk.remove(pipe)
    assert (got[0] - want[0]).abs().max().item() == 0 and (got[1] - want[1]).abs().max().item() == 0


def test_latents_at_a_fixed_seed_equal_the_references(pipe):
    cat = emb("mycat", pipe, 2, seed=5)
    prompt = "a photo of mycat in the garden"
    textinv.apply(pipe, cat)
    sd3 = families.of_pipeline(pipe) is families.SD3
    extra = dict(guidance_scale=3.5, max_sequence_length=77)
    got = pipe(prompt, negative_prompt="" if sd3 else None, generator=torch.Generator().manual_seed(0),
               **STEPS, **extra).images
    pe, pp = reference(pipe, prompt, [cat], 77)
    given = dict(prompt_embeds=pe, pooled_prompt_embeds=pp)
    if sd3:
        ne, npp = reference(pipe, "", [cat], 77)
        given |= dict(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npp)
    tk.remove(pipe)
    want = pipe(generator=torch.Generator().manual_seed(0), **given, **STEPS, **extra).images
    assert torch.equal(got, want)


def test_each_tokenizer_learns_the_word_and_remove_gives_the_pipeline_back(pipe):
    st = tk.state(pipe)
    before = [len(e.tokenizer) for e in st.encoders]
    modules = [e.text_encoder.get_input_embeddings() for e in st.encoders]
    plain = encode(pipe, "a photo of mycat on the beach")
    textinv.apply(pipe, emb("mycat", pipe, 2, seed=6))
    for i, e in enumerate(st.encoders):
        text = st.expand("a photo of mycat on the beach", i)
        pieces = e.tokenizer.tokenize(text)
        inner = [p.strip() for p in pieces if "<|ti:" in p]
        assert inner == ["<|ti:mycat:0|>", "<|ti:mycat:1|>"], (e.slot, pieces)  # one token per vector
        if e.kind == "t5":
            ids = e.tokenizer(text)["input_ids"]
            assert ids[-1] == e.tokenizer.eos_token_id == 1 and e.tokenizer.pad_token_id == 0
            first = next(k for k, p in enumerate(pieces) if "<|ti:" in p)
            assert pieces[first - 1] == "▁of"  # no lone word-start piece before the trigger's tokens
            # the same ids as the words tokenised one by one around the trigger (ComfyUI's way)
            words = e.tokenizer("a photo of", add_special_tokens=False)["input_ids"]
            rest = e.tokenizer("on the beach", add_special_tokens=False)["input_ids"]
            trig = e.tokenizer.convert_tokens_to_ids(["<|ti:mycat:0|>", "<|ti:mycat:1|>"])
            assert ids == words + trig + rest + [1]
            back = e.tokenizer.decode(ids, skip_special_tokens=True)  # round trip: the same ids again
            assert e.tokenizer(back)["input_ids"] == ids and "<|ti:mycat:1|>" in back
    tk.remove(pipe)
    assert [len(e.tokenizer) for e in st.encoders] == before
    assert [e.text_encoder.get_input_embeddings() for e in st.encoders] == modules
    again = encode(pipe, "a photo of mycat on the beach")
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    assert "_get_clip_prompt_embeds" not in vars(pipe) and "maybe_convert_prompt" not in vars(pipe)


def test_long_prompts_keep_the_trigger_in_t5_beyond_clips_77_tokens(pipe):
    cat = emb("mycat", pipe, 2, seed=7)
    prompt = " ".join(["a red flower"] * 30) + " mycat"  # beyond CLIP's 77 tokens, within T5's 256
    textinv.apply(pipe, cat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers says that CLIP truncated the prompt
        got = encode(pipe, prompt, t5_length=256)
    want = reference(pipe, prompt, [cat], 256)
    assert (got[0] - want[0]).abs().max().item() == 0
    t5 = next(e for e in tk.state(pipe).encoders if e.kind == "t5")
    ids = t5.tokenizer(tk.expand(pipe, prompt, tk.state(pipe).encoders.index(t5)))["input_ids"]
    assert t5.tokenizer.convert_tokens_to_ids("<|ti:mycat:0|>") in ids[:255]


def test_a_width_mismatch_names_both_families(pipe):
    xl = Embedding("xl-cat", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})
    with pytest.raises(textinv.ModelMismatchError, match="made for SDXL"):
        textinv.apply(pipe, xl)
    assert tk.state(pipe).applied == {}


# --------------------------------------------------------------------------------- prompt weights
@pytest.mark.parametrize("t5_length", [77, 256])
def test_unweighted_prompts_encode_as_the_pipeline_does(pipe, t5_length):
    textinv.apply(pipe, [emb("mycat", pipe, 2, seed=8), emb("mydog", pipe, 1, seed=9)])
    prompt = "a photo of mycat and mydog on the beach, watercolor style"
    got = prompts.encode_flow(pipe, prompts.split(pipe, prompt), t5_length)
    want = encode(pipe, prompt, t5_length=t5_length)
    assert torch.equal(got.embeds, want[0]) and torch.equal(got.pooled, want[1])


def test_weights_move_tokens_away_from_the_empty_prompt_as_comfyui_does(pipe):
    """(mycat:1.5) and [beach] (0.9): each weighted token's state is (z - z_empty) * w + z_empty,
    z_empty the empty prompt's state at that position; every other token and the pooled are as unweighted."""
    cat = emb("mycat", pipe, 2, seed=10)
    textinv.apply(pipe, cat)
    plain = prompts.encode_flow(pipe, prompts.split(pipe, "a photo of mycat on the beach"), 77)
    weighted = prompts.encode_flow(pipe, prompts.split(pipe, "a photo of (mycat:1.5) on the [beach]"), 77)
    assert torch.equal(weighted.pooled, plain.pooled)
    empty = prompts.encode_flow(pipe, prompts.split(pipe, ""), 77)  # the empty prompt, same layout
    family = families.of_pipeline(pipe)
    for i, e in enumerate(tk.state(pipe).encoders):
        offset = {"clip_l": 0, "clip_g": 0, "t5": 77 if family is families.SD3 else 0}[e.slot]
        ids = e.tokenizer(tk.expand(pipe, "a photo of mycat on the beach", i), add_special_tokens=False)["input_ids"]
        start = 1 if e.kind == "clip" else 0
        cat_at = [start + k for k, t in enumerate(ids) if t >= len(e.tokenizer) - 2]
        beach_at = start + len(ids) - 1
        if e.slot == "clip_g" or (family is families.FLUX and e.kind == "clip"):
            continue  # SD3: clip_l and clip_g share positions (checked through clip_l's columns); Flux: pooled only
        cols = slice(0, tk.state(pipe).encoders[0].width) if e.kind == "clip" else slice(None)
        for pos, w in [(cat_at[0], 1.5), (cat_at[1], 1.5), (beach_at, 1 / 1.1)]:
            z, z0 = plain.embeds[0, offset + pos, cols], empty.embeds[0, offset + pos, cols]
            assert torch.allclose(weighted.embeds[0, offset + pos, cols], (z - z0) * w + z0, atol=1e-6), (e.slot, pos)
        same = [p for p in range(5) if p not in cat_at + [beach_at]]
        assert torch.equal(weighted.embeds[0, [offset + p for p in same], cols], plain.embeds[0, [offset + p for p in same], cols])


# --------------------------------------------------------------------------------- textinv generate
@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_generate_uses_triggers_and_weights_on_flow_pipelines(which, request, tmp_path):
    pipe = request.getfixturevalue(which)
    cat = emb("mycat", pipe, 2, seed=11)
    kw = dict(pipe=pipe, embeddings=[cat], n=2, steps=2, size="32x32", seed=3)
    plain = textinv.generate("a photo of a cat in the garden", **kw).images
    with_cat = textinv.generate("a photo of mycat in the garden", **kw)
    weighted = textinv.generate("a photo of (mycat:1.3) in the garden", **kw).images
    again = textinv.generate("a photo of (mycat:1.0) in the garden", **kw).images  # weights of 1: as written plainly
    assert with_cat.used == ["mycat"] and tk.state(pipe, create=False) is None  # applied for the call only
    differ = lambda a, b: any(x.tobytes() != y.tobytes() for x, y in zip(a, b))  # noqa: E731
    assert differ(plain, with_cat.images) and differ(with_cat.images, weighted)
    assert not differ(with_cat.images, again)
    if which == "flux":
        with pytest.warns(UserWarning, match="Flux.1 takes no negative prompt"):
            textinv.generate("a photo of mycat", "blurry", **kw)
    with pytest.raises(textinv.TextinvError, match="--sampler Euler a: A1111's samplers are for SD"):
        textinv.generate("a photo of mycat", sampler="Euler a", **kw)


def test_onetrainer_output_embeddings_replace_the_t5_output_at_the_trigger(flux, tmp_path):
    """OneTrainer saves an output embedding's input vectors as zeros and the learned ones as
    ``t5_out``, and puts those in place of T5's output at the trigger's tokens."""
    t5 = tk.state(flux).encoders[1]
    g = torch.Generator().manual_seed(12)
    out = torch.randn(2, t5.width, generator=g)
    from safetensors.torch import save_file
    save_file({"clip_l": torch.randn(2, 32, generator=g), "t5": torch.zeros(2, t5.width), "t5_out": out},
              str(tmp_path / "ot.safetensors"))
    loaded = textinv.load(tmp_path / "ot.safetensors")
    assert torch.equal(loaded.extra["t5_out"], out)
    prompt = "a photo of ot on the beach"
    want = reference(flux, prompt, [loaded], 77)
    textinv.apply(flux, loaded)
    got = encode(flux, prompt, t5_length=77)
    ids = t5.tokenizer(tk.expand(flux, prompt, 1))["input_ids"]
    at = [k for k, i in enumerate(ids) if i >= len(t5.tokenizer) - 2]
    assert len(at) == 2 and torch.equal(got[0][0, at], out)  # the learned output vectors, exactly
    others = [k for k in range(77) if k not in at]
    assert torch.equal(got[0][0, others], want[0][0, others]) and torch.equal(got[1], want[1])
    tk.remove(flux)
    assert tk.state(flux, create=False) is None and not t5.text_encoder._forward_hooks
