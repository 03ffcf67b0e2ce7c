"""Wherever an embedding is accepted: training run folders (RUN@STEP), the demo's output folder,
Hugging Face Hub ids and URLs — resolved by textinv.sources, read by the safe readers.

No network: hub tests build a hub cache layout in a temporary folder and run offline; URL tests
replace huggingface_hub's HTTP session with a fake one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from textinv import formats, generation, runs, sources
from textinv.cli import main
from textinv.errors import TextinvError
from textinv.formats import Embedding

from conftest import make_sd


def vectors(seed, width=32, n=1):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def one_error_line(res, *words):
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("error:") and "Traceback" not in res.output, res.output
    for w in words:
        assert w in res.output, res.output


def plain_png(path: Path, shade: int = 200) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), shade, np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run folder written by the trainer: config.json, log.jsonl, state.pt, blk.safetensors
    (step 4), embeddings/blk-2.safetensors, previews/, plus an eval/ folder as `textinv eval` leaves it."""
    from textinv.training import train

    root = tmp_path_factory.mktemp("runs")
    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(3):
        a = np.full((32, 32, 3), 230, np.uint8)
        a[6:26, 4 + 2 * i:24 + 2 * i] = (200, 30, 30)
        Image.fromarray(a).save(imgs / f"{i:02d}.png")
    run = root / "lib" / "blk"
    train(images=str(imgs), token="<blk>", init="square", steps=4, batch=2, save_every=2, preview_every=2,
          out=str(run), pipe=make_sd(), progress=False)
    plain_png(run / "eval" / "curve.png")
    (run / "eval" / "metrics.json").write_text("{}")
    model = root / "model"
    make_sd().save_pretrained(model)
    return run, imgs, model


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run (tests may change it), in a library folder of its own."""
    copy = tmp_path / "lib" / "blk"
    shutil.copytree(trained[0], copy)
    return copy


def test_the_trainers_run_folder_has_the_layout_these_tests_assume(run):
    assert {"config.json", "log.jsonl", "state.pt", "blk.safetensors", "embeddings", "previews"} <= {p.name for p in run.iterdir()}
    assert (run / "embeddings" / "blk-2.safetensors").is_file()
    assert runs.final(run) == run / "blk.safetensors"
    assert [s for s, _ in runs.saves(run)[1]] == [2, 4]


def test_runs_names_each_part_the_trainer_wrote(run):
    assert runs.config(run).token == "<blk>" and runs.folder_of(run) == run and runs.folder_of(run.parent) is None
    assert runs.has_state(run) and runs.is_state_file(runs.state_file(run)) and not runs.is_state_file(run / "blk.safetensors")
    assert runs.save_file(run, "<blk>", 2, ".safetensors").is_file()
    assert runs.final(run) == runs.final_file(run, "<blk>", ".safetensors")
    assert runs.previews(run) == [runs.preview_file(run, 2), runs.preview_file(run, 4)]
    assert [json.loads(line)["step"] for line in runs.log_file(run).read_text().splitlines()] == [1, 2, 3, 4]
    assert (runs.eval_folder(run) / "metrics.json").is_file()
    with runs.RunLock(run):  # the run has ended: nothing holds its folder
        pass


def test_a_run_folder_means_its_final_embedding_everywhere(run, tmp_path):
    final = formats.load(run / "blk.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "skipped state.pt: not an embedding" would fail here
        found = generation.load_embeddings([run, str(run)])
    assert [e.name for e in found] == ["blk", "blk"] and all(e.path == run / "blk.safetensors" for e in found)
    assert torch.equal(found[0].vectors["clip"], final.vectors["clip"])

    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(run)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == f"{run}/blk.safetensors" and "state.pt" not in res.output
    assert "step         4" in res.output and formats.short_hash(run / "blk.safetensors") in res.output

    # A library holding a run lists its final embedding once: no step saves, no state, no previews.
    formats.save(Embedding("loose", {"clip": vectors(9)}), run.parent / "loose.safetensors")
    res = runner.invoke(main, ["list", str(run.parent), "--json"])
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output
    table = json.loads(res.output)
    assert sorted((r["trigger"], r["file"], r["steps"]) for r in table) == [("blk", "blk/blk.safetensors", 4),
                                                                           ("loose", "loose.safetensors", None)]

    res = runner.invoke(main, ["convert", str(run), str(tmp_path / "out.pt")])
    assert res.exit_code == 0, res.output
    assert torch.equal(formats.load(tmp_path / "out.pt").vectors["clip"].float(), final.vectors["clip"].float())


def test_generate_with_a_run_folder_uses_its_final_embedding(run, trained, tmp_path):
    res = CliRunner().invoke(main, ["generate", "a photo of <blk>", "-e", str(run), "--model", str(trained[2]),
                                    "--steps", "1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "embeddings used: blk" in res.output and "warning" not in res.output


def test_run_at_step_picks_one_save_and_lists_the_steps_there_are(run):
    at2 = sources.load_one(f"{run}@2")
    assert at2.name == "blk" and at2.path == run / "embeddings" / "blk-2.safetensors"
    assert torch.equal(at2.vectors["clip"], formats.load(run / "embeddings" / "blk-2.safetensors").vectors["clip"])
    assert not torch.equal(at2.vectors["clip"], formats.load(run / "blk.safetensors").vectors["clip"])
    for spec in (f"{run}@4", f"{run}@final"):  # the last step is the final embedding
        assert sources.load_one(spec).path == run / "blk.safetensors"
    with pytest.raises(TextinvError, match=r"@3: no save at step 3 in this run \(saved steps: 2, 4 \(final\)\)"):
        sources.resolve(f"{run}@3")
    with pytest.raises(TextinvError, match="after @ give a step number or 'final'"):
        sources.resolve(f"{run}@best")
    with pytest.raises(TextinvError, match="is not a run folder"):
        sources.resolve(f"{run / 'embeddings'}@2")

    runner = CliRunner()
    res = runner.invoke(main, ["inspect", f"{run}@2", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["file"] == f"{run}@2" and info["meta"]["step"] == 2 and info["trigger"] == "blk"
    one_error_line(runner.invoke(main, ["inspect", f"{run}@3"]), f"{run}@3", "2, 4 (final)")


def test_state_pt_and_unfinished_runs_fail_in_one_line(run):
    runner = CliRunner()
    one_error_line(runner.invoke(main, ["inspect", str(run / "state.pt")]), "state.pt", "training run's state")
    (run / "blk.safetensors").unlink()  # a run still training: only its step saves so far
    one_error_line(runner.invoke(main, ["generate", "a", "-e", str(run), "--steps", "1"]),
                   "no final embedding yet", f"{run}@STEP", "saved steps: 2")
    assert sources.load_one(f"{run}@2").name == "blk"
    assert sources.load_all(run.parent) == []  # a library scan skips it whole: no state, no step saves


def test_the_demo_folder_stands_for_its_run(trained, tmp_path, monkeypatch):
    run, imgs, model = trained
    demo = tmp_path / "textinv-demo"
    shutil.copytree(run, demo / "run")
    shutil.copytree(imgs, demo / "images")
    plain_png(demo / "grid.png")
    (demo / "metrics.json").write_text(json.dumps({"fidelity": 1.0}))
    assert sources.resolve(demo).run == demo / "run"
    assert [e.path for e in sources.load(demo)] == [demo / "run" / "blk.safetensors"]
    assert sources.load_one(f"{demo}@2").path == demo / "run" / "embeddings" / "blk-2.safetensors"
    assert sources.load_one(demo).path == demo / "run" / "blk.safetensors"

    runner = CliRunner()
    res = runner.invoke(main, ["list", str(demo)])
    assert res.exit_code == 0 and res.output.splitlines()[-1] == "1 embedding", res.output
    res = runner.invoke(main, ["inspect", str(demo)])
    assert res.exit_code == 0 and res.output.splitlines()[0] == f"{demo}/run/blk.safetensors", res.output

    # eval measures every save of the run inside, and writes beside it (the metric is a stand-in:
    # what is tested is which embeddings get measured, not how)
    from textinv import evaluate

    class Flat:
        backend, labels = "flat", {"fidelity": "f", "editability": "e"}

        def describe(self):
            return {"backend": self.backend}

        def __call__(self, pipe, trigger, **kw):
            return {"fidelity": 0.5, "editability": 0.5, "probes": [], "thumbs": {}}

    seen = []
    monkeypatch.setattr(evaluate, "choose_metric", lambda *a, **k: Flat())
    monkeypatch.setattr(evaluate.StepTracker, "measure",
                        lambda self, step, trigger=None: seen.append((step, self.trigger)) or {})
    monkeypatch.setattr(evaluate.StepTracker, "evaluation", lambda self, **kw: evaluate.Evaluation(
        {"target": str(kw["target"]), "points": [], "best_step": None}))
    written = {}
    monkeypatch.setattr("textinv.report.write_outputs", lambda ev, out: written.setdefault("out", out) and {
        "report": out / "report.html", "curve": out / "curve.png", "metrics": out / "metrics.json"})
    monkeypatch.setattr("textinv.report.format_table", lambda result: "table")
    res = runner.invoke(main, ["eval", str(demo), "--images", str(imgs), "--model", str(model), "-n", "1", "--steps", "1",
                               "--no-baseline"])
    assert res.exit_code == 0, res.output
    assert seen == [(2, "<blk>"), (4, "<blk>")] and written["out"] == demo / "run" / "eval"


# --------------------------------------------------------------------------- the Hub
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline; the current folder is an empty one (no local look-alikes)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return cache


def embedding_bytes(tmp_path: Path, emb: Embedding, suffix: str = ".safetensors") -> bytes:
    return formats.save(emb, tmp_path / f"scratch-{emb.name.strip('<>')}{suffix}").read_bytes()


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub keeps: refs/main → commit, snapshots/<commit>/<file> → ../blobs/<sha256>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / COMMIT


def test_a_hub_id_reads_the_repos_diffusers_file_from_the_cache_offline(hub, tmp_path):
    cat = Embedding("<cat-toy>", {"clip": vectors(1)})
    cache_repo(hub, "someone/cat-toy", {"learned_embeds.safetensors": embedding_bytes(tmp_path, cat),
                                        "README.md": b"# cat toy", "token_identifier.txt": b"<cat-toy>",
                                        "concept_images/0.jpeg": b"\xff\xd8 not really"})
    (emb,) = sources.load("someone/cat-toy")
    assert emb.name == "cat-toy" and emb.meta["token"] == "<cat-toy>"  # the repo's name; the stored token works too
    assert torch.equal(emb.vectors["clip"], cat.vectors["clip"])
    assert [e.name for e in generation.load_embeddings(["someone/cat-toy"])] == ["cat-toy"]

    res = CliRunner().invoke(main, ["inspect", "someone/cat-toy"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == "someone/cat-toy/learned_embeds.safetensors" and str(hub) not in res.output

    url = "https://huggingface.co/someone/cat-toy/resolve/main/learned_embeds.safetensors"
    (emb,) = sources.load(url)
    assert emb.name == "cat-toy" and torch.equal(emb.vectors["clip"], cat.vectors["clip"])


def test_a_file_in_a_hub_repo_and_a_repo_with_several_files(hub, tmp_path):
    a = Embedding("a", {"clip": vectors(2)})
    b = Embedding("b", {"clip": vectors(3)})
    cache_repo(hub, "someone/pack", {"a.pt": embedding_bytes(tmp_path, a, ".pt"),
                                     "sub/b.safetensors": embedding_bytes(tmp_path, b),
                                     "unet/diffusion_pytorch_model.safetensors": b"weights, not an embedding",
                                     "README.md": b"two embeddings"})
    emb = sources.load_one("someone/pack/sub/b.safetensors")
    assert emb.name == "b" and torch.equal(emb.vectors["clip"], b.vectors["clip"])
    assert torch.equal(sources.load_one("someone/pack/a.pt").vectors["clip"], a.vectors["clip"])
    one_error_line(CliRunner().invoke(main, ["list", "someone/pack"]),
                   "someone/pack: 2 embedding files", "someone/pack/FILE: a.pt, sub/b.safetensors")


def test_a_missing_hub_id_or_file_is_one_line_naming_it_and_what_to_do(hub, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["generate", "a", "-e", "nobody/nothing", "--steps", "1"])
    one_error_line(res, "nobody/nothing", "not in the local Hugging Face cache", "HF_HUB_OFFLINE=1")
    cache_repo(hub, "someone/cat-toy", {"learned_embeds.safetensors": embedding_bytes(tmp_path, Embedding("c", {"clip": vectors(1)}))})
    one_error_line(runner.invoke(main, ["inspect", "someone/cat-toy/missing.safetensors"]),
                   "someone/cat-toy/missing.safetensors", "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
    cache_repo(hub, "someone/docs", {"README.md": b"no embedding here"})
    one_error_line(runner.invoke(main, ["inspect", "someone/docs"]), "holds no embedding file", "README.md")
    # a missing local file is not taken for a hub id when its folder exists, or it has an embedding's suffix
    Path("embeddings").mkdir()
    one_error_line(runner.invoke(main, ["inspect", "embeddings/my-cat"]), "embeddings/my-cat: no such file or folder")
    one_error_line(runner.invoke(main, ["inspect", "somewhere/my-cat.pt"]), "somewhere/my-cat.pt: no such file or folder")


def test_a_local_path_wins_over_a_hub_id_spelled_the_same(hub, tmp_path):
    cache_repo(hub, "someone/cat-toy", {"learned_embeds.safetensors": embedding_bytes(tmp_path, Embedding("hub", {"clip": vectors(1)}))})
    local = Embedding("mine", {"clip": vectors(5)})
    formats.save(local, Path("someone/cat-toy/mine.pt"))
    (emb,) = sources.load("someone/cat-toy")
    assert emb.name == "mine" and torch.equal(emb.vectors["clip"], local.vectors["clip"])


# ------------------------------------------------------------------------------- URLs
class FakeResponse:
    def __init__(self, body: bytes = b"", status: int = 200, headers: dict | None = None, chunk: int = 400):
        self.body, self.status_code, self.headers, self.chunk = body, status, headers or {}, chunk
        self.read = 0

    def iter_bytes(self):
        for i in range(0, len(self.body), self.chunk):
            self.read += 1
            yield self.body[i:i + self.chunk]


class FakeSession:
    """huggingface_hub's HTTP session, as far as a download uses it."""

    def __init__(self, response=None, error: Exception | None = None):
        self.response, self.error, self.urls = response, error, []

    @contextlib.contextmanager
    def stream(self, method, url, **kwargs):
        self.urls.append(url)
        if self.error is not None:
            raise self.error
        yield self.response


def use_session(monkeypatch, session: FakeSession, online: bool) -> FakeSession:
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: session)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", not online)
    return session


def test_a_url_is_downloaded_once_into_the_hub_cache_and_read_offline_after(hub, tmp_path, monkeypatch):
    neg = Embedding("neg", {"clip": vectors(7)})
    url = "https://example.org/api/download/123"
    session = use_session(monkeypatch, FakeSession(FakeResponse(
        embedding_bytes(tmp_path, neg), headers={"content-disposition": 'attachment; filename="easy neg.safetensors"'})), online=True)
    (emb,) = sources.load(url)
    assert session.urls == [url]
    assert emb.name == "easy-neg" and torch.equal(emb.vectors["clip"], neg.vectors["clip"])
    kept = sources.download_folder(url) / "easy-neg.safetensors"
    assert emb.path == kept and kept.is_file() and hub in kept.parents

    use_session(monkeypatch, FakeSession(error=AssertionError("no network offline")), online=False)
    (again,) = sources.load(url)  # from the cache, offline: no request
    assert again.path == kept and torch.equal(again.vectors["clip"], neg.vectors["clip"])
    res = CliRunner().invoke(main, ["inspect", url])
    assert res.exit_code == 0 and res.output.splitlines()[0] == url, res.output

    # an entry already in the cache (e.g. copied from another machine) is read as it is
    other = "https://example.org/files/style.pt"
    formats.save(Embedding("style", {"clip": vectors(8)}), sources.download_folder(other) / "style.pt")
    assert sources.load_one(other).name == "style"


def test_a_url_download_refused_offline_too_large_or_failing_leaves_nothing(hub, tmp_path, monkeypatch):
    url = "https://example.org/big.safetensors"
    offline = use_session(monkeypatch, FakeSession(error=AssertionError("no network offline")), online=False)
    one_error_line(CliRunner().invoke(main, ["inspect", url]), url, "not downloaded yet", "HF_HUB_OFFLINE=1")
    assert offline.urls == []

    monkeypatch.setattr(sources, "MAX_DOWNLOAD_BYTES", 1000)
    streamed = FakeResponse(b"x" * 1600)  # no length announced: refused while streaming
    use_session(monkeypatch, FakeSession(streamed), online=True)
    one_error_line(CliRunner().invoke(main, ["inspect", url]), url, "larger than an embedding can be")
    assert 0 < streamed.read < 4
    announced = FakeResponse(b"x" * 1600, headers={"content-length": "1600"})
    use_session(monkeypatch, FakeSession(announced), online=True)
    with pytest.raises(TextinvError, match="larger than an embedding can be"):
        sources.resolve(url)
    assert announced.read == 0
    use_session(monkeypatch, FakeSession(FakeResponse(status=404)), online=True)
    with pytest.raises(TextinvError, match=r"big.safetensors: cannot download \(HTTP 404\)"):
        sources.resolve(url)
    use_session(monkeypatch, FakeSession(error=ConnectionError("name resolution failed")), online=True)
    with pytest.raises(TextinvError, match="cannot download .*name resolution failed"):
        sources.resolve(url)
    assert not (hub / sources.URL_FOLDER).exists() or not any((hub / sources.URL_FOLDER).iterdir())


def test_online_a_repo_is_listed_on_the_hub_and_oversized_files_are_never_downloaded(hub, tmp_path, monkeypatch):
    """The Hub's answers are stand-ins (no network): what is tested is textinv's choice and size check."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.hf_api import RepoSibling

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cat = tmp_path / "cat.pt"
    formats.save(Embedding("cat", {"clip": vectors(4)}), cat)
    listing = [RepoSibling("model.safetensors", size=2 << 30), RepoSibling("cat.pt", size=cat.stat().st_size),
               RepoSibling("README.md", size=10)]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: SimpleNamespace(siblings=listing))
    fetched = []

    def download(repo_id, filename, dry_run=False, **kw):
        if dry_run:
            return SimpleNamespace(is_cached=False, file_size=2 << 30 if filename.startswith("model") else 100)
        fetched.append(filename)
        return str(cat)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    (emb,) = sources.load("someone/mixed")  # the checkpoint is too large to be an embedding: the .pt is the one
    assert emb.name == "cat" and fetched == ["cat.pt"]
    one_error_line(CliRunner().invoke(main, ["inspect", "someone/mixed/model.safetensors"]),
                   "someone/mixed/model.safetensors", "2048 MB, larger than an embedding can be")
    assert fetched == ["cat.pt"]
