"""Per-layer (P+, kohya "XTI") embeddings: the file layouts, and each cross-attention layer conditioned
with its own vectors in diffusers pipelines.

The kohya rule the XTI tests hold textinv to (read from sd-scripts, train_textual_inversion_XTI.py,
``save_weights``/``load_weights``, and gen_img_diffusers.py): a file is a flat dict of exactly 16
tensors, one ``[n, 768]`` per layer, keyed IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03 … OUT11 in that
order, in the save precision (often fp16), with no other key and no metadata.  kohya's loaders check
the 16 keys and then concatenate the values in the order the file yields them, so the order is part
of the format: a .pt keeps the dict's insertion order, a .safetensors yields its keys sorted, and
these keys sort into kohya's order.  Layer i is the i-th cross-attention transformer the UNet's
forward pass visits (down blocks 0-2 two each, the mid block, up blocks 1-3 three each).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import textinv
import textinv.tokens as tk
from textinv import formats, generation, perlayer
from textinv.cli import main
from textinv.errors import EmbeddingFileError, ModelMismatchError, TextinvError
from textinv.formats import SD_LAYERS, XTI_KEYS, Embedding

from conftest import make_sd, make_sdxl, text_encoder, tokenizer, _vae

KOHYA_ORDER = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
               "OUT08", "OUT09", "OUT10", "OUT11"]


def vectors(layers, n, width, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, n, width, generator=g).to(dtype)


def per_layer(name, layers, n=2, width=32, seed=0, dtype=torch.float32):
    return Embedding(name, {"clip": vectors(len(layers), n, width, seed, dtype)}, layers=list(layers))


def kohya_save_weights(path, n=2, width=768, dtype=torch.float16, seed=0):
    """A file as kohya's save_weights writes it: the trained rows (layer-major, n per layer) cut into 16
    [n, D] tensors, cast to the save precision, keyed in kohya's order; torch.save or save_file, no metadata."""
    rows = torch.randn(16 * n, width, generator=torch.Generator().manual_seed(seed))
    chunks = rows.reshape(16, -1, width).chunk(16)
    state = {key: chunks[i].squeeze(0).detach().clone().to("cpu").to(dtype) for i, key in enumerate(KOHYA_ORDER)}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return rows.to(dtype)


def kohya_load(path):
    """What kohya's generator does with a file: the 16 keys checked, the values concatenated in file order."""
    data = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")
    assert set(data) == set(KOHYA_ORDER), "NOT XTI"
    return torch.concat(list(data.values()))


def make_sd15_shaped(width=768):
    """A tiny pipeline with SD 1.5's UNet block layout: 16 cross-attention layers where kohya's map puts them."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=width, attention_head_dim=2, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder(width), tokenizer=tokenizer(), unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def capture(pipe):
    """Per cross-attention layer (forward order): what its key projection is given (the encoder states the
    layer attends to) and what the layer outputs, for every UNet call; returns the lists and the hook handles."""
    seen = {"states": [[] for _ in perlayer.unet_layers(pipe.unet)], "out": [[] for _ in perlayer.unet_layers(pipe.unet)]}
    handles = []
    for i, name in enumerate(perlayer.unet_layers(pipe.unet)):
        attn = pipe.unet.get_submodule(name)
        handles.append(attn.to_k.register_forward_pre_hook(lambda m, a, i=i: seen["states"][i].append(a[0].clone())))
        handles.append(attn.register_forward_hook(lambda m, a, o, i=i: seen["out"][i].append(o.clone())))
    return seen, handles


def latents(pipe, prompt, negative=None, steps=2, seed=0, **kw):
    return pipe(prompt, negative_prompt=negative, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kw).images


# ------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------

def test_layer_map_is_kohyas():
    assert list(XTI_KEYS) == KOHYA_ORDER == sorted(KOHYA_ORDER)  # sorted: what a .safetensors yields
    assert SD_LAYERS[:2] == ("down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                             "down_blocks.0.attentions.1.transformer_blocks.0.attn2")
    assert SD_LAYERS[6] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert SD_LAYERS[7] == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert SD_LAYERS[-1] == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
    # and it is the order an SD 1.5-shaped UNet's forward pass visits its cross-attention layers
    assert perlayer.unet_layers(make_sd15_shaped(width=32).unet) == list(SD_LAYERS)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_xti_round_trip_is_bit_exact_in_kohyas_key_order(tmp_path, suffix, dtype):
    emb = per_layer("xti-cat", SD_LAYERS, n=2, width=768, dtype=dtype)
    emb.meta["step"] = 300
    path = formats.save(emb, tmp_path / f"xti-cat{suffix}")  # a per-layer embedding with kohya's map: xti
    back = formats.load(path)
    assert back.source_format == "xti" and back.layers == list(SD_LAYERS) and back.name == "xti-cat"
    assert back.vectors["clip"].dtype == dtype and torch.equal(back.vectors["clip"], emb.vectors["clip"])
    assert back.num_vectors == 2 and back.family == "SD 1.x" and back.is_per_layer
    if suffix == ".pt":  # exactly kohya's 16 keys, in kohya's order, nothing else (kohya refuses other keys)
        raw = torch.load(path, map_location="cpu")
        assert list(raw) == KOHYA_ORDER and all(t.shape == (2, 768) and t.dtype == dtype for t in raw.values())
    else:
        with safe_open(str(path), "pt") as f:
            assert list(f.keys()) == KOHYA_ORDER
            assert json.loads(f.metadata()["textinv.step"]) == 300
        assert back.meta["step"] == 300
    assert torch.equal(kohya_load(path), emb.vectors["clip"].reshape(-1, 768))  # kohya's rows, layer-major


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_reads_a_file_exactly_as_kohyas_save_weights_writes_it(tmp_path, suffix):
    rows = kohya_save_weights(tmp_path / f"my-xti{suffix}", n=3)
    emb = formats.load(tmp_path / f"my-xti{suffix}")
    assert formats.detect_format(tmp_path / f"my-xti{suffix}") == "xti"
    assert emb.name == "my-xti" and emb.layers == list(SD_LAYERS) and emb.num_vectors == 3
    assert emb.vectors["clip"].dtype == torch.float16
    for i in range(16):
        assert torch.equal(emb.vectors["clip"][i], rows[3 * i : 3 * i + 3]), KOHYA_ORDER[i]


def test_own_layout_round_trips_the_mini_models_seven_layers(tmp_path):
    from textinv.models import load_pipeline

    pipe = load_pipeline(None)
    layers = perlayer.unet_layers(pipe.unet)
    assert len(layers) == 7 and layers[2] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    emb = per_layer("mini-pl", layers, n=2, width=width, dtype=torch.bfloat16)
    path = formats.save(emb, tmp_path / "mini-pl.safetensors")
    assert formats.detect_format(path) == "per-layer"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == [f"layers.{i:03d}" for i in range(7)]
    assert json.loads(meta["textinv.layers"]) == layers and json.loads(meta["textinv.family"]) == emb.family
    back = formats.load(path)
    assert back.layers == layers and back.vectors["clip"].dtype == torch.bfloat16
    assert torch.equal(back.vectors["clip"], emb.vectors["clip"])
    with pytest.raises(EmbeddingFileError, match="--format per-layer"):  # kohya's map has 16 layers
        formats.save(emb, tmp_path / "mini.pt", "xti")
    # it conditions the mini model, and comes off exactly
    before = latents(pipe, "a red mini-pl", steps=1)
    tk.apply(pipe, back)
    assert not torch.equal(latents(pipe, "a red mini-pl", steps=1), before)
    tk.remove(pipe)
    assert torch.equal(latents(pipe, "a red mini-pl", steps=1), before)


def test_plain_and_per_layer_formats_do_not_mix(tmp_path):
    emb = per_layer("pl", SD_LAYERS, width=768)
    for fmt, name in [("a1111", "x.pt"), ("diffusers", "x.safetensors"), ("kohya", "x.pt"), ("png", "x.png"),
                      (None, "x.png"), (None, "x.bin")]:
        with pytest.raises(EmbeddingFileError) as e:
            formats.save(emb, tmp_path / name, fmt)
        msg = str(e.value)
        assert "\n" not in msg and "per-layer" in msg and "--to-single" in msg and msg.startswith(str(tmp_path / name))
    plain = Embedding("plain", {"clip": torch.zeros(1, 768)})
    with pytest.raises(EmbeddingFileError, match="plain one"):
        formats.save(plain, tmp_path / "p.safetensors", "xti")
    with pytest.raises(EmbeddingFileError, match="SD 1.x/2.x only"):
        formats.save(Embedding("xl", {"clip_l": torch.zeros(16, 1, 768), "clip_g": torch.zeros(16, 1, 1280)},
                               layers=list(SD_LAYERS)), tmp_path / "xl.safetensors")


def test_to_single_averages_the_layers_and_warns():
    emb = per_layer("pl", SD_LAYERS, n=2, width=768, dtype=torch.float16)
    with pytest.warns(UserWarning, match="averaged its 16 per-layer vector sets"):
        single = formats.to_single(emb)
    assert single.layers is None and single.vectors["clip"].shape == (2, 768)
    assert torch.equal(single.vectors["clip"], emb.vectors["clip"].float().mean(dim=0))
    plain = Embedding("p", {"clip": torch.zeros(1, 8)})
    assert formats.to_single(plain) is plain


def _expect(path, *words):
    with pytest.raises(EmbeddingFileError) as info:
        formats.load(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def test_malformed_per_layer_files_are_one_line_errors(tmp_path, monkeypatch):
    def xti(name, change):
        data = {k: torch.randn(1, 768) for k in KOHYA_ORDER}
        change(data)
        save_file(data, str(tmp_path / name))
        return tmp_path / name

    _expect(xti("15.safetensors", lambda d: d.pop("OUT11")), "exactly the 16", "missing OUT11")
    _expect(xti("17.safetensors", lambda d: d.update(IN03=torch.randn(1, 768))), "17 keys", "unexpected IN03")
    _expect(xti("ragged.safetensors", lambda d: d.update(MID=torch.randn(2, 768))), "ragged", "MID is 2×768")
    _expect(xti("narrow.safetensors", lambda d: d.update(OUT05=torch.randn(1, 1024))), "ragged", "OUT05")
    _expect(xti("nan.safetensors", lambda d: d["IN07"].__setitem__((0, 3), float("nan"))), "IN07", "NaN")
    _expect(xti("int.safetensors", lambda d: d.update(IN01=torch.zeros(1, 768, dtype=torch.int32))), "IN01", "int32")
    torch.save({**{k: torch.randn(1, 768) for k in KOHYA_ORDER}, "name": "x"}, tmp_path / "named.pt")
    _expect(tmp_path / "named.pt", "unexpected name")  # kohya refuses any key beyond the 16

    good = per_layer("pl", ["a.attn2", "b.attn2", "c.attn2"], width=8)
    path = formats.save(good, tmp_path / "pl.safetensors")

    def own(name, tensors, metadata):
        save_file(tensors, str(tmp_path / name), metadata=metadata)
        return tmp_path / name

    tensors = {f"layers.{i:03d}": torch.randn(2, 8) for i in range(3)}
    _expect(own("nomap.safetensors", tensors, None), "without its layer map")
    _expect(own("fewer.safetensors", tensors, {"textinv.layers": json.dumps(["a", "b"])}), "names 2 layers", "3 tensors")
    _expect(own("bad.safetensors", tensors, {"textinv.layers": "[not json"}), "damaged layer map")
    _expect(own("dup.safetensors", tensors, {"textinv.layers": json.dumps(["a", "a", "b"])}), "named twice")
    _expect(own("odd.safetensors", tensors, {"textinv.layers": json.dumps(["a", "b", "x; rm -rf"])}), "not a module path")
    monkeypatch.setattr(formats, "MAX_FILE_BYTES", 256)  # bigger files are checkpoints: per-layer ones too
    assert path.stat().st_size > 256
    _expect(path, "not an embedding", "checkpoint")


def test_merge_and_scale_keep_the_layers():
    from textinv import library

    a, b = per_layer("a", SD_LAYERS, width=768, seed=1), per_layer("b", SD_LAYERS, width=768, seed=2)
    merged = library.merge([a, b], [0.25, 0.75])
    assert merged.layers == list(SD_LAYERS)
    assert torch.allclose(merged.vectors["clip"], 0.25 * a.vectors["clip"] + 0.75 * b.vectors["clip"])
    assert library.concat([a, b]).vectors["clip"].shape == (16, 4, 768)
    assert library.scale(a, 0.5).layers == list(SD_LAYERS)
    with pytest.raises(TextinvError, match="per-layer"):
        library.merge([a, Embedding("p", {"clip": torch.zeros(2, 768)})])


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------

def test_cli_inspect_and_convert_to_single(tmp_path):
    runner = CliRunner()
    kohya_save_weights(tmp_path / "xti-cat.safetensors", n=2)
    res = runner.invoke(main, ["inspect", str(tmp_path / "xti-cat.safetensors")])
    assert res.exit_code == 0, res.output
    assert "xti" in res.output and "16×2×768 float16 (layers × vectors × width)" in res.output
    assert "16 cross-attention layers, down_blocks.0.attentions.0" in res.output and "SD 1.x" in res.output
    info = json.loads(runner.invoke(main, ["inspect", str(tmp_path / "xti-cat.safetensors"), "--json"]).stdout)
    assert info["layers"] == list(SD_LAYERS) and info["vectors"] == {"clip": [2, 768]}
    assert len(info["layer_norms"]["clip"]) == 16 and len(info["norms"]["clip"]) == 2

    # a plain-only format without --to-single: one line saying to use it
    res = runner.invoke(main, ["convert", str(tmp_path / "xti-cat.safetensors"), str(tmp_path / "cat.pt"), "--format", "a1111"])
    assert res.exit_code == 2 and "--to-single" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(main, ["convert", str(tmp_path / "xti-cat.safetensors"), str(tmp_path / "cat.pt"), "--format", "a1111",
                               "--to-single"])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "averaged" in warned[0] and "lost" in warned[0]
    single = formats.load(tmp_path / "cat.pt")
    source = formats.load(tmp_path / "xti-cat.safetensors")
    assert single.layers is None and torch.equal(single.vectors["clip"], source.vectors["clip"].float().mean(dim=0))
    # per-layer to per-layer: kohya's .pt and back, textinv's layout
    res = runner.invoke(main, ["convert", str(tmp_path / "xti-cat.safetensors"), str(tmp_path / "xti-cat.pt")])
    assert res.exit_code == 0 and "(xti, trigger 'xti-cat', 2 vectors × 16 layers, SD 1.x)" in res.output
    res = runner.invoke(main, ["convert", str(tmp_path / "xti-cat.pt"), str(tmp_path / "own.safetensors"), "--format", "per-layer"])
    assert res.exit_code == 0 and "(per-layer," in res.output
    assert torch.equal(formats.load(tmp_path / "own.safetensors").vectors["clip"], source.vectors["clip"])
    res = runner.invoke(main, ["list", str(tmp_path)])
    assert res.exit_code == 0 and "xti-cat" in res.output


# ------------------------------------------------------------------------------------------------------
# Pipelines
# ------------------------------------------------------------------------------------------------------

def test_apply_and_remove_restore_the_pipeline_exactly():
    pipe = make_sd()
    layers = perlayer.unet_layers(pipe.unet)
    processors = dict(pipe.unet.attn_processors)
    hooks = dict(pipe.text_encoder._forward_hooks)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = pipe.encode_prompt("a photo of pl-cat", "cpu", 1, False)[0]
    before_unet = pipe.unet(x, 10, encoder_hidden_states=cond.expand(2, -1, -1)).sample
    before = latents(pipe, "a photo of pl-cat", "blurry pl-cat")

    tk.apply(pipe, [per_layer("pl-cat", layers, seed=3), Embedding("plain", {"clip": torch.randn(1, 32)})])
    wrapped = pipe.unet.attn_processors
    assert all(isinstance(wrapped[f"{n}.processor"], perlayer.LayerProcessor) for n in layers)
    assert all(wrapped[k] is p for k, p in processors.items() if k.removesuffix(".processor") not in layers)
    assert not torch.equal(latents(pipe, "a photo of pl-cat", "blurry pl-cat"), before)
    tk.remove(pipe)

    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items())  # the very same objects
    assert dict(pipe.text_encoder._forward_hooks) == hooks
    assert torch.equal(latents(pipe, "a photo of pl-cat", "blurry pl-cat"), before)
    assert torch.equal(pipe.unet(x, 10, encoder_hidden_states=cond.expand(2, -1, -1)).sample, before_unet)
    assert tk.state(pipe, create=False) is None


def test_each_layer_sees_its_own_vectors_and_only_its_own():
    pipe = make_sd()
    layers = perlayer.unet_layers(pipe.unet)
    v, w = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)), torch.randn(2, 32, generator=torch.Generator().manual_seed(6))
    k = 2  # up_blocks.1.attentions.0: the third layer the forward pass visits

    def run(embedding):
        tk.apply(pipe, embedding)
        seen, handles = capture(pipe)
        latents(pipe, "a photo of tok, at night", "tok", steps=1)  # classifier-free guidance: [negative, prompt]
        for h in handles:
            h.remove()
        tk.remove(pipe)
        return seen

    stack = v.expand(len(layers), 2, 32).clone()
    stack[k] = w
    odd = run(Embedding("tok", {"clip": stack}, layers=layers))
    plain_v = run(Embedding("tok", {"clip": v.clone()}))
    plain_w = run(Embedding("tok", {"clip": w.clone()}))
    for i in range(len(layers)):
        got = odd["states"][i][0]
        assert torch.equal(got, (plain_w if i == k else plain_v)["states"][i][0]), i
        if i != k:
            assert not torch.equal(got, plain_w["states"][i][0])
    assert not torch.equal(odd["states"][k][0], plain_v["states"][k][0])
    for i in range(k):  # layers before the odd one compute exactly what they compute with v everywhere
        assert torch.equal(odd["out"][i][0], plain_v["out"][i][0])
    assert not torch.equal(odd["out"][k][0], plain_v["out"][k][0])


def _all_equal_case():
    pipe = make_sd()
    layers = perlayer.unet_layers(pipe.unet)
    v = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    return pipe, Embedding("sameall", {"clip": v.expand(len(layers), 3, 32).clone()}, layers=layers), Embedding("sameall", {"clip": v.clone()})


def test_all_layers_equal_is_exactly_the_plain_embedding_in_the_pipelines_own_encoding():
    pipe, pl, plain = _all_equal_case()
    prompts = ["a photo of sameall", "sameall on a table, sameall again"]
    tk.apply(pipe, plain)
    ref = latents(pipe, prompts, ["blurry sameall", ""], num_images_per_prompt=2)
    tk.remove(pipe)
    tk.apply(pipe, pl)
    out = latents(pipe, prompts, ["blurry sameall", ""], num_images_per_prompt=2)
    cond = tk.state(pipe).layered
    assert cond._last is not None and cond._last[2] is not None  # the per-layer states were used, not the average
    tk.remove(pipe)
    assert torch.equal(out, ref)


def test_all_layers_equal_is_exactly_the_plain_embedding_with_weights_long_prompts_and_clip_skip(monkeypatch):
    pipe, pl, plain = _all_equal_case()
    long = "a (sameall:1.3) on a table, " + ", ".join(["red"] * 40) + ", [sameall], " + ", ".join(["blue"] * 40)
    kw = dict(negative="(sameall:0.8), blurry", pipe=pipe, n=2, steps=2, guidance=5.0, clip_skip=2)
    ref = generation.generate(long, embeddings=[plain], **kw)
    found, lookup = [], perlayer.Conditioning._lookup
    monkeypatch.setattr(perlayer.Conditioning, "_lookup", lambda self, h: found.append(lookup(self, h)) or found[-1])
    out = generation.generate(long, embeddings=[pl], **kw)
    assert found and all(x is not None for x in found)  # the layers got their own states, not the average
    assert all((a.tobytes() == b.tobytes()) for a, b in zip(ref.images, out.images))
    assert out.used == ["sameall"]


def test_weights_long_prompts_negatives_and_several_triggers_per_layer():
    """Layer i sees exactly what it sees with plain embeddings holding every per-layer trigger's layer-i vectors."""
    pipe = make_sd()
    layers = perlayer.unet_layers(pipe.unet)
    a, b = per_layer("alpha", layers, n=2, seed=11), per_layer("beta", layers, n=1, seed=12)
    plain = Embedding("gamma", {"clip": torch.randn(2, 32, generator=torch.Generator().manual_seed(13))})
    prompt = "(alpha:1.2) and beta beside gamma, " + ", ".join(["green"] * 45) + ", [beta], " + ", ".join(["grey"] * 30) + " alpha"
    negative = "(beta:0.9), blurry"

    def states_of(embeddings):
        seen, handles = capture(pipe)
        generation.generate(prompt, negative, embeddings=embeddings, pipe=pipe, n=1, steps=1, guidance=6.0)
        for h in handles:
            h.remove()
        return [s[0] for s in seen["states"]]

    got = states_of([a, b, plain])
    assert got[0].shape[1] == 3 * 77  # three chunks, the negative padded to match
    for i in range(len(layers)):
        ref = states_of([Embedding("alpha", {"clip": a.vectors["clip"][i].clone()}),
                         Embedding("beta", {"clip": b.vectors["clip"][i].clone()}), plain])
        assert torch.equal(got[i], ref[i]), layers[i]
        assert not torch.equal(got[i], got[(i + 1) % len(layers)])


def test_kohya_file_loads_and_generates_in_an_sd15_shaped_pipeline(tmp_path):
    pipe = make_sd15_shaped()
    assert perlayer.unet_layers(pipe.unet) == list(SD_LAYERS)
    kohya_save_weights(tmp_path / "kxti.safetensors", n=2, dtype=torch.float16)
    emb = formats.load(tmp_path / "kxti.safetensors")
    seen, handles = capture(pipe)
    out = textinv.generate("a photo of kxti", "blurry", embeddings=[tmp_path / "kxti.safetensors"], pipe=pipe, n=1, steps=2,
                           guidance=5.0)
    for h in handles:
        h.remove()
    assert out.images[0].size == (16, 16) and out.used == ["kxti"]
    states = [s[0][1] for s in seen["states"]]  # the prompt's row of the first step's guidance batch
    assert all(not torch.equal(states[i], states[i + 1]) for i in range(15))  # 16 layers, 16 different conditionings
    with pytest.warns(UserWarning, match="averaged"):
        emb = formats.to_single(emb)
    single = textinv.generate("a photo of kxti", "blurry", embeddings=[emb], pipe=pipe, n=1, steps=2, guidance=5.0)
    assert single.images[0].tobytes() != out.images[0].tobytes()
    assert tk.state(pipe, create=False) is None  # generate applied it for the call only


def test_model_mismatches_are_one_line_errors_or_skipped():
    pipe = make_sd()
    layers = perlayer.unet_layers(pipe.unet)
    with pytest.raises(ModelMismatchError, match=r"per-layer for a UNet with 16 cross-attention layers \(an unknown"):
        tk.apply(pipe, per_layer("x", SD_LAYERS))
    with pytest.raises(ModelMismatchError, match="its layers are named differently"):
        tk.apply(pipe, per_layer("x", [n.replace("attn2", "attn9") for n in layers]))
    with pytest.raises(ModelMismatchError, match="768-wide"):
        tk.apply(pipe, per_layer("x", layers, width=768))
    xl = make_sdxl()
    with pytest.raises(ModelMismatchError, match="SD 1.x/2.x only"):
        tk.apply(xl, per_layer("x", perlayer.unet_layers(xl.unet), width=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = tk.apply(pipe, [per_layer("x", SD_LAYERS), per_layer("fits", layers)], on_mismatch="skip")
    assert [a.embedding.name for a in applied] == ["fits"] and any("skipped" in str(w.message) for w in caught)
    tk.remove(pipe)
    with pytest.raises(TextinvError, match="no per-layer embedding"):
        perlayer.encoder_states(pipe, torch.zeros(1, 77, dtype=torch.long))


def test_trainer_api_gives_differentiable_per_layer_states():
    pipe = make_sd()
    layers = perlayer.unet_layers(pipe.unet)
    emb = per_layer("learn", layers, n=2, seed=21)
    tk.apply(pipe, emb)
    ids = pipe.tokenizer(tk.expand(pipe, "a photo of learn"), padding="max_length", max_length=77, return_tensors="pt").input_ids
    extra = pipe.text_encoder.get_input_embeddings().extra
    extra.requires_grad_(True)
    states = perlayer.encoder_states(pipe, ids)
    assert states.shape == (len(layers), 1, 77, 32)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = perlayer.unet_forward(pipe, x, 500, states).sample
    out.square().mean().backward()
    rows = perlayer.rows(pipe, "learn")
    assert rows.shape == (len(layers), 2)
    assert torch.equal(extra.detach()[rows], emb.vectors["clip"])
    for i in range(len(layers)):  # every layer's vectors get their own gradient
        assert extra.grad[rows[i]].abs().sum() > 0
    extra.requires_grad_(False)
    # the same states reach the layers when the pipeline encodes the prompt itself
    with torch.no_grad():
        cond = pipe.encode_prompt("a photo of learn", "cpu", 1, False)[0]
        via_pipeline = pipe.unet(x, 500, encoder_hidden_states=cond).sample
        forced = perlayer.unet_forward(pipe, x, 500, states.detach()).sample
    assert torch.allclose(via_pipeline, forced, atol=1e-5)
    tk.remove(pipe)
