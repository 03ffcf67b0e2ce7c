"""benchmarks/train_speed.py --arch: the architectures as released, and a toy-width build that trains.

The full-size networks are only ever built on the meta device here (no memory, no time): their
parameter counts pin every width, depth and head layout against the released checkpoints'."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


def _load_benchmark():
    """benchmarks/ is not a package: import the script by its path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"
    spec = importlib.util.spec_from_file_location("train_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()

# Parameters per network of the released checkpoints (SD 1.5, SD 2.1, SDXL base 1.0), as their
# diffusers folders load: the UNets' well-known totals, the shared KL VAE, CLIP ViT-L/14's text
# tower, OpenCLIP ViT-H's text tower less its last block, OpenCLIP bigG's with its projection.
RELEASED = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


def cross_attention_layers(cfg: dict) -> int:
    with torch.device("meta"):
        unet = bench.build("unet", cfg["unet"])
    return sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))


@pytest.mark.parametrize("arch", bench.ARCHS)
def test_full_size_configs_have_the_released_parameter_counts(arch):
    assert bench.parameter_counts(bench.arch_config(arch)) == RELEASED[arch]


def test_full_size_configs_carry_each_release_s_conditioning():
    sd15, sd21, sdxl = (bench.arch_config(a) for a in ("sd15", "sd21", "sdxl"))
    assert cross_attention_layers(sd15) == 16 and sd15["unet"]["cross_attention_dim"] == 768
    assert sd15["text_encoder"]["hidden_act"] == "quick_gelu" and sd15["text_encoder"]["eos_token_id"] == 2
    assert sd15["scheduler"]["prediction_type"] == "epsilon" and sd15["vae"]["scaling_factor"] == 0.18215

    assert cross_attention_layers(sd21) == 16 and sd21["unet"]["cross_attention_dim"] == 1024
    assert sd21["scheduler"]["prediction_type"] == "v_prediction" and sd21["unet"]["use_linear_projection"]
    assert (sd21["text_encoder"]["hidden_size"], sd21["text_encoder"]["num_hidden_layers"]) == (1024, 23)
    assert sd21["tokenizer"]["pad_token"] == "!"

    widths = [sdxl[name]["hidden_size"] for name in ("text_encoder", "text_encoder_2")]
    assert widths == [768, 1280] and sdxl["unet"]["cross_attention_dim"] == 2048 == sum(widths)
    assert cross_attention_layers(sdxl) == 70  # down 2x2 + 2x10, mid 10, up 3x10 + 3x2
    assert sdxl["unet"]["projection_class_embeddings_input_dim"] == 6 * 256 + sdxl["text_encoder_2"]["projection_dim"]
    assert sdxl["vae"]["scaling_factor"] == 0.13025 and sdxl["vae"]["force_upcast"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return bench.synthetic_images(tmp_path_factory.mktemp("bench-images"), n=2)


@pytest.mark.parametrize("arch,loops", [("sd15", ["textinv"]), ("sd21", ["textinv"]),
                                        ("sdxl", ["textinv", "reference", "floor"])])
def test_a_tiny_build_of_each_arch_trains_in_the_benchmark_loops(tmp_path, images, arch, loops):
    cfg = bench.arch_config(arch)
    model = bench.save_arch(bench.tiny(cfg), tmp_path / "model")
    index = json.loads((model / "model_index.json").read_text())
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == cfg["pipeline"]
    assert scheduler["prediction_type"] == cfg["scheduler"]["prediction_type"]
    # textinv.train loads the folder through textinv's own path (load_pipeline), as it would a real model
    run = bench.Run(model=str(model), images=str(images), out=str(tmp_path / "runs"), device="cpu", steps=2, warmup=1,
                    batch=1, resolution=None)
    for kind in loops:
        result = bench.measure(kind, run, "fp32")
        assert "error" not in result, result
        assert result["s_step"] > 0
