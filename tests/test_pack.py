"""textinv train-many --pack: several concepts in one batch.  A packed concept's vectors get gradient
from its own rows only, and it ends where it ends trained alone with the same per-concept batch, to
float32 rounding (measured: at most ~1e-6 of the vectors' largest entry after 6 to 40 steps on the
mini model; asserted: 1e-5); a pack of one is training alone, bit for bit; an interrupted or killed
packed run goes on from each concept's last save and trains no step twice."""
from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from textinv import formats, interrupts, many, packing, runs, training
from textinv.cli import main
from textinv.settings import TrainConfig

from conftest import make_sdxl, red_blocks
from test_many import QUICK, concepts, killed_after, summary_rows, train_many_process, write_csv
from tiny_flow import tiny_flux_pipeline

CPU = torch.device("cpu")
QUICK_PIPE = dict({k: v for k, v in QUICK.items() if k != "model"}, steps=3, progress=False)  # a pipeline given


def assert_same_to_rounding(packed: dict, alone: dict, what: str) -> None:
    """Every encoder's vectors within 1e-5 of the largest entry (float32 rounding of a larger batch)."""
    assert packed.keys() == alone.keys()
    for slot, want in alone.items():
        torch.testing.assert_close(packed[slot], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=f"{what} {slot}")


def vectors(out: Path) -> dict:
    return formats.load(runs.final(out)).vectors


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in runs.log_records(out)]


@pytest.mark.filterwarnings("ignore:--images")  # the wide red blocks are not mini-world pictures
def test_packed_concepts_end_where_they_end_trained_alone(tmp_path):
    """Three concepts in one pack, of batch 1, 2 and 3, one of them resumed from step 2 (they pack at
    different step numbers), one of another picture size (its rows take a denoiser call of their own)."""
    rows = concepts(tmp_path, ("drop", "arrow"))
    rows.append({"token": "<wide>", "images": str(red_blocks(tmp_path / "images" / "wide", size=(24, 40)))})
    batches = [1, 2, 3]
    settings = dict(QUICK, steps=5, progress=False)
    alone_cfg = lambda k, **kw: TrainConfig(**rows[k], **dict(settings, batch=batches[k], **kw))  # noqa: E731
    training.train(alone_cfg(1, steps=2, out=str(tmp_path / "many" / "arrow")))
    manifest = write_csv(tmp_path / "m.csv", [row | {"batch": b} for row, b in zip(rows, batches)])
    summary = many.train_many(manifest, settings, tmp_path / "many", pack=3)
    assert [o.note for o in summary.outcomes] == ["trained", "resumed from step 2", "trained"]
    for k, row in enumerate(rows):
        name = row["token"].strip("<>")
        alone = training.train(alone_cfg(k, out=str(tmp_path / "alone" / name)))
        assert_same_to_rounding(vectors(tmp_path / "many" / name), alone.embedding.vectors, name)
        assert losses(tmp_path / "many" / name) == pytest.approx(losses(alone.out), rel=1e-4), name
        assert sorted(p.name for p in (tmp_path / "many" / name).iterdir()) == sorted(p.name for p in alone.out.iterdir())
    assert [r["step"] for r in runs.log_records(tmp_path / "many" / "arrow")] == [1, 2, 3, 4, 5]


def test_a_concept_alone_in_its_pack_trains_bit_for_bit_as_alone_and_one_token_waits_for_its_namesake(tmp_path):
    """Two rows of one token (other folders) cannot be applied at once: the second waits, so each
    trains alone in the pack, and both give textinv train's file byte for byte."""
    rows = concepts(tmp_path, ("drop",))
    rows = [rows[0] | {"out": str(tmp_path / "one")}, rows[0] | {"out": str(tmp_path / "two")}]
    summary = many.train_many(write_csv(tmp_path / "m.csv", rows), QUICK, tmp_path, pack=2)
    assert [o.note for o in summary.outcomes] == ["trained", "trained"]
    alone = training.train(TrainConfig(**rows[0] | {"out": str(tmp_path / "alone")}, **QUICK, progress=False))
    for out in ("one", "two"):
        assert runs.final(tmp_path / out).read_bytes() == alone.embedding_path.read_bytes(), out
        assert runs.read_state(tmp_path / out)["step"] == 6


def _beside(tmp_path: Path, pipe, names=("a", "b"), **settings) -> list[training.TrainingRun]:
    """Runs set up beside each other on ``pipe``, as a pack holds them."""
    made = []
    for k, n in enumerate(names):
        cfg = TrainConfig(images=str(red_blocks(tmp_path / n, n=2 + k)), token=f"<{n}>", out=str(tmp_path / "out" / n),
                          **dict(QUICK_PIPE, seed=k, **settings))
        made.append(training.TrainingRun(cfg, pipe, training.Alone(CPU), beside=True))
    for run in made:  # as packing._resync leaves them
        run.batches.prompts.tokenize()
        for p in run.word.params:
            p.requires_grad_(True)
    return made


@pytest.mark.parametrize("make", [make_sdxl, tiny_flux_pipeline], ids=["sdxl", "flux"])
def test_a_concepts_vectors_get_gradient_from_its_own_rows_only(tmp_path, make):
    """Even where another concept's prompts name this one's trigger: each reads its prompts as if its
    word were the only one applied (as it would alone), so ``<a>`` in b's prompts is plain text."""
    (tmp_path / "t.txt").write_text("a photo of [name] next to <a>\n")
    a, b = _beside(tmp_path, make(), resolution=32, init="red block", templates=str(tmp_path / "t.txt"))
    draws = [(r.batches, r.batches.draw(0, 0)) for r in (a, b)]
    loss_a, loss_b = training.packed_losses(draws)
    loss_b.backward()
    assert all(p.grad is None or not p.grad.any() for p in a.word.params)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in b.word.params)
    alone_a, alone_b = a.batches.loss(0, 0), b.batches.loss(0, 0)  # each run's batch through its own calls
    torch.testing.assert_close(loss_a, alone_a, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_b, alone_b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("make", [make_sdxl, tiny_flux_pipeline], ids=["sdxl", "flux"])
def test_packed_sdxl_and_flux_concepts_end_where_they_end_alone(tmp_path, make):
    settings = dict(QUICK_PIPE, resolution=32, init="red block")
    cfgs = [TrainConfig(images=str(red_blocks(tmp_path / n, n=2 + k)), token=f"<{n}>", out=str(tmp_path / "packed" / n),
                        **dict(settings, batch=1 + k)) for k, n in enumerate(("a", "b"))]
    results = packing.train_packed(cfgs, make(), 2, CPU)
    for cfg, res in zip(cfgs, results):
        assert isinstance(res, training.TrainResult), res
        alone = training.train(cfg, pipe=make(), out=str(tmp_path / "alone" / cfg.token.strip("<>")))
        assert_same_to_rounding(res.embedding.vectors, alone.embedding.vectors, cfg.token)


def test_ctrl_c_in_a_packed_run_saves_every_concepts_last_step_and_the_rerun_finishes_each(tmp_path, monkeypatch):
    rows = concepts(tmp_path, ("drop", "arrow", "tee"))
    manifest = write_csv(tmp_path / "m.csv", rows)
    real, calls = training.packed_gradients, []

    def interrupted(packed):
        calls.append(len(packed))
        if len(calls) == 4:  # in step 4's gradients: drop and arrow have done 3 steps
            raise interrupts.Interrupted(signal.SIGINT)
        return real(packed)

    monkeypatch.setattr(training, "packed_gradients", interrupted)
    with pytest.raises(interrupts.Interrupted) as e:
        many.train_many(manifest, QUICK, tmp_path / "run", pack=2)
    assert str(e.value) == ("row 1 (<drop>): interrupted at step 3 of 6: saved; row 2 (<arrow>): interrupted at step 3 "
                            "of 6: saved; the same textinv train-many goes on from there")
    assert [runs.read_state(tmp_path / "run" / n)["step"] for n in ("drop", "arrow")] == [3, 3]
    assert not (tmp_path / "run" / "tee").exists()  # it had not joined
    monkeypatch.setattr(training, "packed_gradients", real)
    again = many.train_many(manifest, QUICK, tmp_path / "run", pack=2)
    assert [o.note for o in again.outcomes] == ["resumed from step 3", "resumed from step 3", "trained"]
    ref = many.train_many(manifest, QUICK, tmp_path / "ref", pack=2)
    for n in ("drop", "arrow", "tee"):
        assert [r["step"] for r in runs.log_records(tmp_path / "run" / n)] == list(range(1, 7)), n
        assert_same_to_rounding(vectors(tmp_path / "run" / n), vectors(tmp_path / "ref" / n), n)
    assert [o.loss for o in again.outcomes] == pytest.approx([o.loss for o in ref.outcomes], rel=1e-4)


def test_pack_is_an_option_of_train_many_and_the_plan_says_it(tmp_path):
    rows = concepts(tmp_path, ("drop",))
    manifest = write_csv(tmp_path / "m.csv", rows)
    res = CliRunner().invoke(main, ["train-many", str(manifest), "--pack", "0", "--model", "mini"])
    assert res.exit_code == 2 and "--pack" in res.stderr
    res = CliRunner().invoke(main, ["train-many", str(manifest), "--out-dir", str(tmp_path / "o"), "--pack", "4",
                                    "--model", "mini", "--steps", "2", "--batch", "1", "--no-early-stop", "--init", "shape"])
    assert res.exit_code == 0, res.output
    assert "train-many: 1 concept: 1 to train, 0 to resume, 0 done before, up to 4 at a time in one batch" in res.stderr
    assert [r["steps"] for r in summary_rows(tmp_path / "o" / "m-summary.csv")] == ["2"]


def test_what_packs_together():
    base = TrainConfig(images="x", token="<a>", model="mini")
    same = [dataclasses.replace(base, **change) for change in ({"lr": "0.1"}, {"batch": 7}, {"steps": 9}, {"seed": 3},
                                                                 {"timesteps": "100:900"}, {"alpha_mask": True}, {"grad_accum": 2})]
    assert {packing.key(c) for c in same} == {packing.key(base)}
    apart = [{"model": "other"}, {"precision": "bf16"}, {"resolution": 64}, {"guidance": 2.0}, {"clip_skip": 2},
             {"compile": True}, {"grad_checkpointing": True}]
    assert all(packing.key(dataclasses.replace(base, **change)) != packing.key(base) for change in apart)
    assert packing.key(dataclasses.replace(base, per_layer=True)) is None


@pytest.mark.long
def test_a_packed_run_killed_and_run_again_resumes_each_concept_from_its_last_save(tmp_path):
    rows = concepts(tmp_path, ("drop", "arrow", "tee"))
    manifest = write_csv(tmp_path / "m.csv", rows)
    flags = ("--model", "mini", "--steps", "20", "--batch", "1", "--save-every", "5", "--no-early-stop", "--pack", "2")
    ref = train_many_process(manifest, tmp_path / "ref", *flags)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    killed_after(manifest, tmp_path / "run", flags, "arrow", 12)  # drop and arrow, packed: their last save is step 10's
    again = train_many_process(manifest, tmp_path / "run", *flags)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()[-2000:]
    table = summary_rows(tmp_path / "run" / "m-summary.csv")
    assert [r["note"] for r in table] == ["resumed from step 10", "resumed from step 10", "trained"]
    for name in ("drop", "arrow", "tee"):
        assert [r["step"] for r in runs.log_records(tmp_path / "run" / name)] == list(range(1, 21)), name
        assert json.loads((tmp_path / "run" / name / "config.json").read_text())["steps"] == 20
        assert_same_to_rounding(vectors(tmp_path / "run" / name), vectors(tmp_path / "ref" / name), name)


def test_a_concept_that_fails_leaves_the_pack_and_the_others_train_on_unharmed(tmp_path):
    """One row fails at its set-up (a word the model has), one diverges at its second step (NaN: its
    vectors blow up); the other trains on in the pack, as it trains alone, and the next row joins."""
    rows = concepts(tmp_path, ("drop", "arrow", "tee"))
    rows = [{"token": "shape", "images": rows[0]["images"]}, rows[0] | {"lr": "1e30"}, rows[1], rows[2]]
    summary = many.train_many(write_csv(tmp_path / "m.csv", rows), QUICK, tmp_path / "many", pack=2)
    assert [(o.token, o.stop) for o in summary.outcomes] == [("shape", "failed"), ("<drop>", "failed"),
                                                             ("<arrow>", "all steps"), ("<tee>", "all steps")]
    assert "already a word in this model's vocabulary" in summary.outcomes[0].note
    assert "NaN/inf" in summary.outcomes[1].note, summary.outcomes[1].note
    assert not (tmp_path / "many" / "shape").exists()
    for row in rows[2:]:
        name = row["token"].strip("<>")
        alone = training.train(TrainConfig(**row, **QUICK, out=str(tmp_path / "alone" / name), progress=False))
        assert_same_to_rounding(vectors(tmp_path / "many" / name), alone.embedding.vectors, name)
