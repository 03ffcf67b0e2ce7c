"""The latent cache (textinv.latents): a second run on the same images encodes nothing and trains
bit for bit as the first; whatever decides the latents is in the key; a damaged file is encoded
again; a cache folder that cannot be written is one warning, not a failure."""
from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest
import torch

from textinv import latents
from textinv.training import train

from conftest import make_sd, red_blocks


def pictures(folder: Path) -> str:
    return str(red_blocks(folder, size=(40, 48), name="{i:03d}-a red block.png"))  # captioned, not square


def counted(pipe) -> list:
    """Count the VAE's encode calls (one per view encoded)."""
    calls, encode = [], pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: calls.append(len(x)) or encode(x, *a, **k)
    return calls


def run(tmp_path, name: str, cache, pipe=None, **kw):
    pipe = pipe or make_sd()
    calls = counted(pipe)
    kw = dict(images=pictures(tmp_path / "imgs"), token="<c>", steps=4, batch=2, seed=3, progress=False) | kw
    result = train(out=str(tmp_path / name), pipe=pipe, latent_cache=cache, **kw)
    return result.embedding.vectors["clip"], sum(calls)


def files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file())


def test_second_run_encodes_nothing_and_trains_bit_for_bit_as_the_first(tmp_path, capsys):
    cache = tmp_path / "cache"
    first, encoded = run(tmp_path, "a", str(cache), progress=True)
    assert encoded == 6  # 3 images, each with its mirror: one VAE call per view
    assert "encoding 6 views" in capsys.readouterr().err
    assert len(files(cache)) == 6 and all(p.suffix == ".safetensors" for p in files(cache))  # no temporary left
    second, encoded = run(tmp_path, "b", str(cache), progress=True)
    assert encoded == 0 and "encoding" not in capsys.readouterr().err
    off, encoded = run(tmp_path, "c", "")  # --no-latent-cache
    assert encoded == 6 and len(files(cache)) == 6
    assert torch.equal(first, second) and torch.equal(first, off)


def test_a_resume_reads_the_cache_and_ends_bit_for_bit_as_a_run_never_stopped(tmp_path):
    cache = str(tmp_path / "cache")
    whole, _ = run(tmp_path, "whole", cache, save_every=2)
    stop = lambda step, loss: step == 2  # noqa: E731
    train(images=pictures(tmp_path / "imgs"), token="<c>", steps=4, batch=2, seed=3, save_every=2, progress=False,
          out=str(tmp_path / "part"), pipe=make_sd(), latent_cache=cache, on_step=stop)
    resumed, encoded = run(tmp_path, "part", cache, save_every=2, resume=True)
    assert encoded == 0 and torch.equal(whole, resumed)


def test_another_resolution_or_vae_is_encoded_again(tmp_path):
    cache = str(tmp_path / "cache")
    run(tmp_path, "a", cache)
    assert run(tmp_path, "b", cache, resolution=32)[1] == 6
    other = make_sd()
    with torch.no_grad():
        other.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3  # one encoder weight: another VAE
    assert run(tmp_path, "c", cache, pipe=other)[1] == 6
    assert run(tmp_path, "d", cache, flip=False)[1] == 0  # the unmirrored views are the same pixels


def test_the_key_covers_pixels_vae_dtype_and_scaling_but_not_the_decoder(tmp_path):
    pixels = torch.rand(3, 16, 16) * 2 - 1
    key = lambda pipe, p=pixels: latents.LatentCache(tmp_path, pipe.vae).key(p)  # noqa: E731
    base = key(make_sd())
    assert key(make_sd()) == base  # a pipeline built again: the same VAE
    assert key(make_sd(), pixels.flip(-1)) != base and key(make_sd(), torch.rand(3, 32, 32)) != base
    scaled, half, decoder = make_sd(), make_sd(), make_sd()
    scaled.vae.register_to_config(scaling_factor=0.5)
    half.vae.to(torch.bfloat16)
    with torch.no_grad():
        decoder.vae.decoder.conv_out.bias += 1  # encoding never runs the decoder: its latents stay valid
    assert key(scaled) != base and key(half) != base and key(decoder) == base


def test_damaged_files_are_encoded_again_and_rewritten(tmp_path):
    cache = tmp_path / "cache"
    first, _ = run(tmp_path, "a", str(cache))
    truncated, garbage, flipped = files(cache)[:3]
    truncated.write_bytes(truncated.read_bytes()[:100])
    garbage.write_bytes(os.urandom(300))
    raw = bytearray(flipped.read_bytes())
    raw[-5] ^= 0x40  # the data, not the header: only the checksum sees it
    flipped.write_bytes(bytes(raw))
    second, encoded = run(tmp_path, "b", str(cache))
    assert encoded == 3 and torch.equal(first, second)
    assert run(tmp_path, "c", str(cache))[1] == 0  # rewritten whole


@pytest.mark.parametrize("how", ["parent-is-a-file", "read-only"])
def test_a_cache_that_cannot_be_written_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, how):
    if how == "parent-is-a-file":
        (tmp_path / "blocker").write_text("x")
        cache, why = tmp_path / "blocker" / "latents", "is a file, not a folder"
    else:
        cache, why = tmp_path / "cache", "read-only"

        def read_only(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        monkeypatch.setattr(latents, "atomic_path", read_only)  # root writes through chmod: the file system says no
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vectors, encoded = run(tmp_path, "a", str(cache))
    said = [str(w.message) for w in caught if "latent cache" in str(w.message)]
    assert len(said) == 1 and why in said[0] and "\n" not in said[0], said
    assert encoded == 6 and torch.equal(vectors, run(tmp_path, "b", "")[0])


def test_the_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TEXTINV_CACHE", str(tmp_path / "t"))
    assert latents.folder(None) == tmp_path / "t" / "latents"
    monkeypatch.delenv("TEXTINV_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert latents.folder(None) == tmp_path / "x" / "textinv" / "latents"
    assert latents.folder("") is None and latents.folder(str(tmp_path / "d")) == tmp_path / "d"
