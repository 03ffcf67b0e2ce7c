"""textinv's training loop against the common recipe, same model, batch and step count.

Three loops, each timed in steady state (after warm-up steps), with its peak memory:

* textinv: ``textinv.train`` itself, loading the model through its ordinary path (``--precision``
  for the frozen model; the learned vectors stay fp32).
* reference: what diffusers' textual_inversion.py / textual_inversion_sdxl.py (and most tutorials)
  do: tokenise every step, VAE-encode the batch every step, put the whole token table(s) in AdamW
  and copy the original rows back over every untouched row after each step.  Precision as those
  scripts use it: UNet and VAE cast to the half dtype, the text encoder (whose table is trained)
  kept fp32 and run under autocast, a GradScaler for fp16.  SD3 and Flux.1: the pure textual
  inversion of diffusers' advanced Flux script (see :func:`flow_reference_loop`).
* floor: the text encoder(s) and UNet (or transformer) forward and backward to one fp32 input vector
  per encoder, the model in the run's dtype, nothing else: no data, no noise schedule, no optimizer.
  No loop on this model can be faster; ``textinv/floor`` says how close textinv comes.

Peak memory counts from before the model loads (weights + training).  On a CPU it is the sampled
resident size, so each loop runs in a fresh child process: memory freed by an earlier loop cannot
hide in the allocator.  On CUDA it is the allocator's peak, and the loops share this process.

``--arch sd15|sd21|sdxl|sd3|flux`` builds that architecture from its published configs with random
weights (nothing is downloaded), saves it as a diffusers folder (in a temporary folder: fp32
safetensors; SD3 and Flux.1 in bf16, as they are released — a full FLUX.1-dev in fp32 would be 67 GB
of disk — and every loop loads it in its own precision) and benchmarks it; ``--tiny`` keeps the
layout at toy widths (for tests).  Asserts nothing.

SD3 medium and FLUX.1-dev in fp32 do not fit a 24 GB machine (T5-XXL alone is 4.76 B parameters,
19 GB; Flux's transformer 11.9 B): on a CPU the build keeps fewer transformer blocks and T5 layers
(``--blocks``, ``--t5-layers``; the first line printed says what was left out), on CUDA all of them.
Their T5 tokenizer is a stand-in: no real SentencePiece vocabulary exists offline, so it is built in
T5's conventions (``textinv.world.flow_base.t5_tokenizer``) from the prompt templates' words and
filler pieces up to the real one's 32,100 entries, while the T5 encoder has the real 32,128-row
embedding table — the table the reference recipe trains, at its real size.

    python benchmarks/train_speed.py                 # the built-in mini model
    python benchmarks/train_speed.py --model PATH --steps 60 --batch 4
    python benchmarks/train_speed.py --arch sd15 --steps 3 --warmup 1 --batch 1 --precision fp32,bf16
    python benchmarks/train_speed.py --arch sdxl --device cuda --precision fp32,bf16,fp16 --steps 20 --warmup 5
    python benchmarks/train_speed.py --arch sd3 --steps 3 --warmup 1 --batch 1 --precision fp32
    python benchmarks/train_speed.py --arch flux --steps 3 --warmup 1 --batch 1 --precision fp32
    python benchmarks/train_speed.py --arch flux --device cuda --precision bf16,fp16 --steps 20 --warmup 5
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5EncoderModel

from textinv import data, families, flowmatch, generation, prompts, tokens
from textinv.models import DTYPES, MINI_PATH, load_pipeline
from textinv.training import train
from textinv.world import flow_base

ARCHS = ("sd15", "sd21", "sdxl", "sd3", "flux")
FLOW_ARCHS = ("sd3", "flux")  # flow-matching transformers; the others have a UNet
NETWORKS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
LOOPS = ("textinv", "reference", "floor")
TOKEN = "<bench>"
LR = 5e-3

# --------------------------------------------------------------------------- published shapes
# Betas every SD 1.x / 2.x / XL checkpoint was trained with (the "scaled_linear" schedule of the
# original LDM configs, 1000 steps).
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# SD 1.5, SD 2.x and SDXL base 1.0 ship text encoder configs with the old CLIP ids (bos 0, eos 2,
# pad 1); transformers then pools at argmax(input_ids).  Kept: it is what those models load as.
LEGACY_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)


def clip_text(width: int, layers: int, heads: int, ffn: int, act: str, projection: int) -> dict:
    """A CLIPTextConfig's fields for one of the CLIP / OpenCLIP text towers."""
    return dict(vocab_size=49408, max_position_embeddings=77, hidden_size=width, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=ffn, hidden_act=act, projection_dim=projection,
                layer_norm_eps=1e-5, **LEGACY_IDS)


def sd_vae(sample_size: int, scaling: float = 0.18215, force_upcast: bool = False) -> dict:
    """The KL autoencoder all three share (ch 128, mult 1-2-4-4, 2 res blocks, 4 latent channels,
    as the LDM configs' first_stage_config says); they differ in scaling factor and size."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=sample_size, scaling_factor=scaling,
                force_upcast=force_upcast)


SD_BLOCKS = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, in_channels=4, out_channels=4,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)


def arch_config(arch: str) -> dict:
    """The components of ``arch`` as plain config dicts, as the released checkpoints' folders hold them.

    Sources, checked against public copies (no weights were read):
    * sd15: CompVis' v1-inference.yaml (model_channels 320, mult 1-2-4-4, 8 heads, context 768,
      scale 0.18215) as diffusers' SD 1.5 unet/config.json spells it (attention_head_dim 8,
      sample_size 64); text encoder = OpenAI CLIP ViT-L/14's text tower (768 wide, 12 layers,
      12 heads, MLP 3072, quick_gelu), legacy ids; PNDM scheduler, skip_prk_steps, offset 1.
    * sd21: Stability's v2-inference-v / sd_2_1_768.yaml (num_head_channels 64, so diffusers'
      attention_head_dim is 5-10-20-20; linear projections; context 1024; v-prediction), and the
      768 model's unet config (upcast_attention, sample_size 96); text encoder = OpenCLIP ViT-H/14
      (1024 wide, 16 heads, MLP 4096, gelu) with its last of 24 blocks dropped, as diffusers'
      converter does (SD 2 conditions on the penultimate layer): 23 layers; tokenizer pads with "!".
    * sdxl: Stability's sd_xl_base.yaml (model_channels 320, mult 1-2-4, transformer depth 1-2-10
      with the first level attention-free, context 2048, adm_in_channels 2816 = 6 x 256 time
      features + 1280 pooled, VAE scale 0.13025) as diffusers' SDXL base unet/config.json spells
      it; encoders CLIP ViT-L/14 (hidden states of layer 11) and OpenCLIP ViT-bigG/14 (1280 wide,
      32 layers, 20 heads, MLP 5120, gelu, projection 1280); tokenizer_2 pads with "!"; Euler.
    * sd3, flux: :func:`sd3_config`, :func:`flux_config`.
    """
    if arch in FLOW_CONFIGS:
        return FLOW_CONFIGS[arch]()
    if arch == "sd15":
        return {"pipeline": "StableDiffusionPipeline",
                "unet": dict(SD_BLOCKS, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
                "vae": sd_vae(512),
                "text_encoder": clip_text(768, 12, 12, 3072, "quick_gelu", 768),
                "tokenizer": {"pad_token": "<|endoftext|>"},
                "scheduler": dict(SD_BETAS, _class_name="PNDMScheduler", skip_prk_steps=True, steps_offset=1,
                                  set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")}
    if arch == "sd21":
        return {"pipeline": "StableDiffusionPipeline",
                "unet": dict(SD_BLOCKS, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                             use_linear_projection=True, upcast_attention=True),
                "vae": sd_vae(768),
                "text_encoder": clip_text(1024, 23, 16, 4096, "gelu", 512),
                "tokenizer": {"pad_token": "!"},
                "scheduler": dict(SD_BETAS, _class_name="DDIMScheduler", steps_offset=1, set_alpha_to_one=False,
                                  clip_sample=False, prediction_type="v_prediction")}
    if arch == "sdxl":
        return {"pipeline": "StableDiffusionXLPipeline",
                "unet": dict(block_out_channels=[320, 640, 1280], layers_per_block=2, in_channels=4, out_channels=4,
                             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                             up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                             transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                             use_linear_projection=True, sample_size=128, cross_attention_dim=2048,
                             addition_embed_type="text_time", addition_time_embed_dim=256,
                             projection_class_embeddings_input_dim=2816),
                "vae": sd_vae(1024, scaling=0.13025, force_upcast=True),
                "text_encoder": clip_text(768, 12, 12, 3072, "quick_gelu", 768),
                "text_encoder_2": clip_text(1280, 32, 20, 5120, "gelu", 1280),
                "tokenizer": {"pad_token": "<|endoftext|>"},
                "tokenizer_2": {"pad_token": "!"},
                "scheduler": dict(SD_BETAS, _class_name="EulerDiscreteScheduler", steps_offset=1,
                                  timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon")}
    raise SystemExit(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")


# ------------------------------------------------------------------------ SD3 and Flux.1 shapes
# Facts already checked against the released checkpoints' files are in tests/tiny_flow.py (REAL_SD3,
# REAL_FLUX, REAL_T5_ENCODER, REAL_T5_ENCODER_FLUX, REAL_T5_TOKENIZER, REAL_SD3_SIZES, REAL_FLUX_SIZES),
# copied here because a benchmark does not import tests/.  The widths and depths tiny_flow lacks come
# from the diffusers folders' config.json files of stabilityai/stable-diffusion-3-medium-diffusers and
# black-forest-labs/FLUX.1-dev, as copied into lllyasviel/stable-diffusion-webui-forge under
# backend/huggingface/ (tests/test_bench_arch.py pins the parameter counts they give).
T5_XXL = dict(  # google/t5-v1_1-xxl's encoder: SD3's text_encoder_3 and Flux.1's text_encoder_2
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, is_gated_act=True,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
T5_ENTRIES = 32100  # the real T5 tokenizer: 32,000 SentencePiece pieces, then 100 sentinels
T5_MAX_LENGTH = 512  # its model_max_length
FLOW_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)
WITH_PROJECTION = "CLIPTextModelWithProjection"


def flow_vae(scaling: float, shift: float) -> dict:
    """SD3's and Flux.1's autoencoder: the SD layout with 16 latent channels, a shift as well as a
    scale, and no quant convolutions."""
    return dict(sd_vae(1024, scaling, force_upcast=True), latent_channels=16, shift_factor=shift,
                use_quant_conv=False, use_post_quant_conv=False)


def sd3_config() -> dict:
    """SD3 medium: CLIP-L and OpenCLIP bigG (both with their projections: the pooled vector is the two
    side by side, 2048), T5-XXL, a 24-block MMDiT over 2x2 patches (24 heads of 64, captions projected
    to 1536), the 16-channel VAE (scale 1.5305, shift 0.0609), flow matching with shift 3.0."""
    return {"pipeline": "StableDiffusion3Pipeline",
            "transformer": dict(_class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16,
                                out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                                pos_embed_max_size=192),
            "vae": flow_vae(1.5305, 0.0609),
            "text_encoder": dict(clip_text(768, 12, 12, 3072, "quick_gelu", 768), _class_name=WITH_PROJECTION),
            "text_encoder_2": dict(clip_text(1280, 32, 20, 5120, "gelu", 1280), _class_name=WITH_PROJECTION),
            "text_encoder_3": dict(T5_XXL, _class_name="T5EncoderModel", feed_forward_proj="gated-gelu",
                                   dense_act_fn="gelu_new"),
            "tokenizer": {"pad_token": "<|endoftext|>"},
            "tokenizer_2": {"pad_token": "!"},
            "tokenizer_3": {"_class_name": "T5TokenizerFast"},
            "scheduler": dict(FLOW_SCHEDULER, use_dynamic_shifting=False)}


def flux_config() -> dict:
    """FLUX.1-dev: CLIP-L (its pooled output only, 768) and T5-XXL, a transformer of 19 double-stream
    and 38 single-stream blocks (24 heads of 128, rotary axes 16-56-56) over 2x2-packed latents (64
    channels in), with a guidance embedding; the 16-channel VAE (scale 0.3611, shift 0.1159);
    flow matching with resolution-dependent shift (base 0.5, max 1.15)."""
    return {"pipeline": "FluxPipeline",
            "transformer": dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=19,
                                num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                axes_dims_rope=[16, 56, 56]),
            "vae": flow_vae(0.3611, 0.1159),
            "text_encoder": clip_text(768, 12, 12, 3072, "quick_gelu", 768),
            # as tiny_flow read the file: no feed_forward_proj, the tanh GELU under this name
            # (another copy of the file says "gated-gelu" / "gelu_new": the same function)
            "text_encoder_2": dict(T5_XXL, _class_name="T5EncoderModel", dense_act_fn="gelu_pytorch_tanh"),
            "tokenizer": {"pad_token": "<|endoftext|>"},
            "tokenizer_2": {"_class_name": "T5TokenizerFast"},
            "scheduler": dict(FLOW_SCHEDULER, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                              base_image_seq_len=256, max_image_seq_len=4096)}


FLOW_CONFIGS = {"sd3": sd3_config, "flux": flux_config}
# What a CPU run builds by default (transformer blocks — Flux.1: double blocks, twice as many single
# ones —, T5 layers): about 9 GiB of fp32 weights (sd3 8.6, flux 9.0), so that the heaviest loop (the
# reference, with AdamW state for the whole 32,101 x 4096 T5 table, 2 GiB more) stays inside 24 GB of
# RAM.  The full models are 29 GiB (SD3 medium) and 63 GiB (FLUX.1-dev) of fp32 weights.
CPU_DEPTH = {"sd3": (6, 4), "flux": (2, 4)}


def t5_part(cfg: dict) -> str | None:
    """The name of the pipeline's T5 encoder (SD3: text_encoder_3, Flux.1: text_encoder_2), if any."""
    return next((n for n in NETWORKS if cfg.get(n, {}).get("_class_name") == "T5EncoderModel"), None)


def shallower(cfg: dict, blocks: int | None, t5_layers: int | None) -> tuple[dict, str | None]:
    """``cfg`` with only the first ``blocks`` transformer blocks (Flux.1: ``blocks`` double-stream
    and twice as many single-stream ones, the release's 19:38) and ``t5_layers`` T5 layers (None:
    all), and a plain statement of what was left out (None when nothing was)."""
    cfg = copy.deepcopy(cfg)
    net, t5 = cfg["transformer"], cfg[t5_part(cfg)]
    kept = []
    if "num_single_layers" in net:
        double, single = net["num_layers"], net["num_single_layers"]
        if blocks is not None and blocks < double:
            net.update(num_layers=blocks, num_single_layers=min(single, 2 * blocks))
            kept.append(f"{blocks} of {double} double blocks, {net['num_single_layers']} of {single} single")
    elif blocks is not None and blocks < net["num_layers"]:
        kept.append(f"{blocks} of {net['num_layers']} joint blocks")
        net["num_layers"] = blocks
    if t5_layers is not None and t5_layers < t5["num_layers"]:
        kept.append(f"T5 {t5_layers} of {t5['num_layers']} layers")
        t5["num_layers"] = t5_layers
    return cfg, ", ".join(kept) or None


# Wider than the tiny CLIPs side by side (32 + 48), as T5 is than the real ones: SD3 pads them to it.
TINY_T5 = dict(d_model=96, d_kv=24, d_ff=240, num_layers=2, num_heads=4)


def tiny(cfg: dict) -> dict:
    """The same layout at toy widths: every block type, conditioning path and config quirk of the
    architecture kept, small enough that a test trains a step in seconds.  T5 keeps its real
    32,128-row table (the tokenizer has the real length too)."""
    cfg = copy.deepcopy(cfg)
    widths = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if name in cfg and name != t5_part(cfg):
            width = 32 if cfg[name]["hidden_size"] == 768 else 48
            cfg[name].update(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                             projection_dim=width)
            widths.append(width)
    if "unet" in cfg:
        tiny_unet(cfg["unet"], widths)
    else:
        cfg[t5_part(cfg)].update(TINY_T5)
        tiny_transformer(cfg["transformer"], widths)
    cfg["vae"].update(block_out_channels=[8, 16, 16, 16], norm_num_groups=8, layers_per_block=1, sample_size=64)
    return cfg


def tiny_unet(unet: dict, widths: list[int]) -> None:
    channels = [c // 10 for c in unet["block_out_channels"]]
    unet.update(block_out_channels=channels, attention_head_dim=[c // 16 for c in channels], norm_num_groups=8,
                layers_per_block=1, sample_size=8, cross_attention_dim=sum(widths))
    if "transformer_layers_per_block" in unet:
        unet["transformer_layers_per_block"] = [min(n, 2) for n in unet["transformer_layers_per_block"]]
    if unet.get("addition_embed_type") == "text_time":  # 6 size/crop numbers x time features + pooled text
        unet.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + widths[-1])


def tiny_transformer(net: dict, widths: list[int]) -> None:
    """SD3: two joint blocks, pooled = both CLIP projections; Flux.1: one double and two single
    blocks, pooled = CLIP-L's width, rotary axes summing to the head width.  Both attend to T5."""
    net.update(num_layers=2 if "caption_projection_dim" in net else 1, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=TINY_T5["d_model"], pooled_projection_dim=sum(widths))
    if "caption_projection_dim" in net:
        net.update(caption_projection_dim=32, sample_size=8, pos_embed_max_size=16)
    else:
        net.update(num_single_layers=2, axes_dims_rope=[4, 6, 6])


DEFAULT_CLASS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                 "text_encoder_2": WITH_PROJECTION}  # SDXL pools its second encoder


def build(name: str, part: dict):
    """One network of a pipeline from its config dict (its ``_class_name``, or the SD default for
    the name), with random weights."""
    part = dict(part)
    cls = part.pop("_class_name", None) or DEFAULT_CLASS[name]
    if name in ("unet", "transformer", "vae"):
        return getattr(diffusers, cls)(**part)
    if cls == "T5EncoderModel":
        return T5EncoderModel(T5Config(**part)).eval()
    return getattr(transformers, cls)(CLIPTextConfig(**part)).eval()


def parameter_counts(cfg: dict) -> dict[str, int]:
    """Parameters per network, counted on the meta device: no memory, no time."""
    counts = {}
    for name in NETWORKS:
        if name in cfg:
            with torch.device("meta"):
                counts[name] = sum(p.numel() for p in build(name, cfg[name]).parameters())
    return counts


def t5_tokenizer():
    """A T5 tokenizer as long as the real one (32,100 entries), in T5's conventions (flow_base's
    builder): the prompt templates' words, filler pieces, the single characters, the specials and
    sentinels.  No real SentencePiece vocabulary exists offline; what matters here is that the
    prompts tokenise as words and that adding the trigger gives the table the real number of rows."""
    words = sorted({w for t in data.OBJECT_TEMPLATES for w in re.findall(r"[a-z]+", t)})
    fill = T5_ENTRIES - len(flow_base.t5_tokenizer(words))
    tok = flow_base.t5_tokenizer(words + [f"x{i:05d}" for i in range(fill)])
    tok.model_max_length = T5_MAX_LENGTH
    return tok


def save_tokenizer(part: dict, folder: Path) -> str:
    """One tokenizer: the stand-in T5 one, or the real CLIP BPE vocabulary (49,408 tokens) shipped
    with the built-in model; returns its class name as the released model_index.json has it."""
    part = dict(part)
    cls = part.pop("_class_name", "CLIPTokenizer")
    tok = t5_tokenizer() if cls == "T5TokenizerFast" else CLIPTokenizer.from_pretrained(MINI_PATH / "tokenizer", **part)
    tok.save_pretrained(folder)
    return cls


def save_arch(cfg: dict, folder: Path, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Write ``cfg`` as a diffusers folder with random weights in ``dtype``, one network at a time
    (SDXL in fp32 is ~14 GB: only the largest part, the UNet, is ever in memory).  On a GPU the
    random initialisation runs there (seconds instead of minutes for SDXL)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": cfg["pipeline"], "_diffusers_version": diffusers.__version__}
    for name in NETWORKS:
        if name in cfg:
            torch.manual_seed(seed)
            with torch.device(device):
                model = build(name, cfg[name])
            if dtype != torch.float32:
                model.to(dtype)
            model.save_pretrained(folder / name)
            library = "diffusers" if name in ("unet", "transformer", "vae") else "transformers"
            index[name] = [library, type(model).__name__]
            del model  # freed here: the next network is built in its place
    for name in TOKENIZERS:
        if name in cfg:
            index[name] = ["transformers", save_tokenizer(cfg[name], folder / name)]
    scheduler = dict(cfg["scheduler"])
    cls = getattr(diffusers, scheduler.pop("_class_name"))
    cls.from_config(scheduler).save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", cls.__name__]
    if cfg["pipeline"] == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    elif cfg["pipeline"] == "StableDiffusionXLPipeline":
        index.update(force_zeros_for_empty_prompt=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# ------------------------------------------------------------------------------------ measuring
class PeakMemory:
    """Peak memory above the start (CPU: sampled /proc RSS; CUDA: the allocator's peak)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.mb = (self.peak - self.start) / 2**20


def now(device: str) -> float:
    """Wall-clock time once the device has finished what was queued (CUDA runs asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def synthetic_images(folder: Path, n: int = 5, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((size, size, 3), 230, np.uint8)
        x, y = rng.integers(4, size // 2, 2)
        a[y : y + size // 3, x : x + size // 3] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


@dataclass
class Run:
    """What every loop of one benchmark shares (plain values: it crosses into child processes)."""

    model: str | None  # a diffusers folder; None: the built-in mini model
    images: str
    out: str
    device: str
    steps: int
    warmup: int
    batch: int
    resolution: int | None  # None: the model's native size
    grad_checkpointing: bool = False


def pairs_of(pipe) -> list:
    """(tokenizer, text encoder) for each encoder of the pipeline: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def encode(pairs, ids: list[torch.Tensor]):
    """The UNet's conditioning as the pipelines build it: SD, the last layer; SDXL, both encoders'
    penultimate layers side by side and the second one's pooled output."""
    if len(pairs) == 1:
        return pairs[0][1](ids[0])[0], None
    outs = [te(i, output_hidden_states=True) for (_, te), i in zip(pairs, ids)]
    return torch.cat([o.hidden_states[-2] for o in outs], dim=-1), outs[1][0]


def resolution_of(pipe, run: Run) -> int:
    """The run's image side: ``--resolution``, else the model's native one (textinv's default too)."""
    return run.resolution or generation.default_size(pipe)[0]


def freeze(pipe, run: Run) -> None:
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    net = generation.denoiser(pipe)  # the UNet or the transformer
    net.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    if run.grad_checkpointing:
        net.enable_gradient_checkpointing()


def is_flow(pipe) -> bool:
    """SD3 or Flux.1 (a flow-matching transformer), whose reference and floor loops are their own."""
    return families.of_pipeline(pipe).joins != "unet"


def textinv_loop(run: Run, precision: str) -> float:
    """textinv.train, loading the model itself; steady-state seconds per step from its log."""
    out = Path(run.out) / f"textinv-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    train(images=run.images, token=TOKEN, model=run.model, precision=precision, steps=run.steps, batch=run.batch,
          resolution=run.resolution, grad_checkpointing=run.grad_checkpointing, flip=True, lr=str(LR), out=str(out),
          progress=False, early_stop=False)  # every loop times the same steps
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return (log[-1]["seconds"] - log[run.warmup - 1]["seconds"]) / (run.steps - run.warmup)


def reference_loop(run: Run, precision: str, seed: int = 0) -> float:
    """The common recipe; steady-state seconds per step."""
    from diffusers import DDPMScheduler

    dtype = DTYPES[precision]
    pipe = load_pipeline(run.model, dtype=dtype, device=run.device)
    freeze(pipe, run)
    if is_flow(pipe):
        return flow_reference_loop(run, pipe, dtype, seed)
    pairs = pairs_of(pipe)
    unet, vae, dev = pipe.unet, pipe.vae, pipe.unet.device
    if dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae.to(torch.float32)  # SDXL's VAE overflows in fp16: its scripts keep it fp32
    tables, ids_new, originals = [], [], []
    for tok, te in pairs:
        te.to(torch.float32)  # trained (its token table is): stays fp32, run under autocast
        tok.add_tokens([TOKEN])
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        table = te.get_input_embeddings().weight
        new = tok.convert_tokens_to_ids(TOKEN)
        with torch.no_grad():
            table[new] = table[tok.convert_tokens_to_ids("*</w>")]
        table.requires_grad_(True)
        tables.append(table)
        ids_new.append(new)
        originals.append(table.detach().clone())
    optimizer = torch.optim.AdamW(tables, lr=LR, weight_decay=0.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    res = resolution_of(pipe, run)
    images = [i.image for i in data.load_images(run.images)]
    g = torch.Generator().manual_seed(seed)
    t_start = None
    for step in range(run.steps):
        if step == run.warmup:
            t_start = now(run.device)
        idx = torch.randint(len(images), (run.batch,), generator=g)
        views = [data.variants(images[int(i)], res, flip=False)[0] for i in idx]
        flips = torch.rand(run.batch, generator=g) < 0.5
        pixels = data.to_tensor([v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else v
                                 for v, f in zip(views, flips)])
        dist = vae.encode(pixels.to(dev, vae.dtype)).latent_dist
        latents = dist.sample(generator=g).float().cpu() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (run.batch,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        prompts = [data.OBJECT_TEMPLATES[int(k)].replace("[name]", TOKEN)
                   for k in torch.randint(len(data.OBJECT_TEMPLATES), (run.batch,), generator=g)]
        ids = [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(dev) for tok, _ in pairs]
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            hidden, pooled = encode(pairs, ids)
        added = None
        if pooled is not None:
            sizes = [[im.height, im.width, 0, 0, res, res] for im in (images[int(i)] for i in idx)]
            added = {"text_embeds": pooled.to(unet.dtype),
                     "time_ids": torch.tensor(sizes, device=dev, dtype=unet.dtype)}
        pred = unet(noisy.to(dev, unet.dtype), t.to(dev), hidden.to(unet.dtype), added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), target.to(dev).float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        with torch.no_grad():
            for table, new, orig in zip(tables, ids_new, originals):
                keep = torch.ones(len(table), dtype=torch.bool, device=table.device)
                keep[new] = False
                table[keep] = orig[keep]
    return (now(run.device) - t_start) / (run.steps - run.warmup)


def floor_loop(run: Run, precision: str, seed: int = 0) -> float:
    """The work every textual-inversion loop must do: text encoder(s) and UNet forward, backward to
    the prompt's input vectors.  The lower bound on any loop's seconds per step on this model."""
    dtype = DTYPES[precision]
    pipe = load_pipeline(run.model, dtype=dtype, device=run.device)
    freeze(pipe, run)
    if is_flow(pipe):
        return flow_floor_loop(run, pipe, dtype, seed)
    pairs, unet, dev = pairs_of(pipe), pipe.unet, pipe.unet.device
    g = torch.Generator().manual_seed(seed)
    ids = [tok(["a photo of a shape"] * run.batch, padding="max_length", max_length=tok.model_max_length,
               return_tensors="pt").input_ids.to(dev) for tok, _ in pairs]
    size = resolution_of(pipe, run) // pipe.vae_scale_factor
    latents = torch.randn(run.batch, unet.config.in_channels, size, size, generator=g).to(dev, dtype)
    t = torch.randint(0, 1000, (run.batch,), generator=g).to(dev)
    res = size * pipe.vae_scale_factor
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * run.batch, device=dev, dtype=dtype)
    vectors, hooks = input_vectors([te for _, te in pairs], dev)
    try:
        t_start = None
        for step in range(run.steps):
            if step == run.warmup:
                t_start = now(run.device)
            hidden, pooled = encode(pairs, ids)
            added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
            loss = F.mse_loss(unet(latents, t, hidden, added_cond_kwargs=added).sample.float(), latents.float())
            loss.backward()
            for v in vectors:
                v.grad = None
    finally:
        for h in hooks:
            h.remove()
    return (now(run.device) - t_start) / (run.steps - run.warmup)


def input_vectors(encoders, dev) -> tuple[list, list]:
    """A trainable fp32 vector added to every token's input embedding of each encoder (as a
    trigger's vectors are fp32), and the hooks that add them (remove them when done).

    The hook goes on every embedding module that holds the input table: transformers' T5 looks
    its tokens up in ``encoder.embed_tokens``, a module of its own that shares ``shared``'s weight,
    so a hook on ``get_input_embeddings()`` alone never runs there (and T5's backward was skipped)."""
    vectors, hooks = [], []
    for te in encoders:
        weight = te.get_input_embeddings().weight
        vector = torch.zeros(weight.shape[1], device=dev, requires_grad=True)
        for module in (m for m in te.modules() if isinstance(m, torch.nn.Embedding) and m.weight is weight):
            hooks.append(module.register_forward_hook(lambda _m, _i, out, v=vector: out + v.to(out.dtype)))
        vectors.append(vector)
    return vectors, hooks


def timed(run: Run, step: Callable[[], None]) -> float:
    """Seconds per ``step()`` after the warm-up steps."""
    t_start = None
    for i in range(run.steps):
        if i == run.warmup:
            t_start = now(run.device)
        step()
    return (now(run.device) - t_start) / (run.steps - run.warmup)


# ------------------------------------------------------------------------- SD3 and Flux.1 loops
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's guidance input: the Flux script's --guidance_scale default, and textinv's


def flow_floor_loop(run: Run, pipe, dtype: torch.dtype, seed: int = 0) -> float:
    """The floor on SD3/Flux.1: every text encoder (T5 at the pipeline's prompt length, as textinv
    pads) and the transformer forward, backward to one fp32 input vector per encoder."""
    family = families.of_pipeline(pipe)
    slots, recipe, dev = tokens.slot_pairs(pipe, family), flowmatch.recipe_of(family), pipe.transformer.device
    g = torch.Generator().manual_seed(seed)
    ids = [tok(["a photo of a shape"] * run.batch, padding="max_length", truncation=True, return_tensors="pt",
               max_length=prompts.t5_length(pipe) if slot.kind == "t5" else tok.model_max_length).input_ids.to(dev)
           for slot, (tok, _) in slots]
    size = resolution_of(pipe, run) // vae_scale(pipe)
    latents = torch.randn(run.batch, pipe.vae.config.latent_channels, size, size, generator=g).to(dev, dtype)
    schedule = flowmatch.train_schedule(pipe.scheduler.config)
    _, timesteps = flowmatch.schedule_at(schedule, torch.randint(0, len(schedule.timesteps), (run.batch,), generator=g))
    vectors, hooks = input_vectors([te for _, (_, te) in slots], dev)

    def step():
        states, pooled = {}, []
        for (slot, (_, te)), i in zip(slots, ids):
            states[slot.key], pool = prompts.run_flow_encoder(te, slot.kind, i, family.hidden_layer)
            pooled += [] if pool is None else [pool]
        cond = prompts.join_flow(family, states, pooled)
        pred = recipe.predict(pipe, latents, timesteps.to(dev), cond.embeds, cond.pooled, FLUX_GUIDANCE)
        F.mse_loss(pred.float(), latents.float()).backward()
        for v in vectors:
            v.grad = None

    try:
        return timed(run, step)
    finally:
        for h in hooks:
            h.remove()


def vae_scale(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


@dataclass
class NewToken:
    """One encoder's share of the Flux script's ``TokenEmbeddingsHandler``: the whole token table
    trained, the copy it is retracted to after each step, the table's spread then."""

    table: torch.nn.Parameter
    new: int
    original: torch.Tensor
    std: float


def add_token(tok, te, fp16: bool, g: torch.Generator) -> NewToken:
    """``initialize_new_tokens`` for one encoder: the trigger added to the tokenizer as a special
    token, the table resized to the tokenizer (T5: 32,101 rows from 32,128, as with the real
    tokenizer), the new row drawn as the table's std times a normal vector (the script's default
    without --initializer_concept); the table trainable, upcast to fp32 only under fp16."""
    tok.add_tokens([TOKEN], special_tokens=True)
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    table = te.get_input_embeddings().weight
    if fp16:
        table.data = table.data.float()
    new = tok.convert_tokens_to_ids(TOKEN)
    with torch.no_grad():
        std = float(table.float().std())
        table[new] = (torch.randn(table.shape[1], generator=g) * std).to(table.device, table.dtype)
    table.requires_grad_(True)
    return NewToken(table, new, table.detach().clone(), std)


@torch.no_grad()
def retract(word: NewToken) -> None:
    """``retract_embeddings``: every other row back to its original; the new row's spread pulled a
    tenth of the way (in log) back to the table's."""
    keep = torch.ones(len(word.table), dtype=torch.bool, device=word.table.device)
    keep[word.new] = False
    word.table[keep] = word.original[keep]
    rows = word.table[~keep]
    word.table[~keep] = rows * (word.std / rows.float().std()) ** 0.1


def script_conditioning(family: families.Family, slots, ids: list[torch.Tensor]):
    """The scripts' ``encode_prompt`` on ids: Flux.1, CLIP-L's pooled output and T5's last hidden
    states; SD3, both CLIPs' penultimate states side by side, zero-padded to T5's width, before T5's
    along the sequence, and both projected pooled outputs side by side."""
    clip, pooled, t5 = [], [], None
    for (slot, (_, te)), i in zip(slots, ids):
        if slot.kind == "t5":
            t5 = te(i)[0]
        elif family.joins == "flux":
            pooled.append(te(i, output_hidden_states=False).pooler_output)
        else:
            out = te(i, output_hidden_states=True)
            pooled.append(out[0])
            clip.append(out.hidden_states[-2])
    if family.joins == "flux":
        return t5, pooled[0]
    joined = torch.cat(clip, dim=-1)
    joined = F.pad(joined, (0, t5.shape[-1] - joined.shape[-1]))
    return torch.cat([joined, t5], dim=-2), torch.cat(pooled, dim=-1)


def draw_batch(images: list, res: int, batch: int, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """A step's images (random picks, centre crops at ``res``, random flips, in [-1, 1]) and prompts
    (random object templates naming the trigger)."""
    idx = torch.randint(len(images), (batch,), generator=g)
    views = [data.variants(images[int(i)], res, flip=False)[0] for i in idx]
    flips = torch.rand(batch, generator=g) < 0.5
    pixels = data.to_tensor([v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else v for v, f in zip(views, flips)])
    texts = [data.OBJECT_TEMPLATES[int(k)].replace("[name]", TOKEN)
             for k in torch.randint(len(data.OBJECT_TEMPLATES), (batch,), generator=g)]
    return pixels, texts


def flow_reference_loop(run: Run, pipe, dtype: torch.dtype, seed: int = 0) -> float:
    """The common recipe on SD3/Flux.1: the pure textual inversion of diffusers'
    examples/advanced_diffusion_training/train_dreambooth_lora_flux_advanced.py (``--train_text_encoder_ti
    --enable_t5_ti --train_transformer_frac 0 --num_new_tokens_per_abstraction 1``, read at commit
    58eb52c), step for step in our own words:

    * set-up: one new token per encoder, each whole table trainable (:func:`add_token`) and all of
      them in one AdamW (weight decay 1e-3, its text-encoder default); every network cast to the
      run's dtype, the tables upcast to fp32 only under fp16 (so under bf16 they train in bf16);
      the encoders and the transformer in train mode (T5's dropout on), their forward passes under
      autocast (what accelerate's ``prepare`` adds), a GradScaler for fp16;
    * every step: the prompts tokenised (CLIP padded to 77, T5 to ``max_sequence_length`` 512,
      special tokens added) and encoded with gradients (:func:`script_conditioning`); the images
      VAE-encoded (no ``--cache_latents``); the flow-matching loss (:func:`flow_reference_loss`);
      backward, the tables' gradients clipped to norm 1, the optimizer step, and every table
      retracted (:func:`retract`).

    SD3 has no textual-inversion script in diffusers: the same recipe with its CLIP-L/CLIP-G/T5
    tables, encode_prompt layout and loss from examples/dreambooth/train_dreambooth_lora_sd3.py
    (logit-normal σ, preconditioned outputs, the VAE kept fp32); T5 padded to the SD3 pipeline's 256
    tokens — the script's --max_sequence_length, whose default 77 would give the reference less work
    than textinv, which pads as the pipeline samples.  The learning rate is every loop's ``LR``."""
    family = families.of_pipeline(pipe)
    slots = tokens.slot_pairs(pipe, family)
    fp16, dev = dtype == torch.float16, pipe.transformer.device
    g = torch.Generator().manual_seed(seed)
    if family.joins == "sd3":
        pipe.vae.to(torch.float32)  # the SD3 script's VAE stays fp32; the Flux script casts it with the rest
    words = [add_token(tok, te, fp16, g) for _, (tok, te) in slots]
    for module in [te for _, (_, te) in slots] + [pipe.transformer]:
        module.train()
    tables = [w.table for w in words]
    optimizer = torch.optim.AdamW(tables, lr=LR, weight_decay=1e-3)
    scaler = torch.amp.GradScaler(dev.type, enabled=fp16)
    lengths = [prompts.t5_length(pipe) if slot.kind == "t5" else 77 for slot, _ in slots]
    images, res = [i.image for i in data.load_images(run.images)], resolution_of(pipe, run)
    schedule = flowmatch.train_schedule(pipe.scheduler.config)  # the script's noise_scheduler_copy
    noise_g = torch.Generator(dev).manual_seed(seed)  # the noise and σ are drawn where the latents are

    def step():
        pixels, texts = draw_batch(images, res, run.batch, g)
        ids = [tok(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids.to(dev)
               for (_, (tok, _)), n in zip(slots, lengths)]
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            cond = script_conditioning(family, slots, ids)
        loss = flow_reference_loss(pipe, family, schedule, pixels, cond, dtype, noise_g)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(tables, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        for w in words:
            retract(w)

    return timed(run, step)


def flow_reference_loss(pipe, family: families.Family, schedule, pixels: torch.Tensor, cond, dtype: torch.dtype,
                        g: torch.Generator) -> torch.Tensor:
    """The scripts' loss: a posterior sample of the VAE, shifted and scaled; noise and a schedule
    index (Flux: uniform, SD3: logit-normal); the straight-line mix; the transformer's prediction
    (Flux.1: packed, timesteps / 1000, guidance 3.5); the velocity target (SD3: preconditioned to
    x0) and the per-sample weighted mean in fp32."""
    vae, dev, recipe = pipe.vae, pipe.transformer.device, flowmatch.recipe_of(family)
    with torch.no_grad():
        z = vae.encode(pixels.to(dev, vae.dtype)).latent_dist.sample(generator=g)
    z = ((z - vae.config.shift_factor) * vae.config.scaling_factor).to(dtype)
    noise, indices = flowmatch.draw(z, schedule.config.num_train_timesteps, recipe.weighting, generator=g)
    sigmas, timesteps = flowmatch.schedule_at(schedule, indices)
    sigmas = sigmas.to(dev, dtype).view(-1, 1, 1, 1)
    x = flowmatch.noisy(z, noise, sigmas)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = recipe.predict(pipe, x, timesteps.to(dev), *cond, FLUX_GUIDANCE)
    if recipe.precondition:
        pred, target = pred * (-sigmas) + x, z
    else:
        target = flowmatch.velocity(z, noise)
    return flowmatch.weighted_mse(pred, target, flowmatch.loss_weights(recipe.weighting, sigmas))


def measure(kind: str, run: Run, precision: str) -> dict:
    """One loop: seconds per step, and peak memory from before its model loads."""
    loop = {"textinv": textinv_loop, "reference": reference_loop, "floor": floor_loop}[kind]
    gc.collect()
    if run.device.startswith("cuda"):
        torch.cuda.empty_cache()
    try:
        with PeakMemory(run.device) as mem:
            seconds = loop(run, precision)
    except Exception as e:  # one loop failing (NaN, out of memory) still leaves the rest of the table
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]}
    return {"s_step": seconds, "peak_mb": mem.mb}


def _child(answer, kind: str, run: dict, precision: str) -> None:
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    answer.send(measure(kind, Run(**run), precision))


def measure_isolated(kind: str, run: Run, precision: str) -> dict:
    """:func:`measure` in a fresh (spawned) process: its resident-memory peak is its own."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    answer, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_end, kind, asdict(run), precision), daemon=True)
    proc.start()
    try:
        while True:
            if answer.poll(1.0):
                return answer.recv()
            if not proc.is_alive():  # killed (out of memory) before it could answer
                return {"error": f"the process died (exit code {proc.exitcode})"}
    finally:  # also when interrupted: the child stops with this process
        if proc.is_alive():
            proc.terminate()
        proc.join()


# ------------------------------------------------------------------------------------- reporting
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX).  Without it PyTorch emulates
    bf16: a 3x3 convolution ran ~100x slower than in fp32 on an AVX2 machine, hours per full-size step."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # cannot tell: try it
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def row(arch: str, precision: str, kind: str, r: dict, ratios: str = "") -> str:
    if "error" in r:
        return f"{arch:<6}{precision:<6}{kind:<11}{'failed: ' + r['error']}"
    return f"{arch:<6}{precision:<6}{kind:<11}{r['s_step']:>9.3f}{r['peak_mb'] / 1024:>10.2f}  {ratios}"


def ratios(results: dict) -> str:
    ours, ref, floor = (results.get(k, {}).get("s_step") for k in LOOPS)
    ref_ours = f"{ref / ours:.2f}x" if ours and ref else "-"
    ours_floor = f"{ours / floor:.2f}x" if ours and floor else "-"
    return f"{ref_ours:>12}{ours_floor:>14}"


HEADER = f"{'arch':<6}{'prec':<6}{'loop':<11}{'s/step':>9}{'peak GB':>10}  {'ref/textinv':>12}{'textinv/floor':>14}"


def benchmark(arch: str, run: Run, precisions: list[str], isolate: bool) -> list[str]:
    """All loops for each precision; prints each row as it comes, returns the table's lines."""
    lines = []
    for precision in precisions:
        results = {}
        for kind in LOOPS:
            results[kind] = (measure_isolated if isolate else measure)(kind, run, precision)
            print(row(arch, precision, kind, results[kind]), flush=True)
        lines += [row(arch, precision, kind, results[kind], ratios(results) if kind == "textinv" else "")
                  for kind in LOOPS]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a diffusers folder (default: the built-in mini model)")
    ap.add_argument("--arch", choices=ARCHS, default=None, help="build this architecture with random weights instead")
    ap.add_argument("--tiny", action="store_true", help="with --arch: the same layout at toy widths (tests)")
    ap.add_argument("--blocks", type=int, default=None,
                    help="sd3/flux: transformer blocks to build (flux: double blocks, and twice as many single "
                         f"ones); default: all on CUDA, {CPU_DEPTH['sd3'][0]} (sd3) / {CPU_DEPTH['flux'][0]} (flux) "
                         "on a CPU")
    ap.add_argument("--t5-layers", type=int, default=None,
                    help=f"sd3/flux: T5 layers to build (of 24); default: all on CUDA, {CPU_DEPTH['sd3'][1]} on a CPU")
    ap.add_argument("--images", type=Path, default=None, help="default: 5 synthetic images")
    ap.add_argument("--steps", type=int, default=None,
                    help="default: 60 (mini), 3 (--arch on a CPU), 20 (--arch on CUDA)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="default: 10 (mini), 1 (--arch on a CPU), 5 (--arch on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 (mini), 1 (--arch)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="default: native; 512 for --arch on a CPU, 64 with --tiny")
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16 (fp16: CUDA only)")
    ap.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="the UNet's or transformer's, in all three loops (default: on for sdxl on a CPU and for "
                         "flux on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    fill_defaults(args)
    args.precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in args.precisions if p not in DTYPES]
    if bad or not 1 <= args.warmup < args.steps:
        ap.error(f"--precision {args.precision!r}: choose from {', '.join(DTYPES)}" if bad
                 else "--warmup must be at least 1 and below --steps")
    if args.model and args.arch:
        ap.error("--model or --arch, not both")
    depth = [v for v in (args.blocks, args.t5_layers) if v is not None]
    if depth and (args.arch not in FLOW_ARCHS or args.tiny):
        ap.error("--blocks and --t5-layers: for --arch sd3 or flux at full width (not --tiny)")
    if any(v < 1 for v in depth):
        ap.error("--blocks and --t5-layers: at least 1")
    return args


def fill_defaults(args) -> None:
    """The defaults that depend on the model and device (see each option's help)."""
    cpu = args.device == "cpu"
    full = args.arch is not None and not args.tiny
    steps, warmup, batch = (60, 10, 4) if not full else (3, 1, 1) if cpu else (20, 5, 1)
    args.steps = args.steps or steps
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.batch = args.batch or batch
    if args.resolution is None and full and cpu:
        args.resolution = 512
    if args.resolution is None and args.tiny:
        args.resolution = 64  # tiny networks; Flux.1's native 1024 would be most of a test's time
    if args.grad_checkpointing is None:  # SDXL in a CPU's RAM; all of FLUX.1-dev on an 80 GB card
        args.grad_checkpointing = full and ((cpu and args.arch == "sdxl") or (not cpu and args.arch == "flux"))
    args.depth_default = full and cpu and args.arch in FLOW_ARCHS and None in (args.blocks, args.t5_layers)
    if args.depth_default:  # each one not given takes the CPU default
        blocks, t5_layers = CPU_DEPTH[args.arch]
        args.blocks = blocks if args.blocks is None else args.blocks
        args.t5_layers = t5_layers if args.t5_layers is None else args.t5_layers


def arch_plan(args) -> tuple[dict, str | None]:
    """The config ``--arch`` builds, and a line saying plainly what of the released model it leaves
    out (None: nothing)."""
    cfg = arch_config(args.arch)
    if args.tiny:
        return tiny(cfg), None
    if args.arch not in FLOW_ARCHS:
        return cfg, None
    smaller, kept = shallower(cfg, args.blocks, args.t5_layers)
    if kept is None:
        return cfg, None
    why = ("the full model does not fit 24 GB in fp32 (the CPU default; --blocks and --t5-layers set it)"
           if args.depth_default else "as --blocks / --t5-layers ask")
    full = parameter_counts(cfg)
    return smaller, (f"{args.arch}: {kept} — {why}; released: transformer {full['transformer'] / 1e9:.2f} B, "
                     f"T5 {full[t5_part(cfg)] / 1e9:.2f} B parameters")


def build_model(args, cfg: dict, folder: Path) -> str:
    """Build and save ``cfg`` (SD3/Flux.1 in bf16, as released; see the module docstring)."""
    name = args.arch + (" (tiny)" if args.tiny else "")
    print(f"building {name} with random weights: "
          + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in parameter_counts(cfg).items()), flush=True)
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if args.arch in FLOW_ARCHS and not args.tiny else torch.float32
    model = str(save_arch(cfg, folder, device=args.device, dtype=dtype))
    print(f"  built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
    return model


def usable_precisions(args) -> list[str]:
    """The asked precisions less those that cannot finish here, each with the reason printed."""
    keep = list(args.precisions)
    if args.device == "cpu" and "fp16" in keep:
        print("fp16 skipped: textinv refuses half precision on a CPU (tens of times slower than fp32)")
        keep.remove("fp16")
    if args.device == "cpu" and "bf16" in keep and args.arch and not args.tiny and not cpu_has_bf16():
        print("bf16 skipped: this CPU has no bf16 instructions (avx512_bf16 / amx_bf16); PyTorch emulates them and "
              "the UNet's convolutions run ~100x slower than fp32 (hours per step at full size)")
        keep.remove("bf16")
    return keep


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its torchvision notice, once per child process
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()  # save_pretrained's shard bars
    dlog.set_verbosity_error()  # casting a freshly built network to bf16: diffusers' advice on loading, not ours
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # textinv (accelerate) and the child processes stay on the CPU too
    cfg, left_out = arch_plan(args) if args.arch else (None, None)
    if left_out:
        print(left_out, flush=True)  # the first line: these figures are not the whole model's
    precisions = usable_precisions(args)
    if not precisions:
        return 1
    signal.signal(signal.SIGTERM, _interrupt)  # a kill still removes the (multi-GB) model folder
    tmp = Path(tempfile.mkdtemp(prefix="textinv-bench-"))
    try:
        model = build_model(args, cfg, tmp / "model") if args.arch else args.model
        name = args.arch + (" (tiny)" if args.tiny else "") if args.arch else args.model or "mini"
        name += " (fewer blocks: see the first line)" if left_out else ""
        # textinv VAE-encodes every view once before its first step: with --arch, 2 images (4 views at full size)
        images = args.images or synthetic_images(tmp / "images", n=2 if args.arch else 5)
        run = Run(model=model, images=str(images), out=str(tmp / "runs"), device=args.device, steps=args.steps,
                  warmup=args.warmup, batch=args.batch, resolution=args.resolution,
                  grad_checkpointing=args.grad_checkpointing)
        isolate = args.device == "cpu"
        device = f"{args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else args.device
        print(f"model {name}, resolution {args.resolution or 'native'}, batch {args.batch}, {args.steps} steps "
              f"({args.warmup} warm-up), device {device}, torch threads {torch.get_num_threads()}, "
              f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}, "
              f"{'each loop in its own process' if isolate else 'one process'}\n{HEADER}", flush=True)
        lines = benchmark(args.arch or "mini", run, precisions, isolate)
    except KeyboardInterrupt:  # a time limit (gpu_check.sh) or Ctrl-C: the rows printed so far stand
        print("interrupted: the rows above are what was measured", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{HEADER}\n" + "\n".join(lines))
    print("s/step: steady state, after the warm-up steps; peak GB: from before the model loads (weights + "
          "training); ref/textinv: how many times longer a reference step takes; textinv/floor: 1.00x = no loop "
          "overhead beyond the text encoder(s) + UNet/transformer forward/backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
