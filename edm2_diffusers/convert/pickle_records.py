"""Inert records of the objects in an official EDM2 network pickle.

:func:`edm2_diffusers.convert.load_official_pickle` turns each persistent object (``Precond``, ``UNet``, ``Block``, …)
and each torch ``ModuleDict`` of the pickle into an :class:`ObjectRecord`: plain data (class name, constructor
arguments, tensors, sub-records, the embedded source as text) with nothing executable in it. This module holds only
that data model; it imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ObjectRecord", "record_from_state"]


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


def record_from_state(class_name: str, state, module_src=None, version=None) -> ObjectRecord:
    """An :class:`ObjectRecord` from a pickled module's ``__dict__`` (its values already inert), checked for shape."""
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
