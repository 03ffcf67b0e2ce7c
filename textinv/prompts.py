"""Prompts as AUTOMATIC1111 reads them: attention weights, 75-token chunks, embedding triggers.

* Weights: ``(word:1.2)`` sets a weight, ``(word)`` multiplies by 1.1, ``[word]`` by 1/1.1, nesting
  multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal, unclosed brackets close at the end, and
  ``BREAK`` (upper case) starts a new chunk.  A weight applies to embedding triggers inside it
  too: every vector of a multi-vector embedding gets it.
* Chunks: 75 tokens between a start and an end token, as many chunks as the prompt needs; an
  embedding never straddles two chunks (the chunk is padded and it starts the next one).
* Encoding: each chunk goes through the text encoder(s) on its own; each token's hidden state is
  multiplied by its weight, then the chunk is rescaled so that its mean equals the unweighted
  mean (A1111's rule); chunks are concatenated along the sequence.  SDXL: both encoders'
  penultimate hidden states side by side, and the pooled embedding of the first chunk.

Not copied from A1111: its "comma backtrack" (ending a full chunk at a recent comma) is not done.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable

import torch

from . import families, tokens
from .errors import TextinvError
from .models import pipeline_defaults

CHUNK = tokens.CHUNK
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
BREAK = None  # weight marker of a BREAK segment in parse()'s output


def parse(text: str, where: str = "prompt") -> list[tuple[str, float | None]]:
    """``[(text, weight), ...]`` with adjacent equal weights merged; ``("BREAK", None)`` marks BREAK."""
    res: list[list] = []
    opened_round: list[int] = []
    opened_square: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for seg in res[start:]:
            if seg[1] is not None:
                seg[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            opened_round.append(len(res))
        elif piece == "[":
            opened_square.append(len(res))
        elif weight is not None and opened_round:
            try:
                value = float(weight)
            except ValueError:
                raise TextinvError(f"{where}: bad weight {weight!r} in {m.group(0).strip()!r}") from None
            multiply(opened_round.pop(), value)
        elif piece == ")" and opened_round:
            multiply(opened_round.pop(), 1.1)
        elif piece == "]" and opened_square:
            multiply(opened_square.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    res.append(["BREAK", BREAK])
                res.append([part, 1.0])
    for start in opened_round:
        multiply(start, 1.1)
    for start in opened_square:
        multiply(start, 1 / 1.1)
    merged: list[list] = []
    for seg in res:
        if seg[0] == "" and seg[1] is not None:
            continue
        if merged and seg[1] is not None and merged[-1][1] == seg[1]:
            merged[-1][0] += seg[0]
        else:
            merged.append(seg)
    return [(t, w) for t, w in merged] or [("", 1.0)]


# ------------------------------------------------------------------------------ variants {a|b}
# ComfyUI's text boxes (its built-in dynamic prompts) and A1111's Dynamic Prompts extension read
# "{red|green|blue}" as one of the options; textinv reads it too, so that a set of per-value
# embeddings ("{<ball-red>|<ball-green>|...}", see textinv.bias) is used the same way everywhere.
_VARIANT = re.compile(r"\{([^{}]*\|[^{}]*)\}")


def variant_groups(text: str, where: str = "prompt") -> list[list[str]]:
    """The option lists of the ``{a|b|...}`` groups in ``text``, in order ({} without | is text)."""
    groups = [m.group(1).split("|") for m in _VARIANT.finditer(text or "")]
    if _VARIANT.search(_VARIANT.sub("x", text or "")):  # "{a|{b|c}}": the outer group is left over
        raise TextinvError(f"{where}: nested {{a|b}} variants are not supported: {text!r}")
    return groups


def pick_variant(text: str, i: int, where: str = "prompt") -> str:
    """Image ``i``'s prompt: group g takes option ``(i // (k0·…·k(g-1))) mod kg``, so every option
    (and, over k0·k1·… images, every combination) comes up equally often; A1111's extension and
    ComfyUI pick at random, which is balanced only on average."""
    groups = variant_groups(text, where)
    if not groups:
        return text
    stride, chosen = 1, []
    for options in groups:
        chosen.append(options[(i // stride) % len(options)].strip())
        stride *= len(options)
    picks = iter(chosen)
    return _VARIANT.sub(lambda _m: next(picks), text)


@dataclass
class Piece:
    """A prompt piece: plain text, an embedding (its internal tokens), or a BREAK."""

    kind: str  # "text", "emb" or "break"
    text: str = ""
    applied: tokens.Applied | None = None
    weight: float = 1.0


_SYNTAX = re.compile(r"[()\[\]\\]|\bBREAK\b")  # what A1111's parser reads as more than text


@dataclass
class Parsed:
    pieces: list[Piece]
    used: list[tokens.Applied]  # embeddings the prompt calls, in order of first use
    syntax: bool = False  # the text holds A1111 syntax (brackets, escapes, BREAK), even if every weight is 1

    @property
    def weighted(self) -> bool:
        """Whether a pipeline's own encoder would read it differently: weights, BREAK, or syntax
        such as ``(word:1.0)`` or an escaped bracket that A1111 reads and a pipeline takes as text."""
        return self.syntax or any(p.kind == "break" or p.weight != 1.0 for p in self.pieces)


def split(pipe, text: str, where: str = "prompt") -> Parsed:
    """Weights parsed and triggers found (on CLIP tokens, as :func:`textinv.tokens.expand` does)."""
    st = tokens.state(pipe, create=False)
    pieces, used = [], []
    for seg, weight in parse(text, where):
        if weight is BREAK:
            pieces.append(Piece("break"))
            continue
        hits = st.find(seg) if st is not None and st.applied else []
        pos = 0
        for _first, _n, start, end, a in hits:
            if seg[pos:start].strip():
                pieces.append(Piece("text", seg[pos:start], weight=weight))
            pieces.append(Piece("emb", applied=a, weight=weight))
            if all(a is not u for u in used):
                used.append(a)
            pos = end
        if seg[pos:].strip():
            pieces.append(Piece("text", seg[pos:], weight=weight))
    return Parsed(pieces, used, bool(_SYNTAX.search(text)))


def chunks(parsed: Parsed, tokenizer, slot: str | None = None) -> list[tuple[list[int], list[float]]]:
    """A1111's 77-token chunks (ids, per-token weights) of a parsed prompt for one tokenizer (an
    embedding without a part for ``slot``, when given, leaves its trigger out)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        nonlocal ids, weights
        fill = CHUNK - len(ids)
        out.append(([bos] + ids + [eos] + [pad] * fill, [1.0] + weights + [1.0] * (fill + 1)))
        ids, weights = [], []

    for p in parsed.pieces:
        if p.kind == "break":
            close()
        elif p.kind == "emb":
            if slot is not None and slot not in p.applied.embedding.vectors:
                continue
            new = tokenizer.convert_tokens_to_ids(p.applied.tokens)
            if len(ids) + len(new) > CHUNK:
                close()
            ids += new
            weights += [p.weight] * len(new)
        else:
            for t in tokenizer(p.text, add_special_tokens=False, truncation=False)["input_ids"]:
                if len(ids) == CHUNK:
                    close()
                ids.append(t)
                weights.append(p.weight)
    if ids or not out:
        close()
    return out


@dataclass
class Encoded:
    embeds: torch.Tensor  # [1, 77 * chunks, D]
    pooled: torch.Tensor | None  # [1, P] for a family with a pooled embedding (SDXL)


def check_clip_skip(pipe, clip_skip: int) -> int:
    """``clip_skip`` if this model can use it, else a one-line TextinvError naming the limit."""
    family = families.of_pipeline(pipe)
    pairs = tokens.encoder_pairs(pipe)
    if not family.clip_skip and clip_skip != 1:
        raise TextinvError(f"--clip-skip {clip_skip}: {family.name} already takes its encoders' {family.layer_name} "
                           f"layer; A1111 ignores Clip skip for {family.name} at its default settings (use 1)")
    layers = int(pairs[0][1].config.num_hidden_layers)
    if not 1 <= clip_skip <= layers:
        raise TextinvError(f"--clip-skip {clip_skip}: must be between 1 and {layers} (this text encoder's layers)")
    return clip_skip


def run_encoder(text_encoder, ids: torch.Tensor, family: families.Family, slot: str,
                clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The hidden states a prompt gives the encoder of ``family``'s ``slot`` (and the pooled
    embedding, from the family's pooled slot): the one definition.

    The family's hidden layer as its pipelines take it: the last (SD 1.x/2.x), or with A1111's
    "Clip skip: N" the hidden state N-1 layers before it, passed through the final layer norm; or
    another layer as it is (SDXL: the penultimate).  The pooled embedding is the encoder's
    projected output (at the end token; see tokens.pool_at_end_token).
    """
    if not family.clip_skip:
        out = text_encoder(ids, output_hidden_states=True)
        return out.hidden_states[family.hidden_layer], (out[0] if slot == family.pooled else None)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = torch.ones_like(ids)
    if clip_skip == 1:
        return text_encoder(ids, attention_mask=mask)[0], None
    out = text_encoder(ids, attention_mask=mask, output_hidden_states=True)
    model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4.x nests it
    return model.final_layer_norm(out.hidden_states[-clip_skip]), None


def weigh(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's emphasis on one chunk's hidden states ``[1, 77, D]``: each token's state times its
    weight, then the chunk rescaled to its unweighted mean."""
    w = torch.tensor(weights, device=z.device, dtype=z.dtype).view(1, -1, 1)
    before = z.float().mean()
    weighted = z * w
    after = weighted.float().mean()
    # A1111 keeps the chunk's mean; an encoder whose outputs average to ~0 (a random,
    # untrained one) has no mean to keep, and dividing by it would blow up.
    scale_ok = min(before.abs(), after.abs()) > 1e-3 * z.float().abs().mean()
    return weighted * (before / after).to(z.dtype) if scale_ok else weighted


# Chunk hooks: what conditions a model beyond its token table plugs in here (textinv.perlayer
# does, for per-layer embeddings).  ``hook(pipe, ids, run, weigh)`` encodes one chunk's ids
# ``[1, 77]`` itself and returns ``(weighed hidden states, pooled)``, or None to leave it to the
# next hook or to the plain encoding; ``run(ids)`` gives (hidden, pooled), ``weigh(hidden)`` the
# chunk's A1111 weights applied.  By name; a module registers its own when imported.
CHUNK_HOOKS: dict[str, Callable] = {}


def encode_chunk(pipe, ids: torch.Tensor, run, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's weighed hidden states and pooled embedding (through a hook that takes it)."""
    def weighed(z: torch.Tensor) -> torch.Tensor:
        return weigh(z, weights) if any(w != 1.0 for w in weights) else z

    for hook in CHUNK_HOOKS.values():
        done = hook(pipe, ids, run, weighed)
        if done is not None:
            return done
    z, pool = run(ids)
    return weighed(z), pool


@torch.no_grad()
def encode(pipe, parsed: Parsed, clip_skip: int = 1) -> Encoded:
    """Prompt embeddings for ``prompt_embeds=`` (and ``pooled_prompt_embeds=`` where the family
    has a pooled embedding: SDXL): every encoder's states side by side, in the family's order.

    The chunk hooks see every chunk (:data:`CHUNK_HOOKS`: textinv.perlayer also encodes a chunk
    that calls per-layer embeddings per layer, weighed as the chunk is)."""
    family = families.of_pipeline(pipe)
    per_encoder, pooled = [], None
    for slot, (tok, te) in tokens.slot_pairs(pipe, family):
        states = []
        for j, (ids, weights) in enumerate(chunks(parsed, tok)):
            ids = torch.tensor([ids], device=te.device)
            z, pool = encode_chunk(pipe, ids, lambda x: run_encoder(te, x, family, slot.key, clip_skip), weights)
            states.append(z)
            if j == 0 and slot.key == family.pooled:
                pooled = pool
        per_encoder.append(torch.cat(states, dim=1))
    n = min(s.shape[1] for s in per_encoder)  # equal unless a tokenizer split text differently
    embeds = torch.cat([s[:, :n] for s in per_encoder], dim=-1)
    return Encoded(embeds, pooled)


# ------------------------------------------------------------------------------ SD3 and Flux.1
def t5_ids(parsed: Parsed, tokenizer, slot: str, length: int) -> tuple[list[int], list[float]]:
    """A T5 encoder's ids and per-token weights of a parsed prompt, as its pipelines lay them out:
    no start token, each piece tokenised on its own (ComfyUI's way), ``</s>``, padding (id 0) to
    ``length`` (``max_sequence_length``; longer prompts are cut, as diffusers cuts them)."""
    ids: list[int] = []
    weights: list[float] = []
    for p in parsed.pieces:
        if p.kind == "emb" and slot in p.applied.embedding.vectors:
            new = tokenizer.convert_tokens_to_ids(p.applied.tokens)
        elif p.kind == "text":
            new = tokenizer(p.text, add_special_tokens=False, truncation=False)["input_ids"]
        else:  # BREAK, or an embedding without a T5 part
            continue
        ids += new
        weights += [p.weight] * len(new)
    ids, weights = ids[: length - 1] + [tokenizer.eos_token_id], weights[: length - 1] + [1.0]
    fill = length - len(ids)
    return ids + [tokenizer.pad_token_id] * fill, weights + [1.0] * fill


def weigh_from_empty(z: torch.Tensor, z_empty: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """ComfyUI's emphasis (comfy/sd1_clip.py, encode_token_weights): each weighted token's state
    moved away from the empty prompt's state at the same position, ``(z - z_empty) * w + z_empty``."""
    w = torch.tensor(weights, device=z.device, dtype=torch.float32).view(1, -1, 1)
    moved = ((z.float() - z_empty.float()) * w + z_empty.float()).to(z.dtype)
    return torch.where(w != 1.0, moved, z)  # unweighted tokens exactly as they were


def run_flow_encoder(te, kind: str, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A flow family's encoder on ids ``[B, S]``, as diffusers' SD3/Flux.1 pipelines run it: (T5's
    last hidden state, None), or (a CLIP's hidden state ``layer``, its pooled output: the projected
    one where the encoder has a projection).  No gradient is turned off here (training needs them)."""
    out = te(ids.to(te.device), output_hidden_states=kind == "clip")
    if kind == "t5":
        return out[0], None
    return out.hidden_states[layer], out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


def _flow_ids(parsed: Parsed, tokenizer, slot: families.Slot, length: int) -> tuple[list[int], list[float]]:
    """One flow-family encoder's ids and weights of a parsed prompt: T5's (:func:`t5_ids`), or a
    CLIP's first 77-token chunk (the pipelines cut CLIP prompts there)."""
    if slot.kind == "t5":
        return t5_ids(parsed, tokenizer, slot.key, length)
    return chunks(parsed, tokenizer, slot.key)[0]


def _flow_encoder(te, tokenizer, slot: families.Slot, parsed: Parsed, length: int, layer: int):
    """One encoder's (hidden states, pooled) of a parsed prompt for a flow family, weighted from the
    empty prompt laid out the same way."""
    def run(p: Parsed):
        ids, weights = _flow_ids(p, tokenizer, slot, length)
        return run_flow_encoder(te, slot.kind, torch.tensor([ids]), layer), weights

    (z, pooled), weights = run(parsed)
    if any(w != 1.0 for w in weights):
        z = weigh_from_empty(z, run(Parsed([], []))[0][0], weights)
    return z, pooled


def t5_length(pipe) -> int:
    """The T5 prompt length to pad to: the model's own (its settings' ``t5_length``, the length it
    was trained with), else the pipeline's default ``max_sequence_length`` (SD3 256, Flux.1 512).
    Prompt embeddings made for a model must have it, as the padding is encoded (no mask)."""
    own = pipeline_defaults(pipe).t5_length
    if own is not None:
        return own
    param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    return int(param.default) if param is not None and isinstance(param.default, int) else 256


@torch.no_grad()
def encode_flow(pipe, parsed: Parsed, max_sequence_length: int | None = None) -> Encoded:
    """SD3/Flux.1 ``prompt_embeds`` and ``pooled_prompt_embeds`` of a weighted prompt, laid out as
    diffusers' pipelines lay them out (CLIP: 77 tokens; T5: ``max_sequence_length``), each token's
    weight applied as ComfyUI applies it (:func:`weigh_from_empty`); the pooled embeddings are
    unweighted, as there.  SD3: CLIP-L and CLIP-G's penultimate states side by side, zero-padded to
    T5's width, before T5's along the sequence, pooled both CLIPs'; Flux.1: T5's states, pooled CLIP-L's."""
    family = families.of_pipeline(pipe)
    max_sequence_length = max_sequence_length or t5_length(pipe)
    states, pooled = {}, []
    for slot, (tok, te) in tokens.slot_pairs(pipe, family):
        z, pool = _flow_encoder(te, tok, slot, parsed, max_sequence_length, family.hidden_layer)
        states[slot.key] = z
        if pool is not None:
            pooled.append(pool)
    return join_flow(family, states, pooled)


def join_flow(family: families.Family, states: dict[str, torch.Tensor], pooled: list[torch.Tensor]) -> Encoded:
    """The conditioning of a flow family from its encoders' outputs (``states`` by slot key, in slot
    order; ``pooled`` the CLIPs' in slot order), joined as diffusers' pipelines join them (see
    :func:`encode_flow`).  Batched ``[B, S, D]`` states give a batch; gradients pass through."""
    states = dict(states)
    t5 = states.pop("t5")
    if family.joins == "flux":
        return Encoded(t5, pooled[0])
    clip = torch.cat(list(states.values()), dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return Encoded(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))


def pad_to(a: Encoded, length: int, filler: Encoded) -> Encoded:
    """Lengthen ``a`` to ``length`` tokens with copies of the one-chunk ``filler`` (an empty prompt)."""
    missing = (length - a.embeds.shape[1]) // filler.embeds.shape[1]
    if missing <= 0:
        return a
    return Encoded(torch.cat([a.embeds] + [filler.embeds] * missing, dim=1), a.pooled)


# <name> or embedding:name; not <lora:name:0.8> and the like (A1111's extra networks, not embeddings)
TRIGGER_LIKE = re.compile(r"<(?!\|)([^<>\s:]+)>|\bembedding:([\w.\-]+)")


def unmatched_triggers(pipe, text: str) -> list[str]:
    """Words that look like triggers (``<x>``, ``embedding:x``) but call no applied embedding."""
    st = tokens.state(pipe, create=False)
    # A trigger may itself be written with brackets (a trained token such as "<my-cat>"): match both forms.
    known = {form for a in (st.applied.values() if st else []) for t in a.triggers
             for form in (t.lower(), t.lower().strip("<>"))}
    out = []
    for m in TRIGGER_LIKE.finditer(text):
        name = m.group(1) or re.sub(r"\.(pt|safetensors|bin)$", "", m.group(2))
        if name.lower() not in known and m.group(0) not in out:
            out.append(m.group(0))
    return out
