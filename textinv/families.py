"""Model families as data: which text encoders a model has, and what an embedding for it holds.

Each family is one row of :data:`FAMILIES`: its text encoders in order (a :class:`Slot` each: the
key its vectors have in ``Embedding.vectors`` and in files, the pipeline attributes holding its
tokenizer and text encoder, its width), which encoder gives the pooled prompt embedding, and which
hidden layer the UNet takes.  The rest of textinv asks this table instead of branching on slot
names or pipeline attributes, so each family (SD 1.x, SD 2.x, SDXL; SD3: CLIP-L + CLIP-G + T5;
Flux.1: CLIP-L + T5) is a row, and a model's settings file may add one (:func:`register`, see
textinv.models).

A pipeline is recognised by the encoder attributes it sets and the kind of encoder each holds
(CLIP or T5; then by their widths), a file's vector set by its slot keys (then by their widths).
A vector set may hold only some of a family's encoders (a *partial* embedding: the CLIP parts of
an SD3 file as A1111 writes them, or a T5 part alone); the encoders it lacks leave its trigger out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import TextinvError

SINGLE_KEY = "clip"  # the slot of one-encoder families: what a file holding one tensor holds
UNKNOWN = "an unknown model family"


@dataclass(frozen=True)
class Slot:
    """One text encoder of a family."""

    key: str  # its vectors' key in Embedding.vectors and in files
    tokenizer: str = "tokenizer"  # the pipeline attribute holding its tokenizer
    text_encoder: str = "text_encoder"  # the pipeline attribute holding its text encoder
    width: int | None = None  # its token vectors' width in this family; None: any
    # Its encoder's kind: "clip" (BPE, 75-token chunks between a start and an end token) or "t5"
    # (SentencePiece: no start token, "</s>" at the end, pad id 0; no chunks).
    kind: str = "clip"


@dataclass(frozen=True)
class Family:
    """A model family: its text encoders and how their outputs condition the UNet."""

    name: str  # as messages and files name it: "SD 1.x"
    slots: tuple[Slot, ...]  # in encoder order: the order prompts are encoded and joined in
    layout: str  # how messages name every family with these slots: "SD 1.x/2.x"
    pooled: str | None = None  # the slot whose projected output is the pooled prompt embedding
    # Which hidden state the UNet takes: -1 the last (normed), where A1111's Clip skip applies;
    # else that layer as it is (SDXL: the penultimate), where Clip skip does not.
    hidden_layer: int = -1
    per_layer: bool = False  # P+ (per-layer) embeddings fit: one encoder, a UNet's cross-attention layers
    modelspec: str | None = None  # its architecture id in files' modelspec metadata
    pipeline_class: str = "StableDiffusionPipeline"  # the diffusers class its single-file checkpoints load as
    checkpoint_key: str | None = None  # a key prefix that only its single-file checkpoints hold
    # How its denoiser takes the encoders' outputs: "unet" (SD: cross-attention on the CLIP hidden
    # states, concatenated along the width), "sd3" (CLIP-L/G hidden states joined along the width,
    # padded to T5's and put before T5's along the sequence; pooled: both CLIPs' joined) or "flux"
    # (T5's hidden states; pooled: CLIP-L's).
    joins: str = "unet"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.slots)

    @property
    def clip_skip(self) -> bool:
        """Whether A1111's Clip skip applies (the UNet takes the last hidden state)."""
        return self.hidden_layer == -1

    @property
    def layer_name(self) -> str:
        """How messages name the hidden layer the UNet takes ("penultimate")."""
        return {-1: "last", -2: "penultimate"}.get(self.hidden_layer, f"hidden_states[{self.hidden_layer}]")

    def slot(self, key: str) -> Slot:
        return next(s for s in self.slots if s.key == key)

    def fits(self, widths: Sequence[int]) -> bool:
        """Whether encoders of these widths (in slot order) are this family's."""
        return len(widths) == len(self.slots) and all(s.width in (None, w) for s, w in zip(self.slots, widths))


SD1 = Family("SD 1.x", (Slot(SINGLE_KEY, width=768),), "SD 1.x/2.x", per_layer=True, modelspec="stable-diffusion-v1")
SD2 = Family("SD 2.x", (Slot(SINGLE_KEY, width=1024),), "SD 1.x/2.x", per_layer=True,
             modelspec="stable-diffusion-v2-768-v")
SDXL = Family("SDXL", (Slot("clip_l", width=768), Slot("clip_g", "tokenizer_2", "text_encoder_2", width=1280)), "SDXL",
              pooled="clip_g", hidden_layer=-2, modelspec="stable-diffusion-xl-v1-base",
              pipeline_class="StableDiffusionXLPipeline", checkpoint_key="conditioner.embedders.1")

# The flow-matching families (diffusers StableDiffusion3Pipeline, FluxPipeline): their CLIP encoders
# give the penultimate hidden state (SD3) or only the pooled output (Flux); T5-XXL v1.1 is 4096 wide.
SD3 = Family("SD3", (Slot("clip_l", width=768), Slot("clip_g", "tokenizer_2", "text_encoder_2", width=1280),
                     Slot("t5", "tokenizer_3", "text_encoder_3", width=4096, kind="t5")), "SD3",
             hidden_layer=-2, modelspec="stable-diffusion-v3-medium", pipeline_class="StableDiffusion3Pipeline",
             checkpoint_key="model.diffusion_model.joint_blocks", joins="sd3")
FLUX = Family("Flux.1", (Slot("clip_l", width=768), Slot("t5", "tokenizer_2", "text_encoder_2", width=4096, kind="t5")),
              "Flux.1", modelspec="flux-1-dev", pipeline_class="FluxPipeline",
              checkpoint_key="model.diffusion_model.double_blocks", joins="flux")

FAMILIES: list[Family] = [SD1, SD2, SDXL, SD3, FLUX]


def register(family: Family) -> None:
    """Add a row; a family already named so, or one with the same slots and widths, is kept instead."""
    if not any(f.name == family.name or f.slots == family.slots for f in FAMILIES):
        FAMILIES.append(family)


def unregister(family: Family) -> None:
    """Remove a registered row (a test's, or a plug-in's that goes away)."""
    if family in FAMILIES:
        FAMILIES.remove(family)


def like(base: Family, name: str, *widths: int) -> Family:
    """A family built as ``base`` with other encoder widths (a model's settings file names one)."""
    slots = tuple(dataclasses.replace(s, width=int(w)) for s, w in zip(base.slots, widths))
    return dataclasses.replace(base, name=name, slots=slots, modelspec=None)


# ------------------------------------------------------------------------------------- pipelines
def kind_of(model_type) -> str:
    """"t5" for a T5 (or UMT5) config's ``model_type``, else "clip": what a slot's ``kind`` says."""
    return "t5" if str(model_type) in ("t5", "umt5") else "clip"


def encoder_kind(text_encoder) -> str:
    """A loaded encoder's kind (:func:`kind_of` its config's model type)."""
    return kind_of(getattr(getattr(text_encoder, "config", None), "model_type", ""))


def of_pipeline(pipe) -> Family:
    """The family of a pipeline (or any object with tokenizer/text-encoder attributes): of the
    families whose encoder attributes it sets with encoders of the slots' kinds, those with the
    most encoders; among them the first whose widths fit, else the first."""
    found = [f for f in FAMILIES if all(getattr(pipe, s.text_encoder, None) is not None
                                        and encoder_kind(getattr(pipe, s.text_encoder)) == s.kind for s in f.slots)]
    if not found:
        raise TextinvError(f"{type(pipe).__name__} has no CLIP text encoder to apply embeddings to")
    most = max(len(f.slots) for f in found)
    found = [f for f in found if len(f.slots) == most]
    return next((f for f in found if f.fits(pipeline_widths(pipe, f))), found[0])


def pipeline_widths(pipe, family: Family) -> list[int]:
    """The widths of the pipeline's encoders in ``family``'s slots, in slot order."""
    return [int(getattr(pipe, s.text_encoder).get_input_embeddings().embedding_dim) for s in family.slots]


def model_name(family: Family, widths: Sequence[int]) -> str:
    """What a model of ``family`` with encoders this wide is called: the family, when the widths
    fit it; else a one-encoder model's width's name, or "32+48-wide model"."""
    widths = [int(w) for w in widths]
    if family.fits(widths):
        return family.name
    if len(widths) == 1:
        return of_width(widths[0])
    return "+".join(map(str, widths)) + "-wide model"


# ------------------------------------------------------------------------------------- vector sets
def _widths(vectors: Mapping) -> dict[str, int]:
    """{slot: width} of {slot: tensor} (the last dimension) or of {slot: width}."""
    return {k: int(v) if isinstance(v, int) else int(v.shape[-1]) for k, v in vectors.items()}


def by_keys(keys) -> list[Family]:
    """The families whose slots are exactly ``keys``."""
    keys = set(keys)
    return [f for f in FAMILIES if set(f.keys) == keys]


def holding(keys) -> list[Family]:
    """The several-encoder families of which ``keys`` are some slots but not all (a partial
    embedding's: T5 alone is SD3's or Flux.1's)."""
    keys = set(keys)
    return [f for f in FAMILIES if len(f.slots) > 1 and keys < set(f.keys)]


def valid_keys(keys) -> bool:
    """Whether a vector set with these slot keys is an embedding: a family's slots, or some of a
    several-encoder family's that hold a T5 one (CLIP parts alone are SDXL's or a one-encoder
    model's layout: a partial CLIP set is never made up)."""
    keys = set(keys)
    return bool(by_keys(keys)) or (bool(keys) and any(f.slot(k).kind == "t5" for f in holding(keys) for k in keys))


def of_vectors(vectors: Mapping) -> Family | None:
    """The family a vector set ({slot: tensor or width}) was made for: the slot keys say, and where
    several families share them, the widths; where none fits, a several-encoder layout is the first
    family's with those keys (Flux.1's before a built-in model shaped like it); None otherwise."""
    widths = _widths(vectors)
    same = by_keys(widths)
    fitting = [f for f in same if f.fits([widths[k] for k in f.keys])]
    if fitting:
        return fitting[0]
    return same[0] if len(same) == 1 or (same and len(widths) > 1) else None


def of_embedding(emb) -> Family | None:
    return of_vectors(emb.vectors)


def stored(keys) -> Family | None:
    """The family of several encoders whose slots a file's keys hold (the most slots first), if any."""
    keys = set(keys)
    found = [f for f in FAMILIES if len(f.slots) > 1 and set(f.keys) <= keys]
    return max(found, key=lambda f: len(f.slots), default=None)


def name_of(vectors: Mapping) -> str:
    """The family a vector set is shown as made for: "SD 1.x"; a partial one: "SD3 or Flux.1 (t5
    only)"; one tensor of no family's: what its width is (:func:`of_width`)."""
    family = of_vectors(vectors)
    if family is not None:
        return family.name
    widths = _widths(vectors)
    partial = [f for f in holding(widths) if all(f.slot(k).width in (None, w) for k, w in widths.items())]
    if partial and valid_keys(widths):
        return " or ".join(f.name for f in partial) + f" ({' + '.join(widths)} only)"
    return of_width(*widths.values()) if len(widths) == 1 else UNKNOWN


def families_of_slot(key: str) -> list[Family]:
    """The several-encoder families with a slot of that key."""
    return [f for f in FAMILIES if len(f.slots) > 1 and key in f.keys]


def lone_slot(width: int) -> str:
    """The slot a file's lone tensor fills: the one-encoder families' (:data:`SINGLE_KEY`), unless
    no one-encoder model is that wide but a T5 encoder is (a T5 part alone, as ComfyUI takes it)."""
    single = any(len(f.slots) == 1 and f.slots[0].width == width for f in FAMILIES)
    t5 = any(s.kind == "t5" and s.width == width for f in FAMILIES for s in f.slots)
    return "t5" if t5 and not single else SINGLE_KEY


def of_width(width: int) -> str:
    """What one encoder this wide is: the first family with an encoder of that width ("SD 1.x"), or
    where that is one of several encoders, every family with it and the slot ("SD3 or Flux.1 (t5)");
    else "an unknown model family"."""
    for f in FAMILIES:
        match = next((s for s in f.slots if s.width == int(width)), None)
        if match is None:
            continue
        if len(f.slots) == 1:
            return f.name
        names = [g.name for g in families_of_slot(match.key) if g.slot(match.key).width == match.width]
        return f"{' or '.join(names)} ({match.key})"
    return UNKNOWN


def describe(vectors: Mapping) -> str:
    """'768-wide: made for SD 1.x', or with several encoders 'clip_l 768 + clip_g 1280-wide: made for SDXL'."""
    widths = _widths(vectors)
    family = of_vectors(widths)
    keys = family.keys if family is not None else tuple(widths)
    if len(keys) == 1 and families_of_slot(keys[0]) == []:
        return f"{widths[keys[0]]}-wide: made for {name_of(widths)}"
    return " + ".join(f"{k} {widths[k]}" for k in keys) + f"-wide: made for {name_of(widths)}"


# ------------------------------------------------------------------------------------- messages
def layouts(per_layer: bool | None = None) -> str:
    """The slot layouts, as messages name them ("SD 1.x/2.x or SDXL"); only those that take
    per-layer (P+) embeddings, or only those that do not, when ``per_layer`` says so."""
    names = dict.fromkeys(f.layout for f in FAMILIES if per_layer is None or f.per_layer == per_layer)
    return " or ".join(names)


def slot_sets(style: str = "plain") -> str:
    """Every slot set an embedding may have: "clip, or clip_l + clip_g"; ``style`` "listed":
    "['clip'] (SD 1.x/2.x) or ['clip_l', 'clip_g'] (SDXL)"."""
    first = {}
    for f in FAMILIES:
        first.setdefault(f.keys, f)
    if style == "listed":
        return " or ".join(f"{list(keys)} ({f.layout})" for keys, f in first.items())
    return ", or ".join(" + ".join(keys) for keys in first)
