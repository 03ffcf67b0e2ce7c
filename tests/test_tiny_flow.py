"""The tiny SD3 / Flux.1 pipelines and the small T5 tokenizer of tests/tiny_flow.py behave like the real ones.

Expected token pieces below were produced by the real FLUX.1-dev / SD3 medium T5 tokenizers (loaded
offline from copies of their files with transformers 5.25); see tiny_flow's docstring for the source.
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch
import transformers
from tokenizers import AddedToken

from textinv import families

from tiny_flow import (CLIP_G, CLIP_L, REAL_FLUX, REAL_FLUX_SCHNELL, REAL_FLUX_SIZES, REAL_SD3, REAL_SD3_SIZES,
                       REAL_T5_JSON, REAL_T5_TOKENIZER, T5_SURPLUS_ROWS, T5_WIDTH, t5_json_backend, t5_tokenizer,
                       tiny_flux_pipeline, tiny_sd3_pipeline, tiny_t5_encoder)

FAMILIES = ["flux", "sd3"]
# Prompt -> the real T5 tokenizer's pieces (identical for FLUX.1 and SD3).
REAL_PIECES = {
    "a photo of a cat": ["▁", "a", "▁photo", "▁of", "▁", "a", "▁cat"],
    "a photo of a cat on the beach, watercolor style":
        ["▁", "a", "▁photo", "▁of", "▁", "a", "▁cat", "▁on", "▁the", "▁beach", ",", "▁watercolor", "▁style"],
    " two  spaces here ": ["▁two", "▁spaces", "▁here"],
    "Hello world!": ["▁Hello", "▁world", "!"],
    "A cat.": ["▁A", "▁cat", "."],
    # the normalizer: tabs, zero-width spaces and a literal "▁" are spaces, control characters go,
    # fullwidth letters fold (NFKC)
    "a\tphoto\u200bof\u2581a cat": ["▁", "a", "▁photo", "▁of", "▁", "a", "▁cat"],
    "x\x07y": ["▁", "x", "y"],
    "Ｈｅｌｌｏ ｗｏｒｌｄ": ["▁Hello", "▁world"],
}
TRIGGER = "<|ti:x:0|>"


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def sd3_again():
    """A second SD3 pipeline built with the same seed."""
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def flux(request):
    return tiny_flux_pipeline(guidance=request.param)


# ------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("family", FAMILIES)
def test_t5_tokenizer_has_the_real_conventions(family):
    tok, real = t5_tokenizer(family=family), REAL_T5_TOKENIZER
    assert isinstance(tok, transformers.T5TokenizerFast) and type(tok).__name__ == real["tokenizer_class"]
    for key in ("pad_token", "pad_token_id", "eos_token", "eos_token_id", "unk_token", "unk_token_id", "model_max_length"):
        assert getattr(tok, key) == real[key], key
    ids = tok("a cat")["input_ids"]
    assert ids[-1] == 1 and ids.count(1) == 1 and 0 not in ids  # </s> appended once, no padding
    assert tok("a {cat}")["input_ids"].count(real["unk_token_id"]) == 2
    # The 100 sentinels are the last entries, <extra_id_99> first, as in the real vocabulary.
    extras = [f"<extra_id_{i}>" for i in range(99, -1, -1)]
    assert tok.convert_tokens_to_ids(extras) == list(range(len(tok) - 100, len(tok)))
    assert real["first_extra"][1] == real["entries"] - 100 and real["last_extra"][1] == real["entries"] - 1
    assert len(tok) == tok.vocab_size < tiny_t5_encoder(len(tok) + T5_SURPLUS_ROWS).get_input_embeddings().num_embeddings
    backend = json.loads(tok.backend_tokenizer.to_str())
    assert backend["pre_tokenizer"] == real["loaded_pre_tokenizer"] and backend["decoder"] == real["loaded_decoder"]
    assert tuple(next(iter(p.values()))["id"] for p in backend["post_processor"]["single"]) == real["post_processor_single"]
    sentinel = next(t for t in backend["added_tokens"] if t["content"] == "<extra_id_0>")
    assert sentinel["lstrip"] is sentinel["rstrip"] is REAL_T5_JSON[family]["sentinel_strip"] and sentinel["special"]


@pytest.mark.parametrize("prompt", REAL_PIECES)
def test_t5_tokenizer_splits_prompts_into_the_real_pieces(prompt):
    tok = t5_tokenizer()
    assert tok.tokenize(prompt) == REAL_PIECES[prompt]  # "▁" starts each word; "a" is "▁" + "a", as in the real one
    assert tok.tokenize("a cat") == ["▁", "a", "▁cat"]
    assert tok.unk_token_id not in tok(prompt)["input_ids"]


def test_t5_tokenizer_decodes_ordinary_text_back():
    tok = t5_tokenizer()
    for text in ["a photo of a cat on the beach, watercolor style", "Hello world! 42 (x+y)*z = #tag @home",
                 "zebra quixotic jumps", "A B C"]:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
        assert tok.unk_token_id not in tok(text)["input_ids"]


def test_t5_tokenizer_pickles_and_tokenises_identically():
    tok = t5_tokenizer()
    tok.add_tokens([AddedToken(TRIGGER, normalized=False, lstrip=False, rstrip=False, single_word=False, special=False)])
    back = pickle.loads(pickle.dumps(tok))
    for text in [*REAL_PIECES, f"a photo of {TRIGGER} dog", "ﬁsh {x} ~", "<extra_id_3> end"]:
        assert back(text)["input_ids"] == tok(text)["input_ids"]
        assert back.decode(back(text)["input_ids"]) == tok.decode(tok(text)["input_ids"])
    assert len(back) == len(tok) and back.model_max_length == 512


# AddedToken experiment.  With transformers 5 (WhitespaceSplit + Metaspace "always"), every lstrip/rstrip
# setting gives the trigger as one token with no stray "▁" piece, equal to word-by-word tokenisation (as
# ComfyUI does it) -- the real FLUX.1 and SD3 tokenizers give exactly these pieces too.  Loading the real
# tokenizer.json verbatim (transformers 4, tokenizers.Tokenizer.from_file) keeps FLUX's Metaspace
# prepend_scheme "first": there rstrip=True eats the space the next word's "▁" comes from ("dog", not
# "▁dog"), so only rstrip=False is safe everywhere.
def _word_wise(encode, trigger_id, prompt):
    return [i for w in prompt.split() for i in ([trigger_id] if w == TRIGGER else encode(w))] + [1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lstrip", [False, True])
@pytest.mark.parametrize("rstrip", [False, True])
def test_added_trigger_is_one_token_without_a_stray_metaspace(family, lstrip, rstrip):
    tok = t5_tokenizer(family=family)
    tok.add_tokens([AddedToken(TRIGGER, normalized=False, lstrip=lstrip, rstrip=rstrip, single_word=False, special=False)])
    tid = tok.convert_tokens_to_ids(TRIGGER)
    assert tid == len(tok) - 1
    for prompt, pieces in [(f"a photo of {TRIGGER} dog", ["▁", "a", "▁photo", "▁of", TRIGGER, "▁dog", "</s>"]),
                           (f"{TRIGGER} dog", [TRIGGER, "▁dog", "</s>"]),
                           (f"a photo of {TRIGGER}", ["▁", "a", "▁photo", "▁of", TRIGGER, "</s>"])]:
        ids = tok(prompt)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == pieces
        assert ids == _word_wise(lambda w: tok(w, add_special_tokens=False)["input_ids"], tid, prompt)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lstrip", [False, True])
@pytest.mark.parametrize("rstrip", [False, True])
def test_added_trigger_with_the_tokenizer_json_loaded_verbatim(family, lstrip, rstrip):
    raw = t5_json_backend(t5_tokenizer(family=family), family)
    raw.add_tokens([AddedToken(TRIGGER, normalized=False, lstrip=lstrip, rstrip=rstrip, single_word=False, special=False)])
    tid, prompt = raw.token_to_id(TRIGGER), f"a photo of {TRIGGER} dog"
    ids = raw.encode(prompt).ids
    word_wise = _word_wise(lambda w: raw.encode(w, add_special_tokens=False).ids, tid, prompt)
    breaks = family == "flux" and rstrip
    assert (ids == word_wise) is not breaks
    assert ("▁dog" in [raw.id_to_token(i) for i in ids]) is not breaks  # "dog" lost its word start
    assert ids.count(tid) == 1 and ids[:4] == word_wise[:4]


# ----------------------------------------------------------------------------------------- configs
def _carried(pipe, real: dict):
    for name, values in real.items():
        part = getattr(pipe, name)
        config = part if name.startswith("tokenizer") else part.config
        for key, value in values.items():
            yield f"{name}.{key}", getattr(config, key), value


def test_sd3_configs_carry_the_real_values(sd3):
    for where, tiny, real in _carried(sd3, REAL_SD3):
        assert tiny == real, where
    assert type(sd3.text_encoder).__name__ == type(sd3.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(sd3.text_encoder_3).__name__ == "T5EncoderModel" and type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sd3.tokenizer_2.convert_tokens_to_ids("!") == 0


def test_flux_configs_carry_the_real_values(flux):
    real = REAL_FLUX if flux.transformer.config.guidance_embeds else REAL_FLUX_SCHNELL
    for where, tiny, value in _carried(flux, real):
        assert tiny == value, where
    assert type(flux.text_encoder).__name__ == "CLIPTextModel" and type(flux.text_encoder_2).__name__ == "T5EncoderModel"


def test_widths_are_tiny_distinct_and_related_as_in_the_real_models(sd3, flux):
    r = REAL_SD3_SIZES
    assert r["joint_attention_dim"] == r["t5"] >= r["clip_l"] + r["clip_g"]
    assert r["pooled_projection_dim"] == r["clip_l_projection"] + r["clip_g_projection"]
    t = sd3.transformer.config
    l, g, t5 = sd3.text_encoder.config, sd3.text_encoder_2.config, sd3.text_encoder_3.config
    assert (l.hidden_size, g.hidden_size, t5.d_model) == (CLIP_L, CLIP_G, T5_WIDTH)
    assert t.joint_attention_dim == t5.d_model >= l.hidden_size + g.hidden_size
    assert t.pooled_projection_dim == l.projection_dim + g.projection_dim
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    assert sd3.vae_scale_factor == 2 ** (r["vae_blocks"] - 1) == 8
    assert t5.vocab_size == len(sd3.tokenizer_3) + T5_SURPLUS_ROWS == sd3.text_encoder_3.get_input_embeddings().num_embeddings
    f, fr = flux.transformer.config, REAL_FLUX_SIZES
    assert fr["joint_attention_dim"] == fr["t5"] and fr["pooled_projection_dim"] == fr["clip_l"]
    assert sum(fr["axes_dims_rope"]) == fr["attention_head_dim"] and fr["in_channels"] == 4 * REAL_FLUX["vae"]["latent_channels"]
    assert f.joint_attention_dim == flux.text_encoder_2.config.d_model == T5_WIDTH
    assert f.pooled_projection_dim == flux.text_encoder.config.hidden_size == CLIP_L
    assert sum(f.axes_dims_rope) == f.attention_head_dim and f.in_channels == 4 * flux.vae.config.latent_channels
    assert flux.vae_scale_factor == 8
    real_widths = {768, 1024, 1280, 2048, 4096}
    assert not {CLIP_L, CLIP_G, T5_WIDTH} & real_widths and len({CLIP_L, CLIP_G, T5_WIDTH}) == 3



def test_textinv_recognises_the_tiny_pipelines_by_their_encoders(sd3, flux):
    assert families.of_pipeline(sd3) is families.SD3 and families.of_pipeline(flux) is families.FLUX
    assert families.pipeline_widths(sd3, families.SD3) == [CLIP_L, CLIP_G, T5_WIDTH]
    assert families.model_name(families.FLUX, families.pipeline_widths(flux, families.FLUX)) == f"{CLIP_L}+{T5_WIDTH}-wide model"


# --------------------------------------------------------------------------------- encoding, sampling
@pytest.mark.parametrize("length", [77, 256, 512])
def test_sd3_encodes_prompts_with_negatives(sd3, length):
    pe, npe, pooled, npooled = sd3.encode_prompt("a photo of a cat", None, None, negative_prompt="blurry",
                                                 do_classifier_free_guidance=True, max_sequence_length=length)
    assert pe.shape == npe.shape == (1, 77 + length, T5_WIDTH) and pooled.shape == npooled.shape == (1, CLIP_L + CLIP_G)
    assert not torch.equal(pe, npe) and not torch.equal(pooled, npooled)
    assert torch.all(pe[:, :77, CLIP_L + CLIP_G:] == 0)  # CLIP's output zero-padded to T5's width
    ids = sd3.tokenizer_3("a photo of a cat", padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").input_ids
    assert ids[0, 8].item() == 0 and ids[0, 7].item() == 1  # 7 pieces, </s>, then <pad>
    with torch.no_grad():
        assert torch.allclose(pe[:, 77:], sd3.text_encoder_3(ids)[0], atol=1e-5)


@pytest.mark.parametrize("length", [77, 256, 512])
def test_flux_encodes_prompts(flux, length):
    pe, pooled, text_ids = flux.encode_prompt("a photo of a cat", None, max_sequence_length=length)
    assert pe.shape == (1, length, T5_WIDTH) and pooled.shape == (1, CLIP_L) and text_ids.shape == (length, 3)
    other, other_pooled, _ = flux.encode_prompt("a watercolor dog", None, max_sequence_length=length)
    assert not torch.equal(pe, other) and not torch.equal(pooled, other_pooled)


def _latents(pipe, seed=0):
    return pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def test_sd3_samples_reproducibly(sd3, sd3_again):
    a = _latents(sd3)
    assert a.shape == (1, 16, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, _latents(sd3_again))  # a fresh pipeline, same seed: the same latents
    assert not torch.equal(a, _latents(sd3, seed=1)) and not torch.equal(a, _latents(tiny_sd3_pipeline(seed=1)))


def test_flux_samples_reproducibly(flux):
    guidance = flux.transformer.config.guidance_embeds
    a = _latents(flux)
    assert a.shape == (1, 4, 64) and torch.isfinite(a).all()  # packed: 2x2 patches of 16 channels x 2x2
    assert torch.equal(a, _latents(tiny_flux_pipeline(guidance=guidance)))
    assert not torch.equal(a, _latents(flux, seed=1)) and not torch.equal(a, _latents(tiny_flux_pipeline(seed=1, guidance=guidance)))


def test_building_is_deterministic_and_shares_nothing(sd3, sd3_again):
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        a, b = getattr(sd3, name).state_dict(), getattr(sd3_again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a) and getattr(sd3, name) is not getattr(sd3_again, name), name
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert getattr(sd3, name).backend_tokenizer is not getattr(sd3_again, name).backend_tokenizer, name


@pytest.mark.parametrize("build", [tiny_sd3_pipeline, tiny_flux_pipeline])
def test_pipelines_are_built_in_the_dtype_asked_for(build):
    pipe = build(dtype=torch.bfloat16)
    parts = [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2] + [getattr(pipe, "text_encoder_3", None) or pipe.text_encoder_2]
    assert all(p.dtype == torch.bfloat16 for part in parts for p in part.parameters())
    prompts = ["a photo of a cat"] * (3 if build is tiny_sd3_pipeline else 2)
    assert pipe.encode_prompt(*prompts, max_sequence_length=77)[0].dtype == torch.bfloat16
