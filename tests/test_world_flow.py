"""mini-flow groundwork (textinv.world.flow_base): the Flux.1-shaped model of the mini world trains
with the flow-matching objective, saves as a FluxPipeline folder in T5's and CLIP's conventions, and
textinv recognises, applies embeddings to and samples from it.  (Its quality and learning figures
belong to the committed model; this only runs a few steps on a few images.)"""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import FluxPipeline

import textinv
import textinv.tokens as tk
from textinv import families, generation, models, prompts
from textinv.cli import main
from textinv.demo import DemoSettings
from textinv.errors import TextinvError
from textinv.formats import Embedding
from textinv.models import MINI_PATH
from textinv.world import flow_base


def test_a_few_steps_make_a_flux_pipeline_textinv_uses(tmp_path):
    summary = flow_base.train_flow_base(tmp_path / "mini-flow", MINI_PATH, n_images=32, steps=4, batch=4, warmup=1,
                                        threads=1)
    assert summary["steps"] == 4 and summary["final_loss"] > 0
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "mini-flow"), dtype=torch.float32)
    family = families.of_pipeline(pipe)  # shaped like Flux.1, with mini-flow's widths: the built-in model's row
    assert family.name == "the textinv mini-flow model" and family.joins == "flux" and not pipe.transformer.config.guidance_embeds
    tok = pipe.tokenizer_2
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.tokenize("a red circle") == ["▁a", "▁red", "▁circle"] and tok("a red circle")["input_ids"][-1] == 1
    assert tok.convert_ids_to_tokens(len(tok) - 1) == "<extra_id_0>"  # the sentinels at the end, as T5's
    assert pipe.text_encoder_2.get_input_embeddings().num_embeddings == len(tok) + flow_base.T5_SURPLUS_ROWS
    size = sum(f.stat().st_size for f in (tmp_path / "mini-flow").rglob("*") if f.is_file())
    assert size < 30 << 20  # the limit for the whole folder
    emb = Embedding("my-shape", {"clip_l": torch.randn(2, 64) * 0.3, "t5": torch.randn(2, 64) * 0.3})
    out = textinv.generate("a my-shape on the left", pipe=pipe, embeddings=[emb], n=1, steps=2, size="32x32")
    assert out.used == ["my-shape"] and out.images[0].size == (32, 32) and tk.state(pipe, create=False) is None


def test_train_base_flow_needs_an_output_folder():
    res = CliRunner().invoke(main, ["world", "train-base", "--arch", "flow"])
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: train-base --arch flow: give --out")


def test_a_grown_transformer_draws_what_the_trained_one_draws_and_its_new_blocks_learn():
    """--grow-single: the committed mini-flow's transformer two single blocks deeper is the same
    function (each new block passes its residual through), and a step's gradient reaches the new blocks."""
    from diffusers import FluxTransformer2DModel

    small = FluxTransformer2DModel.from_pretrained(models.MINI_FLOW_PATH / "transformer", torch_dtype=torch.float32)
    big = flow_base.grown(small, 2)
    assert big.config.num_single_layers == small.config.num_single_layers + 2
    g = torch.Generator().manual_seed(0)
    c = small.config
    x = torch.randn(2, 16, c.in_channels, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(2, 5, c.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g), timestep=torch.tensor([0.3, 0.8]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        assert torch.equal(big(x, **kw)[0], small(x, **kw)[0])
    big(x, **kw)[0].square().mean().backward()
    assert float(big.single_transformer_blocks[-1].proj_out.weight.grad.abs().sum()) > 0
    res = CliRunner().invoke(main, ["world", "train-base", "--arch", "flow", "--out", "x", "--grow-single", "2"])
    assert res.exit_code == 2 and "--grow-single: grows a trained mini-flow" in res.stderr


def test_a_model_that_asks_for_true_cfg_is_sampled_against_its_negative_prompt(tmp_path):
    """mini-flow's settings say true_cfg: its negative prompt changes the image, and the guidance
    scale does; FLUX.1-dev-like models without the setting ignore both (one warning)."""
    flow_base.train_flow_base(tmp_path / "m", MINI_PATH, n_images=16, steps=2, batch=4, warmup=1, threads=1)
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    kw = dict(pipe=pipe, n=1, steps=2, size="32x32", seed=1)
    plain = textinv.generate("a red circle", **kw).images[0].tobytes()
    assert textinv.generate("a red circle", "blue", **kw).images[0].tobytes() != plain
    assert textinv.generate("a red circle", guidance=1.5, **kw).images[0].tobytes() != plain


def test_generation_images_guides_a_true_cfg_model_too(tmp_path):
    """generation.images (the quality table's and the judge's sampler) guides mini-flow as generate does."""
    flow_base.train_flow_base(tmp_path / "m", MINI_PATH, n_images=16, steps=2, batch=4, warmup=1, threads=1)
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    a = generation.images(pipe, ["a red circle"], steps=2, guidance=4.0)[0].tobytes()
    b = generation.images(pipe, ["a red circle"], steps=2, guidance=1.5)[0].tobytes()
    assert a != b and generation.images(pipe, ["a red circle"], steps=2, guidance=4.0)[0].tobytes() == a


def test_a_model_with_its_own_image_size_is_sampled_at_it(tmp_path):
    """FluxPipeline states 1024 px (128 latent patches) for every Flux.1 model; mini-flow's settings say 32."""
    flow_base.train_flow_base(tmp_path / "m", MINI_PATH, n_images=16, steps=1, batch=4, warmup=1, threads=1)
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert generation.default_size(pipe) == (32, 32)
    assert generation.images(pipe, ["a red circle"], steps=1)[0].size == (32, 32)
    assert textinv.generate("a red circle", pipe=pipe, steps=1).images[0].size == (32, 32)


def test_the_model_is_sampled_and_trained_at_the_t5_length_it_was_trained_with(tmp_path):
    """T5's pads are encoded and attended (no mask), so mini-flow — trained on 32 T5 tokens — must
    be sampled at 32, not at FluxPipeline's 512: its settings say so, and every path reads them."""
    flow_base.train_flow_base(tmp_path / "m", MINI_PATH, n_images=16, steps=2, batch=4, warmup=1, threads=1)
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert prompts.t5_length(pipe) == flow_base.T5_LENGTH == 32
    assert prompts.encode_flow(pipe, prompts.split(pipe, "a red circle")).embeds.shape[1] == 32

    def direct(length):
        return pipe(prompt=["a red circle"], negative_prompt=[""], true_cfg_scale=4.0, num_inference_steps=2,
                    height=32, width=32, generator=[torch.Generator().manual_seed(0)],
                    max_sequence_length=length).images[0].tobytes()

    got = generation.images(pipe, ["a red circle"], steps=2, guidance=4.0)[0].tobytes()
    assert got == direct(32) != direct(512)
    settings = tmp_path / "m" / "textinv.json"
    for damaged in ("0", "true", '"32"', "100000"):  # ignored: the pipeline's own default
        settings.write_text(settings.read_text().replace('"t5_length": 32', f'"t5_length": {damaged}'))
        assert prompts.t5_length(pipe) == 512, damaged
        settings.write_text(settings.read_text().replace(f'"t5_length": {damaged}', '"t5_length": 32'))


def test_the_demo_takes_a_models_own_settings_from_its_folder(tmp_path):
    """`textinv demo --model M` trains with M's tuned settings (its textinv.json "demo"), the rest the defaults."""
    (tmp_path / "textinv.json").write_text(json.dumps({"demo": {"lr": "0.01", "lr_t5": "0.05", "steps": 60,
                                                                 "unknown": 1, "batch": [1]}}))
    s = DemoSettings.for_model(str(tmp_path))
    assert (s.lr, s.lr_t5, s.steps, s.batch) == ("0.01", "0.05", 60, DemoSettings().batch)
    assert DemoSettings.for_model(str(tmp_path / "elsewhere")) == DemoSettings()


def test_built_in_models_are_named_and_missing_ones_say_so(tmp_path, monkeypatch):
    assert models.resolve_model(None) == models.resolve_model("mini") == str(models.MINI_PATH)
    monkeypatch.setitem(models.BUILT_IN, "mini-flow", tmp_path / "absent")
    with pytest.raises(TextinvError, match=r"^the built-in mini-flow model is not installed at "):
        models.resolve_model("mini-flow")


def test_the_committed_mini_flow_is_a_plain_flux_pipeline_with_its_own_settings():
    folder = models.MINI_FLOW_PATH
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 30 << 20  # the limit
    assert all(f.stat().st_size < 8 << 20 for f in folder.rglob("*.safetensors"))  # fp16 weights
    pipe = FluxPipeline.from_pretrained(str(folder))  # diffusers alone, no dtype given: a consistent fp32 pipeline
    assert {p.dtype for p in pipe.text_encoder_2.parameters()} == {torch.float32}
    assert families.of_pipeline(pipe).name == "the textinv mini-flow model"
    own = models.defaults("mini-flow")
    assert own.true_cfg and own.t5_length == flow_base.T5_LENGTH and own.scope.image_size == 32
    assert DemoSettings.for_model("mini-flow").lr_t5 == flow_base.DEMO["lr_t5"]
    assert DemoSettings.for_model("mini-flow").bias_init == flow_base.DEMO["bias_init"] == "value"
    assert generation.default_size(pipe) == (32, 32)


def test_the_bias_demo_starts_each_token_where_the_models_demo_settings_say(tmp_path, monkeypatch):
    """mini-flow's colour tokens start from their own colour words (its textinv.json), mini's from red."""
    from textinv import bias, demo

    runs = []
    monkeypatch.setattr(bias, "run_bias", lambda run, echo=None: runs.append(run) or {})
    monkeypatch.setattr(bias, "format_table", lambda result: "")
    for model in ("mini-flow", None):
        demo.run_bias(tmp_path / str(model), model=model, echo=lambda *_: None)
    assert [r.init for r in runs] == ["value", "majority"]
    assert runs[0].extra == {"lr_t5": flow_base.DEMO["lr_t5"]}
