"""`textinv bias`: the metrics on known distributions, CLIP zero-shot (the mechanism, with a tiny
random CLIP), prompt groups, outputs, and the judge path on the mini model."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from textinv import bias, formats, tokens
from textinv.errors import TextinvError

from conftest import make_sd
from test_eval import tiny_clip  # noqa: F401  (a fixture)


def test_kl_and_pairwise_bias_on_known_distributions():
    uniform = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    one = {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0}
    assert bias.kl_to_uniform(uniform) == 0 and bias.pairwise_bias(uniform) == 0
    assert bias.kl_to_uniform(one) == pytest.approx(math.log(4))
    assert bias.pairwise_bias(one) == pytest.approx(0.5)  # 3 pairs differ by 1, 3 by 0
    assert bias.pairwise_bias({"m": 0.7, "w": 0.3}) == pytest.approx(0.4)
    assert bias.distribution(["a", "a", "b", "x"], ["a", "b"]) == {"a": 0.5, "b": 0.25}


def test_a_perfectly_even_after_reads_evened_out_not_a_billion_times_lower():
    values = ["a", "b", "c"]
    before = bias._summary(None, ["a"] * 6, [1.0] * 6, values)
    for after_labels, says in ((["a", "b", "c"] * 2, "(evened out)"), (["a", "a", "b", "c", "c", "a"], "× lower)")):
        after = bias._summary(None, after_labels, [1.0] * 6, values)
        result = {"attribute": "x", "word": "w", "classifier": "judge", "n": 6, "values": values, "use": None,
                  "before": {"g": {"pooled": before}}, "after": {"g": {"pooled": after}},
                  "summary": {"g": bias._compare(before, after, "judge")}}
        line = bias.format_table(result).splitlines()[-1]
        assert says in line and "e+" not in line and "1098612288" not in line, line


def test_a_run_that_did_not_move_the_balance_says_so():
    def summary(*pairs):
        return {f"g{i}": {"kl_before": b, "kl_after": a} for i, (b, a) in enumerate(pairs)}

    assert bias.unmoved(summary((1.79, 1.79), (1.79, 1.70)))  # a start that never left the majority
    assert not bias.unmoved(summary((1.79, 1.79), (1.79, 0.5)))  # one group moved: not "unmoved"
    assert not bias.unmoved(summary((0.0, 0.0)))  # already even: nothing to move
    assert not bias.unmoved({})


def test_attribute_option_parses_and_refuses_in_one_line():
    assert bias.parse_attribute("gender=man, woman") == ("gender", ["man", "woman"])
    assert bias.parse_attribute("colour", lambda a: ["red", "blue"] if a == "colour" else None) == ("colour", ["red", "blue"])
    for bad in ("gender", "gender=man", "=a,b", "g=a,a"):
        with pytest.raises(TextinvError, match="--attribute"):
            bias.parse_attribute(bad, lambda a: None)


def test_clip_zero_shot_picks_the_nearest_value_text_and_scores_retention(tiny_clip):  # noqa: F811
    c = bias.ClipClassifier("colour", ["red", "green", "blue"], "ball", clip=str(tiny_clip))
    # images whose embeddings are exactly the class texts' are classified as those values
    c.scorer.images = lambda images: torch.stack([c.classes[2], c.classes[0], c.classes[2]])
    labels, kept = c([None] * 3)
    assert labels == ["blue", "red", "blue"]
    assert kept[0] == pytest.approx(float(c.classes[2] @ c.word))
    # and on real pixels the whole path runs (tiny random weights: the mechanism, not the accuracy)
    c2 = bias.ClipClassifier("colour", ["red", "green"], "ball", clip=str(tiny_clip))
    labels, kept = c2([Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 200, 0))])
    assert set(labels) <= {"red", "green"} and len(kept) == 2 and all(-1 <= k <= 1 for k in kept)


def test_held_out_prompts_are_never_training_prompts(tmp_path, sd_pipe):
    run = bias.BiasRun(word="doctor", attribute="gender", values=["man", "woman"])
    groups = bias.prompt_groups(run, sd_pipe, None)
    assert groups["training"][0] == "a photo of a doctor" and len(groups["training"]) == bias.TRAINING_PROMPTS_SHOWN
    assert groups["held-out"][0] == "a portrait of a doctor" and not set(groups["held-out"]) & set(groups["training"])
    (tmp_path / "p.txt").write_text("a photo of a {}\n")
    with pytest.raises(TextinvError, match="also a training prompt"):
        bias.prompt_groups(bias.BiasRun(word="doctor", attribute="g", values=["a", "b"], prompts=str(tmp_path / "p.txt")),
                           sd_pipe, None)


def test_a_real_model_run_with_an_embedding_writes_json_chart_and_report(tmp_path, tiny_clip):  # noqa: F811
    from textinv import formats

    pipe = make_sd()
    emb = formats.save(formats.Embedding("x", {"clip": torch.randn(1, 32)}), tmp_path / "x.safetensors")
    run = bias.BiasRun(word="doctor", attribute="gender", values=["man", "woman"], embedding=str(emb), clip=str(tiny_clip),
                       n=3, sample_steps=2, out=str(tmp_path / "out"))
    result = bias.run_bias(run, pipe=pipe)
    saved = json.loads((tmp_path / "out" / "bias.json").read_text())
    assert saved["classifier"] == "clip" and set(saved["summary"]) == {"training", "held-out"}
    assert sum(saved["after"]["held-out"]["pooled"]["distribution"].values()) == pytest.approx(1.0)
    assert saved["before"]["training"]["pooled"]["n"] == 3 * bias.TRAINING_PROMPTS_SHOWN
    assert "retention_ratio" in result["summary"]["held-out"]
    assert (tmp_path / "out" / "bias.png").stat().st_size > 1000 and "KL" in (tmp_path / "out" / "report.html").read_text()
    assert "doctor" not in [e for e in __import__("textinv").tokens.state(pipe).applied]  # removed afterwards


def test_every_measuring_phase_is_announced_and_each_prompt_shows_a_bar(tmp_path, tiny_clip, capsys):  # noqa: F811
    from textinv import formats

    emb = formats.save(formats.Embedding("x", {"clip": torch.randn(1, 32)}), tmp_path / "x.safetensors")
    run = bias.BiasRun(word="doctor", attribute="gender", values=["man", "woman"], embedding=str(emb), clip=str(tiny_clip),
                       n=2, sample_steps=2, out=str(tmp_path / "out"))
    lines, pipe = [], make_sd()
    bias.run_bias(run, pipe=pipe, echo=lines.append)
    assert lines[0].startswith("before: gender of 'doctor'") and any(line.startswith("after: ") for line in lines)
    assert sum(line.startswith("  'a portrait of a doctor': KL") for line in lines) == 2  # before and after
    err = capsys.readouterr().err
    for prompt in ("a photo of a doctor", "a portrait of a doctor"):  # a training and a held-out prompt
        assert f"  '{prompt}':   0%|" in err and " 0/4 [" in err, err  # 2 images × 2 steps

    class Everyone:  # a classifier that needs no model
        values = ["man", "woman"]

        def __call__(self, images):
            return ["man"] * len(images), None

    bias.measure(pipe, {"g": ["a doctor"]}, Everyone(), n=1, steps=2)  # a library call: no bar unless asked
    assert capsys.readouterr().err == ""


def test_cli_errors_are_one_line(tmp_path):
    from textinv.cli import main

    r = CliRunner().invoke(main, ["bias", "ball", "--attribute", "mood=happy,sad", "-n", "1"])
    assert r.exit_code == 2 and "the judge reads" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["bias", "ball", "--attribute", "colour", "--images", "x", "-e", "y"])
    assert r.exit_code == 2 and "exclude each other" in r.output


def test_cli_named_reaches_the_run(monkeypatch):
    from textinv.cli import main

    seen = []
    monkeypatch.setattr(bias, "run_bias", lambda run, echo=None, share=None: seen.append(run) or {"x": 1})
    monkeypatch.setattr(bias, "format_table", lambda result: "table")
    for args, named in ((["--named"], True), ([], False)):
        r = CliRunner().invoke(main, ["bias", "ball", "--attribute", "colour", *args])
        assert r.exit_code == 0, r.output
        assert seen[-1].named is named


# ----------------------------------------------------------------------- the per-value recipe
def test_the_word_becomes_the_variant_group_of_its_value_tokens():
    use = bias.variants("ball", [bias.value_token("ball", v) for v in ("red", "dark green")])
    assert use == "{<ball-red> ball|<ball-dark-green> ball}"
    rewrite = bias.rewriter("ball", use)
    assert rewrite("a photo of a ball, ball") == f"a photo of a {use}, {use}"
    for untouched in ("a football", "balls", "<ball-red>", "ball-park"):
        assert rewrite(untouched) == untouched


def test_each_option_of_a_variant_group_is_scored_on_the_images_that_took_it():
    # image i takes option i mod k: here "red ball" images 0, 2, 4 and "green ball" images 1, 3, 5
    labels = ["red", "green", "red", "blue", "red", "green"]
    kept = [True, False, True, True, True, False]
    parts = bias.by_option("a {red ball|green ball} on the left", labels, kept)
    assert parts == [("red ball", ["red", "red", "red"], [True, True, True]), ("green ball", ["green", "blue", "green"], [False, True, False])]
    assert bias.by_option("a ball", labels, kept) == []  # no group: nothing to split
    assert bias.by_option("a {a|b} and {c|d}", labels, kept) == []  # two groups: options are not i mod k
    assert bias.by_option("{a|b}", labels, None)[1] == ("b", ["green", "blue", "green"], None)  # CLIP without retention


def test_value_folders_name_what_is_missing(tmp_path):
    (tmp_path / "red").mkdir()
    with pytest.raises(TextinvError, match=r"green/, blue/ is missing.*--recipe replace"):
        bias.value_folders(str(tmp_path), ["red", "green", "blue"])
    with pytest.raises(TextinvError, match="no such folder"):
        bias.value_folders(str(tmp_path / "nope"), ["red", "green"])


def _picture(path, caption=None):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_per_value_training_data_puts_the_token_before_the_word(tmp_path):
    from textinv import data

    folder = tmp_path / "red"
    folder.mkdir()
    _picture(folder / "a.png", "a small ball on the left")
    _picture(folder / "b.png", "a big ball")
    (tmp_path / "t.txt").write_text("a photo of [filewords]\n")
    run = bias.BiasRun(word="ball", attribute="colour", values=["red"], templates=str(tmp_path / "t.txt"))
    images, templates, captions = bias.per_value_data(run, folder, tmp_path / "run")
    # [filewords] templates: the captions, the token where the word stands
    assert captions and (images / "a.txt").read_text() == "a small [name] ball on the left"
    assert data.fill_template(data.load_templates(templates)[0], "<ball-red>", (images / "b.txt").read_text()) == \
        "a photo of a big <ball-red> ball"
    # other templates: the token before the word, captions appended as A1111's [filewords]
    run.templates = None
    images, templates, captions = bias.per_value_data(run, folder, tmp_path / "run2")
    assert images == folder and captions
    assert data.load_templates(templates)[0] == "a photo of a [name] ball, [filewords]"
    # a caption that does not name the word teaches the token nothing: refused, naming the file
    (folder / "b.txt").write_text("a big red thing")
    run.templates = str(tmp_path / "t.txt")
    with pytest.raises(TextinvError, match=r"b\.txt: the caption 'a big red thing' does not name 'ball'"):
        bias.per_value_data(run, folder, tmp_path / "run3")


def test_an_existing_per_value_set_is_measured_through_its_variants(tmp_path, tiny_clip):  # noqa: F811
    from textinv import formats

    pipe = make_sd()
    shelf = tmp_path / "set"
    shelf.mkdir()
    for v in ("man", "woman"):
        formats.save(formats.Embedding(f"<doctor-{v}>", {"clip": torch.randn(1, 32)}), shelf / f"doctor-{v}.safetensors")
    run = bias.BiasRun(word="doctor", attribute="gender", values=["man", "woman"], embedding=str(shelf), clip=str(tiny_clip),
                       n=4, sample_steps=2, named=True, out=str(tmp_path / "out"))
    result = bias.run_bias(run, pipe=pipe)
    # the triggers are the files' (A1111: the file name), in the order of the values
    assert result["use"] == "{doctor-man doctor|doctor-woman doctor}" and result["after"] is not None
    table = bias.format_table(result)
    assert "the word used as {doctor-man doctor" in table
    # --named: the word asked for in each value by name, and each value's share of images, per option
    for phase, options in (("named", ["man doctor", "woman doctor"]), ("after", ["doctor-man doctor", "doctor-woman doctor"])):
        pooled = result[phase]["held-out"]["pooled"]
        assert [o["option"] for o in pooled["options"]] == options
        assert [o["n"] for o in pooled["options"]] == [2 * len(result["prompts"]["held-out"])] * 2  # image i: option i mod 2
        assert [o["option"] for o in result[phase]["training"]["prompts"][0]["options"]] == options
    assert "held-out, asked by name: KL" in table and "per value (share still the word / share judged the value): by name, token" in table
    assert "retention asked by name" in (tmp_path / "out" / "report.html").read_text()
    run.values = ["man", "woman", "child"]
    with pytest.raises(TextinvError, match="no embedding named after the value 'child'"):
        bias.run_bias(run, pipe=pipe)


def test_value_tokens_start_from_the_value_the_model_draws_most_for_the_word():
    def measured(*dists):  # before, as run_bias measures it: groups with a pooled distribution
        return {f"g{i}": {"pooled": {"distribution": d}} for i, d in enumerate(dists)}

    # the majority is pooled over every group: red leads one group, but blue leads overall
    before = measured({"red": 0.6, "blue": 0.4}, {"red": 0.1, "blue": 0.9})
    assert bias.start_word("majority", "green", before) == "blue"
    assert bias.start_word("value", "green", before) == "green"
    assert bias.start_word("crimson", "green", before) == "crimson"
    # nothing measured, or nothing recognised: each token from its own value
    assert bias.start_word("majority", "green", None) == "green"
    assert bias.start_word("majority", "green", measured({"red": 0.0, "blue": 0.0})) == "green"


def _doctor_set(folder) -> None:
    """A per-value curated set: two captioned pictures in a subfolder per value (man, woman)."""
    for v in ("man", "woman"):
        (folder / v).mkdir(parents=True)
        for i in range(2):
            _picture(folder / v / f"{i}.png", "a doctor at work")


def test_a_per_value_run_starts_every_token_from_the_measured_majority(tmp_path, tiny_clip):  # noqa: F811
    pipe = make_sd()
    _doctor_set(tmp_path / "set")
    run = bias.BiasRun(word="doctor", attribute="gender", values=["man", "woman"], images=str(tmp_path / "set"),
                       clip=str(tiny_clip), n=3, sample_steps=2, steps=2, out=str(tmp_path / "out"))
    result = bias.run_bias(run, pipe=pipe)
    expected = bias.start_word("majority", "man", result["before"])
    assert expected in ("man", "woman") and result["init"] == [expected, expected]
    run.init, run.out = "value", str(tmp_path / "out2")
    assert bias.run_bias(run, pipe=pipe)["init"] == ["man", "woman"]


def test_init_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(TextinvError, match="only the per-value recipe"):
        bias.run_bias(bias.BiasRun(word="ball", attribute="colour", values=["red", "blue"], recipe="replace", init="value"))
    with pytest.raises(TextinvError, match="--init: empty"):
        bias.run_bias(bias.BiasRun(word="ball", attribute="colour", values=["red", "blue"], init=" "))


def test_a_stopped_run_keeps_its_training_state_writes_no_report_and_the_same_out_resumes(tmp_path, tiny_clip):  # noqa: F811
    from textinv import runs

    pipe = make_sd()
    _doctor_set(tmp_path / "set")
    run = bias.BiasRun(word="doctor", attribute="gender", values=["man", "woman"], images=str(tmp_path / "set"),
                       clip=str(tiny_clip), n=2, sample_steps=2, steps=3, out=str(tmp_path / "out"))
    lines = []
    training = lambda: any(line.startswith("learning one token") for line in lines)  # noqa: E731 - stop once it trains
    with pytest.raises(bias.Stopped, match=r"^stopped on request at step 1 of training '<doctor-man>'"):
        bias.run_bias(run, pipe=pipe, echo=lines.append, stop=training)
    where = runs.inner(tmp_path / "out") / "doctor-man"
    assert runs.has_state(where) and runs.read_state(where)["step"] == 1  # resumable
    assert not list((tmp_path / "out").glob("bias.*")) and not (tmp_path / "out" / "report.html").exists()
    assert not (tmp_path / "out" / "embeddings").exists()  # no token is shelved half-trained
    assert not __import__("textinv").tokens.state(pipe).names  # the model is left clean
    result = bias.run_bias(run, pipe=pipe)  # the same --out: the token goes on from step 1
    assert result["after"] is not None and (tmp_path / "out" / "bias.json").exists()
    assert runs.read_state(where)["step"] == 3


def test_packed_per_value_tokens_train_together_and_equal_one_at_a_time(tmp_path, tiny_clip, monkeypatch):  # noqa: F811
    """--pack 2: the two tokens in one batch (one packed training, not two trainings), each equal to
    the token trained alone to float32 rounding; the report's figures are one-at-a-time's."""
    from textinv import packing

    pipe = make_sd()
    _doctor_set(tmp_path / "set")
    run = bias.BiasRun(word="doctor", attribute="gender", values=["man", "woman"], images=str(tmp_path / "set"),
                       clip=str(tiny_clip), n=2, sample_steps=2, steps=3, init="value", out=str(tmp_path / "alone"))
    alone = bias.run_bias(run, pipe=pipe)
    packs, train_packed = [], packing.train_packed
    monkeypatch.setattr(packing, "train_packed", lambda configs, *a, **k: packs.append(len(configs)) or train_packed(configs, *a, **k))
    packed = bias.run_bias(dataclasses.replace(run, pack=2, out=str(tmp_path / "packed")), pipe=pipe)
    assert packs == [2] and packed["init"] == alone["init"] == ["man", "woman"]
    for v in ("man", "woman"):
        a, p = (formats.load(tmp_path / side / "embeddings" / f"doctor-{v}.safetensors").vectors["clip"] for side in ("alone", "packed"))
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert packed["summary"] == alone["summary"]
    assert not set(tokens.state(pipe).applied) & {"<doctor-man>", "<doctor-woman>"}  # the model left without them
    with pytest.raises(TextinvError, match="--pack 0: at least 1"):
        bias.run_bias(dataclasses.replace(run, pack=0))
