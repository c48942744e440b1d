"""Load an exported pipeline with this package's classes, without executing the code stored in the export.

This is what ``EDM2Pipeline.from_pretrained`` runs when the package is installed (see
:mod:`edm2_diffusers.hub.pipeline_io`) and what :func:`load_pipeline` exposes: ``model_index.json`` is read, each
component is built with the installed class its ``[module, class]`` entry names (the custom-code stems of
:data:`~edm2_diffusers.hub.remote_code.CUSTOM_CODE`, or a diffusers class) from its config and safetensors weights.
``variant=`` loads the components that have that weight variant (``unet/diffusion_pytorch_model.<variant>
.safetensors``) with it and the others with their only weights, as diffusers does; from the Hub only the variant's
weights file is downloaded.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

import diffusers
import huggingface_hub
from huggingface_hub.errors import EntryNotFoundError

from ..pipelines import EDM2Pipeline
from .layout import variants_in, weights_name
from .remote_code import CUSTOM_CODE

# Keyword arguments passed on to every component's ``from_pretrained``.
COMPONENT_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
# Accepted for compatibility with DiffusionPipeline.from_pretrained and not needed here (no code is run).
IGNORED_KWARGS = ("trust_remote_code", "use_safetensors", "custom_pipeline")


def _join(*parts: str | None) -> str | None:
    parts = [p.strip("/") for p in parts if p and p.strip("/") not in ("", ".")]
    return "/".join(parts) or None


def _read_model_index(path: str, subfolder: str | None, **hub_kwargs) -> dict:
    where = f"{path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    hint = " EMA stds are weight variants of one pipeline: pass variant=..., not subfolder=." if subfolder else ""
    if os.path.isdir(path):
        file = Path(path, subfolder or "", "model_index.json")
        if not file.is_file():
            raise FileNotFoundError(f"{where} is not a pipeline folder: model_index.json is missing.{hint}")
    else:
        try:
            file = huggingface_hub.hf_hub_download(path, "model_index.json", subfolder=subfolder, **hub_kwargs)
        except (EntryNotFoundError, FileNotFoundError) as err:
            raise FileNotFoundError(f"{where} holds no model_index.json.{hint}") from err
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); export or download the pipeline again") from None


def _files(path: str, subfolder: str | None, **hub_kwargs) -> list[str]:
    """The pipeline's files, relative to its folder (listed from the Hub for a repository)."""
    if os.path.isdir(path):
        root = Path(path, subfolder or "")
        return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    info = huggingface_hub.model_info(path, revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"))
    prefix = f"{subfolder}/" if subfolder else ""
    return [s.rfilename[len(prefix) :] for s in info.siblings if s.rfilename.startswith(prefix)]


def _component_class(key: str, library: str, class_name: str, where: str):
    by_class = {spec.class_name: spec for spec in CUSTOM_CODE.values()}
    if class_name in by_class:
        spec = by_class[class_name]
        return getattr(importlib.import_module(spec.module), spec.class_name)
    if library == "diffusers" and hasattr(diffusers, class_name):
        return getattr(diffusers, class_name)
    raise ValueError(f"component {key} of {where} is a {library}.{class_name}; load_pipeline cannot build it")


def _dtype(torch_dtype, dtype):
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree; pass one of them")
    return torch_dtype if torch_dtype is not None else dtype


def load_pipeline(
    pretrained_model_name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    torch_dtype=None,
    *,
    variant: str | None = None,
    dtype=None,
    pipeline_class: type = EDM2Pipeline,
    **kwargs,
):
    """Build the package's ``EDM2Pipeline`` from an export (local folder or Hub repository) without remote code.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`): a local export folder or a Hub repository id.
        subfolder (`str`, *optional*): a folder of the repository that holds the pipeline (its ``model_index.json``);
            an error when there is none there. EMA stds are ``variant``s, not subfolders.
        torch_dtype (`torch.dtype`, *optional*): dtype of the networks (``dtype`` is the same).
        variant (`str`, *optional*): the weight variant, e.g. ``"ema0100"`` (default: the default weights).
        pipeline_class (`type`): the class to build (``EDM2Pipeline`` or a subclass).
        **kwargs: components to use as they are (e.g. ``vae=...``), and ``revision``, ``token``, ``cache_dir``,
            ``local_files_only``, ``force_download``, ``proxies`` for the downloads.

    Returns:
        `EDM2Pipeline`.
    """
    path = str(pretrained_model_name_or_path)
    subfolder = _join(subfolder)
    torch_dtype = _dtype(torch_dtype, dtype)
    init_params = inspect.signature(pipeline_class.__init__).parameters
    given = {k: kwargs.pop(k) for k in list(kwargs) if k in init_params}
    hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in COMPONENT_KWARGS}
    unknown = sorted(set(kwargs) - set(IGNORED_KWARGS))
    if unknown:
        raise TypeError(f"load_pipeline got unexpected argument(s): {', '.join(unknown)}")
    index = _read_model_index(path, subfolder, **{k: v for k, v in hub_kwargs.items() if k != "proxies"})
    pipeline_cls = index.get("_class_name")
    name = pipeline_cls[1] if isinstance(pipeline_cls, list) else pipeline_cls
    if name != EDM2Pipeline.__name__:
        raise ValueError(f"{path} holds a {name}, not an {EDM2Pipeline.__name__}")
    with_variant = set()
    if variant is not None:
        files = _files(path, subfolder, **hub_kwargs)
        with_variant = {f.split("/")[0] for f in files if f.endswith("/" + weights_name(variant))}
        if not with_variant:
            have = ", ".join(variants_in(files)) or "none"
            raise ValueError(f"{path} has no weight variant {variant!r} (its variants: {have})")

    components, options = {}, {}
    for key, entry in index.items():
        if key.startswith("_") or key not in init_params:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and (entry[0] is None or isinstance(entry[0], str))):
            options[key] = entry
            continue
        if key in given or entry[0] is None:
            continue
        cls = _component_class(key, *entry, where=path)
        load_kwargs = dict(hub_kwargs)
        if issubclass(cls, diffusers.ModelMixin):
            load_kwargs.update(use_safetensors=True, variant=variant if key in with_variant else None)
            if torch_dtype is not None:
                load_kwargs["torch_dtype"] = torch_dtype
        components[key] = cls.from_pretrained(path, subfolder=_join(subfolder, key), **load_kwargs)
    pipe = pipeline_class(**components, **given, **options)
    pipe.register_to_config(_name_or_path=path)
    return pipe


__all__ = ["load_pipeline"]
