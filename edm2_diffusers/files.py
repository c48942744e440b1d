"""Writing files and folders so that a crash never leaves a truncated file or half a folder under the real name.

Every writer of the package goes through these helpers:

* :func:`atomic_path` yields a hidden temporary path next to the target (``.NAME.tmp-<pid>-<random>``); when the block
  ends normally the file replaces the target in one ``os.replace``, otherwise it is removed.
* :func:`staged_folder` does the same for a whole folder (``.NAME.partial-<random>``); an earlier folder at the target
  is replaced only once the new one is complete, and put back if the swap fails.

Files are created with ``open`` (so they follow the process umask, as ``save_pretrained``'s are).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"
PARTIAL_MARK = ".partial-"


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk where the platform allows it."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path next to ``path`` that replaces ``path`` when the ``with`` block succeeds.

    Args:
        path (`str` or `os.PathLike`): the file to write; its folder is created.
        suffix (`str`): appended to the temporary name, for writers that infer the format from it (``".npz"``).
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to disk; return the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return os.fspath(path)


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2, sort_keys: bool = False) -> str:
    """Write ``obj`` as strict JSON (no NaN or infinity) to ``path`` atomically, with a final newline."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def staging_path(target: str | os.PathLike) -> Path:
    """A fresh hidden folder name next to ``target`` for assembling its new content."""
    target = Path(target)
    return target.with_name(f".{target.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}")


def commit_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a finished folder into place; an earlier non-empty ``target`` is replaced only after the move succeeds.

    If the swap fails the earlier folder is put back and the error raised.
    """
    staging, target = Path(staging), Path(target)
    if target.exists() and any(target.iterdir()):
        old = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except OSError:
            os.replace(old, target)
            raise
        shutil.rmtree(old)
    else:
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new hidden folder next to ``target``, moved into place by :func:`commit_folder` when the block succeeds.

    On any error (or interruption) the staging folder is removed and ``target`` is left as it was.
    """
    staging = staging_path(target)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        yield staging
        commit_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = [
    "PARTIAL_MARK",
    "TMP_MARK",
    "atomic_path",
    "commit_folder",
    "fsync_dir",
    "staged_folder",
    "staging_path",
    "write_json_atomic",
    "write_text_atomic",
]
