"""textinv reading, writing and converting SD3 / Flux.1 embedding files, in every layout in use.

Reading: each layout of test_readers_flow.LAYOUTS (OneTrainer's, with and without its ``*_out``
output-embedding twins; ComfyUI's ``t5xxl``; the combined layout; CLIP-only; T5-only; LoRA bundles),
as .safetensors and .pt, loads with every tensor exact (dtype included) and its family named.
Writing: every source × every format of formats.SAVE_FORMATS (plain and --clip-only) keeps every
part, or warns in one line naming exactly what it left out, or refuses in one line (CONVERSIONS).
Then the command line on these files.
"""
from __future__ import annotations

import json
import re
import time
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from textinv import formats, library
from textinv.cli import main
from textinv.errors import EmbeddingFileError
from textinv.formats import Embedding

from test_readers_flow import BUNDLE, LAYOUTS, layout_tensors, write_layout

SD3_KEYS = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5"}
FLUX_KEYS = {"clip_l": "clip_l", "t5": "t5"}
B = f"bundle_emb.{BUNDLE}."

# layout: (format textinv detects, family it names, {slot: the file key whose tensor it holds},
# {output-embedding twin: file key}).
READS = {
    "OneTrainer SD3": ("onetrainer", "SD3", SD3_KEYS, {}),
    "OneTrainer SD3 + *_out": ("onetrainer", "SD3", SD3_KEYS, {f"{k}_out": f"{k}_out" for k in SD3_KEYS}),
    "ComfyUI SD3": ("comfyui", "SD3", {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl"}, {}),
    "combined SD3": ("sd3", "SD3", SD3_KEYS, {}),
    "CLIP-only SD3": ("sdxl", "SDXL", {"clip_l": "clip_l", "clip_g": "clip_g"}, {}),  # SDXL's layout exactly
    "T5-only SD3": ("onetrainer", "SD3 or Flux.1 (t5 only)", {"t5": "t5"}, {}),
    "OneTrainer SD3 LoRA bundle": ("lora-bundle", "SD3", {k: B + k for k in SD3_KEYS}, {}),
    "OneTrainer/diffusers Flux": ("onetrainer", "Flux.1", FLUX_KEYS, {}),
    "OneTrainer Flux + *_out": ("onetrainer", "Flux.1", FLUX_KEYS, {"clip_l_out": "clip_l_out", "t5_out": "t5_out"}),
    "ComfyUI Flux": ("comfyui", "Flux.1", {"clip_l": "clip_l", "t5": "t5xxl"}, {}),
    "combined Flux": ("flux", "Flux.1", FLUX_KEYS, {}),
    "CLIP-only Flux": ("diffusers", "SD 1.x", {"clip": "clip_l"}, {}),  # one 768-wide tensor: SD 1.x's CLIP-L
    "T5-only Flux": ("onetrainer", "SD3 or Flux.1 (t5 only)", {"t5": "t5"}, {}),
    "OneTrainer Flux LoRA bundle": ("lora-bundle", "Flux.1", {k: B + k for k in FLUX_KEYS}, {}),
}


def assert_holds(emb: Embedding, data: dict, slots: dict, extra: dict) -> None:
    """``emb`` holds exactly these file tensors, bit for bit and in their dtype."""
    assert set(emb.vectors) == set(slots) and set(emb.extra) == set(extra), (sorted(emb.vectors), sorted(emb.extra))
    for got, want in ((emb.vectors, slots), (emb.extra, extra)):
        for key, file_key in want.items():
            assert got[key].dtype == data[file_key].dtype, key
            assert torch.equal(got[key], data[file_key]), f"{key} is not the file's {file_key!r}"


def quiet_load_all(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading any of these layouts warns about nothing
        return formats.load_all(path)


def test_the_table_covers_every_layout():
    assert set(READS) == set(LAYOUTS)


# --------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("label", list(READS), ids=lambda x: x)
def test_every_layout_reads_exactly_with_its_family_named(tmp_path, label, suffix):
    fmt, family, slots, extra = READS[label]
    path = write_layout(label, tmp_path, suffix)
    (emb,) = quiet_load_all(path)
    assert (emb.source_format, emb.family, emb.name) == (fmt, family, BUNDLE)
    assert_holds(emb, layout_tensors(label), slots, extra)
    if "t5" in slots:  # an SD3 file is never called SDXL, wherever its family is shown
        assert not emb.is_sdxl and "SDXL" not in emb.family and "SDXL" not in library.describe(path, emb)["made_for"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("label", ["OneTrainer SD3 + *_out", "combined Flux", "ComfyUI SD3", "OneTrainer Flux LoRA bundle",
                                   "T5-only Flux"])
def test_half_precision_files_read_and_write_back_bit_exact(tmp_path, label, dtype):
    _, _, slots, extra = READS[label]
    data = {k: v.to(dtype) for k, v in layout_tensors(label).items()}
    save_file(data, str(tmp_path / "half.safetensors"))
    (emb,) = quiet_load_all(tmp_path / "half.safetensors")
    assert_holds(emb, data, slots, extra)
    for fmt in ("sd3", "flux", "onetrainer", "comfyui", "diffusers"):
        for suffix in (".safetensors", ".bin" if fmt == "diffusers" else ".pt"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an SD3 embedding as flux leaves clip_g out: CONVERSIONS checks that
                written = formats.save(emb, tmp_path / f"{fmt}{suffix}", fmt)
            (back,) = quiet_load_all(written)
            for key, t in {**back.vectors, **back.extra}.items():
                original = {**emb.vectors, **emb.extra}[key]
                assert t.dtype == dtype and torch.equal(t, original), (fmt, suffix, key)


def test_t5_and_t5xxl_that_differ_warn_in_one_line_and_t5_is_taken(tmp_path):
    data = {"clip_l": torch.randn(2, 768), "t5": torch.randn(2, 4096), "t5xxl": torch.randn(2, 4096)}
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"differs{suffix}"
        save_file(data, str(path)) if suffix == ".safetensors" else torch.save(data, path)
        with pytest.warns(UserWarning) as caught:
            (emb,) = formats.load_all(path)
        (line,) = [str(w.message) for w in caught]
        assert line.startswith(f"{path}: ") and "\n" not in line
        assert "differs between 't5' (read by OneTrainer) and 't5xxl' (read by ComfyUI); took 't5'" in line
        assert torch.equal(emb.vectors["t5"], data["t5"]) and emb.family == "Flux.1"


def test_t5_and_t5xxl_of_other_dtypes_but_equal_values_are_the_same_part(tmp_path):
    t5 = torch.randn(2, 4096).to(torch.bfloat16)
    save_file({"clip_l": torch.randn(2, 768), "t5": t5, "t5xxl": t5.float()}, str(tmp_path / "x.safetensors"))
    (emb,) = quiet_load_all(tmp_path / "x.safetensors")
    assert emb.vectors["t5"].dtype == torch.bfloat16 and torch.equal(emb.vectors["t5"], t5)


def test_a_twin_of_the_comfyui_t5_key_is_the_t5_parts_twin(tmp_path):
    data = {"clip_l": torch.randn(1, 768), "t5xxl": torch.randn(1, 4096), "t5xxl_out": torch.randn(1, 4096)}
    save_file(data, str(tmp_path / "x.safetensors"))
    (emb,) = quiet_load_all(tmp_path / "x.safetensors")
    assert_holds(emb, data, {"clip_l": "clip_l", "t5": "t5xxl"}, {"t5_out": "t5xxl_out"})
    data.update(t5=data["t5xxl"].clone(), t5_out=torch.randn(1, 4096))  # both twins, differing: one line, t5_out taken
    save_file(data, str(tmp_path / "y.safetensors"))
    with pytest.warns(UserWarning, match=r"its T5 output embedding differs between 't5_out' and 't5xxl_out'; "
                                         r"took 't5_out'$") as caught:
        (emb,) = formats.load_all(tmp_path / "y.safetensors")
    assert len(caught) == 1 and torch.equal(emb.extra["t5_out"], data["t5_out"])


@pytest.mark.parametrize("other", ["lora_unet_down.weight", "emb_params", "clip_h", "clip_g_out"])
def test_unknown_tensors_beside_a_t5_part_are_refused_in_one_line(tmp_path, other):
    data = {"clip_l": torch.randn(1, 768), "t5": torch.randn(1, 4096), other: torch.randn(1, 1280)}
    save_file(data, str(tmp_path / "x.safetensors"))
    with pytest.raises(EmbeddingFileError) as err:
        formats.load_all(tmp_path / "x.safetensors")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'x.safetensors'}: holds a T5 part and 1 other tensor ({other})") and "\n" not in msg


# ------------------------------------------------------------------------------------ LoRA bundles
def bundle_of_three(path):
    """A LoRA file bundling a Flux.1 embedding, an SD3 one with OneTrainer's twins and a T5-only one."""
    g = torch.Generator().manual_seed(3)
    data = {"lora_transformer_blocks_0_attn.lora_down.weight": torch.randn(4, 64, generator=g)}
    for name, keys in (("flux-cat", ("clip_l", "t5")), ("sd3-dog", ("clip_l", "clip_g", "t5", "clip_l_out", "clip_g_out",
                                                                     "t5_out")), ("t5-fox", ("t5xxl",))):
        for key in keys:
            width = {"clip_l": 768, "clip_g": 1280}.get(key.removesuffix("_out"), 4096)
            data[f"bundle_emb.{name}.{key}"] = torch.randn(3, width, generator=g).to(torch.bfloat16)
    save_file(data, str(path)) if path.suffix == ".safetensors" else torch.save(data, path)
    return data


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_bundle_of_several_flow_embeddings_is_listed_and_each_selected_exactly(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    data = bundle_of_three(path)
    found = quiet_load_all(path)
    assert [(e.name, e.family, e.source_format) for e in found] == [
        ("flux-cat", "Flux.1", "lora-bundle"), ("sd3-dog", "SD3", "lora-bundle"),
        ("t5-fox", "SD3 or Flux.1 (t5 only)", "lora-bundle")]
    dog = formats.load(path, select="sd3-dog")
    p = "bundle_emb.sd3-dog."
    assert_holds(dog, data, {k: p + k for k in SD3_KEYS}, {f"{k}_out": f"{p}{k}_out" for k in SD3_KEYS})
    assert_holds(formats.load(path, select="t5-fox"), data, {"t5": "bundle_emb.t5-fox.t5xxl"}, {})
    with pytest.raises(EmbeddingFileError, match=r"a LoRA bundle of 3 embeddings \(flux-cat, sd3-dog, t5-fox\); pick"):
        formats.load(path)
    with pytest.raises(EmbeddingFileError, match=r"holds no embedding named 'owl' \(it holds: flux-cat, sd3-dog, t5-fox\)"):
        formats.load(path, select="owl")


def test_a_bundle_of_thousands_of_embeddings_loads_each_and_selects_one(tmp_path):
    # 2000 bundled Flux.1 embeddings (small widths): thousands of bundle_emb.* keys, read in a moment.
    data = {f"bundle_emb.e{i:04d}.{k}": torch.full((1, w), float(i))
            for i in range(2000) for k, w in (("clip_l", 8), ("t5", 16))}
    data["bundle_emb.big.t5"], data["bundle_emb.big.clip_l"] = torch.randn(75, 4096), torch.randn(75, 768)  # the most vectors
    save_file(data, str(tmp_path / "many.safetensors"))
    start = time.perf_counter()
    found = quiet_load_all(tmp_path / "many.safetensors")
    assert time.perf_counter() - start < 10
    assert len(found) == 2001 and found[0].name == "big" and found[0].num_vectors == 75
    assert {e.family for e in found} == {"Flux.1"}
    e1234 = formats.load(tmp_path / "many.safetensors", select="e1234")
    assert torch.equal(e1234.vectors["t5"], data["bundle_emb.e1234.t5"])


# ----------------------------------------------------------------------------- writing, converting
# Sources: {slot: width} and the slots that have OneTrainer's output-embedding twin.
SOURCES = {
    "SD3": ({"clip_l": 768, "clip_g": 1280, "t5": 4096}, ()),
    "SD3 + *_out": ({"clip_l": 768, "clip_g": 1280, "t5": 4096}, ("clip_l", "clip_g", "t5")),
    "Flux.1": ({"clip_l": 768, "t5": 4096}, ()),
    "Flux.1 + *_out": ({"clip_l": 768, "t5": 4096}, ("clip_l", "t5")),
    "T5 only": ({"t5": 4096}, ()),
    "T5 only + t5_out": ({"t5": 4096}, ("t5",)),
    "SD3 clip_g + t5": ({"clip_g": 1280, "t5": 4096}, ()),
    "SDXL": ({"clip_l": 768, "clip_g": 1280}, ()),
    "SD 1.x": ({"clip": 768}, ()),
}
SUFFIX = {"a1111": ".pt", "png": ".png"}  # the others: .safetensors

# What each conversion does, per source: one cell per format of formats.SAVE_FORMATS (in its order),
# plain then --clip-only: "=" every part kept (--clip-only: every part but T5), "-" warned in one line
# about what it left out, "x" refused in one line.
CONVERSIONS = {
    #                  diffusers a1111 kohya sdxl png  sd3  flux onetrainer comfyui
    "SD3":              "=x xx xx -= -= == -= == ==",
    "SD3 + *_out":      "=x xx xx -- -- =- -- =- =-",
    "Flux.1":           "== -= -= xx -= == == == ==",
    "Flux.1 + *_out":   "=- -- -- xx -- =- =- =- =-",
    "T5 only":          "=x xx xx xx xx =x =x =x =x",
    "T5 only + t5_out": "=x xx xx xx xx =x =x =x =x",
    "SD3 clip_g + t5":  "== -= -= xx -= == -= == ==",
    "SDXL":             "xx xx xx == == x= x= == ==",  # diffusers: SDXL's is a folder, not a .safetensors
    "SD 1.x":           "== == == xx == x= x= == ==",
}
LEFT_OUT = re.compile(r"^(?P<name>.+): left out (?P<parts>[\w, ]+) writing '(?P<fmt>[\w-]+)' \((?P<why>[^()]+)\)$")


def source(label: str, dtype=torch.float32) -> Embedding:
    widths, twins = SOURCES[label]
    g = torch.Generator().manual_seed(len(label))
    vectors = {k: torch.randn(2, w, generator=g).to(dtype) for k, w in widths.items()}
    return Embedding(BUNDLE, vectors, extra={f"{k}_out": torch.randn(2, widths[k], generator=g).to(dtype) for k in twins})


def convert(tmp_path, src: Embedding, fmt: str, clip_only: bool):
    """(outcome, parts read back as {source part: key it came back under}, the warning lines, the
    written embedding or the refusal)."""
    path = tmp_path / f"{fmt}-{clip_only}{SUFFIX.get(fmt, '.safetensors')}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            formats.save(src, path, fmt, clip_only=clip_only)
        except EmbeddingFileError as err:
            assert not path.exists() and not caught, (fmt, clip_only, [str(w.message) for w in caught])
            return "x", {}, [], str(err)
        back = formats.load(path)
    lines = [str(w.message) for w in caught]
    parts = {**src.vectors, **src.extra}
    came_back = {}
    for key, t in {**back.vectors, **back.extra}.items():  # each tensor read back is one of the source's parts
        same = [k for k, v in parts.items() if v.shape == t.shape and torch.equal(v.float(), t.float())]
        assert len(same) == 1, (fmt, clip_only, key)
        assert key in (same[0], formats.SINGLE_KEY), f"{fmt}: the source's {same[0]} came back as {key}"
        came_back[same[0]] = key
    return ("-" if lines else "="), came_back, lines, back


@pytest.mark.parametrize("label", list(SOURCES))
def test_every_conversion_keeps_every_part_or_names_what_it_left_out_or_refuses(tmp_path, label):
    src = source(label)
    cells = CONVERSIONS[label].replace(" ", "")
    assert len(cells) == 2 * len(formats.SAVE_FORMATS)
    for i, (fmt, clip_only) in enumerate((f, c) for f in formats.SAVE_FORMATS for c in (False, True)):
        outcome, came_back, lines, back = convert(tmp_path, src, fmt, clip_only)
        assert outcome == cells[i], (label, fmt, clip_only, lines or back)
        if outcome == "x":
            assert back.startswith(f"{tmp_path}/") and "\n" not in back, back  # the one line names the file
            continue
        asked = [k for k in {**src.vectors, **src.extra} if not (clip_only and k == "t5")]
        missing = [k for k in asked if k not in came_back]
        if outcome == "=":
            assert not missing, (label, fmt, clip_only)
        else:
            (line,) = lines
            m = LEFT_OUT.match(line)
            assert m and m["name"] == BUNDLE and m["fmt"] == fmt, line
            assert m["parts"].split(", ") == missing, (line, missing)  # exactly what is missing, in order
        if "t5" in came_back:  # what holds T5 is never called SDXL
            assert not back.is_sdxl and "SDXL" not in back.family, (label, fmt, back.family)
            assert back.family == src.family or missing, (label, fmt, back.family)


@pytest.mark.parametrize("fmt, parts, family", [
    ("sdxl", "t5", "SDXL"), ("png", "t5", "SDXL"), ("flux", "clip_g", "Flux.1")])
def test_sd3_as_sdxl_keeps_clip_l_and_clip_g_and_warns_about_what_it_leaves_out(tmp_path, fmt, parts, family):
    src = source("SD3")
    outcome, came_back, (line,), back = convert(tmp_path, src, fmt, False)
    assert back.family == family and set(came_back) == set(src.vectors) - {parts}
    reason = {"flux": "Flux.1 files hold clip_l + t5 only"}.get(fmt, f"no tool reads a T5 part from format '{fmt}'")
    assert line == f"{BUNDLE}: left out {parts} writing '{fmt}' ({reason})"


def test_output_embeddings_are_kept_by_the_flow_formats_and_named_when_left_out(tmp_path):
    src = source("SD3 + *_out")
    for fmt in ("sd3", "onetrainer", "comfyui", "diffusers"):
        outcome, came_back, _, back = convert(tmp_path, src, fmt, False)
        assert outcome == "=" and set(back.extra) == {"clip_l_out", "clip_g_out", "t5_out"}, fmt
    _, _, (line,), _ = convert(tmp_path, src, "sdxl", False)
    assert line == (f"{BUNDLE}: left out t5, clip_l_out, clip_g_out, t5_out writing 'sdxl' (no tool reads a T5 part from "
                    "format 'sdxl'; OneTrainer's output embeddings: format 'sdxl' holds none)")
    _, _, (line,), back = convert(tmp_path, src, "flux", False)
    assert "left out clip_g, clip_g_out writing 'flux'" in line and set(back.extra) == {"clip_l_out", "t5_out"}


@pytest.mark.parametrize("label, fmt, clip_only, words", [
    ("SDXL", "sd3", False, "'kitty' is SDXL (clip_l + clip_g), with no T5 part: SD3 files need one; add --clip-only"),
    ("SD 1.x", "flux", False, "with no T5 part: Flux.1 files need one"),
    ("Flux.1", "sdxl", False, "'kitty' is Flux.1 (clip_l + t5): format 'sdxl' holds clip_l + clip_g"),
    ("Flux.1", "sdxl", True, "'kitty' is Flux.1 (clip_l + t5): format 'sdxl' holds clip_l + clip_g"),
    ("SD3", "a1111", False, "'kitty' is an SD3 embedding (clip_l + clip_g + t5); format 'a1111' holds one text encoder's"),
    ("SD3 + *_out", "kohya", True, "'kitty' is an SD3 embedding"),
    ("T5 only", "png", False, "format 'png' holds no T5 part; write --format flux, onetrainer or comfyui"),
    ("T5 only", "sd3", True, "'kitty' has no CLIP part (SD3 or Flux.1 (t5 only)): nothing to write with --clip-only"),
])
def test_refusals_are_one_line_name_the_embeddings_own_family_and_warn_about_nothing(tmp_path, label, fmt, clip_only, words):
    outcome, _, _, msg = convert(tmp_path, source(label), fmt, clip_only)
    assert outcome == "x" and words in msg, msg
    assert list(tmp_path.iterdir()) == []  # no file, no temporary


def test_sdxl_as_sd3_with_clip_only_is_the_sdxl_layout_and_sd3_with_clip_only_is_a1111s_sd3(tmp_path):
    for label in ("SDXL", "SD3"):
        src = source(label)
        path = formats.save(src, tmp_path / f"{label}.safetensors", "sd3", clip_only=True)
        back = formats.load(path)
        assert back.source_format == "sdxl" and back.family == "SDXL"
        assert all(torch.equal(back.vectors[k], src.vectors[k]) for k in ("clip_l", "clip_g"))


def test_flux_clip_l_alone_is_an_sd1_embedding_for_single_tensor_formats(tmp_path):
    # Flux.1's CLIP-L is SD 1.x's text encoder: its part alone goes where A1111/Forge read a 768-wide tensor.
    src = source("Flux.1")
    for fmt in ("a1111", "kohya", "png", "diffusers"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = formats.save(src, tmp_path / f"x{SUFFIX.get(fmt, '.safetensors')}", fmt, clip_only=fmt == "diffusers")
        back = formats.load(path)
        assert back.family == "SD 1.x" and torch.equal(back.vectors["clip"], src.vectors["clip_l"]), fmt


def test_sd3_clip_only_as_diffusers_is_its_two_file_sdxl_folder(tmp_path):
    src = source("SD3 + *_out")
    with pytest.warns(UserWarning, match="left out clip_l_out, clip_g_out, t5_out writing 'diffusers'"):
        folder = formats.save(src, tmp_path / "kitty", "diffusers", clip_only=True)
    back = formats.load(folder)
    assert back.source_format == "diffusers-sdxl" and torch.equal(back.vectors["clip_g"], src.vectors["clip_g"])


def test_flux_as_diffusers_bin_is_a_torch_file_as_the_suffix_says(tmp_path):
    src = source("Flux.1 + *_out")
    path = formats.save(src, tmp_path / "learned_embeds.bin", "diffusers")
    assert path.read_bytes()[:4] == b"PK\x03\x04"  # torch's zip, not safetensors bytes under a .bin name
    back = formats.load(path)
    assert all(torch.equal({**back.vectors, **back.extra}[k], v) for k, v in {**src.vectors, **src.extra}.items())


def test_saving_checks_output_embeddings_as_it_checks_vectors(tmp_path):
    vectors = {"clip_l": torch.randn(2, 768), "t5": torch.randn(2, 4096)}
    for extra, words in (({"t5_out": torch.randn(3, 4096)}, "t5_out is (3, 4096) but its part t5 is (2, 4096)"),
                         ({"clip_g_out": torch.randn(2, 1280)}, "clip_g_out: not the output embedding"),
                         ({"notes": torch.randn(2, 8)}, "notes: not the output embedding"),
                         ({"t5_out": torch.full((2, 4096), float("nan"))}, "t5_out: tensor contains NaN")):
        with pytest.raises(EmbeddingFileError, match=re.escape(words)):
            formats.save(Embedding("x", vectors, extra=extra), tmp_path / "x.safetensors", "flux")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ the commands
@pytest.fixture
def runner():
    return CliRunner()


def one_line(res, code: int, prefix: str) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    (line,) = res.stderr.splitlines()
    assert line.startswith(prefix), line
    return line


@pytest.fixture
def files(tmp_path):
    """One file per layout, in one library folder (names: the layout's, made file-safe)."""
    folder = tmp_path / "library"
    folder.mkdir()
    paths = {}
    for label in LAYOUTS:
        written = write_layout(label, tmp_path / "layouts")
        paths[label] = folder / f"{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.safetensors"
        written.rename(paths[label])
    return folder, paths


def test_convert_sd3_to_sdxl_warns_in_one_line_and_names_the_written_family(runner, files, tmp_path):
    _, paths = files
    warnings.simplefilter("always")
    res = runner.invoke(main, ["convert", str(paths["OneTrainer SD3 + *_out"]), str(tmp_path / "xl.safetensors"),
                               "--format", "sdxl"])
    line = one_line(res, 0, "warning: ")
    assert line == ("warning: onetrainer-sd3-out: left out t5, clip_l_out, clip_g_out, t5_out writing 'sdxl' (no tool "
                    "reads a T5 part from format 'sdxl'; OneTrainer's output embeddings: format 'sdxl' holds none)")
    assert res.stdout == f"wrote {tmp_path / 'xl.safetensors'} (sdxl, trigger 'onetrainer-sd3-out', 2 vectors, SDXL)\n"


@pytest.mark.parametrize("args, words", [
    (["combined-flux.safetensors", "out.safetensors", "--format", "sdxl"], "format 'sdxl' holds clip_l + clip_g"),
    (["combined-sd3.safetensors", "out.pt", "--format", "a1111"], "'combined-sd3' is an SD3 embedding"),
    (["clip-only-sd3.safetensors", "out.safetensors", "--format", "sd3"], "no T5 part: SD3 files need one; add --clip-only"),
    (["t5-only-flux.safetensors", "out.png"], "format 'png' holds no T5 part"),
    (["onetrainer-sd3-lora-bundle.safetensors", "out.safetensors", "--select", "owl"], "holds no embedding named 'owl'"),
])
def test_convert_refusals_are_one_error_line_and_write_nothing(runner, files, tmp_path, args, words):
    folder, _ = files
    out = tmp_path / "out"
    out.mkdir()
    res = runner.invoke(main, ["convert", str(folder / args[0]), str(out / args[1]), *args[2:]])
    assert words in one_line(res, 2, "error: ")
    assert list(out.iterdir()) == []


def test_convert_clip_only_and_select_from_a_bundle(runner, tmp_path):
    bundle_of_three(tmp_path / "lora.safetensors")
    res = runner.invoke(main, ["convert", str(tmp_path / "lora.safetensors"), str(tmp_path / "dog.safetensors"),
                               "--select", "sd3-dog"])
    assert res.exit_code == 0 and res.stderr == "", res.output
    assert res.stdout.endswith("(sd3, trigger 'sd3-dog', 3 vectors, SD3)\n")
    assert set(formats.load(tmp_path / "dog.safetensors").extra) == {"clip_l_out", "clip_g_out", "t5_out"}
    res = runner.invoke(main, ["convert", str(tmp_path / "dog.safetensors"), str(tmp_path / "a1111.safetensors"),
                               "--format", "sd3", "--clip-only"])
    line = one_line(res, 0, "warning: ")  # the twins it leaves out; not the T5 part it was asked to leave
    assert "left out clip_l_out, clip_g_out, t5_out writing 'sd3'" in line and "t5," not in line
    assert res.stdout.endswith("(sdxl, trigger 'dog', 3 vectors, SDXL)\n")


def test_scale_names_the_written_files_family(runner, files, tmp_path):
    """scale (and merge) say what the written file holds: an SD3 embedding scaled into a card is SDXL's pair."""
    _, paths = files
    warnings.simplefilter("always")
    res = runner.invoke(main, ["scale", str(paths["combined SD3"]), "0.5", "-o", str(tmp_path / "half.png")])
    assert "left out t5" in one_line(res, 0, "warning: ")
    assert res.stdout.endswith(", SDXL)\n"), res.stdout


def test_inspect_names_the_family_and_the_output_embeddings(runner, files):
    _, paths = files
    res = runner.invoke(main, ["inspect", str(paths["OneTrainer SD3 + *_out"]), "--json"])
    assert res.exit_code == 0 and res.stderr == "", res.output
    info = json.loads(res.stdout)
    assert (info["format"], info["family"]) == ("onetrainer", "SD3")
    assert info["vectors"] == {"clip_l": [2, 768], "clip_g": [2, 1280], "t5": [2, 4096]}
    assert info["output_embeddings"] == {"clip_l_out": [2, 768], "clip_g_out": [2, 1280], "t5_out": [2, 4096]}
    human = runner.invoke(main, ["inspect", str(paths["T5-only Flux"]), str(paths["ComfyUI Flux"])])
    assert human.exit_code == 0 and "SD3 or Flux.1 (t5 only)" in human.stdout and "t5 2×4096 float32" in human.stdout
    assert "comfyui" in human.stdout and "SDXL" not in human.stdout


def test_list_shows_every_layouts_family_and_no_sd3_file_as_sdxl(runner, files):
    folder, paths = files
    res = runner.invoke(main, ["list", str(folder), "--json"])
    assert res.exit_code == 0 and res.stderr == "", res.output
    rows = {r["file"]: r for r in json.loads(res.stdout)}
    assert len(rows) == len(LAYOUTS)
    for label, path in paths.items():
        row = rows[path.name]
        assert row["family"] == READS[label][1] and row["vectors"] == 2, (label, row)
        assert row["trigger"] == (BUNDLE if READS[label][0] == "lora-bundle" else path.stem)
    table = runner.invoke(main, ["list", str(folder)])
    assert table.exit_code == 0 and table.stdout.splitlines()[-1] == f"{len(LAYOUTS)} embeddings"
    sdxl_rows = [line for line in table.stdout.splitlines() if " SDXL " in line]
    assert [line.split()[-1] for line in sdxl_rows] == [paths["CLIP-only SD3"].name]


# ------------------------------------------------------------------------- library: merge, scale
def test_scale_merge_and_concat_carry_onetrainers_output_embeddings(runner, tmp_path):
    a = formats.save(source("Flux.1 + *_out"), tmp_path / "a.safetensors")
    b = Embedding("b", {k: v * 3 for k, v in source("Flux.1 + *_out").vectors.items()},
                  extra={k: v - 1 for k, v in source("Flux.1 + *_out").extra.items()})
    b = formats.save(b, tmp_path / "b.safetensors")
    ea, eb = formats.load(a), formats.load(b)
    res = runner.invoke(main, ["scale", str(a), "0.5", "-o", str(tmp_path / "half.safetensors")])
    assert res.exit_code == 0 and res.stderr == "", res.output
    half = formats.load(tmp_path / "half.safetensors")
    assert set(half.extra) == {"clip_l_out", "t5_out"}
    assert all(torch.equal(half.extra[k], ea.extra[k] * 0.5) for k in ea.extra)
    res = runner.invoke(main, ["merge", str(a), str(b), "--weights", "0.25,0.75", "-o", str(tmp_path / "ab.safetensors")])
    assert res.exit_code == 0 and res.stderr == "", res.output
    ab = formats.load(tmp_path / "ab.safetensors")
    for k in ea.extra:
        assert torch.allclose(ab.extra[k], 0.25 * ea.extra[k] + 0.75 * eb.extra[k])
    cat = library.concat([ea, eb])
    assert cat.num_vectors == 4 and torch.equal(cat.extra["t5_out"], torch.cat([ea.extra["t5_out"], eb.extra["t5_out"]]))
    plain = formats.save(source("Flux.1"), tmp_path / "plain.safetensors")
    res = runner.invoke(main, ["merge", str(a), str(plain), "-o", str(tmp_path / "no.safetensors")])
    line = one_line(res, 2, "error: ")
    assert "merge: OneTrainer's output embeddings differ ('plain' none, 'a' clip_l_out + t5_out): cannot combine" in line


def test_a_lone_4096_wide_tensor_is_a_t5_part_as_comfyui_takes_it(tmp_path):
    """No one-encoder model is 4096 wide, but T5-XXL is: a single tensor that wide (any key) is a T5
    part alone, which the flow formats write with both T5 keys; a 768-wide one stays an SD 1.x file."""
    t = torch.randn(2, 4096)
    save_file({"emb_params": t}, str(tmp_path / "lone.safetensors"))
    emb = formats.load(tmp_path / "lone.safetensors")
    assert list(emb.vectors) == ["t5"] and torch.equal(emb.vectors["t5"], t)
    assert emb.family == "SD3 or Flux.1 (t5 only)"
    back = formats.load(formats.save(emb, tmp_path / "out.safetensors", "flux"))
    assert torch.equal(back.vectors["t5"], t)
    save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "sd1.safetensors"))
    assert list(formats.load(tmp_path / "sd1.safetensors").vectors) == ["clip"]
