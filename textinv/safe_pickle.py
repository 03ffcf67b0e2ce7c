"""A "pickle module" for ``torch.load`` that builds only what an embedding file can hold.

Embedding ``.pt``/``.bin`` files come from strangers, and unpickling can run any function the file
names.  ``torch.load(weights_only=True)`` is safe but refuses ``torch.nn.ParameterDict``, which the
original Textual Inversion code saved; so, like AUTOMATIC1111, we allow-list what an embedding
needs: tensors and their storages, plain containers, plain numeric numpy dtypes and scalars, and a
``ParameterDict`` rebuilt as a plain dict of tensors (never as a Module).

Allowed functions can still be given hostile arguments, so each is checked before it runs:

* numpy dtypes must be plain numbers (bool, int, float, complex): an object or void dtype with
  forged fields makes a numpy scalar hold a forged object pointer, which crashes the interpreter;
* BUILD (``__setstate__``) is applied only to the ``ParameterDict`` stand-in; on a dtype only the
  state that dtype already has is accepted (numpy's built-in dtypes are process-wide singletons);
* a tensor's size, strides and offset must fit inside its storage (torch does not check), and a
  storage may not be larger than the file that holds it (:func:`limits`): nothing is allocated
  for a size the file cannot back.

This is the pure-Python unpickler (``pickle._Unpickler``): its opcodes can be intercepted, and an
embedding's pickle is a few kB.  Use: ``torch.load(f, map_location="cpu", pickle_module=safe_pickle,
weights_only=False)`` inside ``with safe_pickle.limits(...)``.
"""
from __future__ import annotations

import codecs
import collections
import contextlib
import contextvars
import pickle

import numpy
import torch
import torch._utils

try:  # numpy moved ``core`` to ``_core`` in 2.0; files pickled by either name read the same
    from numpy._core.multiarray import scalar as _SCALAR
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as _SCALAR

MAX_TENSOR_ELEMENTS = 1 << 28  # 1 GB of float32: far beyond any embedding or token table view

# What the storages of the file being read may take: {record key: bytes} for a torch zip, and the
# file's size (every storage of a legacy pickle lies in the file).  Set by limits().
_LIMITS: contextvars.ContextVar = contextvars.ContextVar("safe_pickle_limits", default=None)


@contextlib.contextmanager
def limits(file_bytes: int, records: dict[str, int] | None = None):
    """Bound the storages the next ``torch.load`` may create: no storage larger than its record
    (zip) or than the whole file (legacy pickle), and all of them together no larger than the file."""
    token = _LIMITS.set({"file": int(file_bytes), "records": records, "used": 0})
    try:
        yield
    finally:
        _LIMITS.reset(token)


class ParameterDictStandIn(dict):
    """What a pickled ``torch.nn.ParameterDict`` becomes: ``{key: tensor}``, nothing more."""

    dump_patches = False  # read by torch's legacy loader when it compares module sources

    def __setstate__(self, state):
        params = state.get("_parameters", {}) if isinstance(state, dict) else {}
        self.clear()
        self.update({k: v for k, v in params.items() if isinstance(v, torch.Tensor)})


def _refuse(why: str):
    raise pickle.UnpicklingError(f"{why}, which is never allowed")


def _plain(dtype) -> bool:
    return (isinstance(dtype, numpy.dtype) and dtype.kind in "biufc" and dtype.fields is None
            and dtype.subdtype is None and not dtype.hasobject)


def _dtype(obj, align=False, copy=False):
    """``numpy.dtype`` for plain numeric types only."""
    if not isinstance(obj, str) or len(obj) > 8:
        _refuse(f"a numpy dtype built from {type(obj).__name__} {str(obj)[:20]!r}")
    try:
        d = numpy.dtype(obj)
    except TypeError:
        _refuse(f"an unknown numpy dtype {obj!r}")
    if not _plain(d):
        _refuse(f"a numpy dtype of kind {d.kind!r} ({obj!r}): only plain numbers are")
    return d


def _scalar(dtype, data=None):
    """A numpy scalar (a step count saved as numpy.int64, say) of a plain numeric dtype."""
    if not _plain(dtype):
        _refuse("a numpy scalar of a dtype that is not a plain number")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        _refuse("a numpy scalar whose data does not match its dtype")
    return _SCALAR(dtype, data)


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or not all(type(v) is int for v in values):
        _refuse(f"a tensor whose {what} are not integers")
    return tuple(values)


def _checked_view(storage, storage_offset, size, stride, dtype=None) -> None:
    """The tensor ``storage[offset : ...]`` with this size and stride must lie inside the storage."""
    size, stride = _ints(size, "sizes"), _ints(stride, "strides")
    if type(storage_offset) is not int or len(size) != len(stride) or len(size) > 8:
        _refuse("a tensor with a malformed size, stride or offset")
    if storage_offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        _refuse("a tensor with a negative size, stride or offset")
    numel = 1
    for s in size:
        numel *= s
    if numel > MAX_TENSOR_ELEMENTS:
        _refuse(f"a tensor of {numel} elements (limit {MAX_TENSOR_ELEMENTS})")
    if numel == 0:
        return
    extent = storage_offset + 1 + sum((s - 1) * st for s, st in zip(size, stride))
    if isinstance(storage, torch.storage.TypedStorage):
        available = storage.size()
    elif isinstance(storage, torch.UntypedStorage) and isinstance(dtype, torch.dtype):
        available = storage.nbytes() // dtype.itemsize
    else:
        _refuse(f"a tensor on a {type(storage).__name__}, not a storage")
    if extent > available:
        _refuse(f"a tensor reaching element {extent} of a storage of {available}")


def _rebuild_tensor(storage, storage_offset, size, stride, *args, **kwargs):
    _checked_view(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *args, **kwargs):
    _checked_view(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, *args, **kwargs)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *args, **kwargs):
    _checked_view(storage, storage_offset, size, stride, dtype)
    return torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                                           *args, **kwargs)


def _parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stands in for ``torch._utils._rebuild_parameter[_with_state]``: keeps only the data."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter whose data is not a tensor")
    return data.detach()


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch.nn.modules.container", "ParameterDict"): ParameterDictStandIn,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("_codecs", "encode"): codecs.encode,
}
_STORAGE_TYPES = {name for name in dir(torch) if name.endswith("Storage") and not name.startswith("_")}


def allowed_global(module: str, name: str):
    """The object for an allowed global, else raise ``UnpicklingError`` naming it."""
    module = {"__builtin__": "builtins"}.get(module, module)  # protocol 2 writes Python 2 names
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)  # dtypes such as torch.float16
    if module == "torch" and name in _STORAGE_TYPES:
        return getattr(torch, name)  # storage classes named in persistent ids (torch.FloatStorage)
    raise pickle.UnpicklingError(f"unpickling wants global {module}.{name}, which is never allowed")


def _storage_bytes(pid) -> tuple[str, int]:
    """(record key, bytes) a torch storage persistent id asks for; refuses malformed ids."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        _refuse(f"a persistent id {str(pid)[:40]!r} that is not a torch storage")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if type(numel) is not int or numel < 0 or not isinstance(key, str):
        _refuse("a storage with a malformed key or size")
    dtype = getattr(storage_type, "dtype", None)
    if storage_type is torch.UntypedStorage:
        itemsize = 1
    elif isinstance(dtype, torch.dtype):  # torch.FloatStorage & co, or torch's StorageType("FloatStorage")
        itemsize = dtype.itemsize
    else:
        _refuse(f"a storage of type {str(storage_type)[:40]}")
    return key, numel * itemsize


class Unpickler(pickle._Unpickler):
    """The pure-Python unpickler with an allow-list ``find_class``, checked storages and BUILD."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        return allowed_global(module, name)

    # torch assigns its own persistent_load to the instance; every call goes through this check
    @property
    def persistent_load(self):
        return self._checked_persistent_load

    @persistent_load.setter
    def persistent_load(self, fn):
        self._torch_persistent_load = fn

    def _checked_persistent_load(self, pid):
        fn = getattr(self, "_torch_persistent_load", None)
        if fn is None:
            raise pickle.UnpicklingError("a persistent id outside a torch file")
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module" and pid[1] is ParameterDictStandIn:
            return fn(pid)  # the legacy format names a pickled Module's class (the original TI code's ParameterDict)
        key, nbytes = _storage_bytes(pid)
        budget = _LIMITS.get()
        if budget is not None:
            records = budget["records"]
            limit = records.get(key, -1) if records is not None else budget["file"] - budget["used"]
            if nbytes > limit:  # a truncated file, or a size meant to make us allocate: read nothing
                raise pickle.UnpicklingError(f"a storage of {nbytes} bytes, but the file holds {max(limit, 0)} for it")
            if records is None and key not in budget.setdefault("seen", set()):
                budget["seen"].add(key)
                budget["used"] += nbytes
        return fn(pid)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, ParameterDictStandIn):
            inst.__setstate__(state)
        elif isinstance(inst, numpy.dtype):
            if not _plain(inst) or state != inst.__reduce__()[2]:
                _refuse("changing a numpy dtype's state")
        else:
            _refuse(f"setting the state of a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


def load(file, **kwargs):
    return Unpickler(file, **kwargs).load()
