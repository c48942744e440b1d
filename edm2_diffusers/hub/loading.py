"""Load an exported pipeline with this package's classes, without executing the code stored in the export."""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

import diffusers
import huggingface_hub

from ..pipelines import EDM2Pipeline
from .remote_code import CUSTOM_CODE


def _join(*parts: str | None) -> str | None:
    parts = [p.strip("/") for p in parts if p and p.strip("/") not in ("", ".")]
    return "/".join(parts) or None


def _read_model_index(path: str, subfolder: str | None, **hub_kwargs) -> dict:
    if os.path.isdir(path):
        file = Path(path, subfolder or "", "model_index.json")
        if not file.is_file():
            raise FileNotFoundError(f"{file.parent} is not a pipeline folder: model_index.json is missing")
    else:
        file = huggingface_hub.hf_hub_download(path, "model_index.json", subfolder=subfolder, **hub_kwargs)
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); export or download the pipeline again") from None


def load_pipeline(
    pretrained_model_name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    torch_dtype=None,
    **kwargs,
):
    """Build the package's ``EDM2Pipeline`` from an export (local folder or Hub repository) without remote code.

    ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` runs the code files stored in the export;
    this function reads only configs and safetensors weights and uses the installed classes. Unlike
    ``DiffusionPipeline.from_pretrained``, it can load a variant in a subfolder of a Hub repository directly.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`): a local export folder or a Hub repository id.
        subfolder (`str`, *optional*): the variant's folder, e.g. ``"ema-0.100"`` (default: the root variant).
        torch_dtype (`torch.dtype`, *optional*): dtype of the networks.
        **kwargs: passed to each component's ``from_pretrained`` (``revision``, ``token``, ``cache_dir``,
            ``local_files_only``, ...).

    Returns:
        `EDM2Pipeline`.
    """
    path = str(pretrained_model_name_or_path)
    subfolder = _join(subfolder)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    index = _read_model_index(path, subfolder, **hub_kwargs)
    pipeline_class = index.get("_class_name")
    name = pipeline_class[1] if isinstance(pipeline_class, list) else pipeline_class
    if name != EDM2Pipeline.__name__:
        raise ValueError(f"{path} holds a {name}, not an {EDM2Pipeline.__name__}")

    by_class = {spec.class_name: spec for spec in CUSTOM_CODE.values()}
    init_params = inspect.signature(EDM2Pipeline.__init__).parameters
    components, options = {}, {}
    for key, entry in index.items():
        if key.startswith("_") or key not in init_params:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and (entry[0] is None or isinstance(entry[0], str))):
            options[key] = entry
            continue
        library, class_name = entry
        if library is None:
            continue
        if class_name in by_class:
            spec = by_class[class_name]
            cls = getattr(importlib.import_module(spec.module), spec.class_name)
        elif library == "diffusers" and hasattr(diffusers, class_name):
            cls = getattr(diffusers, class_name)
        else:
            raise ValueError(f"component {key} of {path} is a {library}.{class_name}; load_pipeline cannot build it")
        load_kwargs = dict(kwargs)
        if issubclass(cls, diffusers.ModelMixin):
            load_kwargs.setdefault("use_safetensors", True)
            if torch_dtype is not None:
                load_kwargs["torch_dtype"] = torch_dtype
        components[key] = cls.from_pretrained(path, subfolder=_join(subfolder, key), **load_kwargs)
    return EDM2Pipeline(**components, **options)


__all__ = ["load_pipeline"]
