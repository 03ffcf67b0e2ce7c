"""Trigger words in tokenizers and text encoders: add, expand, override (replace) and remove.

How it works, and why it differs from diffusers' ``load_textual_inversion``:

* The text encoder's token table is never resized or copied.  Its embedding module is wrapped
  in :class:`TriggerEmbedding`, which looks up ids below the vocabulary size in the original
  table and ids above it in a small ``extra`` matrix holding every applied embedding's vectors.
  Applying 50 embeddings therefore costs microseconds, ``remove`` puts the original module back
  (exact restore), and training can make ``extra`` the only trainable parameter.
* Each vector gets an internal token (``<|ti:name:0|>`` …) added to the tokenizer.  Users never
  type those: :func:`expand` finds triggers in a prompt the way AUTOMATIC1111 does — on CLIP
  token-id sequences, hence case-insensitive and whole-word, longest match first — in three
  syntaxes (``name``, ``<name>``, ``embedding:name``), and writes the internal tokens in their
  place.  A trigger may be an existing word (``doctor``): that is replace mode, the bias-reduction
  use of textual inversion, and it is undone by ``remove`` like any other.
* A1111's rule that an embedding never straddles a 75-token chunk is kept: when it would, the
  chunk is padded with end tokens and the embedding starts the next chunk.
* On a diffusers pipeline, :func:`apply` routes the pipeline's own prompt handling
  (``maybe_convert_prompt``, used for prompts and negative prompts by SD, SDXL and Flux.1; SD3's
  per-encoder prompt methods, which have no such step) through :func:`expand`, so
  ``pipe("a photo of my-cat")`` just works.
* Each encoder's prompt is expanded for that encoder: a T5 encoder's tokens are added as words
  (SentencePiece's word-start ``▁`` is not split off before them) and know no 75-token chunks;
  an embedding without a part for an encoder (an SD3 file's CLIP parts alone, a T5 part alone)
  leaves its trigger out of that encoder's prompt, as ComfyUI does.
* A per-layer (P+) embedding's trigger expands the same way, to tokens holding its layers'
  average; each layer's vectors get tokens of their own, and :mod:`textinv.perlayer` makes every
  UNet cross-attention layer see the prompt encoded with its layer's vectors.
"""
from __future__ import annotations

import functools
import inspect
import os
import pickle
import re
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from tokenizers import AddedToken
from torch import nn

from . import families, sources
from .errors import ModelMismatchError, TextinvError
from .formats import OUT_SUFFIX, Embedding

CHUNK = 75  # tokens per CLIP chunk between the start and end tokens (A1111)
# A1111 (bare name), InvokeAI (<name>), ComfyUI (embedding:name, the file extension optional).
SYNTAXES = ("{}", "<{}>", "embedding:{}", "embedding:{}.pt", "embedding:{}.safetensors", "embedding:{}.bin")


class TriggerEmbedding(nn.Module):
    """An encoder's token table (untouched) plus the rows of applied trigger tokens.

    ``token_ids[i]`` is the tokenizer id whose vector is ``extra[i]``; every other id is looked
    up in ``base``.  The rows come in blocks, one per applied embedding, each a parameter of its
    own: training makes a word's block its only parameter, and several words trained together
    (``textinv train-many --pack``) each have theirs.  Gradients, when a block requires them,
    reach only its trigger rows.
    """

    def __init__(self, base: nn.Module, blocks: Sequence[torch.Tensor], token_ids: Sequence[int]):
        super().__init__()
        self.base = base
        self.num_base = int(base.num_embeddings)
        # The rows sit in a child registered after ``base``: transformers reads a model's dtype off
        # its first parameter, and float32 rows first made a half-precision text encoder report
        # float32 (diffusers then cast the prompt embeddings, and the latents, to float32).
        blocks = list(blocks) or [torch.zeros(0, self.embedding_dim)]
        self.rows = nn.ParameterList([b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
                                      for b in blocks])
        row_of = torch.full((max(token_ids, default=0) + 1,), -1, dtype=torch.long)
        row_of[torch.as_tensor(list(token_ids), dtype=torch.long)] = torch.arange(len(token_ids))
        self.register_buffer("row_of", row_of.to(blocks[0].device), persistent=False)

    @property
    def extra(self) -> torch.Tensor:
        """The trigger rows, float32: one embedding's block itself (the parameter training makes
        its only one), several's joined (differentiable in each block)."""
        return self.rows[0] if len(self.rows) == 1 else torch.cat(list(self.rows))

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.num_base - 1))
        extra = self.extra
        if extra.shape[0] == 0:
            return out
        row = self.row_of[ids.clamp(max=self.row_of.numel() - 1)]
        row = torch.where(ids < self.row_of.numel(), row, -1).unsqueeze(-1)
        rows = extra[row.squeeze(-1).clamp(min=0)]
        return torch.where(row >= 0, rows.to(out.dtype), out)


@dataclass
class Applied:
    """One embedding as applied: its trigger names and internal tokens."""

    embedding: Embedding
    triggers: list[str]  # the name first, then aliases (e.g. a diffusers file's stored token)
    tokens: list[str]  # internal tokens, one per vector: what prompts expand the trigger to
    layer_tokens: list[list[str]] = field(default_factory=list)  # per-layer embeddings: each layer's own

    @property
    def all_tokens(self) -> list[str]:
        """Every internal token, in the order of the rows :func:`table_rows` gives."""
        return self.tokens + [t for layer in self.layer_tokens for t in layer]


@dataclass
class _Encoder:
    slot: str  # its family's slot key ("clip", "clip_l", ...): which of an Embedding's tensors this encoder takes
    kind: str  # "clip" or "t5" (textinv.families.Slot.kind)
    tokenizer: object
    text_encoder: nn.Module
    base: nn.Module  # the original embedding module, put back by remove()
    variants: "_TokenizerStates"  # the pristine tokenizer state and ready-made ones with triggers added
    pooling_fix: object = None  # the forward hook of pool_at_end_token while triggers are applied
    outputs: object = None  # the forward hook of output_embeddings while an applied embedding has some

    @property
    def width(self) -> int:
        return int(self.base.embedding_dim)


@dataclass(frozen=True)
class Hook:
    """What conditions a model beyond its token table plugs in here (textinv.perlayer does, for
    per-layer embeddings): ``check(state, emb)`` raises for an embedding it cannot take on these
    encoders; ``sync(state)`` follows every change of what is applied."""

    check: Callable[["TriggerState", Embedding], None]
    sync: Callable[["TriggerState"], None]


HOOKS: dict[str, Hook] = {}  # by name; a module registers its own when imported


@dataclass
class TriggerState:
    """Everything applied to one set of text encoders; kept on the pipeline as ``_textinv``."""

    encoders: list[_Encoder]
    spec: families.Family  # the family these encoders are, as textinv.families declares it
    applied: dict[str, Applied] = field(default_factory=dict)  # key: name, lower-cased
    _matchers: dict = field(default_factory=dict)  # by the one name matched (None: every applied one)
    unet: object = field(default=None, repr=False)  # the pipeline's UNet: per-layer embeddings condition its cross-attention layers
    layered: object = field(default=None, repr=False)  # textinv.perlayer.Conditioning while per-layer embeddings are applied

    # -- model description -------------------------------------------------------------
    @property
    def family(self) -> str:
        return families.model_name(self.spec, [e.width for e in self.encoders])

    def check(self, emb: Embedding) -> None:
        """Raise ModelMismatchError unless ``emb`` fits these encoders (width and count) and what
        the hooks check (per-layer embeddings: the UNet's cross-attention layers)."""
        for hook in HOOKS.values():
            hook.check(self, emb)
        slots = [e.slot for e in self.encoders]
        # A part of a flow family's embedding (SD3's CLIP parts, a T5 part alone) fits its model.
        partial = set(emb.vectors) < set(slots) and any(e.kind == "t5" for e in self.encoders)
        fits = (set(emb.vectors) == set(slots) or partial) and all(
            emb.widths[e.slot] == e.width for e in self.encoders if e.slot in emb.vectors)
        if not fits:
            raise ModelMismatchError(
                f"embedding {emb.name!r} is {describe_widths(emb)}; "
                f"this model's text encoder{'s are' if len(slots) > 1 else ' is'} "
                f"{'+'.join(str(e.width) for e in self.encoders)}-wide: {self.family}"
            )

    # -- adding and removing -------------------------------------------------------------
    def add(self, embeddings: Sequence[Embedding], aliases: Sequence[Sequence[str]] = ()) -> list[Applied]:
        """Apply several embeddings at once; all are checked before anything changes."""
        aliases = list(aliases) or [[] for _ in embeddings]
        for emb in embeddings:
            self.check(emb)
            _check_finite(emb)
            lacking = [e.slot for e in self.encoders if e.slot not in emb.vectors]
            if lacking:
                warnings.warn(f"embedding {emb.name!r} has no {' or '.join(lacking)} part: its trigger is left out of "
                              f"that encoder's prompt (as ComfyUI does)", stacklevel=3)
        names = [emb.name.lower() for emb in embeddings]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise TextinvError(f"two embeddings are named {dup!r}; rename one (name=...) to use both")
        replaced = [n for n in names if n in self.applied]
        if replaced:
            self._remove(replaced)
        new = []
        for emb, extra_names in zip(embeddings, aliases):
            triggers = [emb.name] + [a for a in extra_names if a and a.lower() != emb.name.lower()]
            safe = re.sub(r"[^a-z0-9_.-]+", "-", emb.name.lower()) or "x"
            n = emb.num_vectors
            layers = [[f"<|ti:{safe}:{i}@{k}|>" for i in range(n)] for k in range(len(emb.layers or ()))]
            tokens = self._unique([f"<|ti:{safe}:{i}|>" for i in range(n)] + [t for layer in layers for t in layer],
                                  [t for a in new for t in a.all_tokens])
            new.append(Applied(emb, triggers, tokens[:n], [tokens[n * (k + 1) : n * (k + 2)] for k in range(len(layers))]))
        for enc in self.encoders:
            enc.variants.switch(enc.tokenizer, [t for a in [*self.applied.values(), *new] for t in a.all_tokens], enc.kind)
            # Rows already applied are the live module's blocks: training may be moving them.
            self._install(enc, list(self.applied.values()) + new, _live_blocks(enc, range(len(self.applied)))
                          + [_rows(enc, [a]) for a in new])
        for a in new:
            self.applied[a.embedding.name.lower()] = a
        self._matchers = {}
        self._sync_layers()
        return new

    def remove(self, names: Iterable[str] | None = None) -> list[str]:
        if names is None:
            names = list(self.applied)
        keys = [n.lower() for n in names]
        missing = [n for n, k in zip(names, keys) if k not in self.applied]
        if missing:
            raise TextinvError(f"no embedding named {missing[0]!r} is applied (applied: {', '.join(self.names) or 'none'})")
        self._remove(keys)
        return keys

    def _remove(self, keys: list[str]) -> None:
        kept = [i for i, k in enumerate(self.applied) if k not in keys]
        keep = [a for k, a in self.applied.items() if k not in keys]
        for enc in self.encoders:
            enc.variants.switch(enc.tokenizer, [t for a in keep for t in a.all_tokens], enc.kind)
            if not keep:
                self._uninstall(enc)
                continue
            self._install(enc, keep, _live_blocks(enc, kept))  # the others' blocks stay (one may be training)
        self.applied = {a.embedding.name.lower(): a for a in keep}
        self._matchers = {}
        self._sync_layers()

    def _sync_layers(self) -> None:
        for hook in HOOKS.values():
            hook.sync(self)

    @staticmethod
    def _install(enc: _Encoder, applied: list[Applied], blocks: list[torch.Tensor]) -> None:
        """A table of ``applied``'s rows: ``blocks``, one per embedding, a live block kept as it is
        where it is float32 on the encoder's device."""
        # Learned vectors stay float32 whatever the encoder's dtype; TriggerEmbedding casts on lookup.
        device = next(enc.base.parameters()).device
        blocks = [b if isinstance(b, nn.Parameter) and b.device == device and b.dtype == torch.float32
                  else b.detach().to(device, torch.float32) for b in blocks]
        ids = enc.tokenizer.convert_tokens_to_ids([t for a in applied for t in a.all_tokens])
        enc.text_encoder.set_input_embeddings(TriggerEmbedding(enc.base, blocks, ids))
        if enc.pooling_fix is None:
            enc.pooling_fix = pool_at_end_token(enc.text_encoder, int(enc.base.num_embeddings))
        if enc.outputs is not None:
            enc.outputs.remove()
        enc.outputs = output_embeddings(enc, applied)

    @staticmethod
    def _uninstall(enc: _Encoder) -> None:
        enc.text_encoder.set_input_embeddings(enc.base)
        for hook in ("pooling_fix", "outputs"):
            if getattr(enc, hook) is not None:
                getattr(enc, hook).remove()
                setattr(enc, hook, None)

    def _unique(self, tokens: list[str], also_taken: Iterable[str] = ()) -> list[str]:
        taken = {t for a in self.applied.values() for t in a.all_tokens} | set(also_taken)
        out = []
        for t in tokens:
            u, k = t, 1
            while u in taken:
                u, k = t.replace("|>", f"~{k}|>"), k + 1
            taken.add(u)
            out.append(u)
        return out

    @property
    def names(self) -> list[str]:
        return [a.embedding.name for a in self.applied.values()]

    # -- prompts -------------------------------------------------------------------------
    def encoder_of(self, tokenizer) -> int:
        """The index of the encoder whose tokenizer this is (0 when none is: a tokenizer of the
        pipeline's own making)."""
        return next((i for i, e in enumerate(self.encoders) if e.tokenizer is tokenizer), 0)

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.encoders[0].tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def matcher(self, only: str | None = None) -> dict[tuple[int, ...], Applied]:
        """Token-id sequence of every trigger spelling → the embedding it calls; ``only``: the
        spellings of that one applied embedding (as if it were the only one)."""
        key = None if only is None else only.lower()
        if key not in self._matchers:
            table: dict[tuple[int, ...], Applied] = {}
            for a in self.applied.values() if key is None else [self.applied[key]] if key in self.applied else []:
                for name in a.triggers:
                    for syntax in SYNTAXES:
                        ids, _ = self._tokenize(syntax.format(name))
                        if ids:
                            table.setdefault(tuple(ids), a)
            self._matchers[key] = table
        return self._matchers[key]

    def blocks(self, name: str) -> list[nn.Parameter]:
        """Each encoder's block of rows of the applied embedding ``name`` (in :func:`table_rows`'
        order): what training makes its parameters."""
        i = list(self.applied).index(name.lower())
        return [enc.text_encoder.get_input_embeddings().rows[i] for enc in self.encoders]

    def find(self, text: str, only: str | None = None) -> list[tuple[int, int, int, int, Applied]]:
        """Trigger occurrences: (first token, token count, char start, char end, embedding);
        ``only``: of that one embedding, as if it were the only one applied."""
        ids, offsets = self._tokenize(text)
        table = self.matcher(only)
        lengths = sorted({len(k) for k in table}, reverse=True)
        hits, i = [], 0
        while i < len(ids):
            for n in lengths:
                a = table.get(tuple(ids[i : i + n])) if i + n <= len(ids) else None
                start, end = (offsets[i][0], offsets[i + n - 1][1]) if a is not None else (0, 0)
                # Whole words only: 'cat' is also the last BPE piece of 'concat'.
                if a is not None and not _inside_word(text, start, end):
                    hits.append((i, n, start, end, a))
                    i += n
                    break
            else:
                i += 1
        return hits

    def expand(self, text: str, encoder: int = 0, only: str | None = None) -> str:
        """Replace every trigger with its internal tokens for encoder ``encoder`` (by index):
        for a CLIP encoder keeping A1111's chunk rule; an embedding without a part for this
        encoder leaves its trigger out.  ``only``: that embedding's trigger alone (a word trained
        beside others reads its prompts as if it were the only one applied)."""
        if not self.applied:
            return text
        hits = self.find(text, only)
        if not hits:
            return text
        enc = self.encoders[encoder]
        chunked = enc.kind == "clip"
        out, pos_char, pos_tok, length = [], 0, 0, 0
        pad = self.encoders[0].tokenizer.eos_token or "<|endoftext|>"
        for first, n, start, end, a in hits:
            out.append(text[pos_char:start])
            length += first - pos_tok
            k = len(a.tokens) if enc.slot in a.embedding.vectors else 0
            if chunked and 0 < k <= CHUNK and length // CHUNK != (length + k - 1) // CHUNK:
                fill = CHUNK - length % CHUNK
                out.append(" " + " ".join([pad] * fill))
                length += fill
            out.append(" " + " ".join(a.tokens[:k]) + " ")
            length += k
            pos_char, pos_tok = end, first + n
        out.append(text[pos_char:])
        return re.sub(r" {2,}", " ", "".join(out)).strip()


class _TokenizerStates:
    """One tokenizer's pristine state and a few ready-made states with trigger tokens added.

    A tokenizer cannot forget added tokens, and rebuilding a CLIP tokenizer from a snapshot costs
    ~90 ms, more than the rest of applying and removing embeddings together.  So the live
    tokenizer object is switched (its ``__dict__`` swapped) between the untouched original state,
    which ``remove`` puts back as the very same objects, and copies that already hold the internal
    tokens of the embeddings in use: a ``generate`` call with the same embeddings as the last
    one switches twice and copies nothing.  Copies are checked before reuse, so tokens anyone
    else added to the tokenizer are never lost or leaked.
    """

    KEEP = 8  # ready-made states kept per tokenizer
    _by_tokenizer: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer):
        self._capture(tokenizer)
        self.current: tuple[str, ...] = ()

    @classmethod
    def of(cls, tokenizer) -> "_TokenizerStates":
        """The states of ``tokenizer``, kept for as long as it lives (changes by others: see ``switch``)."""
        st = cls._by_tokenizer.get(tokenizer)
        if st is None:
            st = cls._by_tokenizer[tokenizer] = cls(tokenizer)
        return st

    def _capture(self, tokenizer) -> None:
        self.pristine = dict(vars(tokenizer))
        self.length = len(tokenizer)
        self.snapshot = pickle.dumps(tokenizer)
        self.ready: OrderedDict[tuple[str, ...], dict] = OrderedDict()

    def switch(self, tokenizer, added: list[str], kind: str = "clip") -> None:
        """Make ``tokenizer`` the pristine one plus exactly the tokens ``added``, in that order
        (added as a ``kind`` tokenizer's words: see :func:`_add_tokens`)."""
        key = tuple(added)
        if len(tokenizer) != self.length + len(self.current):  # someone added tokens: keep their state as the base
            if self.current:
                self.ready.pop(self.current, None)
            else:
                self._capture(tokenizer)
        if key == self.current:
            return
        if not key:
            state = self.pristine
        else:
            state = self.ready.pop(key, None)
            if state is None:
                copy = pickle.loads(self.snapshot)
                _add_tokens(copy, added, kind)
                state = dict(vars(copy))
            self.ready[key] = state
            while len(self.ready) > self.KEEP:
                self.ready.popitem(last=False)
        vars(tokenizer).clear()
        vars(tokenizer).update(state)
        self.current = key


def pool_at_end_token(text_encoder: nn.Module, vocab_size: int):
    """Make a legacy-configured CLIP pool at the end token even when trigger tokens are present.

    Why: the configs of SDXL base 1.0 and many SD checkpoints say ``eos_token_id: 2`` (a legacy
    value), and transformers' CLIP then takes the pooled output at ``argmax(input_ids)``: the end
    token only while every id is in the vocabulary.  Trigger tokens have ids above it, so the
    trigger would become the pooled position, and SDXL (whose UNet takes the second encoder's
    pooled output) would be conditioned unlike in AUTOMATIC1111 and ComfyUI, which splice vectors
    at in-vocabulary ids.  The hook re-takes the pooled state where in-vocabulary ids put it:
    the argmax with trigger ids left out (the first end token).  Hidden states are untouched;
    configs with the fixed ``eos_token_id`` pool at the first end token already and get no hook.
    Returns the hook's handle, or None.
    """
    model = next((m for m in text_encoder.modules()
                  if getattr(m, "eos_token_id", None) == 2 and hasattr(m, "final_layer_norm")), None)
    if model is None:
        return None

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not bool((ids >= vocab_size).any()):
            return output
        ids = ids.reshape(-1, ids.shape[-1])
        hidden = output[0]
        where = torch.where(ids >= vocab_size, -1, ids).argmax(dim=-1).to(hidden.device)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), where]
        if isinstance(output, tuple):
            return (output[0], pooled, *output[2:])
        output.pooler_output = pooled
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def output_embeddings(enc: _Encoder, applied: list[Applied]):
    """OneTrainer's output embeddings (a file's ``<slot>_out`` vectors) as OneTrainer uses them:
    they replace the encoder's output at the trigger's positions, in whichever hidden state the
    model takes (every one is replaced; the pooled output, taken at the end token, is not
    touched).  Their input vectors are zeros as OneTrainer saves them.  Returns the forward hook's
    handle, or None when no applied embedding has output embeddings for this encoder."""
    key = f"{enc.slot}{OUT_SUFFIX}"
    pairs = [(t, v) for a in applied if key in a.embedding.extra
             for t, v in zip(a.tokens, a.embedding.extra[key].detach().float())]
    if not pairs:
        return None
    ids = torch.tensor(enc.tokenizer.convert_tokens_to_ids([t for t, _ in pairs]))
    rows = torch.stack([v for _, v in pairs])

    def hook(module, args, kwargs, output):
        given = kwargs.get("input_ids", args[0] if args else None)
        if given is None:
            return output
        match = given.reshape(given.shape[0], -1, 1) == ids.to(given.device)  # [B, S, rows]
        where, row = match.any(-1), match.float().argmax(-1)

        def replaced(h):
            return torch.where(where.unsqueeze(-1), rows.to(h.device, h.dtype)[row], h)

        if isinstance(output, tuple):  # return_dict=False: the last hidden state first
            return (replaced(output[0]), *output[1:])
        output["last_hidden_state"] = replaced(output["last_hidden_state"])
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(replaced(h) for h in output["hidden_states"])
        return output

    return enc.text_encoder.register_forward_hook(hook, with_kwargs=True)


def _live_blocks(enc: _Encoder, which) -> list[torch.Tensor]:
    """The encoder's installed blocks ``which`` (indices of applied embeddings), as they are now."""
    module = enc.text_encoder.get_input_embeddings()
    return [module.rows[i] for i in which]


def _rows(enc: _Encoder, applied: list[Applied]) -> torch.Tensor:
    """The vectors ``applied`` embeddings give this encoder, stacked as float32 CPU rows (zeros
    for an embedding without a part for it: its prompts never hold those tokens)."""
    if not applied:
        return torch.zeros(0, enc.width)
    return torch.cat([table_rows(a.embedding, enc.slot) if enc.slot in a.embedding.vectors
                      else torch.zeros(len(a.all_tokens), enc.width) for a in applied])


def table_rows(emb: Embedding, slot: str) -> torch.Tensor:
    """An embedding's rows in the trigger table, float32 on the CPU: its vectors; for a per-layer
    one the layers' average (what its trigger expands to), then each layer's vectors in turn."""
    t = emb.vectors[slot].detach().to("cpu", torch.float32)
    if emb.layers is None:
        return t
    return torch.cat([t.mean(dim=0), t.reshape(-1, t.shape[-1])])


def _inside_word(text: str, start: int, end: int) -> bool:
    return (start > 0 and text[start - 1].isalnum()) or (end < len(text) and text[end].isalnum())


def _add_tokens(tokenizer, tokens: list[str], kind: str = "clip") -> None:
    """Add trigger tokens.  A T5 tokenizer's take the space before them (``lstrip``): else
    SentencePiece would turn that space into a token of its own (a lone ``▁``), and the prompt's
    ids would differ from a word-wise tokenisation with the vectors spliced in (ComfyUI's)."""
    t5 = kind == "t5"
    added = tokenizer.add_tokens([AddedToken(t, normalized=False, single_word=False, special=False, lstrip=t5)
                                  for t in tokens])
    if added != len(tokens):
        raise TextinvError("internal error: trigger tokens clash with the tokenizer's vocabulary")


def _check_finite(emb: Embedding) -> None:
    for slot, t in emb.vectors.items():
        if not torch.isfinite(t.float()).all():
            raise TextinvError(f"embedding {emb.name!r} has NaN/inf values in {slot}")


def describe_widths(emb: Embedding) -> str:
    """'768-wide: made for SD 1.x', or for SDXL files 'clip_l 768 + clip_g 1280-wide: made for SDXL'."""
    return families.describe(emb.vectors)


# ---------------------------------------------------------------------------------------
# Pipelines (or any object with the tokenizer and text-encoder attributes of a family's slots)
# ---------------------------------------------------------------------------------------
def encoder_pairs(pipe) -> list[tuple[object, nn.Module]]:
    """(tokenizer, text encoder) of each of the pipeline's family's slots, in encoder order."""
    return [pair for _, pair in slot_pairs(pipe)]


def slot_pairs(pipe, family: families.Family | None = None) -> list[tuple[families.Slot, tuple[object, nn.Module]]]:
    """Each slot of the pipeline's family (found when not given) with its (tokenizer, text encoder)."""
    family = family or families.of_pipeline(pipe)
    return [(s, (getattr(pipe, s.tokenizer), getattr(pipe, s.text_encoder))) for s in family.slots]


def state(pipe, create: bool = True) -> TriggerState | None:
    """The pipeline's trigger state (created on first use)."""
    st = getattr(pipe, "_textinv", None)
    if st is None and create:
        spec = families.of_pipeline(pipe)
        encoders = [_Encoder(s.key, s.kind, tok, te, te.get_input_embeddings(), _TokenizerStates.of(tok))
                    for s, (tok, te) in slot_pairs(pipe, spec)]
        st = TriggerState(encoders, spec, unet=getattr(pipe, "unet", None))
        object.__setattr__(pipe, "_textinv", st)
    return st


def _expanded(pipe, prompt, tokenizer):
    """A prompt (or list of them) expanded for the encoder of ``tokenizer``."""
    st = state(pipe, create=False)
    if st is None or prompt is None:
        return prompt
    i = st.encoder_of(tokenizer)
    return [st.expand(p, i) for p in prompt] if isinstance(prompt, list) else st.expand(prompt, i)


def _convert_prompt(pipe, prompt, tokenizer):
    return type(pipe).maybe_convert_prompt(pipe, _expanded(pipe, prompt, tokenizer), tokenizer)


# SD3's pipeline has no maybe_convert_prompt: its per-encoder prompt methods are wrapped instead.
_PROMPT_METHODS = ("_get_clip_prompt_embeds", "_get_t5_prompt_embeds")


def _expanding(pipe, name: str):
    """``pipe.<name>`` that expands its prompt for its encoder first: the T5 method's is the T5
    slot's tokenizer, the CLIP method's the ``clip_model_index``-th CLIP slot's."""
    method = getattr(type(pipe), name)
    signature = inspect.signature(method)

    def call(*args, **kwargs):
        bound = signature.bind(pipe, *args, **kwargs)
        bound.apply_defaults()
        st = state(pipe, create=False)
        if st is not None and "prompt" in bound.arguments:
            kind = "t5" if "t5" in name else "clip"
            encoders = [e for e in st.encoders if e.kind == kind]
            index = int(bound.arguments.get("clip_model_index", 0) or 0) if kind == "clip" else 0
            if index < len(encoders):
                bound.arguments["prompt"] = _expanded(pipe, bound.arguments["prompt"], encoders[index].tokenizer)
        return method(*bound.args, **bound.kwargs)

    return call


def _route_prompts(pipe) -> None:
    """Route the pipeline's prompt handling through :func:`expand` (undone by :func:`remove`)."""
    if hasattr(type(pipe), "maybe_convert_prompt"):
        if "maybe_convert_prompt" not in vars(pipe):
            object.__setattr__(pipe, "maybe_convert_prompt", functools.partial(_convert_prompt, pipe))
        return
    for name in _PROMPT_METHODS:
        if hasattr(type(pipe), name) and name not in vars(pipe):
            object.__setattr__(pipe, name, _expanding(pipe, name))


def apply(pipe, embeddings, *, on_mismatch: str = "error", names: Sequence[str] | None = None) -> list[Applied]:
    """Apply embeddings (objects, files or library folders) to a diffusers SD, SDXL, SD3 or Flux.1 pipeline.

    ``on_mismatch="skip"`` skips (with a warning) embeddings made for another model family, as
    A1111 does; otherwise they raise :class:`ModelMismatchError` and nothing is applied.
    Returns what was applied.  Re-applying a name replaces the earlier embedding of that name.
    """
    embs = _as_embeddings(embeddings)
    if names is not None:
        if len(names) != len(embs):
            raise TextinvError(f"names: {len(names)} given for {len(embs)} embeddings")
        for emb, n in zip(embs, names):
            emb.name = n
    st = state(pipe)
    if on_mismatch == "skip":
        keep = []
        for emb in embs:
            try:
                st.check(emb)
                keep.append(emb)
            except ModelMismatchError as e:
                warnings.warn(f"skipped: {e}", stacklevel=2)
        embs = keep
    aliases = [[emb.meta.get("token", "")] if emb.source_format == "diffusers" else [] for emb in embs]
    applied = st.add(embs, aliases)
    _route_prompts(pipe)
    return applied


def remove(pipe, names: str | Iterable[str] | None = None) -> list[str]:
    """Remove applied embeddings by name (all when ``names`` is None), restoring exactly."""
    st = state(pipe, create=False)
    if st is None:
        if names is None:
            return []
        raise TextinvError("no embeddings are applied to this pipeline")
    removed = st.remove([names] if isinstance(names, str) else names)
    if not st.applied:
        for name in ("maybe_convert_prompt", *_PROMPT_METHODS, "_textinv"):
            vars(pipe).pop(name, None)
    return removed


def expand(pipe, prompt: str, encoder: int = 0, only: str | None = None) -> str:
    """The prompt with triggers replaced by internal tokens for encoder ``encoder`` (an index in
    the family's order), for prompt-embedding builders; ``only``: that embedding's trigger alone."""
    st = state(pipe, create=False)
    return st.expand(prompt, encoder, only) if st is not None else prompt


def chunk_ids(pipe, prompt: str, encoder: int = 0) -> list[list[int]]:
    """A1111-style 77-token chunks (start, 75 tokens, end/padding) of an expanded prompt."""
    st = state(pipe, create=False)
    tok = encoder_pairs(pipe)[encoder][0]
    text = st.expand(prompt, encoder) if st is not None else prompt
    ids = tok(text, add_special_tokens=False, truncation=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    chunks = [ids[i : i + CHUNK] for i in range(0, max(len(ids), 1), CHUNK)]
    out = []
    for c in chunks:
        # A1111 ends every chunk with the end token and pads with it; padding beyond uses the
        # tokenizer's own pad id (SDXL's second tokenizer pads with "!").
        body = [bos] + c + [eos]
        out.append(body + [pad] * (CHUNK + 2 - len(body)))
    return out


def _as_embeddings(embeddings) -> list[Embedding]:
    """Embedding objects as they are; sources.load reads files, folders, runs (RUN@STEP), hub ids and URLs alike."""
    if isinstance(embeddings, (Embedding, str, os.PathLike)):
        embeddings = [embeddings]
    out = []
    for e in embeddings:
        out.extend([e] if isinstance(e, Embedding) else sources.load(e))
    return out


def nearest_words(emb: Embedding, pipe, k: int = 5) -> dict[str, list[list[tuple[str, float]]]]:
    """Per encoder slot and vector, the ``k`` vocabulary tokens with the highest cosine similarity."""
    out = {}
    for s, (tok, te) in slot_pairs(pipe):
        slot = s.key
        if slot not in emb.vectors:
            continue
        table = te.get_input_embeddings()
        table = table.base.weight if isinstance(table, TriggerEmbedding) else table.weight
        vecs = emb.vectors[slot].float()
        if emb.layers is not None:
            vecs = vecs.mean(dim=0)  # a per-layer embedding: its layers' average
        if vecs.shape[-1] != table.shape[-1]:
            raise ModelMismatchError(
                f"embedding {emb.name!r} is {describe_widths(emb)}; this model is {families.of_width(table.shape[-1])}"
            )
        sims = nn.functional.normalize(vecs, dim=-1) @ nn.functional.normalize(table.detach().float(), dim=-1).T
        top = sims.topk(k, dim=-1)
        out[slot] = [
            [(tok.convert_ids_to_tokens(int(i)).replace("</w>", "").replace("▁", ""), float(s)) for s, i in zip(vs, ix)]
            for vs, ix in zip(top.values, top.indices)
        ]
    return out
