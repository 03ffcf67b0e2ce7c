"""A "pickle module" for ``torch.load`` that builds only tensors and plain containers.

Embedding ``.pt``/``.bin`` files come from strangers, and unpickling can run any function the file
names.  ``torch.load(weights_only=True)`` is safe but refuses ``torch.nn.ParameterDict``, which the
original Textual Inversion code saved; so, like AUTOMATIC1111, we allow-list what an embedding
needs and rebuild a ``ParameterDict`` as a plain dict of tensors (never as a Module).

Use: ``torch.load(f, map_location="cpu", pickle_module=safe_pickle, weights_only=False)``.
"""
from __future__ import annotations

import codecs
import collections
import pickle

import numpy
import torch
import torch._utils


class ParameterDictStandIn(dict):
    """What a pickled ``torch.nn.ParameterDict`` becomes: ``{key: tensor}``, nothing more."""

    dump_patches = False  # read by torch's legacy loader when it compares module sources

    def __setstate__(self, state):
        params = state.get("_parameters", {}) if isinstance(state, dict) else {}
        self.clear()
        self.update(params)


def _parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stands in for ``torch._utils._rebuild_parameter[_with_state]``: keeps only the data."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter whose data is not a tensor")
    return data.detach()


def _numpy_multiarray_scalar():
    """numpy moved ``core`` to ``_core`` in 2.0; files pickled by either name read the same."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch.nn.modules.container", "ParameterDict"): ParameterDictStandIn,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("numpy", "dtype"): numpy.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_multiarray_scalar(),
    ("numpy._core.multiarray", "scalar"): _numpy_multiarray_scalar(),
    ("_codecs", "encode"): codecs.encode,
}
if hasattr(torch._utils, "_rebuild_tensor_v3"):
    _ALLOWED[("torch._utils", "_rebuild_tensor_v3")] = torch._utils._rebuild_tensor_v3


def allowed_global(module: str, name: str):
    """The object for an allowed global, else raise ``UnpicklingError`` naming it."""
    module = {"__builtin__": "builtins"}.get(module, module)  # protocol 2 writes Python 2 names
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)  # dtypes such as torch.float16
    raise pickle.UnpicklingError(f"unpickling wants global {module}.{name}, which is never allowed")


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` consults the allow-list only."""

    def find_class(self, module, name):
        return allowed_global(module, name)


def load(file, **kwargs):
    return Unpickler(file, **kwargs).load()
