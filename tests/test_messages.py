"""What a newcomer reads when something is wrong: one line naming the thing as they typed it, the
problem, and what to pass instead (CLI options spelled as the CLI spells them); and what an
embedding card looks like when no preview is given."""
from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import readers
import textinv.models as models
from textinv import cards, formats
from textinv.cli import main
from textinv.errors import TextinvError
from textinv.formats import Embedding
from textinv.models import load_pipeline

from conftest import make_sd


def one_error_line(res) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


# ------------------------------------------------------------------------------------ --model
@pytest.mark.parametrize("command", ["generate", "inspect", "train"])
def test_unknown_model_offline_is_exactly_one_stderr_line(tmp_path, command):
    """The libraries' "Couldn't connect to the Hub" / "Will try to load from local cache" and their
    450-character hint are not shown; one line says what was tried and what to pass."""
    emb = formats.save(Embedding("probe", {"clip": torch.ones(1, 768)}), tmp_path / "probe.pt")
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(images / f"{i}.png")
    args = {"generate": ["generate", "a cat", "--out", str(tmp_path / "out")],
            "inspect": ["inspect", str(emb)],
            "train": ["train", "--images", str(images), "--token", "<t>", "--steps", "1", "--out", str(tmp_path / "run")]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub")}  # an empty cache: nothing is there
    res = subprocess.run([sys.executable, "-m", "textinv", *args[command], "--model", "nosuchmodel"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    if command == "train":  # the trainer announces its steps ("loading nosuchmodel …") before the error
        lines = [line for line in lines if not line.startswith("loading ")]
    assert len(lines) == 1 and res.stderr.endswith("\n"), res.stderr  # exactly one line
    line = lines[0]
    assert line.startswith("error: nosuchmodel: no such local folder or file, and not a model in the local "
                           "Hugging Face cache (offline); pass a diffusers folder, a single-file checkpoint"), line
    assert "--config" in line and "'mini'" in line
    for noise in ("Couldn't connect", "local cache.", "local_files_only", "stacktrace"):
        assert noise not in line


@pytest.mark.parametrize("value", ["./missing-folder/", "nosuch/dir/model.safetensors", "a/b/c", "weights.ckpt",
                                   "~/models/sd15"])
def test_a_path_that_is_not_there_says_so_and_claims_nothing_about_the_hub(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TextinvError) as err:
        load_pipeline(value)
    assert str(err.value) == f"{value}: no such file or folder"


def test_a_folder_that_is_not_a_diffusers_model_says_what_would_be(tmp_path):
    make_sd().save_pretrained(tmp_path / "sd")
    with pytest.raises(TextinvError, match=r"sd/unet: a folder, but not a diffusers model \(no model_index.json\); "
                                           r"it is the 'unet' part of a diffusers model: pass its parent folder"):
        load_pipeline(tmp_path / "sd" / "unet")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "v1-5.safetensors").write_bytes(b"x")
    with pytest.raises(TextinvError, match=r"dl: a folder, but not a diffusers model .*pass .*dl/v1-5.safetensors "
                                           r"\(with --config\)"):
        load_pipeline(tmp_path / "dl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextinvError, match=r"empty: a folder, but not a diffusers model .*; pass a diffusers folder, "
                                           r"a single-file checkpoint"):
        load_pipeline(tmp_path / "empty")


def _fake_hub_cache(root, repo_id: str, files: dict | None = None, pipeline=None):
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main -> snapshots/<sha>/."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    if pipeline is not None:
        pipeline.save_pretrained(snapshot)
    for name, text in (files or {}).items():
        (snapshot / name).write_text(text)


def test_hub_ids_offline_load_from_the_cache_or_say_what_the_cache_holds(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "tester/tiny-sd", pipeline=make_sd())
    _fake_hub_cache(tmp_path, "tester/a-clip", files={"config.json": "{}"})
    assert type(load_pipeline("tester/tiny-sd")).__name__ == "StableDiffusionPipeline"  # cached: loads offline
    with pytest.raises(TextinvError) as err:
        load_pipeline("tester/a-clip")
    assert str(err.value).startswith("tester/a-clip: in the local Hugging Face cache, but not as a diffusers model "
                                     "(no model_index.json cached; offline)")
    with pytest.raises(TextinvError) as err:
        load_pipeline("tester/not-cached")
    assert "not a model in the local Hugging Face cache (offline)" in str(err.value)


def _hub_error(cls, message):
    from huggingface_hub import errors

    http = importlib.import_module(errors.Response.__module__.split(".")[0])
    request = http.Request("GET", "https://hub.invalid/api/models/x")
    return cls(message, response=http.Response(404, request=request))


def _raising_from_pretrained(monkeypatch, error):
    """diffusers as it behaves online: logs its notice, then raises ``error`` wrapped in an OSError."""
    class FakePipeline:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            logging.getLogger("diffusers.pipelines.pipeline_utils").warning(
                "Couldn't connect to the Hub: boom.\nWill try to load from local cache.")
            try:
                raise error
            except Exception as e:
                raise OSError("Cannot load model: the model is not fully cached locally") from e

    monkeypatch.setattr(models, "_pipeline_class", lambda name="DiffusionPipeline": FakePipeline)
    monkeypatch.setattr(models, "_is_offline", lambda: False)


def test_hub_failures_online_say_only_what_the_error_says(monkeypatch, capfd):
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    cases = [
        (_hub_error(RepositoryNotFoundError, "404 Repository Not Found"),
         "owner/nothing: no such local folder or file, and the Hugging Face Hub has no model by that id that you "
         "can access (a private one needs `hf auth login` or HF_TOKEN)"),
        (_hub_error(GatedRepoError, "403 gated"), "owner/nothing: a gated model on the Hugging Face Hub"),
        (EntryNotFoundError("model_index.json"),
         "owner/nothing: on the Hugging Face Hub, but not a diffusers model (no model_index.json)"),
        (ConnectionError("Name or service not known"),
         "owner/nothing: no such local folder or file, not in the local Hugging Face cache, and the Hugging Face "
         "Hub could not be reached (Name or service not known)"),
        (ValueError("something else\nsecond line"),
         "owner/nothing: cannot load this model from the Hugging Face Hub (Cannot load model: the model is not "
         "fully cached locally)"),
    ]
    level = logging.getLogger("diffusers").level
    for error, expected in cases:
        _raising_from_pretrained(monkeypatch, error)
        with pytest.raises(TextinvError) as err:
            load_pipeline("owner/nothing")
        msg = str(err.value)
        assert msg.startswith(expected) and "\n" not in msg, msg
        assert "offline" not in msg  # it was online: nothing is claimed about offline mode
    out = capfd.readouterr()
    assert "Couldn't connect" not in out.err + out.out  # the library's own notice is silenced ...
    assert logging.getLogger("diffusers").level == level  # ... and its logger restored afterwards


# ------------------------------------------------------------------------------- formats' words
def test_convert_to_an_unknown_suffix_names_the_cli_option(tmp_path):
    src = formats.save(Embedding("x", {"clip": torch.ones(1, 768)}), tmp_path / "x.pt")
    line = one_error_line(CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "card.xyz")]))
    assert f"{tmp_path / 'card.xyz'}: cannot tell the format from the suffix .xyz; give one with --format " \
           "(diffusers, a1111, kohya, sdxl, png" in line
    assert "pass format=" not in line


def test_a_missing_file_is_named_by_the_path_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(formats.EmbeddingFileError) as err:
        formats.load("nosuch/dir/x.pt")
    assert str(err.value) == "nosuch/dir/x.pt: no such file"
    (tmp_path / "lib" / "sub").mkdir(parents=True)
    (tmp_path / "lib" / "sub" / "bad.pt").write_bytes(b"")
    with pytest.raises(formats.EmbeddingFileError) as err:
        formats.load_all("lib")  # a file found in a library folder: the folder as typed, then the rest
    assert str(err.value) == "lib/sub/bad.pt: empty file"
    for args in (["convert", "nosuch/dir/x.pt", "y.pt"], ["inspect", "nosuch/dir/x.pt"]):
        line = one_error_line(CliRunner().invoke(main, args))
        assert line.startswith("error: nosuch/dir/x.pt: no such file"), line


def test_a_bundle_and_an_sdxl_embedding_point_to_the_cli_options(tmp_path):
    t = torch.ones(1, 768)
    save_file({"bundle_emb.one.string_to_param.*": t, "bundle_emb.two.string_to_param.*": t * 2},
              str(tmp_path / "lora.safetensors"))
    line = one_error_line(CliRunner().invoke(main, ["convert", str(tmp_path / "lora.safetensors"), str(tmp_path / "o.pt")]))
    assert "is a LoRA bundle of 2 embeddings (one, two); pick one with `textinv convert --select NAME`" in line
    assert "pass select=" not in line
    assert CliRunner().invoke(main, ["convert", str(tmp_path / "lora.safetensors"), str(tmp_path / "o.pt"),
                                     "--select", "two"]).exit_code == 0
    xl = formats.save(Embedding("xl", {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}),
                      tmp_path / "xl.safetensors")
    line = one_error_line(CliRunner().invoke(main, ["convert", str(xl), str(tmp_path / "k.safetensors"),
                                                    "--format", "kohya"]))
    assert "use --format sdxl" in line
    with pytest.raises(formats.EmbeddingFileError, match="--format sdxl"):
        formats.save(formats.load(xl), tmp_path / "d.safetensors", "diffusers")


# ---------------------------------------------------------------------------------------- cards
def visible_part(path):
    """The visible image of a card: between the two black separator columns."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    black = np.flatnonzero((arr == 0).all(axis=(0, 2)))
    return arr[:, black[0] + 1:black[-1]]


def test_a_card_without_preview_is_a_square_title_card_that_round_trips(tmp_path):
    g = torch.Generator().manual_seed(3)
    emb = Embedding("cat-toy", {"clip": torch.randn(2, 768, generator=g) * 0.1},
                    meta={"step": 50, "sd_checkpoint_name": "v1-5"})
    card = formats.save(emb, tmp_path / "cat-toy.png")
    with Image.open(card) as im:
        assert im.size == (cards.CARD_SIZE, cards.CARD_SIZE)
        im.convert("RGB").save(tmp_path / "stripped.png")  # pixels only, as an upload leaves it
    for path in (card, tmp_path / "stripped.png"):
        back = formats.load(path)
        assert back.name == "cat-toy" and torch.equal(back.vectors["clip"], emb.vectors["clip"])
        theirs = readers.a1111(path, "SD 1.x")  # A1111's reading rules: text chunk, then the pixels
        assert theirs.name == "cat-toy" and torch.equal(theirs.vectors["clip"].float(), emb.vectors["clip"])
    visible = visible_part(card)
    assert visible.shape[1] > 0.6 * cards.CARD_SIZE
    # not a blank gradient: white lettering in the middle band, nothing drawn near the corners
    middle = visible[int(0.3 * visible.shape[0]):int(0.7 * visible.shape[0])]
    assert ((middle > 235).all(axis=2)).sum() > 500
    assert not (visible[:40, :40] > 235).all(axis=2).any()
    other = formats.save(Embedding("other-name", emb.vectors), tmp_path / "other.png")
    assert not np.array_equal(visible_part(other), visible)  # the name is drawn, and tints it


def test_a_large_embedding_still_gets_a_square_card(tmp_path):
    emb = Embedding("big", {"clip": torch.randn(75, 768, generator=torch.Generator().manual_seed(0)) * 0.1})
    card = formats.save(emb, tmp_path / "big.png")
    with Image.open(card) as im:
        assert im.width == im.height > cards.CARD_SIZE
    assert visible_part(card).shape[1] >= 0.6 * Image.open(card).width
    assert torch.equal(formats.load(card).vectors["clip"], emb.vectors["clip"])


def test_a_preview_fills_the_card_under_a_caption(tmp_path):
    emb = Embedding("cat-toy", {"clip": torch.ones(1, 768)}, meta={"step": 50})
    card = formats.save(emb, tmp_path / "c.png", preview=Image.new("RGB", (512, 512), (30, 160, 90)))
    visible = visible_part(card)
    assert visible.shape[:2] == (512, 512)
    assert (visible[256] == [30, 160, 90]).all()  # full-bleed: no border, no letterbox
    assert (visible[5, -5] < [30, 160, 90]).all() and (visible[-5, 5] < [30, 160, 90]).all()  # caption bands
    assert readers.a1111(card, "SD 1.x").name == "cat-toy"


@pytest.mark.parametrize("n, step, expected", [(1, 50, "1 vector · 50 steps"), (3, 0, "3 vectors"),
                                               (2, 1, "2 vectors · 1 step"), (8, 3000, "8 vectors · 3,000 steps")])
def test_card_footer_spells_vectors_and_steps(n, step, expected):
    emb = Embedding("x", {"clip": torch.ones(n, 768)}, meta={"step": step})
    assert formats._vectors_and_steps(emb) == expected  # A1111's "1v 50s" read as 50 seconds
    assert formats._card_details(emb) == ["SD 1.x", expected]


def test_a_small_models_sample_is_enlarged_crisply_for_its_card(tmp_path):
    """The mini model draws 32×32: its sample is scaled up by a whole factor, pixel for pixel."""
    sample = Image.fromarray(((np.indices((32, 32)).sum(axis=0) % 2) * 200 + 30).astype(np.uint8)).convert("RGB")
    card = formats.save(Embedding("dots", {"clip": torch.ones(1, 768)}), tmp_path / "d.png", preview=sample)
    visible = visible_part(card)
    assert visible.shape[:2] == (512, 512)
    middle = visible[128:384, 128:384, 0]  # clear of the caption bands
    assert set(np.unique(middle).tolist()) == {30, 230}  # no smoothing: only the sample's two colours
    assert formats.load(card).name == "dots"
