"""Every file textinv writes loads, exactly, in the tools people run — by each tool's reading rules.

The rules live in ``readers.py`` (one function per tool; diffusers' own loader is run for real).
A pair in ``readers.NOT_READ`` is a file that tool cannot read by design; every other pair must
give the same tensors under the name that tool uses.  The real files in tests/fixtures go through
the same readers.
"""
from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from textinv import formats
from textinv.formats import Embedding

import readers
from conftest import make_sd, make_sdxl
from readers import NOT_READ, READERS, WIDTHS, WRITTEN, Refused, Written

STORED_NAME = "kitty-v2"  # the name stored inside the files; the file stems differ from it


def embedding(w: Written) -> Embedding:
    g = torch.Generator().manual_seed(len(w.label))
    vectors = {slot: torch.randn(w.vectors, width, generator=g) for slot, width in WIDTHS[w.family].items()}
    return Embedding(STORED_NAME, vectors, meta={"step": 120, "sd_checkpoint_name": "base"})


@functools.lru_cache(maxsize=None)
def _pipe_maker(family: str):
    return {"SD 1.x": lambda: make_sd(768), "SD 2.x": lambda: make_sd(1024), "SDXL": lambda: make_sdxl(768, 1280)}[family]


def read(reader: str, path: Path, family: str) -> readers.Read:
    if reader == "diffusers":
        return readers.diffusers(path, family, pipe=_pipe_maker(family)())
    return READERS[reader](path, family)


def check(w: Written, reader: str, tmp: Path) -> None:
    """Write ``w`` with textinv, read it as ``reader`` does, and compare."""
    emb = embedding(w)
    folder = tmp / re.sub(r"\W+", "-", f"{reader} {w.label}")
    path = formats.save(emb, folder / w.filename, w.fmt)
    got = read(reader, path, w.family)
    stem = w.filename.split(".")[0]
    want = readers.expected_name(w, reader, stem, STORED_NAME)
    assert got.name == want, f"{reader} names it {got.name!r}, expected {want!r}"
    assert set(got.vectors) == set(emb.vectors), f"{reader} reads slots {sorted(got.vectors)}"
    for slot, t in emb.vectors.items():
        assert torch.equal(got.vectors[slot].float(), t.float()), f"{reader}: {slot} differs"


PAIRS = [(w, r) for w in WRITTEN for r in READERS]


@pytest.mark.parametrize("w, reader", [p for p in PAIRS if (p[0].label, p[1]) not in NOT_READ],
                         ids=lambda x: x.label if isinstance(x, Written) else x)
def test_written_file_loads_exactly_in_the_reader(tmp_path, w, reader):
    check(w, reader, tmp_path)


@pytest.mark.parametrize("w, reader", [p for p in PAIRS if (p[0].label, p[1]) in NOT_READ],
                         ids=lambda x: x.label if isinstance(x, Written) else x)
def test_pairs_declared_unreadable_are_really_refused(tmp_path, w, reader):
    """The table's 'n/a' cells are facts about the tools, not excuses: the reader does refuse."""
    with pytest.raises(Exception):
        check(w, reader, tmp_path)


def test_torch_save_output_as_is_would_be_refused_by_a1111(tmp_path):
    # Why formats writes its own zip: recent torch adds entries A1111's allow-list lacks.
    torch.save({"emb_params": torch.zeros(1, 768)}, tmp_path / "plain.pt")
    for release in readers.A1111_ZIP_NAMES:
        with pytest.raises(Refused, match="may be malicious"):
            readers.a1111_safe_check(tmp_path / "plain.pt", release)


def test_sdxl_dict_with_a_name_breaks_a1111(tmp_path):
    # Why SDXL cards and files hold nothing but the two tensors.
    torch.save({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280), "name": "x"}, tmp_path / "x.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(Refused, match="SDXL branch"):
        readers.a1111(tmp_path / "x.pt", "SDXL")


@pytest.mark.parametrize("w", WRITTEN, ids=lambda w: w.label)
def test_written_files_get_the_mode_the_umask_gives(tmp_path, w):
    old = os.umask(0o022)
    try:
        path = formats.save(embedding(w), tmp_path / w.filename, w.fmt)
    finally:
        os.umask(old)
    files = [path] if path.is_file() else sorted(path.iterdir())
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f"{f.name}: {oct(f.stat().st_mode)}"


# ------------------------------------------------------------------------- the real fixture files
FIXTURE_READS = {
    # file: (family, readers that load it, the name each gives)
    "EasyNegative.pt": ("SD 1.x", {"A1111 1.0-1.9": "EasyNegative", "A1111 1.10": "EasyNegative",
                                   "ComfyUI": "EasyNegative", "diffusers": "emb_params", "kohya": "EasyNegative",
                                   "InvokeAI": "EasyNegative"}),
    "learned_embeds.bin": ("SD 1.x", {"A1111 1.0-1.9": "learned_embeds", "A1111 1.10": "learned_embeds",
                                      "ComfyUI": "learned_embeds", "diffusers": "<birb-style>",
                                      "kohya": "learned_embeds", "InvokeAI": "learned_embeds"}),
    "a1111-card-rick.png": ("SD 1.x", {"A1111 1.0-1.9": "rick", "A1111 1.10": "rick"}),
}


@pytest.mark.parametrize("fixture, reader", [(f, r) for f, (_, rs) in FIXTURE_READS.items() for r in rs])
def test_real_fixture_files_read_the_same_in_textinv_and_the_tool(real_files, fixture, reader):
    family, names = FIXTURE_READS[fixture]
    ours = formats.load(real_files / fixture)
    theirs = read(reader, real_files / fixture, family)
    assert theirs.name == names[reader]
    assert torch.equal(theirs.vectors["clip"].float(), ours.vectors["clip"].float())
    assert ours.name == (names[reader] if reader.startswith("A1111") else ours.name)


def test_the_real_card_also_reads_from_its_pixels_alone(real_files, tmp_path):
    from PIL import Image

    with Image.open(real_files / "a1111-card-rick.png") as im:
        im.convert("RGB").save(tmp_path / "stripped.png")  # no text chunk: pixels only
    theirs = readers.a1111(tmp_path / "stripped.png", "SD 1.x")
    ours = formats.load(tmp_path / "stripped.png")
    assert theirs.name == ours.name == "rick"
    assert torch.equal(theirs.vectors["clip"].float(), ours.vectors["clip"].float())
