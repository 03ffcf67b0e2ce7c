"""Generation with trigger words: fixed-seed, batched sampling through any diffusers pipeline."""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from tqdm.auto import tqdm

from . import families, formats, pngmeta, prompts, samplers, tokens
from .errors import TextinvError
from .images import grid as make_grid
from .models import defaults, load_pipeline, pipeline_defaults, resolve_model, warn_outside_world
from .prompts import pick_variant
from .sources import load as load_source, warn_skipped
from .spread import ALONE, Share
from .version import __version__

DEFAULT_STEPS = 30


def clip_skip_kwargs(pipe, prompts_: list[str], negative: str | None, clip_skip: int) -> dict:
    """What a pipeline call needs for A1111's "Clip skip: N": nothing at 1, else the prompt embeddings.

    diffusers' own ``clip_skip`` (N - 1) reaches for ``text_encoder.text_model``, which
    transformers 5's CLIPTextModel no longer has; textinv encodes the prompts itself instead.
    """
    if clip_skip == 1:
        return {}
    prompts.check_clip_skip(pipe, clip_skip)
    encoded, _used = _prompt_arguments(pipe, [(p, negative) for p in prompts_], clip_skip)  # each once, one length
    parts = [encoded[(p, negative)] for p in prompts_]
    return {k: torch.cat([kw[k] for kw in parts]) for k in parts[0]}


@torch.no_grad()
def images(pipe, prompts: list[str], *, seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float | None = None,
           negative: str | None = None, batch: int = 32, progress: bool = False, clip_skip: int = 1,
           bar=None) -> list[Image.Image]:
    """One image per prompt; image ``i`` always uses seed ``seed + i``, whatever the batching.
    ``guidance`` None: the model's own default (:func:`textinv.models.pipeline_defaults`).
    ``bar``: a caller's :func:`step_bar` to advance (a phase of several calls under one bar)."""
    if guidance is None:
        guidance = pipeline_defaults(pipe).guidance
    prompts = [pick_variant(p, i) for i, p in enumerate(prompts)]  # {a|b}: image i takes option i mod k

    extra = {"true_cfg_scale": guidance} if _true_cfg(pipe) else {}  # guided against the negative prompt

    def call(i: int, b: int) -> dict:
        chunk = prompts[i : i + b]
        return clip_skip_kwargs(pipe, chunk, negative, clip_skip) or {
            "prompt": chunk, "negative_prompt": [negative or ""] * b if negative or extra else None}

    width, height = default_size(pipe)
    return sample(pipe, len(prompts), call, seed=seed, steps=steps, guidance=guidance, batch=batch, progress=progress,
                  bar=bar, width=width, height=height, **extra)


def steps_per_image(pipe, steps: int) -> int:
    """The sampler steps one image really takes for ``steps`` (the scheduler says: some take more)."""
    pipe.scheduler.set_timesteps(steps)
    return len(pipe.scheduler.timesteps)


def step_bar(pipe, steps: int, images: int, desc: str, progress: bool = True, leave: bool = True):
    """A progress bar on stderr over the sampler steps of ``images`` images, which :func:`sample`
    advances by a batch's size at each step, so that a finished bar reads total/total.  Give it to
    several calls (``bar=``) to show a phase of several prompts as one bar.  Disabled (drawing
    nothing, asking the scheduler nothing) without ``progress``."""
    total = images * (steps_per_image(pipe, steps) if progress else steps)
    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=leave, dynamic_ncols=True,
                mininterval=0.5)


def batch_starts(n: int, batch: int) -> list[int]:
    """The first image of each pipeline call that makes ``n`` images ``batch`` at a time."""
    return list(range(0, n, batch))


def sample(pipe, n: int, call, *, seed: int, steps: int, guidance: float, batch: int, progress: bool = False,
           bar=None, starts: list[int] | None = None, **extra) -> list[Image.Image]:
    """The seeded batch loop: image ``i`` uses a generator seeded ``seed + i`` whatever the batch
    size, so a batch of 8 and 8 single calls give the same images.  ``call(i, b)`` gives the
    pipeline arguments (prompts or prompt embeddings) of images ``i … i+b-1``.  ``starts``: only
    the batches that begin at these images (:func:`batch_starts`; None: all).  Progress: the
    caller's ``bar`` (:func:`step_bar`), else with ``progress`` a bar of its own."""
    starts = batch_starts(n, batch) if starts is None else starts
    own = bar is None
    if own:
        made = sum(min(batch, n - i) for i in starts)
        bar = step_bar(pipe, steps, made, f"sampling {made} image{'s' if made != 1 else ''}", progress)
    b = 0  # the batch being sampled: each of its images took the step

    def on_step(_pipe, _i, _t, kw):
        bar.update(b)  # (tqdm's update returns whether it redrew: never the callback's value)
        return kw

    if not bar.disable:
        extra["callback_on_step_end"] = on_step
    if _flow(pipe):  # prompts the pipeline encodes itself: at the model's own T5 length
        extra.setdefault("max_sequence_length", prompts.t5_length(pipe))
    out: list[Image.Image] = []
    for i in starts:
        b = min(batch, n - i)
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(b)]
        out += pipe(**call(i, b), num_inference_steps=steps, guidance_scale=guidance, generator=gens, **extra).images
    if own:
        bar.close()
    return out


# ------------------------------------------------------------------------------------------
# textinv generate: A1111-style prompts, embeddings from files and libraries, PNG parameters
# ------------------------------------------------------------------------------------------

UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
              "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


@dataclass
class Generation:
    """What :func:`generate` made: images, their seeds and infotexts, and the files written."""

    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]
    files: list[Path] = field(default_factory=list)
    grid: Path | None = None
    used: list[str] = field(default_factory=list)  # embeddings the prompt or negative prompt called


def model_identity(model) -> tuple[str | None, str | None]:
    """(A1111 ``Model`` name, ``Model hash``) of a ``--model`` value.

    The hash is A1111's: the first 10 hex digits of the checkpoint file's sha256.  A diffusers
    folder has no single checkpoint, so its UNet weights file is hashed instead; a hub id is
    hashed from its locally cached UNet file when there is one.
    """
    where = Path(resolve_model(model))
    name = where.stem if where.is_file() else where.name
    unet = None
    if where.is_file():
        unet = where
    elif where.is_dir():
        unet = next((where / "unet" / f for f in UNET_FILES if (where / "unet" / f).is_file()), None)
    elif str(model).count("/") == 1:
        name = str(model)
        try:
            for f in UNET_FILES:
                hit = try_to_load_from_cache(str(model), f"unet/{f}")
                if isinstance(hit, str):
                    unet = Path(hit)
                    break
        except Exception:  # noqa: BLE001 - a hash is a courtesy; never fail generation for it
            unet = None
    return name, (formats.cached_sha256(unet)[:10] if unet is not None else None)


def load_embeddings(sources) -> list:
    """Embeddings from Embedding objects or what :func:`textinv.sources.resolve` takes (files, library
    folders, training runs and RUN@STEP, hub ids, URLs); an empty library is an error."""
    if sources is None:
        return []
    if isinstance(sources, (str, os.PathLike, formats.Embedding)):
        sources = [sources]
    out = []
    for src in sources:
        if isinstance(src, formats.Embedding):
            out.append(src)
            continue
        found = load_source(src, on_error=warn_skipped)
        if not found:
            raise TextinvError(f"{src}: no embedding files found")
        out.extend(found)
    return out


def parse_size(size) -> tuple[int, int] | None:
    if size is None or isinstance(size, tuple):
        return size
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(size))
    if not m or int(m.group(1)) % 8 or int(m.group(2)) % 8 or not int(m.group(1)) or not int(m.group(2)):
        raise TextinvError(f"--size: expected WxH with multiples of 8 like 512x512, got {size!r}")
    return int(m.group(1)), int(m.group(2))


def _next_index(out: Path) -> int:
    taken = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))] if out.is_dir() else []
    return max(taken, default=-1) + 1


def denoiser(pipe):
    """The pipeline's denoising network: the UNet (SD, SDXL) or the transformer (SD3, Flux.1)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def default_size(pipe) -> tuple[int, int]:
    """(width, height) the model was made for: its settings' image size (the mini models'), else its
    denoiser's sample size in pixels (FluxPipeline states one for all Flux.1 models: 1024)."""
    scope = pipeline_defaults(pipe).scope
    if scope is not None:
        return (int(scope.image_size),) * 2
    size = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size
    return (int(size) * getattr(pipe, "vae_scale_factor", 8),) * 2


def _flow(pipe) -> bool:
    return families.of_pipeline(pipe).joins != "unet"


def _true_cfg(pipe) -> bool:
    """A Flux.1-shaped model whose settings ask for classifier-free guidance against a negative
    prompt ("true CFG"): one that is not guidance-distilled, as the mini-flow model."""
    return (families.of_pipeline(pipe).joins == "flux" and not denoiser(pipe).config.guidance_embeds
            and pipeline_defaults(pipe).true_cfg)


def _long(pipe, *parsed) -> bool:
    tok = tokens.encoder_pairs(pipe)[0][0]
    return any(len(prompts.chunks(p, tok)) > 1 for p in parsed)


@torch.no_grad()
def generate(prompt: str, negative: str | None = None, *, embeddings=None, model=None, pipe=None, n: int = 1,
             seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float | None = None, sampler: str | None = None,
             size=None, out: str | os.PathLike | None = None, batch: int = 8, progress: bool = False,
             clip_skip: int = 1, model_config=None, bar=None, share: Share = ALONE) -> Generation:
    """Generate ``n`` images of an A1111-style prompt (weights, long prompts, embedding triggers).

    ``embeddings``: files, library folders or Embedding objects, applied for this call only (made
    for another model family: skipped with a warning); embeddings already applied to ``pipe`` work
    too.  Image ``i`` uses seed ``seed + i``.  ``sampler``: an A1111 name (see
    :mod:`textinv.samplers`; default: the model's own scheduler).  With ``out``, every image is
    written as ``NNNNN-SEED.png`` carrying A1111's ``parameters`` chunk, plus ``grid-NNNNN.png``.
    ``clip_skip``: A1111's "Clip skip" (SD 1.x/2.x).  ``model_config``: a single-file ``model``'s
    diffusers config folder or hub id (see :func:`textinv.models.load_pipeline`).  ``progress``: a
    bar on stderr; ``bar``: a caller's :func:`step_bar` to advance instead.  ``share``: the batches
    spread over the processes of ``accelerate launch`` (:mod:`textinv.spread`); the main process
    gathers every image and writes, the others' Generation holds none.
    """
    if n < 1 or batch < 1 or steps < 1:
        raise TextinvError(f"-n, --batch and --steps must be at least 1 (got {n}, {batch}, {steps})")
    wh = parse_size(size)
    embs = load_embeddings(embeddings)
    if pipe is None:
        pipe = load_pipeline(model, config=model_config, device=share.device or "cpu")
    where = model if model is not None else getattr(pipe, "name_or_path", None)  # what the pipeline was loaded from
    name, model_hash = model_identity(where) if where else (None, None)
    if guidance is None:  # the model's own, else A1111's
        guidance = (defaults(model) if model is not None else pipeline_defaults(pipe)).guidance
    width, height = wh or default_size(pipe)
    added = tokens.apply(pipe, embs, on_mismatch="skip") if embs else []
    if embs and not added:
        raise TextinvError(f"none of the {len(embs)} embeddings given fits this model ({tokens.state(pipe).family}): nothing to use")
    starts = share.mine(batch_starts(n, batch))  # this process's batches (alone: all)
    triggers = [t for a in tokens.state(pipe).applied.values() for t in [a.embedding.name, *a.tokens]]
    warn_outside_world(pipe, prompts=[prompt, negative or ""], triggers=triggers, where="PROMPT")
    try:
        images_, pairs, used, sampler_name = _render(pipe, prompt, negative, n, sampler, clip_skip, seed=seed, steps=steps,
                                                     guidance=guidance, batch=batch, progress=progress, bar=bar,
                                                     width=width, height=height, starts=starts)
    finally:
        if added:
            tokens.remove(pipe, [a.embedding.name for a in added])
    ti = {a.embedding.name: h for a in used if (h := formats.embedding_hash(a.embedding))}
    images_ = _gathered(images_, starts, batch, n, share)  # every image on the main process, none elsewhere
    seeds = [seed + i for i in range(len(images_))]
    params = [_parameters(p, q, steps, sampler_name, guidance, s, width, height, model_hash, name, clip_skip, ti)
              for s, (p, q) in zip(seeds, pairs)]  # the options drawn, as A1111's Dynamic Prompts writes them
    result = Generation(images_, seeds, params, used=[a.embedding.name for a in used])
    if out is not None and share.is_main:
        _write(result, Path(out))
    return result


def _gathered(images_: list, starts: list[int], batch: int, n: int, share: Share) -> list:
    """The batches every process made (this one's: those of ``starts``), in order, on the main
    process; [] on the others."""
    if share.count == 1:
        return images_
    chunks, k = [], 0
    for i in starts:
        chunks.append(images_[k:k + min(batch, n - i)])
        k += len(chunks[-1])
    return [im for chunk in share.gather(chunks, everywhere=False) for im in chunk]


def _render(pipe, prompt: str, negative: str | None, n: int, sampler: str | None, clip_skip: int, *, guidance: float,
            **sampling):
    """``n`` images, or those of the batches ``sampling['starts']`` names (image ``i`` of its own
    {a|b} variant of the prompt pair, every distinct pair of the ``n`` encoded once) with ``sampler`` (None: the pipeline's scheduler; it is put back afterwards).
    Returns (images, prompt pairs, embeddings used, the sampler's A1111 name)."""
    original_scheduler = pipe.scheduler
    try:
        prompts.check_clip_skip(pipe, clip_skip)
        if sampler and _flow(pipe):
            raise TextinvError(f"--sampler {sampler}: A1111's samplers are for SD 1.x/2.x/SDXL; "
                               f"{families.of_pipeline(pipe).name} samples with its own flow-matching scheduler")
        if _true_cfg(pipe):
            sampling.update(true_cfg_scale=guidance)
        elif negative and families.of_pipeline(pipe).joins == "flux":
            warnings.warn("Flux.1 takes no negative prompt (its guidance is distilled into the model): "
                          "the negative prompt is not used", stacklevel=3)
            negative = None
        if sampler:
            pipe.scheduler = samplers.make(pipe, sampler)
        sampler_name = samplers.name_of(pipe.scheduler)
        pairs = [(prompts.pick_variant(prompt, i), prompts.pick_variant(negative, i, "negative prompt") if negative
                  else negative) for i in range(n)]
        encoded, used = _prompt_arguments(pipe, pairs, clip_skip)

        def call(i: int, b: int) -> dict:
            chunk = pairs[i : i + b]
            if encoded[chunk[0]]:
                return {k: torch.cat([encoded[pair][k] for pair in chunk]) for k in encoded[chunk[0]]}
            return {"prompt": [p for p, _ in chunk], "negative_prompt": [q for _, q in chunk] if negative else None}

        return sample(pipe, n, call, guidance=guidance, **sampling), pairs, used, sampler_name
    finally:
        pipe.scheduler = original_scheduler


def _prompt_arguments(pipe, pairs: list[tuple[str, str | None]], clip_skip: int) -> tuple[dict, list]:
    """Each distinct (prompt, negative) pair's pipeline arguments, and the embeddings they use.

    SD3/Flux.1 always (:func:`_flow_arguments`); SD 1.x/2.x always, families with a pooled embedding (SDXL) for weighted or long prompts: prompt
    embeddings encoded once per pair (no per-image tokenization or encoder pass), all padded to one
    length so that images of different {a|b} variants batch together; plain SDXL prompts: {} (the
    pipeline's own)."""
    parsed = {}
    for pair in dict.fromkeys(pairs):
        for where, text in (("prompt", pair[0]), ("negative prompt", pair[1] or "")):
            for word in prompts.unmatched_triggers(pipe, text):
                warnings.warn(f"{where}: {word!r} matches no loaded embedding", stacklevel=3)
        parsed[pair] = (prompts.split(pipe, pair[0], "prompt"), prompts.split(pipe, pair[1] or "", "negative prompt"))
    used = list({id(a): a for pos, neg in parsed.values() for a in pos.used + neg.used}.values())
    if _flow(pipe):
        return _flow_arguments(pipe, parsed), used
    pooled = families.of_pipeline(pipe).pooled is not None  # the pipeline takes pooled embeddings too (SDXL)
    if pooled and not any(pos.weighted or neg.weighted or _long(pipe, pos, neg) for pos, neg in parsed.values()):
        return {pair: {} for pair in parsed}, used
    encoded = {pair: (prompts.encode(pipe, pos, clip_skip), prompts.encode(pipe, neg, clip_skip))
               for pair, (pos, neg) in parsed.items()}
    length = max(e.embeds.shape[1] for both in encoded.values() for e in both)
    empty = prompts.encode(pipe, prompts.split(pipe, "", "negative prompt"), clip_skip)
    dtype, out = denoiser(pipe).dtype, {}
    for pair, (pe, ne) in encoded.items():
        pe, ne = prompts.pad_to(pe, length, empty), prompts.pad_to(ne, length, empty)
        if pooled and not pair[1] and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            ne = prompts.Encoded(torch.zeros_like(ne.embeds), torch.zeros_like(ne.pooled))
        out[pair] = {"prompt_embeds": pe.embeds.to(dtype), "negative_prompt_embeds": ne.embeds.to(dtype)}
        if pooled:
            out[pair] |= {"pooled_prompt_embeds": pe.pooled.to(dtype), "negative_pooled_prompt_embeds": ne.pooled.to(dtype)}
    return out, used


def _flow_arguments(pipe, parsed: dict) -> dict:
    """SD3/Flux.1: each pair's prompt embeddings (:func:`textinv.prompts.encode_flow`, weighted as
    ComfyUI weighs; unweighted, exactly the pipeline's own encoding of the prompt as written
    without the weight syntax)."""
    negatives, dtype, out = families.of_pipeline(pipe).joins == "sd3" or _true_cfg(pipe), denoiser(pipe).dtype, {}
    for pair, (pos, neg) in parsed.items():
        pe = prompts.encode_flow(pipe, pos)
        out[pair] = {"prompt_embeds": pe.embeds.to(dtype), "pooled_prompt_embeds": pe.pooled.to(dtype)}
        if negatives:
            ne = prompts.encode_flow(pipe, neg)
            out[pair] |= {"negative_prompt_embeds": ne.embeds.to(dtype), "negative_pooled_prompt_embeds": ne.pooled.to(dtype)}
    return out


def _parameters(prompt, negative, steps, sampler, guidance, seed, width, height, model_hash, model, clip_skip, ti) -> str:
    """A1111's infotext for one image, its keys in A1111's order."""
    return pngmeta.format_parameters(prompt, negative, {
        "Steps": steps, "Sampler": sampler, "CFG scale": float(guidance), "Seed": seed, "Size": f"{width}x{height}",
        "Model hash": model_hash, "Model": model, "Clip skip": clip_skip if clip_skip > 1 else None, "TI hashes": ti,
        "Version": f"textinv {__version__}"})


def _write(result: Generation, out: Path) -> None:
    """Each image as NNNNN-SEED.png with its parameters, and a grid when there are several."""
    first = _next_index(out)
    for k, (img, s, text) in enumerate(zip(result.images, result.seeds, result.parameters)):
        result.files.append(pngmeta.save_png(img, out / f"{first + k:05d}-{s}.png", text))
    if len(result.images) > 1:
        result.grid = pngmeta.save_png(make_grid(result.images), out / f"grid-{first:05d}.png", result.parameters[0])


def regenerate(png, *, embeddings=None, model=None, pipe=None, out=None, progress: bool = False,
               model_config=None, share: Share = ALONE) -> Generation:
    """Re-create an image from its A1111 ``parameters`` chunk (same seed: same image on CPU);
    ``share``: as :func:`generate`'s (one image: the main process makes it)."""
    prompt, negative, params = pngmeta.parse_parameters(pngmeta.read_parameters(png))

    def get(key, cast, default=None):
        if key not in params:
            return default
        try:
            return cast(params[key])
        except ValueError:
            raise TextinvError(f"{png}: bad {key!r} value {params[key]!r} in its parameters") from None

    if model is None and pipe is None:
        model = params.get("Model") or None  # a name textinv.models resolves, the built-in one's too
    sampler = params.get("Sampler")
    if sampler and params.get("Schedule type", "").lower() == "karras":  # A1111 ≥ 1.9 writes the schedule apart
        sampler = f"{sampler} Karras" if f"{sampler} Karras" in samplers.SAMPLERS else sampler
    embs = load_embeddings(embeddings)
    for name, h in pngmeta.parse_ti_hashes(params.get("TI hashes", "")).items():
        match = [e for e in embs if e.name.lower() == name.lower()]
        if not match:
            warnings.warn(f"{png}: uses embedding {name!r} ({h}), which no --embeddings file provides", stacklevel=2)
        elif formats.embedding_hash(match[0]) not in (None, h):
            warnings.warn(f"{png}: embedding {name!r} has hash {formats.embedding_hash(match[0])}, the image was made with {h}", stacklevel=2)
    if pipe is None:
        pipe = load_pipeline(model, config=model_config, device=share.device or "cpu")
    clip_skip = get("Clip skip", int, 1)
    family = families.of_pipeline(pipe)
    if clip_skip != 1 and not family.clip_skip:
        # A1111 writes it for SDXL too, but ignores it there at its default settings.
        warnings.warn(f"{png}: 'Clip skip: {clip_skip}' is ignored for {family.name}, as A1111 does by default",
                      stacklevel=2)
        clip_skip = 1
    result = generate(prompt, negative or None, embeddings=embs, model=model, pipe=pipe, n=1,
                      clip_skip=clip_skip,
                      seed=get("Seed", int, 0), steps=get("Steps", int, DEFAULT_STEPS),
                      guidance=get("CFG scale", float), sampler=sampler, size=params.get("Size"),
                      out=out, progress=progress, share=share)
    want = params.get("Model hash")
    got = pngmeta.parse_parameters(result.parameters[0])[2].get("Model hash") if result.parameters else None
    if want and got and want != got:
        warnings.warn(f"{png}: made with model hash {want}, this model's is {got}: the image will differ", stacklevel=2)
    return result
