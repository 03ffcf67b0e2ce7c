"""Training data: image folders, captions, prompt templates, augmentation and VAE encoding.

Users hand us whatever their phone or browser saved — EXIF-rotated JPEGs, CMYK, 16-bit PNGs,
palette images with transparency, animated GIFs/WebPs, the odd corrupt file.  Every image is
converted to RGB or skipped with a warning that names it; only "no usable image at all" is an error.
"""
from __future__ import annotations

import math
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as dlog
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import TextinvError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Files a training folder may hold beside its images without a word: captions and the like.
QUIET_SUFFIXES = {".txt", ".caption", ".json", ".toml", ".yaml", ".yml", ".md"}
MAX_PIXELS = 64_000_000  # a 8000×8000 photo; more is a decompression bomb or nothing to learn a word from
MIN_SIDE = 8  # smaller images carry no usable detail (and 1×1 "images" are usually errors)

# The Textual Inversion paper's templates (as in its code and in A1111's subject/style files).
OBJECT_TEMPLATES = [
    "a photo of a [name]", "a rendering of a [name]", "a cropped photo of the [name]", "the photo of a [name]",
    "a photo of a clean [name]", "a photo of a dirty [name]", "a dark photo of the [name]", "a photo of my [name]",
    "a photo of the cool [name]", "a close-up photo of a [name]", "a bright photo of the [name]",
    "a cropped photo of a [name]", "a photo of the [name]", "a good photo of the [name]", "a photo of one [name]",
    "a close-up photo of the [name]", "a rendition of the [name]", "a photo of the clean [name]",
    "a rendition of a [name]", "a photo of a nice [name]", "a good photo of a [name]", "a photo of the nice [name]",
    "a photo of the small [name]", "a photo of the weird [name]", "a photo of the large [name]",
    "a photo of a cool [name]", "a photo of a small [name]",
]
STYLE_TEMPLATES = [
    "a painting in the style of [name]", "a rendering in the style of [name]", "a cropped painting in the style of [name]",
    "the painting in the style of [name]", "a clean painting in the style of [name]",
    "a dirty painting in the style of [name]", "a dark painting in the style of [name]", "a picture in the style of [name]",
    "a cool painting in the style of [name]", "a close-up painting in the style of [name]",
    "a bright painting in the style of [name]", "a good painting in the style of [name]",
    "a close-up painting in the style of [name]", "a rendition in the style of [name]",
    "a nice painting in the style of [name]", "a small painting in the style of [name]",
    "a weird painting in the style of [name]", "a large painting in the style of [name]",
]
BUILTIN_TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
# With captions (A1111's *_filewords lists): the same phrases, the image's own caption after them.
FILEWORDS_TEMPLATES = {k: [t + ", [filewords]" for t in v] for k, v in BUILTIN_TEMPLATES.items()}


@dataclass
class TrainImage:
    path: Path
    image: Image.Image  # RGB; transparent pixels composited on white (what a viewer shows)
    caption: str  # the [filewords] text: sidecar .txt, else the file name
    alpha: Image.Image | None = None  # mode "L": the image's own transparency, if it has any
    has_sidecar: bool = False  # the caption came from IMG.txt (not from the file name)


# ------------------------------------------------------------------------------------ images
def _to_rgb(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Any Pillow mode → (RGB, alpha or None); transparency is composited on white (what a viewer
    shows) and the alpha kept, for training with --alpha-mask.  An alpha that is opaque everywhere
    is no transparency."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / peak * 255).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        alpha = img.getchannel("A")
        return Image.alpha_composite(canvas, img).convert("RGB"), (alpha if alpha.getextrema()[0] < 255 else None)
    return img.convert("RGB"), None


def open_image(path: Path) -> Image.Image:
    """Open one image as RGB with EXIF orientation applied; TextinvError if unusable."""
    return open_image_alpha(path)[0]


def open_image_alpha(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """:func:`open_image` and the image's alpha channel (None when it is opaque).

    The size is checked before any pixel is decoded; Pillow's own warnings (bad EXIF data, …)
    are passed on with the file's name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise TextinvError(f"{path.name}: {w}×{h} pixels is over the {MAX_PIXELS // 1_000_000} megapixel limit "
                                       "(a decompression bomb, or far larger than training needs)")
                if getattr(img, "n_frames", 1) > 1:
                    warnings.warn(f"{path.name}: animated image, using its first frame", stacklevel=2)
                    img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb, alpha = _to_rgb(img)
        except UnidentifiedImageError:
            raise TextinvError(f"{path.name}: not a readable image (unknown format or corrupt)") from None
        except Image.DecompressionBombError:
            raise TextinvError(f"{path.name}: refused as a decompression bomb (too many pixels)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise TextinvError(f"{path.name}: not a readable image ({' '.join(str(e).split()) or type(e).__name__})") from None
    for w in caught:
        text = str(w.message)
        warnings.warn(text if text.startswith(path.name) else f"{path.name}: {text}", stacklevel=2)
    if min(rgb.size) < MIN_SIDE:
        raise TextinvError(f"{path.name}: {rgb.size[0]}×{rgb.size[1]} pixels is too small to learn from")
    return rgb, alpha


def filewords(path: Path) -> str:
    """A1111's [filewords]: the sidecar IMG.txt, else the file name without leading numbers."""
    caption = sidecar_caption(path)
    if caption is not None:
        return caption
    return re.sub(r"^[-\d]+\s*", "", path.stem).replace("_", " ").strip()


def sidecar_caption(path: Path) -> str | None:
    """The caption in IMG.txt beside IMG.png, or None when there is none."""
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    with open(sidecar, encoding="utf-8", errors="replace") as f:
        return " ".join(f.read(1 << 16).split())  # a caption, not a book


def load_images(folder: str | Path, skipped: list[str] | None = None) -> list[TrainImage]:
    """Every usable image in ``folder`` (sorted by name); bad ones are skipped with a warning (and
    listed in ``skipped``, when given)."""
    skipped = [] if skipped is None else skipped
    folder = Path(folder)
    if not folder.is_dir():
        raise TextinvError(f"--images {folder}: not a folder")
    files, others = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue  # hidden files (.DS_Store, editors' swap files)
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():  # is_file: not a FIFO, device or dangling link
            files.append(p)
        elif p.is_dir():
            warnings.warn(f"skipped {p.name}/: a folder (images are read from --images itself, not below it)", stacklevel=2)
        elif not p.is_file():
            warnings.warn(f"skipped {p.name}: not a regular file (a pipe, device or broken link)", stacklevel=2)
        elif p.suffix.lower() not in QUIET_SUFFIXES:
            others.append(p.name)
    if others:  # one line however many: a folder of 100 documents is one mistake, not 100
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        warnings.warn(f"skipped {shown}: not a supported image type (.jpg .png .webp .bmp .gif .tif)", stacklevel=2)
        skipped += others
    out = []
    for path in files:
        try:
            rgb, alpha = open_image_alpha(path)
        except TextinvError as e:
            warnings.warn(f"skipped {e}", stacklevel=2)
            skipped.append(path.name)
            continue
        out.append(TrainImage(path, rgb, filewords(path), alpha, sidecar_caption(path) is not None))
    if not out:
        found = f"{len(files)} image file(s), none usable" if files else "no .jpg/.png/.webp/.bmp/.gif files"
        raise TextinvError(f"--images {folder}: {found}")
    return out


# ------------------------------------------------------------------------------------ prompts
def load_templates(spec: str | Path) -> list[str]:
    """``object``, ``style`` or a text file with one template per line."""
    if str(spec) in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[str(spec)])
    path = Path(spec)
    if not path.is_file():
        raise TextinvError(f"--templates {spec}: not 'object', 'style' or a readable file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise TextinvError(f"--templates {spec}: the file holds no templates")
    if not any(("[name]" in t or "{}" in t or "[filewords]" in t) for t in lines):
        raise TextinvError(f"--templates {spec}: no template contains [name], {{}} or [filewords]; "
                           "the trigger would never be trained")
    return lines


def fill_template(template: str, name: str, words: str) -> str:
    """Captions go in first, so a caption may itself hold the trigger ("a red [name] on the left")."""
    text = template.replace("[filewords]", words).replace("[name]", name).replace("{}", name)
    return re.sub(r"\s+([,.])", r"\1", " ".join(text.split())).strip(" ,")


# ------------------------------------------------------------------------------ captions
def vary_caption(caption: str, rng: random.Random, *, shuffle: bool = False, keep: int = 0, dropout: float = 0.0) -> str:
    """One step's version of a comma-separated caption (kohya's shuffle_caption, keep_tokens,
    caption_tag_dropout_rate): the first ``keep`` tags stay in place, the others are shuffled
    and each dropped with probability ``dropout``.  Why: tags that always come in the same
    order, or always together, are learned as one blob; varying them lets each tag be its own
    and the trigger be what is left."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    fixed, rest = tags[:keep], tags[keep:]
    if dropout > 0:
        rest = [t for t in rest if rng.random() >= dropout]
    if shuffle:
        rng.shuffle(rest)
    return ", ".join(fixed + rest)


# ------------------------------------------------------------------------------ augmentation
@dataclass
class View:
    """One training view and where it came from, as SDXL's size/crop conditioning needs it.

    ``original_size`` is the source image's (height, width); ``crop_top_left`` the view's (top,
    left) corner in the source scaled to the training size, as diffusers' SDXL scripts and kohya
    pass them: a view cut from a small photo says it was upscaled, a side crop says it is one.
    ``mask`` is the view's alpha (mode "L") when the source has one.
    """

    image: Image.Image
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    mask: Image.Image | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels: the bucket the view belongs to."""
        return self.image.size


def bucket_step(resolution: int, vae_scale: int, unet_scale: int) -> int:
    """The grid bucket sides are rounded to: the UNet's whole down-sampling factor (64 px for SD
    at 512, as kohya's default; 32 for SDXL), but fine enough for ~8 sizes per side at small
    resolutions, and never finer than the VAE's factor (a latent has whole pixels)."""
    return max(vae_scale, min(vae_scale * unet_scale, resolution // 8 // vae_scale * vae_scale))


def bucket_for(width: int, height: int, resolution: int, step: int, max_ratio: float = 4.0) -> tuple[int, int]:
    """The (width, height) of the aspect-ratio bucket for an image: about ``resolution``² pixels,
    sides multiples of ``step``, the ratio as close to the image's as that allows (at most
    ``max_ratio``:1, as kohya's 256–1024 buckets at 512)."""
    ratio = min(max(width / height, 1 / max_ratio), max_ratio)
    w, h = resolution * math.sqrt(ratio), resolution / math.sqrt(ratio)
    snap = lambda x: max(step, int(round(x / step)) * step)  # noqa: E731
    return snap(w), snap(h)


def views(img: Image.Image, size: int | tuple[int, int], *, crops: int = 1, flip: bool = True, seed: int = 0,
          alpha: Image.Image | None = None) -> list[View]:
    """Training views of one image at ``size`` (a square side or a bucket's (width, height)): the
    largest centred box of that aspect ratio, ``crops - 1`` random boxes, and mirrors.

    Views are fixed up front (seeded) so that their latents can be computed once and cached.
    """
    width, height = (size, size) if isinstance(size, int) else size
    aspect = width / height
    rng = random.Random(seed)
    w, h = img.size
    tall = lambda s: min(h, round(s / aspect))  # noqa: E731  (the height of a box s wide)
    bw = min(w, round(h * aspect))  # the largest box of the bucket's aspect inside the image
    boxes = [((w - bw) // 2, (h - tall(bw)) // 2, bw)]
    for _ in range(crops - 1):
        s = rng.randint(int(bw * 0.8), bw)  # at least 80 % of the full box: keep the subject
        boxes.append((rng.randint(0, w - s), rng.randint(0, h - tall(s)), s))
    out = []
    for x, y, s in boxes:
        box = (x, y, x + s, y + tall(s))
        view = img.crop(box).resize((width, height), Image.Resampling.LANCZOS)
        mask = None if alpha is None else alpha.crop(box).resize((width, height), Image.Resampling.BILINEAR)
        k = width / s  # source pixels -> training pixels
        out.append(View(view, (h, w), (round(y * k), round(x * k)), mask))
        if flip:  # the mirror image of the source, cut at the mirrored place
            out.append(View(ImageOps.mirror(view), (h, w), (round(y * k), round((w - x - s) * k)),
                            None if mask is None else ImageOps.mirror(mask)))
    return out


def variants(img: Image.Image, resolution: int, *, crops: int = 1, flip: bool = True, seed: int = 0) -> list[Image.Image]:
    """The images of :func:`views`."""
    return [v.image for v in views(img, resolution, crops=crops, flip=flip, seed=seed)]


def mask_tensor(masks: list[Image.Image | None], size: tuple[int, int]) -> torch.Tensor:
    """Alpha masks → weights in [0, 1] at latent ``size`` (width, height), shape [N, 1, h, w]; an
    image without alpha weighs 1 everywhere.  Area-averaged: a latent pixel half covered by the
    subject counts half."""
    rows = []
    for m in masks:
        if m is None:
            rows.append(np.ones((size[1], size[0]), dtype=np.float32))
        else:
            rows.append(np.asarray(m.resize(size, Image.Resampling.BOX), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(rows))[:, None]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB list → float tensor in [-1, 1], shape [N, 3, H, W]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _cast_quietly(module, dtype) -> None:
    """``module.to(dtype)`` without diffusers' advice on casting (meant for whole pipelines)."""
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        module.to(dtype)
    finally:
        dlog.set_verbosity(level)


def encode_dtype(vae) -> torch.dtype:
    """The dtype the VAE encodes in: its own, except float32 for a float16 VAE whose config says
    force_upcast (SDXL's, and diffusers' default), which overflows in float16."""
    dtype = next(vae.parameters()).dtype
    return torch.float32 if dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False)) else dtype


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 1, done=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of each view's latent distribution, already scaled like the UNet's inputs.

    Training then draws ``mean + std * noise`` per step (A1111's "random" latent sampling)
    without ever running the VAE again.  ``batch`` views per VAE call; the default, one, makes a
    view's latent independent of which views share its call (a batch of one and of two differ in
    the last bits), so a latent read from the cache is the one this run would compute, bit for
    bit; on a CPU it is no slower.  ``done(first, mean, std)`` hears each call's result.
    """
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    param = next(vae.parameters())
    own, dtype = param.dtype, encode_dtype(vae)
    if dtype != own:  # encode in float32, as the pipelines decode, and put it back afterwards
        _cast_quietly(vae, dtype)
    try:
        for i in range(0, len(pixels), batch):
            dist = vae.encode(pixels[i : i + batch].to(param.device, dtype)).latent_dist
            mean, std = ((dist.mean - shift) * scale).float().cpu(), (dist.std * scale).float().cpu()
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                why = "the VAE weights or images hold NaN" if dtype == torch.float32 else \
                    f"the VAE overflows in {str(dtype).removeprefix('torch.')}: use --precision fp32"
                raise TextinvError(f"the VAE gave NaN/inf latents for the training images ({why})")
            if done is not None:
                done(i, mean, std)
            means.append(mean)
            stds.append(std)
    finally:
        if dtype != own:
            _cast_quietly(vae, own)
    return torch.cat(means), torch.cat(stds)
