"""``textinv ui``: a local web app (Gradio) to train, generate and manage embeddings, and measure a word's bias.

Two layers.  :class:`textinv.app.App` is plain Python — training and bias jobs, generation, the
library folder — tested without a browser.  :func:`build` wires it to Gradio components: every handler
turns an error into a message in the page (a status box and a warning toast), so a bad upload or
a bad setting never stops the server.

Offline by design: analytics are off, there are no share links, the server listens on
127.0.0.1 only, and fonts and scripts come from the installed package.
"""
from __future__ import annotations

import html
import os
import sys
import time
from types import SimpleNamespace as NS

from diffusers.utils import hub_utils as diffusers_hub
from huggingface_hub import constants as hub_constants

from . import samplers, settings
from .app import (ALL_FAMILIES, BIAS_RECIPES, EXPORT_FORMATS, FITS_MODEL, MODEL_DEFAULT_SAMPLER, TRISTATE, App, BiasJob,
                  TrainJob, collecting, describe_error, install_warning_router)
from .errors import TextinvError

HOST = "127.0.0.1"
DEFAULT_MAX_UPLOAD_MB = 200  # a LoRA bundle may carry embeddings; checkpoints are refused anyway


# ------------------------------------------------------------------------------------ the page
LIBRARY_HEADERS = ["trigger", "family", "vectors", "steps", "hash", "nearest words", "file"]
LOSS, EVAL = "training loss", "evaluation loss (early stopping)"  # the live plot's two curves
BIAS_HEADERS = ["group", "prompt", "KL before", "KL after", "retention before", "retention asked by name", "retention after"]
OTHER_GROUP = "Other settings"  # the form's section for a setting whose group has no section of its own
CSS = """
#previews img, #gen-gallery img { image-rendering: pixelated; }
#bias-table textarea { font-family: monospace; white-space: pre; }
.status textarea { font-family: monospace; }
"""


def _no_analytics() -> None:
    """Gradio's analytics and the Hub's telemetry off, unless the environment says otherwise.  Gradio
    reads its variable when imported (just after this); huggingface_hub and diffusers read theirs
    when textinv was imported, so their copies are set too."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if "HF_HUB_DISABLE_TELEMETRY" not in os.environ:
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
        hub_constants.HF_HUB_DISABLE_TELEMETRY = diffusers_hub.HF_HUB_DISABLE_TELEMETRY = True


def _gr():
    _no_analytics()
    try:
        import gradio as gr  # deferred: the 'ui' extra, only for textinv ui
    except ImportError:
        raise TextinvError("the web UI needs Gradio: pip install 'textinv[ui]' (or pip install gradio)") from None
    return gr


class _Page:
    """What every tab's handlers share: messages in the page, the loss plot, previews, the library list."""

    def __init__(self, gr, app: App):
        import pandas as pd  # deferred: the 'ui' extra, only for textinv ui

        self.gr, self.app, self.pd = gr, app, pd

    def warn(self, messages) -> None:
        for m in messages[:8]:
            self.gr.Warning(html.escape(m), duration=15)

    def loss_frame(self, job: TrainJob | None):
        """The live plot's points: the training loss and, scored every few steps, the evaluation loss early stopping watches."""
        losses, evals = job.curves() if job else ([], [])
        rows = [(s, x, LOSS) for s, x in _thinned(losses)] + [(s, x, EVAL) for s, x in _thinned(evals)]
        # explicit dtypes, also when empty: Gradio picks each axis's scale (numeric or categorical) from them
        frame = self.pd.DataFrame(rows, columns=["step", "loss", "curve"])
        return frame.astype({"step": "int64", "loss": "float64", "curve": "str"})

    @staticmethod
    def gallery(job: TrainJob | None):
        return [(str(p), f"step {int(p.stem)}") for p in job.previews()] if job else []

    def library_choices(self):
        return [(k, k) for k in self.app.entries()]

    def guarded(self, fn, on_error):
        """Run a handler; an error becomes a warning in the page and ``on_error(message)``'s outputs."""
        def run(*args):
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - every error is a message in the page
                msg = describe_error(e)
                self.warn([msg])
                return on_error(f"Error: {msg}")
        return run


def _thinned(points: list, most: int = 500) -> list:
    """A few hundred points, however long the run (the last one always kept)."""
    every = max(1, len(points) // most)
    return [p for i, p in enumerate(points) if i % every == 0 or i == len(points) - 1]


def build(app: App):
    """The Gradio Blocks of the app (not launched): four tabs, then their handlers."""
    gr = _gr()
    page = _Page(gr, app)
    with gr.Blocks(title="textinv", analytics_enabled=False) as demo:
        gr.Markdown(f"# textinv\nTextual Inversion on **{html.escape(app.model_name)}** · library `{html.escape(str(app.library))}`")
        with gr.Tabs():
            train = _train_tab(gr, app, page)
            gen = _generate_tab(gr)
            lib = _library_tab(gr)
            bias = _bias_tab(gr, app)
        _train_handlers(gr, app, page, train, gen)
        _generate_handlers(gr, app, page, gen)
        _library_handlers(gr, app, page, lib, gen, demo)
        _bias_handlers(gr, app, page, bias)
        _on_load(gr, app, page, demo, train, bias)
    demo.queue(default_concurrency_limit=2)
    return demo


def _on_load(gr, app: App, page: _Page, demo, train, bias) -> None:
    """A reloaded page (or another browser) sees the runs the App holds, follows them live, and can stop
    them: a run lives in the App, not in the page that started it."""
    def follow_training():  # generator functions (Gradio streams those), not lambdas returning generators
        yield from _follow_any(gr, page, app.job)

    def follow_bias():
        yield from _follow_any_bias(gr, page, app.bias)

    demo.load(follow_training, None, train.live, concurrency_limit=None, show_progress="hidden")
    demo.load(lambda: gr.update(interactive=bool(app.job and app.job.running)), None, train.stop)
    demo.load(follow_bias, None, bias.outputs, concurrency_limit=None, show_progress="hidden")


def _train_tab(gr, app: App, page: _Page):
    with gr.Tab("Train", id="train"):
        with gr.Row():
            with gr.Column():
                images = gr.File(label="Training images (drop 3–5 or more)", file_count="multiple", type="filepath",
                                 elem_id="train-images")
                folder = gr.Textbox(label="…or a folder on this machine", placeholder="/path/to/photos", elem_id="train-folder")
                check = gr.Textbox(label="Images", interactive=False, lines=2, elem_id="train-check", elem_classes="status")
            with gr.Column():
                form = _setting_form(gr, app)
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="start")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False)  # while a run goes
                    resume = gr.Button("Resume", elem_id="train-resume")  # the last run stopped from the page
        status = gr.Textbox(label="Status", interactive=False, lines=3, elem_id="train-status", elem_classes="status")
        with gr.Row():
            plot = gr.LinePlot(page.loss_frame(None), x="step", y="loss", color="curve", title="Loss", height=260,
                               elem_id="loss-plot")
            previews = gr.Gallery(label="Previews (fixed seeds)", columns=2, height=300, object_fit="contain", elem_id="previews")
        with gr.Row():
            fmt = gr.Dropdown(list(EXPORT_FORMATS), value="a1111", label="Download as", elem_id="export-format")
            export = gr.Button("Prepare download", elem_id="export")
            file = gr.File(label="Embedding file", interactive=False, height=110, elem_id="train-download")
    return NS(images=images, folder=folder, check=check, names=list(form), settings=[images, folder, *form.values()],
              start=start, stop=stop, resume=resume, status=status, plot=plot, previews=previews, fmt=fmt, export=export,
              file=file)


def _setting_form(gr, app: App) -> dict:
    """The training form, generated from the settings' declaration (textinv.settings): the main
    settings up front, then each group's others (and the measured saves') in a folded section.
    A setting added to TrainConfig appears here with no code of its own.  By field name."""
    shown = settings.form_fields() + list(settings.measure_fields())
    form = _setting_widgets(gr, app, [f for f in shown if settings.spec(f).form == settings.MAIN])
    more = [f for f in shown if settings.spec(f).form != settings.MAIN]
    sections = {**{title: [f for f in more if settings.spec(f).group == g] for g, title in settings.GROUPS.items()},
                OTHER_GROUP: [f for f in more if settings.spec(f).group not in settings.GROUPS]}
    for title, fields in sections.items():
        if fields:
            with gr.Accordion(title, open=False, elem_id="group-" + title.split()[0].lower()):
                form |= _setting_widgets(gr, app, fields)
    return form


def _setting_widgets(gr, app: App, fields) -> dict:
    """The training form's widgets for these settings (textinv.settings), by field name; their
    element ids are the names with dashes (#clip-skip)."""
    defaults, examples = app.form_defaults(), app.form_examples()
    return {f.name: _setting_widget(gr, f, defaults.get(f.name), examples.get(f.name)) for f in fields}


def _setting_widget(gr, f, value, example: str | None = None):
    """One setting's widget; ``example``: a text box's placeholder (the model's, or the setting's)."""
    s, (kind, optional) = settings.spec(f), settings.kind_of(f)
    common = dict(label=s.label, info=s.hint or s.help or None, elem_id=f.name.replace("_", "-"))
    if s.choices:
        return gr.Radio(list(s.choices), value=value, **common)
    if kind is bool and optional:
        return gr.Radio(list(TRISTATE), value=next(k for k, v in TRISTATE.items() if v is value), **common)
    if kind is bool:
        return gr.Checkbox(value=value, **common)
    if kind in (int, float) and not optional:
        return gr.Number(value=value, precision=0 if kind is int else None, **common)
    if kind in (int, float):  # a Number box posts 0 when left empty; a text box posts "", which means the default
        return gr.Textbox(value="" if value is None else str(value), placeholder=example or None, **common)
    if kind is list:
        return gr.Textbox(value="\n".join(value), lines=2, **common)
    return gr.Textbox(value=value or "", placeholder=example or None, **common)


def _generate_tab(gr):
    with gr.Tab("Generate", id="generate") as tab:
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt (A1111 syntax; embeddings by their trigger)", lines=2,
                                    placeholder="a red <my-shape> on the left", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                embs = gr.Dropdown(choices=[], value=[], multiselect=True, label="Embeddings (none picked: the whole library)",
                                   elem_id="gen-embeddings")
            with gr.Column(scale=2):
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="gen-seed")
                    steps = gr.Number(label="Steps", value=30, precision=0, minimum=1, elem_id="gen-steps")
                    n = gr.Number(label="Images (grid)", value=4, precision=0, minimum=1, maximum=64, elem_id="gen-n")
                sampler = gr.Dropdown([MODEL_DEFAULT_SAMPLER] + samplers.names(), value=MODEL_DEFAULT_SAMPLER, label="Sampler",
                                      elem_id="sampler")
                with gr.Row():
                    cfg = gr.Number(label="CFG scale (0: the model's default)", value=0, elem_id="cfg")
                    clip_skip = gr.Number(label="Clip skip", value=1, precision=0, minimum=1, elem_id="gen-clip-skip")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="gen-status", elem_classes="status")
        gallery = gr.Gallery(label="Images", columns=4, height=360, object_fit="contain", elem_id="gen-gallery")
        params = gr.Textbox(label="parameters (written into every PNG)", interactive=False, lines=3, elem_id="gen-params")
        files = gr.File(label="PNG files", file_count="multiple", interactive=False, height=160, elem_id="gen-files")
    return NS(tab=tab, embs=embs, inputs=[prompt, negative, embs, seed, steps, n, sampler, cfg, clip_skip], go=go,
              outputs=[status, gallery, params, files])


def _library_tab(gr):
    with gr.Tab("Library", id="library") as tab:
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="lib-refresh", scale=0)
            upload = gr.File(label="Add embedding files (.pt, .safetensors, .bin, PNG cards…)", file_count="multiple",
                             type="filepath", elem_id="lib-upload")
        status = gr.Textbox(label="Status", interactive=False, lines=3, elem_id="lib-status", elem_classes="status")
        with gr.Row():
            model = gr.Markdown(elem_id="lib-model")  # the model's family: which embeddings fit it
            family = gr.Dropdown([ALL_FAMILIES, FITS_MODEL], value=ALL_FAMILIES, label="Show", elem_id="lib-family", scale=0,
                                 min_width=260)
        table = gr.Dataframe(headers=LIBRARY_HEADERS, interactive=False, wrap=True, elem_id="lib-table")
        with gr.Row():
            pick = gr.Dropdown(choices=[], label="Embedding", elem_id="lib-pick", scale=2)
            inspect = gr.Button("Inspect", elem_id="lib-inspect", scale=0)
            delete = gr.Button("Delete (moves to .trash)", variant="stop", elem_id="lib-delete", scale=0)
        info = gr.Textbox(label="Details", interactive=False, lines=8, elem_id="lib-info", elem_classes="status")
        with gr.Accordion("Convert (export)", open=False, elem_id="lib-export"):
            with gr.Row():
                with gr.Column():
                    fmt = gr.Dropdown(list(EXPORT_FORMATS), value="a1111", label="Format (xti, per-layer: P+ embeddings)",
                                      elem_id="lib-format")
                    to_single = gr.Checkbox(label="A per-layer embedding: average its layers into a plain one (--to-single)",
                                            elem_id="lib-to-single")
                    clip_only = gr.Checkbox(label="Only the CLIP parts (--clip-only)", elem_id="lib-clip-only")
                    convert = gr.Button("Convert", elem_id="lib-convert")
                picture = gr.Image(label="A PNG card's picture (optional)", type="filepath", height=160, elem_id="lib-picture")
                with gr.Column():
                    file = gr.File(label="Converted file", interactive=False, height=110, elem_id="lib-download")
                    card = gr.Image(label="The PNG card", type="filepath", interactive=False, height=200, elem_id="lib-card")
        with gr.Accordion("Scale", open=False):
            with gr.Row():
                factor = gr.Number(label="Factor", value=0.7, elem_id="lib-factor")
                scale_name = gr.Textbox(label="New name", elem_id="lib-scale-name")
                scale = gr.Button("Scale", elem_id="lib-scale")
        with gr.Accordion("Merge", open=False):
            with gr.Row():
                merge_pick = gr.Dropdown(choices=[], multiselect=True, label="Embeddings", elem_id="lib-merge-pick")
                weights = gr.Textbox(label="Weights (e.g. 0.3,0.7; empty: equal)", elem_id="lib-weights")
                concat = gr.Checkbox(label="Concatenate vectors instead", elem_id="lib-concat")
                merge_name = gr.Textbox(label="New name", elem_id="lib-merge-name")
                merge = gr.Button("Merge", elem_id="lib-merge")
    return NS(tab=tab, refresh=refresh, upload=upload, status=status, model=model, family=family, table=table, pick=pick,
              inspect=inspect, delete=delete, info=info, fmt=fmt, to_single=to_single, clip_only=clip_only, picture=picture,
              convert=convert, file=file, card=card, factor=factor, scale_name=scale_name, scale=scale,
              merge_pick=merge_pick, weights=weights, concat=concat, merge_name=merge_name, merge=merge)


def _bias_tab(gr, app: App):
    """textinv bias's options, each as #bias-OPTION (the test of the CLI's option list finds them so)."""
    with gr.Tab("Bias", id="bias"):
        with gr.Row():
            with gr.Column():
                word = gr.Textbox(label="Word", placeholder="doctor (on the mini model: ball)", elem_id="bias-word")
                attribute = gr.Textbox(label="Attribute (NAME=value1,value2,…; on the mini model a name alone, e.g. colour)",
                                       placeholder="gender=man,woman", elem_id="bias-attribute")
                folder = gr.Textbox(label="Curated folder on this machine: re-learn the word from it (per-value: a subfolder "
                                          "per value)", placeholder="/path/to/curated", elem_id="bias-images")
                embedding = gr.Textbox(label="…or existing embedding(s): a file, or a folder of per-value ones (neither: "
                                             "measure only)", placeholder="/path/to/doctor.safetensors", elem_id="bias-embedding")
                recipe = gr.Radio(list(BIAS_RECIPES), value=next(iter(BIAS_RECIPES)), label="Recipe (with a folder)", elem_id="bias-recipe")
                init = gr.Textbox(label="Per-value tokens start from: majority (the value the model draws most for the word), "
                                        "value (each its own) or a word", value="majority", elem_id="bias-init")
            with gr.Column():
                prompts = gr.Textbox(label="Held-out prompts (one a line, the word written {}; empty: the model's defaults)",
                                     lines=4, placeholder="a portrait of a {}", elem_id="bias-prompts")
                with gr.Row():
                    n = gr.Number(label="Images per prompt", value=60, precision=0, minimum=1, elem_id="bias-n")
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="bias-seed")
                    steps = gr.Number(label="Training steps (with a folder)", value=300, precision=0, minimum=1,
                                      elem_id="bias-steps")
                named = gr.Checkbox(label="Also ask for each value by name (\"a woman doctor\"): the baseline, and what the model can draw",
                                    value=False, elem_id="bias-named")
                more = _bias_options(gr, app)
                with gr.Row():
                    go = gr.Button("Measure", variant="primary", elem_id="bias-start")
                    stop = gr.Button("Stop", variant="stop", elem_id="bias-stop", interactive=False)  # while a run goes
        status = gr.Textbox(label="Status", interactive=False, lines=6, elem_id="bias-status", elem_classes="status")
        table = gr.Textbox(label="Before → after (pooled per prompt group)", interactive=False, lines=8, elem_id="bias-table")
        with gr.Row():
            chart = gr.Image(label="Distribution before and after", type="filepath", interactive=False, elem_id="bias-chart")
            files = gr.File(label="bias.json, report.html", file_count="multiple", interactive=False, height=150,
                            elem_id="bias-files")
        per_prompt = gr.Dataframe(headers=BIAS_HEADERS, interactive=False, wrap=True, label="Per prompt (as in report.html)",
                                  elem_id="bias-report")
    return NS(inputs=[word, attribute, folder, embedding, prompts, recipe, n, seed, steps, named, init, *more.values()],
              options=list(more), go=go, stop=stop, status=status, outputs=[status, table, chart, files, per_prompt, stop])


def _bias_options(gr, app: App) -> dict:
    """The Bias tab's folded options: textinv bias's --templates, --clip, --timesteps, --guidance, --vectors, --pack."""
    with gr.Accordion("More options", open=False, elem_id="bias-more"):
        return dict(
            templates=gr.Textbox(label="Training templates: object, style or a file (their prompts are the training group)",
                                 placeholder="object", elem_id="bias-templates"),
            clip=gr.Textbox(label="CLIP weights for the zero-shot classifier (folder or hub id; real models)",
                            value=app.clip or "", placeholder="openai/clip-vit-base-patch32", elem_id="bias-clip"),
            timesteps=gr.Textbox(label="Training noise levels LOW:HIGH (empty: the recipe's, all / 300:1000)",
                                 placeholder="300:1000", elem_id="bias-timesteps"),
            guidance=gr.Textbox(label="Training guidance (empty: the recipe's, 1 / 1.5)", placeholder="1.5",
                                elem_id="bias-guidance"),
            vectors=gr.Number(label="Vectors per token", value=1, precision=0, minimum=1, elem_id="bias-vectors"),
            pack=gr.Number(label="Per-value tokens trained at a time in one batch (more: faster, more memory)", value=1,
                           precision=0, minimum=1, elem_id="bias-pack"))


def _train_handlers(gr, app: App, page: _Page, t, gen) -> None:
    t.live = [t.status, t.plot, t.previews, gen.embs, t.stop]  # what following a run updates (_follow)

    def on_images(paths):
        good, bad = app.check_images(paths)
        page.warn(bad)
        if not paths:
            return ""
        return "\n".join([f"{len(good)} usable image{'s' if len(good) != 1 else ''}"] + [f"skipped {m}" for m in bad])

    def started(begin):
        """A handler that starts a run (``begin()``) and follows it; a refusal is one line, the Stop button as it was."""
        def run(*args):
            try:
                job = begin(*args)
            except Exception as e:  # noqa: BLE001 - every error is a message in the page
                msg = describe_error(e)
                page.warn([msg])
                yield f"Error: {msg}", gr.skip(), gr.skip(), gr.skip(), gr.skip()  # Stop as it was: a run may be going
                return
            yield from _follow(gr, page, job)
        return run

    on_start = started(lambda paths, folder, *values: app.start_training(paths, folder, **dict(zip(t.names, values))))
    t.images.change(on_images, t.images, t.check)
    # no queue limit: a second start while a run goes (from this page or another browser) is refused at once by the
    # App, not queued behind the run; the status line is the progress: no animation to repaint for minutes
    t.start.click(on_start, t.settings, t.live, concurrency_limit=None, show_progress="hidden")
    t.resume.click(started(lambda: app.resume_training()), None, t.live, concurrency_limit=None, show_progress="hidden")
    t.stop.click(app.stop_training, None, t.status, concurrency_limit=None)
    t.export.click(page.guarded(lambda fmt: str(app.export(fmt)), lambda msg: None), t.fmt, t.file)


def _follow_any(gr, page: _Page, job: TrainJob | None):
    """A newly opened page: the App's run (going or ended), followed as the page that started it follows it."""
    if job is None:
        yield "", gr.skip(), gr.skip(), gr.skip(), gr.update(interactive=False)
        return
    yield from _follow(gr, page, job)


def _follow(gr, page: _Page, job: TrainJob):
    """A running training job, once a second: status (with its ETA), the loss and evaluation-loss
    plot, previews (each sent only when changed), and the Stop button, usable while the job runs."""
    shown = len(job.warnings)  # the skipped images were already reported on upload
    plotted = previews = -1
    while True:
        alive = job.running
        if len(job.warnings) > shown:
            page.warn(job.warnings[shown:])
            shown = len(job.warnings)
        notes = "".join(f"\nwarning: {w}" for w in job.warnings)
        plot = page.loss_frame(job) if len(job.losses) != plotted else gr.skip()
        grids = page.gallery(job)
        shown_grids = grids if len(grids) != previews else gr.skip()
        plotted, previews = len(job.losses), len(grids)
        yield job.status() + notes, plot, shown_grids, gr.skip(), gr.update(interactive=alive)
        if not alive:
            break
        time.sleep(1.0)
    stop = gr.update(interactive=False)
    if job.error:
        page.warn([job.error])
        yield job.status(), gr.skip(), gr.skip(), gr.skip(), stop
    else:
        yield job.status(), page.loss_frame(job), page.gallery(job), gr.update(choices=page.library_choices()), stop


def _bias_handlers(gr, app: App, page: _Page, b) -> None:
    def on_measure(word, attribute, folder, embedding, prompts, recipe, n, seed, steps, named, init, *more):
        try:
            job = app.start_bias(word, attribute, folder, embedding, prompts, recipe=recipe, n=n, seed=seed, steps=steps,
                                 named=bool(named), init=init, **dict(zip(b.options, more)))
        except Exception as e:  # noqa: BLE001 - every error is a message in the page
            msg = describe_error(e)
            page.warn([msg])
            yield f"Error: {msg}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        yield from _follow_bias(gr, page, job)

    # no queue limit: a second click while a run goes is refused at once by the App, not queued behind the run
    b.go.click(on_measure, b.inputs, b.outputs, concurrency_limit=None, show_progress="hidden")
    b.stop.click(app.stop_bias, None, b.status, concurrency_limit=None)


def _follow_any_bias(gr, page: _Page, job: BiasJob | None):
    """A newly opened page: the App's bias run, followed; its results once it has ended."""
    if job is None:
        yield "", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.update(interactive=False)
        return
    yield from _follow_bias(gr, page, job)


def _follow_bias(gr, page: _Page, job: BiasJob):
    """A running bias job, once a second: its status and the Stop button; when done, the table, the chart,
    the files and the per-prompt table; when stopped, one line saying what the folder keeps."""
    shown = 0
    yield job.status(), "", None, None, None, gr.update(interactive=job.running)  # the last run's results leave the page
    while True:
        alive = job.running
        if len(job.warnings) > shown:
            page.warn(job.warnings[shown:])
            shown = len(job.warnings)
        if not alive:
            break
        time.sleep(1.0)
        yield job.status(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.update(interactive=True)
    stop = gr.update(interactive=False)
    if job.error or job.stopped:
        if job.error:
            page.warn([job.error])
        yield job.status(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), stop
        return
    paths = job.paths()
    chart = str(paths["chart"]) if "chart" in paths else None
    files = [str(paths[k]) for k in ("json", "report") if k in paths]
    yield job.status(), job.table(), chart, files, page.pd.DataFrame(job.prompt_rows(), columns=BIAS_HEADERS), stop


def _generate_handlers(gr, app: App, page: _Page, g) -> None:
    def on_generate(prompt, negative, picked, seed, steps, n, sampler, cfg, clip_skip):
        result, notes = app.generate(prompt, negative, picked, seed=seed, sampler=sampler, steps=steps, n=n,
                                     guidance=float(cfg or 0) or None, clip_skip=clip_skip)
        page.warn(notes)
        files = [str(p) for p in result.files]
        shown = ([(str(result.grid), "grid")] if result.grid else []) + [(f, f"seed {s}") for f, s in zip(files, result.seeds)]
        used = ", ".join(result.used) or "none"
        status = "\n".join([f"{len(files)} image(s) in {app.outputs}; embeddings used: {used}"] + [f"warning: {w}" for w in notes])
        return status, shown, result.parameters[0], files

    g.go.click(page.guarded(on_generate, lambda msg: (msg, gr.skip(), gr.skip(), gr.skip())), g.inputs, g.outputs,
               concurrency_limit=1)
    g.tab.select(lambda: gr.update(choices=page.library_choices()), None, g.embs)


def _model_line(app: App) -> str:
    """The library's heading: the loaded model and its family, so that which embeddings fit is seen at once."""
    try:
        family = app.model_family()
    except TextinvError as e:
        return f"Model **{html.escape(app.model_name)}** ({html.escape(str(e))})"
    return (f"Model **{html.escape(app.model_name)}**, family **{html.escape(family)}**: embeddings of another family do "
            f"not fit it (Show: {FITS_MODEL})")


def _library_handlers(gr, app: App, page: _Page, lib, gen, demo) -> None:
    outputs = [lib.status, lib.table, lib.pick, lib.merge_pick, gen.embs, lib.model, lib.family]
    failed = lambda msg: (msg,) + (gr.skip(),) * (len(outputs) - 1)  # noqa: E731

    def refresh(message: str = ""):
        rows, notes = app.rows()
        choices = page.library_choices()
        text = "\n".join(filter(None, [message, f"{len(rows)} embedding(s) in {app.library}"] + notes))
        return (text, page.pd.DataFrame(rows, columns=LIBRARY_HEADERS), gr.update(choices=choices),
                gr.update(choices=choices), gr.update(choices=choices), _model_line(app),
                gr.update(choices=app.family_choices(), value=ALL_FAMILIES))

    def on_family(family):
        rows, _ = app.rows(family)
        return f"{len(rows)} embedding(s) shown ({family})", page.pd.DataFrame(rows, columns=LIBRARY_HEADERS)

    def on_upload(paths):
        if not paths:
            return (gr.skip(),) * (len(outputs) + 1)
        added, refused = app.add_files(paths)
        page.warn(refused)
        return *refresh("\n".join(added + refused)), None  # an empty drop zone, ready for the next file

    def then_refresh(fn):
        return page.guarded(lambda *a: refresh(fn(*a)), failed)

    def on_convert(key, fmt, to_single, clip_only, picture):
        with collecting() as notes:  # what a format leaves out, what averaging the layers loses
            path = app.convert(key, fmt, to_single=bool(to_single), clip_only=bool(clip_only), preview=picture or None)
        page.warn(notes)
        card = str(path) if fmt == "png" else None  # the A1111 card as it will look
        return str(path), "\n".join([f"converted to {fmt}: {path.name}"] + [f"note: {n}" for n in notes]), card

    shown_refresh = page.guarded(lambda: refresh(), failed)
    lib.refresh.click(shown_refresh, None, outputs)
    lib.tab.select(shown_refresh, None, outputs)
    lib.upload.upload(page.guarded(on_upload, lambda msg: failed(msg) + (None,)), lib.upload, outputs + [lib.upload])
    lib.inspect.click(page.guarded(app.inspect, lambda msg: msg), lib.pick, lib.info)
    lib.delete.click(then_refresh(app.delete), lib.pick, outputs)
    lib.scale.click(then_refresh(lambda k, f, n: f"wrote {app.scale(k, f, n).name}"), [lib.pick, lib.factor, lib.scale_name],
                    outputs)
    lib.merge.click(then_refresh(lambda ks, w, c, n: f"wrote {app.merge(ks, w, c, n).name}"),
                    [lib.merge_pick, lib.weights, lib.concat, lib.merge_name], outputs)
    lib.convert.click(page.guarded(on_convert, lambda msg: (None, msg, None)),
                      [lib.pick, lib.fmt, lib.to_single, lib.clip_only, lib.picture], [lib.file, lib.status, lib.card])
    lib.family.input(page.guarded(on_family, lambda msg: (msg, gr.skip())), lib.family, [lib.status, lib.table])
    demo.load(shown_refresh, None, outputs)


def launch(library=None, model=None, *, workdir=None, model_config=None, port: int = 7860,
           max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB, open_browser: bool = False, block: bool = True, clip: str | None = None):
    """Start the app on 127.0.0.1; returns (demo, url).  ``block=False`` returns at once (tests).
    ``clip``: the CLIP weights the Bias tab and measured saves use (textinv ui --clip)."""
    install_warning_router()
    app = App(library, model, workdir=workdir, model_config=model_config, clip=clip)
    demo = build(app)
    _, url, _ = demo.launch(server_name=HOST, server_port=port, share=False, inbrowser=open_browser,
                            prevent_thread_lock=True, quiet=True, max_file_size=f"{int(max_upload_mb)}mb",
                            allowed_paths=[str(app.library), str(app.workdir)], show_error=True, ssr_mode=False,
                            css=CSS)
    demo.textinv_app = app
    print(f"textinv ui: {url} (model {app.model_name}, library {app.library}); Ctrl+C stops it", file=sys.stderr)
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            app.close()
            demo.close()
    return demo, url
