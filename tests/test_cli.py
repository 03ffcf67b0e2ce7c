"""The command line: inspect, convert, and one-line errors with a non-zero exit."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from textinv import formats
from textinv.cli import main
from textinv.formats import Embedding


@pytest.fixture
def runner():
    return CliRunner()


def make(tmp_path, name="my-cat", n=2, width=768, fmt="a1111", suffix=".pt"):
    g = torch.Generator().manual_seed(0)
    emb = Embedding(name, {"clip": torch.randn(n, width, generator=g)}, meta={"step": 120, "sd_checkpoint_name": "v1-5"})
    return formats.save(emb, tmp_path / f"{name}{suffix}", fmt), emb


def test_inspect_reports_format_family_vectors_and_hash(runner, tmp_path):
    path, emb = make(tmp_path)
    res = runner.invoke(main, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["format"] == "a1111" and info["trigger"] == "my-cat" and info["family"] == "SD 1.x"
    assert info["vectors"] == {"clip": [2, 768]} and info["meta"]["step"] == 120
    assert info["short_hash"] == formats.sha256_file(path)[:12]
    expected = [round(float(x), 4) for x in emb.vectors["clip"].norm(dim=-1)]
    assert info["norms"]["clip"] == expected
    human = runner.invoke(main, ["inspect", str(path)])
    assert "SD 1.x" in human.output and "2×768" in human.output and info["short_hash"] in human.output


def test_inspect_real_a1111_card(runner, real_files):
    res = runner.invoke(main, ["inspect", str(real_files / "a1111-card-rick.png"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["trigger"] == "rick" and info["vectors"] == {"clip": [8, 768]} and info["meta"]["step"] == 60


def test_convert_round_trip_through_every_format(runner, tmp_path):
    src, emb = make(tmp_path)
    chain = [("b.safetensors", "diffusers"), ("c.safetensors", "kohya"), ("d.png", "png"), ("e.pt", "a1111")]
    prev = src
    for name, fmt in chain:
        res = runner.invoke(main, ["convert", str(prev), str(tmp_path / name), "--format", fmt, "--name", "my-cat"])
        assert res.exit_code == 0, res.output
        prev = tmp_path / name
        back = formats.load(prev)
        assert torch.equal(back.vectors["clip"].float(), emb.vectors["clip"]), fmt
        assert formats.detect_format(prev) == ("png-card" if fmt == "png" else fmt)


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10, b"PK\x03\x04truncated"])
def test_bad_files_fail_in_one_line_with_nonzero_exit(runner, tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    res = runner.invoke(main, ["inspect", str(bad)])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "bad.pt" in res.output and "Traceback" not in res.output


def test_convert_bad_input_writes_nothing(runner, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"{not safetensors")
    out = tmp_path / "out.pt"
    res = runner.invoke(main, ["convert", str(bad), str(out)])
    assert res.exit_code == 2 and not out.exists()
    assert list(tmp_path.iterdir()) == [bad]  # no temp files left behind


def test_sdxl_embedding_to_png_is_refused_clearly(runner, tmp_path):
    g = torch.Generator().manual_seed(0)
    xl = Embedding("xl", {"clip_l": torch.randn(1, 768, generator=g), "clip_g": torch.randn(1, 1280, generator=g)})
    src = formats.save(xl, tmp_path / "xl.safetensors", "sdxl")
    res = runner.invoke(main, ["convert", str(src), str(tmp_path / "xl.pt"), "--format", "a1111"])
    assert res.exit_code in (0, 2)
    if res.exit_code == 0:  # A1111 .pt can hold SDXL as {clip_l, clip_g}: must read back as SDXL
        assert formats.load(tmp_path / "xl.pt").is_sdxl
    else:
        assert "SDXL" in res.output


def test_inspect_with_model_shows_nearest_words(runner, tmp_path):
    from conftest import make_sd

    pipe = make_sd()
    pipe.save_pretrained(tmp_path / "model")
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = pipe.tokenizer.convert_tokens_to_ids(["star</w>", "ring</w>"])
    emb = Embedding("shapes", {"clip": table[ids].clone()})
    path = formats.save(emb, tmp_path / "shapes.safetensors")
    res = runner.invoke(main, ["inspect", str(path), "--model", str(tmp_path / "model"), "--json", "--top", "2"])
    assert res.exit_code == 0, res.output
    nearest = json.loads(res.stdout)["nearest"]["clip"]
    assert [v[0][0] for v in nearest] == ["star", "ring"] and nearest[0][0][1] > 0.999
    res = runner.invoke(main, ["inspect", str(path), "--model", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "nope" in res.output


def test_demo_announces_every_phase_shows_its_bars_and_says_when_it_reuses_a_training(runner, tmp_path, monkeypatch):
    """The first hour: no silent phase (a line each, a bar for the sampling and the training, each
    ending at its total), and a second run in the same folder says it reused the first's training."""
    from textinv import generation

    monkeypatch.setattr(generation, "DEFAULT_STEPS", 2)  # the judge's sampling, cheap: 4 probes × 1 image × 2 steps
    args = ["demo", "--out", str(tmp_path / "d"), "--steps", "1", "-n", "1"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    phases = [line[:3] for line in first.stdout.splitlines() if line[:3] in ("1/4", "2/4", "3/4", "4/4")]
    assert phases == ["1/4", "2/4", "3/4", "4/4"] and "reusing" not in first.stdout
    bars = [part.strip() for part in first.stderr.split("\r") if "|" in part]
    for what in ("baseline 'shape'", "training <drop>", "judging <drop>"):
        last = [b for b in bars if b.startswith(what)][-1]
        total = "8/8" if what != "training <drop>" else "1/1"
        assert last.startswith(f"{what}: 100%") and f" {total} " in last, last
    second = runner.invoke(main, args)
    assert second.exit_code == 0, second.output
    run = tmp_path / "d" / "run"
    assert f"3/4 training <drop>: reusing the earlier training in {run}" in second.stdout
    assert "delete that folder or pass --out elsewhere to train afresh" in second.stdout
    assert "training 1 steps (the earlier run's, reused)" in second.stdout
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["reused_training"] is True
