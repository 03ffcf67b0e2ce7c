"""Embedding file formats: round trips, files as other tools write them, safety, bad input.

Files are built in ``tmp_path`` exactly as each tool writes them (see
shared/reference/embedding-formats.md); the real A1111 card is read from tests/fixtures.
"""
from __future__ import annotations

import base64
import io
import json
import pathlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from textinv import cards, formats, tokens
from textinv.errors import EmbeddingFileError, TextinvError
from textinv.formats import Embedding, detect_format, is_embedding_candidate, load, load_all, save

from conftest import Touch, malicious_pt

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
RICK = FIXTURES / "a1111-card-rick.png"


def vec(n, width, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=g) * 0.1).to(dtype)


def sd_emb(n=3, width=768, dtype=torch.float32, name="cat-toy", **meta):
    return Embedding(name=name, vectors={"clip": vec(n, width, dtype)}, meta=dict(meta))


def sdxl_emb(n=2, dtype=torch.float32, name="xl-style"):
    return Embedding(name=name, vectors={"clip_l": vec(n, 768, dtype, 1),
                                         "clip_g": vec(n, 1280, dtype, 2)})


def assert_same(a: Embedding, b: Embedding, dtype=True):
    assert set(a.vectors) == set(b.vectors)
    for key in a.vectors:
        x, y = a.vectors[key], b.vectors[key]
        if dtype:
            assert x.dtype == y.dtype, key
        assert torch.equal(x.float(), y.float()), key  # bit-exact values


def expect_error(path, *words, call=load):
    with pytest.raises(EmbeddingFileError) as info:
        call(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{formats.printable(path)}: "), msg  # the path as given, not only its name
    for word in words:
        assert word.lower() in msg.lower(), msg
    return msg


def strip_text(src, dst):
    """Re-save only the pixels: what a metadata-stripping upload does to a card."""
    with Image.open(src) as im:
        Image.fromarray(np.asarray(im.convert("RGB"))).save(dst)
    with Image.open(dst) as im:
        assert formats.CARD_KEY not in getattr(im, "text", {})
    return dst


# --------------------------------------------------------------------------------------------
# Write -> read, bit-exact
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, filename, detected", [
    ("diffusers", "e.safetensors", "diffusers"),
    ("diffusers", "e.bin", "diffusers"),
    ("a1111", "e.pt", "a1111"),
    ("kohya", "e.safetensors", "kohya"),
    ("kohya", "e.pt", "kohya"),
    ("png", "e.png", "png-card"),
])
def test_sd_round_trip(tmp_path, fmt, filename, detected):
    emb = sd_emb(step=120, sd_checkpoint="7460a6fa", sd_checkpoint_name="model-aa-base")
    path = save(emb, tmp_path / filename, fmt)
    back = load(path)
    assert_same(emb, back)
    assert detect_format(path) == detected == back.source_format
    assert back.path == path
    # A1111's naming: the stored name for cards, the file stem for everything else.
    assert back.name == ("cat-toy" if fmt == "png" else "e")
    if fmt in ("a1111", "png"):
        assert back.meta["step"] == 120 and back.meta["sd_checkpoint"] == "7460a6fa"
        assert back.meta["stored_name"] == "cat-toy"
    assert [p.name for p in tmp_path.iterdir()] == [filename]  # no temp files left behind


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt, filename", [("diffusers", "h.safetensors"), ("kohya", "h.safetensors"),
                                           ("kohya", "h.pt"), ("diffusers", "h.bin")])
def test_half_precision_kept(tmp_path, dtype, fmt, filename):
    emb = sd_emb(dtype=dtype)
    assert_same(emb, load(save(emb, tmp_path / filename, fmt)))


@pytest.mark.parametrize("fmt, filename", [("a1111", "h.pt"), ("png", "h.png")])
def test_half_precision_to_float32_formats_is_exact(tmp_path, fmt, filename):
    emb = sd_emb(dtype=torch.float16)
    back = load(save(emb, tmp_path / filename, fmt))
    assert back.vectors["clip"].dtype == torch.float32  # these formats store float32
    assert torch.equal(back.vectors["clip"], emb.vectors["clip"].float())


def test_png_float32_survives_json_exactly(tmp_path):
    # Values that need all 24 mantissa bits, tiny and huge exponents.
    t = torch.tensor([[1 / 3, -2.0**-126, 3.4e38, 1e-45, 0.1, -0.0, 123456.789, 7.0]],
                     dtype=torch.float32)
    emb = Embedding(name="exact", vectors={"clip": t})
    back = load(save(emb, tmp_path / "exact.png"))
    assert torch.equal(back.vectors["clip"], t)
    assert back.vectors["clip"].view(torch.int32).tolist() == t.view(torch.int32).tolist()


@pytest.mark.parametrize("fmt, filename, detected", [
    ("sdxl", "x.safetensors", "sdxl"),
    ("sdxl", "x.pt", "sdxl"),
    ("diffusers", "xfolder", "diffusers-sdxl"),
    ("png", "x.png", "png-card"),
])
def test_sdxl_round_trip(tmp_path, fmt, filename, detected):
    emb = sdxl_emb(dtype=torch.float16 if fmt != "png" else torch.float32)
    path = save(emb, tmp_path / filename, fmt)
    back = load(path)
    assert back.is_sdxl and back.num_vectors == 2
    assert_same(emb, back)
    assert detect_format(path) == detected
    # SDXL cards hold only {clip_l, clip_g} (A1111's SDXL branch detaches every value), so their
    # name is the file's, as for every SDXL file.
    assert back.name == path.stem


def test_sdxl_tiny_test_model_widths(tmp_path):
    # Tiny random SDXL pipelines used in tests have narrow encoders; they must round-trip too.
    emb = Embedding(name="tiny", vectors={"clip_l": vec(2, 32), "clip_g": vec(2, 48)})
    for target in ("t.safetensors", "t.pt", "t.png", "tfolder"):
        assert_same(emb, load(save(emb, tmp_path / target)))


def test_diffusers_sdxl_folder_layout(tmp_path):
    emb = sdxl_emb()
    folder = save(emb, tmp_path / "my-style")
    assert sorted(p.name for p in folder.iterdir()) == ["learned_embeds.safetensors",
                                                        "learned_embeds_2.safetensors"]
    from safetensors import safe_open
    with safe_open(folder / "learned_embeds_2.safetensors", "pt") as f:
        assert list(f.keys()) == ["xl-style"] and f.metadata()["format"] == "pt"
        assert f.get_tensor("xl-style").shape == (2, 1280)


@pytest.mark.parametrize("filename, fmt", [("a.pt", "a1111"), ("a.png", "png-card"),
                                           ("a.safetensors", "diffusers"), ("a.bin", "diffusers")])
def test_format_from_suffix(tmp_path, filename, fmt):
    assert detect_format(save(sd_emb(), tmp_path / filename)) == fmt


def test_format_from_suffix_sdxl(tmp_path):
    assert detect_format(save(sdxl_emb(), tmp_path / "a.safetensors")) == "sdxl"
    assert detect_format(save(sdxl_emb(), tmp_path / "a.pt")) == "sdxl"
    assert detect_format(save(sdxl_emb(), tmp_path / "folder")) == "diffusers-sdxl"


def test_a_diffusers_sdxl_folder_loads_with_its_format_and_path(tmp_path):
    # as every file does: inspect shows its format, A1111's TI hash is its first file's
    emb = load(save(sdxl_emb(), tmp_path / "folder"))
    assert emb.source_format == "diffusers-sdxl" and emb.path == tmp_path / "folder"
    assert formats.embedding_hash(emb) == formats.short_hash(tmp_path / "folder" / "learned_embeds.safetensors")


def test_files_as_formats_write_them(tmp_path):
    from safetensors import safe_open
    emb = sd_emb(n=2, step=7)
    a1111 = torch.load(save(emb, tmp_path / "a.pt"), weights_only=True)
    assert a1111["string_to_token"] == {"*": 265}
    assert set(a1111) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                          "sd_checkpoint_name"}
    assert a1111["name"] == "cat-toy" and a1111["step"] == 7
    assert a1111["string_to_param"]["*"].dtype == torch.float32
    with safe_open(save(emb, tmp_path / "d.safetensors"), "pt") as f:
        assert list(f.keys()) == ["cat-toy"] and f.metadata()["format"] == "pt"
    with safe_open(save(emb, tmp_path / "k.safetensors", "kohya"), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    with Image.open(save(emb, tmp_path / "c.png")) as im:
        card = json.loads(base64.b64decode(im.text[formats.CARD_KEY]))
    assert card["name"] == "cat-toy" and card["string_to_token"] == {"*": 265}
    assert np.array(card["string_to_param"]["*"]["TORCHTENSOR"]).shape == (2, 768)


def test_png_card_pixels_alone_and_preview(tmp_path):
    emb = sd_emb(n=5, width=1024, step=500)
    preview = Image.new("RGB", (300, 200), (200, 30, 30))
    card = save(emb, tmp_path / "c.png", preview=preview)
    with Image.open(card) as im:
        # a small preview is scaled up whole (aspect kept) so the caption stays legible
        assert im.height == cards.MIN_PREVIEW_HEIGHT and im.width > 768 + 2
        middle = np.asarray(im.convert("RGB"))[im.height // 2]
    assert (middle == [200, 30, 30]).all(axis=1).sum() >= 760  # the preview fills its part, full-bleed
    back = load(strip_text(card, tmp_path / "stripped.png"))
    assert back.name == "cat-toy" and back.meta["step"] == 500
    assert_same(emb, back)


def test_png_card_pixels_survive_lossless_webp_not_lossy(tmp_path):
    card = save(sd_emb(), tmp_path / "c.png")
    with Image.open(card) as im:
        rgb = im.convert("RGB")
        rgb.save(tmp_path / "lossless.webp", lossless=True)
        rgb.save(tmp_path / "lossy.webp", quality=80)
    assert_same(sd_emb(), load(tmp_path / "lossless.webp"))
    assert detect_format(tmp_path / "lossless.webp") == "png-card"
    expect_error(tmp_path / "lossy.webp", "no embedding card")


def test_generator_matches_reference():
    assert cards.lcg_nibbles(8).tolist() == [v & 15 for v in (253, 242, 127, 44, 157, 27, 239, 133)]
    x, slow = 0, []
    for _ in range(9000):  # past the vectorised jump-ahead block boundary
        x = (1664525 * x + 1013904223) % 2**32
        slow.append((x % 255) & 15)
    assert cards.lcg_nibbles(9000).tolist() == slow


# --------------------------------------------------------------------------------------------
# The real A1111 card
# --------------------------------------------------------------------------------------------

def test_real_a1111_card_text_and_pixels(tmp_path):
    emb = load(RICK)
    assert emb.name == "rick" and emb.source_format == "png-card"
    assert emb.vectors["clip"].shape == (8, 768) and emb.vectors["clip"].dtype == torch.float32
    assert emb.meta["step"] == 60 and emb.family == "SD 1.x"
    with Image.open(RICK) as im:
        text_copy = json.loads(base64.b64decode(im.text[formats.CARD_KEY]))
        pixel_copy = json.loads(cards.bytes_from_pixels(im, formats.MAX_CARD_JSON_BYTES))
    assert text_copy == pixel_copy  # the two independent copies agree
    expected = np.array(text_copy["string_to_param"]["*"]["TORCHTENSOR"], dtype=np.float32)
    assert torch.equal(emb.vectors["clip"], torch.from_numpy(expected))

    stripped = load(strip_text(RICK, tmp_path / "renamed.png"))
    assert stripped.name == "rick"  # the stored name wins over the file name
    assert torch.equal(stripped.vectors["clip"], emb.vectors["clip"])
    assert load(RICK, name="astley").name == "astley"


@pytest.mark.parametrize("chunk", ["zTXt", "iTXt"])
def test_card_text_in_compressed_and_international_chunks(tmp_path, chunk):
    with Image.open(RICK) as im:
        value = im.text[formats.CARD_KEY]
        info = PngInfo()
        if chunk == "zTXt":
            info.add_text(formats.CARD_KEY, value, zip=True)
        else:
            info.add_itxt(formats.CARD_KEY, value)
        # A tiny black image: no pixel data, so only the chunk can supply the card.
        Image.new("RGB", (8, 8)).save(tmp_path / "c.png", pnginfo=info)
    assert chunk.encode() in (tmp_path / "c.png").read_bytes()
    assert torch.equal(load(tmp_path / "c.png").vectors["clip"], load(RICK).vectors["clip"])


def test_cross_format_conversions(tmp_path):
    rick = load(RICK)
    pt = load(save(rick, tmp_path / "rick.pt"))
    card = load(save(pt, tmp_path / "again.png"))
    kohya = load(save(card, tmp_path / "k.safetensors", "kohya"))
    assert_same(rick, kohya)
    assert card.name == "rick" and kohya.name == "k"
    expect_error(tmp_path / "x.safetensors", "needs an SDXL embedding", "SD 1.x",
                 call=lambda p: save(card, p, "sdxl"))
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------------------------
# Files as other tools write them
# --------------------------------------------------------------------------------------------

def test_diffusers_files(tmp_path):
    t = vec(4, 768)
    save_file({"<cat-toy>": t}, tmp_path / "learned_embeds.safetensors", {"format": "pt"})
    torch.save({"<cat-toy>": t}, tmp_path / "learned_embeds.bin")
    torch.save({"<old>": t[0]}, tmp_path / "old.pt")  # single-vector files are 1-D
    for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
        emb = load(tmp_path / name)
        assert emb.source_format == "diffusers" and emb.meta["token"] == "<cat-toy>"
        assert emb.name == "learned_embeds" and torch.equal(emb.vectors["clip"], t)
    old = load(tmp_path / "old.pt")
    assert old.vectors["clip"].shape == (1, 768) and torch.equal(old.vectors["clip"][0], t[0])


def test_a1111_pt_with_grad_tensor(tmp_path):
    param = vec(2, 1024).requires_grad_()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": param}, "name": "stored",
                "step": 3000, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "v2-1_768"},
               tmp_path / "style-3000.pt")
    emb = load(tmp_path / "style-3000.pt")
    assert emb.name == "style-3000" and emb.meta["stored_name"] == "stored"
    assert emb.source_format == "a1111" and emb.family == "SD 2.x"
    assert not emb.vectors["clip"].requires_grad
    assert torch.equal(emb.vectors["clip"], param.detach())
    assert load(tmp_path / "style-3000.pt", select="stored").name == "style-3000"


@pytest.mark.parametrize("zipfile", [True, False])
def test_original_paper_parameterdict(tmp_path, zipfile):
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec(2, 768))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params},
               tmp_path / "embeddings.pt", _use_new_zipfile_serialization=zipfile)
    emb = load(tmp_path / "embeddings.pt")
    assert detect_format(tmp_path / "embeddings.pt") == "original"
    assert type(emb.vectors["clip"]) is torch.Tensor and not emb.vectors["clip"].requires_grad
    assert torch.equal(emb.vectors["clip"], params["*"].detach())
    assert emb.name == "embeddings"


def test_kohya_files(tmp_path):
    t = vec(3, 768, torch.float16)
    torch.save({"emb_params": t}, tmp_path / "k.pt")
    save_file({"emb_params": t}, tmp_path / "k.safetensors",
              {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": "k", "ss_steps": "100"})
    for name in ("k.pt", "k.safetensors"):
        emb = load(tmp_path / name)
        assert emb.source_format == "kohya" and emb.vectors["clip"].dtype == torch.float16
        assert torch.equal(emb.vectors["clip"], t)
    meta = load(tmp_path / "k.safetensors").meta["safetensors_metadata"]
    assert meta["ss_steps"] == "100"


def test_sdxl_single_files(tmp_path):
    l, g = vec(2, 768), vec(2, 1280)
    save_file({"clip_l": l, "clip_g": g}, tmp_path / "xl.safetensors")
    torch.save({"clip_g": g, "clip_l": l}, tmp_path / "xl.pt")
    for name in ("xl.safetensors", "xl.pt"):
        emb = load(tmp_path / name)
        assert emb.is_sdxl and emb.family == "SDXL" and emb.source_format == "sdxl"
        assert torch.equal(emb.vectors["clip_l"], l) and torch.equal(emb.vectors["clip_g"], g)


def test_diffusers_sdxl_folder(tmp_path):
    folder = tmp_path / "cat-xl"
    folder.mkdir()
    save_file({"<cat>": vec(2, 768)}, folder / "learned_embeds.safetensors", {"format": "pt"})
    save_file({"<cat>": vec(2, 1280)}, folder / "learned_embeds_2.safetensors", {"format": "pt"})
    emb = load(folder)
    assert emb.name == "cat-xl" and emb.meta["token"] == "<cat>" and emb.is_sdxl
    assert emb.widths == {"clip_l": 768, "clip_g": 1280}
    assert is_embedding_candidate(folder) and not is_embedding_candidate(tmp_path)


def lora_with_bundle(path):
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
        "bundle_emb.charname.string_to_param.*": vec(3, 768),
        "bundle_emb.xlstyle.clip_l": vec(2, 768),
        "bundle_emb.xlstyle.clip_g": vec(2, 1280),
    }
    save_file(tensors, path, {"ss_network_module": "networks.lora"})
    return tensors


def test_lora_bundle(tmp_path, monkeypatch):
    tensors = lora_with_bundle(tmp_path / "lora.safetensors")
    monkeypatch.setattr(formats, "MAX_FILE_BYTES", 1024)  # a big LoRA is still read for its bundle
    found = load_all(tmp_path / "lora.safetensors")
    assert [e.name for e in found] == ["charname", "xlstyle"]
    assert all(e.source_format == "lora-bundle" for e in found)
    assert torch.equal(found[0].vectors["clip"], tensors["bundle_emb.charname.string_to_param.*"])
    assert detect_format(tmp_path / "lora.safetensors") == "lora-bundle"
    expect_error(tmp_path / "lora.safetensors", "bundle of 2", "select")
    xl = load(tmp_path / "lora.safetensors", select="xlstyle", name="mine")
    assert xl.is_sdxl and xl.name == "mine"
    expect_error(tmp_path / "lora.safetensors", "no embedding named 'nope'", "charname",
                 call=lambda p: load(p, select="nope"))


# --------------------------------------------------------------------------------------------
# Libraries
# --------------------------------------------------------------------------------------------

def test_library_folder(tmp_path):
    lib = tmp_path / "embeddings"
    save(sd_emb(name="a"), lib / "alpha.pt")
    save(sd_emb(name="card-name"), lib / "sub" / "beta.png")
    save(sdxl_emb(), lib / "sub" / "gamma")  # diffusers two-file folder: one embedding
    lora_with_bundle(lib / "lora.safetensors")
    (lib / "notes.txt").write_text("not an embedding")
    (lib / "cfg.json").write_text("{}")
    (lib / "meta.yaml").write_text("a: 1")
    Image.new("RGB", (16, 16), (90, 90, 90)).save(lib / "photo.png")  # a picture without a card
    save(sd_emb(), lib / "alpha.preview.png")  # A1111 skips *.preview.png
    found = load_all(lib)
    assert [e.name for e in found] == ["alpha", "charname", "xlstyle", "card-name", "gamma"]
    assert found[-1].is_sdxl

    assert is_embedding_candidate(lib / "alpha.pt") and not is_embedding_candidate(lib / "notes.txt")
    assert not is_embedding_candidate(lib / "alpha.preview.png")
    expect_error(lib, "not a diffusers SDXL embedding folder")

    (lib / "broken.safetensors").write_bytes(b"\x00" * 3)
    expect_error(lib / "broken.safetensors", call=load_all)
    with pytest.raises(EmbeddingFileError, match="broken.safetensors"):
        load_all(lib)
    seen = []
    assert len(load_all(lib, on_error=lambda p, e: seen.append(p.name))) == 5
    assert seen == ["broken.safetensors"]


# --------------------------------------------------------------------------------------------
# Safety: nothing in a file ever runs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zipfile", [True, False])
@pytest.mark.parametrize("how", ["system", "exec", "path"])
def test_malicious_pickle_refused(tmp_path, how, zipfile):
    marker = tmp_path / "MARKER"
    malicious_pt(tmp_path / "bad.pt", marker, how, zipfile)
    msg = expect_error(tmp_path / "bad.pt", "not an embedding file", "never allowed")
    assert {"system": "system", "exec": "exec", "path": "getattr"}[how] in msg
    expect_error(tmp_path / "bad.pt", call=detect_format)
    assert not marker.exists()


def test_plain_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / "bad.bin").write_bytes(pickle.dumps(Touch("system", marker), protocol=2))
    expect_error(tmp_path / "bad.bin", "never allowed")
    assert not marker.exists()


def test_module_objects_are_not_built(tmp_path):
    torch.save({"emb": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    expect_error(tmp_path / "module.pt", "never allowed", "Linear")


# --------------------------------------------------------------------------------------------
# Bad input: one clear line each
# --------------------------------------------------------------------------------------------

def _write(path, data):
    path.write_bytes(data)


def _truncated_safetensors(path):
    save_file({"tok": vec(4, 768)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])


def _truncated_header(path):
    save_file({"tok": vec(4, 768)}, path)
    path.write_bytes(path.read_bytes()[:40])


def _truncated_pt(path, zipfile=True):
    torch.save({"tok": vec(4, 768)}, path, _use_new_zipfile_serialization=zipfile)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


BAD = {
    "empty.pt": (lambda p: _write(p, b""), ["empty file"]),
    "cut.safetensors": (_truncated_safetensors, ["truncated"]),
    "cuthead.safetensors": (_truncated_header, ["truncated"]),
    "cut.pt": (_truncated_pt, ["truncated"]),
    "cutlegacy.pt": (lambda p: _truncated_pt(p, zipfile=False), ["truncated"]),
    "noise.bin": (lambda p: _write(p, np.random.default_rng(0).bytes(2000)), ["unrecognised"]),
    "zipnoise.pt": (lambda p: _write(p, b"PK\x03\x04" + b"\x00" * 200), ["corrupt"]),
    "foo.pt": (lambda p: torch.save({"foo": "bar"}, p), ["unknown structure", "foo"]),
    "list.pt": (lambda p: torch.save([vec(1, 768)], p), ["list"]),
    "two.safetensors": (lambda p: save_file({"a": vec(1, 768), "b": vec(1, 768)}, p),
                        ["2 tensors", "multiple terms"]),
    "terms.pt": (lambda p: torch.save({"string_to_param": {"*": vec(1, 768), "x": vec(1, 768)},
                                       "name": "t", "step": 1}, p), ["2 entries", "multiple terms"]),
    "xti15.safetensors": (lambda p: save_file(  # kohya's XTI files hold exactly 16 layers (more in test_perlayer)
        {k: vec(1, 768) for k in ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03",
                                  "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10"]}, p),
                          ["XTI", "exactly the 16", "missing OUT11"]),
    "rank3.pt": (lambda p: torch.save({"emb_params": torch.zeros(1, 2, 768)}, p), ["shape (1, 2, 768)"]),
    "nan.safetensors": (lambda p: save_file({"t": vec(2, 768).index_fill(1, torch.tensor([5]), float("nan"))}, p),
                        ["NaN"]),
    "inf.pt": (lambda p: torch.save({"emb_params": torch.full((1, 768), float("inf"))}, p), ["infinite"]),
    "many.pt": (lambda p: torch.save({"emb_params": torch.zeros(76, 768)}, p), ["76 vectors", "75"]),
    "wide.pt": (lambda p: torch.save({"emb_params": torch.zeros(1, 5000)}, p), ["width 5000"]),
    "ints.pt": (lambda p: torch.save({"emb_params": torch.zeros(1, 768, dtype=torch.int64)}, p),
                ["int64", "not floating point"]),
    "xl_n.safetensors": (lambda p: save_file({"clip_l": vec(2, 768), "clip_g": vec(3, 1280)}, p),
                         ["clip_l has 2 vectors but clip_g has 3"]),
    "xl_swap.safetensors": (lambda p: save_file({"clip_l": vec(2, 1280), "clip_g": vec(2, 768)}, p),
                            ["narrower than clip_g", "swapped"]),
    "xl_tiny_swap.safetensors": (lambda p: save_file({"clip_l": vec(2, 48), "clip_g": vec(2, 32)},
                                                     p), ["narrower than clip_g", "swapped"]),
    "bundle.safetensors": (lambda p: save_file({"bundle_emb.x.string_to_param.*": vec(1, 768),
                                                "bundle_emb.x.string_to_param.y": vec(1, 768)}, p),
                           ["bundled 'x'", "multiple terms"]),
    "plain.png": (lambda p: Image.new("RGB", (32, 32), (80, 120, 160)).save(p), ["no embedding card"]),
    "badcard.png": (lambda p: _png_with_text(p, base64.b64encode(b"{not json")), ["damaged JSON"]),
}


def _png_with_text(path, value):
    info = PngInfo()
    info.add_text(formats.CARD_KEY, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


@pytest.mark.parametrize("filename", sorted(BAD))
def test_bad_files(tmp_path, filename):
    build, words = BAD[filename]
    build(tmp_path / filename)
    expect_error(tmp_path / filename, *words)


def test_bad_paths(tmp_path):
    expect_error(tmp_path / "missing.pt", "no such file")
    (tmp_path / "folder").mkdir()
    expect_error(tmp_path / "folder", "not a diffusers SDXL embedding folder")
    expect_error(tmp_path / "folder", call=detect_format)


def test_oversized_file_refused(tmp_path, monkeypatch):
    torch.save({"emb_params": vec(75, 1024)}, tmp_path / "big.pt")
    save_file({"a": vec(75, 1024), "b": vec(75, 1024)}, tmp_path / "big.safetensors")
    torch.save({"emb_params": vec(75, 1024)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    monkeypatch.setattr(formats, "MAX_FILE_BYTES", 100_000)
    monkeypatch.setattr(formats, "MAX_TORCH_ZIP_BYTES", 1_000_000)
    expect_error(tmp_path / "legacy.pt", "too large", "limit 98 kB")  # read whole: the small limit
    assert load(tmp_path / "big.pt").num_vectors == 75  # a torch zip is memory-mapped: the large one
    monkeypatch.setattr(formats, "MAX_TORCH_ZIP_BYTES", 100_000)
    expect_error(tmp_path / "big.pt", "too large")
    expect_error(tmp_path / "big.safetensors", "no bundled embeddings")


def test_cpu_saved_diffusers_bin_with_the_whole_table_behind_its_view_is_read(tmp_path):
    # diffusers' training script saves weight[a:b].detach().cpu(): on a CPU that is a view, and
    # torch.save stores its whole storage, the 49,4xx x 768 table (~145 MB) behind one row.
    table = torch.randn(49409, 768)
    torch.save({"<birb-style>": table[49408:49409].detach().cpu()}, tmp_path / "learned_embeds.bin")
    assert (tmp_path / "learned_embeds.bin").stat().st_size > 140 << 20
    emb = load(tmp_path / "learned_embeds.bin")
    assert emb.meta["token"] == "<birb-style>" and torch.equal(emb.vectors["clip"], table[49408:49409])
    # Only the slice is kept: the tensor owns its data, 768 floats, not the table.
    assert emb.vectors["clip"].untyped_storage().nbytes() == 768 * 4


def test_torch_zip_bombs_and_absurd_shapes_refused(tmp_path):
    import zipfile

    # A pickle entry far beyond any embedding's (the data.pkl is what gets unpickled in memory).
    buf = formats.torch_zip_bytes({"emb_params": vec(1, 768)})
    with zipfile.ZipFile(io.BytesIO(buf)) as src, zipfile.ZipFile(tmp_path / "bomb.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data += b"\x00" * (formats.MAX_PICKLE_BYTES + 1)
            dst.writestr(info.filename, data)
    expect_error(tmp_path / "bomb.pt", "its pickle is", "limit")
    # A view that is the whole table, not a slice of it: too many vectors, refused before copying.
    torch.save({"<x>": torch.zeros(49408, 768)}, tmp_path / "table.bin")
    expect_error(tmp_path / "table.bin", "49408 vectors")
    # A sparse 2 GB "zip": refused by its size, without reading it.
    with open(tmp_path / "huge.pt", "wb") as f:
        f.write(b"PK\x03\x04")
        f.truncate(2 << 30)
    expect_error(tmp_path / "huge.pt", "too large")


def test_pixel_card_with_damaged_data(tmp_path):
    card = save(sd_emb(), tmp_path / "c.png")
    with Image.open(card) as im:
        pixels = np.asarray(im.convert("RGB")).copy()
    pixels[:, :5] ^= 0x05  # flip low bits in the left data block
    Image.fromarray(pixels).save(tmp_path / "damaged.png")
    expect_error(tmp_path / "damaged.png", "no embedding card")


# --------------------------------------------------------------------------------------------
# Writing refuses what it cannot write, and never leaves a half-written file
# --------------------------------------------------------------------------------------------

def test_save_refusals_keep_existing_file(tmp_path):
    target = save(sd_emb(), tmp_path / "keep.pt")
    before = target.read_bytes()
    bad = sd_emb()
    bad.vectors["clip"][0, 0] = float("nan")
    cases = [
        (bad, None, "NaN"),
        (sdxl_emb(), "a1111", "SDXL"),
        (sdxl_emb(), "kohya", "format='sdxl'"),
        (sd_emb(), "sdxl", "needs an SDXL embedding"),
        (sd_emb(), "png", "written to a .png"),
        (sd_emb(), "weird", "cannot write format 'weird'"),
    ]
    for emb, fmt, words in cases:
        expect_error(target, words, call=lambda p: save(emb, p, fmt))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]
    expect_error(tmp_path / "x.safetensors", "two-file folder",
                 call=lambda p: save(sdxl_emb(), p, "diffusers"))
    expect_error(tmp_path / "x.txt", "cannot tell the format", call=lambda p: save(sd_emb(), p))


def test_save_interrupted_leaves_old_file(tmp_path, monkeypatch):
    target = save(sd_emb(), tmp_path / "keep.safetensors")
    before = target.read_bytes()

    real_write = pathlib.Path.write_bytes

    def explode(self, data):
        real_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_bytes", explode)
    with pytest.raises(KeyboardInterrupt):
        save(sd_emb(n=5), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_same_embedding_gives_byte_identical_files(tmp_path):
    """Hash-ordered safetensors headers and torch's zip root name would make bytes vary."""
    import json
    import struct

    emb = Embedding("same", {"clip": vec(2, 768)}, meta={"step": 7, "init_text": "cat", "sd_checkpoint_name": "m"})
    for suffix, fmt in ((".safetensors", "diffusers"), (".safetensors", "kohya"), (".pt", "a1111")):
        a = save(emb, tmp_path / f"a{suffix}", fmt).read_bytes()
        b = save(emb, tmp_path / "sub" / f"other-name{suffix}", fmt).read_bytes()
        assert a == b, fmt
    blob = (tmp_path / "a.safetensors").read_bytes()
    header = json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_save_from_trainable_parameter(tmp_path):
    param = torch.nn.Parameter(vec(2, 768))
    emb = Embedding(name="live", vectors={"clip": param})
    back = load(save(emb, tmp_path / "live.pt"))
    assert emb.vectors["clip"] is param  # the caller's trainable tensor is left alone
    assert torch.equal(back.vectors["clip"], param.detach())


def test_an_embedding_built_in_python_with_unknown_slots_is_one_clear_error():
    for slots in (["clip_h"], ["clip_l"], ["clip", "clip_g"]):
        with pytest.raises(TextinvError, match=r"vector slots .*expected \['clip'\] \(SD 1.x/2.x\) or \['clip_l', 'clip_g'\]"):
            Embedding("x", {s: torch.zeros(1, 8) for s in slots})
    assert tokens.describe_widths(Embedding("x", {"clip": torch.zeros(1, 768)})) == "768-wide: made for SD 1.x"
