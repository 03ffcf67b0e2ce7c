"""Tiny SD3 and Flux.1 pipelines configured like the real checkpoints, and a small T5 tokenizer.

Nothing is downloaded: every model is built from a config with random weights (fixed seeds), the CLIP
tokenizers are the real one shipped with textinv (see conftest), and the T5 tokenizer is built here
with the ``tokenizers`` library and wrapped in transformers' own T5 tokenizer class.  Widths are tiny
and distinct (CLIP-L 32 and CLIP-G 48 as in the tiny SDXL pipeline, T5 96), so a width names an encoder.

The ``REAL_*`` dicts hold the values taken from the real checkpoints' files, so tests can assert that
the tiny configurations carry them.  Source of every value (unless a comment says otherwise): the
Hugging Face repos stabilityai/stable-diffusion-3-medium-diffusers, black-forest-labs/FLUX.1-dev and
black-forest-labs/FLUX.1-schnell, whose config, tokenizer_config, special_tokens_map and tokenizer.json
files are copied unchanged into lllyasviel/stable-diffusion-webui-forge under backend/huggingface/
(read at commit dfdcbab, 2025-06-26).  "Loaded" values are what transformers 5.25 builds from those
files (checked by loading the copies offline).  SD3.5 large's CLIP-L config and scheduler config, as
copied in RevL-Lambda-DevRel/Stable-Diffusion-3.5-Large, agree with SD3 medium's.
"""
from __future__ import annotations

import json
import string

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from conftest import LEGACY_IDS, text_encoder, tokenizer

CLIP_L, CLIP_G, T5_WIDTH = 32, 48, 96
T5_SURPLUS_ROWS = 28  # the real T5 embedding has 32128 rows for the tokenizer's 32100 entries

# --------------------------------------------------------------------------------------- T5 tokenizer
REAL_T5_TOKENIZER = {
    # tokenizer_config.json / special_tokens_map.json of FLUX.1 tokenizer_2 and SD3 tokenizer_3 (the same)
    "pad_token": "<pad>", "pad_token_id": 0, "eos_token": "</s>", "eos_token_id": 1,
    "unk_token": "<unk>", "unk_token_id": 2, "extra_ids": 100, "model_max_length": 512,
    "tokenizer_class": "T5Tokenizer",   # tokenizer_config.json; model_index.json names T5TokenizerFast
    "entries": 32100,                    # tokenizer.json: 32000 pieces, then the 100 sentinels
    "first_extra": ("<extra_id_99>", 32000), "last_extra": ("<extra_id_0>", 32099),  # sentinels reversed, at the end
    "unknown_ascii": "<\\^`{}~",         # printable ASCII with no piece: they tokenise to <unk>
    # What transformers 5.25's T5Tokenizer builds when loading either repo: it keeps the tokenizer.json's
    # vocabulary and charsmap but sets its own pre-tokenizer and decoder (and drops Strip/Replace).
    "loaded_normalizer": "Precompiled",
    "loaded_pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}]},
    "loaded_decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
    "post_processor_single": ("A", "</s>"),  # the text, then </s>
}
_PRECOMPILED = {"type": "Precompiled", "precompiled_charsmap": "(nmt_nfkc charsmap: 316720 base64 characters)"}
_JSON_NORMALIZER = {"type": "Sequence", "normalizers": [
    _PRECOMPILED, {"type": "Strip", "strip_left": False, "strip_right": True},
    {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"}]}
REAL_T5_JSON = {  # the tokenizer.json files themselves (what a verbatim load, as transformers 4 did, uses)
    "flux": {  # FLUX.1-dev and FLUX.1-schnell tokenizer_2 (identical files); tokenizer_config: legacy false
        "normalizer": _JSON_NORMALIZER,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True, "prepend_scheme": "first"},
        "decoder": {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True, "prepend_scheme": "always"},
        "sentinel_strip": False, "legacy": False},
    "sd3": {  # SD3 medium tokenizer_3; tokenizer_config: legacy true, add_prefix_space true
        "normalizer": _JSON_NORMALIZER,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        "sentinel_strip": True, "legacy": True},
}

# Ordinary prompt words, each one piece ("▁" + word) in the real T5 vocabulary (checked against it).
# "a" is deliberately missing: the real vocabulary has no "▁a", so "a" is two tokens, "▁" and "a".
WORDS = tuple("""
an the of on in at with and or by for from to under over near behind beside into is are this
photo photograph picture painting drawing sketch portrait render image illustration watercolor oil style art
artwork cat cats dog dogs bird horse fish cow person man woman girl boy child people face hand hands eyes hair
beach sea ocean river lake mountain mountains forest tree trees flower flowers garden field sky cloud clouds sun
moon star stars city street house building room table chair window door car road bridge red green blue yellow
orange purple pink black white gray grey brown golden silver dark light bright big small large tiny old young
new happy sad cute beautiful detailed realistic sharp soft high quality best sitting standing running walking
riding flying sleeping playing wearing holding looking astronaut robot dragon castle ship boat train bicycle
dress shirt glasses morning evening night day winter summer autumn spring rain snow fire water lighting
background view close up wide angle shot camera lens depth focus masterpiece drop block wood stone metal glass
paper two spaces here world Hello A The An This
""".split())
# Single characters: every printable ASCII character the real vocabulary has as a piece.
CHARS = tuple(c for c in string.printable if c.strip() and c not in REAL_T5_TOKENIZER["unknown_ascii"])


def _sentinels(strip: bool) -> list[AddedToken]:
    """The 100 ``<extra_id_N>`` specials in vocabulary order: ``<extra_id_99>`` first, as in the real one."""
    return [AddedToken(f"<extra_id_{i}>", lstrip=strip, rstrip=strip, normalized=False, special=True)
            for i in range(99, -1, -1)]


def t5_tokenizer(words=WORDS, family: str = "flux") -> T5TokenizerFast:
    """A small T5 tokenizer with the real one's conventions: "▁" + each of ``words``, then the single
    characters, between the three specials and the 100 sentinels.  ``family`` ("flux" or "sd3") picks
    the sentinels' strip flags and the init flags of that model's files; loaded, the two real
    tokenizers differ in nothing else.

    Built through transformers' T5 tokenizer ``__init__`` with the arguments its ``from_pretrained``
    passes for the real files, so the pre-tokenizer, decoder, post-processor and added tokens are the
    ones a real pipeline gets.  The one stand-in is the normalizer (see ``_nmt_nfkc``)."""
    real = REAL_T5_JSON[family]
    pieces = [("▁", -2.0)] + [("▁" + w, -8.0 - i / 1000) for i, w in enumerate(dict.fromkeys(words))]
    pieces += [(c, -10.0 - i / 1000) for i, c in enumerate(CHARS)]
    specials = [AddedToken(t, normalized=False, special=True) for t in ("<pad>", "</s>", "<unk>")]
    sentinels = _sentinels(real["sentinel_strip"])
    vocab = [(t.content, 0.0) for t in specials] + pieces + [(t.content, 0.0) for t in sentinels]
    added = {i: t for i, t in enumerate(specials)} | {len(vocab) - 100 + i: t for i, t in enumerate(sentinels)}
    tok = T5TokenizerFast(
        vocab=vocab, extra_ids=100, additional_special_tokens=[f"<extra_id_{i}>" for i in range(100)],
        added_tokens_decoder=added, model_max_length=REAL_T5_TOKENIZER["model_max_length"],
        legacy=real["legacy"], clean_up_tokenization_spaces=True, sp_model_kwargs={},
        **({"add_prefix_space": True} if family == "sd3" else {}),
    )
    tok.backend_tokenizer.normalizer = _nmt_nfkc()
    return tok


def _nmt_nfkc() -> normalizers.Normalizer:
    """A stand-in for the real Precompiled nmt_nfkc charsmap (a 237 KB blob): NFKC after dropping control
    characters and turning other whitespace, zero-width marks, U+2581 and U+FFFD into spaces.  Checked
    code point by code point against the real one: they differ only on U+FF5E and U+1F23B."""
    return normalizers.Sequence([
        normalizers.Replace(Regex("[\x01-\x08\x0b\x0e-\x1f\x7f\x8f\x9f]"), ""),
        normalizers.Replace(Regex("[\t\n\x0c\r\u1680\u200b-\u200f\u2028\u2029\u2581\ufeff\ufffd]"), " "),
        normalizers.NFKC(),
    ])


def t5_json_backend(tok: T5TokenizerFast, family: str = "flux") -> Tokenizer:
    """``tok``'s backend with the real tokenizer.json's normalizer, pre-tokenizer and decoder instead of
    the ones transformers 5 sets (``_nmt_nfkc`` again standing in for the charsmap): the tokenizer a
    verbatim load of the real file gives, as transformers 4 did and ``tokenizers.Tokenizer.from_file`` does."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    real = REAL_T5_JSON[family]
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        spec["normalizer"] if n is _PRECOMPILED else n for n in real["normalizer"]["normalizers"]]}
    spec["pre_tokenizer"], spec["decoder"] = real["pre_tokenizer"], real["decoder"]
    return Tokenizer.from_str(json.dumps(spec))


# ----------------------------------------------------------------------------------------- T5 encoder
REAL_T5_ENCODER = {  # SD3 medium text_encoder_3/config.json (architecture T5EncoderModel)
    "vocab_size": 32128, "d_model": 4096, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
    "is_gated_act": True, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    # The file says tie_word_embeddings: false (the T5 v1.1 marker); transformers 5 keeps that as
    # scale_decoder_outputs=False and always reads tie_word_embeddings as True.
    "scale_decoder_outputs": False,
}
# FLUX.1-dev/-schnell text_encoder_2/config.json: the same but no feed_forward_proj key (transformers'
# default "relu" then, overridden by the file's dense_act_fn and is_gated_act) and another GELU spelling
# (both the tanh approximation); no relative_attention_max_distance key (default 128).
REAL_T5_ENCODER_FLUX = REAL_T5_ENCODER | {"feed_forward_proj": "relu", "dense_act_fn": "gelu_pytorch_tanh"}
_T5_FILE_KEYS = ("dense_act_fn", "is_gated_act", "relative_attention_num_buckets", "relative_attention_max_distance",
                 "layer_norm_epsilon", "pad_token_id", "eos_token_id", "decoder_start_token_id")


def tiny_t5_encoder(vocab_rows: int, width: int = T5_WIDTH, seed: int = 0, flux: bool = False) -> T5EncoderModel:
    """A 2-layer T5 v1.1 encoder (gated GELU, relative attention buckets, no output scaling) with
    ``vocab_rows`` embedding rows: give it more rows than the tokenizer has entries, as the real one has."""
    real = REAL_T5_ENCODER_FLUX if flux else REAL_T5_ENCODER
    keys = _T5_FILE_KEYS if flux else ("feed_forward_proj",) + _T5_FILE_KEYS
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_rows, d_model=width, d_kv=width // 4, d_ff=width * 5 // 2, num_layers=2,
                   num_heads=4, tie_word_embeddings=False, **{k: real[k] for k in keys})
    return T5EncoderModel(cfg).eval()


def _t5_pair(family: str, seed: int):
    tok = t5_tokenizer(family=family)
    return tok, tiny_t5_encoder(len(tok) + T5_SURPLUS_ROWS, seed=seed, flux=family == "flux")


def _vae(real: dict, seed: int):
    """A tiny 16-channel VAE with the real block count (so the latent is 1/8 of the image)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **real,
    )


# ------------------------------------------------------------------------------------------------ SD3
REAL_SD3 = {  # stabilityai/stable-diffusion-3-medium-diffusers, <component>/config.json
    "text_encoder": {"hidden_act": "quick_gelu", **LEGACY_IDS},   # CLIPTextModelWithProjection, CLIP-L
    "text_encoder_2": {"hidden_act": "gelu", **LEGACY_IDS},       # CLIPTextModelWithProjection, CLIP-G
    "text_encoder_3": {k: REAL_T5_ENCODER[k] for k in ("feed_forward_proj",) + _T5_FILE_KEYS + ("scale_decoder_outputs",)},
    "tokenizer": {"pad_token": "<|endoftext|>", "model_max_length": 77},
    "tokenizer_2": {"pad_token": "!", "pad_token_id": 0, "model_max_length": 77},
    "tokenizer_3": {k: REAL_T5_TOKENIZER[k] for k in ("pad_token", "eos_token", "unk_token", "model_max_length")},
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},  # the last by default
    "vae": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
            "use_post_quant_conv": False},
    "transformer": {"in_channels": 16, "out_channels": 16, "patch_size": 2},
}
REAL_SD3_SIZES = {  # the real widths, which the tiny pipeline scales down keeping these relations
    "clip_l": 768, "clip_l_projection": 768, "clip_g": 1280, "clip_g_projection": 1280, "t5": 4096,
    "joint_attention_dim": 4096,       # = T5 width (CLIP's output is zero-padded to it)
    "pooled_projection_dim": 2048,     # = CLIP-L projection + CLIP-G projection
    "caption_projection_dim": 1536,    # = num_attention_heads 24 * attention_head_dim 64
    "vae_blocks": 4,                   # vae_scale_factor 8
}


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny ``StableDiffusion3Pipeline`` configured like SD3 medium (CLIP-L, CLIP-G, T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok3, t5 = _t5_pair("sd3", seed + 3)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=CLIP_L + CLIP_G, pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**REAL_SD3["scheduler"]),
        vae=_vae(REAL_SD3["vae"], seed + 4),
        text_encoder=text_encoder(CLIP_L, projection=True, seed=seed + 1), tokenizer=tokenizer(),
        text_encoder_2=text_encoder(CLIP_G, projection=True, seed=seed + 2, hidden_act="gelu"),
        tokenizer_2=tokenizer(pad="!"), text_encoder_3=t5, tokenizer_3=tok3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


# ----------------------------------------------------------------------------------------------- Flux
_FLUX_SCHEDULER = {"num_train_timesteps": 1000, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                   "max_image_seq_len": 4096}
REAL_FLUX = {  # black-forest-labs/FLUX.1-dev, <component>/config.json; FLUX.1-schnell differs where noted
    "text_encoder": {"hidden_act": "quick_gelu", **LEGACY_IDS},   # CLIPTextModel, CLIP-L
    "text_encoder_2": {k: REAL_T5_ENCODER_FLUX[k] for k in _T5_FILE_KEYS + ("scale_decoder_outputs",)},
    "tokenizer": {"pad_token": "<|endoftext|>", "model_max_length": 77},
    "tokenizer_2": {k: REAL_T5_TOKENIZER[k] for k in ("pad_token", "eos_token", "unk_token", "model_max_length")},
    "scheduler": _FLUX_SCHEDULER | {"shift": 3.0, "use_dynamic_shifting": True},
    "vae": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False},
    "transformer": {"in_channels": 64, "patch_size": 1, "guidance_embeds": True},
}
REAL_FLUX_SCHNELL = REAL_FLUX | {
    "scheduler": _FLUX_SCHEDULER | {"shift": 1.0, "use_dynamic_shifting": False},
    "transformer": REAL_FLUX["transformer"] | {"guidance_embeds": False},
}
REAL_FLUX_SIZES = {
    "clip_l": 768, "t5": 4096,
    "joint_attention_dim": 4096,       # = T5 width
    "pooled_projection_dim": 768,      # = CLIP-L width (the pooled output, no projection)
    "in_channels": 64,                 # = 4 * the VAE's 16 latent channels (2x2 packed)
    "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56),  # the rope axes sum to the head width
    "vae_blocks": 4,
}


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, guidance: bool = True):
    """A tiny ``FluxPipeline`` configured like FLUX.1-dev (``guidance``) or FLUX.1-schnell (CLIP-L, T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    real = REAL_FLUX if guidance else REAL_FLUX_SCHNELL
    tok2, t5 = _t5_pair("flux", seed + 2)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_L,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**real["scheduler"]),
        vae=_vae(real["vae"], seed + 3), text_encoder=text_encoder(CLIP_L, seed=seed + 1), tokenizer=tokenizer(),
        text_encoder_2=t5, tokenizer_2=tok2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


__all__ = ["CLIP_L", "CLIP_G", "T5_WIDTH", "T5_SURPLUS_ROWS", "WORDS", "CHARS", "REAL_T5_TOKENIZER", "REAL_T5_JSON",
           "REAL_T5_ENCODER", "REAL_T5_ENCODER_FLUX", "REAL_SD3", "REAL_SD3_SIZES", "REAL_FLUX", "REAL_FLUX_SCHNELL",
           "REAL_FLUX_SIZES", "t5_tokenizer", "t5_json_backend", "tiny_t5_encoder", "tiny_sd3_pipeline",
           "tiny_flux_pipeline"]
