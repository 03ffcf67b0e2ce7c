"""textinv generate: A1111 prompt weights and chunks, embedding libraries, samplers, PNG parameters."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import textinv
import textinv.tokens as tk
from textinv import formats, generation, pngmeta, prompts, samplers
from textinv.cli import main
from textinv.errors import TextinvError
from textinv.formats import Embedding


def emb(name, n=1, width=32, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return Embedding(name, {"clip": torch.randn(n, width, generator=g) * scale})


def library(folder, *embs):
    for i, e in enumerate(embs):
        formats.save(e, folder / f"{e.name}{'.pt' if i % 2 == 0 else '.safetensors'}")
    return folder


# ------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, expected", [
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("(b)", [("b", 1.1)]),
    ("[b]", [("b", 1 / 1.1)]),
    ("((b))", [("b", 1.1 * 1.1)]),
    ("((b):2)", [("b", 2.2)]),
    (r"\(b\) \[c\]", [("(b) [c]", 1.0)]),
    ("(b", [("b", 1.1)]),
    ("a: b", [("a: b", 1.0)]),
    ("(embedding:cat:0.5)", [("embedding:cat", 0.5)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_follows_a1111_attention_syntax(text, expected):
    got = prompts.parse(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    def rounded(ws):
        return [w if w is None else round(w, 6) for _, w in ws]

    assert rounded(got) == rounded(expected)


def test_bad_weight_is_a_one_line_error():
    with pytest.raises(TextinvError, match="prompt: bad weight"):
        prompts.parse("(cat:1.2.3)")


# ------------------------------------------------------------------ triggers in libraries
def test_library_triggers_longest_match_case_three_syntaxes_and_negative(sd_pipe, tmp_path):
    lib = library(tmp_path / "lib", emb("cat", seed=1), emb("cat-toy", 3, seed=2), emb("bad-hands", 2, seed=3))
    tk.apply(sd_pipe, [lib])
    for text in ("a CAT-TOY here", "a <cat-toy> here", "a embedding:Cat-Toy here", "a (cat-toy:1.3) here"):
        assert [a.embedding.name for a in prompts.split(sd_pipe, text).used] == ["cat-toy"], text
    assert [a.embedding.name for a in prompts.split(sd_pipe, "a cat and a cat-toy").used] == ["cat", "cat-toy"]
    assert prompts.split(sd_pipe, "concatenate").used == []  # whole words only
    tk.remove(sd_pipe)
    out = generation.generate("a <cat-toy>", "bad-hands", embeddings=[lib], pipe=sd_pipe, steps=1)
    assert out.used == ["cat-toy", "bad-hands"]
    params = pngmeta.parse_parameters(out.parameters[0])[2]
    hashes = pngmeta.parse_ti_hashes(params["TI hashes"])
    assert hashes == {"cat-toy": formats.short_hash(lib / "cat-toy.safetensors"), "bad-hands": formats.short_hash(lib / "bad-hands.pt")}
    assert tk.state(sd_pipe, create=False) is None  # applied for the call only


def test_a_bracketed_trigger_name_is_not_called_unknown(sd_pipe):
    tk.apply(sd_pipe, Embedding("<my-cat>", {"clip": torch.randn(1, 32)}))
    assert prompts.unmatched_triggers(sd_pipe, "a photo of <my-cat>, embedding:<my-cat>") == []
    assert prompts.unmatched_triggers(sd_pipe, "a <dog>") == ["<dog>"]
    tk.remove(sd_pipe)


def test_unknown_trigger_like_words_warn(sd_pipe, tmp_path):
    lib = library(tmp_path / "lib", emb("cat"))
    with pytest.warns(UserWarning) as record:
        generation.generate("a <cat> and <nope> <lora:x:0.8>", "embedding:missing", embeddings=[lib], pipe=sd_pipe, steps=1)
    text = " ".join(str(w.message) for w in record)
    assert "'<nope>' matches no loaded embedding" in text and "embedding:missing" in text
    assert "<cat>" not in text and "lora" not in text


# ----------------------------------------------------------------------------- encoding
def test_unweighted_encoding_equals_the_pipelines_own(sd_pipe, tmp_path):
    tk.apply(sd_pipe, [emb("cat-toy", 3)])
    text = "a photo of a cat-toy on a table"
    ours = prompts.encode(sd_pipe, prompts.split(sd_pipe, text)).embeds
    theirs = sd_pipe.encode_prompt(text, "cpu", 1, False)[0]
    torch.testing.assert_close(ours, theirs)


@pytest.fixture(scope="module")
def mini():
    from textinv.models import load_pipeline

    return load_pipeline()


def test_sdxl_unweighted_encoding_equals_the_pipelines_own(sdxl_pipe):
    tk.apply(sdxl_pipe, [Embedding("xl-cat", {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)})])
    text = "a photo of a xl-cat on a table"
    ours = prompts.encode(sdxl_pipe, prompts.split(sdxl_pipe, text))
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours.embeds, embeds)
    torch.testing.assert_close(ours.pooled, pooled)


def test_weight_moves_every_vector_of_a_trigger_monotonically(mini):
    tk.apply(mini, [emb("cat-toy", 3, width=64, scale=0.2)])
    base = prompts.encode(mini, prompts.split(mini, "a photo of a cat-toy")).embeds[0]
    dists = []
    for w in (1.1, 1.3, 1.6, 2.0):
        z = prompts.encode(mini, prompts.split(mini, f"a photo of a (cat-toy:{w})")).embeds[0]
        per_token = (z - base).norm(dim=-1)
        # tokens: <start> a photo of a v0 v1 v2 <end>: all three vectors moved, far more than the rest
        assert (per_token[5:8] > 5 * per_token[1:5].max()).all(), (w, per_token[:9])
        dists.append(per_token[5:8].sum().item())
        torch.testing.assert_close(z.mean(), base.mean())  # A1111: the chunk keeps its unweighted mean
    tk.remove(mini)
    assert dists == sorted(dists) and dists[0] > 0


def test_long_prompts_use_75_token_chunks_and_embeddings_never_straddle(sd_pipe):
    tk.apply(sd_pipe, [emb("cat-toy", 3)])
    parsed = prompts.split(sd_pipe, "a " * 73 + "cat-toy and more")
    chunks = prompts.chunks(parsed, sd_pipe.tokenizer)
    assert len(chunks) == 2 and all(len(ids) == 77 for ids, _ in chunks)
    trigger = sd_pipe.tokenizer.convert_tokens_to_ids(tk.state(sd_pipe).applied["cat-toy"].tokens)
    assert chunks[1][0][1:4] == trigger  # padded out of chunk 1, starts chunk 2
    assert prompts.encode(sd_pipe, parsed).embeds.shape == (1, 154, 32)
    out = generation.generate("a " * 100, "(ugly:1.2)", pipe=sd_pipe, steps=1)  # negative padded to 2 chunks
    assert len(out.images) == 1


# ----------------------------------------------------------------------- model families
def test_mismatched_family_is_skipped_with_a_warning(sd_pipe, tmp_path):
    lib = library(tmp_path / "lib", emb("cat"), emb("sd15-thing", width=768))
    with pytest.warns(UserWarning, match="skipped: embedding 'sd15-thing' is 768-wide"):
        out = generation.generate("a cat", embeddings=[lib], pipe=sd_pipe, steps=1)
    assert out.used == ["cat"]


def test_nothing_usable_is_an_error(sd_pipe, tmp_path):
    lib = library(tmp_path / "lib", emb("a", width=768), emb("b", width=1024))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TextinvError, match="none of the 2 embeddings given fits"):
            generation.generate("a", embeddings=[lib], pipe=sd_pipe, steps=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextinvError, match="no embedding files found"):
        generation.generate("a", embeddings=[tmp_path / "empty"], pipe=sd_pipe, steps=1)


def test_cli_nothing_usable_exits_2_with_one_error_line(tmp_path):
    lib = library(tmp_path / "lib", emb("a", width=768))
    res = CliRunner().invoke(main, ["generate", "a", "-e", str(lib), "--steps", "1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none of the 1 embeddings" in errors[0] and "Traceback" not in res.output


@pytest.mark.parametrize("args, words", [
    (["--size", "31x32"], "--size"), (["--sampler", "Nope"], "unknown sampler"), (["-n", "0"], "at least 1"),
])
def test_cli_bad_arguments_exit_2(tmp_path, args, words):
    res = CliRunner().invoke(main, ["generate", "a", "--steps", "1", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and words in res.output, res.output


# ----------------------------------------------------------------------------- samplers
def test_every_sampler_builds_and_names_itself(sd_pipe):
    for name in samplers.names():
        try:
            s = samplers.make(sd_pipe, name)
        except TextinvError as e:
            assert name in ("DPM++ SDE", "LMS", "LMS Karras") and "needs" in str(e) and "pip install" in str(e)
            continue
        assert samplers.name_of(s) == name
    assert samplers.name_of(samplers.make(sd_pipe, "euler A")) == "Euler a"


# ------------------------------------------------------------------------------- SDXL
def test_sdxl_plain_and_weighted_prompts(sdxl_pipe):
    xl = Embedding("xl-cat", {"clip_l": torch.randn(2, 32) * 0.3, "clip_g": torch.randn(2, 48) * 0.3})
    plain = generation.generate("a xl-cat", embeddings=[xl], pipe=sdxl_pipe, steps=1, size="16x16")
    weighted = generation.generate("a (xl-cat:1.4)", "(blurry:1.2)", embeddings=[xl], pipe=sdxl_pipe, steps=1, size="16x16")
    assert plain.used == weighted.used == ["xl-cat"]
    assert plain.images[0].size == weighted.images[0].size == (16, 16)
    assert np.asarray(plain.images[0]).tolist() != np.asarray(weighted.images[0]).tolist()


# ---------------------------------------------------------------- PNG parameters round trip
def test_parameters_layout_and_parse():
    text = pngmeta.format_parameters("a, b", "ugly", {
        "Steps": 30, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 123, "Size": "512x512", "Model hash": "1a2b3c4d5e",
        "Model": "name", "TI hashes": {"x": "0123456789ab", "y": "ba9876543210"}, "Version": "textinv 0.1.0"})
    assert text == ('a, b\nNegative prompt: ugly\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, '
                    'Model hash: 1a2b3c4d5e, Model: name, TI hashes: "x: 0123456789ab, y: ba9876543210", Version: textinv 0.1.0')
    prompt, negative, params = pngmeta.parse_parameters(text)
    assert (prompt, negative, params["Sampler"], params["Seed"]) == ("a, b", "ugly", "Euler a", "123")
    assert pngmeta.parse_ti_hashes(params["TI hashes"]) == {"x": "0123456789ab", "y": "ba9876543210"}


def test_from_png_recreates_the_same_pixels(tmp_path):
    lib = library(tmp_path / "lib", emb("cat-toy", 2, width=64, scale=0.2), emb("blur", 1, width=64, seed=5, scale=0.2))
    runner = CliRunner()
    res = runner.invoke(main, ["generate", "a (cat-toy:1.2) on the [left]", "--negative", "blur", "-e", str(lib), "-n", "2",
                               "--seed", "7", "--steps", "3", "--sampler", "Euler a", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    first, second = sorted((tmp_path / "a").glob("0*.png"))
    assert (tmp_path / "a" / "grid-00000.png").is_file() and second.name == "00001-8.png"
    params = pngmeta.read_parameters(second)
    assert params.startswith("a (cat-toy:1.2) on the [left]\nNegative prompt: blur\nSteps: 3, Sampler: Euler a, CFG scale: 4, Seed: 8, Size: 32x32, Model hash: ")
    assert f'TI hashes: "cat-toy: {formats.short_hash(lib / "cat-toy.pt")}, blur: ' in params
    res = runner.invoke(main, ["generate", "--from-png", str(second), "-e", str(lib), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    again = tmp_path / "b" / "00000-8.png"
    # Same seed, same pixels; the first was drawn in a batch of 2 and this one alone, and CPU kernels
    # round differently by batch size, so a stray pixel may differ by one level (measured: 1 of 3072).
    diff = np.abs(np.asarray(Image.open(second), dtype=int) - np.asarray(Image.open(again), dtype=int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005
    assert pngmeta.read_parameters(again) == params
    # Without the embeddings: a warning names the missing one (and the image differs).
    res = runner.invoke(main, ["generate", "--from-png", str(second), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0 and "uses embedding 'cat-toy'" in res.output


def test_from_png_without_parameters_is_an_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    res = CliRunner().invoke(main, ["generate", "--from-png", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "no A1111 'parameters' text chunk" in res.output


def test_images_keeps_its_signature_and_seeds(sd_pipe):
    a = generation.images(sd_pipe, ["a", "b"], seed=3, steps=1, batch=1)
    b = generation.generate("b", pipe=sd_pipe, seed=4, steps=1, guidance=4.0)
    assert np.abs(np.asarray(a[1], dtype=int) - np.asarray(b.images[0], dtype=int)).max() <= 1


def test_the_progress_bar_never_stands_in_for_the_callbacks_value(sd_pipe, monkeypatch):
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto.tqdm, "update", lambda self, n=1: True)  # tqdm returns True when it redraws
    out = generation.generate("a cat", pipe=sd_pipe, steps=2, n=2, progress=True)
    assert len(out.images) == 2


def test_a_finished_progress_bar_reads_total_over_total(sd_pipe, capsys):
    """Every image's every step counts: 8 images in batches of 3 at 4 steps end at 32/32 (the bar
    once counted one batch's steps and stopped at 30/240)."""
    generation.generate("a cat", pipe=sd_pipe, steps=4, n=8, batch=3, progress=True)
    last = capsys.readouterr().err.split("\r")[-1]
    assert "sampling 8 images: 100%" in last and " 32/32 " in last, last
    bar = generation.step_bar(sd_pipe, 2, 4, "judging")  # one bar over a phase of two calls
    for prompt in ("a", "b"):
        generation.images(sd_pipe, [prompt] * 2, steps=2, batch=1, bar=bar)
    assert bar.n == bar.total == 8
    bar.close()
    capsys.readouterr()
    generation.images(sd_pipe, ["a"], steps=2, progress=False)
    assert capsys.readouterr().err == ""  # no progress asked: nothing drawn


def test_the_top_level_api_round_trips_a_word(tmp_path, sd_pipe):
    """The package's own names, as the README uses them: save, load, apply, generate, remove."""
    assert set(textinv.__all__) <= set(dir(textinv)) and callable(textinv.train)
    emb = Embedding("my-cat", {"clip": torch.randn(2, 32)})
    path = textinv.save(emb, tmp_path / "my-cat.pt")
    assert torch.equal(textinv.load(path).vectors["clip"], emb.vectors["clip"])
    before = sd_pipe.text_encoder.get_input_embeddings()
    textinv.apply(sd_pipe, path)
    assert "<|ti:my-cat:1|>" in textinv.expand(sd_pipe, "a my-cat")
    out = textinv.generate("a photo of my-cat", pipe=sd_pipe, steps=2, progress=True)  # the CLI's progress bar too
    assert out.used == ["my-cat"]
    textinv.remove(sd_pipe)
    assert sd_pipe.text_encoder.get_input_embeddings() is before


# --------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_learning_embedding_pulls_generations_to_its_concept_and_pushes_away_as_negative(demo_word):
    """A trained embedding draws its concept, and as a negative embedding its concept is drawn no more
    often than with no negative at all."""
    from textinv import evaluate
    from textinv.models import load_pipeline
    from textinv.world.judge import judge

    concept, trained, INIT_WORD = demo_word.concept, demo_word.path, demo_word.init
    pipe = load_pipeline()

    def share(prompt, negative=None):
        out = generation.generate(prompt, negative, embeddings=[trained], pipe=pipe, n=32, steps=generation.DEFAULT_STEPS)
        return float(np.mean([v["shape"] == concept for v in judge(out.images)]))

    base = share(evaluate.FIDELITY_PROBE.prompt(INIT_WORD))
    pulled = share(evaluate.FIDELITY_PROBE.prompt("<t>"))
    pushed = share(evaluate.FIDELITY_PROBE.prompt(INIT_WORD), negative="<t>")
    assert pulled >= base + 0.15, (pulled, base)
    assert pushed <= base, (pushed, base)


def test_clip_skip_is_written_read_back_and_changes_the_image(tmp_path):
    runner = CliRunner()
    common = ["--seed", "3", "--steps", "3", "--sampler", "Euler a"]
    res = runner.invoke(main, ["generate", "a red ball", "--clip-skip", "2", *common, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    skipped = tmp_path / "a" / "00000-3.png"
    params = pngmeta.read_parameters(skipped)
    assert ", Clip skip: 2, " in params and params.index("Model:") < params.index("Clip skip")  # A1111's place
    res = runner.invoke(main, ["generate", "a red ball", *common, "--out", str(tmp_path / "plain")])
    plain = tmp_path / "plain" / "00000-3.png"
    assert "Clip skip" not in pngmeta.read_parameters(plain)  # A1111 writes it only when it is not 1
    assert np.abs(np.asarray(Image.open(skipped), dtype=int) - np.asarray(Image.open(plain), dtype=int)).max() > 10
    res = runner.invoke(main, ["generate", "--from-png", str(skipped), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    again = np.asarray(Image.open(tmp_path / "b" / "00000-3.png"), dtype=int)
    assert np.abs(again - np.asarray(Image.open(skipped), dtype=int)).max() <= 1
    assert pngmeta.read_parameters(tmp_path / "b" / "00000-3.png") == params
    # The mini model's text encoder has few layers: a deeper skip is one line, exit 2.
    res = runner.invoke(main, ["generate", "a red ball", "--clip-skip", "40", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--clip-skip 40: must be between 1 and" in res.output


def test_clip_skip_in_plain_batches_and_refused_for_sdxl(sd_pipe, sdxl_pipe):
    a = generation.images(sd_pipe, ["a cat", "a dog"], seed=1, steps=2, clip_skip=2)
    b = generation.images(sd_pipe, ["a dog"], seed=2, steps=2, clip_skip=2)
    # image i uses seed+i, encoded by textinv (CPU kernels may round one level differently by batch size)
    assert np.abs(np.asarray(a[1], dtype=int) - np.asarray(b[0], dtype=int)).max() <= 1
    with pytest.raises(TextinvError, match="SDXL already"):
        textinv.generate("a cat", pipe=sdxl_pipe, steps=2, clip_skip=2)


# ------------------------------------------------------------------------- {a|b} variants
def test_variants_cycle_through_every_combination_equally_often():
    text = "a {red | green} {big|small|tiny} ball, {}"
    picked = [prompts.pick_variant(text, i) for i in range(12)]
    assert picked[:3] == ["a red big ball, {}", "a green big ball, {}", "a red small ball, {}"]
    assert len(set(picked[:6])) == 6 and picked[6:] == picked[:6]  # 2·3 combinations, each once, then again
    assert prompts.pick_variant("no groups {} here", 5) == "no groups {} here"
    assert prompts.variant_groups("a {x|y} and {z|w|v}") == [["x", "y"], ["z", "w", "v"]]
    with pytest.raises(TextinvError, match="nested"):
        prompts.variant_groups("a {x|{y|z}}")


def test_generate_draws_image_i_from_its_own_variant_and_records_it(sd_pipe, tmp_path):
    tk.apply(sd_pipe, [emb("<v-a>", seed=1, scale=3.0), emb("<v-b>", n=2, seed=2, scale=3.0)])
    try:
        mixed = generation.generate("a photo of a {<v-a>|<v-b>|cat}", negative="{ugly|blurry}", pipe=sd_pipe, n=6,
                                    steps=2, batch=4, seed=10)
        for i in range(6):
            one = generation.generate(prompts.pick_variant("a photo of a {<v-a>|<v-b>|cat}", i),
                                      negative=("ugly", "blurry")[i % 2], pipe=sd_pipe, steps=2, seed=10 + i)
            assert np.abs(np.asarray(mixed.images[i], dtype=int) - np.asarray(one.images[0], dtype=int)).max() <= 1
            assert mixed.parameters[i] == one.parameters[0]  # the options drawn, as Dynamic Prompts writes them
        assert set(mixed.used) == {"<v-a>", "<v-b>"}
        # a long variant batches with a short one (padded to one length)
        long = generation.generate("{a cat|" + "a very long prompt " * 20 + "}", pipe=sd_pipe, n=2, steps=1)
        assert len(long.images) == 2
        # generation.images (previews, eval, bias) cycles the same way
        imgs = generation.images(sd_pipe, ["a photo of a {<v-a>|<v-b>|cat}"] * 2, seed=10, steps=2)
        plain = generation.generate("a photo of a {<v-a>|<v-b>|cat}", pipe=sd_pipe, n=2, steps=2, seed=10)
        assert np.abs(np.asarray(imgs[1], dtype=int) - np.asarray(plain.images[1], dtype=int)).max() <= 1
    finally:
        tk.remove(sd_pipe)


def test_sdxl_prompt_syntax_with_unit_weights_is_read_not_passed_as_text(sdxl_pipe):
    """'(cat:1.0)' weighs nothing, but the SDXL pipeline's own encoder would read the brackets and
    the number as words: textinv encodes it, as it encodes 'cat'."""
    kw = dict(pipe=sdxl_pipe, steps=1, size="16x16")
    plain = generation.generate("a photo of a cat", **kw).images[0]
    unit = generation.generate("a photo of a (cat:1.0)", **kw).images[0]
    assert np.asarray(plain).tolist() == np.asarray(unit).tolist()
