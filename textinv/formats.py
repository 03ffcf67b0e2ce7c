"""Read and write every Textual Inversion embedding format users trade.

One in-memory type, :class:`Embedding`; ``load`` detects the format by content (never by
extension) and ``save`` writes any of them atomically.  Pickle-based files are opened with a
restricted unpickler: embedding files come from strangers on the internet.

Per-layer (P+, "XTI") embeddings give each UNet cross-attention layer its own vectors
(``Embedding.layers`` names the layers).  Two layouts hold them: kohya's XTI files (16 tensors
``IN01`` … ``OUT11``, the SD 1.x/2.x UNet only) and textinv's own (``layers.000`` … plus the layer
map and model family in the safetensors metadata, for UNets of any shape).  :func:`to_single`
averages the layers for the tools that read only plain embeddings.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from . import cards, families, safe_pickle
from .atomic import atomic_path, write_bytes
from .errors import EmbeddingFileError, TextinvError
from .families import SINGLE_KEY


@dataclass
class Embedding:
    """A trigger word's learned vectors.

    ``vectors`` maps a text-encoder slot to an ``[n, D]`` tensor: ``{"clip": T}`` for SD 1.x/2.x
    (one encoder), ``{"clip_l": T1, "clip_g": T2}`` for SDXL (same ``n``): the slots of a row of
    :data:`textinv.families.FAMILIES`.  Tensors keep the dtype they were stored in so that round
    trips are bit-exact; users of the vectors cast as needed.
    ``meta`` holds ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``, ``init_text`` and any extra
    keys found in the file (kept on write where the format allows).

    A per-layer (P+) embedding has ``layers``: the UNet's cross-attention layers as diffusers
    module paths, in the order the forward pass visits them; its ``vectors["clip"]`` is then
    ``[layers, n, D]``, layer ``i``'s vectors at index ``i``.
    """

    name: str
    vectors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    source_format: str | None = None  # set by load(): "diffusers", "a1111", "kohya", "sdxl", ...
    path: Path | None = None
    layers: list[str] | None = None  # per-layer (P+) embeddings only
    # Tensors a file keeps beside the slots' vectors, carried to the formats that hold them:
    # OneTrainer's output-embedding twins ("clip_l_out", "t5_out", ...).
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        # Every reader produces the slot set of a family in the table (textinv.families); an
        # Embedding built in Python with another would fail far from here (a KeyError when it is
        # described, applied or saved).
        if not families.valid_keys(self.vectors):
            raise TextinvError(f"embedding {self.name!r}: vector slots {sorted(self.vectors)}; expected "
                               f"{families.slot_sets('listed')}")

    @property
    def is_sdxl(self) -> bool:
        return families.of_embedding(self) is families.SDXL

    @property
    def slots(self) -> tuple[str, ...]:
        """The vector slots in encoder order (its family's)."""
        family = families.of_embedding(self) or next(iter(families.holding(self.vectors)), None)
        return tuple(k for k in family.keys if k in self.vectors) if family is not None else tuple(self.vectors)

    @property
    def is_per_layer(self) -> bool:
        return self.layers is not None

    @property
    def num_vectors(self) -> int:
        t = next(iter(self.vectors.values()))
        return int(t.shape[1] if self.layers is not None else t.shape[0])

    @property
    def widths(self) -> dict[str, int]:
        return {k: int(v.shape[-1]) for k, v in self.vectors.items()}

    @property
    def family(self) -> str:
        return families.name_of(self.vectors)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per version of it (path, modification time, size)."""
    st = Path(path).stat()
    return _sha256_of(str(path), st.st_mtime_ns, st.st_size)


def short_hash(path: str | Path) -> str:
    """A1111's TI hash: the first 12 hex digits of the file's sha256."""
    return cached_sha256(path)[:12]


def embedding_hash(emb: "Embedding") -> str | None:
    """A1111's ``TI hashes`` entry for a loaded embedding: its file's short hash (a diffusers SDXL
    folder: its first file's); None for an embedding that did not come from a file."""
    path = getattr(emb, "path", None)
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        path = path / f"{DIFFUSERS_SDXL_STEMS[0]}.safetensors"
    return short_hash(path) if path.is_file() else None


def file_stem(name: str) -> str:
    """A name made safe as a file name: runs of other characters become "-", no leading dot (a
    hidden file would be skipped by library scans), never empty."""
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "embedding"


def native_format(emb: "Embedding") -> str:
    """The format an embedding is kept in when none is asked for: one file, one tensor per
    encoder ("sdxl" for several); a per-layer one as kohya's XTI when it has kohya's 16 layers
    (kohya reads it too), else ours."""
    if emb.layers is not None:
        return "xti" if list(emb.layers) == list(SD_LAYERS) else "per-layer"
    if "t5" in emb.vectors:  # a flow family's (or part of one): the layout every tool reads whole
        return "sd3" if "clip_g" in emb.vectors else "flux"
    return "sdxl" if len(emb.vectors) > 1 else "diffusers"


def suffix_for(fmt: str, emb: "Embedding | None" = None) -> str:
    """The file suffix ``fmt`` is written with: the first its writer accepts (.safetensors for an
    unknown one; "" for diffusers' SDXL two-file folder, when ``emb`` is given and is SDXL)."""
    if fmt == "diffusers" and emb is not None and emb.is_sdxl:
        return ""
    return _SAVE_SUFFIXES.get(fmt, (".safetensors",))[0]


def to_single(emb: "Embedding") -> "Embedding":
    """A plain embedding for tools without per-layer support: the average of the layers' vectors.

    Warns (one line), since what the layers learned apart is lost.  A plain embedding is returned
    as it is."""
    if emb.layers is None:
        return emb
    warnings.warn(f"{printable(emb.name)}: averaged its {len(emb.layers)} per-layer vector sets into one; "
                  "what each layer learned apart is lost", stacklevel=2)
    vectors = {slot: t.float().mean(dim=0) for slot, t in emb.vectors.items()}
    return dataclasses.replace(emb, vectors=vectors, layers=None, source_format=None,
                               meta=dict(emb.meta, averaged_layers=len(emb.layers)))


# ---------------------------------------------------------------------------------------------
# Limits and names
# ---------------------------------------------------------------------------------------------

MAX_VECTORS = 75  # A1111's limit: an embedding must fit in one 75-token prompt chunk
MAX_WIDTH = 4096  # wider than any known text encoder: certainly not an embedding
MAX_FILE_BYTES = 64 << 20  # bigger files are checkpoints or LoRAs: only LoRA bundles may be
# A diffusers .bin saved on a CPU stores the whole token table behind its one-row view (SD 1.x
# ~150 MB, SDXL clip_g ~250 MB).  Torch zips are memory-mapped and only the referenced slice is
# read, so they may be this large; the pickle inside is what could be a bomb, and it is bounded.
MAX_TORCH_ZIP_BYTES = 1 << 30
MAX_PICKLE_BYTES = 4 << 20
MAX_CARD_JSON_BYTES = 64 << 20  # bound on what a card's zlib stream may inflate to
# What an embedding's vectors may be stored as (float8/float4 have no arithmetic to check them with).
VECTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CARD_KEY = cards.KEY
A1111_STAR_TOKEN = 265  # CLIP id of "*", written by A1111, never read back

FORMATS = ("diffusers", "diffusers-sdxl", "a1111", "original", "kohya", "sdxl", "lora-bundle",
           "png-card", "xti", "per-layer", "sd3", "flux", "onetrainer", "comfyui")
# Plain embeddings.  The flow families' (SD3, Flux.1): "sd3"/"flux" hold the T5 part under both
# keys in use, so that ComfyUI and OneTrainer read every part; "onetrainer" and "comfyui" are
# exactly those tools' own layouts (FLOW_LAYOUTS).
SAVE_FORMATS = ("diffusers", "a1111", "kohya", "sdxl", "png", "sd3", "flux", "onetrainer", "comfyui")
PER_LAYER_FORMATS = ("xti", "per-layer")  # per-layer (P+) embeddings: kohya's XTI, textinv's own
CANDIDATE_SUFFIXES = {".pt", ".bin", ".safetensors", ".ckpt", ".png", ".webp"}
DIFFUSERS_SDXL_STEMS = ("learned_embeds", "learned_embeds_2")  # 768-wide, then 1280-wide
# Meta keys carried through every format that can hold them (safetensors metadata as textinv.*).
CARRIED_META = ("step", "sd_checkpoint", "sd_checkpoint_name", "init_text", "clip_skip")
_XTI_KEY = re.compile(r"^(IN\d\d|MID|OUT\d\d)$")

# The keys a T5 part is stored under: OneTrainer and diffusers' Flux script write "t5", ComfyUI
# reads "t5xxl" (its T5 tokenizers' embedding key) and nothing else.  A file holding both keys with
# the same tensor loads whole in both.
T5_KEYS = {"onetrainer": ("t5",), "comfyui": ("t5xxl",), "both": ("t5", "t5xxl")}
FLOW_LAYOUTS = {"sd3": "both", "flux": "both", "onetrainer": "onetrainer", "comfyui": "comfyui"}
OUT_SUFFIX = "_out"  # OneTrainer's output-embedding twins: clip_l_out, t5_out, ...

# kohya's XTI keys (sd-scripts, train_textual_inversion_XTI.py) and the SD 1.x/2.x UNet layers they
# stand for: its cross-attention layers in the order the forward pass visits them (down blocks 0-2,
# two each; the mid block; up blocks 1-3, three each), the order kohya feeds them in.
XTI_KEYS = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
            "OUT08", "OUT09", "OUT10", "OUT11")
SD_LAYERS = tuple([f"down_blocks.{b}.attentions.{i}.transformer_blocks.0.attn2" for b in range(3) for i in range(2)]
                  + ["mid_block.attentions.0.transformer_blocks.0.attn2"]
                  + [f"up_blocks.{b}.attentions.{i}.transformer_blocks.0.attn2" for b in (1, 2, 3) for i in range(3)])
MAX_LAYERS = 128  # SDXL's UNet has 70 cross-attention layers; more is no UNet we know
LAYER_KEY = "layers.{:03d}"  # textinv's per-layer layout: one tensor per layer, named by its index
_LAYER_KEY = re.compile(r"^layers\.\d{3}$")
_LAYER_NAME = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")  # a module path such as mid_block.attentions.0...


def _fail(path, problem) -> EmbeddingFileError:
    """The one-line error every reader and writer raises: ``<file>: <problem>``, the file named by
    the path it was given (a file in a library folder: the folder's path joined with its name)."""
    return EmbeddingFileError(f"{printable(path)}: {_one_line(problem)}")


def printable(text) -> str:
    """``text`` safe to print on a terminal: control characters (escape codes, newlines) shown as
    ``\\xNN``/``\\n``, never acted on.  Names come from strangers' files and file names."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in str(text))


def _one_line(x) -> str:
    return " ".join(str(x).split())


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


class _NoCard(EmbeddingFileError):
    """An image without an embedding card: an error for load(), a skipped preview for load_all()."""


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def load(path, name: str | None = None, *, select: str | None = None) -> Embedding:
    """Read one embedding; the format is detected from the content, never the extension.

    ``name`` overrides the trigger name (default: A1111's rule, see :func:`load_all`).  A LoRA
    file bundling several embeddings needs ``select``, a bundled embedding's name.
    """
    path = Path(path)
    _, found = _read(path)
    if select is not None:
        chosen = [e for e in found if select in (e.name, e.meta.get("stored_name"),
                                                 e.meta.get("token"))]
        if not chosen:
            names = ", ".join(e.name for e in found)
            raise _fail(path, f"holds no embedding named {select!r} (it holds: {names})")
        found = chosen
    elif len(found) > 1:
        names = ", ".join(e.name for e in found)
        raise _fail(path, f"is a LoRA bundle of {len(found)} embeddings ({names}); pick one with "
                          "`textinv convert --select NAME` (select= in Python)")
    emb = found[0]
    if name:
        emb.name = name
    return emb


def load_all(path, *, on_error=None, stands_for=None) -> list[Embedding]:
    """Every embedding in a file (a LoRA bundle gives several) or in a library folder.

    Names follow A1111: the file stem for .pt/.bin/.safetensors, the folder name for a diffusers
    SDXL folder, the stored name for image cards and bundled embeddings.  In a folder (searched
    recursively, in name order) non-embedding files and images without a card are skipped; a
    broken embedding file raises, unless ``on_error(path, err)`` is given, which then sees it
    and the file is skipped.  ``stands_for(folder)``: the files a folder stands for instead of
    its contents, or None to search it (:func:`textinv.sources.load_all` passes
    :func:`textinv.runs.in_library`: a training run gives its final embedding only).
    """
    path = Path(path)
    if not path.is_dir() or _diffusers_sdxl_files(path) is not None:
        return _read(path)[1]
    out: list[Embedding] = []
    for item in _library_items(path, stands_for):
        try:
            out.extend(_read(item)[1])
        except _NoCard:
            continue  # a preview or unrelated picture
        except EmbeddingFileError as err:
            if on_error is None:
                raise
            on_error(item, err)
    return out


def detect_format(path) -> str:
    """One of :data:`FORMATS`, decided by content (the file is read and checked)."""
    return _read(Path(path))[0]


def is_embedding_candidate(path) -> bool:
    """Whether a library scan should try ``path``: an embedding suffix, or a diffusers SDXL folder.

    Like A1111, ``*.preview.png`` files (previews beside an embedding) are not candidates.
    """
    path = Path(path)
    if path.is_dir():
        return _diffusers_sdxl_files(path) is not None
    name = path.name.lower()
    return path.suffix.lower() in CANDIDATE_SUFFIXES and not name.endswith(".preview.png")


def save(emb: Embedding, path, format: str | None = None, *, preview=None, clip_only: bool = False) -> Path:
    """Write ``emb`` atomically in one of :data:`SAVE_FORMATS` and return the path written.

    ``format=None`` follows the suffix: .pt -> a1111 (sdxl for SDXL), .png -> png,
    .safetensors -> diffusers (sdxl for SDXL), .bin -> diffusers, no suffix + SDXL -> the
    diffusers two-file folder; a per-layer embedding: .pt -> xti, .safetensors -> xti for
    kohya's 16 layers, else per-layer (:data:`PER_LAYER_FORMATS`); an SD3/Flux.1 one: its own
    layout ("sd3"/"flux", read whole by ComfyUI and OneTrainer).  ``preview`` (a PIL image) is
    the visible part of a png card.  A format that cannot hold every part writes the others and
    warns in one line what it left out (SD3 as SDXL: the T5 part); one that would need a part the
    embedding lacks refuses, except that ``clip_only`` writes just the CLIP parts (A1111's SD3 layout).
    """
    path = Path(path)
    fmt = {"png-card": "png", "diffusers-sdxl": "diffusers"}.get(format, format)
    if fmt is None:
        fmt = _format_for_suffix(emb, path)
    if fmt not in SAVE_FORMATS + PER_LAYER_FORMATS:
        raise _fail(path, f"cannot write format {format!r}; choose one of "
                          f"{', '.join(SAVE_FORMATS + PER_LAYER_FORMATS)}")
    emb, left_out = _parts_for(path, _checked(path, emb), fmt, clip_only)
    if emb.layers is not None and fmt not in PER_LAYER_FORMATS:
        raise _fail(path, f"{emb.name!r} is a per-layer (P+) embedding ({len(emb.layers)} layers); format "
                          f"{fmt!r} holds one set of vectors: add --to-single to average the layers "
                          "(to_single() in Python; the per-layer detail is lost), or write --format xti "
                          "or per-layer")
    if emb.layers is None and fmt in PER_LAYER_FORMATS:
        raise _fail(path, f"format {fmt!r} holds per-layer (P+) embeddings; {emb.name!r} is a plain one")
    suffix = path.suffix.lower()
    if emb.is_sdxl and fmt == "diffusers" and "t5" not in emb.vectors:
        if suffix in CANDIDATE_SUFFIXES:
            raise _fail(path, "SDXL in diffusers format is a two-file folder: give a folder "
                              "path, or use --format sdxl (format='sdxl' in Python) for one file")
    elif suffix not in _SAVE_SUFFIXES[fmt]:
        raise _fail(path, f"format {fmt!r} is written to a {' or '.join(_SAVE_SUFFIXES[fmt])} "
                          f"file, not {suffix or 'a path without suffix'}")
    _WRITERS[fmt](emb, path, preview)
    if left_out is not None:
        warnings.warn(left_out, stacklevel=2)
    return path


# ---------------------------------------------------------------------------------------------
# Reading: container -> dict -> classified embeddings
# ---------------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[str, list[Embedding]]:
    """(format, embeddings) for one file or diffusers SDXL folder."""
    if path.is_dir():
        if _diffusers_sdxl_files(path) is None:
            raise _fail(path, "is a folder, not a diffusers SDXL embedding folder (needs "
                              "learned_embeds.safetensors and learned_embeds_2.safetensors); "
                              "name one embedding file in it (load_all() in Python reads a "
                              "library folder)")
        return "diffusers-sdxl", [_read_diffusers_sdxl(path)]
    if not path.is_file():
        raise _fail(path, "not a regular file (a pipe, device or socket)" if path.exists() else "no such file")
    kind = _sniff(path)
    if kind == "image":
        data = _read_card(path)
        fmt, found = "png-card", _classify(path, data, default_name=path.stem)[1]
        for emb in found:
            emb.name = emb.meta.get("stored_name") or path.stem
    else:
        if kind == "safetensors":
            data, st_meta = _read_safetensors(path)
        else:
            data, st_meta = _read_pickle(path, zipped=kind == "zip"), {}
        fmt, found = _classify_top(path, data, st_meta)
        for emb in found:
            if fmt != "lora-bundle":
                emb.name = path.stem
            _apply_safetensors_meta(emb, st_meta)
    for emb in found:
        emb.source_format = fmt
        emb.path = path
        emb.meta = _typed_meta(emb.meta)
    return fmt, found


def _sniff(path: Path) -> str:
    """Container kind from the first bytes: safetensors, zip or legacy pickle, or image."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise _fail(path, "empty file")
    if head.startswith(b"\x89PNG\r\n\x1a\n") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        kind = "image"
    elif head.startswith(b"PK\x03\x04"):
        kind = "zip"  # torch.save's default container
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        kind = "pickle"  # torch.save(_use_new_zipfile_serialization=False)
    elif len(head) >= 9 and head[8:9] == b"{":
        header_len = struct.unpack("<Q", head[:8])[0]
        if header_len > size - 8:
            raise _fail(path, "truncated safetensors file (header runs past the end)")
        kind = "safetensors"
    else:
        raise _fail(path, f"not an embedding file: unrecognised content (starts {head[:8]!r})")
    limit = {"safetensors": None, "zip": MAX_TORCH_ZIP_BYTES}.get(kind, MAX_FILE_BYTES)
    if limit is not None and size > limit:
        raise _fail(path, f"{_size(size)} is too large for an embedding file "
                          f"(limit {_size(limit)}; a checkpoint or LoRA?)")
    return kind


def _read_pickle(path: Path, zipped: bool):
    """Unpickle with the allow-list of :mod:`textinv.safe_pickle`; nothing else can run.

    A torch zip is memory-mapped: tensors are views of the file until :func:`_check_vectors`
    copies the slices an embedding uses, so a small view of a huge storage costs its slice."""
    records = _check_zip(path) if zipped else None
    try:
        with warnings.catch_warnings(), safe_pickle.limits(path.stat().st_size, records):
            warnings.simplefilter("ignore")  # legacy files: "source code of class ... changed"
            return torch.load(path, map_location="cpu", pickle_module=safe_pickle,
                              weights_only=False, mmap=zipped)
    except pickle.UnpicklingError as err:
        if "never allowed" in str(err):
            raise _fail(path, f"not an embedding file: {err}") from None
        raise _fail(path, f"corrupt or truncated torch file ({err})") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for damaged files
        problem = f"corrupt or truncated torch file ({type(err).__name__}: {err})"
        raise _fail(path, problem) from None


def _check_zip(path: Path) -> dict[str, int]:
    """A torch zip's entries, checked before anything is read: stored (torch never compresses,
    so nothing can inflate), inside the file, one small pickle.  Returns {storage key: bytes}."""
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except Exception as err:  # zipfile raises BadZipFile, NotImplementedError, struct.error, ... for damaged zips
        raise _fail(path, f"corrupt or truncated torch file ({type(err).__name__}: {err})") from None
    size = path.stat().st_size
    for e in entries:
        if e.compress_type != zipfile.ZIP_STORED:
            raise _fail(path, f"zip entry {e.filename!r} is compressed; torch files never are (a zip bomb?)")
        if e.file_size > size or e.header_offset + e.file_size > size:
            raise _fail(path, f"zip entry {e.filename!r} claims {_size(e.file_size)}, more than the file holds")
    pickles = [e for e in entries if e.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _fail(path, "corrupt torch file: no data.pkl entry (or several)")
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise _fail(path, f"its pickle is {_size(pickles[0].file_size)}; an embedding's is a few kB "
                          f"(limit {_size(MAX_PICKLE_BYTES)})")
    records = {}
    for e in entries:
        root, _, rest = e.filename.partition("/")
        if rest.startswith("data/"):
            records[rest[len("data/"):]] = e.file_size
    return records


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata; of a big file (a LoRA) only the ``bundle_emb.*`` tensors are read."""
    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            metadata = dict(f.metadata() or {})
            wanted = [k for k in keys if k.startswith("bundle_emb.")]
            if not wanted:
                if size > MAX_FILE_BYTES:
                    raise _fail(path, f"{_size(size)} file with {len(keys)} tensors and "
                                      "no bundled embeddings: not an embedding (a checkpoint or "
                                      "LoRA?)")
                wanted = keys
            return {k: f.get_tensor(k) for k in wanted}, metadata
    except EmbeddingFileError:
        raise
    except Exception as err:
        raise _fail(path, f"corrupt or truncated safetensors file ({err})") from None


def _classify_top(path: Path, data, st_meta: dict | None = None) -> tuple[str, list[Embedding]]:
    """Format and embeddings of an unpickled/safetensors dict, bundles included."""
    if not isinstance(data, dict):
        raise _fail(path, f"not an embedding file: holds a {type(data).__name__}, "
                          "not a dict of tensors")
    bundles: dict[str, dict] = {}
    for key, value in data.items():
        if isinstance(key, str) and key.startswith("bundle_emb."):
            parts = key.split(".", 2)
            if len(parts) < 3:
                raise _fail(path, f"malformed bundled-embedding key {key!r}")
            _, emb_name, rest = parts
            entry = bundles.setdefault(emb_name, {})
            if rest.startswith("string_to_param."):
                entry.setdefault("string_to_param", {})[rest.split(".", 1)[1]] = value
            else:
                entry[rest] = value
    if bundles:
        found = []
        for emb_name, entry in bundles.items():
            fmt, embs = _classify(path, entry, default_name=emb_name, where=f"bundled {emb_name!r}")
            emb = embs[0]
            emb.name = emb_name
            emb.meta["stored_name"] = emb_name
            found.append(emb)
        return "lora-bundle", found
    fmt, found = _classify(path, data, default_name=path.stem, st_meta=st_meta)
    return fmt, found


def _classify(path: Path, data, default_name: str, where: str = "",
              st_meta: dict | None = None) -> tuple[str, list[Embedding]]:
    """Per-layer layouts first (their keys say so), then A1111's order: string_to_param, then
    one tensor per encoder of a family (SDXL's clip_l + clip_g), then a single tensor."""
    where = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise _fail(path, f"{where}not an embedding: holds a {type(data).__name__}")
    keys = [str(k) for k in data]
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    meta, flow = _plain_meta(data), None
    if len(tensors) > 1 and all(_XTI_KEY.match(k) for k in tensors):
        layers, stacked = list(SD_LAYERS), _read_xti(path, data, keys, where)
        return "xti", [Embedding(name=default_name, vectors={SINGLE_KEY: stacked}, meta=meta, layers=layers)]
    if tensors and all(_LAYER_KEY.match(k) for k in tensors):
        layers, stacked = _read_layer_layout(path, data, keys, st_meta or {}, where)
        return "per-layer", [Embedding(name=default_name, vectors={SINGLE_KEY: stacked}, meta=meta, layers=layers)]
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise _fail(path, f"{where}string_to_param is not a dict of tensors")
        if len(params) != 1:
            raise _fail(path, f"{where}string_to_param holds {len(params)} entries "
                              f"({', '.join(map(str, params))}); A1111 calls this "
                              "'multiple terms': an embedding file holds exactly one")
        (term, tensor), = params.items()
        original = isinstance(params, safe_pickle.ParameterDictStandIn) or not (
            "name" in data or "step" in data)
        fmt = "original" if original else "a1111"
        if isinstance(data.get("name"), str):
            meta["stored_name"] = data["name"]
        meta["term"] = str(term)
        vectors = {SINGLE_KEY: tensor}
    elif (flow := _flow_parts(path, data, where)) is not None:
        fmt, vectors, _ = flow
        if isinstance(data.get("name"), str):
            meta["stored_name"] = data["name"]
    elif (family := families.stored(data)) is not None:
        fmt, vectors = "sdxl", {k: data[k] for k in family.keys}
        if isinstance(data.get("name"), str):
            meta["stored_name"] = data["name"]
    elif len(tensors) == 1:
        (key, tensor), = tensors.items()
        fmt = "kohya" if key == "emb_params" else "diffusers"
        if fmt == "diffusers":
            meta["token"] = key
        vectors = {families.lone_slot(int(tensor.shape[-1])) if tensor.ndim else SINGLE_KEY: tensor}
    elif len(tensors) > 1:
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        several = " or ".join("/".join(f.keys) for f in families.FAMILIES if len(f.slots) > 1)
        raise _fail(path, f"{where}holds {len(tensors)} tensors ({shown}) and no string_to_param "
                          f"or {several}; A1111 calls this 'multiple terms': an embedding "
                          "file holds exactly one")
    else:
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        raise _fail(path, f"{where}not an embedding: unknown structure (keys: {shown or 'none'}; "
                          "no tensors)")
    vectors = _check_vectors(path, vectors, where)
    extra = _check_extra(path, vectors, flow[2], where) if flow else {}
    return fmt, [Embedding(name=default_name, vectors=vectors, meta=meta, extra=extra)]


def _flow_parts(path: Path, data: dict, where: str) -> tuple[str, dict, dict] | None:
    """A flow family's file (SD3, Flux.1) or a part of one: the T5 part under "t5" (OneTrainer,
    diffusers) and/or "t5xxl" (ComfyUI), the CLIP parts under clip_l/clip_g, and OneTrainer's
    ``*_out`` twins; None when it holds no T5 part (then it is an SD/SDXL file)."""
    keys = [str(k) for k, v in data.items() if isinstance(v, torch.Tensor)]
    t5 = [k for k in T5_KEYS["both"] if k in keys]
    if not t5:
        return None
    known = {k for k in ("clip_l", "clip_g") if k in keys} | set(t5) | {"t5"}  # t5_out twins a t5xxl part too
    extra = {k: data[k] for k in keys if k.endswith(OUT_SUFFIX) and k[: -len(OUT_SUFFIX)] in known}
    unknown = [k for k in keys if k not in known and k not in extra]
    if unknown:
        shown = ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        raise _fail(path, f"{where}holds a T5 part and {len(unknown)} other tensor{'s' if len(unknown) > 1 else ''} "
                          f"({shown}); an SD3/Flux.1 embedding holds clip_l, clip_g and t5 (or t5xxl) only")
    parts = {k: data[k] for k in ("clip_l", "clip_g") if k in keys}
    parts["t5"] = _t5_of(path, data, t5, where, "T5 part")
    if "t5xxl_out" in extra:  # the twin of a 't5xxl' part (no tool writes it): kept as the T5 part's
        outs = [k for k in ("t5_out", "t5xxl_out") if k in extra]
        extra["t5_out"] = _t5_of(path, extra, outs, where, "T5 output embedding")
        del extra["t5xxl_out"]
    fmt = ("sd3" if "clip_g" in parts else "flux") if len(t5) == 2 else ("onetrainer" if t5 == ["t5"] else "comfyui")
    return fmt, parts, extra


def _t5_of(path, data: dict, keys: list[str], where: str, what: str):
    """The tensor under the first of ``keys`` ("t5", then "t5xxl"); where a file holds both, both
    are checked first (a damaged one is refused, never warned about) and a difference between them
    is one warning line: the first is taken, the one OneTrainer trains and reads.  A refusal names
    the key as the file does."""
    if len(keys) == 1:
        _check_vectors(path, {keys[0]: data[keys[0]]}, f"{where}{keys[0]}: ")
    else:
        a, b = _check_vectors(path, {k: data[k] for k in keys}, where).values()
        if a.shape != b.shape or not torch.equal(a.float(), b.float()):
            readers = " (read by OneTrainer)", " (read by ComfyUI)"
            shown = [f"{k!r}{r if not k.endswith(OUT_SUFFIX) else ''}" for k, r in zip(keys, readers)]
            warnings.warn(f"{printable(path)}: {where}its {what} differs between {shown[0]} and {shown[1]}; "
                          f"took {keys[0]!r}", stacklevel=3)
    return data[keys[0]]


def _check_extra(path, vectors: dict, extra: dict, where: str) -> dict[str, torch.Tensor]:
    """OneTrainer's output-embedding twins (``KEY_out``): each checked like vectors, and shaped as its part's."""
    checked = {}
    for key, t in extra.items():
        part = key[: -len(OUT_SUFFIX)] if key.endswith(OUT_SUFFIX) else None
        checked[key] = t = _check_vectors(path, {key: t}, f"{where}{key}: ")[key]
        twin = vectors.get(part)
        if twin is None:
            raise _fail(path, f"{where}{key}: not the output embedding (KEY{OUT_SUFFIX}) of a part the embedding has "
                              f"({', '.join(vectors)})")
        if t.shape != twin.shape:
            raise _fail(path, f"{where}{key} is {tuple(t.shape)} but its part {part} is {tuple(twin.shape)}")
    return checked


def _read_xti(path: Path, data: dict, keys: list[str], where: str) -> torch.Tensor:
    """kohya's XTI dict -> ``[16, n, D]`` in kohya's layer order; its loaders insist on exactly
    these 16 keys ("NOT XTI" otherwise), and so does this one."""
    missing = [k for k in XTI_KEYS if k not in data]
    extra = [k for k in keys if k not in XTI_KEYS]
    if missing or extra:
        problem = ", ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                        f"unexpected {', '.join(extra[:4])}" if extra else "") if x)
        raise _fail(path, f"{where}a kohya XTI per-layer embedding must hold exactly the 16 layers "
                          f"{XTI_KEYS[0]} … {XTI_KEYS[-1]}; this one holds {len(keys)} keys ({problem})")
    return _stack_layers(path, [data[k] for k in XTI_KEYS], list(XTI_KEYS), where)


def _read_layer_layout(path: Path, data: dict, keys: list[str], st_meta: dict, where: str):
    """textinv's per-layer layout -> (layer names, ``[L, n, D]``): tensors ``layers.000`` … and
    the layer names in the metadata ``textinv.layers``."""
    raw = st_meta.get("textinv.layers")
    if raw is None:
        raise _fail(path, f"{where}a per-layer embedding ({len(keys)} tensors {keys[0]}, ...) without its "
                          "layer map (safetensors metadata textinv.layers)")
    try:
        layers = json.loads(raw)
    except ValueError:
        raise _fail(path, f"{where}damaged layer map (textinv.layers is not JSON)") from None
    _check_layer_names(path, layers, where)
    expected = [LAYER_KEY.format(i) for i in range(len(layers))]
    if sorted(keys) != expected:
        raise _fail(path, f"{where}its layer map names {len(layers)} layers but it holds {len(keys)} tensors "
                          f"({', '.join(sorted(keys)[:4])}{', ...' if len(keys) > 4 else ''}); they must match")
    return list(layers), _stack_layers(path, [data[k] for k in expected], expected, where)


def _check_layer_names(path, layers, where: str = "") -> None:
    """A layer map: 1 to MAX_LAYERS distinct module paths."""
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise _fail(path, f"{where}the layer map is not a list of layer names")
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise _fail(path, f"{where}{len(layers)} layers; a per-layer embedding has 1 to {MAX_LAYERS}")
    bad = next((x for x in layers if not _LAYER_NAME.match(x)), None)
    if bad is not None:
        raise _fail(path, f"{where}layer name {printable(bad)[:80]!r} is not a module path")
    if len(set(layers)) != len(layers):
        dup = next(x for x in layers if layers.count(x) > 1)
        raise _fail(path, f"{where}layer {dup!r} is named twice")


def _stack_layers(path, tensors: list, labels: list[str], where: str) -> torch.Tensor:
    """Each layer's ``[n, D]`` checked as a plain embedding's vectors, then stacked to ``[L, n, D]``;
    every layer must hold as many vectors of the same width, in one dtype."""
    checked = _check_vectors(path, dict(zip(labels, tensors)), where)
    first_label, first = labels[0], checked[labels[0]]
    for label in labels[1:]:
        t = checked[label]
        if t.shape != first.shape:
            raise _fail(path, f"{where}ragged per-layer vectors: {first_label} is {first.shape[0]}×{first.shape[1]} "
                              f"but {label} is {t.shape[0]}×{t.shape[1]}; every layer holds the same shape")
    values = list(checked.values())
    if len({t.dtype for t in values}) > 1:
        values = [t.float() for t in values]  # mixed precisions: float32 holds each exactly
    return torch.stack(values)


def _plain_meta(data: dict) -> dict:
    """Scalar values of an embedding dict (name, step, checkpoint, extras) as plain Python."""
    meta = {}
    for key, value in data.items():
        if key in ("string_to_param", "string_to_token", "name") or not isinstance(key, str):
            continue
        if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.ndim == 0):
            value = value.item()
        if value is None or isinstance(value, (str, int, float, bool)):
            meta[key] = value
    return meta


def _check_vectors(path, vectors: dict, where: str = "") -> dict[str, torch.Tensor]:
    """Validate shapes, sizes and values; return detached, contiguous CPU tensors (dtype kept)."""
    out = {}
    for key, t in vectors.items():
        label = f"{where}{key}: " if len(vectors) > 1 else where
        if not isinstance(t, torch.Tensor):
            raise _fail(path, f"{label}holds a {type(t).__name__}, not a tensor")
        if t.dtype not in VECTOR_DTYPES:
            kind = "floating point" if t.is_floating_point() else "not floating point"
            raise _fail(path, f"{label}tensor has dtype {str(t.dtype).removeprefix('torch.')} ({kind}); "
                              "embeddings are float16, bfloat16, float32 or float64")
        if t.ndim == 1:
            t = t.unsqueeze(0)  # old single-vector diffusers files store [D]
        if t.ndim != 2:
            raise _fail(path, f"{label}tensor has shape {tuple(t.shape)}; an embedding is "
                              "[vectors, width]")
        n, width = t.shape
        if not 1 <= n <= MAX_VECTORS:
            raise _fail(path, f"{label}{n} vectors; an embedding has 1 to {MAX_VECTORS}")
        if not 1 <= width <= MAX_WIDTH:
            raise _fail(path, f"{label}vector width {width} is not a text-encoder width "
                              f"(1 to {MAX_WIDTH})")
        if not bool(torch.isfinite(t).all()):
            raise _fail(path, f"{label}tensor contains NaN or infinite values (a diverged "
                              "training run?)")
        t = t.detach().to("cpu")
        # Own the data: a view of a larger (maybe memory-mapped) storage keeps all of it alive.
        own = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out[key] = t if own else t.clone(memory_format=torch.contiguous_format)
    family = families.of_vectors(out) if len(out) > 1 else None
    if family is not None and len(family.slots) > 1:
        _check_slots(path, family, out, where)
    elif len(out) > 1 and families.valid_keys(out):  # some of a flow family's parts (clip_g + t5)
        _check_counts(path, families.name_of(out), list(out), out, where)
    return out


def _check_slots(path, family: families.Family, out: dict, where: str) -> None:
    """The tensors of a several-encoder family: where the family's encoders grow wider in order
    (SDXL: clip_l 768, clip_g 1280), a file's must too, else it was written with the keys swapped
    (whether the widths fit a model is checked when the embedding is applied to it:
    tokens.TriggerState.check); and every encoder has as many vectors."""
    for a, b in zip(family.slots, family.slots[1:]):
        wa, wb = int(out[a.key].shape[1]), int(out[b.key].shape[1])
        if a.width is not None and b.width is not None and a.width < b.width and wa >= wb:
            raise _fail(path, f"{where}{family.name} {a.key} ({wa} wide) must be narrower than {b.key} "
                              f"({wb} wide); swapped?")
    _check_counts(path, family.name, family.keys, out, where)


def _check_counts(path, name: str, keys, out: dict, where: str) -> None:
    """Every part of an embedding holds as many vectors (one per prompt token)."""
    first = keys[0]
    for key in keys[1:]:
        if out[key].shape[0] != out[first].shape[0]:
            raise _fail(path, f"{where}{name} {first} has {out[first].shape[0]} vectors but "
                              f"{key} has {out[key].shape[0]}; they must match")


def _checked(path: Path, emb: Embedding) -> Embedding:
    """A validated copy to write: detached tensors; the caller's trainable ones stay untouched."""
    if emb.layers is not None:
        return _checked_per_layer(path, emb)
    if not families.valid_keys(emb.vectors):
        raise _fail(path, f"embedding {emb.name!r} has vector slots {sorted(emb.vectors)}; "
                          f"expected {families.slot_sets()}")
    if not emb.name:
        raise _fail(path, "the embedding has no name")
    vectors = _check_vectors(path, emb.vectors)
    return dataclasses.replace(emb, vectors=vectors, extra=_check_extra(path, vectors, emb.extra, ""))


def _checked_per_layer(path: Path, emb: Embedding) -> Embedding:
    if not any(f.per_layer for f in families.by_keys(emb.vectors)):
        raise _fail(path, f"per-layer embedding {emb.name!r} has vector slots {sorted(emb.vectors)}; per-layer "
                          f"embeddings hold one text encoder's vectors ({SINGLE_KEY}): {families.layouts(per_layer=True)} only")
    if not emb.name:
        raise _fail(path, "the embedding has no name")
    layers = list(emb.layers)
    _check_layer_names(path, layers)
    t = emb.vectors[SINGLE_KEY]
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != len(layers):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise _fail(path, f"per-layer embedding {emb.name!r}: vectors are {shape}, not [{len(layers)} layers, "
                          "vectors, width]")
    stacked = _stack_layers(path, list(t.unbind(0)), layers, "")
    return dataclasses.replace(emb, vectors={SINGLE_KEY: stacked}, layers=layers)


def _apply_safetensors_meta(emb: Embedding, st_meta: dict) -> None:
    """Keep the file's metadata and restore the meta keys textinv wrote there."""
    if not st_meta:
        return
    emb.meta["safetensors_metadata"] = dict(st_meta)
    for key in CARRIED_META + ("name",):
        raw = st_meta.get(f"textinv.{key}")
        if raw is None:
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        emb.meta["stored_name" if key == "name" else key] = value


# The type of each carried meta key's value (textinv writes these, A1111 the first three); _read drops a
# value of another type from a stranger's file, which would fail whoever reads it (a step of "abc", inf, [1, 2]).
_META_TYPES = {"step": int, "sd_checkpoint": str, "sd_checkpoint_name": str, "init_text": str, "clip_skip": int,
               "stored_name": str}


def _typed_meta(meta: dict) -> dict:
    """``meta`` with the carried keys' values of their type: whole numbers as int (a float step such as
    120.0 too), text as str; None stays; any other value is left out."""
    out = {}
    for key, value in meta.items():
        kind = _META_TYPES.get(key)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if kind is None or value is None or (isinstance(value, kind) and not isinstance(value, bool)):
            out[key] = value
    return out


def _diffusers_sdxl_files(folder: Path) -> tuple[Path, Path] | None:
    """The two files of a diffusers SDXL training output folder, if ``folder`` is one."""
    if not folder.is_dir():
        return None
    pair = []
    for stem in DIFFUSERS_SDXL_STEMS:
        for suffix in (".safetensors", ".bin"):
            if (folder / (stem + suffix)).is_file():
                pair.append(folder / (stem + suffix))
                break
        else:
            return None
    return pair[0], pair[1]


def _read_diffusers_sdxl(folder: Path) -> Embedding:
    """learned_embeds (768 wide, clip_l) + learned_embeds_2 (1280 wide, clip_g) -> one SDXL."""
    vectors, tokens = {}, []
    for slot, file in zip(families.SDXL.keys, _diffusers_sdxl_files(folder)):
        fmt, (part,) = _read(file)
        if fmt != "diffusers":
            raise _fail(file, f"expected a diffusers {{token: tensor}} file, found {fmt}")
        vectors[slot] = part.vectors[SINGLE_KEY]
        tokens.append(part.meta["token"])
    if tokens[0] != tokens[1]:
        raise _fail(folder, f"the two files name different tokens ({tokens[0]!r}, {tokens[1]!r})")
    vectors = _check_vectors(folder, vectors)
    return Embedding(name=folder.name, vectors=vectors, meta={"token": tokens[0]}, source_format="diffusers-sdxl",
                     path=folder)


def _library_items(folder: Path, stands_for=None, seen: set | None = None):
    """Candidate files and diffusers SDXL folders under ``folder``, recursively, in name order;
    a folder that ``stands_for`` something else (a training run) yields that instead."""
    seen = set() if seen is None else seen
    seen.add(folder.resolve())  # symlinked folders are followed, but never in a loop
    instead = stands_for(folder) if stands_for is not None else None
    if instead is not None:
        yield from instead
        return
    for item in sorted(folder.iterdir()):
        if item.name.startswith("."):
            continue  # hidden files, including atomic-write temporaries
        if item.is_dir():
            if _diffusers_sdxl_files(item) is not None:
                yield item
            elif item.resolve() not in seen:
                yield from _library_items(item, stands_for, seen)
        elif is_embedding_candidate(item):
            yield item


# ---------------------------------------------------------------------------------------------
# A1111 embedding cards (PNG): JSON in a text chunk and in the pixels
# ---------------------------------------------------------------------------------------------


def _read_card(path: Path) -> dict:
    """The card's embedding dict: the text chunk first, the pixels as a fallback (A1111 order)."""
    try:
        with Image.open(path) as im:
            im.load()
            raw = cards.decode(im, MAX_CARD_JSON_BYTES)
    except cards.DamagedCard as err:
        raise _fail(path, str(err)) from None
    except Exception as err:  # PIL raises many kinds for damaged images
        raise _fail(path, f"unreadable image ({type(err).__name__}: {err})") from None
    if raw is None:
        raise _NoCard(f"{printable(path)}: image holds no embedding card (no {CARD_KEY} text chunk, "
                      "no data in its pixels; lossy re-encoding destroys them)")
    try:
        data = cards.loads(raw)
    except Exception as err:
        raise _fail(path, f"embedding card holds damaged JSON ({err})") from None
    if not isinstance(data, dict):
        raise _fail(path, "embedding card JSON is not an object")
    return data


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

_SAVE_SUFFIXES = {
    "diffusers": (".safetensors", ".bin"),
    "a1111": (".pt", ".bin"),
    "kohya": (".safetensors", ".pt", ".ckpt"),
    "sdxl": (".safetensors", ".pt"),
    "png": (".png",),
    "xti": (".safetensors", ".pt"),  # kohya's training script reads only .safetensors; its generator both
    "per-layer": (".safetensors",),
    **{fmt: (".safetensors", ".pt") for fmt in FLOW_LAYOUTS},
}


def _format_for_suffix(emb: Embedding, path: Path) -> str:
    suffix = path.suffix.lower()
    if emb.layers is not None and suffix in (".pt", ".safetensors"):
        return "xti" if suffix == ".pt" else native_format(emb)
    if suffix in (".pt", ".safetensors") and "t5" in emb.vectors:
        return native_format(emb)
    if suffix == ".pt":
        return "sdxl" if len(emb.vectors) > 1 else "a1111"
    if suffix == ".safetensors":
        return "sdxl" if len(emb.vectors) > 1 else "diffusers"
    if suffix == ".png":
        return "png"
    if suffix == ".bin" or (emb.is_sdxl and suffix not in CANDIDATE_SUFFIXES):
        return "diffusers"
    raise _fail(path, f"cannot tell the format from the suffix {suffix or '(none)'}; give one with "
                      f"--format ({', '.join(SAVE_FORMATS)}; format= in Python)")


def _carried_metadata(emb: Embedding) -> dict[str, str]:
    meta = {f"textinv.{k}": json.dumps(emb.meta[k]) for k in CARRIED_META
            if emb.meta.get(k) is not None}
    meta["textinv.name"] = json.dumps(emb.name)
    return meta


def _write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes(path, _canonical_safetensors(safetensors_bytes(tensors, metadata=metadata)))


def _canonical_safetensors(blob: bytes) -> bytes:
    """safetensors writes its header in hash order, which differs between processes; sorted,
    the same embedding always gives the same bytes (and the same A1111 hash).  The data offsets
    are relative to the end of the header, so only the header is rewritten."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


def _write_torch(path: Path, obj) -> None:
    write_bytes(path, torch_zip_bytes(obj))


def torch_zip_bytes(obj) -> bytes:
    """``torch.save``'s zip, holding only the entries every AUTOMATIC1111 release accepts.

    A1111's safe unpickler refuses a zip with any entry but ``data.pkl``, ``version`` and
    ``data/<n>`` (newer releases also allow ``byteorder`` and ``.data/serialization_id``); recent
    torch adds ``.format_version`` and ``.storage_alignment``, so its plain output is refused as
    "possibly malicious".  ``torch.load`` reads the reduced zip as before (a missing byte order
    means little-endian, the only one torch writes).  Saved to memory first: torch names the
    zip's root folder after the file, and a temporary name would make every file's bytes
    differ; fixed timestamps keep the bytes (and A1111's hash) the same run after run.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            root, _, entry = info.filename.partition("/")
            if entry in ("data.pkl", "version") or re.fullmatch(r"data/\d+", entry):
                dst.writestr(zipfile.ZipInfo(f"{root}/{entry}", date_time=(1980, 1, 1, 0, 0, 0)),
                             src.read(info))
    return out.getvalue()


def _single(path: Path, emb: Embedding, fmt: str) -> torch.Tensor:
    if len(emb.vectors) > 1 or SINGLE_KEY not in emb.vectors:
        folder = ", or diffusers with a folder path" if emb.is_sdxl else ""
        native = native_format(emb)
        raise _fail(path, f"{emb.name!r} is an {emb.family} embedding ({' + '.join(emb.slots)}); format {fmt!r} "
                          f"holds one text encoder's vectors: use --format {native} (format={native!r} in "
                          f"Python){folder}")
    return emb.vectors[SINGLE_KEY]


def _save_diffusers(emb: Embedding, path: Path, preview) -> None:
    if "t5" in emb.vectors:  # diffusers' Flux script: one file, clip_l and t5 (its model card loads each by hand)
        _save_flow(emb, path, preview, "onetrainer")
        return
    if emb.is_sdxl:  # diffusers' SDXL training output: two files in one folder
        path.mkdir(parents=True, exist_ok=True)
        for stem, slot in zip(DIFFUSERS_SDXL_STEMS, families.SDXL.keys):
            _write_safetensors(path / f"{stem}.safetensors", {emb.name: emb.vectors[slot]},
                               {"format": "pt", **_carried_metadata(emb)})
        return
    tensor = _single(path, emb, "diffusers")
    if tensor.shape[0] == 1:
        # One vector is stored 1-D, [D], as diffusers' older files do: every reader takes that
        # (diffusers, A1111 and kohya unsqueeze it), while InvokeAI's model probe reads the width
        # of a single-key file from shape[0] and so refuses a [1, D] file.
        tensor = tensor[0]
    if path.suffix.lower() == ".bin":
        _write_torch(path, {emb.name: tensor})
    else:
        _write_safetensors(path, {emb.name: tensor}, {"format": "pt", **_carried_metadata(emb)})


def _a1111_dict(emb: Embedding, tensor) -> dict:
    """The dict A1111 pickles into .pt files (and JSON-encodes into cards)."""
    return {
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": tensor},
        "name": emb.name,
        "step": int(emb.meta.get("step") or 0),
        "sd_checkpoint": emb.meta.get("sd_checkpoint"),
        "sd_checkpoint_name": emb.meta.get("sd_checkpoint_name"),
        # Not A1111's, and ignored by every reader (they take string_to_param): the Clip skip the
        # embedding was trained with, when it was not 1.
        **({"clip_skip": int(emb.meta["clip_skip"])} if (emb.meta.get("clip_skip") or 1) != 1 else {}),
    }


def _save_a1111(emb: Embedding, path: Path, preview) -> None:
    tensor = _single(path, emb, "a1111").float()  # A1111 stores float32; upcasting is exact
    _write_torch(path, _a1111_dict(emb, tensor))


def _architecture(emb: Embedding) -> str:
    """The modelspec architecture id of the family ``emb`` was made for ("unknown" when none)."""
    family = families.of_embedding(emb)
    return f"{family.modelspec if family is not None and family.modelspec else 'unknown'}/textual-inversion"


def _save_kohya(emb: Embedding, path: Path, preview) -> None:
    tensor = _single(path, emb, "kohya")
    if path.suffix.lower() != ".safetensors":
        _write_torch(path, {"emb_params": tensor})
        return
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _architecture(emb),
        "modelspec.implementation": "diffusers",
        "modelspec.title": emb.name,
        **_carried_metadata(emb),
    }
    _write_safetensors(path, {"emb_params": tensor}, metadata)


def _save_sdxl(emb: Embedding, path: Path, preview) -> None:
    """One tensor per encoder, under its slot key (SDXL: clip_l and clip_g; any family of several)."""
    if len(emb.vectors) < 2:
        raise _fail(path, f"format 'sdxl' needs an SDXL embedding ({' + '.join(families.SDXL.keys)}); "
                          f"{emb.name!r} is {emb.family} ({emb.widths[SINGLE_KEY]} wide)")
    tensors = {k: emb.vectors[k] for k in emb.slots}
    if path.suffix.lower() == ".pt":
        _write_torch(path, tensors)
        return
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": _architecture(emb),
                "modelspec.title": emb.name, **_carried_metadata(emb)}
    _write_safetensors(path, tensors, metadata)


# ------------------------------------------------------------------------ the flow families' parts
_KEEPS = {"sd3": families.SD3, "flux": families.FLUX}  # the family whose parts a format holds


def _parts_for(path: Path, emb: Embedding, fmt: str, clip_only: bool) -> tuple[Embedding, str | None]:
    """``emb`` with the parts format ``fmt`` holds, and the one warning line naming the parts (and
    OneTrainer's ``*_out`` twins) it leaves out and why, or None; the caller warns once the file is
    written, so that a refusal is the only line.  The T5 part that ``clip_only`` asks to leave out
    goes unannounced; a single CLIP part left becomes the one-encoder slot (Flux.1's CLIP-L is SD 1.x's)."""
    if emb.layers is not None:
        return emb, None
    have = list(emb.slots)
    keep, why = _kept_parts(path, emb, fmt, clip_only)
    twins = "t5" in keep and (fmt in FLOW_LAYOUTS or fmt == "diffusers")
    lost = [k + OUT_SUFFIX for k in have if k + OUT_SUFFIX in emb.extra and not (twins and k in keep)]
    dropped = [k for k in have if k not in keep and not (clip_only and k == "t5")] + lost
    if keep == have and not lost:
        return emb, None
    if lost:
        why = ((why + "; " if why else "") + f"OneTrainer's output embeddings: format {fmt!r} holds none"
               + ("" if twins or fmt not in FLOW_LAYOUTS else " without the T5 part"))
    warning = f"{printable(emb.name)}: left out {', '.join(dropped)} writing {fmt!r} ({why})" if dropped else None
    return _only(emb, keep, twins), warning


def _kept_parts(path: Path, emb: Embedding, fmt: str, clip_only: bool) -> tuple[list[str], str]:
    """The parts of ``emb`` that format ``fmt`` keeps, and why the others go; refuses (one line,
    naming the embedding's own family) where what would be left is nothing, or does not fit the
    format, or where a flow family's layout would need a T5 part the embedding lacks."""
    have, family = list(emb.slots), _KEEPS.get(fmt)
    what = f"{emb.name!r} is {emb.family} ({' + '.join(have)})"
    if clip_only:
        keep, why = [k for k in have if k != "t5"], ""
        if not keep:
            raise _fail(path, f"{emb.name!r} has no CLIP part ({emb.family}): nothing to write with --clip-only")
    elif family is not None and "t5" not in have:
        raise _fail(path, f"{what}, with no T5 part: {family.name} files need one; add --clip-only (clip_only=True "
                          "in Python) to write the CLIP parts alone, as A1111 does for SD3")
    elif family is not None:
        keep, why = [k for k in have if k in family.keys], f"{family.name} files hold {' + '.join(family.keys)} only"
    elif fmt in ("onetrainer", "comfyui") or (fmt == "diffusers" and "t5" in have):
        keep, why = have, ""
    else:
        keep, why = [k for k in have if k != "t5"], f"no tool reads a T5 part from format {fmt!r}"
        if not keep:
            raise _fail(path, f"{what}: format {fmt!r} holds no T5 part; write --format flux, onetrainer or comfyui")
    if "t5" in have and fmt == "sdxl" and not {"clip_l", "clip_g"} <= set(keep):
        raise _fail(path, f"{what}: format 'sdxl' holds clip_l + clip_g; write --format flux, onetrainer or comfyui")
    if "t5" in have and fmt in ("a1111", "kohya") and len(keep) > 1:
        _single(path, emb, fmt)  # refuses, naming the whole embedding's family and format
    return keep, why


def _only(emb: Embedding, keep: list[str], twins: bool) -> Embedding:
    """``emb`` with the parts ``keep`` (and their ``*_out`` twins where ``twins``); one CLIP part
    alone is stored as a one-encoder embedding, in the slot every single-tensor format holds."""
    vectors = {k: emb.vectors[k] for k in keep}
    extra = {k: t for k, t in emb.extra.items() if twins and k[: -len(OUT_SUFFIX)] in keep}
    if len(vectors) == 1 and keep != ["t5"]:
        vectors, extra = {SINGLE_KEY: vectors[keep[0]]}, {}
    return dataclasses.replace(emb, vectors=vectors, extra=extra, source_format=None)


def _save_flow(emb: Embedding, path: Path, preview, layout: str) -> None:
    """One tensor per part under its key, the T5 part under the layout's key(s) ("both": "t5" and
    "t5xxl", so ComfyUI and OneTrainer each find it), OneTrainer's ``*_out`` twins kept."""
    tensors = {}
    for key in emb.slots:
        for name in (T5_KEYS[layout] if key == "t5" else (key,)):
            tensors[name] = emb.vectors[key].clone()  # own storage each: safetensors refuses shared tensors
    tensors.update({k: t.clone() for k, t in emb.extra.items()})
    if path.suffix.lower() in (".pt", ".bin"):  # diffusers' .bin is a torch file too
        _write_torch(path, tensors)
        return
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": _architecture(emb),
                "modelspec.title": emb.name, **_carried_metadata(emb)}
    _write_safetensors(path, tensors, metadata)


def _vectors_and_steps(emb: Embedding) -> str:
    """"2 vectors · 500 steps" (A1111 writes "2v 500s"); no steps when none are recorded."""
    n, steps = emb.num_vectors, int(emb.meta.get("step") or 0)
    text = f"{n} vector{'' if n == 1 else 's'}"
    return text + (f" · {steps:,} step{'' if steps == 1 else 's'}" if steps > 0 else "")


def _card_details(emb: Embedding) -> list[str]:
    """The small print of a title card: model family and base model, then vectors and steps."""
    family = emb.family
    if family == families.UNKNOWN:
        family = f"{'+'.join(str(emb.widths[k]) for k in emb.slots)}-wide text encoder"
    return [" · ".join(x for x in (family, _base_model(emb)) if x), _vectors_and_steps(emb)]


def _base_model(emb: Embedding) -> str:
    """"name [hash]" of the checkpoint the embedding was trained on, as far as it is recorded."""
    name, checkpoint = emb.meta.get("sd_checkpoint_name"), emb.meta.get("sd_checkpoint")
    return printable(" ".join(x for x in (str(name or ""), f"[{checkpoint}]" if checkpoint else "") if x))


def _save_png(emb: Embedding, path: Path, preview) -> None:
    """An A1111 card: the JSON in a tEXt chunk and, zlib-compressed, in the pixel blocks."""
    if len(emb.vectors) > 1:
        # A1111 reads a card like a .pt dict, and its SDXL branch detaches every value: anything
        # beside the two tensors (a name, a step, a None) makes it fail.  The name is the file's.
        data = {k: emb.vectors[k] for k in emb.slots}
    else:
        data = _a1111_dict(emb, emb.vectors[SINGLE_KEY])
    text = cards.payload(data)
    if preview is not None:
        title = emb.name if emb.name.startswith("<") and emb.name.endswith(">") else f"<{emb.name}>"  # A1111's <name>
        visible = cards.caption(cards.fit_preview(preview), printable(title), _base_model(emb),
                                _vectors_and_steps(emb))
    else:
        visible = cards.title_card(printable(emb.name), _card_details(emb), cards.square_visible_size(text))
    first = emb.vectors[emb.slots[0]].float()[0, :1024].abs()
    shade = (first / first.max().clamp_min(1e-12) * 255).to(torch.uint8).numpy()
    image, info = cards.encode(text, visible, shade)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _save_xti(emb: Embedding, path: Path, preview) -> None:
    """kohya's XTI layout: one ``[n, D]`` tensor per layer under its key, in kohya's order (its
    loaders concatenate the values in file order), nothing else in a .pt (kohya refuses other
    keys); a .safetensors also carries textinv's metadata, which kohya ignores."""
    if list(emb.layers) != list(SD_LAYERS):
        raise _fail(path, f"format 'xti' is kohya's map of the SD 1.x/2.x UNet's 16 cross-attention layers; "
                          f"{emb.name!r} has {len(emb.layers)} layers of another UNet: use --format per-layer "
                          "(format='per-layer' in Python)")
    stacked = emb.vectors[SINGLE_KEY]
    tensors = {key: stacked[i].clone() for i, key in enumerate(XTI_KEYS)}  # own storage each: safetensors refuses shared
    if path.suffix.lower() == ".pt":
        _write_torch(path, tensors)
    else:
        _write_safetensors(path, tensors, _carried_metadata(emb))


def _save_per_layer(emb: Embedding, path: Path, preview) -> None:
    """textinv's per-layer layout: ``layers.000`` … one ``[n, D]`` tensor per layer, the layer
    names (diffusers module paths, forward order) and the model family in the metadata."""
    stacked = emb.vectors[SINGLE_KEY]
    tensors = {LAYER_KEY.format(i): stacked[i].clone() for i in range(len(emb.layers))}
    metadata = {"textinv.layers": json.dumps(list(emb.layers)), "textinv.family": json.dumps(emb.family),
                **_carried_metadata(emb)}
    _write_safetensors(path, tensors, metadata)


_WRITERS = {"diffusers": _save_diffusers, "a1111": _save_a1111, "kohya": _save_kohya,
            "sdxl": _save_sdxl, "png": _save_png, "xti": _save_xti, "per-layer": _save_per_layer,
            **{fmt: functools.partial(_save_flow, layout=layout) for fmt, layout in FLOW_LAYOUTS.items()}}
