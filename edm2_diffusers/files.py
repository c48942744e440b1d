"""Writing files and folders so that a crash never leaves a truncated file or half a folder under the real name.

Every writer of the package goes through these helpers:

* :func:`atomic_path` yields a hidden temporary path next to the target (``.NAME.tmp-<pid>-<random>``); when the block
  ends normally the file replaces the target in one ``os.replace``, otherwise it is removed.
* :func:`staged_folder` does the same for a whole folder (``.NAME.partial-<pid>-<random>``); an earlier folder at the
  target is replaced only once the new one is complete, and put back if the swap fails.

Files follow the process umask (mode ``0o666 & ~umask``) as ``save_pretrained``'s users expect, also those the
safetensors writer creates with mode 0600 (:func:`follow_umask`). A full disk stops a writer with
:class:`DiskFullError`, one line naming the file, with the earlier file or folder left as it was. What a killed writer
leaves (a ``.tmp-<pid>`` file, a ``.partial-<pid>`` folder) is removed by :func:`remove_leftovers` once its process is
gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"
PARTIAL_MARK = ".partial-"
# ``.NAME.tmp-<pid>[-<random>][suffix]`` files and ``.NAME.partial-<pid>-<random>`` (or, before pids were named,
# ``.NAME.partial-<random>``) folders: group 1 is the target's name, group 2 the writer's pid when named.
_LEFTOVER_RE = re.compile(r"^\.(.+?)(?:\.tmp-(\d+)(?:-[0-9a-f]{8})?|\.partial-(?:(\d+)-)?[0-9a-f]{8})(?:\.\w+)?$")


class DiskFullError(OSError):
    """The disk filled up while writing a file; nothing already written was replaced (the message names the file)."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the device is full (``ENOSPC``, also as the safetensors writer reports it)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "os error 28" in text or "No space left on device" in text


def raise_if_disk_full(err: BaseException, path: str | os.PathLike) -> None:
    """Re-raise ``err`` as a one-line :class:`DiskFullError` naming ``path`` when it says the disk is full."""
    if isinstance(err, DiskFullError) or not is_disk_full(err):
        return
    raise DiskFullError(
        errno.ENOSPC,
        f"no space left on the device writing {os.fspath(path)}; nothing was replaced (the partial write was "
        "removed). Free some space and run the command again",
    ) from None


def process_umask() -> int:
    """The process's umask (read without changing it where ``/proc`` tells it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file (or every file under a folder) the mode ``open`` would have: ``0o666 & ~umask``.

    The safetensors writer creates its files with mode 0600, which makes a shared model folder unreadable to others.
    """
    umask = process_umask()
    paths = [os.fspath(path)]
    if os.path.isdir(path):
        paths = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    for file in paths:
        info = os.lstat(file)
        if stat.S_ISREG(info.st_mode):
            os.chmod(file, (0o666 | (info.st_mode & 0o111)) & ~umask)


def pid_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(folder: str | os.PathLike, target: str | None = None, locked: bool = False) -> list[str]:
    """Remove the temporary files and staging folders that killed writers left in ``folder``.

    A ``.NAME.tmp-<pid>…`` file or ``.NAME.partial-<pid>-…`` folder is removed when process ``pid`` no longer runs
    (never another live writer's, nor this process's). Staging folders that name no pid (written before they did) are
    removed only when the caller holds the folder's lock (``locked``), which tells that no other writer is live.

    Args:
        folder (`str` or `os.PathLike`): the folder to clean (nothing happens when it does not exist).
        target (`str`, *optional*): clean only the leftovers of this name in ``folder``.
        locked (`bool`): the caller holds the lock of ``folder``.

    Returns:
        `list[str]`: what was removed.
    """
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _LEFTOVER_RE.match(name)
        if match is None or (target is not None and match.group(1) != target):
            continue
        pid = match.group(2) or match.group(3)
        if pid is None and not (locked and PARTIAL_MARK in name):
            continue
        if pid is not None and (int(pid) == os.getpid() or pid_running(int(pid))):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(path)
    return removed


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
        try:
            yield tmp
            if os.path.isfile(tmp):
                follow_umask(tmp)
        except Exception as err:
            raise_if_disk_full(err, path)
            raise
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
    """A fresh hidden folder name next to ``target`` for assembling its new content (``.NAME.partial-<pid>-<random>``).

    Staging folders of ``target`` left by writers that no longer run are removed first (:func:`remove_leftovers`).
    """
    target = Path(target)
    remove_leftovers(target.parent, target=target.name)
    return target.with_name(f".{target.name}{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def commit_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a finished folder into place; an earlier non-empty ``target`` is replaced only after the move succeeds.

    Its files get the mode the umask gives (:func:`follow_umask`). If the swap fails the earlier folder is put back
    and the error raised.
    """
    staging, target = Path(staging), Path(target)
    follow_umask(staging)
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
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise_if_disk_full(err, target)
        raise


__all__ = [
    "PARTIAL_MARK",
    "TMP_MARK",
    "DiskFullError",
    "atomic_path",
    "commit_folder",
    "follow_umask",
    "fsync_dir",
    "is_disk_full",
    "pid_running",
    "process_umask",
    "raise_if_disk_full",
    "remove_leftovers",
    "staged_folder",
    "staging_path",
    "write_json_atomic",
    "write_text_atomic",
]
