"""Training data: image folders, captions, prompt templates, augmentation and the latent cache.

Users hand us whatever their phone or browser saved — EXIF-rotated JPEGs, CMYK, 16-bit PNGs,
palette images with transparency, animated GIFs/WebPs, the odd corrupt file.  Every image is
converted to RGB or skipped with a warning that names it; only "no usable image at all" is an error.
"""
from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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


@dataclass
class TrainImage:
    path: Path
    image: Image.Image  # RGB
    caption: str  # the [filewords] text: sidecar .txt, else the file name


# ------------------------------------------------------------------------------------ images
def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB; transparency is composited on white (what a viewer shows)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / peak * 255).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("LA", "PA", "RGBA", "La"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, img).convert("RGB")
    return img.convert("RGB")


def open_image(path: Path) -> Image.Image:
    """Open one image as RGB with EXIF orientation applied; TextinvError if unusable.

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
                rgb = _to_rgb(img)
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
    return rgb


def filewords(path: Path) -> str:
    """A1111's [filewords]: the sidecar IMG.txt, else the file name without leading numbers."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        with open(sidecar, encoding="utf-8", errors="replace") as f:
            return " ".join(f.read(1 << 16).split())  # a caption, not a book
    return re.sub(r"^[-\d]+\s*", "", path.stem).replace("_", " ").strip()


def load_images(folder: str | Path) -> list[TrainImage]:
    """Every usable image in ``folder`` (sorted by name); bad ones are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TextinvError(f"--images {folder}: not a folder")
    files = []
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
            warnings.warn(f"skipped {p.name}: not a supported image type (.jpg .png .webp .bmp .gif .tif)", stacklevel=2)
    out = []
    for path in files:
        try:
            out.append(TrainImage(path, open_image(path), filewords(path)))
        except TextinvError as e:
            warnings.warn(f"skipped {e}", stacklevel=2)
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


# ------------------------------------------------------------------------------ augmentation
@dataclass
class View:
    """One square training view and where it came from, as SDXL's size/crop conditioning needs it.

    ``original_size`` is the source image's (height, width); ``crop_top_left`` the view's (top,
    left) corner in the source scaled to the training size, as diffusers' SDXL scripts and kohya
    pass them: a view cut from a small photo says it was upscaled, a side crop says it is one.
    """

    image: Image.Image
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def views(img: Image.Image, resolution: int, *, crops: int = 1, flip: bool = True, seed: int = 0) -> list[View]:
    """Square training views of one image: a centre crop, ``crops - 1`` random crops, and mirrors.

    Views are fixed up front (seeded) so that their latents can be computed once and cached.
    """
    rng = random.Random(seed)
    w, h = img.size
    side = min(w, h)
    boxes = [((w - side) // 2, (h - side) // 2, side)]
    for _ in range(crops - 1):
        s = rng.randint(int(side * 0.8), side)  # at least 80 % of the short side: keep the subject
        boxes.append((rng.randint(0, w - s), rng.randint(0, h - s), s))
    out = []
    for x, y, s in boxes:
        view = img.crop((x, y, x + s, y + s)).resize((resolution, resolution), Image.Resampling.LANCZOS)
        k = resolution / s  # source pixels -> training pixels
        out.append(View(view, (h, w), (round(y * k), round(x * k))))
        if flip:  # the mirror image of the source, cut at the mirrored place
            out.append(View(ImageOps.mirror(view), (h, w), (round(y * k), round((w - x - s) * k))))
    return out


def variants(img: Image.Image, resolution: int, *, crops: int = 1, flip: bool = True, seed: int = 0) -> list[Image.Image]:
    """The images of :func:`views`."""
    return [v.image for v in views(img, resolution, crops=crops, flip=flip, seed=seed)]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB list → float tensor in [-1, 1], shape [N, 3, H, W]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _cast_quietly(module, dtype) -> None:
    """``module.to(dtype)`` without diffusers' advice on casting (meant for whole pipelines)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        module.to(dtype)
    finally:
        dlog.set_verbosity(level)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of each view's latent distribution, already scaled like the UNet's inputs.

    Training then draws ``mean + std * noise`` per step (A1111's "random" latent sampling)
    without ever running the VAE again.
    """
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    param = next(vae.parameters())
    # A VAE whose config says force_upcast (SDXL's, and diffusers' default) overflows in float16:
    # encode in float32, as the pipelines decode, and put it back afterwards.
    upcast = param.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        _cast_quietly(vae, torch.float32)
    try:
        dtype = next(vae.parameters()).dtype
        for i in range(0, len(pixels), batch):
            dist = vae.encode(pixels[i : i + batch].to(param.device, dtype)).latent_dist
            means.append(((dist.mean - shift) * scale).float().cpu())
            stds.append((dist.std * scale).float().cpu())
    finally:
        if upcast:
            _cast_quietly(vae, torch.float16)
    mean, std = torch.cat(means), torch.cat(stds)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        why = "the VAE weights or images hold NaN" if dtype == torch.float32 else \
            f"the VAE overflows in {str(dtype).removeprefix('torch.')}: use --precision fp32"
        raise TextinvError(f"the VAE gave NaN/inf latents for the training images ({why})")
    return mean, std
