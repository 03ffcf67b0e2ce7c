"""textinv's training loop against the common recipe, same model, batch and step count.

Three loops, each timed in steady state (after warm-up steps), with its peak memory:

* textinv: ``textinv.train`` itself, loading the model through its ordinary path (``--precision``
  for the frozen model; the learned vectors stay fp32).
* reference: what diffusers' textual_inversion.py / textual_inversion_sdxl.py (and most tutorials)
  do: tokenise every step, VAE-encode the batch every step, put the whole token table(s) in AdamW
  and copy the original rows back over every untouched row after each step.  Precision as those
  scripts use it: UNet and VAE cast to the half dtype, the text encoder (whose table is trained)
  kept fp32 and run under autocast, a GradScaler for fp16.
* floor: the text encoder(s) and UNet forward and backward to one fp32 input vector per encoder,
  the model in the run's dtype, nothing else: no data, no noise schedule, no optimizer.  No loop
  on this model can be faster; ``textinv/floor`` says how close textinv comes.

Peak memory counts from before the model loads (weights + training).  On a CPU it is the sampled
resident size, so each loop runs in a fresh child process: memory freed by an earlier loop cannot
hide in the allocator.  On CUDA it is the allocator's peak, and the loops share this process.

``--arch sd15|sd21|sdxl`` builds that architecture from its published configs with random weights
(nothing is downloaded), saves it as a diffusers folder (fp32 safetensors, in a temporary folder)
and benchmarks it; ``--tiny`` keeps the layout at toy widths (for tests).  Asserts nothing.

    python benchmarks/train_speed.py                 # the built-in mini model
    python benchmarks/train_speed.py --model PATH --steps 60 --batch 4
    python benchmarks/train_speed.py --arch sd15 --steps 3 --warmup 1 --batch 1 --precision fp32,bf16
    python benchmarks/train_speed.py --arch sdxl --device cuda --precision fp32,bf16,fp16 --steps 20 --warmup 5
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from textinv import data
from textinv.models import DTYPES, MINI_PATH, load_pipeline
from textinv.training import train

ARCHS = ("sd15", "sd21", "sdxl")
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
    """
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


def tiny(cfg: dict) -> dict:
    """The same layout at toy widths: every block type, conditioning path and config quirk of the
    architecture kept, small enough that a test trains a step in seconds."""
    cfg = copy.deepcopy(cfg)
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        if name in cfg:
            width = 32 if cfg[name]["hidden_size"] == 768 else 48
            cfg[name].update(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                             projection_dim=width)
            widths.append(width)
    unet = cfg["unet"]
    channels = [c // 10 for c in unet["block_out_channels"]]
    unet.update(block_out_channels=channels, attention_head_dim=[c // 16 for c in channels], norm_num_groups=8,
                layers_per_block=1, sample_size=8, cross_attention_dim=sum(widths))
    if "transformer_layers_per_block" in unet:
        unet["transformer_layers_per_block"] = [min(n, 2) for n in unet["transformer_layers_per_block"]]
    if unet.get("addition_embed_type") == "text_time":  # 6 size/crop numbers x time features + pooled text
        unet.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + widths[-1])
    cfg["vae"].update(block_out_channels=[8, 16, 16, 16], norm_num_groups=8, layers_per_block=1, sample_size=64)
    return cfg


def build(name: str, part: dict):
    """One network of a pipeline from its config dict, with random weights."""
    if name == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**part)
    if name == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**part)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel  # SDXL pools the second one
    return cls(CLIPTextConfig(**part)).eval()


def parameter_counts(cfg: dict) -> dict[str, int]:
    """Parameters per network, counted on the meta device: no memory, no time."""
    counts = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in cfg:
            with torch.device("meta"):
                counts[name] = sum(p.numel() for p in build(name, cfg[name]).parameters())
    return counts


def save_arch(cfg: dict, folder: Path, seed: int = 0, device: str = "cpu") -> Path:
    """Write ``cfg`` as a diffusers folder with random fp32 weights, one network at a time (SDXL in
    fp32 is ~14 GB: only the largest part, the UNet, is ever in memory).  On a GPU the random
    initialisation runs there (seconds instead of minutes for SDXL)."""
    import diffusers
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": cfg["pipeline"], "_diffusers_version": diffusers.__version__}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in cfg:
            torch.manual_seed(seed)
            with torch.device(device):
                model = build(name, cfg[name])
            model.save_pretrained(folder / name)
            library = "diffusers" if name in ("unet", "vae") else "transformers"
            index[name] = [library, type(model).__name__]
            del model  # freed here: the next network is built in its place
    for name in ("tokenizer", "tokenizer_2"):
        if name in cfg:  # the real CLIP BPE vocabulary (49,408 tokens), shipped with the built-in model
            CLIPTokenizer.from_pretrained(MINI_PATH / "tokenizer", **cfg[name]).save_pretrained(folder / name)
            index[name] = ["transformers", "CLIPTokenizer"]
    scheduler = dict(cfg["scheduler"])
    cls = getattr(diffusers, scheduler.pop("_class_name"))
    cls.from_config(scheduler).save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", cls.__name__]
    if cfg["pipeline"] == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
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
    return run.resolution or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


def freeze(pipe, run: Run) -> None:
    for _, te in pairs_of(pipe):
        te.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    if run.grad_checkpointing:
        pipe.unet.enable_gradient_checkpointing()


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
    pairs, unet, dev = pairs_of(pipe), pipe.unet, pipe.unet.device
    g = torch.Generator().manual_seed(seed)
    ids = [tok(["a photo of a shape"] * run.batch, padding="max_length", max_length=tok.model_max_length,
               return_tensors="pt").input_ids.to(dev) for tok, _ in pairs]
    size = resolution_of(pipe, run) // pipe.vae_scale_factor
    latents = torch.randn(run.batch, unet.config.in_channels, size, size, generator=g).to(dev, dtype)
    t = torch.randint(0, 1000, (run.batch,), generator=g).to(dev)
    res = size * pipe.vae_scale_factor
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * run.batch, device=dev, dtype=dtype)
    vectors, hooks = [], []
    for _, te in pairs:  # a trainable fp32 input, as a trigger's vectors are
        table = te.get_input_embeddings()
        vector = torch.zeros(table.embedding_dim, device=dev, requires_grad=True)
        hooks.append(table.register_forward_hook(lambda _m, _i, out, v=vector: out + v.to(out.dtype)))
        vectors.append(vector)
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
    ap.add_argument("--images", type=Path, default=None, help="default: 5 synthetic images")
    ap.add_argument("--steps", type=int, default=None,
                    help="default: 60 (mini), 3 (--arch on a CPU), 20 (--arch on CUDA)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="default: 10 (mini), 1 (--arch on a CPU), 5 (--arch on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 (mini), 1 (--arch)")
    ap.add_argument("--resolution", type=int, default=None, help="default: native; 512 for --arch on a CPU")
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16 (fp16: CUDA only)")
    ap.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="the UNet's, in all three loops (default: on for sdxl on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    full = args.arch is not None and not args.tiny
    steps, warmup, batch = (60, 10, 4) if not full else (3, 1, 1) if cpu else (20, 5, 1)
    args.steps = args.steps or steps
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.batch = args.batch or batch
    if args.resolution is None and full and cpu:
        args.resolution = 512
    if args.grad_checkpointing is None:
        args.grad_checkpointing = full and cpu and args.arch == "sdxl"
    args.precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in args.precisions if p not in DTYPES]
    if bad or not 1 <= args.warmup < args.steps:
        ap.error(f"--precision {args.precision!r}: choose from {', '.join(DTYPES)}" if bad
                 else "--warmup must be at least 1 and below --steps")
    if args.model and args.arch:
        ap.error("--model or --arch, not both")
    return args


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
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()  # save_pretrained's shard bars
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # textinv (accelerate) and the child processes stay on the CPU too
    precisions = usable_precisions(args)
    if not precisions:
        return 1
    signal.signal(signal.SIGTERM, _interrupt)  # a kill still removes the (multi-GB) model folder
    tmp = Path(tempfile.mkdtemp(prefix="textinv-bench-"))
    try:
        model, name = args.model, args.model or "mini"
        if args.arch:
            cfg = tiny(arch_config(args.arch)) if args.tiny else arch_config(args.arch)
            name = args.arch + (" (tiny)" if args.tiny else "")
            print(f"building {name} with random weights: "
                  + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in parameter_counts(cfg).items()), flush=True)
            t0 = time.perf_counter()
            model = str(save_arch(cfg, tmp / "model", device=args.device))
            print(f"  built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
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
          "overhead beyond the text encoder + UNet forward/backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
