"""End to end: `textinv ui` in Debian's Chromium (headless), driven by Playwright for Python.

Upload training images (one of them not an image), train a short run on the mini model, see a
preview grid, download the embedding, generate with its trigger, and add bad files to the
library (a malicious pickle, an embedding for another model family) — each refusal shown in the
page while the server keeps serving.  Screenshots go to $TEXTINV_ARTIFACTS (default
/tmp/textinv-ui-artifacts), outside git.

Chromium is Debian's (/usr/bin/chromium, installed by .ci/run with apt); Playwright never
downloads a browser.  Without /usr/bin/chromium the test skips, saying so.
"""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch

from conftest import malicious_pt

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TEXTINV_ARTIFACTS", "/tmp/textinv-ui-artifacts"))
STEPS = int(os.environ.get("TEXTINV_UI_TEST_STEPS", "40"))  # a preview every STEPS/2; fewer on an overloaded machine
# Chromium on a closed network: no background connections, no component updates, no sandbox as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
pytest.importorskip("gradio", reason="the web UI needs gradio (pip install -e '.[test]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install -e '.[test]')")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                "(.ci/run installs it: apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from textinv import ui

    root = tmp_path_factory.mktemp("ui")
    demo, url = ui.launch(root / "library", None, workdir=root / "work", port=_free_port(), max_upload_mb=1, block=False)
    yield demo, url, root
    demo.textinv_app.close()
    demo.close()


def _status(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea")


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _open(page, section: str) -> None:
    """Unfold a folded section (an accordion) by its title."""
    page.get_by_text(section, exact=True).first.click()


def _choose(page, elem_id: str, option: str) -> None:
    """Pick the first option of a Gradio dropdown whose name holds ``option``."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option).first.click()


def _export_card(page) -> None:
    """Library: the trained embedding exported as an A1111 PNG card, the card shown in the page."""
    _choose(page, "lib-pick", "bowtie-ui")
    _open(page, "Convert (export)")
    _choose(page, "lib-format", "png")
    page.locator("#lib-convert").click()
    expect = sync_api.expect
    expect(_status(page, "lib-status")).to_have_value(re.compile(r"converted to png: bowtie-ui\.png"), timeout=30_000)
    expect(page.locator("#lib-card img").first).to_be_visible(timeout=10_000)
    expect(page.locator("#lib-download a").first).to_be_visible()
    _shot(page, "10-library-exported-png-card.png")


def _train_and_stop(page, app) -> None:
    """Train: a run with non-default settings (evaluated every 2 steps, no flipped views) started from the
    form; the plot updates while it runs; Stop ends it at the current step."""
    expect = sync_api.expect
    page.get_by_role("tab", name="Train").click()
    page.locator("#token textarea, #token input").first.fill("<bowtie-stop>")
    page.locator("#steps input").fill("2000")
    _open(page, "Schedule")
    page.locator("#eval-every input").fill("2")
    _open(page, "Data")
    page.locator("#flip input").uncheck()
    page.locator("#start").click()
    status = _status(page, "train-status")
    expect(status).to_have_value(re.compile(r"Training <bowtie-stop>: step ([4-9]|\d\d+)/2000"), timeout=120_000)
    before = page.locator("#loss-plot").screenshot()
    expect(status).to_have_value(re.compile(r"Training <bowtie-stop>: step ([8-9]|\d\d+)/2000"), timeout=120_000)
    page.wait_for_timeout(1500)  # the page polls once a second
    assert page.locator("#loss-plot").screenshot() != before  # the live plot has new points
    assert (app.job.cfg.eval_every, app.job.cfg.flip) == (2, False) and app.job.curves()[1]  # the evaluation curve
    _shot(page, "11-train-running-live-plot.png")
    page.locator("#stop").click()
    expect(status).to_have_value(re.compile(r"^Stopped at step \d+/2000 .*Resume goes on from step \d+"), timeout=60_000)
    _shot(page, "12-train-stopped.png")


@pytest.mark.long
def test_browser_train_preview_download_generate_and_bad_uploads(server, tmp_path):
    from click.testing import CliRunner
    from playwright.sync_api import expect, sync_playwright

    from textinv import formats, pngmeta
    from textinv.cli import main

    demo, url, root = server
    app = demo.textinv_app
    started = time.perf_counter()

    # user-like inputs: 4 pictures of a shape, a text file posing as a picture, a malicious .pt, an SD 1.x embedding
    images = tmp_path / "images"
    assert CliRunner().invoke(main, ["world", "render", "bowtie", "-n", "4", str(images)]).exit_code == 0
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    malicious_pt(evil, marker)
    sd15 = formats.save(formats.Embedding("sd15-style", {"clip": torch.randn(2, 768)}), tmp_path / "sd15-style.pt")
    huge = tmp_path / "huge.safetensors"  # over the server's --max-upload-mb 1
    huge.write_bytes(os.urandom(3 << 20))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
            page.goto(url)
            expect(page.get_by_text("Textual Inversion on")).to_be_visible(timeout=30_000)

            # -- Train: drop images (one bad), settings, start; progress, loss plot, previews --------------
            page.locator("#train-images input[type=file]").set_input_files(sorted(map(str, images.glob("*.png"))) + [str(fake)])
            check = _status(page, "train-check")
            expect(check).to_have_value(re.compile(r"4 usable images"), timeout=30_000)
            expect(check).to_have_value(re.compile(r"notes\.png: not a readable image"))
            page.locator("#token textarea, #token input").first.fill("<bowtie-ui>")
            page.locator("#init textarea, #init input").first.fill("shape")
            page.locator("#steps input").fill(str(STEPS))
            _open(page, "Saving")  # a folded group of the form
            page.locator("#preview-every input").fill(str(max(1, STEPS // 2)))
            _shot(page, "01-train-images-dropped.png")
            page.locator("#start").click()
            status = _status(page, "train-status")
            expect(status).to_have_value(re.compile(rf"(Training <bowtie-ui>: step \d+|Done at step {STEPS})/{STEPS}"), timeout=120_000)
            expect(status).to_have_value(re.compile(rf"Done at step {STEPS}/{STEPS}"), timeout=400_000)
            expect(page.locator("#previews img").first).to_be_visible(timeout=10_000)
            assert page.locator("#previews img").count() >= 2  # steps STEPS/2 and STEPS
            assert page.locator("#loss-plot canvas, #loss-plot svg").count() >= 1
            _shot(page, "02-trained-loss-and-previews.png")

            # -- download the embedding (A1111 .pt) ------------------------------------------------
            page.locator("#export").click()
            link = page.locator("#train-download a").first
            expect(link).to_be_visible(timeout=20_000)
            with page.expect_download() as dl:
                link.click()
            got = ARTIFACTS / "bowtie-ui.pt"
            dl.value.save_as(got)
            emb = formats.load(got)
            assert (formats.detect_format(got), emb.name, emb.num_vectors, emb.meta["step"]) == ("a1111", "bowtie-ui", 1, STEPS)

            # -- Generate with the trigger: the library holds the trained embedding ------------------
            page.get_by_role("tab", name="Generate").click()
            page.locator("#prompt textarea").fill("a <bowtie-ui>")
            page.locator("#gen-steps input").fill("20")
            page.locator("#generate").click()
            gen = _status(page, "gen-status")
            expect(gen).to_have_value(re.compile(r"4 image\(s\) .*embeddings used: bowtie-ui"), timeout=180_000)
            expect(page.locator("#gen-gallery img").first).to_be_visible()
            expect(_status(page, "gen-params")).to_have_value(re.compile(r"TI hashes: .*bowtie-ui"))
            _shot(page, "03-generated-with-trigger.png")
            pngs = sorted(app.outputs.glob("0000*.png"))
            assert len(pngs) == 4
            prompt, _, params = pngmeta.parse_parameters(pngmeta.read_parameters(pngs[0]))
            assert prompt == "a <bowtie-ui>" and params["Seed"] == "0" and "bowtie-ui" in params["TI hashes"]

            # -- Library: the table, then bad uploads refused in the page; the server goes on --------
            page.get_by_role("tab", name="Library").click()
            expect(page.locator("#lib-table")).to_contain_text("bowtie-ui", timeout=30_000)
            upload = page.locator("#lib-upload input[type=file]")
            upload.set_input_files([str(evil)])
            lib = _status(page, "lib-status")
            expect(lib).to_have_value(re.compile(r"refused evil\.pt: .*never allowed"), timeout=30_000)
            _shot(page, "04-library-malicious-pt-refused.png")
            assert not marker.exists()
            upload.set_input_files([str(sd15)])
            expect(lib).to_have_value(re.compile(r"refused sd15-style\.pt: .*768-wide: made for SD 1\.x"), timeout=30_000)
            _shot(page, "05-library-wrong-family-refused.png")
            upload.set_input_files([str(huge)])
            too_big = page.get_by_text(re.compile(r"exceed|maximum allowed|too large", re.I)).filter(visible=True).first
            expect(too_big).to_be_visible(timeout=30_000)
            print("huge upload:", too_big.inner_text())
            _shot(page, "06-library-huge-file-refused.png")
            page.locator("#lib-refresh").click()
            expect(lib).to_have_value(re.compile(r"^1 embedding\(s\) in "), timeout=30_000)
            expect(page.locator("#lib-table")).to_contain_text("bowtie-ui")
            _shot(page, "07-library-after-bad-uploads.png")
            _export_card(page)
            _train_and_stop(page, app)
        finally:
            browser.close()
    assert sorted(p.name for p in app.library.iterdir()) == ["bowtie-stop.safetensors", "bowtie-ui.safetensors"]
    elapsed = time.perf_counter() - started
    # The aim is under 3 minutes (about a minute on 2 quiet cores); on a shared, busy machine it takes longer,
    # so the time is recorded rather than asserted.
    (ARTIFACTS / "timing.txt").write_text(f"browser test body: {elapsed:.1f} s\n")
    print(f"browser test body: {elapsed:.1f} s")


@pytest.mark.long
def test_browser_bias_tab_renders_and_a_bad_attribute_is_a_message(server):
    from playwright.sync_api import expect, sync_playwright

    demo, url, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="Bias").click()
            page.locator("#bias-word textarea, #bias-word input").first.fill("ball")
            page.locator("#bias-attribute textarea, #bias-attribute input").first.fill("gender")  # no values: refused
            expect(page.locator("#bias-recipe")).to_contain_text("per-value")
            expect(page.locator("#bias-init textarea, #bias-init input").first).to_have_value("majority")
            expect(page.locator("#bias-named")).to_contain_text("by name")
            page.locator("#bias-start").click()
            expect(_status(page, "bias-status")).to_have_value(re.compile(r"^Error: --attribute 'gender': expected NAME="),
                                                               timeout=30_000)
            _shot(page, "08-bias-bad-attribute.png")
            assert demo.textinv_app.bias is None  # refused before anything started

            # measure only (no folder, no embedding), 1 image a prompt: the table, the chart and the files come back
            page.locator("#bias-attribute textarea, #bias-attribute input").first.fill("colour")
            page.locator("#bias-prompts textarea").fill("a {} on the left")
            page.locator("#bias-n input").fill("1")
            page.locator("#bias-start").click()
            expect(_status(page, "bias-status")).to_have_value(re.compile(r"^Done in \d+ s: bias\.json"), timeout=120_000)
            expect(_status(page, "bias-table")).to_have_value(re.compile(r"colour of 'ball' \(judge, 1 images a prompt\)"))
            expect(page.locator("#bias-chart img").first).to_be_visible(timeout=10_000)
            expect(page.locator("#bias-files")).to_contain_text("report.html")
            expect(page.locator("#bias-report")).to_contain_text("a ball on the left")
            _shot(page, "09-bias-measured.png")

            # a longer run, stopped from the page: one line says so, and no half-written report
            page.locator("#bias-n input").fill("16")  # many images a prompt: Stop ends it after the current prompt
            page.locator("#bias-start").click()
            expect(page.locator("#bias-stop")).to_be_enabled(timeout=30_000)
            page.locator("#bias-stop").click()
            expect(_status(page, "bias-status")).to_have_value(re.compile(r"^Stopped after \d+ s \(stopped on request"),
                                                               timeout=120_000)
            _shot(page, "13-bias-stopped.png")
            assert not demo.textinv_app.bias.paths() and not (demo.textinv_app.bias.out / "bias.json").exists()
        finally:
            browser.close()
