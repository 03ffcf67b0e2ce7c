"""The one model-loading path: folders, hub ids, files, the mini model; clear errors."""
from __future__ import annotations

import pytest
import torch

import textinv.tokens as tk
from textinv.errors import TextinvError
from textinv.models import load_pipeline, resolve_model

from conftest import make_sd


def test_loads_a_diffusers_folder_and_applies_embeddings(tmp_path):
    make_sd().save_pretrained(tmp_path / "model")
    pipe = load_pipeline(tmp_path / "model")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    from textinv.formats import Embedding

    tk.apply(pipe, Embedding("thing", {"clip": torch.ones(2, 32)}))
    assert "<|ti:thing:1|>" in tk.expand(pipe, "a thing")


@pytest.mark.parametrize(
    "target, message",
    [
        ("missing-folder/", "no such file or folder"),
        ("weights.safetensors", "no such file or folder"),
    ],
)
def test_missing_models_fail_in_one_line(tmp_path, monkeypatch, target, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TextinvError, match=message) as err:
        load_pipeline("./" + target)
    assert "\n" not in str(err.value)


def test_not_a_model_folder_or_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextinvError, match="no model_index.json"):
        load_pipeline(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TextinvError, match="not a model checkpoint"):
        load_pipeline(tmp_path / "notes.txt")


def test_unknown_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextinvError) as err:
        load_pipeline("nobody/no-such-model-xyz")
    assert "nobody/no-such-model-xyz" in str(err.value) and "\n" not in str(err.value)


def test_default_model_is_the_mini_folder(tmp_path, monkeypatch):
    import textinv.models as models

    monkeypatch.setitem(models.BUILT_IN, "mini", tmp_path / "mini")
    with pytest.raises(TextinvError, match="mini model is not installed"):
        load_pipeline()
    make_sd().save_pretrained(tmp_path / "mini")
    assert resolve_model(None) == resolve_model("mini") == str(tmp_path / "mini")
    assert type(load_pipeline()).__name__ == "StableDiffusionPipeline"


def test_single_file_checkpoint_that_cannot_load_offline_names_the_file_and_the_fix(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "model.safetensors"  # SD-1.x-looking keys, but no config can be fetched offline
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}, str(ckpt))
    with pytest.raises(TextinvError) as err:
        load_pipeline(ckpt)
    msg = str(err.value)
    assert msg.startswith(str(ckpt)) and "--config" in msg and "\n" not in msg
    with pytest.raises(TextinvError, match="cannot load this single-file checkpoint") as err:
        load_pipeline(ckpt, config=tmp_path)  # a config, but the weights are incomplete
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["inspect", "nearest", "generate", "eval", "train", "ui"])
def test_every_command_taking_model_takes_config(command):
    from click.testing import CliRunner

    from textinv.cli import main

    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0 and "--model" in res.output and "--config" in res.output


def test_config_for_a_folder_model_or_a_mismatched_checkpoint_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from textinv.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_sd().save_pretrained(tmp_path / "model")
    with pytest.raises(TextinvError, match="only for a single-file checkpoint"):
        load_pipeline(tmp_path / "model", config=tmp_path / "model")
    ckpt = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(ckpt))
    res = CliRunner().invoke(main, ["generate", "a cat", "--model", str(ckpt), "--config", str(tmp_path / "model"),
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "cannot load this single-file checkpoint" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
