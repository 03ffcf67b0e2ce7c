"""Shared test fixtures: tiny random Stable Diffusion pipelines with the real CLIP tokenizer.

Nothing here touches the network: every model is built from a config with random weights.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist each worker gets its share of the cores: torch's default (a thread per core in
# every worker) oversubscribes them and its threads then spin against each other.  Set before torch
# is imported, and inherited by the commands tests run in subprocesses.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

import numpy as np
import pytest
import torch
from PIL import Image

from textinv.models import MINI_PATH

TOKENIZER = MINI_PATH / "tokenizer"


@pytest.fixture(scope="session", autouse=True)
def _own_latent_cache(tmp_path_factory):
    """The suite's cached latents go to a temporary folder, not the user's ~/.cache/textinv."""
    saved = os.environ.get("TEXTINV_CACHE")
    os.environ["TEXTINV_CACHE"] = str(tmp_path_factory.mktemp("textinv-cache"))
    yield
    if saved is None:
        os.environ.pop("TEXTINV_CACHE", None)
    else:
        os.environ["TEXTINV_CACHE"] = saved


FIXTURES = Path(__file__).resolve().parent / "fixtures"  # real files other tools wrote; see its README


def red_blocks(folder: Path, n: int = 3, size: tuple[int, int] = (32, 32), name: str = "{i:02d}.png") -> Path:
    """``n`` pictures of a red block on light grey, each shorter and further right: views of one
    small concept for tests that train a few steps.  No picture equals another or any one's mirror
    image (the latent cache would share their entries).  ``name`` may carry a caption."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n):
        a = np.full((h, w, 3), 230, np.uint8)
        a[6:h - 6 - 2 * i, 2 + 4 * i:w // 2 + 4 * i] = (200, 30, 30)
        Image.fromarray(a).save(folder / name.format(i=i))
    return folder


def tokenizer(pad: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER, pad_token=pad)


# The token ids real checkpoints' text encoder configs carry: SD 1.5, SD 2.x and SDXL base 1.0 say
# bos 0, eos 2, pad 1 (legacy values; transformers then pools at argmax(input_ids)); configs written
# since transformers' fix carry the tokenizer's real ids.
LEGACY_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
FIXED_IDS = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def text_encoder(width: int, projection: bool = False, seed: int = 0, legacy: bool = True, layers: int = 2,
                 hidden_act: str = "quick_gelu"):
    """A tiny CLIP text encoder; ``hidden_act`` is CLIP-L's quick_gelu unless given (CLIP-G's is gelu)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width, hidden_act=hidden_act,
        **(LEGACY_IDS if legacy else FIXED_IDS),
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return model.eval()


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )


def make_sd(width: int = 32, legacy: bool = True):
    """A tiny SD 1.x-shaped pipeline; ``width`` 768 / 1024 mimics SD 1.x / SD 2.x text encoders."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, attention_head_dim=4, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder(width, legacy=legacy), tokenizer=tokenizer(), unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl(width_l: int = 32, width_g: int = 48, legacy: bool = True):
    """A tiny SDXL pipeline configured like SDXL base 1.0: legacy encoder ids, tokenizer_2 pads with "!"."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    time_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_dim + width_g, cross_attention_dim=width_l + width_g,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=text_encoder(width_l, legacy=legacy),
        text_encoder_2=text_encoder(width_g, projection=True, seed=1, legacy=legacy),
        tokenizer=tokenizer(), tokenizer_2=tokenizer(pad="!"), unet=unet, scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_pipe():
    return make_sd()


@pytest.fixture
def sdxl_pipe():
    return make_sdxl()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Every test that uses ``demo_word`` (or ``flow_word``) joins one xdist group: one worker trains
    the word, once; and the longest tests go first."""
    for item in items:
        for word in ("demo_word", "flow_word"):
            if word in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(word))
    # The longest tests first (slow: learning, a minute or two; long: ten seconds or more): pytest-xdist
    # hands out one test at a time, so the quick ones then even out the workers' loads, and no worker
    # starts a long test while the other has nothing left.  Stable: otherwise collection order.
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, item.get_closest_marker("long") is None))


@pytest.fixture(scope="session")
def demo_word(tmp_path_factory):
    """One word learned on the built-in model with the demo's settings (concept "drop", seed 0), shared
    by every learning test: the training runs once per session (its tests share one
    pytest-xdist worker: see pytest_collection_modifyitems).  Its trigger is ``<t>``."""
    from types import SimpleNamespace

    from textinv.demo import INIT_WORD, DemoSettings, render_training_set, world_templates
    from textinv.models import load_pipeline
    from textinv.training import train

    root = tmp_path_factory.mktemp("demo-word")
    concept, s = "drop", DemoSettings()
    render_training_set(concept, root / "images", seed=0, captions=s.captions)
    result = train(images=str(root / "images"), token="<t>", init=INIT_WORD, vectors=s.vectors, lr=s.lr, batch=s.batch,
                   steps=s.steps, templates=str(world_templates(root, captions=s.captions)), flip=False, seed=0,
                   out=str(root / "run"), pipe=load_pipeline(), progress=False)
    return SimpleNamespace(concept=concept, images=root / "images", path=result.embedding_path, init=INIT_WORD)


@pytest.fixture(scope="session")
def flow_word(tmp_path_factory):
    """``demo_word`` on the built-in Flux.1-shaped model (mini-flow), with its own demo settings (its
    textinv.json): concept "drop", seed 0, trigger ``<t>``; trained once per session."""
    from types import SimpleNamespace

    from textinv.demo import INIT_WORD, DemoSettings, render_training_set, world_templates
    from textinv.models import load_pipeline
    from textinv.training import train

    root = tmp_path_factory.mktemp("flow-word")
    concept, s = "drop", DemoSettings.for_model("mini-flow")
    render_training_set(concept, root / "images", seed=0, captions=s.captions)
    result = train(images=str(root / "images"), token="<t>", init=INIT_WORD, vectors=s.vectors, lr=s.lr, lr_t5=s.lr_t5,
                   encoders=s.encoders, batch=s.batch, steps=s.steps, templates=str(world_templates(root, captions=s.captions)),
                   flip=False, seed=0, out=str(root / "run"), pipe=load_pipeline("mini-flow"), progress=False)
    return SimpleNamespace(concept=concept, images=root / "images", path=result.embedding_path, init=INIT_WORD,
                           steps=result.steps)


@pytest.fixture
def real_files():
    """The folder of real embedding files written by other tools (A1111, diffusers' script, the wild)."""
    return FIXTURES


class Touch:
    """A pickle payload that, if ever unpickled, creates ``marker`` (via os.system, exec or Path.touch)."""

    def __init__(self, how: str, marker):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "exec":
            return (exec, (f"open({self.marker!r}, 'w').close()",))
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def malicious_pt(path: Path, marker: Path, how: str = "system", zipfile: bool = True) -> Path:
    """An A1111-shaped .pt whose ``name`` is a :class:`Touch` payload."""
    payload = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(1, 768)}, "name": Touch(how, marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=zipfile)
    return path


@contextlib.contextmanager
def one_thread():
    """Torch on one thread here, as in each process :func:`launch` starts: a CPU's sums can depend on
    its thread count, so a reference made in the test's own process must match theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def launch(command: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``textinv COMMAND ARGS`` as `accelerate launch` / torchrun runs it on ``processes`` GPUs, here
    CPU processes (gloo), one torch thread each, offline; ``processes=1``: the plain command, run
    alike (a reference the launched one must match)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*(launcher if processes > 1 else [sys.executable]), "-m", "textinv", command, *args]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300)


def torchrun_train(*args: str, command: str = "train") -> subprocess.CompletedProcess:
    """``textinv train ARGS`` (or another ``command``) on two CPU processes: :func:`launch`."""
    return launch(command, *args)
