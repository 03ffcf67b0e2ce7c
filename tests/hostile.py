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

    # -- one good file, so a library of all of them still lists something ----------------------------
    formats.save(Embedding("good", {"clip": torch.ones(2, 8)}), folder / "good.pt")
    expect["good.pt"] = None
    return expect


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    print(f"{len(build(out))} files in {out}")
