"""Fuzzing the embedding readers with Hypothesis: whatever the bytes, a loaded embedding or our
one-line error — never another exception, never a crash.

Run by tests/test_hostile.py in a subprocess (a crash there fails the test instead of killing
the test run); by hand: ``python tests/fuzz_formats.py [--profile ci|long]``.  It prints one JSON
line: examples run per property, outcomes, seconds.

* mutated and truncated versions of valid files in every format textinv reads (diffusers,
  A1111 .pt zip and legacy pickle, kohya, SDXL, the original paper's ParameterDict, PNG cards;
  SD3 / Flux.1 in every layout: sd3, flux, OneTrainer's with *_out twins, ComfyUI's, LoRA bundles);
* random pickle opcode streams that name only the globals the restricted unpickler allows, as
  a torch zip's data.pkl and as a legacy torch file;
* random SD3 / Flux.1 dicts — the flow keys (t5, t5xxl, clip_l, clip_g, their *_out twins,
  bundle_emb.*) with random shapes, dtypes (float8 and ints included), NaNs and stray keys, as
  safetensors and as torch files: loaded, each vector is one of the file's tensors exactly.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from textinv import formats  # noqa: E402
from textinv.errors import EmbeddingFileError  # noqa: E402
from safetensors.torch import save as safetensors_bytes  # noqa: E402

from textinv.formats import Embedding  # noqa: E402

PROFILES = {"ci": 400, "long": 20000}  # examples per property
OUTCOMES: Counter = Counter()
WORK = Path(tempfile.mkdtemp(prefix="textinv-fuzz-"))


def seeds() -> dict[str, bytes]:
    """One valid file of every format, as bytes (named by the suffix each needs)."""
    g = torch.Generator().manual_seed(0)
    sd = Embedding("seed", {"clip": torch.randn(2, 8, generator=g)}, meta={"step": 3})
    xl = Embedding("seed", {"clip_l": torch.randn(1, 8, generator=g), "clip_g": torch.randn(1, 12, generator=g)})
    xti = Embedding("seed", {"clip": torch.randn(16, 1, 8, generator=g)}, layers=list(formats.SD_LAYERS))
    layered = Embedding("seed", {"clip": torch.randn(3, 2, 8, generator=g)}, layers=["a.attn2", "b.attn2", "c.attn2"])
    sd3 = Embedding("seed", {"clip_l": torch.randn(2, 8, generator=g), "clip_g": torch.randn(2, 12, generator=g),
                             "t5": torch.randn(2, 16, generator=g)})
    twins = Embedding("seed", {"clip_l": torch.randn(1, 8, generator=g), "t5": torch.randn(1, 16, generator=g)},
                      extra={"clip_l_out": torch.randn(1, 8, generator=g), "t5_out": torch.randn(1, 16, generator=g)})
    flux = Embedding("seed", {"clip_l": torch.randn(1, 768, generator=g).half(),  # the real widths, in fp16
                              "t5": torch.randn(1, 4096, generator=g).half()})
    out = {}
    for name, emb, fmt in (("diffusers.safetensors", sd, "diffusers"), ("a1111.pt", sd, "a1111"),
                           ("kohya.safetensors", sd, "kohya"), ("kohya.pt", sd, "kohya"), ("sdxl.safetensors", xl, "sdxl"),
                           ("sdxl.pt", xl, "sdxl"), ("card.png", sd, "png"), ("diffusers.bin", sd, "diffusers"),
                           ("xti.safetensors", xti, "xti"), ("xti.pt", xti, "xti"),
                           ("layers.safetensors", layered, "per-layer"), ("sd3.safetensors", sd3, "sd3"), ("sd3.pt", sd3, "sd3"), ("flux.safetensors", flux, "flux"),
                           ("onetrainer.safetensors", twins, "onetrainer"), ("onetrainer.pt", twins, "onetrainer"),
                           ("comfyui.safetensors", sd3, "comfyui")):
        kwargs = {"preview": Image.new("RGB", (16, 16), (200, 100, 50))} if fmt == "png" else {}
        out[name] = formats.save(emb, WORK / name, fmt, **kwargs).read_bytes()
    buf = io.BytesIO()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(1, 8)}, "name": "x", "step": 1},
               buf, _use_new_zipfile_serialization=False)
    out["legacy.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, 8))})}, buf,
               _use_new_zipfile_serialization=False)
    out["original.pt"] = buf.getvalue()
    bundle = {f"bundle_emb.{n}.{k}": torch.randn(1, w, generator=g)
              for n in ("a", "b") for k, w in (("clip_l", 8), ("t5", 16))}
    out["bundle.safetensors"] = safetensors_bytes({**bundle, "lora_down.weight": torch.randn(2, 4, generator=g)})
    return out


SEEDS = seeds()


def check(name: str, data: bytes) -> None:
    """The property: load() gives an Embedding or raises EmbeddingFileError, nothing else."""
    path = WORK / f"case-{name}"
    path.write_bytes(data)
    try:
        emb = formats.load_all(path)
        OUTCOMES["loaded"] += 1
        for e in emb:
            assert all(torch.isfinite(t.float()).all() for t in e.vectors.values())
    except EmbeddingFileError as err:
        assert "\n" not in str(err), str(err)
        OUTCOMES["refused"] += 1


@st.composite
def mutated(draw):
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "splice"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord("."), ord("R"), ord("b")]))
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        else:
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            j = draw(st.integers(0, len(other) - 1))
            data[i : i + 32] = other[j : j + 32]
    return name, bytes(data)


# --- random pickle programs over the allowed globals -------------------------------------------
GLOBALS = [("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
           ("torch.nn.modules.container", "ParameterDict"), ("torch", "Size"), ("torch", "FloatStorage"),
           ("torch", "HalfStorage"), ("torch", "float16"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
           ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"), ("builtins", "set"), ("torch", "device"),
           ("os", "system"), ("builtins", "eval")]


def _op_int(i):
    return b"J" + struct.pack("<i", i)


@st.composite
def pickle_program(draw):
    """A sequence of opcodes: pushes, containers, globals, calls, BUILD, persistent ids, memo."""
    ops = []
    for _ in range(draw(st.integers(1, 40))):
        k = draw(st.integers(0, 15))
        if k == 0:
            ops.append(_op_int(draw(st.integers(-(2**31), 2**31 - 1))))
        elif k == 1:
            s = draw(st.sampled_from(["*", "storage", "cpu", "0", "V8", "f8", "O", "emb_params", "clip_l", "clip_g",
                                      "string_to_param", "name", "|", "<", "_parameters", "t5", "t5xxl", "t5_out",
                                      "clip_l_out", "bundle_emb.a.t5"]))
            ops.append(b"X" + struct.pack("<I", len(s)) + s.encode())
        elif k == 2:
            b = draw(st.binary(max_size=16))
            ops.append(b"C" + bytes([len(b)]) + b)
        elif k == 3:
            ops.append(draw(st.sampled_from([b"N", b"\x88", b"\x89", b"}", b"]", b")", b"("])))
        elif k == 4:
            ops.append(draw(st.sampled_from([b"t", b"s", b"u", b"a", b"e", b"\x85", b"\x86", b"\x87"])))
        elif k == 5:
            m, n = draw(st.sampled_from(GLOBALS))
            ops.append(b"c" + m.encode() + b"\n" + n.encode() + b"\n")
        elif k == 6:
            ops.append(b"R")  # REDUCE
        elif k == 7:
            ops.append(b"b")  # BUILD
        elif k == 8:
            ops.append(b"Q")  # BINPERSID
        elif k == 9:
            ops.append(b"\x94")  # MEMOIZE
        elif k == 10:
            ops.append(b"h" + bytes([draw(st.integers(0, 4))]))  # BINGET
        elif k == 11:
            ops.append(b"G" + struct.pack(">d", draw(st.floats(allow_nan=True))))
        elif k == 12:
            ops.append(b"\x81")  # NEWOBJ
        elif k == 13:
            ops.append(b"0")  # POP
        elif k == 14:
            ops.append(b"\x8a" + bytes([8]) + draw(st.binary(min_size=8, max_size=8)))  # LONG1
        else:
            ops.append(b"2")  # DUP
    return b"\x80\x03" + b"".join(ops) + b"."


def as_torch_zip(program: bytes, record: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", program)
        z.writestr("archive/data/0", record)
        z.writestr("archive/version", b"3\n")
    return out.getvalue()


def as_legacy(program: bytes) -> bytes:
    import pickle

    head = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    return head + program + pickle.dumps(["0"], protocol=2) + b"\x00" * 64


# --- random SD3 / Flux.1 dicts ------------------------------------------------------------------------
FLOW_KEYS = ["clip_l", "clip_g", "t5", "t5xxl", "clip_l_out", "clip_g_out", "t5_out", "t5xxl_out", "emb_params",
             "string_to_param", "bundle_emb.a.t5", "bundle_emb.a.clip_l", "bundle_emb.a.t5_out", "bundle_emb.b.t5xxl",
             "bundle_emb.x", "lora_down.weight"]
FLOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool,
               torch.float8_e4m3fn, torch.float8_e5m2]


@st.composite
def flow_dict(draw):
    """{flow key: tensor} of random shape (widths 8/16 and the real 768/1280/4096/4097), dtype and values."""
    data = {}
    for key in draw(st.lists(st.sampled_from(FLOW_KEYS), min_size=1, max_size=7, unique=True)):
        shape = draw(st.sampled_from([(1,), (2,), (3,)])) + draw(st.sampled_from([(8,), (16,), (768,), (1280,), (4096,),
                                                                                 (4097,), (2, 8), ()]))
        shape = draw(st.sampled_from([shape, shape[1:], (0, 8), (76, 8)]))
        fill = draw(st.sampled_from([0.5, -1.0, float("nan"), float("inf"), None]))
        t = torch.randn(shape) if fill is None else torch.full(shape, fill)
        data[key] = t.to(draw(st.sampled_from(FLOW_DTYPES)))
    return data


def check_flow(data: dict, as_torch: bool) -> None:
    """The property, and more: every vector and twin loaded is one of the file's tensors, bit for bit."""
    path = WORK / ("flow.pt" if as_torch else "flow.safetensors")
    try:
        torch.save(data, path) if as_torch else path.write_bytes(safetensors_bytes(data))
    except Exception:  # a dict safetensors itself will not write (e.g. shared storage): nothing to read
        return
    check(path.name, path.read_bytes())
    try:
        found = formats.load_all(path)
    except EmbeddingFileError:
        return
    for emb in found:
        for key, t in {**emb.vectors, **emb.extra}.items():
            same = [v for v in data.values()
                    if v.dtype == t.dtype and v.numel() == t.numel() and torch.equal(v.reshape(t.shape), t)]
            assert same, f"{key}: a tensor the file does not hold"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=sorted(PROFILES), default=os.environ.get("TEXTINV_FUZZ", "ci"))
    args = ap.parse_args()
    n = PROFILES[args.profile]
    common = dict(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
    counts = {}
    t0 = time.perf_counter()

    @settings(**common)
    @given(mutated())
    def mutated_files(case):
        name, data = case
        check(name, data)

    @settings(**common)
    @given(pickle_program(), st.binary(max_size=64), st.booleans())
    def pickle_streams(program, record, legacy):
        check("p.pt", as_legacy(program) if legacy else as_torch_zip(program, record))

    @settings(**common)
    @given(flow_dict(), st.booleans())
    def flow_dicts(data, as_torch):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_flow(data, as_torch)
        for w in caught:  # a warning (t5 and t5xxl differ) is one line naming the file
            assert "\n" not in str(w.message) and str(w.message).startswith(str(WORK)), str(w.message)

    for prop in (mutated_files, pickle_streams, flow_dicts):
        before = sum(OUTCOMES.values())
        prop()
        counts[prop.__name__] = sum(OUTCOMES.values()) - before
    print(json.dumps({"profile": args.profile, "examples": counts, "outcomes": dict(OUTCOMES),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    sys.exit(main())
