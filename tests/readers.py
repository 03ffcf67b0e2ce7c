"""How the tools people run read an embedding file — each tool's reading rules, in our own code.

The rules come from each tool's own reading code, as summarised in
shared/reference/embedding-formats.md ("What the readers really accept") and checked against the
tools' sources (AUTOMATIC1111 1.0–1.10, ComfyUI 2025–26, diffusers 0.4x, kohya sd-scripts 2026,
InvokeAI 6).  Nothing here imports those tools; diffusers, which is a dependency, is run for real.

Each reader returns ``Read(name, vectors)`` — ``vectors`` maps the encoder key (``clip`` for a
one-encoder model, ``clip_l``/``clip_g`` for SDXL, ``clip_l``/``clip_g``/``t5`` for SD3,
``clip_l``/``t5`` for Flux.1) to a float tensor ``[n, D]`` — or raises ``Refused`` with the reason
the tool would give.  The SD3 / Flux.1 readers (OneTrainer, diffusers' Flux model card, A1111's
SD3, Forge, and ComfyUI's for every family) refuse a file of which the tool would drop a part;
those that keep the other parts take ``partial=True`` to return what they keep.
``python tests/readers.py`` prints the reader × format table for every format textinv writes,
then the reader × layout table of SD3 / Flux.1 files in each tool's layout.
"""
from __future__ import annotations

import base64
import collections
import io
import json
import pickle
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

# Text-encoder widths of the model families (what each tool checks a file against).
WIDTHS = {"SD 1.x": {"clip": 768}, "SD 2.x": {"clip": 1024}, "SDXL": {"clip_l": 768, "clip_g": 1280},
          "SD3": {"clip_l": 768, "clip_g": 1280, "t5": 4096}, "Flux.1": {"clip_l": 768, "t5": 4096}}


class Refused(Exception):
    """The tool would not load the file (or would load something else)."""


@dataclass
class Read:
    name: str
    vectors: dict[str, torch.Tensor]


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


# ------------------------------------------------------------------------------- AUTOMATIC1111
# safe.py: every zip entry must match this (v1.0–1.9.4); 1.10 added byteorder and .data/serialization_id.
A1111_ZIP_NAMES = {
    "1.0-1.9": re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$"),
    "1.10": re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$"),
}
# safe.py's RestrictedUnpickler: the globals a pickle may name.
A1111_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
    ("torch", "IntStorage"), ("torch", "LongStorage"), ("torch", "DoubleStorage"), ("torch", "ByteStorage"),
    ("torch", "float32"), ("torch", "BFloat16Storage"), ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"),
    ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
}


class _A1111Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise Refused(f"A1111 safe unpickle: global '{module}/{name}' is forbidden")
        if module == "torch.nn.modules.container":
            return torch.nn.ParameterDict
        if module == "__builtin__":
            return set
        if module == "collections":
            return collections.OrderedDict
        if module.startswith("numpy"):
            import numpy.core.multiarray as ma  # noqa: F401 - names as the pickle spells them

            return getattr(np, name, None) or getattr(ma, name)
        return getattr(torch._utils if module == "torch._utils" else torch, name)

    def persistent_load(self, saved_id):
        if saved_id[0] != "storage":
            raise Refused("A1111 safe unpickle: a persistent id that is not a storage")
        return torch.storage.TypedStorage(_internal=True)


def a1111_safe_check(path: Path, release: str = "1.0-1.9") -> None:
    """``modules/safe.py`` check_pt: entry names, then a restricted unpickle of data.pkl."""
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:  # legacy torch pickle: the first pickles go through the same unpickler
        with open(path, "rb") as f:
            unpickler = _A1111Unpickler(f)
            for _ in range(5):
                try:
                    unpickler.load()
                except EOFError:
                    break
        return
    with z:
        names = z.namelist()
        bad = [n for n in names if not A1111_ZIP_NAMES[release].match(n)]
        if bad:
            raise Refused(f"A1111 {release}: bad file inside {path.name}: {bad[0]} (\"The file may be malicious\")")
        pkl = [n for n in names if re.match(r"^([^/]+)/data\.pkl$", n)]
        if len(pkl) != 1:
            raise Refused("A1111: data.pkl not found (or several)")
        _A1111Unpickler(io.BytesIO(z.read(pkl[0]))).load()


def _a1111_card(path: Path) -> dict:
    with Image.open(path) as im:
        im.load()
        text = dict(getattr(im, "text", None) or {})
        if "sd-ti-embedding" in text:
            raw = base64.b64decode(text["sd-ti-embedding"])
        else:
            raw = _a1111_card_pixels(im)
    return json.loads(raw, object_hook=lambda d: torch.from_numpy(np.array(d["TORCHTENSOR"])) if "TORCHTENSOR" in d else d)


def _lcg_low_nibbles(count: int) -> np.ndarray:
    out, x = np.empty(count, dtype=np.uint8), 0
    for i in range(count):
        x = (1664525 * x + 1013904223) % 2**32
        out[i] = (x % 255) & 0x0F
    return out


def _a1111_card_pixels(im) -> bytes:
    """A1111's extract_image_data_embed: crop black, low nibbles, two zero columns, XOR, zlib."""
    arr = np.asarray(im.convert("RGB"))
    lit = (arr > 0).all(axis=2)
    rows, cols = np.nonzero(lit.any(axis=1))[0], np.nonzero(lit.any(axis=0))[0]
    if not len(rows):
        raise Refused("A1111: image holds no embedding")
    arr = arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    zero_cols = np.nonzero(arr.sum(axis=(0, 2)) == 0)[0]
    if len(zero_cols) < 2:
        raise Refused("A1111: image holds no embedding (skipped silently)")
    lower, upper = arr[:, : zero_cols[0]], arr[:, zero_cols[-1] + 1 :]
    lower = lower.reshape(-1) ^ _lcg_low_nibbles(lower.size)
    upper = upper.reshape(-1) ^ _lcg_low_nibbles(upper.size)
    return zlib.decompress(((upper << 4) | lower).astype(np.uint8).tobytes())


def _webui_vectors(data, tool: str) -> tuple[dict[str, torch.Tensor], int]:
    """create_embedding_from_data (A1111 and Forge alike): the vectors ({"clip": tensor} or an SDXL-style
    dict of every key) and the width the tool checks against the model's."""
    if "string_to_param" in data:
        params = getattr(data["string_to_param"], "_parameters", data["string_to_param"])
        if len(params) != 1:
            raise Refused(f"{tool}: embedding file has multiple terms in it")
        vec = next(iter(params.values())).detach().float()
        vectors = {"clip": vec}
        width = vec.shape[-1]
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:
        try:
            vectors = {k: v.detach().float() for k, v in data.items()}  # every value: extra keys break it
        except AttributeError as e:
            raise Refused(f"{tool} SDXL branch: {e}") from None
        width = vectors["clip_g"].shape[-1] + vectors["clip_l"].shape[-1]
    elif type(data) is dict and data and type(next(iter(data.values()))) is torch.Tensor:
        if len(data) != 1:
            raise Refused(f"{tool}: embedding file has multiple terms in it")
        vec = next(iter(data.values())).detach().float()
        vectors = {"clip": vec.unsqueeze(0) if vec.ndim == 1 else vec}
        width = vec.shape[-1]
    else:
        raise Refused(f"{tool}: Couldn't identify as neither textual inversion embedding nor diffuser concept")
    return vectors, width


def a1111(path: Path, family: str, release: str = "1.0-1.9") -> Read:
    """textual_inversion.py load_from_file + create_embedding_from_data, then the width filter."""
    suffix = path.suffix.upper()
    name = _stem(path)
    if suffix in (".PNG", ".WEBP"):
        data = _a1111_card(path)
        name = data.get("name", name)
    elif suffix in (".PT", ".BIN"):
        a1111_safe_check(path, release)
        data = torch.load(path, map_location="cpu")  # torch's default weights_only, as A1111 calls it
    elif suffix == ".SAFETENSORS":
        data = load_file(str(path), device="cpu")
    else:
        raise Refused(f"A1111 does not read {suffix} files")
    vectors, width = _webui_vectors(data, "A1111")
    expected = sum(WIDTHS[family].values())
    if width != expected:
        raise Refused(f"A1111: skipped (width {width}, the model expects {expected})")
    return Read(name, {k: v for k, v in vectors.items() if k in WIDTHS[family]})


# ----------------------------------------------------------------------------------- ComfyUI
# Each tokenizer's embedding_key, by its encoder's width: SDTokenizer's default 'clip_l' (768),
# SD2's 'clip_h', SDXLClipGTokenizer's 'clip_g', and the T5XXLTokenizer of comfy/text_encoders/sd3_clip.py
# and comfy/text_encoders/flux.py: 't5xxl' (embedding_size 4096).
COMFY_KEYS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g", 4096: "t5xxl"}


def _comfy_pick(embed: dict, key: str) -> tuple[torch.Tensor, str]:
    """comfy/sd1_clip.py load_embed's choice for one tokenizer, and where it came from: the one
    string_to_param tensor; else the tokenizer's key; else bundle_emb.* keys ending in
    '.string_to_param.*', then in '.KEY', all concatenated whatever their bundle name
    (bundled_embed); else the file's first tensor, whatever its width."""
    if "string_to_param" in embed:
        return next(iter(embed["string_to_param"].values())), "string_to_param"
    if key in embed:
        return embed[key], key
    for suffix in (".string_to_param.*", f".{key}"):
        bundled = [k for k in embed if k.startswith("bundle_emb.") and k.endswith(suffix)]
        if bundled:
            return torch.cat([embed[k] for k in bundled], dim=0), f"bundle_emb.*{suffix}"
    first = next(iter(embed))
    return embed[first], f"the first tensor '{first}'"


def comfyui(path: Path, family: str, partial: bool = False) -> Read:
    """comfy/sd1_clip.py load_embed, once per text encoder with its key; SDClipModel's
    set_up_textual_embeddings then drops (with a warning) vectors whose width is not the encoder's,
    and the other encoders keep theirs.  ``partial``: return the parts it keeps instead of refusing."""
    if path.suffix.lower() not in (".safetensors", ".pt", ".bin"):
        raise Refused("ComfyUI loads embeddings from .safetensors, .pt and .bin files only")
    if path.suffix.lower() == ".safetensors":
        embed = load_file(str(path), device="cpu")
    else:
        try:
            embed = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # its raw-zip fallback guesses 768/1024 widths: not a faithful load
            raise Refused(f"ComfyUI: torch.load(weights_only=True) failed: {e}") from None
    vectors, dropped = {}, {}
    for slot, width in WIDTHS[family].items():
        key = COMFY_KEYS[width]
        out, source = _comfy_pick(embed, key)
        out = out.float()
        out = out.unsqueeze(0) if out.ndim == 1 else out
        if out.shape[-1] == width:
            vectors[slot] = out
        elif source == key or source == "string_to_param":
            dropped[slot] = f"ComfyUI: shape mismatch when trying to apply embedding, ignored {out.shape[-1]} != {width}"
        else:
            dropped[slot] = (f"ComfyUI: {key} part missing — falls to {source} ({out.shape[-1]}-wide) and is "
                             f"ignored ({out.shape[-1]} != {width})")
    return _whole_or_part(_stem(path), vectors, dropped, partial)


def _whole_or_part(name: str, vectors: dict, dropped: dict, partial: bool) -> Read:
    """Every part, or Refused with the first dropped part's reason; ``partial`` keeps what loads
    (Refused only when nothing does)."""
    if dropped and not (partial and vectors):
        raise Refused(next(iter(dropped.values())))
    return Read(name, vectors)


# ---------------------------------------------------------------------------------- diffusers
def diffusers(path: Path, family: str, pipe=None) -> Read:
    """diffusers' own ``load_textual_inversion``, run for real on ``pipe`` (its encoders' widths)."""
    from textinv import tokens

    if pipe is None:
        raise Refused("diffusers: no pipeline given")
    pairs = tokens.encoder_pairs(pipe)
    before = [len(tok) for tok, _ in pairs]
    files = [path] if path.is_file() else [path / "learned_embeds.safetensors", path / "learned_embeds_2.safetensors"]
    if len(files) != len(pairs):
        raise Refused("diffusers: one file per text encoder (it rejects single-file {clip_l, clip_g})")
    try:
        for file, (tok, te) in zip(files, pairs):
            pipe.load_textual_inversion(str(file), tokenizer=tok, text_encoder=te)
    except (ValueError, KeyError) as e:
        raise Refused(f"diffusers: {' '.join(str(e).split())[:160]}") from None
    vectors, name = {}, None
    for slot, (tok, te), n0 in zip(WIDTHS[family], pairs, before):
        added = list(range(n0, len(tok)))
        name = tok.convert_ids_to_tokens(added[0])
        vectors[slot] = te.get_input_embeddings().weight[added].detach().float()
    return Read(name, vectors)


# -------------------------------------------------------------------------------------- kohya
def kohya(path: Path, family: str) -> Read:
    """sd-scripts load_weights (train_textual_inversion.py / sdxl_train_textual_inversion.py)."""
    if path.suffix.lower() == ".safetensors":
        data = load_file(str(path))
    elif path.suffix.lower() in (".pt", ".ckpt", ".bin"):
        data = torch.load(path, map_location="cpu")
        if not isinstance(data, dict):
            raise Refused("kohya: weights file is not a dict")
        if path.suffix.lower() == ".pt" and "string_to_param" in data:
            data = getattr(data["string_to_param"], "_parameters", data["string_to_param"])
    else:
        raise Refused(f"kohya does not read {path.suffix} files")
    if family == "SDXL":
        if data.get("clip_l") is None or data.get("clip_g") is None:
            raise Refused("kohya SDXL: needs clip_l and clip_g")
        return Read(_stem(path), {"clip_l": data["clip_l"].float(), "clip_g": data["clip_g"].float()})
    emb = next(iter(data.values()))
    if type(emb) is not torch.Tensor:
        raise Refused(f"kohya: the first value is a {type(emb).__name__}, not a tensor")
    emb = emb.unsqueeze(0) if emb.ndim == 1 else emb
    if emb.shape[-1] != WIDTHS[family]["clip"]:
        raise Refused(f"kohya: width {emb.shape[-1]} does not fit the {WIDTHS[family]['clip']}-wide encoder")
    return Read(_stem(path), {"clip": emb.float()})


# ----------------------------------------------------------------------------------- InvokeAI
INVOKE_BASES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}


def invokeai(path: Path, family: str) -> Read:
    """The model probe (does it look like an embedding, which base), then TextualInversionModelRaw."""
    if path.suffix.lower() == ".safetensors":
        ckpt = load_file(str(path))
    elif path.suffix.lower() in (".pt", ".bin", ".ckpt", ".pth"):
        ckpt = torch.load(path, map_location="cpu")
    else:
        raise Refused(f"InvokeAI does not read {path.suffix} embedding files")
    looks = (_stem(path) == "learned_embeds" or {"string_to_param", "emb_params", "clip_g"} & set(ckpt)
             or (len(ckpt) < 10 and all(isinstance(v, torch.Tensor) for v in ckpt.values())))
    if not looks:
        raise Refused("InvokeAI probe: not a textual inversion file")
    if "string_to_token" in ckpt:
        token_dim = next(iter(ckpt["string_to_param"].values())).shape[-1]
    elif "emb_params" in ckpt:
        token_dim = ckpt["emb_params"].shape[-1]
    elif "clip_g" in ckpt:
        token_dim = ckpt["clip_g"].shape[-1]
    else:
        token_dim = next(iter(ckpt.values())).shape[0]  # sic: shape[0] of a single-key file
    base = INVOKE_BASES.get(int(token_dim))
    if base != family:
        raise Refused(f"InvokeAI probe: token dim {token_dim} → {base or 'no base'}, not {family}")
    if "string_to_param" in ckpt:
        emb, emb_2 = next(iter(ckpt["string_to_param"].values())), None
    elif "emb_params" in ckpt:
        emb, emb_2 = ckpt["emb_params"], None
    elif "clip_g" in ckpt and "clip_l" in ckpt:
        emb, emb_2 = ckpt["clip_g"], ckpt["clip_l"]
    else:
        emb, emb_2 = next(iter(ckpt.values())), None
    emb = emb.unsqueeze(0) if emb.ndim == 1 else emb
    if family == "SDXL":
        return Read(_stem(path), {"clip_l": emb_2.float(), "clip_g": emb.float()})
    return Read(_stem(path), {"clip": emb.float()})


READERS = {"A1111 1.0-1.9": a1111, "A1111 1.10": lambda p, f: a1111(p, f, "1.10"), "ComfyUI": comfyui,
           "diffusers": diffusers, "kohya": kohya, "InvokeAI": invokeai}


# --------------------------------------------------------------------------- SD3 and Flux.1
# What each tool reads of an SD3 (CLIP-L + CLIP-G + T5-XXL) or Flux.1 (CLIP-L + T5-XXL) embedding:
# slot -> the file key it takes.  A slot a tool leaves out is never read by it, whatever the file holds.
# Sources read: ComfyUI master (comfy/sd1_clip.py, comfy/sdxl_clip.py, comfy/text_encoders/sd3_clip.py
# and flux.py), OneTrainer 23df383, diffusers 58eb52c, Forge dfdcbab, A1111 1.10 (modules/models/sd3).
FLOW_PARTS = {
    "ComfyUI": {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl"},  # then bundle_emb.*.KEY, then the first tensor
    "OneTrainer": {"clip_l": "clip_l_out, else clip_l", "clip_g": "clip_g_out, else clip_g", "t5": "t5_out, else t5"},
    "diffusers (Flux card)": {"clip_l": "clip_l", "t5": "t5"},  # Flux.1 only: SD3's pipeline has no loader
    "A1111 1.10": {"clip_l": "clip_l", "clip_g": "clip_g"},  # SD3 only, both keys needed; no T5, no Flux
    "Forge": {"clip_l": "a one-tensor file 768 wide", "clip_g": "a one-tensor file 1280 wide (SD3.5)"},  # no T5
}


# ---------------------------------------------------------------------------------- OneTrainer
def _onetrainer_load(path: Path) -> dict:
    """EmbeddingLoaderMixin.__load_embedding: torch.load(weights_only=True), else safetensors."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        pass
    try:
        return load_file(str(path))
    except Exception:
        raise Refused(f"OneTrainer: could not load embedding: {path.name}") from None


def onetrainer(path: Path, family: str) -> Read:
    """OneTrainer's reading (BaseStableDiffusion3Setup / BaseFluxSetup._setup_embeddings): per encoder
    the '<key>_out' tensor when the file has one, else '<key>' (clip_l, clip_g, t5); other keys are
    ignored.  A missing part leaves that encoder's vector None, which its AdditionalEmbeddingWrapper
    cannot concatenate; a tensor of the wrong width does not concatenate either."""
    if family not in ("SD3", "Flux.1"):
        raise Refused(f"OneTrainer's {family} embeddings are not modelled here")
    data = _onetrainer_load(path)
    if not isinstance(data, dict):
        raise Refused("OneTrainer: the embedding file is not a dict of tensors")
    vectors = {}
    for slot, width in WIDTHS[family].items():
        vec = data.get(f"{slot}_out", data.get(slot))
        if vec is None:
            raise Refused(f"OneTrainer: no '{slot}' or '{slot}_out' key — the {slot} part is None and "
                          f"its embedding wrapper fails on it")
        if vec.ndim != 2 or vec.shape[-1] != width:
            raise Refused(f"OneTrainer: '{slot}' is {tuple(vec.shape)}, its encoder takes [n, {width}]")
        vectors[slot] = vec.float()
    return Read(_stem(path), vectors)


def onetrainer_bundle(path: Path, family: str, name: str) -> Read:
    """A LoRA with bundled embeddings, as OneTrainer writes it (StableDiffusion3LoRASaver /
    FluxLoRASaver._get_state_dict: 'bundle_emb.<placeholder>.<clip_l|clip_g|t5>' and their '_out'
    twins).  OneTrainer itself never reads them back: its LoRA loader passes bundle_emb.* through
    (load_lora_util) and LoRAModuleWrapper.load_state_dict keeps only its own prefix."""
    data = load_file(str(path))
    if not any(k.startswith(f"bundle_emb.{name}.") for k in data):
        raise Refused(f"OneTrainer: no bundle_emb.{name}.* keys in {path.name}")
    raise Refused(f"OneTrainer: its LoRA loader drops bundle_emb.{name}.* — bundled embeddings are write-only")


# ----------------------------------------------------------------------- diffusers (Flux card)
def diffusers_flux_manual(path: Path, family: str) -> Read:
    """The loading snippet of the model card that diffusers' train_dreambooth_lora_flux_advanced.py
    writes (save_model_card): safetensors' load_file, then load_textual_inversion(state_dict["clip_l"],
    token=["<s0>", "<s1>", ...]) into text_encoder/tokenizer and state_dict["t5"] with the same tokens
    into text_encoder_2/tokenizer_2.  A list of several tokens needs one row per token (its step 4.1),
    and each row must be as wide as the encoder's input embeddings (step 6)."""
    if family == "SD3":
        raise Refused("diffusers: StableDiffusion3Pipeline has no load_textual_inversion (no TextualInversionLoaderMixin)")
    if family != "Flux.1":
        raise Refused(f"diffusers (Flux card): not a {family} reader")
    if path.suffix.lower() != ".safetensors":
        raise Refused("diffusers (Flux card): the card reads the file with safetensors' load_file")
    state = load_file(str(path))
    tokens, vectors = None, {}
    for slot, width in WIDTHS[family].items():
        if slot not in state:
            raise Refused(f"diffusers (Flux card): no '{slot}' key (KeyError) — the {slot} encoder gets no embedding")
        vec = state[slot].float()
        vec = vec.unsqueeze(0) if vec.ndim == 1 else vec
        tokens = tokens or [f"<s{i}>" for i in range(vec.shape[0])]
        if len(tokens) > 1 and vec.shape[0] != len(tokens):
            raise Refused(f"diffusers (Flux card): '{slot}' has {vec.shape[0]} rows for {len(tokens)} tokens (ValueError)")
        if vec.shape[-1] != width:
            raise Refused(f"diffusers (Flux card): '{slot}' is {vec.shape[-1]} wide, its encoder {width} (ValueError)")
        vectors[slot] = vec
    return Read(tokens[0], vectors)


# ---------------------------------------------------------------------------------- A1111, Forge
def a1111_sd3(path: Path, family: str, release: str = "1.10", partial: bool = False) -> Read:
    """A1111 1.10's SD3 (modules/models/sd3/sd3_cond.py): the embedding database expects the width
    Sd3ClipLG.encode_embedding_init_text gives, 768 + 1280 — SDXL's — so only a {clip_l, clip_g, ...}
    dict loads, CLIP-L taking 'clip_l' and CLIP-G 'clip_g' (other_impls CLIPEmbeddings'
    textual_inversion_key).  Sd3T5 tokenizes plain text: the T5 part is never read.  No Flux.1."""
    if family != "SD3":
        raise Refused(f"A1111 has no {family} support")
    got = a1111(path, "SDXL", release)
    if set(got.vectors) != {"clip_l", "clip_g"}:
        raise Refused("A1111 SD3: a single 2048-wide tensor is no clip_l/clip_g pair")
    return _whole_or_part(got.name, got.vectors, {"t5": "A1111: its SD3 T5 encoder takes no embeddings (Sd3T5)"},
                          partial)


# backend/diffusion_engine/sd35.py and flux.py: one ClassicTextProcessingEngine per CLIP encoder,
# each with its own embedding database of this expected width; the T5TextProcessingEngine has none.
FORGE_ENGINES = {"SD3": {"clip_l": 768, "clip_g": 1280}, "Flux.1": {"clip_l": 768}}


def forge(path: Path, family: str, partial: bool = False) -> Read:
    """Forge's backend/text_processing/textual_inversion.py: load_from_file, create_embedding_from_data
    (A1111's, without the safe unpickler), then each CLIP engine keeps the file only when its width is
    the engine's expected shape.  A {clip_l, clip_g} dict is 2048 wide (SDXL's), so SD3.5's 768 and
    1280 engines both skip it; a {clip_l, t5} file has 'multiple terms'.  No T5 (forge issue #2101)."""
    if family not in FORGE_ENGINES:
        raise Refused(f"Forge's {family} embeddings are not modelled here")
    suffix, name = path.suffix.upper(), _stem(path)
    if suffix in (".PNG", ".WEBP"):
        data = _a1111_card(path)
        name = data.get("name", name)
    elif suffix in (".PT", ".BIN"):
        data = torch.load(path, map_location="cpu")
    elif suffix == ".SAFETENSORS":
        data = load_file(str(path), device="cpu")
    else:
        raise Refused(f"Forge does not read {suffix} files")
    found, width = _webui_vectors(data, "Forge")
    vectors, dropped = {}, {}
    for slot, expected in FORGE_ENGINES[family].items():
        if width == expected:  # a dict gives the engine its key's tensor, a single tensor goes whole
            vectors[slot] = found.get(slot, found.get("clip"))
        else:
            dropped[slot] = f"Forge: skipped by its {slot} engine (width {width}, it expects {expected})"
    dropped["t5"] = "Forge: its T5 engine takes no embeddings (forge issue #2101)"
    return _whole_or_part(name, vectors, dropped, partial)


FLOW_READERS = {"ComfyUI": comfyui, "OneTrainer": onetrainer, "diffusers (Flux card)": diffusers_flux_manual,
                "A1111 1.10": a1111_sd3, "Forge": forge}
PARTIAL = ("ComfyUI", "A1111 1.10", "Forge")  # the tools that keep the parts they can read


def flow_table() -> str:
    """The reader × layout table for SD3 / Flux.1 files in each tool's layout (test_readers_flow's)."""
    import tempfile

    from test_readers_flow import LAYOUTS, write_layout  # noqa: E402 - the test module holds the layouts

    rows = ["| layout | " + " | ".join(FLOW_READERS) + " |", "|---|" + "---|" * len(FLOW_READERS)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, (family, _) in LAYOUTS.items():
            path, cells = write_layout(label, Path(tmp)), []
            for reader, read in FLOW_READERS.items():
                try:
                    got = read(path, family, partial=True) if reader in PARTIAL else read(path, family)
                    kept = [s for s in WIDTHS[family] if s in got.vectors]
                    missing = [s for s in WIDTHS[family] if s not in got.vectors]
                    cells.append("all" if not missing else "+".join(kept) + f" (no {'+'.join(missing)})")
                except Refused as e:
                    cells.append(f"refused: {e}"[:70])
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------- what textinv writes, and where
@dataclass(frozen=True)
class Written:
    """One kind of file textinv writes: ``textinv.formats.save(emb, FILE, fmt)``."""

    label: str
    fmt: str
    filename: str
    family: str
    vectors: int


WRITTEN = [
    Written("diffusers .safetensors, 1 vector", "diffusers", "my-cat.safetensors", "SD 1.x", 1),
    Written("diffusers .safetensors, 3 vectors", "diffusers", "my-cat.safetensors", "SD 1.x", 3),
    Written("diffusers .bin, 1 vector", "diffusers", "my-cat.bin", "SD 1.x", 1),
    Written("A1111 .pt, 3 vectors", "a1111", "my-cat.pt", "SD 1.x", 3),
    Written("A1111 .pt, SD 2.x", "a1111", "my-cat.pt", "SD 2.x", 2),
    Written("A1111 card .png", "png", "my-cat.png", "SD 1.x", 3),
    Written("kohya .safetensors", "kohya", "my-cat.safetensors", "SD 1.x", 3),
    Written("kohya .pt", "kohya", "my-cat.pt", "SD 1.x", 3),
    Written("SDXL .safetensors", "sdxl", "my-xl.safetensors", "SDXL", 2),
    Written("SDXL .pt", "sdxl", "my-xl.pt", "SDXL", 2),
    Written("SDXL card .png", "png", "my-xl.png", "SDXL", 2),
    Written("diffusers SDXL folder", "diffusers", "my-xl", "SDXL", 2),
]

# Where a reader cannot load a kind of file by that tool's design, and why.  Every other pair must
# load exactly: the same tensors, under the expected name.
NOT_READ = {
    ("A1111 card .png", "ComfyUI"): "reads no image cards",
    ("A1111 card .png", "kohya"): "reads no image cards",
    ("A1111 card .png", "InvokeAI"): "reads no image cards",
    ("A1111 card .png", "diffusers"): "reads no image cards",
    ("SDXL card .png", "ComfyUI"): "reads no image cards",
    ("SDXL card .png", "kohya"): "reads no image cards",
    ("SDXL card .png", "InvokeAI"): "reads no image cards",
    ("SDXL card .png", "diffusers"): "reads no image cards",
    ("SDXL .safetensors", "diffusers"): "rejects single-file {clip_l, clip_g}; use the two-file folder",
    ("SDXL .pt", "diffusers"): "rejects single-file {clip_l, clip_g}; use the two-file folder",
    ("diffusers .safetensors, 3 vectors", "InvokeAI"): "its probe takes a single-key file's width from shape[0]",
    ("diffusers SDXL folder", "A1111 1.0-1.9"): "a diffusers-only layout (two files)",
    ("diffusers SDXL folder", "A1111 1.10"): "a diffusers-only layout (two files)",
    ("diffusers SDXL folder", "ComfyUI"): "a diffusers-only layout (two files)",
    ("diffusers SDXL folder", "kohya"): "a diffusers-only layout (two files)",
    ("diffusers SDXL folder", "InvokeAI"): "a diffusers-only layout (two files)",
}


def expected_name(w: Written, reader: str, stem: str, stored: str) -> str:
    """Names as each tool gives them: the file stem, except cards (stored name, SD only) and diffusers."""
    if reader == "diffusers":
        return {"kohya": "emb_params"}.get(w.fmt, stored)  # kohya files need token= in diffusers
    if reader.startswith("A1111") and w.fmt == "png" and w.family != "SDXL":
        return stored
    return stem


def table() -> str:
    """The reader × format table for every format textinv writes (run in a temporary folder)."""
    import tempfile

    from test_readers import check  # noqa: E402 - the test module holds the fixtures' makers

    rows = ["| file textinv writes | " + " | ".join(READERS) + " |", "|---|" + "---|" * len(READERS)]
    with tempfile.TemporaryDirectory() as tmp:
        for w in WRITTEN:
            cells = []
            for reader in READERS:
                if (w.label, reader) in NOT_READ:
                    cells.append("n/a")
                    continue
                try:
                    check(w, reader, Path(tmp))
                    cells.append("loads")
                except (Refused, AssertionError) as e:
                    cells.append(f"FAILS: {e}"[:60])
            rows.append(f"| {w.label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    import os
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    print(table())
    print()
    print(flow_table())
