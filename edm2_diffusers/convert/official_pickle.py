"""Read NVIDIA's published EDM2 network pickles without running any code stored in them.

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

:func:`extract_official_network` then reads the ``ema`` record (a ``Precond`` holding a ``UNet``): its constructor
kwargs and a flat state dict keyed exactly like ``Precond.state_dict()``, ready for
:func:`edm2_diffusers.convert.from_official`.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "UnsafePickleError",
    "ObjectRecord",
    "OfficialNetwork",
    "load_official_pickle",
    "extract_official_network",
    "load_official_network",
    "official_latent_encoder",
    "official_pickle_to_unet",
    "ConvertedOfficialPipeline",
    "convert_official_pipeline",
    "save_converted_pipeline",
]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for something this loader does not rebuild (usually a global that could run code)."""


# ---------------------------------------------------------------------------------------------------------------------
# Inert records of the pickled objects.


@dataclass
class ObjectRecord:
    """What a pickled persistent object (or a torch ``ModuleDict``) held, as plain data; nothing of it is executable.

    Args:
        class_name (`str`): the class name the pickle names, e.g. ``"Precond"``, ``"UNet"``, ``"ModuleDict"``.
        module_src (`str`, *optional*): the Python source embedded in the pickle, kept as text and never executed.
        version (`int`, *optional*): the persistence format version written by the saver.
        init_args (`tuple`), init_kwargs (`dict`, *optional*): the constructor arguments the saver recorded
            (``init_kwargs`` is ``None`` when it recorded none).
        attributes (`dict`): the object's other plain attributes (e.g. ``img_resolution``, ``num_heads``).
        parameters (`dict`), buffers (`dict`): the module's own tensors (``None`` entries kept as ``None``).
        non_persistent_buffers (`frozenset`): buffer names that ``state_dict()`` leaves out.
        modules (`dict`): sub-module records (or ``None``) by attribute name.
    """

    class_name: str
    module_src: str | None = None
    version: int | None = None
    init_args: tuple = ()
    init_kwargs: dict | None = None
    attributes: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)
    non_persistent_buffers: frozenset = frozenset()
    modules: dict = field(default_factory=dict)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flatten the tensors like ``torch.nn.Module.state_dict()``: own parameters, persistent buffers, then
        sub-modules, with dotted keys."""
        out: dict[str, torch.Tensor] = {}
        for name, value in self.parameters.items():
            if value is not None:
                out[prefix + name] = value
        for name, value in self.buffers.items():
            if value is not None and name not in self.non_persistent_buffers:
                out[prefix + name] = value
        for name, sub in self.modules.items():
            if sub is not None:
                out.update(sub.state_dict(prefix=f"{prefix}{name}."))
        return out

    def records(self, prefix: str = ""):
        """Yield ``(dotted_path, record)`` for this record and every sub-module record, depth first."""
        yield prefix, self
        for name, sub in self.modules.items():
            if sub is not None:
                yield from sub.records(f"{prefix}.{name}" if prefix else name)

    def __repr__(self) -> str:
        return (
            f"ObjectRecord({self.class_name!r}, init_kwargs={self.init_kwargs!r}, "
            f"{len(self.parameters)} parameters, {len(self.buffers)} buffers, modules={list(self.modules)})"
        )


# Bookkeeping of torch.nn.Module that carries no network information.
_MODULE_INTERNALS = frozenset(
    {
        "training",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    }
)


def _tensor_table(value, what: str, owner: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"malformed pickle: {owner}.{what} is a {type(value).__name__}, not a dict")
    for name, tensor in value.items():
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise ValueError(f"malformed pickle: {owner}.{what}[{name!r}] is a {type(tensor).__name__}, not a tensor")
    return dict(value)


def _record_from_state(class_name: str, state, module_src=None, version=None) -> ObjectRecord:
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise ValueError(f"malformed pickle: the state of {class_name} is a {type(state).__name__}, not a dict")
    state = dict(state)
    modules = state.pop("_modules", None) or {}
    if not isinstance(modules, dict) or any(
        m is not None and not isinstance(m, ObjectRecord) for m in modules.values()
    ):
        raise ValueError(f"malformed pickle: {class_name}._modules must map names to module records")
    init_args = state.pop("_init_args", None)
    init_kwargs = state.pop("_init_kwargs", None)
    if init_kwargs is not None and not isinstance(init_kwargs, dict):
        raise ValueError(f"malformed pickle: {class_name}._init_kwargs is not a dict")
    non_persistent = state.pop("_non_persistent_buffers_set", None) or ()
    return ObjectRecord(
        class_name=class_name,
        module_src=module_src,
        version=version,
        init_args=tuple(init_args) if init_args is not None else (),
        init_kwargs=dict(init_kwargs) if init_kwargs is not None else None,
        parameters=_tensor_table(state.pop("_parameters", None), "_parameters", class_name),
        buffers=_tensor_table(state.pop("_buffers", None), "_buffers", class_name),
        non_persistent_buffers=frozenset(non_persistent),
        modules=dict(modules),
        attributes={k: v for k, v in state.items() if k not in _MODULE_INTERNALS},
    )


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
        import numpy as np

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
        import numpy as np

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
    f = io.BytesIO(data)
    try:
        magic = _DataOnlyUnpickler(f).load()
        protocol = _DataOnlyUnpickler(f).load()
        sys_info = _DataOnlyUnpickler(f).load()
    except UnsafePickleError:
        raise
    except Exception as err:
        raise ValueError(f"a tensor storage is not in torch's legacy serialization format: {err}") from err
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise ValueError("a tensor storage is not in torch's legacy serialization format")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ValueError("only little-endian tensor storages are supported")
    found: dict = {}
    root = _StorageUnpickler(f, found).load()
    keys = _DataOnlyUnpickler(f).load()
    if not isinstance(keys, list) or set(keys) != set(found):
        raise ValueError("malformed tensor storage: the storage key list does not match its records")
    storages = {}
    for key in keys:
        dtype, numel = found[key]
        stored_numel = int.from_bytes(f.read(8), "little", signed=True)
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = f.read(stored_numel * itemsize)
        if stored_numel != numel or len(raw) != numel * itemsize:
            raise ValueError("malformed tensor storage: truncated or inconsistent data")
        storages[key] = torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
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
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise ValueError(f"malformed pickle: tensor geometry size={size} stride={stride} offset={offset}")
    flat = storage.data
    if 0 in size:
        return torch.empty(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.numel():
        raise ValueError(f"malformed pickle: tensor of size {size} reaches past its storage of {flat.numel()}")
    return flat.as_strided(size, stride, offset)


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


def _finalize(obj, memo: dict):
    """Replace every stand-in by its plain value: records, numpy arrays, dicts, lists, tuples."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, _PersistentStub):
        meta = obj.validated_meta()
        out = _record_from_state(
            meta["class_name"],
            _finalize(meta.get("state"), memo),
            module_src=meta.get("module_src"),
            version=meta.get("version"),
        )
    elif isinstance(obj, _ModuleDictStub):
        out = _record_from_state("ModuleDict", _finalize(getattr(obj, "state", None), memo))
    elif isinstance(obj, _NDArrayStub):
        out = obj.to_numpy()
    elif isinstance(obj, (_DTypeStub, _Storage, _StorageType)) or obj is _NDARRAY:
        raise ValueError(f"malformed pickle: a bare {type(obj).__name__} outside a tensor or array")
    elif isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        memo[key] = out
        for k, v in obj.items():
            out[_finalize(k, memo)] = _finalize(v, memo)
        return out
    elif isinstance(obj, list):
        out = []
        memo[key] = out
        out.extend(_finalize(v, memo) for v in obj)
        return out
    elif isinstance(obj, tuple):
        out = tuple(_finalize(v, memo) for v in obj)
    elif isinstance(obj, (set, frozenset)):
        out = type(obj)(_finalize(v, memo) for v in obj)
    else:
        out = obj
    memo[key] = out
    return out


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
        UnsafePickleError: the pickle references a global outside the small allowed set (the message names it).
        FileNotFoundError: the path does not exist.
        ValueError: the pickle is malformed or not in the expected format.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"network pickle not found: {path}")
        with open(path, "rb") as f:
            return load_official_pickle(f)
    try:
        raw = _OfficialUnpickler(path_or_file).load()
    except (UnsafePickleError, ValueError):
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"could not read the network pickle: {type(err).__name__}: {err}") from err
    return _finalize(raw, {})


# ---------------------------------------------------------------------------------------------------------------------
# The network inside: constructor kwargs and state dict of the official Precond.

# Constructor parameters of the official Precond in positional order (for pickles that recorded init_args).
_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")
_PRECOND_ATTRIBUTES = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data")
_UNET_ATTRIBUTES = ("label_balance", "concat_balance")
_BLOCK_ATTRIBUTES = ("dropout", "res_balance", "attn_balance", "clip_act", "resample_filter")


@dataclass
class OfficialNetwork:
    """An official EDM2 network read from a pickle.

    Args:
        config (`dict`): the official constructor kwargs (``img_resolution``, ``img_channels``, ``label_dim``,
            ``model_channels``, …), as :func:`edm2_diffusers.convert.from_official` takes them.
        state_dict (`dict`): tensors keyed like the official ``Precond.state_dict()`` (``unet.enc.64x64_conv.weight``,
            ``logvar_linear.weight``, …), in the pickle's dtype.
        class_name (`str`): the pickled class name (``"Precond"``).
    """

    config: dict
    state_dict: dict
    class_name: str


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def extract_official_network(data, key: str = "ema") -> OfficialNetwork:
    """Constructor kwargs and state dict of the official ``Precond`` network in loaded pickle data.

    The kwargs are those the saver recorded for ``Precond`` (which pass on to ``UNet`` and its blocks), completed with
    the values the network stored as attributes (resolution, channels, label dimension, balances, dropout, …) and the
    ``logvar_channels`` its tensors show; a recorded kwarg that contradicts the stored network is an error.

    Args:
        data: what :func:`load_official_pickle` returned (a dict holding ``key``) or the network record itself.
        key (`str`): the entry holding the network; the official files keep the EMA network under ``"ema"``.
    """
    if isinstance(data, dict):
        if key not in data:
            raise ValueError(f"the pickle has no {key!r} entry (it has: {', '.join(map(str, data)) or 'nothing'})")
        net = data[key]
    else:
        net = data
    if not isinstance(net, ObjectRecord):
        raise ValueError(f"the {key!r} entry is a {type(net).__name__}, not a pickled network")
    if net.class_name != "Precond":
        raise ValueError(f"unsupported network class {net.class_name!r}: only EDM2's Precond (holding a UNet) is")
    unet = net.modules.get("unet")
    if not isinstance(unet, ObjectRecord) or unet.class_name != "UNet":
        raise ValueError("the Precond record has no 'unet' sub-module of class UNet")
    if net.init_kwargs is None:
        raise ValueError("the network pickle recorded no constructor arguments for Precond; cannot rebuild its config")
    if len(net.init_args) > len(_PRECOND_POSITIONAL):
        raise ValueError(f"Precond was built with {len(net.init_args)} positional arguments; expected at most 6")

    recorded = dict(zip(_PRECOND_POSITIONAL, net.init_args))
    recorded.update(net.init_kwargs)

    observed = {k: net.attributes[k] for k in _PRECOND_ATTRIBUTES if k in net.attributes}
    observed.update({k: unet.attributes[k] for k in _UNET_ATTRIBUTES if k in unet.attributes})
    blocks = [r for _, r in unet.records() if r.class_name == "Block"]
    if blocks:
        observed.update({k: blocks[0].attributes[k] for k in _BLOCK_ATTRIBUTES if k in blocks[0].attributes})
    fourier = net.modules.get("logvar_fourier")
    if isinstance(fourier, ObjectRecord) and isinstance(fourier.buffers.get("freqs"), torch.Tensor):
        observed["logvar_channels"] = int(fourier.buffers["freqs"].numel())

    clashes = [k for k in recorded.keys() & observed.keys() if not _same(recorded[k], observed[k])]
    if clashes:
        detail = ", ".join(f"{k}: recorded {recorded[k]!r} vs stored {observed[k]!r}" for k in sorted(clashes))
        raise ValueError(f"the pickled network contradicts its recorded constructor arguments ({detail})")
    config = {**observed, **recorded}
    return OfficialNetwork(config=config, state_dict=net.state_dict(), class_name=net.class_name)


def load_official_network(path_or_file, key: str = "ema") -> OfficialNetwork:
    """:func:`load_official_pickle` followed by :func:`extract_official_network`."""
    return extract_official_network(load_official_pickle(path_or_file), key=key)


def official_pickle_to_unet(path_or_file, key: str = "ema"):
    """Convert an official EDM2 network pickle into an :class:`~edm2_diffusers.EDM2UNet2DModel` (Config G)."""
    from .official import from_official

    network = load_official_network(path_or_file, key=key)
    return from_official(network.state_dict, network.config)


def official_latent_encoder(data) -> dict | None:
    """The latent standardization stored with a latent (ImageNet-512) official network, or ``None`` for pixels.

    The official ``StabilityVAEEncoder`` keeps ``final = raw · scale + bias`` per channel, with
    ``scale = final_std / raw_std`` and ``bias = final_mean − raw_mean · scale``. Any such affine map is the same map
    as raw mean ``−bias/scale``, raw std ``final_std/scale`` with ``final_mean = 0``; this returns it for
    ``final_std`` 0.5, EDM2's choice.

    Args:
        data: what :func:`load_official_pickle` returned.

    Returns:
        ``None`` when the pickle holds no encoder or a pixel-space one, else a dict with ``vae_name``,
        ``latents_mean``, ``latents_std`` (per channel, of the raw VAE latents) and ``final_std``.
    """
    enc = data.get("encoder") if isinstance(data, dict) else None
    if enc is None or (isinstance(enc, ObjectRecord) and enc.class_name == "StandardRGBEncoder"):
        return None
    if not isinstance(enc, ObjectRecord) or enc.class_name != "StabilityVAEEncoder":
        name = enc.class_name if isinstance(enc, ObjectRecord) else type(enc).__name__
        raise ValueError(f"unsupported encoder {name!r} in the network pickle")
    try:
        scale = [float(s) for s in enc.attributes["scale"].reshape(-1)]
        bias = [float(b) for b in enc.attributes["bias"].reshape(-1)]
    except (KeyError, AttributeError) as err:
        raise ValueError("the StabilityVAEEncoder record lacks its scale/bias constants") from err
    if len(scale) != len(bias) or any(s == 0 for s in scale):
        raise ValueError("the StabilityVAEEncoder record has inconsistent scale/bias constants")
    final_std = 0.5

    def tidy(v):  # the constants were stored in float32: keep float32's 7 significant digits
        return float(f"{v:.7g}")

    return {
        "vae_name": enc.attributes.get("vae_name"),
        "latents_mean": [tidy(-b / s) for s, b in zip(scale, bias)],
        "latents_std": [tidy(final_std / s) for s in scale],
        "final_std": final_std,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Whole pipelines from official pickles.

CONVERSION_INFO_NAME = "conversion.json"


@dataclass
class ConvertedOfficialPipeline:
    """An :class:`~edm2_diffusers.EDM2Pipeline` built from official pickles, with what is known about its sources.

    Args:
        pipeline (`EDM2Pipeline`): the pipeline (``guidance_unet`` set when a guiding network was given).
        info (`dict`): JSON-ready provenance: source files, official configs, ``guidance_scale``, latent settings.
    """

    pipeline: Any
    info: dict


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _source_name(path_or_file) -> str:
    if isinstance(path_or_file, (str, os.PathLike)):
        return os.path.basename(os.fspath(path_or_file))
    return getattr(path_or_file, "name", "<file object>")


def _cast(model, dtype):
    return model if model.dtype == dtype else model.to(dtype)


def convert_official_pipeline(
    pickle_path,
    guidance_pickle=None,
    guidance_scale: float | None = None,
    vae=None,
    vae_subfolder: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> ConvertedOfficialPipeline:
    """Build an :class:`~edm2_diffusers.EDM2Pipeline` from NVIDIA's EDM2 network pickle(s), safely.

    The networks are read with :func:`load_official_pickle` (nothing stored in the files runs) and converted with
    :func:`edm2_diffusers.convert.from_official`; the scheduler is :class:`~edm2_diffusers.EDMHeunScheduler` with
    EDM2's sampling defaults (σ ∈ [0.002, 80], ρ = 7, deterministic Heun). Latent (ImageNet-512) networks carry the
    per-channel latent standardization of their pickle's encoder in the pipeline config; their Stable Diffusion VAE
    is attached only when ``vae`` is given (it cannot be read from the pickle).

    Args:
        pickle_path (`str`, `os.PathLike` or binary file): the main network pickle (``edm2-img64-*.pkl``, …).
        guidance_pickle (*optional*): a second network pickle used as ``guidance_unet`` (the unconditional or smaller
            network of EDM2's guidance / autoguidance).
        guidance_scale (`float`, *optional*): the guidance weight w meant for this pair (recorded in ``info``; the
            pipeline takes it as a call argument). Required with ``guidance_pickle``, refused without it.
        vae (`str`, `os.PathLike` or `AutoencoderKL`, *optional*): the decoder of a latent network, as a model or as a
            local folder / Hub repository for ``AutoencoderKL.from_pretrained``.
        vae_subfolder (`str`, *optional*): subfolder of ``vae`` holding the autoencoder (e.g. ``"vae"``).
        torch_dtype (`torch.dtype`): dtype of the converted networks (the official files store float16).
    """
    from diffusers import AutoencoderKL

    from ..pipelines import EDM2Pipeline
    from ..schedulers import EDMHeunScheduler
    from .official import from_official

    if (guidance_pickle is None) != (guidance_scale is None):
        raise ValueError("give a guidance pickle and a guidance scale together (or neither)")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")

    def read(path):
        data = load_official_pickle(path)
        network = extract_official_network(data)
        return network, official_latent_encoder(data)

    main, latent = read(pickle_path)
    unet = _cast(from_official(main.state_dict, main.config), torch_dtype)
    info = {
        "source": _source_name(pickle_path),
        "official_config": _jsonable(main.config),
        "guidance_source": None,
        "guidance_official_config": None,
        "guidance_scale": guidance_scale,
        "latent": latent,
        "vae": None,
    }
    guidance_unet = None
    if guidance_pickle is not None:
        guide, guide_latent = read(guidance_pickle)
        if guide_latent != latent:
            raise ValueError(
                f"the guidance network's latent space {guide_latent} differs from the main network's {latent}"
            )
        guidance_unet = _cast(from_official(guide.state_dict, guide.config), torch_dtype)
        info.update(guidance_source=_source_name(guidance_pickle), guidance_official_config=_jsonable(guide.config))

    latent_kwargs = {}
    if latent is not None:
        latent_kwargs = dict(
            latent_mean=latent["latents_mean"], latent_std=latent["latents_std"], latent_final_std=latent["final_std"]
        )
    if vae is not None:
        if latent is None and unet.config.in_channels != 4:
            raise ValueError("a VAE was given, but the network works on pixels (its pickle has no latent encoder)")
        if not isinstance(vae, AutoencoderKL):
            info["vae"] = os.fspath(vae) if vae_subfolder is None else f"{os.fspath(vae)}/{vae_subfolder}"
            vae = AutoencoderKL.from_pretrained(os.fspath(vae), subfolder=vae_subfolder)
        else:
            info["vae"] = getattr(vae.config, "_name_or_path", None) or "AutoencoderKL"
        vae = _cast(vae, torch_dtype).eval()

    pipeline = EDM2Pipeline(
        unet=unet, scheduler=EDMHeunScheduler(), guidance_unet=guidance_unet, vae=vae, **latent_kwargs
    )
    return ConvertedOfficialPipeline(pipeline=pipeline, info=info)


def _conversion_readme(info: dict) -> str:
    lines = [
        "# EDM2 pipeline converted from an official network pickle",
        "",
        f"Converted by edm2-diffusers from `{info['source']}` without executing code from the pickle.",
        "",
        "```python",
        "from edm2_diffusers import EDM2Pipeline",
        "",
    ]
    latent, vae_name = info.get("latent"), (info.get("latent") or {}).get("vae_name")
    if latent is not None and info.get("vae") is None:
        lines += [
            "from diffusers import AutoencoderKL",
            "",
            f'pipe = EDM2Pipeline.from_pretrained(".", vae=AutoencoderKL.from_pretrained("{vae_name}"))',
        ]
    else:
        lines.append('pipe = EDM2Pipeline.from_pretrained(".")')
    scale = info.get("guidance_scale")
    call = f"guidance_scale={scale}, " if scale is not None else ""
    lines += [f"images = pipe(batch_size=4, {call}num_inference_steps=32).images", "```", ""]
    if scale is not None:
        lines.append(f"Guiding network: `{info['guidance_source']}`, guidance scale {scale}.")
    if latent is not None:
        lines.append(
            f"Latent model: decode with the Stable Diffusion VAE `{vae_name}`"
            + (f" (saved here from `{info['vae']}`)." if info.get("vae") else "; it is not stored in this folder.")
            + " The latent standardization (latent_mean, latent_std, latent_final_std) is in model_index.json."
        )
    lines.append("")
    lines.append(f"Provenance and the official constructor arguments: `{CONVERSION_INFO_NAME}`.")
    return "\n".join(lines) + "\n"


def save_converted_pipeline(converted: ConvertedOfficialPipeline, out_dir, overwrite: bool = False):
    """Write a converted pipeline with ``save_pretrained(safe_serialization=True)`` plus ``conversion.json`` and a
    short README.

    The folder is written next to ``out_dir`` first and moved into place when complete, so a failure leaves any earlier
    content untouched.

    Args:
        converted (`ConvertedOfficialPipeline`): from :func:`convert_official_pipeline`.
        out_dir (`str` or `os.PathLike`): the output folder.
        overwrite (`bool`): replace an earlier pipeline folder there; without it a non-empty ``out_dir`` is an error.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass --overwrite to replace it. Nothing was written."
            )
        if not (out / "model_index.json").is_file():
            raise ValueError(
                f"refusing to overwrite {out}: it holds no model_index.json, so it is not a pipeline folder"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        converted.pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / CONVERSION_INFO_NAME).write_text(json.dumps(converted.info, indent=2) + "\n")
        (staging / "README.md").write_text(_conversion_readme(converted.info))
        if out.exists():
            old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
