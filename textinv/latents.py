"""The latent cache: each training view's VAE latents, kept on disk between runs.

Why: on a CPU the VAE costs seconds a view at 512 px, all of it before the first step; a second
run on the same images (another token, a resume, a sweep) reads the latents back instead.

A view's file is named by the sha256 of everything that decides its latents: the exact pixel
tensor fed to the VAE; the VAE (:func:`vae_fingerprint`: class, config, every encoder-side
weight); the dtype it encodes in, its scaling and shift factors; and what makes the same kernels
give other last bits (:func:`_arithmetic`).  The file holds what :func:`textinv.data.encode_latents`
returns, the scaled mean and std in float32, and training draws ``mean + std * noise`` from
them as before: a run with the cache trains bit for bit as one without it.  Views are encoded
one per VAE call, so a view's latents never depend on which views were missing from the cache.

Files are safetensors (never a pickle), written atomically with a checksum; one that cannot be
read, has the wrong shape or fails its checksum is encoded again and rewritten.  Nothing bounds
the folder's size (~128 KiB a view at 512 px): delete it, or any file in it, at any time.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import diffusers
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import data
from .atomic import _reason, atomic_path
from .errors import TextinvError

FORMAT = "textinv-latents-1"  # a new layout or key recipe gets a new name: old files are never misread
DECODER_SIDE = ("decoder", "post_quant_conv")  # weights encoding never runs


def folder(setting: str | None) -> Path | None:
    """The cache folder: ``setting`` (--latent-cache DIR); ``""`` (--no-latent-cache): none;
    None: ``$TEXTINV_CACHE/latents``, else ``~/.cache/textinv/latents`` (``$XDG_CACHE_HOME`` honoured)."""
    if setting == "":
        return None
    if setting is not None:
        return Path(setting).expanduser()
    root = os.environ.get("TEXTINV_CACHE")
    if not root:
        try:
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "textinv"
        except RuntimeError:  # no home folder: nowhere to keep anything
            return None
    return Path(root).expanduser() / "latents"


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's class, config and encoder-side weights (all bytes of them).

    Why all the weights: a path and an mtime say nothing about a pipeline built in memory or
    patched after loading, and a few sampled tensors miss a fine-tune of one layer; hashing SD's
    34M encoder weights takes ~0.15 s, against seconds per view to encode.  The decoder is left
    out: encoding never runs it (SD 1.5's VAE and its decoder-only ft-MSE fine-tune share latents)."""
    h = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}  # not _name_or_path
    h.update(json.dumps([type(vae).__name__, config], sort_keys=True, default=str).encode())
    for name, t in vae.state_dict().items():
        if name.split(".")[0] in DECODER_SIDE:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _arithmetic(device: torch.device) -> dict:
    """What makes the same VAE on the same pixels give other last bits: library versions, the
    device, and on a CPU its vector unit and thread count (1 and 2 threads differ); on a GPU its
    model, cuDNN and TF32."""
    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": device.type}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cudnn=torch.backends.cudnn.version(),
                   tf32=[torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32])
    elif device.type == "cpu":
        env.update(cpu=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
    return env


def _checksum(mean: torch.Tensor, std: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (mean, std):
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class LatentCache:
    """One run's view of the cache folder: keys for this VAE, reads, and writes until one fails
    (then a single warning, and the run goes on without keeping its latents)."""

    def __init__(self, root: Path, vae):
        self.root, self.writable = Path(root), True
        param = next(vae.parameters())
        cfg = vae.config
        self.channels, self.factor = cfg.latent_channels, 2 ** (len(cfg.block_out_channels) - 1)
        recipe = [FORMAT, vae_fingerprint(vae), str(data.encode_dtype(vae)), cfg.scaling_factor,
                  getattr(cfg, "shift_factor", None), _arithmetic(param.device)]
        self.prefix = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).digest()

    def key(self, pixels: torch.Tensor) -> str:
        """sha256 of this VAE's recipe and one view's pixels ([3, H, W], float32, as encoded)."""
        pixels = pixels.detach().cpu().contiguous()
        h = hashlib.sha256(self.prefix)
        h.update(f"{pixels.dtype} {tuple(pixels.shape)}".encode())
        h.update(pixels.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def read(self, key: str, pixels_shape) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The view's (mean, std), or None when absent or not to be trusted."""
        path = self.path(key)
        if not path.is_file():
            return None
        expected = (self.channels, pixels_shape[-2] // self.factor, pixels_shape[-1] // self.factor)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                mean, std = f.get_tensor("mean"), f.get_tensor("std")
        except Exception:  # truncated, garbage, a folder, unreadable: whatever it is, encode again
            return None
        ok = (meta.get("format") == FORMAT and mean.dtype == std.dtype == torch.float32
              and tuple(mean.shape) == tuple(std.shape) == expected and meta.get("sha256") == _checksum(mean, std))
        return (mean, std) if ok else None

    def write(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        if not self.writable:
            return
        mean, std = mean.contiguous(), std.contiguous()
        try:
            with atomic_path(self.path(key)) as tmp:
                save_file({"mean": mean, "std": std}, str(tmp), metadata={"format": FORMAT, "sha256": _checksum(mean, std)})
        except (TextinvError, OSError) as e:
            self.writable = False
            cause = e if isinstance(e, OSError) else e.__context__  # atomic_path names the file; say why alone
            why = _reason(cause) if isinstance(cause, OSError) else str(e)
            warnings.warn(f"latent cache {self.root}: cannot write there ({why}); this run's latents are not kept "
                          "(--latent-cache DIR to keep them elsewhere, --no-latent-cache to say nothing)", stacklevel=2)


def open_cache(setting: str | None, vae) -> LatentCache | None:
    """The run's cache (None with --no-latent-cache)."""
    root = folder(setting)
    return None if root is None else LatentCache(root, vae)


def encode_views(vae, buckets: list[torch.Tensor], cache: LatentCache | None, progress: bool = False):
    """Each bucket's (mean, std), ``[N, C, h, w]`` each, from its views' pixels ``[N, 3, H, W]``:
    read from ``cache``, the others encoded one view per VAE call under a progress bar
    ("encoding N views") and written back as each is done (an interrupted run keeps them)."""
    keys = [[cache.key(p) if cache else None for p in pixels] for pixels in buckets]
    rows = [[cache.read(k, pixels.shape) if cache else None for k in ks] for pixels, ks in zip(buckets, keys)]
    missing = sum(r is None for row in rows for r in row)
    with tqdm(total=missing, desc=f"encoding {missing} view{'s' if missing != 1 else ''}", unit="view",
              disable=not (progress and missing), dynamic_ncols=True, mininterval=0.5) as bar:
        for pixels, ks, row in zip(buckets, keys, rows):
            todo = [j for j, r in enumerate(row) if r is None]

            def done(first, mean, std, ks=ks, row=row, todo=todo):
                for i in range(len(mean)):
                    j = todo[first + i]
                    row[j] = (mean[i], std[i])
                    if cache:
                        cache.write(ks[j], mean[i], std[i])
                bar.update(len(mean))

            if todo:
                data.encode_latents(vae, pixels[todo], done=done)
    return [(torch.stack([m for m, _ in row]), torch.stack([s for _, s in row])) for row in rows]
