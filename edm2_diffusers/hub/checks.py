"""What an export may hold, and where it may be written: checked before anything is moved into place."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .model_card import EXPORT_INFO_NAME

# What may be in an export. Anything else is refused, in particular pickle-based weights.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".py", ".md", ".png")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


def check_export(export_dir: str | os.PathLike) -> list[Path]:
    """Check that an export holds only safetensors weights (no pickle-based files) and complete pipelines.

    Args:
        export_dir (`str` or `os.PathLike`): the export's root folder.

    Returns:
        `list[Path]`: the pipeline folders (those with a ``model_index.json``), root first.

    Raises:
        `ValueError`: naming the first offending file.
    """
    export_dir = Path(export_dir)
    if not (export_dir / "model_index.json").is_file():
        raise ValueError(f"{export_dir} is not a pipeline export: model_index.json is missing")
    for path in sorted(export_dir.rglob("*")):
        if path.is_symlink():
            raise ValueError(f"{path}: an export must not contain symbolic links")
        if path.is_dir():
            continue
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{path}: exports hold safetensors weights only, never pickle-based files ({suffix})")
        if suffix not in ALLOWED_SUFFIXES:
            raise ValueError(f"{path}: unexpected file in an export (allowed: {', '.join(ALLOWED_SUFFIXES)})")
    pipelines = sorted((p.parent for p in export_dir.rglob("model_index.json")), key=lambda p: (p != export_dir, p))
    for folder in pipelines:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        for name, entry in index.items():
            # Components are [library, class] pairs; other lists (e.g. latent_mean) are pipeline settings.
            is_component = isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
            if name.startswith("_") or not is_component:
                continue
            component = folder / name
            if not component.is_dir():
                raise ValueError(f"{folder}: component folder {name}/ named in model_index.json is missing")
            if (component / "config.json").is_file() and not list(component.glob("*.safetensors")):
                raise ValueError(f"{component}: model component without safetensors weights")
    return pipelines


def check_output_dir(output_dir: Path, run_dir: Path, overwrite: bool) -> None:
    out, run = output_dir.resolve(), run_dir.resolve()
    if out == run or out in run.parents:
        raise ValueError(f"output_dir {output_dir} would contain the run folder {run_dir}; choose another folder")
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} exists and is not a folder")
    if not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"output folder {output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace an "
            "earlier export there, or choose another folder. Nothing was written."
        )
    if not ((output_dir / EXPORT_INFO_NAME).is_file() or (output_dir / "model_index.json").is_file()):
        raise ValueError(
            f"refusing to overwrite {output_dir}: it is not a pipeline export (no {EXPORT_INFO_NAME} or "
            "model_index.json), so replacing it could destroy unrelated files. Choose another folder."
        )


__all__ = ["ALLOWED_SUFFIXES", "PICKLE_SUFFIXES", "check_export", "check_output_dir"]
