"""Model families as data (textinv.families): the production rows recognise pipelines and vector
sets, and a family of three text encoders that exists only in this test goes through the same code
as SD and SDXL (files, applying, prompt encoding, removing, mismatch errors)."""
from __future__ import annotations

import types

import pytest
import torch

import textinv
import textinv.tokens as tk
from textinv import families, prompts
from textinv.errors import ModelMismatchError
from textinv.formats import Embedding, load, save

from conftest import make_sd, make_sdxl, text_encoder, tokenizer

# Three CLIP encoders of different widths; the third under attributes no production row uses.
TRIO = families.Family(
    "Trio (test)",
    (families.Slot("clip_l", width=32), families.Slot("clip_g", "tokenizer_2", "text_encoder_2", width=48),
     families.Slot("clip_t", "tokenizer_3", "text_encoder_3", width=40)),
    layout="Trio (test)", pooled="clip_g", hidden_layer=-2)
WIDTHS = {"clip_l": 32, "clip_g": 48, "clip_t": 40}


@pytest.fixture
def trio():
    families.register(TRIO)
    yield TRIO
    families.unregister(TRIO)
    assert TRIO not in families.FAMILIES


@pytest.fixture
def trio_pipe():
    """A tiny SDXL pipeline with a third, 40-wide text encoder beside its 32- and 48-wide ones."""
    pipe = make_sdxl()
    pipe.tokenizer_3, pipe.text_encoder_3 = tokenizer(), text_encoder(WIDTHS["clip_t"], seed=2)
    return pipe


def trio_emb(name="trio-cat", n=2, seed=0, dtypes=(torch.float32,) * 3):
    g = torch.Generator().manual_seed(seed)
    return Embedding(name, {k: torch.randn(n, w, generator=g).to(dt) for (k, w), dt in zip(WIDTHS.items(), dtypes)})


def encoded(pipe, text):
    return prompts.encode(pipe, prompts.split(pipe, text))


def test_production_rows_recognise_the_tiny_pipelines_and_the_real_widths():
    sd, sdxl = make_sd(), make_sdxl()
    assert families.of_pipeline(sd) is families.SD1 and families.of_pipeline(sdxl) is families.SDXL
    assert tk.state(sd).spec is families.SD1 and tk.state(sdxl).spec is families.SDXL
    assert tk.state(sd).family == families.UNKNOWN and tk.state(sdxl).family == "32+48-wide model"  # tiny widths
    sd2 = types.SimpleNamespace(tokenizer=tokenizer(), text_encoder=text_encoder(1024))
    assert families.of_pipeline(sd2) is families.SD2 and tk.state(sd2).family == "SD 2.x"
    assert families.model_name(families.SDXL, [768, 1280]) == "SDXL"
    for widths, family in [({"clip": 768}, families.SD1), ({"clip": 1024}, families.SD2),
                           ({"clip_l": 768, "clip_g": 1280}, families.SDXL), ({"clip_l": 32, "clip_g": 48}, families.SDXL),
                           ({"clip": 1280}, None), ({"clip": 32}, None)]:
        assert families.of_vectors(widths) is family, widths
    assert families.of_vectors({"clip": torch.zeros(2, 1024)}) is families.SD2  # tensors: their last dimension
    assert [families.name_of({"clip": w}) for w in (768, 1024, 1280, 32)] == [
        "SD 1.x", "SD 2.x", "SDXL or SD3 (clip_g)", "an unknown model family"]
    assert families.of_width(768) == "SD 1.x" and families.model_name(families.SD1, [1280]) == "SDXL or SD3 (clip_g)"
    assert families.describe({"clip_g": 1280, "clip_l": 768}) == "clip_l 768 + clip_g 1280-wide: made for SDXL"
    assert families.stored({"clip_l", "clip_g", "name"}) is families.SDXL and families.stored({"clip"}) is None
    assert families.slot_sets("listed") == ("['clip'] (SD 1.x/2.x) or ['clip_l', 'clip_g'] (SDXL) or "
        "['clip_l', 'clip_g', 't5'] (SD3) or ['clip_l', 't5'] (Flux.1)")


def test_a_registered_row_is_what_recognises_the_third_encoder(trio, trio_pipe):
    assert families.of_pipeline(trio_pipe) is trio and families.of_vectors(WIDTHS) is trio
    assert families.stored({*WIDTHS, "name"}) is trio  # the most slots a file's keys hold
    families.unregister(trio)
    assert families.of_pipeline(trio_pipe) is families.SDXL  # without its row: the SDXL it also is
    with pytest.raises(textinv.TextinvError, match=r"vector slots \['clip_g', 'clip_l', 'clip_t'\]; expected"):
        trio_emb()
    families.register(trio)
    assert trio_emb().family == "Trio (test)" and not trio_emb().is_sdxl


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_three_slot_embedding_round_trips_bit_exactly(trio, tmp_path, suffix):
    emb = trio_emb(dtypes=(torch.float16, torch.float32, torch.bfloat16))
    emb.meta["step"] = 12
    back = load(save(emb, tmp_path / f"trio{suffix}"))
    assert back.source_format == "sdxl" and back.family == "Trio (test)" and back.slots == tuple(WIDTHS)
    assert set(back.vectors) == set(WIDTHS) and back.num_vectors == 2
    for k, t in emb.vectors.items():
        assert back.vectors[k].dtype == t.dtype and torch.equal(back.vectors[k], t), k
    if suffix == ".safetensors":
        assert back.meta["step"] == 12
    back.name = emb.name  # (a file's name is its stem)
    again = save(back, tmp_path / f"again{suffix}")
    assert again.read_bytes() == (tmp_path / f"trio{suffix}").read_bytes()  # the same bytes again


def test_a_three_slot_file_with_ragged_or_swapped_encoders_is_one_line(trio, tmp_path):
    g = torch.Generator().manual_seed(0)
    ragged = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(3, 48, generator=g),
              "clip_t": torch.randn(2, 40, generator=g)}
    torch.save(ragged, tmp_path / "ragged.pt")
    with pytest.raises(textinv.EmbeddingFileError, match="Trio \\(test\\) clip_l has 2 vectors but clip_g has 3"):
        load(tmp_path / "ragged.pt")
    swapped = {"clip_l": ragged["clip_g"][:2], "clip_g": ragged["clip_l"], "clip_t": ragged["clip_t"]}
    torch.save(swapped, tmp_path / "swapped.pt")
    with pytest.raises(textinv.EmbeddingFileError, match="clip_l \\(48 wide\\) must be narrower than clip_g"):
        load(tmp_path / "swapped.pt")


def test_applied_to_three_encoders_each_takes_its_vectors_and_remove_restores(trio, trio_pipe):
    pairs = tk.encoder_pairs(trio_pipe)
    assert [te for _, te in pairs] == [trio_pipe.text_encoder, trio_pipe.text_encoder_2, trio_pipe.text_encoder_3]
    modules = [te.get_input_embeddings() for _, te in pairs]
    lengths = [len(tok) for tok, _ in pairs]
    before, dog = encoded(trio_pipe, "a photo of trio-cat"), encoded(trio_pipe, "a photo of a dog")
    assert before.embeds.shape == (1, 77, sum(WIDTHS.values())) and before.pooled.shape == (1, 48)
    emb = trio_emb()
    textinv.apply(trio_pipe, emb)
    assert tk.state(trio_pipe).spec is trio and tk.state(trio_pipe).family == "Trio (test)"
    for slot, (tok, te) in zip(WIDTHS, pairs):  # the trigger's rows in each encoder's table
        ids = tok(tk.expand(trio_pipe, "trio-cat"), add_special_tokens=False).input_ids
        assert torch.equal(te.get_input_embeddings()(torch.tensor(ids)), emb.vectors[slot]), slot
    after = encoded(trio_pipe, "a photo of trio-cat")
    start = 0
    for slot, width in WIDTHS.items():  # the prompt encodes differently in every encoder
        part = slice(start, start + width)
        assert not torch.allclose(after.embeds[..., part], before.embeds[..., part]), slot
        start += width
    assert not torch.allclose(after.pooled, before.pooled)
    assert torch.equal(encoded(trio_pipe, "a photo of a dog").embeds, dog.embeds)  # other prompts: as they were
    textinv.remove(trio_pipe)
    assert [te.get_input_embeddings() for _, te in pairs] == modules and [len(tok) for tok, _ in pairs] == lengths
    again = encoded(trio_pipe, "a photo of trio-cat")
    assert torch.equal(again.embeds, before.embeds) and torch.equal(again.pooled, before.pooled)


def test_a_mismatched_embedding_is_one_line_and_applies_nothing(trio, trio_pipe):
    xl = Embedding("xl-cat", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)})
    with pytest.raises(ModelMismatchError) as err:
        textinv.apply(trio_pipe, [trio_emb(), xl])
    msg = str(err.value)
    assert "\n" not in msg and "clip_l 32 + clip_g 48-wide: made for SDXL" in msg
    assert msg.endswith("this model's text encoders are 32+48+40-wide: Trio (test)")
    assert tk.state(trio_pipe).applied == {} and len(trio_pipe.tokenizer_3) == 49408
    with pytest.raises(ModelMismatchError, match=r"clip_l 32 \+ clip_g 48 \+ clip_t 40-wide: made for Trio \(test\)"):
        textinv.apply(make_sdxl(), trio_emb())
