"""Library commands: list, merge (average / concat), scale, nearest — and their one-line errors."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from textinv import formats
from textinv.cli import main
from textinv.formats import Embedding


@pytest.fixture
def runner():
    return CliRunner()


def put(folder, name, n=1, width=64, seed=0, suffix=".pt", meta=None):
    g = torch.Generator().manual_seed(seed)
    emb = Embedding(name, {"clip": torch.randn(n, width, generator=g)}, meta=meta or {})
    return formats.save(emb, folder / f"{name}{suffix}"), emb


def one_error_line(res, *words):
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("error:") and "Traceback" not in res.output
    for w in words:
        assert w in res.output, res.output


def test_list_shows_trigger_family_vectors_steps_size_and_hash(runner, tmp_path):
    a, _ = put(tmp_path, "my-cat", 2, 768, meta={"step": 120})
    b, _ = put(tmp_path, "style", 4, 1024, suffix=".safetensors")
    (tmp_path / "notes.txt").write_text("not an embedding")
    res = runner.invoke(main, ["list", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["trigger", "family", "vectors", "steps", "size", "hash", "file"]
    cat = next(line for line in lines if line.startswith("my-cat"))
    assert "SD 1.x" in cat and " 2 " in cat and " 120 " in cat and f"{a.stat().st_size:,}" in cat
    assert formats.short_hash(a) in cat
    style = next(line for line in lines if line.startswith("style"))
    assert "SD 2.x" in style and formats.short_hash(b) in style
    assert lines[-1] == "2 embeddings"


def test_list_bad_folder_and_broken_file(runner, tmp_path):
    one_error_line(runner.invoke(main, ["list", str(tmp_path / "nope")]), "nope", "no such file")
    put(tmp_path, "good")
    (tmp_path / "broken.pt").write_bytes(b"\x80\x02 not a pickle")
    res = runner.invoke(main, ["list", str(tmp_path)])
    assert res.exit_code == 0 and "warning: skipped" in res.output and "broken.pt" in res.output
    assert res.output.splitlines()[-1] == "1 embedding"


def test_merge_weighted_average(runner, tmp_path):
    a, ea = put(tmp_path, "a", 2, seed=1)
    b, eb = put(tmp_path, "b", 2, seed=2)
    res = runner.invoke(main, ["merge", str(a), str(b), "--weights", "0.25,0.75", "-o", str(tmp_path / "ab.safetensors")])
    assert res.exit_code == 0, res.output
    out = formats.load(tmp_path / "ab.safetensors")
    assert out.name == "ab" and formats.detect_format(tmp_path / "ab.safetensors") == "diffusers"
    torch.testing.assert_close(out.vectors["clip"], 0.25 * ea.vectors["clip"] + 0.75 * eb.vectors["clip"])
    res = runner.invoke(main, ["merge", str(a), str(b), "-o", str(tmp_path / "half.pt")])
    assert res.exit_code == 0 and formats.detect_format(tmp_path / "half.pt") == "a1111"
    torch.testing.assert_close(formats.load(tmp_path / "half.pt").vectors["clip"], (ea.vectors["clip"] + eb.vectors["clip"]) / 2)


def test_merge_concat_stacks_vectors(runner, tmp_path):
    a, ea = put(tmp_path, "a", 2, seed=1)
    b, eb = put(tmp_path, "b", 3, seed=2)
    res = runner.invoke(main, ["merge", str(a), str(b), "--concat", "-o", str(tmp_path / "ab.pt")])
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(formats.load(tmp_path / "ab.pt").vectors["clip"], torch.cat([ea.vectors["clip"], eb.vectors["clip"]]))


@pytest.mark.parametrize("case, words", [
    ("counts", ["equal vector counts", "--concat"]),
    ("family", ["SD 1.x", "cannot combine"]),
    ("weights-count", ["--weights: 3 weights for 2"]),
    ("weights-text", ["--weights: expected numbers"]),
    ("both", ["exclude each other"]),
    ("missing", ["nope.pt"]),
    ("one", ["at least two"]),
])
def test_merge_bad_inputs_exit_2_with_one_line(runner, tmp_path, case, words):
    a, _ = put(tmp_path, "a", 2, seed=1)
    b, _ = put(tmp_path, "b", 3 if case == "counts" else 2, 768 if case == "family" else 64, seed=2)
    args = {"counts": [str(a), str(b)], "family": [str(a), str(b), "--concat"],
            "weights-count": [str(a), str(b), "--weights", "1,2,3"], "weights-text": [str(a), str(b), "--weights", "x,y"],
            "both": [str(a), str(b), "--weights", "1,1", "--concat"], "missing": [str(a), str(tmp_path / "nope.pt")],
            "one": [str(a)]}[case]
    out = tmp_path / "out.pt"
    one_error_line(runner.invoke(main, ["merge", *args, "-o", str(out)]), *words)
    assert not out.exists()


def test_scale(runner, tmp_path):
    a, ea = put(tmp_path, "a", 2, meta={"step": 40})
    res = runner.invoke(main, ["scale", str(a), "0.5", "-o", str(tmp_path / "half.safetensors")])
    assert res.exit_code == 0, res.output
    out = formats.load(tmp_path / "half.safetensors")
    torch.testing.assert_close(out.vectors["clip"], ea.vectors["clip"] * 0.5)
    assert out.name == "half" and out.meta.get("step") == 40
    one_error_line(runner.invoke(main, ["scale", str(a), "abc", "-o", str(tmp_path / "x.pt")]), "FACTOR")
    one_error_line(runner.invoke(main, ["scale", str(a), "nan", "-o", str(tmp_path / "x.pt")]), "FACTOR")
    one_error_line(runner.invoke(main, ["scale", str(a), "2", "-o", str(tmp_path / "x.txt")]), "x.txt", "suffix")


def test_nearest_finds_the_word_an_embedding_was_copied_from(runner, tmp_path):
    from textinv.models import load_pipeline

    pipe = load_pipeline()
    ids = pipe.tokenizer.convert_tokens_to_ids(["star</w>", "red</w>"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach().clone()
    path = formats.save(Embedding("probe", {"clip": rows}), tmp_path / "probe.pt")
    res = runner.invoke(main, ["nearest", str(path), "--top", "3"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "probe (clip):" and lines[1].startswith("  v0: star 1.00") and lines[2].startswith("  v1: red 1.00")
    wrong, _ = put(tmp_path, "wrong", 1, 768)
    one_error_line(runner.invoke(main, ["nearest", str(wrong)]), "768-wide", "SD 1.x")
    one_error_line(runner.invoke(main, ["nearest", str(path), "--top", "0"]), "--top")
