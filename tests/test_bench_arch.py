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
from transformers import T5Config

from tiny_flow import REAL_FLUX, REAL_FLUX_SIZES, REAL_SD3, REAL_SD3_SIZES, REAL_T5_TOKENIZER


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
    # SD3 medium and FLUX.1-dev (diffusers folders).  Confirmed from the released files' own indexes
    # (the copies in lllyasviel/stable-diffusion-webui-forge, backend/huggingface/):
    # * FLUX.1-dev transformer: transformer/diffusion_pytorch_model.safetensors.index.json says
    #   total_size 23,802,816,640 bytes of bf16 = 11,901,408,320 parameters;
    # * T5-XXL encoder (SD3's text_encoder_3, Flux's text_encoder_2, the same network):
    #   SD3 medium's text_encoder_3/model.safetensors.index.fp16.json, 9,524,621,312 bytes of fp16
    #   = 4,762,310,656 (the 32,128-row table counted once).
    # What the configs give, not confirmed from a Stability/BFL file here (no index for single-file
    # parts): SD3's transformer 2,028,328,000 (released as "2B"; a third-party profile of the
    # released transformer prints the same count), the 16-channel VAE 83,819,683 (third-party
    # tensor-by-tensor counts of FLUX.1's VAE agree), CLIP-L with its 768x768 projection
    # 123,650,304 (SD 1.5's 123,060,480 + 589,824) and CLIP-G 694,659,840 (SDXL's, the same config).
    "sd3": {"transformer": 2_028_328_000, "vae": 83_819_683, "text_encoder": 123_650_304,
            "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656},
    "flux": {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
             "text_encoder_2": 4_762_310_656},
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


def test_flow_configs_carry_the_released_facts():
    sd3, flux = bench.arch_config("sd3"), bench.arch_config("flux")
    # the values tests/tiny_flow.py checked against the released files, as the benchmark copied them
    for cfg, real in ((sd3, REAL_SD3), (flux, REAL_FLUX)):
        for part in ("vae", "transformer", "scheduler", "text_encoder"):
            assert {k: cfg[part][k] for k in real[part]} == real[part], part
        t5 = bench.t5_part(cfg)
        built = T5Config(**{k: v for k, v in cfg[t5].items() if k != "_class_name"})
        assert {k: getattr(built, k) for k in real[t5]} == real[t5]
        # T5-XXL attends everywhere: its width is the transformer's joint attention width; the table has
        # the real 32,128 rows (what the reference recipe trains) for a tokenizer of 32,100 entries
        assert cfg[t5]["d_model"] == cfg["transformer"]["joint_attention_dim"] == 4096
        assert cfg[t5]["vocab_size"] == 32128 and bench.T5_ENTRIES == REAL_T5_TOKENIZER["entries"] == 32100
        assert cfg["vae"]["latent_channels"] == 16 and cfg["scheduler"]["shift"] == 3.0
    clip_l, clip_g = sd3["text_encoder"], sd3["text_encoder_2"]
    assert sd3["transformer"]["pooled_projection_dim"] == clip_l["projection_dim"] + clip_g["projection_dim"]
    assert sd3["transformer"]["pooled_projection_dim"] == REAL_SD3_SIZES["pooled_projection_dim"] == 2048
    heads, width = sd3["transformer"]["num_attention_heads"], sd3["transformer"]["attention_head_dim"]
    assert sd3["transformer"]["caption_projection_dim"] == heads * width == REAL_SD3_SIZES["caption_projection_dim"]
    assert (sd3["vae"]["scaling_factor"], sd3["vae"]["shift_factor"]) == (1.5305, 0.0609)
    assert flux["transformer"]["pooled_projection_dim"] == flux["text_encoder"]["hidden_size"] == 768
    assert flux["transformer"]["in_channels"] == 4 * flux["vae"]["latent_channels"] == REAL_FLUX_SIZES["in_channels"]
    assert sum(flux["transformer"]["axes_dims_rope"]) == flux["transformer"]["attention_head_dim"] == 128
    assert (flux["transformer"]["num_layers"], flux["transformer"]["num_single_layers"]) == (19, 38)
    assert (flux["vae"]["scaling_factor"], flux["vae"]["shift_factor"]) == (0.3611, 0.1159)


@pytest.mark.parametrize("arch,kept", [
    ("flux", "flux: 2 of 19 double blocks, 4 of 38 single, T5 4 of 24 layers — the full model does not fit 24 GB"),
    ("sd3", "sd3: 6 of 24 joint blocks, T5 4 of 24 layers — the full model does not fit 24 GB"),
])
def test_a_cpu_run_says_first_which_blocks_it_left_out(monkeypatch, capsys, arch, kept):
    def stop(*_):  # where the (9 GB) build would start: main stops as at a time limit
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "build_model", stop)
    for global_setting in ("signal.signal", "diffusers.utils.logging.set_verbosity_error",
                           "transformers.utils.logging.disable_progress_bar"):  # main's, for this process
        monkeypatch.setattr(global_setting, lambda *_: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    assert bench.main(["--arch", arch, "--device", "cpu"]) == 130
    assert capsys.readouterr().out.splitlines()[0].startswith(kept)
    cfg, left_out = bench.arch_plan(bench.parse_args(["--arch", arch, "--device", "cpu"]))
    assert sum(bench.parameter_counts(cfg).values()) * 4 < 10 * 2**30  # fp32 weights under 10 GiB
    assert bench.arch_plan(bench.parse_args(["--arch", arch, "--device", "cuda"]))[1] is None  # CUDA: all of it
    full, left_out = bench.arch_plan(bench.parse_args(["--arch", arch, "--device", "cpu", "--blocks", "99",
                                                       "--t5-layers", "24"]))
    assert left_out is None and bench.parameter_counts(full) == RELEASED[arch]


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


@pytest.mark.parametrize("arch", bench.FLOW_ARCHS)
def test_a_tiny_flow_build_gives_a_row_for_each_loop(tmp_path, images, arch):
    """SD3/Flux.1 through textinv, the diffusers-script reference and the floor (in this process)."""
    cfg = bench.arch_config(arch)
    model = bench.save_arch(bench.tiny(cfg), tmp_path / "model")
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == cfg["pipeline"] and index[bench.t5_part(cfg)] == ["transformers", "T5EncoderModel"]
    t5_config = json.loads((model / bench.t5_part(cfg) / "config.json").read_text())
    assert t5_config["vocab_size"] == 32128  # the real table, even at toy width
    run = bench.Run(model=str(model), images=str(images), out=str(tmp_path / "runs"), device="cpu", steps=2, warmup=1,
                    batch=1, resolution=64)
    lines = bench.benchmark(arch, run, ["fp32"], isolate=False)
    assert [line.split()[:3] for line in lines] == [[arch, "fp32", kind] for kind in bench.LOOPS]
    assert not any("failed" in line for line in lines), lines
    assert all(float(line.split()[3]) > 0 for line in lines)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_the_floors_input_vector_gets_a_gradient_through_every_encoder(kind):
    """T5 looks its tokens up in a module of its own that shares the input table's weight: the
    floor's vector must be added there too, or the floor skips T5's backward pass."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    te = (T5EncoderModel(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)) if kind == "t5"
          else CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, vocab_size=50, max_position_embeddings=8)))
    (vector,), hooks = bench.input_vectors([te], "cpu")
    te(torch.tensor([[1, 2, 3]]))[0].square().sum().backward()
    for h in hooks:
        h.remove()
    assert vector.grad is not None and float(vector.grad.abs().sum()) > 0
