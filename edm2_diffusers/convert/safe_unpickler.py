"""A restricted unpickler for NVIDIA's published EDM2 network pickles: it rebuilds data and never runs code.

The official checkpoints (``edm2-img64-*.pkl``, ``edm2-img512-*.pkl``) are ``pickle.dump`` of a dict whose ``ema``
entry is the network. Each network class was saved by a persistence mechanism that puts the whole Python source of its
module into the pickle and asks ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` to ``exec`` it when the
file is loaded. Loading such a file with :mod:`pickle` therefore runs whatever source the file carries.

:func:`load_official_pickle` reads the same bytes with a restricted unpickler instead. It resolves only the few globals
these files really reference (found by disassembling pickles written the same way):

==========================================================  ===================================================
global                                                      rebuilt as
==========================================================  ===================================================
``torch_utils.persistence._reconstruct_persistent_obj``     an inert :class:`ObjectRecord` (source kept as text)
``torch._utils._rebuild_tensor_v2``                         a tensor over a storage read by this module
``torch._utils._rebuild_parameter``                         that tensor (no ``nn.Parameter`` is created)
``torch.storage._load_from_bytes``                          a storage parsed from torch's legacy format here
``torch.nn.modules.container.ModuleDict``                   an :class:`ObjectRecord` of its sub-modules
``collections.OrderedDict``, ``dnnlib.util.EasyDict``       ``OrderedDict`` and plain ``dict``
``numpy.ndarray`` with ``numpy.dtype`` and ``_reconstruct``  a numeric numpy array (the latent encoder's constants)
==========================================================  ===================================================

Every other global, and every global inside the storage bytes other than torch's numeric storage types, raises
:class:`UnsafePickleError` naming it, before anything is called. The functions above are this module's own code;
none of the referenced modules is imported.

Nor may a file make the loader exhaust memory or the stack: every pickle stream first passes
:func:`~.pickle_scan.check_pickle_stream` (no declared length past the data that follows), a tensor may neither reach
past its storage nor hold more elements than it (stride-0 views included), a storage must hold the bytes it declares,
and the data may nest at most :data:`MAX_NESTING` levels. Each refusal is an :class:`UnsafePickleError`.

Of the package this module imports only :mod:`.pickle_scan` and :mod:`.pickle_records`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections import OrderedDict
from typing import Any, BinaryIO

import numpy as np
import torch

from .pickle_records import ObjectRecord, record_from_state
from .pickle_scan import UnsafePickleError, check_pickle_stream

__all__ = ["MAX_NESTING", "UnsafePickleError", "ObjectRecord", "load_official_pickle"]

# Containers and records may nest this deep (an official snapshot needs about 20 levels).
MAX_NESTING = 200


def _checked_load(unpickler: pickle.Unpickler, f, end: int, what: str):
    """``unpickler.load()`` of the stream at ``f``'s position, once :func:`check_pickle_stream` passed it."""
    check_pickle_stream(f, end, what)
    return unpickler.load()


# ---------------------------------------------------------------------------------------------------------------------
# Stand-ins that the restricted unpickler hands out instead of the real globals. All of them only store data.


class _PersistentStub:
    """Result of the ``_reconstruct_persistent_obj(meta)`` call: the meta dict, kept for the final pass."""

    def __init__(self, meta):
        self.meta = meta

    def __setstate__(self, state):
        raise ValueError("malformed pickle: state applied to a persistent object after its reconstruction")

    def validated_meta(self) -> dict:
        meta = self.meta
        if not isinstance(meta, dict):
            raise ValueError("malformed pickle: a persistent object's metadata is not a dict")
        if meta.get("type", "class") != "class":
            raise ValueError(f"unsupported persistent object type {meta.get('type')!r} (only 'class' is known)")
        if not isinstance(meta.get("class_name"), str):
            raise ValueError("malformed pickle: a persistent object's metadata has no class_name")
        src = meta.get("module_src")
        if src is not None and not isinstance(src, str):
            raise ValueError("malformed pickle: a persistent object's module_src is not text")
        return meta


class _ModuleDictStub:
    """Built by NEWOBJ for ``torch.nn.ModuleDict``; BUILD hands it the module's ``__dict__``."""

    def __setstate__(self, state):
        self.state = state


class _DTypeStub:
    # Plain numeric dtypes only: never 'O' (object arrays hold pickled objects) or structured 'V' types.
    ALLOWED = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"})

    def __init__(self, spec):
        if spec not in self.ALLOWED:
            raise UnsafePickleError(f"numpy dtype {spec!r} is not a plain numeric type; refusing it")
        self.spec = spec
        self.byteorder = "="

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise ValueError("malformed pickle: unexpected numpy dtype state")
        self.byteorder = state[1]

    def to_numpy(self):
        dtype = np.dtype(self.spec)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


# Handed out for ``numpy.ndarray``: neither callable nor a type, only usable as ``_reconstruct``'s first argument.
_NDARRAY = object()


class _NDArrayStub:
    def __init__(self):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def to_numpy(self):
        state = self.state
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DTypeStub)):
            raise ValueError("malformed pickle: unexpected numpy array state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(raw, (bytes, bytearray)):
            raise ValueError("malformed pickle: numpy array data is not raw bytes")
        dtype = dtype.to_numpy()
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise ValueError(f"malformed pickle: numpy array of shape {shape} does not match its {len(raw)} bytes")
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


# torch's legacy storage classes -> dtype (the ones torch.save writes inside _load_from_bytes).
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of torch's legacy (non-zip) serialization format
_LEGACY_PROTOCOL = 1001


class _Sealed:
    """Stand-ins that a pickle must not modify with BUILD."""

    def __setstate__(self, state):
        raise ValueError(f"malformed pickle: state applied to a {type(self).__name__.strip('_')}")


class _StorageType(_Sealed):
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage(_Sealed):
    """A flat tensor holding one storage's elements."""

    def __init__(self, data: torch.Tensor):
        self.data = data


def _refuse(module: str, name: str, where: str):
    raise UnsafePickleError(
        f"refusing to load global '{module}.{name}' {where}: only tensors, storages, plain containers and "
        "EDM2 persistent-object records are rebuilt, and this global is not one of them (loading it could run code)"
    )


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves no global at all (the small headers of torch's storage format)."""

    def find_class(self, module, name):
        _refuse(module, name, "inside a tensor storage")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"unexpected persistent id {pid!r} inside a tensor storage")


class _StorageUnpickler(_DataOnlyUnpickler):
    """The main record of a legacy storage stream: resolves torch's storage classes, and persistent ids to them."""

    def __init__(self, file, found: dict):
        super().__init__(file)
        self.found = found

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        _refuse(module, name, "inside a tensor storage")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r} inside a tensor storage")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise ValueError(f"malformed tensor storage reference {pid!r}")
        if view is not None:
            raise ValueError("storage views are not supported in official network pickles")
        self.found[key] = (storage_type.dtype, numel)
        return key


def _load_from_bytes(data) -> _Storage:
    """Parse one storage written by ``torch.save(storage, _use_new_zipfile_serialization=False)``."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("malformed pickle: a tensor storage is not bytes")
    f, end, what = io.BytesIO(data), len(data), "a tensor storage"
    try:
        magic = _checked_load(_DataOnlyUnpickler(f), f, end, what)
        protocol = _checked_load(_DataOnlyUnpickler(f), f, end, what)
        sys_info = _checked_load(_DataOnlyUnpickler(f), f, end, what)
    except UnsafePickleError:
        raise
    except Exception as err:
        raise ValueError(f"a tensor storage is not in torch's legacy serialization format: {err}") from err
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise ValueError("a tensor storage is not in torch's legacy serialization format")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ValueError("only little-endian tensor storages are supported")
    found: dict = {}
    root = _checked_load(_StorageUnpickler(f, found), f, end, what)
    keys = _checked_load(_DataOnlyUnpickler(f), f, end, what)
    if not isinstance(keys, list) or set(keys) != set(found):
        raise ValueError("malformed tensor storage: the storage key list does not match its records")
    storages = {}
    for key in keys:
        dtype, numel = found[key]
        stored_numel = int.from_bytes(f.read(8), "little", signed=True)
        if stored_numel != numel:
            raise ValueError(f"malformed tensor storage: {stored_numel} elements stored where {numel} were declared")
        nbytes, remaining = numel * torch.empty((), dtype=dtype).element_size(), end - f.tell()
        if numel < 0 or nbytes > remaining:
            raise UnsafePickleError(
                f"a tensor storage declares {numel} elements ({nbytes} bytes) but only {remaining} bytes of data "
                "follow (a truncated or forged file); refusing to allocate it"
            )
        raw = bytearray(f.read(nbytes))
        storages[key] = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    if root not in storages:
        raise ValueError("malformed tensor storage: no storage at its root")
    return _Storage(storages[root])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """A tensor viewing ``storage`` (checked to lie inside it); the autograd flags are dropped."""
    if not isinstance(storage, _Storage):
        raise ValueError("malformed pickle: a tensor's storage is not a tensor storage")
    if backward_hooks:
        raise UnsafePickleError("a tensor in the pickle carries backward hooks; refusing it")
    if metadata:
        raise ValueError(f"tensor metadata {metadata!r} is not supported")
    try:
        size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    except (TypeError, ValueError) as err:
        raise ValueError("malformed pickle: a tensor's size/stride/offset are not integers") from err
    if len(size) != len(stride) or not all(0 <= s < 2**63 for s in (offset, *size, *stride)):
        raise ValueError(f"malformed pickle: tensor geometry size={size} stride={stride} offset={offset}")
    flat = storage.data
    # A saved tensor's elements are distinct places of its storage: it can hold no more of them than the storage
    # has after its offset (this refuses stride-0 views that declare terabytes over a few bytes), and its last
    # element lies inside the storage.
    numel, last = math.prod(size), offset + sum((n - 1) * s for n, s in zip(size, stride))
    if numel and (numel > flat.numel() - offset or last >= flat.numel()):
        raise UnsafePickleError(
            f"a tensor of size {size}, stride {stride} and offset {offset} reaches beyond its storage of "
            f"{flat.numel()} elements; refusing it"
        )
    return flat.as_strided(size, stride, offset) if numel else torch.empty(size, dtype=flat.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise ValueError("malformed pickle: a parameter's data is not a tensor")
    if backward_hooks:
        raise UnsafePickleError("a parameter in the pickle carries backward hooks; refusing it")
    return data


# Factories are functions, not classes, so that NEWOBJ cannot create them without their checks; only ModuleDict (which
# the pickle creates with NEWOBJ) and the two dict types are classes.


def _reconstruct_persistent_obj(meta):
    return _PersistentStub(meta)


def _numpy_dtype(spec, align=False, copy=False):
    return _DTypeStub(spec)


def _numpy_reconstruct(subtype, shape=(0,), typecode=b"b"):
    if subtype is not _NDARRAY:
        raise UnsafePickleError("numpy _reconstruct is only accepted for plain numpy.ndarray")
    return _NDArrayStub()


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictStub,
    ("collections", "OrderedDict"): OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,  # written by numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,  # written by numpy 2.x
}


class _OfficialUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            _refuse(module, name, "from the pickle")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"unexpected persistent id {pid!r} in the pickle")


class _Finalizer:
    """Replaces every stand-in by its plain value: records, numpy arrays, dicts, lists, tuples.

    Values are converted once each (shared ones stay shared), at most :data:`MAX_NESTING` levels deep, and a module
    record may sit at one place of the module tree only (a tree that reuses sub-modules could make flattening it
    exponentially long; official networks reuse none).
    """

    def __init__(self):
        self.memo: dict[int, Any] = {}
        self.placed_modules: set[int] = set()

    def __call__(self, obj, depth: int = 0):
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        if depth >= MAX_NESTING:
            raise UnsafePickleError(f"the pickle nests its data more than {MAX_NESTING} levels deep; refusing it")
        if isinstance(obj, (dict, list)):  # registered before their items, so that they may contain themselves
            out = self.memo[key] = [] if isinstance(obj, list) else type(obj)() if type(obj) is OrderedDict else {}
            if isinstance(obj, list):
                out.extend(self(v, depth + 1) for v in obj)
            else:
                for k, v in obj.items():
                    out[self(k, depth + 1)] = self(v, depth + 1)
            return out
        if isinstance(obj, _PersistentStub):
            meta = obj.validated_meta()
            state = self(meta.get("state"), depth + 1)
            out = record_from_state(meta["class_name"], state, meta.get("module_src"), meta.get("version"))
            self._place(out)
        elif isinstance(obj, _ModuleDictStub):
            out = record_from_state("ModuleDict", self(getattr(obj, "state", None), depth + 1))
            self._place(out)
        elif isinstance(obj, _NDArrayStub):
            out = obj.to_numpy()
        elif isinstance(obj, (_DTypeStub, _Storage, _StorageType)) or obj is _NDARRAY:
            raise ValueError(f"malformed pickle: a bare {type(obj).__name__} outside a tensor or array")
        elif isinstance(obj, tuple):
            out = tuple(self(v, depth + 1) for v in obj)
        elif isinstance(obj, (set, frozenset)):
            out = type(obj)(self(v, depth + 1) for v in obj)
        else:
            out = obj
        self.memo[key] = out
        return out

    def _place(self, record: ObjectRecord) -> None:
        for name, sub in record.modules.items():
            if sub is None:
                continue
            if id(sub) in self.placed_modules:
                raise UnsafePickleError(
                    f"the module {sub.class_name!r} is placed twice in the pickle's module tree (again as "
                    f"{record.class_name}.{name}); official networks share no sub-module, refusing it"
                )
            self.placed_modules.add(id(sub))


def _named(err: ValueError, source: str | None) -> ValueError:
    """``err`` with the file it is about (when known) at the front of its message."""
    if source is None:
        return err
    cls = type(err) if type(err) in (ValueError, UnsafePickleError) else ValueError
    return cls(f"{source}: {err}")


def _load(f, source: str | None):
    try:
        if not (hasattr(f, "seekable") and f.seekable()):
            f = io.BytesIO(f.read())
        start = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(start)
        if f.read(4) == b"PK\x03\x04":
            raise ValueError(
                "this is a zip archive (as torch.save writes), not a pickle of an official EDM2 network (.pkl)"
            )
        f.seek(start)
        check_pickle_stream(f, end, "could not read the network pickle")
        return _Finalizer()(_OfficialUnpickler(f).load())
    except RecursionError as err:
        message = f"the pickle nests its data too deeply to read ({err}); refusing it"
        raise _named(UnsafePickleError(message), source) from None
    except MemoryError as err:
        message = f"reading the pickle ran out of memory ({type(err).__name__}: {err}); refusing it"
        raise _named(UnsafePickleError(message), source) from None
    except ValueError as err:  # UnsafePickleError included
        if source is None:
            raise
        raise _named(err, source) from err
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError, OverflowError) as err:
        raise _named(ValueError(f"could not read the network pickle: {type(err).__name__}: {err}"), source) from err


def load_official_pickle(path_or_file: str | os.PathLike | BinaryIO) -> Any:
    """Load an official EDM2 network pickle into inert data, without executing anything stored in it.

    Persistent objects become :class:`ObjectRecord` (class name, constructor kwargs, tensors, sub-records, the
    embedded source as text); tensors are rebuilt on the CPU from their raw bytes.

    Args:
        path_or_file (`str`, `os.PathLike` or binary file object): the ``.pkl`` file.

    Returns:
        The unpickled top-level object; for official checkpoints a `dict` with ``ema`` (the network record) and,
        for training snapshots, ``encoder``, ``loss_fn`` and ``dataset_kwargs``.

    Raises:
        UnsafePickleError: the pickle references a global outside the small allowed set, or declares more memory or
            nesting than its data can hold (the message says which).
        FileNotFoundError: the path does not exist.
        ValueError: the pickle is malformed or not in the expected format.

    Errors about a path or a named file object start with its name.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        if not os.path.isfile(path):
            detail = " (it is a folder)" if os.path.isdir(path) else ""
            raise FileNotFoundError(f"network pickle not found: {path}{detail}")
        with open(path, "rb") as f:
            return _load(f, path)
    name = getattr(path_or_file, "name", None)
    return _load(path_or_file, name if isinstance(name, str) else None)
