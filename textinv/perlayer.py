"""Per-layer (P+, "XTI") embeddings in diffusers SD 1.x/2.x pipelines.

A per-layer embedding gives every cross-attention layer of the UNet its own vectors for the trigger
(Voynov et al. 2023, "P+"; kohya's XTI files).  How textinv conditions each layer:

* The trigger is applied like any other (:mod:`textinv.tokens`): its internal tokens, the ones
  prompts expand to, hold the layers' average (what a reader without per-layer support would
  use).  Each layer's vectors get internal tokens of their own, rows of the same trigger table.
* Whenever the text encoder sees trigger tokens, it is run again once per distinct layer-vector
  set with the trigger tokens swapped for that layer's (the same batch shape, so a layer whose
  vectors equal a plain embedding's gives bit for bit the plain embedding's states).  The results
  are remembered under the content of the ordinary encoding, per 77-token chunk.  Two places do
  it: a forward hook on the text encoder (prompts a pipeline encodes itself) and
  :func:`textinv.prompts.encode` (A1111 weights, long prompts and Clip skip; it weighs each
  layer's states as it weighs the ordinary ones).
* Each cross-attention layer's attention processor is wrapped (``unet.set_attn_processor``):
  the wrapper looks up the chunks of the ``encoder_hidden_states`` it is given and swaps in its
  layer's version; chunks it does not know (a negative prompt without the trigger, empty padding
  chunks) stay as they are.  Matching by content makes it indifferent to how a pipeline arranges
  its prompts: copies per image, the classifier-free guidance batch, ``prompt_embeds``, dtype
  casts, chunks side by side.  Several per-layer triggers, plain ones, and per-layer triggers in
  negative prompts combine, since every layer's run swaps all of them at once.
* ``textinv.remove`` puts the very processor objects back and removes the hook.

For training, :func:`encoder_states` gives every layer's states differentiably (gradients reach
the trigger rows, ``TriggerEmbedding.extra``) and :func:`layer_states` / :func:`unet_forward` run
the UNet with them; :func:`rows` says which rows of ``extra`` hold which layer's vectors.
``textinv train --per-layer`` uses them through :func:`trainable` (the new word, one copy of its
init vectors per layer) and :class:`LayeredUNet` (the UNet the loss calls).

Not covered: diffusers' own ``clip_skip=`` argument (textinv's ``--clip-skip`` is), and prompt
embeddings built by other libraries that re-weight the states (compel): those chunks are not
recognised, and the trigger then acts with its layers' average.  Attention processors set after
the embedding was applied replace the wrappers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
from collections import OrderedDict

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from . import families, prompts, tokens
from .errors import ModelMismatchError, TextinvError
from .formats import SD_LAYERS, Embedding

REMEMBERED = 64  # prompt chunks whose per-layer states are kept (oldest forgotten first)
_STAGES = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def unet_layers(unet) -> list[str]:
    """The UNet's cross-attention layers as module paths, in the order its forward pass visits them.

    ``named_modules`` lists the up blocks before the mid block (the order they are registered),
    so the stages are put in forward order; within a stage the module order is the visiting order."""
    found = [name for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]
    return sorted(found, key=lambda name: _STAGES.get(name.split(".")[0], len(_STAGES)))


def check(state: tokens.TriggerState, emb: Embedding) -> None:
    """ModelMismatchError unless the per-layer ``emb`` fits the pipeline ``state`` belongs to (a
    plain embedding is not this check's business)."""
    if emb.layers is None:
        return
    if len(emb.vectors) == 1:
        (t,) = emb.vectors.values()
        if t.ndim != 3 or t.shape[0] != len(emb.layers):
            raise TextinvError(f"per-layer embedding {emb.name!r}: vectors are {tuple(t.shape)}, not "
                               f"[{len(emb.layers)} layers, vectors, width]")
    if not state.spec.per_layer:
        raise ModelMismatchError(f"embedding {emb.name!r} is a per-layer (P+) embedding; those are "
                                 f"{families.layouts(per_layer=True)} only, this model is {state.family} "
                                 "(textinv convert --to-single makes a plain one)")
    if state.unet is None:
        raise ModelMismatchError(f"embedding {emb.name!r} is a per-layer (P+) embedding: it needs a pipeline with a UNet")
    want = unet_layers(state.unet)
    if list(emb.layers) != want:
        same = "its layers are named differently" if len(want) == len(emb.layers) else f"this model's UNet has {len(want)}"
        raise ModelMismatchError(f"embedding {emb.name!r} is per-layer for a UNet with {len(emb.layers)} cross-attention "
                                 f"layers ({emb.family}); {same}")


def conditioning(pipe) -> "Conditioning | None":
    """The pipeline's per-layer conditioning while per-layer embeddings are applied, else None."""
    st = tokens.state(pipe, create=False)
    return st.layered if st is not None else None


def sync(state: tokens.TriggerState) -> None:
    """Install, refresh or remove the per-layer machinery to match what ``state`` has applied
    (called by :class:`textinv.tokens.TriggerState` after every change)."""
    per_layer = [a for a in state.applied.values() if a.layer_tokens]
    if not per_layer:
        if state.layered is not None:
            state.layered.uninstall()
            state.layered = None
        return
    if state.layered is None:
        state.layered = Conditioning(state.unet, state.encoders[0].text_encoder)
    tok = state.encoders[0].tokenizer
    state.layered.set_tokens(
        tok.convert_tokens_to_ids([t for a in per_layer for t in a.tokens]),
        [tok.convert_tokens_to_ids([t for a in per_layer for t in a.layer_tokens[i]])
         for i in range(len(state.layered.layers))])


def rows(pipe, name: str) -> torch.Tensor:
    """``[layers, n]``: the rows of the text encoder's ``TriggerEmbedding.extra`` holding each layer's
    vectors of the applied per-layer embedding ``name`` (a trainer reads its results there)."""
    st = tokens.state(pipe, create=False)
    a = st.applied.get(name.lower()) if st is not None else None
    if a is None or not a.layer_tokens:
        raise TextinvError(f"no per-layer embedding named {name!r} is applied")
    module = st.encoders[0].text_encoder.get_input_embeddings()
    ids = torch.tensor([st.encoders[0].tokenizer.convert_tokens_to_ids(layer) for layer in a.layer_tokens])
    return module.row_of.cpu()[ids]


def encoder_states(pipe, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """``[layers, B, S, D]``: the hidden states of expanded prompts' token ids ``ids`` ``[B, S]`` as
    each cross-attention layer sees them, differentiable in the trigger rows (for training).  All
    layers in one batched text-encoder pass."""
    cond = _required(pipe)
    spec = tokens.state(pipe).spec
    with cond.silenced():
        batch = torch.cat([cond.swap(ids, i) for i in range(len(cond.layers))])
        hidden, _ = prompts.run_encoder(cond.text_encoder, batch, spec, spec.keys[0], clip_skip)
    return hidden.view(len(cond.layers), *ids.shape, hidden.shape[-1])


@contextlib.contextmanager
def layer_states(pipe, states: torch.Tensor):
    """While open, cross-attention layer ``i`` of the pipeline's UNet attends to ``states[i]``
    (``[layers, B, S, D]``, e.g. from :func:`encoder_states`), whatever ``encoder_hidden_states`` the
    UNet is given; gradients flow through."""
    cond = _required(pipe)
    if states.ndim != 4 or states.shape[0] != len(cond.layers):
        raise TextinvError(f"per-layer states must be [{len(cond.layers)} layers, batch, tokens, width]; "
                           f"got {tuple(states.shape)}")
    previous, cond.forced = cond.forced, states
    try:
        yield
    finally:
        cond.forced = previous


def unet_forward(pipe, sample: torch.Tensor, timestep, states: torch.Tensor, **kwargs):
    """``pipe.unet(sample, timestep, ...)`` with each cross-attention layer given its own ``states[i]``."""
    with layer_states(pipe, states):
        return pipe.unet(sample, timestep, encoder_hidden_states=states[0], **kwargs)


def trainable(emb: Embedding, pipe, fmt: str) -> Embedding:
    """The new word ``emb`` (plain vectors) as a per-layer embedding of the pipeline's UNet, every
    layer starting from the same vectors (P+ starts each layer from the init word, as plain TI
    starts its one set).  Checked before the first step: SD 1.x/2.x only, and ``fmt`` "xti" only
    where the UNet has kohya's 16-layer map."""
    if not any(f.per_layer for f in families.by_keys(emb.vectors)):
        raise TextinvError(f"--per-layer: P+ (per-layer) training is for {families.layouts(per_layer=True)} models; "
                           f"this one is {emb.family}")
    layers = unet_layers(pipe.unet)
    if fmt == "xti" and layers != list(SD_LAYERS):
        raise TextinvError(f"--format xti: kohya's XTI files hold the SD 1.x/2.x UNet's 16 cross-attention layers; "
                           f"this model's UNet has {len(layers)}: use --format per-layer")
    vectors = {slot: t.expand(len(layers), *t.shape).clone() for slot, t in emb.vectors.items()}
    return dataclasses.replace(emb, vectors=vectors, layers=layers)


class LayeredUNet:
    """A trainer's UNet (the pipeline's, or its compiled version) that also takes per-layer states:
    ``[layers, B, S, D]`` encoder states (from :func:`encoder_states`) give each cross-attention
    layer its own; ordinary ``[B, S, D]`` ones (the frozen unconditional branch of a guided loss)
    pass through as they are.  Other attributes (``dtype``, ``config``) are the UNet's."""

    def __init__(self, pipe, unet):
        self.pipe, self.unet = pipe, unet

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        if encoder_hidden_states.ndim != 4:
            return self.unet(sample, timestep, encoder_hidden_states, **kwargs)
        with layer_states(self.pipe, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states[0], **kwargs)


def encode_chunk(pipe, ids: torch.Tensor, run, weighed):
    """textinv.prompts' chunk hook: ``run(ids)`` (-> (hidden, pooled)) weighed, and, when ``ids``
    call a per-layer trigger, its hidden states per layer, weighed alike and remembered as what
    each layer sees where the chunk's states appear.  None while no per-layer embedding is
    applied.  The text encoder's own hook stays out of it."""
    cond = conditioning(pipe)
    if cond is None:
        return None
    with cond.silenced():
        hidden, pooled = run(ids)
        layered = cond.encode(ids, lambda x: run(x)[0]) if bool(cond.hits(ids).any()) else None
    hidden = weighed(hidden)
    if layered is not None:
        cond.remember(ids, hidden, torch.stack([weighed(x) for x in layered]))
    return hidden, pooled


def _required(pipe) -> "Conditioning":
    cond = conditioning(pipe)
    if cond is None:
        raise TextinvError("no per-layer embedding is applied to this pipeline")
    return cond


def _version(t: torch.Tensor) -> int:
    """A tensor's in-place-change counter; tensors made under ``torch.inference_mode`` have none."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _key(chunk: torch.Tensor) -> tuple:
    """A content key of one chunk of hidden states (CPU tensor): shape, dtype and a hash of the bytes."""
    chunk = chunk.contiguous()
    digest = hashlib.blake2b(chunk.view(torch.uint8).numpy(), digest_size=16).digest()
    return tuple(chunk.shape), str(chunk.dtype), digest


class Conditioning:
    """The per-layer machinery of one pipeline: wrapped processors, the text-encoder hook, the
    trigger-token swaps and the remembered per-layer states."""

    def __init__(self, unet, text_encoder: nn.Module):
        self.unet, self.text_encoder = unet, text_encoder
        self.layers = unet_layers(unet)
        self.base_ids = torch.zeros(0, dtype=torch.long)  # tokens prompts expand per-layer triggers to
        self.layer_ids = torch.zeros(len(self.layers), 0, dtype=torch.long)  # [layers, K]: each layer's own
        self.known: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # chunk key -> [layers, S, D]
        self.lengths: set[int] = set()
        self.forced: torch.Tensor | None = None  # layer_states(): [layers, B, S, D] for every UNet call
        self._quiet = False
        self._last: tuple | None = None  # (hidden states, version, per-layer stack or None) last looked up
        processors = unet.attn_processors
        wrapped = {f"{name}.processor": LayerProcessor(processors[f"{name}.processor"], i, self)
                   for i, name in enumerate(self.layers)}
        unet.set_attn_processor({**processors, **wrapped})
        self._hook = text_encoder.register_forward_hook(self._encoder_hook, with_kwargs=True)

    def uninstall(self) -> None:
        """The processors this put in place go back to the ones they wrapped (the same objects);
        processors someone set since are left alone."""
        current = self.unet.attn_processors
        self.unet.set_attn_processor({k: p.inner if isinstance(p, LayerProcessor) and p.conditioning is self else p
                                      for k, p in current.items()})
        self._hook.remove()
        self.known.clear()
        self._last = None

    def set_tokens(self, base_ids: list[int], layer_ids: list[list[int]]) -> None:
        self.base_ids = torch.tensor(base_ids, dtype=torch.long)
        self.layer_ids = torch.tensor(layer_ids, dtype=torch.long).view(len(self.layers), -1)
        self.known.clear()
        self._last = None

    @contextlib.contextmanager
    def silenced(self):
        """The text-encoder hook does nothing inside (the caller encodes per layer itself)."""
        before, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = before

    # -- encoding ------------------------------------------------------------------------------
    def hits(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B]``: which rows of ``ids`` call a per-layer trigger."""
        return torch.isin(ids, self.base_ids.to(ids.device)).reshape(-1, ids.shape[-1]).any(dim=-1)

    def swap(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        """``ids`` with every per-layer trigger token replaced by the layer's own token."""
        out = ids.clone()
        for base, own in zip(self.base_ids.tolist(), self.layer_ids[layer].tolist()):
            out[ids == base] = own
        return out

    def groups(self) -> list[list[int]]:
        """Layers with identical vectors (for every applied per-layer embedding), grouped: one
        text-encoder run serves a group."""
        module = self.text_encoder.get_input_embeddings()
        rows = module.extra.detach()[module.row_of[self.layer_ids.to(module.row_of.device)]]
        out: list[list[int]] = []
        for i in range(len(self.layers)):
            same = next((g for g in out if torch.equal(rows[g[0]], rows[i])), None)
            if same is None:
                out.append([i])
            else:
                same.append(i)
        return out

    def encode(self, ids: torch.Tensor, run) -> torch.Tensor:
        """``[layers, *run's output shape]``: ``run`` (ids -> hidden states) once per distinct
        layer-vector set, each with the batch shape of ``ids``."""
        per_layer: list[torch.Tensor | None] = [None] * len(self.layers)
        for group in self.groups():
            hidden = run(self.swap(ids, group[0]))
            for i in group:
                per_layer[i] = hidden
        return torch.stack(per_layer)

    def _encoder_hook(self, module, args, kwargs, output):
        """After a text-encoder pass that calls per-layer triggers: every layer's version, remembered."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self._quiet or ids is None or not bool(self.hits(ids).any()):
            return output

        def run(swapped):
            if "input_ids" in kwargs:
                return module(*args, **{**kwargs, "input_ids": swapped})[0]
            return module(swapped, *args[1:], **kwargs)[0]

        with torch.no_grad(), self.silenced():
            self.remember(ids, output[0], self.encode(ids, run))
        return output

    # -- remembering and looking up ------------------------------------------------------------
    def remember(self, ids: torch.Tensor, hidden: torch.Tensor, layered: torch.Tensor) -> None:
        """Keep ``layered[:, b]`` under the content of ``hidden[b]`` for every row ``b`` that calls a
        per-layer trigger, also as ``hidden`` cast to the dtypes a pipeline may cast it to."""
        hits = self.hits(ids).tolist()
        plain = hidden.detach().cpu()
        for b, hit in enumerate(hits):
            if not hit:
                continue
            entry = layered[:, b].detach().clone()
            for dtype in dict.fromkeys((plain.dtype, torch.float32, torch.float16, torch.bfloat16)):
                key = _key(plain[b].to(dtype))
                self.known[key] = entry
                self.known.move_to_end(key)
            self.lengths.add(int(hidden.shape[-2]))
        while len(self.known) > 4 * REMEMBERED:
            self.known.popitem(last=False)
        self._last = None

    def states(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """The encoder hidden states cross-attention layer ``layer`` attends to instead of ``hidden``."""
        if self.forced is not None:
            forced = self.forced[layer]
            if forced.shape != hidden.shape:
                raise TextinvError(f"per-layer states are {tuple(forced.shape)} but the UNet was given "
                                   f"{tuple(hidden.shape)} encoder hidden states")
            return forced.to(hidden.dtype)
        if not self.known or hidden.ndim != 3:
            return hidden
        last = self._last
        if last is None or last[0] is not hidden or last[1] != _version(hidden):
            self._last = last = (hidden, _version(hidden), self._lookup(hidden))
        return hidden if last[2] is None else last[2][layer]

    def _lookup(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``[layers, B, T, D]``: ``hidden`` with every remembered chunk replaced by each layer's
        version, or None when no chunk is remembered."""
        flat = hidden.detach().cpu()
        out = None
        for length in sorted(self.lengths):
            if hidden.shape[1] % length:
                continue
            for b in range(hidden.shape[0]):
                for start in range(0, hidden.shape[1], length):
                    entry = self.known.get(_key(flat[b, start : start + length]))
                    if entry is None:
                        continue
                    if out is None:
                        out = hidden.detach().unsqueeze(0).repeat(len(self.layers), 1, 1, 1)
                    out[:, b, start : start + length] = entry.to(hidden.device, hidden.dtype)
        return out


class LayerProcessor:
    """Wraps one cross-attention layer's attention processor: the layer attends to its own version
    of the prompt (:meth:`Conditioning.states`), then the wrapped processor does the work."""

    def __init__(self, inner, index: int, conditioning: Conditioning):
        self.inner, self.index, self.conditioning = inner, index, conditioning
        # diffusers passes a processor only the cross_attention_kwargs its __call__ names (it reads
        # the signature of ``processor.__call__``); this instance attribute names the wrapped
        # processor's, while calls go to the class's __call__ below.
        def call(*args, **kwargs):
            return self(*args, **kwargs)

        call.__signature__ = inspect.signature(inner.__call__)
        self.__call__ = call

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        states = self.conditioning.states
        if isinstance(encoder_hidden_states, torch.Tensor):
            encoder_hidden_states = states(encoder_hidden_states, self.index)
        elif isinstance(encoder_hidden_states, tuple) and encoder_hidden_states:  # IP-Adapter: (text, image)
            encoder_hidden_states = (states(encoder_hidden_states[0], self.index), *encoder_hidden_states[1:])
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


# P+ plugs into trigger words and prompt encoding here; importing textinv (or any of its modules:
# the package imports this one) registers it.
tokens.HOOKS["per-layer"] = tokens.Hook(check=check, sync=sync)
prompts.CHUNK_HOOKS["per-layer"] = encode_chunk
