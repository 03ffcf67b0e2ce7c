"""mini-flow: the mini world's second built-in model, shaped like Flux.1 — groundwork.

Why Flux.1's shape (not SD3's): its two text encoders do different jobs — CLIP-L gives only the
pooled vector, T5 the token sequence the transformer attends to — which is exactly where users ask
"which encoder carries the concept"; and Flux.1 is the family more embeddings are made for.

What is here (``textinv world train-base --arch flow``): a T5 tokenizer of the world's vocabulary in
T5's conventions (SentencePiece pieces "▁word", ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2, sentinels
at the end, an embedding table with more rows than entries, as T5-XXL has); a small CLIP and a small
T5 v1.1 encoder; a ``FluxTransformer2DModel`` without a guidance embedding (the mini model is not
guidance-distilled: it samples with real classifier-free guidance); the mini model's VAE, kept; all
trained from scratch on the world's captions with the flow-matching objective of
:mod:`textinv.flowmatch` (Flux's recipe: uniform σ, velocity target), 10 % caption dropout, EMA.
The committed model and its quality tables are the work of the issue "A flow-matching mini world".
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tokenizers import AddedToken
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from .. import flowmatch
from ..errors import TextinvError
from . import spec, train_base

T5_SENTINELS = 100  # <extra_id_0> … as T5's tokenizer has them (at the end of the vocabulary)
T5_SURPLUS_ROWS = 28  # T5-XXL's table has 32128 rows for its tokenizer's 32100 entries
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=160, num_layers=4, num_heads=4, feed_forward_proj="gated-gelu",
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                 dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=4 * train_base.VAE_CONFIG["latent_channels"], num_layers=2,
                          num_single_layers=4, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                          pooled_projection_dim=train_base.TEXT_CONFIG["hidden_size"], guidance_embeds=False,
                          axes_dims_rope=(8, 12, 12))
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
T5_LENGTH = 32  # the world's captions are short: T5 prompts are padded to this many tokens
# `textinv demo`'s settings on it: T5's token rows have norms near 8 (CLIP's near 0.2), so its vectors
# take a larger step.  Measured on v1 (concept drop, seed 0, 16 images a prompt): --lr-t5 0.05 fidelity
# 0.81 / editability 0.67; 0.1: 0.75 / 0.69; 0.3: 0.56 / 0.56; 5e-3 (the --lr): 0.06 / 0.00 (nothing learned).
# `demo --bias`: each colour token starts from its own colour word (on v2, seed 0: KL 1.79 -> 0.000 and
# 92 % still balls; from red, the colour mini-flow draws for "ball": 14.5x lower KL and 89 %, the cyan token
# judged cyan 17 % of the time).
DEMO = {"lr_t5": "0.05", "bias_init": "value"}


def t5_tokenizer(words=None) -> T5TokenizerFast:
    """A T5 tokenizer of the world's vocabulary: "▁" + each word, the single characters of ASCII
    text, between T5's three specials and its sentinels (built through transformers' own T5
    tokenizer, so its pre-tokenizer, decoder and ``</s>`` post-processor are a real pipeline's)."""
    words = list(dict.fromkeys(words or spec.vocabulary()))
    chars = [c for c in map(chr, range(33, 127))]
    pieces = [("▁", -2.0)] + [("▁" + w, -8.0 - i / 1000) for i, w in enumerate(words)]
    pieces += [(c, -10.0 - i / 1000) for i, c in enumerate(chars)]
    specials = [AddedToken(t, normalized=False, special=True) for t in ("<pad>", "</s>", "<unk>")]
    sentinels = [AddedToken(f"<extra_id_{i}>", normalized=False, special=True) for i in range(T5_SENTINELS - 1, -1, -1)]
    vocab = [(t.content, 0.0) for t in specials] + pieces + [(t.content, 0.0) for t in sentinels]
    added = {i: t for i, t in enumerate(specials)} | {len(vocab) - T5_SENTINELS + i: t for i, t in enumerate(sentinels)}
    return T5TokenizerFast(vocab=vocab, extra_ids=T5_SENTINELS, added_tokens_decoder=added, model_max_length=T5_LENGTH,
                           additional_special_tokens=[f"<extra_id_{i}>" for i in range(T5_SENTINELS)], legacy=False)


def grown(transformer: FluxTransformer2DModel, single_blocks: int, seed: int = 0) -> FluxTransformer2DModel:
    """``transformer`` with ``single_blocks`` more single-stream blocks after its own, each adding
    nothing yet: a new block's output projection starts at zero, so its residual passes through
    and the grown model draws exactly what the trained one draws (its other weights random, to
    learn from there).  A larger model that starts where the smaller one stopped."""
    config = dict(transformer.config)
    config["num_single_layers"] += single_blocks
    torch.manual_seed(seed)
    bigger = FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    missing, unexpected = bigger.load_state_dict(transformer.state_dict(), strict=False)
    if unexpected or not all(k.startswith("single_transformer_blocks.") for k in missing):
        raise TextinvError(f"growing the transformer: its weights do not fit the grown one ({(unexpected or missing)[0]})")
    with torch.no_grad():
        for block in bigger.single_transformer_blocks[len(transformer.single_transformer_blocks):]:
            block.proj_out.weight.zero_()
            block.proj_out.bias.zero_()
    return bigger


def build_models(seed: int, t5_entries: int, init_from: Path | None = None, grow: int = 0):
    """(CLIP, T5, transformer): fresh, the T5 table ``T5_SURPLUS_ROWS`` rows longer than its tokenizer;
    or, given ``init_from`` (a mini-flow folder), its saved ones in float32, to continue training,
    the transformer ``grow`` single blocks deeper (:func:`grown`)."""
    if init_from is not None:
        transformer = FluxTransformer2DModel.from_pretrained(init_from / "transformer", torch_dtype=torch.float32)
        return (CLIPTextModel.from_pretrained(init_from / "text_encoder", torch_dtype=torch.float32),
                T5EncoderModel.from_pretrained(init_from / "text_encoder_2", torch_dtype=torch.float32),
                grown(transformer, grow, seed) if grow else transformer)
    if grow:
        raise TextinvError("--grow-single: grows a trained mini-flow; give it with --init-from")
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(**train_base.TEXT_CONFIG))
    t5 = T5EncoderModel(T5Config(vocab_size=t5_entries + T5_SURPLUS_ROWS, **T5_CONFIG))
    return clip, t5, FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def tokenized(caps, clip_tok, t5_tok) -> dict:
    """Every caption's ids for both encoders ([images, captions, length]) and the empty caption's."""
    flat = [c for cs in caps for c in cs]
    shape = (len(caps), len(caps[0]))
    clip = clip_tok(flat + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    t5 = t5_tok(flat + [""], padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt").input_ids
    return {"clip": clip[:-1].view(*shape, -1), "t5": t5[:-1].view(*shape, -1), "empty": (clip[-1], t5[-1])}


def batch_loss(models, scheduler, latents, ids, batch: int, cond_drop: float, g) -> torch.Tensor:
    """One batch's flow-matching loss (Flux's recipe): random images and captions (dropped to the
    empty caption with probability ``cond_drop``), a fresh posterior sample, uniform σ."""
    clip, t5, transformer = models
    mean, std, scale = latents
    idx = torch.randint(0, len(mean), (batch,), generator=g)
    ci = torch.randint(0, ids["clip"].shape[1], (batch,), generator=g)
    clip_ids, t5_ids = ids["clip"][idx, ci].clone(), ids["t5"][idx, ci].clone()
    drop = torch.rand(batch, generator=g) < cond_drop
    clip_ids[drop], t5_ids[drop] = ids["empty"][0], ids["empty"][1]
    z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
    noise, indices = flowmatch.draw(z, scheduler.config.num_train_timesteps, "none", generator=g)
    sigmas, timesteps = flowmatch.schedule_at(scheduler, indices)
    x = flowmatch.noisy(z, noise, sigmas.view(-1, 1, 1, 1))
    pred = flowmatch.flux_prediction(types.SimpleNamespace(transformer=transformer), x,
                                     timesteps, t5(t5_ids)[0], clip(clip_ids).pooler_output, guidance=1.0)
    return torch.nn.functional.mse_loss(pred, flowmatch.velocity(z, noise))


def save_pipeline(out: Path, vae, clip, t5, transformer, clip_tok, t5_tok, dtype=torch.float16) -> None:
    """A diffusers FluxPipeline folder (weights in ``dtype``, configs declaring float32)."""
    out.mkdir(parents=True, exist_ok=True)
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline adds the VAE's shift_factor: ours has none
    for name, m in (("vae", vae), ("text_encoder", clip), ("text_encoder_2", t5), ("transformer", transformer)):
        train_base._save_weights(m, out / name, dtype)
    for name in ("text_encoder", "text_encoder_2"):
        train_base.declare_float32(out / name)
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    clip_tok.save_pretrained(out / "tokenizer")
    t5_tok.save_pretrained(out / "tokenizer_2")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": train_base._diffusers_version(),
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    settings = train_base.model_settings() | {"family": "the textinv mini-flow model", "true_cfg": True,
                                              "t5_length": T5_LENGTH, "demo": DEMO}
    (out / "textinv.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def train_flow_base(out: Path, vae_from: Path, *, seed: int = 0, n_images: int = 60000, steps: int = 4000,
                    batch: int = 64, lr: float = 5e-4, warmup: int | None = None, ema_decay: float = 0.999,
                    cond_drop: float = 0.1, threads: int = 2, logfile: Path | None = None, save_every: int = 1000,
                    grow: int = 0) -> dict:
    """The whole recipe; returns a summary.  ``vae_from``: a model folder whose VAE is kept (the mini
    model's); a mini-flow folder is continued (its encoders and transformer too).  The EMA model is
    written to ``out`` every ``save_every`` steps, so a long run can be looked at as it goes.
    ``warmup`` None: 400 steps from scratch, 100 when continuing.  ``grow``: single blocks added to
    the continued transformer (:func:`grown`)."""
    torch.set_num_threads(threads)
    imgs, caps = train_base.render_dataset(n_images, seed + 1000)
    clip_tok, t5_tok = CLIPTokenizer.from_pretrained(str(train_base.PACKAGE_TOKENIZER)), t5_tokenizer()
    ids = tokenized(caps, clip_tok, t5_tok)
    vae = AutoencoderKL.from_pretrained(str(Path(vae_from) / "vae"), torch_dtype=torch.float32)
    with torch.no_grad():
        mean, std = train_base.encode_all(vae, imgs)
    latents = (mean, std, float(vae.config.scaling_factor))
    continued = (Path(vae_from) / "transformer").is_dir()
    models = build_models(seed, len(t5_tok), Path(vae_from) if continued else None, grow)
    warmup = warmup if warmup is not None else 100 if continued else 400
    emas = [train_base.EMA(m, ema_decay) for m in models]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    scheduler, g, losses = flowmatch.train_schedule(SCHEDULER), torch.Generator().manual_seed(seed + 1), []
    for step in tqdm(range(steps), desc="mini-flow", mininterval=10):
        for pg in opt.param_groups:
            pg["lr"] = train_base._lr_at(step, steps, warmup, lr)
        loss = batch_loss(models, scheduler, latents, ids, batch, cond_drop, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for ema, m in zip(emas, models):
            ema.update(m, step)
        losses.append(loss.item())
        if (step + 1) % 200 == 0:
            train_base.log(f"mini-flow step {step + 1}/{steps} loss {np.mean(losses[-200:]):.4f}", logfile)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save_pipeline(Path(out), vae, *(e.model for e in emas), clip_tok, t5_tok)
    save_pipeline(Path(out), vae, *(e.model for e in emas), clip_tok, t5_tok)
    return {"seed": seed, "n_images": n_images, "steps": steps, "batch": batch, "lr": lr, "grow": grow,
            "first_loss": float(np.mean(losses[:20])), "final_loss": float(np.mean(losses[-200:]))}
