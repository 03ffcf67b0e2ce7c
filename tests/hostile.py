"""A corpus of hostile and broken embedding files, built here (never downloaded).

``build(folder)`` writes every case and returns ``{file name: words its one-line error must
contain}`` (``None``: the file loads; its output is only checked for escaping).  Each case is
what an attacker or a careless tool could hand a user: forged numpy dtypes (the void scalar that
crashed the interpreter), BUILD on a dtype, tensors reaching outside their storage, storages
larger than the file, compressed and oversized zip entries, float8/float4 tensors, bombs, names
with terminal escape codes, and filesystem oddities (a FIFO, a link to /dev/zero, a folder named
like a file).  ``python tests/hostile.py DIR`` writes the corpus for a look by hand.
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from textinv import formats
from textinv.formats import Embedding


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _bytes(b: bytes) -> bytes:
    return b"C" + bytes([len(b)]) + b  # SHORT_BINBYTES (protocol 3)


def _int(i: int) -> bytes:
    if -(2**31) <= i < 2**31:
        return b"J" + struct.pack("<i", i)  # BININT
    data = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _dict_of(key: str, value: bytes) -> bytes:
    """{key: value, 'string_to_param' absent}: a dict the classifier will look at."""
    return b"}" + _str(key) + value + b"s"


def _legacy_torch_file(pickled_object: bytes, storages: bytes = b"") -> bytes:
    """A legacy (non-zip) torch file: magic, protocol, sys info, the object, storage keys."""
    head = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    return head + b"\x80\x03" + pickled_object + b"." + storages


def _zip_torch_file(pickled_object: bytes, records: dict[str, bytes] | None = None,
                    compress: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compress) as z:
        z.writestr("archive/data.pkl", b"\x80\x03" + pickled_object + b".")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", b"3\n")
    return out.getvalue()


def _persid_storage(key: str, numel: int, storage: str = "FloatStorage", legacy: bool = False) -> bytes:
    """A storage persistent id, as torch writes it, then BINPERSID."""
    fields = [_str("storage"), _op_global("torch", storage), _str(key), _str("cpu"), _int(numel)]
    if legacy:
        fields.append(b"N")  # view_metadata
    return _tuple(*fields) + b"Q"


def _tensor(storage: bytes, offset: int, size: tuple, stride: tuple) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
    return (_op_global("torch._utils", "_rebuild_tensor_v2")
            + _tuple(storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89",
                     _op_global("collections", "OrderedDict") + b")R")
            + b"R")


class _Reduce:
    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    return scalar


def card(name: str, vectors: torch.Tensor, path: Path) -> Path:
    return formats.save(Embedding(name, {"clip": vectors}), path, "png", preview=Image.new("RGB", (64, 64), (90, 60, 30)))


def _safetensors(header: dict, data: bytes) -> bytes:
    """A safetensors file from its header as given (offsets, shapes and dtypes unchecked) and data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def flow_pt(path: Path, payload, key: str = "t5xxl", zipped: bool = True) -> Path:
    """A Flux.1 .pt (clip_l, t5) with ``payload`` pickled under ``key`` — a forbidden global's
    object for the restricted unpickler to refuse (tests/test_hostile.py passes one that would
    create a file)."""
    torch.save({"clip_l": torch.ones(1, 768), "t5": torch.ones(1, 4096), key: payload}, path,
               _use_new_zipfile_serialization=zipped)
    return path


def _flow_cases(folder: Path, write, expect: dict) -> None:
    """SD3 / Flux.1 files (T5 under 't5'/'t5xxl', OneTrainer's *_out twins, LoRA bundles) broken in
    every way a part can be; the real widths where they matter (T5-XXL: 4096)."""
    def put(name: str, tensors: dict, *words: str) -> None:
        save_file(tensors, str(folder / name))
        expect[name] = list(words) or None

    one = dict(clip_l=torch.ones(2, 768), t5=torch.ones(2, 4096))
    put("flow-4096-wide.safetensors", one)  # T5-XXL's width: loads
    put("flow-wider-than-4096.safetensors", {"clip_l": torch.ones(1, 768), "t5": torch.ones(1, 4097)}, "t5:", "width 4097")
    put("flow-5000-vectors.safetensors", {"t5": torch.ones(5000, 16)}, "5000 vectors")
    put("flow-counts-differ.safetensors", {"clip_l": torch.ones(2, 768), "t5": torch.ones(3, 4096)},
        "clip_l has 2 vectors but t5 has 3")
    put("flow-partial-counts-differ.safetensors", {"clip_g": torch.ones(2, 1280), "t5xxl": torch.ones(3, 4096)},
        "clip_g has 2 vectors but t5 has 3")
    put("flow-sd3-counts-differ.safetensors", {**one, "clip_g": torch.ones(1, 1280)}, "vectors but clip_g has 1")
    nan = torch.full((2, 4096), float("nan"))
    put("flow-nan-t5.safetensors", {**one, "t5": nan}, "t5:", "NaN")
    put("flow-nan-t5-and-t5xxl.safetensors", {**one, "t5": nan, "t5xxl": nan.clone()}, "NaN")  # no 'differs' line first
    put("flow-inf-t5_out.safetensors", {**one, "t5_out": torch.full((2, 4096), float("inf"))}, "t5_out:", "infinite")
    put("flow-int-t5.safetensors", {**one, "t5": torch.ones(2, 4096, dtype=torch.int32)}, "int32", "not floating point")
    put("flow-int-t5xxl.safetensors", {"clip_l": one["clip_l"], "t5xxl": torch.ones(2, 4096, dtype=torch.int64)},
        "t5xxl:", "int64")
    put("flow-float8-t5xxl.safetensors", {**one, "t5xxl": torch.zeros(2, 4096, dtype=torch.float8_e4m3fn)},
        "float8_e4m3fn")
    put("flow-float8-t5_out.safetensors", {**one, "t5_out": torch.zeros(2, 4096, dtype=torch.float8_e5m2)},
        "t5_out:", "float8_e5m2")
    put("flow-int-clip_l_out.safetensors", {**one, "clip_l_out": torch.ones(2, 768, dtype=torch.int16)},
        "clip_l_out:", "int16")
    put("flow-twin-other-shape.safetensors", {**one, "t5_out": torch.ones(3, 4096)},
        "t5_out is (3, 4096) but its part t5 is (2, 4096)")
    put("flow-twin-other-width.safetensors", {**one, "clip_l_out": torch.ones(2, 1280)}, "clip_l_out is (2, 1280)")
    put("flow-twin-of-no-part.safetensors", {**one, "clip_g_out": torch.ones(2, 1280)}, "1 other tensor (clip_g_out)")
    put("flow-unknown-tensor.safetensors", {**one, "lora_te_text_model.lora_up.weight": torch.ones(4, 4)},
        "holds a T5 part and 1 other tensor")
    put("flow-5000-other-tensors.safetensors", {**one, **{f"x.{i:04d}": torch.ones(1) for i in range(5000)}},
        "holds a T5 part and 5000 other tensors (x.0000, x.0001, x.0002, x.0003, ...)")
    many = {f"bundle_emb.e{i:04d}.{k}": torch.ones(1, w) * i for i in range(3000) for k, w in (("clip_l", 8), ("t5", 16))}
    many["bundle_emb.e2999.t5"] = torch.full((1, 16), float("nan"))
    put("flow-bundle-3000-embeddings.safetensors", many, "bundled 'e2999'", "NaN")  # every one read, the last refused

    # headers and bytes of a flow file
    good = (folder / "flow-4096-wide.safetensors").read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    write("flow-header-truncated.safetensors", good[:40], "truncated safetensors")
    write("flow-data-truncated.safetensors", good[: 8 + n + 100], "corrupt or truncated safetensors")
    write("flow-header-corrupt.safetensors", good[:8] + good[8 : 8 + n].replace(b'"t5"', b'"t5\x00', 1) + good[8 + n :],
          "corrupt or truncated safetensors")
    f32 = {"dtype": "F32", "shape": [1, 768], "data_offsets": [0, 3072]}
    write("flow-header-overlapping.safetensors", _safetensors(
        {"clip_l": f32, "t5": {"dtype": "F32", "shape": [1, 4096], "data_offsets": [0, 16384]}}, b"\0" * 16384),
        "safetensors")
    write("flow-header-shape-past-data.safetensors", _safetensors(
        {"clip_l": f32, "t5": {"dtype": "F32", "shape": [75, 4096], "data_offsets": [3072, 19456]}}, b"\0" * 19456),
        "safetensors")
    write("flow-header-unknown-dtype.safetensors", _safetensors(
        {"clip_l": f32, "t5": {"dtype": "Q9", "shape": [1, 4], "data_offsets": [3072, 3088]}}, b"\0" * 3088), "safetensors")
    write("flow-header-metadata-not-text.safetensors", _safetensors(
        {"__metadata__": {"textinv.step": 5}, "clip_l": f32,
         "t5": {"dtype": "F32", "shape": [1, 4], "data_offsets": [3072, 3088]}}, b"\0" * 3088), "safetensors")

    # pickled flow files: forbidden globals, tensors reaching outside their storage
    flow_pt(folder / "flow-forbidden-global.pt", _Reduce(eval, ("0",)))
    expect["flow-forbidden-global.pt"] = ["never allowed"]
    flow_pt(folder / "flow-forbidden-global-legacy.pt", _Reduce(getattr, ("abc", "upper")), key="t5_out", zipped=False)
    expect["flow-forbidden-global-legacy.pt"] = ["never allowed"]
    write("flow-t5-past-its-storage.pt", _zip_torch_file(
        _dict_of("t5", _tensor(_persid_storage("0", 4), 0, (75, 4096), (4096, 1))), {"0": struct.pack("<4f", 1, 2, 3, 4)}),
        "reaching element", "never allowed")
    write("flow-legacy-t5-storage-bomb.pt", _legacy_torch_file(
        _dict_of("t5xxl", _tensor(_persid_storage("0", 10**11, legacy=True), 0, (1, 4096), (4096, 1)))),
        "bytes, but the file holds")


def build(folder: Path) -> dict[str, list[str] | None]:
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, list[str] | None] = {}

    def write(name: str, data: bytes, *words: str) -> None:
        (folder / name).write_bytes(data)
        expect[name] = list(words)

    # -- forged numpy dtypes and scalars (the crash) --------------------------------------
    # dtype('V8'), then BUILD gives it an object field (flags 0, so numpy does not ask for an array),
    # then a scalar of it from 8 bytes: an object pointer the file chose.  Reading that scalar's
    # value crashed the interpreter (segfault) before the unpickler checked dtypes.
    forged = _Reduce(np.dtype, ("V8", False, True), (3, "|", None, ("f0",), {"f0": (np.dtype("O"), 0)}, 8, 1, 0))
    write("forged-void-scalar.pt", _zip_torch_file(pickle.dumps(
        {"string_to_param": {"*": 0}, "step": _Reduce(_numpy_scalar(), (forged, b"AAAAAAAA"))}, protocol=2)[2:-1]),
        "numpy dtype", "never allowed")
    forged = np.dtype([("f0", "O")])
    write("object-dtype.pt", _legacy_torch_file(
        _op_global("numpy", "dtype") + _tuple(_str("O8"), b"\x89", b"\x88") + b"R."[:-1]), "numpy dtype")
    # A plain float64 dtype whose state is rewritten by BUILD to carry an object field.
    write("dtype-build-fields.pt", pickle.dumps(_Reduce(np.dtype, ("f8", False, True), forged.__reduce__()[2]), protocol=2),
          "numpy dtype", "never allowed")  # the state's own object dtype is refused first
    # BUILD on numpy's float64 singleton with another byte order: it would change every float64 in the process.
    write("dtype-build-byteorder.pt", pickle.dumps(
        _Reduce(np.dtype, ("f8", False, True), (3, ">", None, None, None, -1, -1, 0)), protocol=2),
        "dtype's state", "never allowed")
    write("scalar-short-data.pt", pickle.dumps(
        {"emb_params": 0, "step": _Reduce(_numpy_scalar(), (np.dtype("f8"), b"AB"))}, protocol=2),
        "numpy scalar", "never allowed")
    write("build-on-ordereddict.pt", pickle.dumps(
        _Reduce(__import__("collections").OrderedDict, (), {"x": 1}), protocol=2), "setting the state", "never allowed")

    # -- tensors and storages ---------------------------------------------------------------
    four_floats = struct.pack("<4f", 1, 2, 3, 4)
    write("tensor-past-its-storage.pt", _zip_torch_file(
        _dict_of("emb_params", _tensor(_persid_storage("0", 4), 0, (75, 768), (768, 1))), {"0": four_floats}),
        "reaching element", "never allowed")
    write("negative-stride.pt", _zip_torch_file(
        _dict_of("emb_params", _tensor(_persid_storage("0", 4), 3, (1, 4), (4, -1))), {"0": four_floats}),
        "negative", "never allowed")
    write("storage-larger-than-record.pt", _zip_torch_file(
        _dict_of("emb_params", _tensor(_persid_storage("0", 10**9), 0, (1, 4), (4, 1))), {"0": four_floats}),
        "bytes, but the file holds")
    write("legacy-storage-bomb.pt", _legacy_torch_file(
        _dict_of("emb_params", _tensor(_persid_storage("0", 10**11, legacy=True), 0, (1, 4), (4, 1)))),
        "bytes, but the file holds")
    write("persid-not-a-storage.pt", _zip_torch_file(
        _dict_of("emb_params", _tuple(_str("module"), _op_global("collections", "OrderedDict"), b"N", b"N") + b"Q")),
        "not a torch storage")
    write("storage-of-a-strange-type.pt", _zip_torch_file(
        _dict_of("emb_params", _tensor(_tuple(_str("storage"), _int(7), _str("0"), _str("cpu"), _int(4)) + b"Q",
                                       0, (1, 4), (4, 1))), {"0": four_floats}), "storage of type")

    # -- zip containers -----------------------------------------------------------------------
    good_zip = formats.torch_zip_bytes({"emb_params": torch.ones(2, 8)})
    with zipfile.ZipFile(io.BytesIO(good_zip)) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in entries.items():
            z.writestr(n, d + (b"\0" * (1 << 22) if n.endswith("/data/0") else b""))
    write("zip-deflated-bomb.pt", deflated.getvalue(), "compressed")
    huge_pickle = io.BytesIO()
    with zipfile.ZipFile(huge_pickle, "w") as z:
        for n, d in entries.items():
            z.writestr(n, d[:-1] + b"N" * (5 << 20) + b"0" + d[-1:] if n.endswith("data.pkl") else d)
    write("zip-huge-pickle.pt", huge_pickle.getvalue(), "its pickle is")
    write("zip-truncated.pt", good_zip[: len(good_zip) // 2], "torch file")
    at = good_zip.index(b"PK\x01\x02") + 6  # the central directory's "version needed to extract"
    write("zip-future-version.pt", good_zip[:at] + struct.pack("<H", 84) + good_zip[at + 2 :], "torch file")  # found by fuzzing
    write("one-byte.pt", b"\x80", "unrecognised content")  # found by fuzzing
    no_pickle = io.BytesIO()
    with zipfile.ZipFile(no_pickle, "w") as z:
        z.writestr("archive/version", b"3\n")
    write("zip-without-pickle.pt", no_pickle.getvalue(), "no data.pkl")

    # -- dtypes numbers cannot be checked in ---------------------------------------------------
    save_file({"emb_params": torch.zeros(2, 8, dtype=torch.float8_e4m3fn)}, str(folder / "float8.safetensors"))
    expect["float8.safetensors"] = ["float8_e4m3fn", "embeddings are float16"]
    header = json.dumps({"emb_params": {"dtype": "F4", "shape": [2, 8], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    write("float4.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 8, "safetensors")
    save_file({"emb_params": torch.zeros(2, 8, dtype=torch.int32)}, str(folder / "integers.safetensors"))
    expect["integers.safetensors"] = ["int32", "not floating point"]
    header = json.dumps({"a": {"dtype": "F32", "shape": [75, 1024], "data_offsets": [0, 307200]}}).encode()
    write("safetensors-past-its-end.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 16, "safetensors")

    # -- images ---------------------------------------------------------------------------------
    info = PngInfo()
    info.add_text(formats.CARD_KEY, base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode(), zip=False)
    Image.new("RGB", (8, 8)).save(folder / "card-json-recursion.png", pnginfo=info)
    expect["card-json-recursion.png"] = ["damaged"]
    info = PngInfo()
    info.add_text(formats.CARD_KEY, "A" * (40 << 20), zip=True)  # a zTXt chunk inflating to 40 MB
    Image.new("RGB", (8, 8)).save(folder / "card-ztxt-bomb.png", pnginfo=info)
    expect["card-ztxt-bomb.png"] = ["unreadable image"]
    bomb = io.BytesIO()
    Image.new("1", (14000, 14000)).save(bomb, "PNG")  # 196 megapixels in a few kB
    write("card-pixel-bomb.png", bomb.getvalue(), "unreadable image")
    small = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(small, "PNG")
    write("card-truncated.png", small.getvalue()[:70], "unreadable image")

    # -- names that would forge terminal output ---------------------------------------------------
    card("\x1b[2J\x1b[31mevil\nerror: forged line", torch.ones(1, 8) * 0.1, folder / "escape-name.png")
    expect["escape-name.png"] = None  # loads; printed escaped
    write("bad\nname\x1b[31m.pt", b"\x00garbage", "not an embedding file")

    # -- filesystem oddities ------------------------------------------------------------------------
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "fifo.pt")
        expect["fifo.pt"] = ["not a regular file"]
    if os.path.exists("/dev/zero"):
        (folder / "zero.pt").symlink_to("/dev/zero")
        expect["zero.pt"] = ["not a regular file"]
    (folder / "folder.pt").mkdir()
    expect["folder.pt"] = ["no embedding files"]
    (folder / "dangling.safetensors").symlink_to(folder / "nowhere")
    expect["dangling.safetensors"] = ["no such file"]

    _flow_cases(folder, write, expect)

    # -- one good file, so a library of all of them still lists something ----------------------------
    formats.save(Embedding("good", {"clip": torch.ones(2, 8)}), folder / "good.pt")
    expect["good.pt"] = None
    return expect


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    print(f"{len(build(out))} files in {out}")
