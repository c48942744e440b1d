"""Honest resumes: a resume from an earlier checkpoint starts a new branch, and each resume records what changed.

A run that reached step 30 and is resumed from ``checkpoint-20`` would otherwise continue beside its abandoned
trajectory: the old ``checkpoint-30`` would stay the ``latest``, pruning would remove the branch point, and
reconstruction would mix snapshots of both. So a resume from a checkpoint that has complete checkpoints (or the export)
after it is refused, naming them, unless ``training.rewind`` (``--rewind``) is set; then everything after it
(checkpoints, snapshots, sample grids, the export) is moved into ``output_dir/abandoned-<time>/`` (nothing is deleted)
and a new branch starts in ``run.json`` (:mod:`edm2_diffusers.runs`), whose id the snapshots carry.

Snapshots after the newest checkpoint, with nothing else after it, are the tail of an interrupted run: the resumed run
writes them again, bit for bit, so they need no flag.

Every resume is recorded in ``run.json`` with its step and the settings that differ from ``config.yaml``, which is then
rewritten with the new values; the export carries them (:func:`edm2_diffusers.runs.run_history`).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Callable

from ..ema.snapshots import SNAPSHOT_NAME_RE, SNAPSHOT_SUBDIR
from ..files import fsync_dir
from ..runs import (
    SAMPLES_SUBDIR,
    config_overrides,
    lineage_of,
    new_run_record,
    pipeline_dir,
    read_run_config,
    read_run_record,
    record_resume,
    record_rewind,
    write_run_config,
    write_run_record,
)
from . import checkpoint as ckpt
from .finish import export_step

logger = logging.getLogger(__name__)

ABANDONED_PREFIX = "abandoned-"
_SAMPLE_RE = re.compile(r"step-(\d+)\.png")


def after_checkpoint(output_dir: str, step: int) -> dict[str, list[str]]:
    """What lies in ``output_dir`` after optimizer step ``step``: checkpoints, snapshots, sample grids, the export."""
    found = {"checkpoints": [p for s, p in ckpt.list_checkpoints(output_dir) if s > step]}
    for key, sub, pattern in (
        ("snapshots", SNAPSHOT_SUBDIR, SNAPSHOT_NAME_RE),
        ("samples", SAMPLES_SUBDIR, _SAMPLE_RE),
    ):
        folder = os.path.join(output_dir, sub)
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        found[key] = [os.path.join(folder, n) for n in names if (m := pattern.fullmatch(n)) and int(m.group(1)) > step]
    export = pipeline_dir(output_dir)
    exported = export_step(export)
    found["export"] = [export] if exported is not None and exported > step else []
    return found


def _describe(output_dir: str, after: dict) -> str:
    parts = [os.path.relpath(p, output_dir) for p in after["checkpoints"]]
    if after["snapshots"]:
        parts.append(f"{len(after['snapshots'])} EMA snapshots ({os.path.basename(after['snapshots'][0])}, ...)")
    if after["samples"]:
        parts.append(f"{len(after['samples'])} sample grids")
    if after["export"]:
        parts.append(
            f"the export {os.path.relpath(after['export'][0], output_dir)}/ of step {export_step(after['export'][0])}"
        )
    return ", ".join(parts)


def plan_rewind(cfg: dict, resume_dir: str | None) -> list[str]:
    """Before anything is written: what a resume from ``resume_dir`` moves aside (an empty list: nothing).

    Raises:
        ValueError: the checkpoint has complete checkpoints or the export after it and ``training.rewind`` is not
            set (the message names them), or ``training.rewind`` is set without a checkpoint to resume from.
    """
    train_cfg = cfg["training"]
    rewind, output_dir = train_cfg.get("rewind", False), train_cfg["output_dir"]
    if rewind and not train_cfg["resume_from_checkpoint"]:
        raise ValueError("--rewind needs --resume_from_checkpoint: the checkpoint to rewind the run to")
    if resume_dir is None:
        return []
    step = int(ckpt.read_state(resume_dir)["step"])
    after = after_checkpoint(output_dir, step)
    branched = [p for p in after["checkpoints"] if not ckpt.missing_files(p)] or after["export"]
    if branched and not rewind:
        raise ValueError(
            f"{resume_dir} is at step {step}, but the run went further: {_describe(output_dir, after)}. Resuming "
            "from it abandons that trajectory; pass --rewind (training.rewind: true) to move what lies after it into "
            f"{os.path.join(output_dir, ABANDONED_PREFIX)}<time>/ (nothing is deleted), or resume from "
            "--resume_from_checkpoint latest"
        )
    return [p for paths in after.values() for p in paths] if rewind else []


def move_aside(output_dir: str, paths: list[str]) -> tuple[str, list[str]]:
    """Move ``paths`` into a new ``output_dir/abandoned-<time>/`` (nothing is deleted); (its name, what moved)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name, n = f"{ABANDONED_PREFIX}{stamp}", 1
    while os.path.exists(os.path.join(output_dir, name)):
        n += 1
        name = f"{ABANDONED_PREFIX}{stamp}-{n}"
    moved = []
    for path in paths:
        rel = os.path.relpath(path, output_dir)
        dest = os.path.join(output_dir, name, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(path, dest)
        moved.append(rel)
    fsync_dir(output_dir)
    return name, moved


def open_run(cfg: dict, resume_dir: str | None, rewind: list[str], ema, max_steps: int) -> Callable[[], None] | None:
    """On the main process, with the run folder locked: start or update ``run.json`` and ``config.yaml``, move an
    abandoned branch aside, and tag the EMA's snapshots with the run and branch.

    A new run and a rewind write their record at once. A plain resume of an identified run records itself (and
    rewrites ``config.yaml`` with the settings it changed) only with the first checkpoint it saves, so a resume that
    fails before (a non-finite loss, a crash) leaves the run folder as it was: call the returned function then
    (``None``: nothing left to write). A resume with nothing left to do (at ``max_steps`` already) writes nothing.
    """
    output_dir = cfg["training"]["output_dir"]
    record = read_run_record(output_dir)
    config_path, stored = read_run_config(output_dir)
    untagged = record is None and config_path is not None  # a run started before runs had an identity
    step = int(ckpt.read_state(resume_dir)["step"]) if resume_dir is not None else 0
    if resume_dir is not None and step >= max_steps and not rewind:
        if record is not None and ema is not None and record.get("tag_snapshots", True):
            ema.tag_snapshots(record["run_id"], lineage_of(record))
        return None
    deferred = record is not None and resume_dir is not None and not rewind
    if record is None:
        record = new_run_record()
        if untagged:
            record["tag_snapshots"] = False  # its earlier snapshots name no run: tagging later ones would split it
    overrides = {}
    if resume_dir is not None:
        if rewind:
            name, moved = move_aside(output_dir, rewind)
            branch = record_rewind(record, step, name, moved)
            logger.warning(
                "rewound to step %d: moved %d entries into %s; new branch %s", step, len(moved), name, branch
            )
        overrides = config_overrides(stored, cfg) if config_path is not None else {}
        inside = os.path.dirname(os.path.abspath(resume_dir)) == os.path.abspath(output_dir)
        record_resume(record, step, os.path.basename(resume_dir) if inside else os.path.abspath(resume_dir), overrides)
        for key, change in overrides.items():
            logger.info("resumed at step %d with %s = %r (was %r)", step, key, change["to"], change["from"])

    def write() -> None:
        if config_path is None or overrides:
            write_run_config(output_dir, cfg)
        write_run_record(output_dir, record)

    if untagged:
        logger.warning(
            "%s was started by an earlier version and has no run identity; its snapshots stay untagged", output_dir
        )
    elif ema is not None and record.get("tag_snapshots", True):
        ema.tag_snapshots(record["run_id"], lineage_of(record))
    if deferred:
        return write
    write()
    return None


__all__ = ["ABANDONED_PREFIX", "after_checkpoint", "move_aside", "open_run", "plan_rewind"]
