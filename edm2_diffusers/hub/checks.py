"""What an export may hold, and where it may be written: checked before anything is moved into place."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .layout import EXPORT_INFO_NAME, weights_name

# What may be in an export. Anything else is refused, in particular pickle-based weights.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".py", ".md", ".png")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


def check_export(export_dir: str | os.PathLike) -> list[Path]:
    """Check that an export holds only safetensors weights (no pickle-based files) and one complete pipeline.

    Args:
        export_dir (`str` or `os.PathLike`): the export's root folder.

    Returns:
        `list[Path]`: ``[export_dir]``, the one pipeline folder.

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
    nested = sorted(p.parent for p in export_dir.rglob("model_index.json") if p.parent != export_dir)
    if nested:
        raise ValueError(
            f"{nested[0]}: an export is one pipeline (EMA stds are weight variants), not nested pipelines"
        )
    index = json.loads((export_dir / "model_index.json").read_text(encoding="utf-8"))
    for name, entry in index.items():
        # Components are [library, class] pairs; other lists (e.g. latent_mean) are pipeline settings.
        is_component = isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
        if name.startswith("_") or not is_component:
            continue
        component = export_dir / name
        if not component.is_dir():
            raise ValueError(f"{export_dir}: component folder {name}/ named in model_index.json is missing")
        if (component / "config.json").is_file() and not (component / weights_name()).is_file():
            raise ValueError(f"{component}: model component without safetensors weights ({weights_name()})")
    info_path = export_dir / EXPORT_INFO_NAME
    variants = json.loads(info_path.read_text(encoding="utf-8")).get("variants", []) if info_path.is_file() else []
    for v in variants:
        if v.get("variant") and not (export_dir / "unet" / weights_name(v["variant"])).is_file():
            raise ValueError(
                f"{export_dir}: variant {v['variant']} is listed in {EXPORT_INFO_NAME} but has no weights"
            )
    return [export_dir]


def check_output_dir(output_dir: Path, run_dir: Path | None, overwrite: bool) -> None:
    """Before any work: ``output_dir`` is new, empty, or (with ``overwrite``) an earlier export, and does not hold
    the run folder ``run_dir`` (``None`` for exports that do not come from a run)."""
    if run_dir is not None:
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
