"""SD3 and Flux.1 embedding files in each tool's own layout, read by each tool's rules (readers.py).

The files are written here with safetensors directly, as each tool writes them,
with a few random vectors of the real widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096).  ``EXPECT``
is the reader × layout table: what each tool loads (slot -> the file key whose tensor it gets,
compared exactly) or why it refuses.  ``PARTIAL`` is what the tools that keep the parts they can
read (ComfyUI, A1111, Forge) keep of a file they refuse whole.  Last, textinv's own SD3 / Flux.1
formats (textinv.formats.save) go through the same readers.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from textinv import formats
from textinv.formats import Embedding

import readers
from readers import FLOW_READERS, PARTIAL, WIDTHS, Refused

N = 2  # vectors per encoder
BUNDLE = "kitty"  # the placeholder of the bundled embedding (OneTrainer keys bundles by it)
KEY_WIDTHS = {"clip_l": 768, "clip_g": 1280, "t5": 4096, "t5xxl": 4096}
LORA_KEY = "lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight"  # a LoRA weight beside the bundle
OUT = ("clip_l_out", "clip_g_out", "t5_out")

LAYOUTS = {
    # label: (family, the file's keys)
    "OneTrainer SD3": ("SD3", ("clip_l", "clip_g", "t5")),
    "OneTrainer SD3 + *_out": ("SD3", ("clip_l", "clip_g", "t5") + OUT),
    "ComfyUI SD3": ("SD3", ("clip_l", "clip_g", "t5xxl")),
    "combined SD3": ("SD3", ("clip_l", "clip_g", "t5", "t5xxl")),
    "CLIP-only SD3": ("SD3", ("clip_l", "clip_g")),
    "T5-only SD3": ("SD3", ("t5",)),
    "OneTrainer SD3 LoRA bundle": ("SD3", tuple(f"bundle_emb.{BUNDLE}.{k}" for k in ("clip_l", "clip_g", "t5"))
                                   + (LORA_KEY,)),
    "OneTrainer/diffusers Flux": ("Flux.1", ("clip_l", "t5")),
    "OneTrainer Flux + *_out": ("Flux.1", ("clip_l", "t5", "clip_l_out", "t5_out")),
    "ComfyUI Flux": ("Flux.1", ("clip_l", "t5xxl")),
    "combined Flux": ("Flux.1", ("clip_l", "t5", "t5xxl")),
    "CLIP-only Flux": ("Flux.1", ("clip_l",)),
    "T5-only Flux": ("Flux.1", ("t5",)),
    "OneTrainer Flux LoRA bundle": ("Flux.1", tuple(f"bundle_emb.{BUNDLE}.{k}" for k in ("clip_l", "t5"))
                                    + (LORA_KEY,)),
}


def layout_tensors(label: str) -> dict[str, torch.Tensor]:
    """The layout's tensors: random rows of each key's width; a combined file's 't5xxl' repeats 't5'
    (as a copy: safetensors refuses to save two keys sharing storage)."""
    _, keys = LAYOUTS[label]
    g = torch.Generator().manual_seed(sum(map(ord, label)))
    data = {}
    for key in keys:
        if key == "t5xxl" and "t5" in data:
            data[key] = data["t5"].clone()
        elif key == LORA_KEY:
            data[key] = torch.randn(4, 1536, generator=g)
        else:
            data[key] = torch.randn(N, KEY_WIDTHS[key.rsplit(".", 1)[-1].removesuffix("_out")], generator=g)
    return data


def write_layout(label: str, folder: Path, suffix: str = ".safetensors") -> Path:
    folder = folder / re.sub(r"\W+", "-", label)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{BUNDLE}{suffix}"
    if suffix == ".safetensors":
        save_file(layout_tensors(label), str(path))
    else:
        torch.save(layout_tensors(label), path)
    return path


B = f"bundle_emb.{BUNDLE}."
T5_MISSING = r"t5xxl part missing — falls to the first tensor '{}' \({}-wide\)"
SD3_ALL, FLUX_ALL = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5"}, {"clip_l": "clip_l", "t5": "t5"}
SD3_CLIP = {"clip_l": "clip_l", "clip_g": "clip_g"}
NO_SD3_LOADER = "StableDiffusion3Pipeline has no load_textual_inversion"
NO_A1111_FLUX, A1111_NO_T5 = "A1111 has no Flux.1 support", "its SD3 T5 encoder takes no embeddings"
FORGE_2048 = r"Forge: skipped by its clip_l engine \(width 2048, it expects 768\)"
FORGE_TERMS, FORGE_NO_T5 = "Forge: embedding file has multiple terms", "its T5 engine takes no embeddings"

# (layout, reader): {slot: file key} — it loads these exact tensors — or a regex of its refusal.
EXPECT = {
    ("OneTrainer SD3", "ComfyUI"): T5_MISSING.format("clip_g", 1280),
    ("OneTrainer SD3", "OneTrainer"): SD3_ALL,
    ("OneTrainer SD3", "diffusers (Flux card)"): NO_SD3_LOADER,
    ("OneTrainer SD3", "A1111 1.10"): A1111_NO_T5,
    ("OneTrainer SD3", "Forge"): FORGE_2048,
    ("OneTrainer SD3 + *_out", "ComfyUI"): T5_MISSING.format("clip_g", 1280),
    ("OneTrainer SD3 + *_out", "OneTrainer"): {"clip_l": "clip_l_out", "clip_g": "clip_g_out", "t5": "t5_out"},
    ("OneTrainer SD3 + *_out", "diffusers (Flux card)"): NO_SD3_LOADER,
    ("OneTrainer SD3 + *_out", "A1111 1.10"): A1111_NO_T5,
    ("OneTrainer SD3 + *_out", "Forge"): FORGE_2048,
    ("ComfyUI SD3", "ComfyUI"): {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl"},
    ("ComfyUI SD3", "OneTrainer"): "no 't5' or 't5_out' key",
    ("ComfyUI SD3", "diffusers (Flux card)"): NO_SD3_LOADER,
    ("ComfyUI SD3", "A1111 1.10"): A1111_NO_T5,
    ("ComfyUI SD3", "Forge"): FORGE_2048,
    ("combined SD3", "ComfyUI"): {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl"},
    ("combined SD3", "OneTrainer"): SD3_ALL,
    ("combined SD3", "diffusers (Flux card)"): NO_SD3_LOADER,
    ("combined SD3", "A1111 1.10"): A1111_NO_T5,
    ("combined SD3", "Forge"): FORGE_2048,
    ("CLIP-only SD3", "ComfyUI"): T5_MISSING.format("clip_g", 1280),
    ("CLIP-only SD3", "OneTrainer"): "no 't5' or 't5_out' key",
    ("CLIP-only SD3", "diffusers (Flux card)"): NO_SD3_LOADER,
    ("CLIP-only SD3", "A1111 1.10"): A1111_NO_T5,
    ("CLIP-only SD3", "Forge"): FORGE_2048,
    ("T5-only SD3", "ComfyUI"): r"clip_l part missing — falls to the first tensor 't5' \(4096-wide\)",
    ("T5-only SD3", "OneTrainer"): "no 'clip_l' or 'clip_l_out' key",
    ("T5-only SD3", "diffusers (Flux card)"): NO_SD3_LOADER,
    ("T5-only SD3", "A1111 1.10"): r"A1111: skipped \(width 4096, the model expects 2048\)",
    ("T5-only SD3", "Forge"): r"Forge: skipped by its clip_l engine \(width 4096",
    ("OneTrainer SD3 LoRA bundle", "ComfyUI"): T5_MISSING.format(B + "clip_g", 1280),
    ("OneTrainer SD3 LoRA bundle", "OneTrainer"): "no 'clip_l' or 'clip_l_out' key",
    ("OneTrainer SD3 LoRA bundle", "diffusers (Flux card)"): NO_SD3_LOADER,
    ("OneTrainer SD3 LoRA bundle", "A1111 1.10"): "A1111: embedding file has multiple terms",
    ("OneTrainer SD3 LoRA bundle", "Forge"): FORGE_TERMS,
    ("OneTrainer/diffusers Flux", "ComfyUI"): T5_MISSING.format("clip_l", 768),
    ("OneTrainer/diffusers Flux", "OneTrainer"): FLUX_ALL,
    ("OneTrainer/diffusers Flux", "diffusers (Flux card)"): FLUX_ALL,
    ("OneTrainer/diffusers Flux", "A1111 1.10"): NO_A1111_FLUX,
    ("OneTrainer/diffusers Flux", "Forge"): FORGE_TERMS,
    ("OneTrainer Flux + *_out", "ComfyUI"): T5_MISSING.format("clip_l", 768),
    ("OneTrainer Flux + *_out", "OneTrainer"): {"clip_l": "clip_l_out", "t5": "t5_out"},
    ("OneTrainer Flux + *_out", "diffusers (Flux card)"): FLUX_ALL,  # the card takes the input keys
    ("OneTrainer Flux + *_out", "A1111 1.10"): NO_A1111_FLUX,
    ("OneTrainer Flux + *_out", "Forge"): FORGE_TERMS,
    ("ComfyUI Flux", "ComfyUI"): {"clip_l": "clip_l", "t5": "t5xxl"},
    ("ComfyUI Flux", "OneTrainer"): "no 't5' or 't5_out' key",
    ("ComfyUI Flux", "diffusers (Flux card)"): r"no 't5' key \(KeyError\)",
    ("ComfyUI Flux", "A1111 1.10"): NO_A1111_FLUX,
    ("ComfyUI Flux", "Forge"): FORGE_TERMS,
    ("combined Flux", "ComfyUI"): {"clip_l": "clip_l", "t5": "t5xxl"},
    ("combined Flux", "OneTrainer"): FLUX_ALL,
    ("combined Flux", "diffusers (Flux card)"): FLUX_ALL,
    ("combined Flux", "A1111 1.10"): NO_A1111_FLUX,
    ("combined Flux", "Forge"): FORGE_TERMS,
    ("CLIP-only Flux", "ComfyUI"): T5_MISSING.format("clip_l", 768),
    ("CLIP-only Flux", "OneTrainer"): "no 't5' or 't5_out' key",
    ("CLIP-only Flux", "diffusers (Flux card)"): r"no 't5' key \(KeyError\)",
    ("CLIP-only Flux", "A1111 1.10"): NO_A1111_FLUX,
    ("CLIP-only Flux", "Forge"): FORGE_NO_T5,
    ("T5-only Flux", "ComfyUI"): r"clip_l part missing — falls to the first tensor 't5' \(4096-wide\)",
    ("T5-only Flux", "OneTrainer"): "no 'clip_l' or 'clip_l_out' key",
    ("T5-only Flux", "diffusers (Flux card)"): r"no 'clip_l' key \(KeyError\)",
    ("T5-only Flux", "A1111 1.10"): NO_A1111_FLUX,
    ("T5-only Flux", "Forge"): r"Forge: skipped by its clip_l engine \(width 4096, it expects 768\)",
    ("OneTrainer Flux LoRA bundle", "ComfyUI"): T5_MISSING.format(B + "clip_l", 768),
    ("OneTrainer Flux LoRA bundle", "OneTrainer"): "no 'clip_l' or 'clip_l_out' key",
    ("OneTrainer Flux LoRA bundle", "diffusers (Flux card)"): r"no 'clip_l' key \(KeyError\)",
    ("OneTrainer Flux LoRA bundle", "A1111 1.10"): NO_A1111_FLUX,
    ("OneTrainer Flux LoRA bundle", "Forge"): FORGE_TERMS,
}

# (layout, reader) -> what the tool keeps with partial=True, where it refuses the file whole but
# keeps some parts.  Every other refusal in EXPECT keeps nothing.
PARTIAL_KEEPS = {
    ("OneTrainer SD3", "ComfyUI"): SD3_CLIP,
    ("OneTrainer SD3 + *_out", "ComfyUI"): SD3_CLIP,
    ("CLIP-only SD3", "ComfyUI"): SD3_CLIP,
    ("T5-only SD3", "ComfyUI"): {"t5": "t5"},  # the first-tensor fallback happens to be the T5 part
    ("OneTrainer SD3 LoRA bundle", "ComfyUI"): {"clip_l": B + "clip_l", "clip_g": B + "clip_g"},
    ("OneTrainer/diffusers Flux", "ComfyUI"): {"clip_l": "clip_l"},
    ("OneTrainer Flux + *_out", "ComfyUI"): {"clip_l": "clip_l"},
    ("CLIP-only Flux", "ComfyUI"): {"clip_l": "clip_l"},
    ("T5-only Flux", "ComfyUI"): {"t5": "t5"},
    ("OneTrainer Flux LoRA bundle", "ComfyUI"): {"clip_l": B + "clip_l"},
    ("OneTrainer SD3", "A1111 1.10"): SD3_CLIP,
    ("OneTrainer SD3 + *_out", "A1111 1.10"): SD3_CLIP,
    ("ComfyUI SD3", "A1111 1.10"): SD3_CLIP,
    ("combined SD3", "A1111 1.10"): SD3_CLIP,
    ("CLIP-only SD3", "A1111 1.10"): SD3_CLIP,
    ("CLIP-only Flux", "Forge"): {"clip_l": "clip_l"},
}


def _assert_reads(got: readers.Read, data: dict, want: dict, name: str = BUNDLE) -> None:
    assert got.name == name
    assert set(got.vectors) == set(want), f"reads slots {sorted(got.vectors)}"
    for slot, key in want.items():
        assert torch.equal(got.vectors[slot], data[key].float()), f"{slot} is not the file's '{key}'"


def test_the_table_covers_every_layout_and_reader():
    assert set(EXPECT) == {(label, reader) for label in LAYOUTS for reader in FLOW_READERS}
    assert all(reader in PARTIAL for _, reader in PARTIAL_KEEPS)


@pytest.mark.parametrize("label, reader", list(EXPECT), ids=lambda x: x)
def test_each_tool_reads_each_layout_as_its_code_does(tmp_path, label, reader):
    family, want = LAYOUTS[label][0], EXPECT[label, reader]
    path = write_layout(label, tmp_path)
    if isinstance(want, str):
        with pytest.raises(Refused, match=want):
            FLOW_READERS[reader](path, family)
    else:
        name = "<s0>" if reader.startswith("diffusers") else BUNDLE
        _assert_reads(FLOW_READERS[reader](path, family), layout_tensors(label), want, name)


@pytest.mark.parametrize("label, reader", [p for p in EXPECT if p[1] in PARTIAL and isinstance(EXPECT[p], str)],
                         ids=lambda x: x)
def test_the_parts_a_tool_keeps_of_a_file_it_would_not_load_whole(tmp_path, label, reader):
    family, keeps = LAYOUTS[label][0], PARTIAL_KEEPS.get((label, reader))
    path = write_layout(label, tmp_path)
    if keeps is None:
        with pytest.raises(Refused):
            FLOW_READERS[reader](path, family, partial=True)
    else:
        _assert_reads(FLOW_READERS[reader](path, family, partial=True), layout_tensors(label), keeps)


@pytest.mark.parametrize("family", ["SD3", "Flux.1"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_the_combined_layout_loads_whole_in_comfyui_and_onetrainer(tmp_path, family, suffix):
    # 't5' for OneTrainer, 't5xxl' for ComfyUI, the same vectors: each ignores the other's key.
    label = "combined SD3" if family == "SD3" else "combined Flux"
    path, data = write_layout(label, tmp_path, suffix), layout_tensors(label)
    comfy, onetrainer = readers.comfyui(path, family), readers.onetrainer(path, family)
    assert set(comfy.vectors) == set(onetrainer.vectors) == set(WIDTHS[family])
    for slot in WIDTHS[family]:
        assert torch.equal(comfy.vectors[slot], onetrainer.vectors[slot])
    assert torch.equal(onetrainer.vectors["t5"], data["t5"]) and torch.equal(comfy.vectors["t5"], data["t5xxl"])


def test_a_combined_file_cannot_hold_one_tensor_under_both_t5_keys(tmp_path):
    t5 = torch.zeros(N, 4096)
    with pytest.raises(RuntimeError, match="share memory"):
        save_file({"clip_l": torch.zeros(N, 768), "t5": t5, "t5xxl": t5}, str(tmp_path / "shared.safetensors"))


def test_onetrainer_prefers_the_out_twin_even_of_one_part(tmp_path):
    data = {"clip_l": torch.randn(N, 768), "t5": torch.randn(N, 4096), "t5_out": torch.randn(N, 4096)}
    save_file(data, str(tmp_path / "x.safetensors"))
    got = readers.onetrainer(tmp_path / "x.safetensors", "Flux.1")
    assert torch.equal(got.vectors["clip_l"], data["clip_l"]) and torch.equal(got.vectors["t5"], data["t5_out"])


def test_onetrainer_refuses_a_part_of_the_wrong_width(tmp_path):
    save_file({"clip_l": torch.zeros(N, 768), "t5": torch.zeros(N, 768)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(Refused, match=r"'t5' is \(2, 768\), its encoder takes \[n, 4096\]"):
        readers.onetrainer(tmp_path / "x.safetensors", "Flux.1")


@pytest.mark.parametrize("family", ["SD3", "Flux.1"])
def test_onetrainer_never_reads_a_bundle_back(tmp_path, family):
    label = "OneTrainer SD3 LoRA bundle" if family == "SD3" else "OneTrainer Flux LoRA bundle"
    path = write_layout(label, tmp_path)
    with pytest.raises(Refused, match="write-only"):
        readers.onetrainer_bundle(path, family, BUNDLE)
    with pytest.raises(Refused, match="no bundle_emb.other"):
        readers.onetrainer_bundle(path, family, "other")


def test_comfyui_concatenates_every_bundled_embedding_whatever_its_name(tmp_path):
    a, b = torch.randn(1, 768), torch.randn(2, 768)
    save_file({"bundle_emb.a.clip_l": a, "bundle_emb.b.clip_l": b, "bundle_emb.b.t5xxl": torch.randn(3, 4096)},
              str(tmp_path / "lora.safetensors"))
    got = readers.comfyui(tmp_path / "lora.safetensors", "Flux.1")
    assert torch.equal(got.vectors["clip_l"], torch.cat([a, b]))
    assert got.vectors["t5"].shape == (3, 4096)


def test_comfyui_keeps_its_sd1_and_sdxl_reading(tmp_path):
    # The first-tensor fallback and the SDXL keys are unchanged by the T5 key.
    save_file({"emb_params": torch.ones(3, 768)}, str(tmp_path / "one.safetensors"))
    assert readers.comfyui(tmp_path / "one.safetensors", "SD 1.x").vectors["clip"].shape == (3, 768)
    with pytest.raises(Refused, match="is ignored \\(768 != 1024\\)"):
        readers.comfyui(tmp_path / "one.safetensors", "SD 2.x")


def test_the_flux_card_needs_one_row_per_token_in_both_encoders(tmp_path):
    save_file({"clip_l": torch.zeros(2, 768), "t5": torch.zeros(3, 4096)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(Refused, match="'t5' has 3 rows for 2 tokens"):
        readers.diffusers_flux_manual(tmp_path / "x.safetensors", "Flux.1")
    save_file({"clip_l": torch.zeros(1, 768), "t5": torch.zeros(3, 4096)}, str(tmp_path / "y.safetensors"))
    got = readers.diffusers_flux_manual(tmp_path / "y.safetensors", "Flux.1")  # one token: <s0>, <s0>_1, ...
    assert got.name == "<s0>" and got.vectors["t5"].shape == (3, 4096)


def test_forge_reads_single_clip_files_in_the_engine_of_their_width(tmp_path):
    save_file({"clip_g": torch.randn(N, 1280)}, str(tmp_path / "g.safetensors"))
    got = readers.forge(tmp_path / "g.safetensors", "SD3", partial=True)
    assert set(got.vectors) == {"clip_g"}
    with pytest.raises(Refused, match="skipped by its clip_l engine"):
        readers.forge(tmp_path / "g.safetensors", "SD3")


def test_the_flow_table_prints(tmp_path):
    text = readers.flow_table()
    assert text.count("\n") == len(LAYOUTS) + 1
    assert "| combined SD3 | all | all |" in text and "| combined Flux | all | all | all |" in text


def test_layouts_round_trip_through_safetensors(tmp_path):
    for label in LAYOUTS:
        path = write_layout(label, tmp_path)
        assert set(load_file(str(path))) == set(LAYOUTS[label][1])


# textinv's own SD3 / Flux.1 formats (textinv.formats.save): the tools that read each whole.
TEXTINV_FORMATS = {
    ("SD3", "sd3"): {"ComfyUI", "OneTrainer"},
    ("SD3", "onetrainer"): {"OneTrainer"},
    ("SD3", "comfyui"): {"ComfyUI"},
    ("Flux.1", "flux"): {"ComfyUI", "OneTrainer", "diffusers (Flux card)"},
    ("Flux.1", "onetrainer"): {"OneTrainer", "diffusers (Flux card)"},
    ("Flux.1", "comfyui"): {"ComfyUI"},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("twins", [False, True], ids=["", "with *_out"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("family, fmt", list(TEXTINV_FORMATS), ids=lambda x: x)
def test_textinv_flow_formats_load_whole_in_the_tools_they_are_for(tmp_path, family, fmt, suffix, twins, dtype):
    # OneTrainer takes the output-embedding twins where a file has them (so it loads the comfyui layout
    # too, by its t5_out), the others the input vectors; the diffusers card reads .safetensors only.
    g = torch.Generator().manual_seed(len(fmt))
    vectors = {slot: torch.randn(N, width, generator=g).to(dtype) for slot, width in WIDTHS[family].items()}
    extra = {f"{slot}_out": torch.randn(N, width, generator=g).to(dtype)
             for slot, width in WIDTHS[family].items()} if twins else {}
    path = formats.save(Embedding(BUNDLE, vectors, meta={}, extra=extra), tmp_path / f"{BUNDLE}{suffix}", fmt)
    loads = TEXTINV_FORMATS[family, fmt] - ({"diffusers (Flux card)"} if suffix == ".pt" else set())
    loads |= {"OneTrainer"} if twins else set()
    for reader, read in FLOW_READERS.items():
        if reader in loads:
            got = read(path, family)
            want = {s: extra[f"{s}_out"] if twins and reader == "OneTrainer" else v for s, v in vectors.items()}
            assert set(got.vectors) == set(want), f"{reader} reads {sorted(got.vectors)}"
            assert all(torch.equal(got.vectors[s], v.float()) for s, v in want.items()), f"{reader}: vectors differ"
        else:
            with pytest.raises(Refused):
                read(path, family)
