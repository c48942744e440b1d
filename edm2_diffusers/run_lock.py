"""One writer per folder: a lock file naming its holder (pid, host, start time, command).

Training takes the lock on its run folder before it writes anything and keeps it to the end; an export takes it on
the folder it writes (and on the run folder when the export goes inside it), and post-hoc reconstruction on its
output folder. A second writer stops at once with :class:`FolderLockedError` naming the holder.

The lock is an ``fcntl.flock`` on ``<folder>/.edm2_diffusers.lock`` (or, for a folder that is replaced as a whole, a
hidden file next to it), so the kernel drops it when the holder dies. The file's JSON says who holds it; a file left
by a process that is no longer running on this host is stale and is taken over with a warning. A file left by a
process on another host cannot be checked from here and is refused (remove it by hand once that run is gone).

Locks are re-entrant within a process: the trainer holds its run folder and the export it runs at the end takes the
same lock again without blocking itself.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import inspect
import json
import logging
import os
import socket
import sys
import threading

from accelerate.utils import broadcast_object_list, gather_object

from .files import pid_running

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_EXCL and the holder's pid only
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".edm2_diffusers.lock"

_held: dict[str, FolderLock] = {}
_registry_lock = threading.Lock()


class FolderLockedError(RuntimeError):
    """Another process writes into the folder (the message names it)."""


def lock_path(folder: str | os.PathLike, inside: bool = True) -> str:
    """Where the lock of ``folder`` lives: inside it, or (``inside=False``) as a hidden file next to it."""
    folder = os.path.abspath(os.fspath(folder))
    if inside:
        return os.path.join(folder, LOCK_NAME)
    parent, name = os.path.split(folder.rstrip(os.sep))
    return os.path.join(parent, f".{name}{LOCK_NAME}")


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid from the holder), or ``None`` where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    if not pid_running(pid):
        return False
    current = _proc_start(pid)
    return start is None or current is None or current == start


def describe(holder: dict) -> str:
    """``pid 123 on host since 2026-…: command`` from a lock file's content."""
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


def read_holder(path: str) -> dict | None:
    """The content of a lock file (``None``: absent, empty or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class FolderLock:
    """An exclusive, re-entrant lock on one folder; use :func:`lock_folder` to take one.

    Args:
        folder (`str` or `os.PathLike`): the folder written under the lock (created when ``inside``).
        inside (`bool`): keep the lock file inside the folder (a run folder) or next to it (a folder that is
            swapped in whole, such as an export).
        purpose (`str`): what the holder does, shown to a refused writer.
    """

    def __init__(self, folder: str | os.PathLike, inside: bool = True, purpose: str = ""):
        self.folder = os.path.abspath(os.fspath(folder))
        self.path = lock_path(self.folder, inside)
        self.inside = inside
        self.purpose = purpose
        self._fd: int | None = None
        self._count = 0

    @property
    def held(self) -> bool:
        return self._count > 0

    def acquire(self) -> FolderLock:
        key = os.path.realpath(self.path)
        with _registry_lock:
            owner = _held.get(key)
            if owner is not None and owner._fd is not None:
                owner._count += 1
                self._share = owner
                return self
            self._share = None
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._take()
            self._count = 1
            _held[key] = self
        return self

    def release(self) -> None:
        with _registry_lock:
            owner = getattr(self, "_share", None)
            if owner is not None:
                owner._count -= 1
                self._share = None
                return
            if self._count == 0:
                return
            self._count -= 1
            if self._count:
                return
            _held.pop(os.path.realpath(self.path), None)
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            if fd is not None:
                os.close(fd)  # closing drops the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _info(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "proc_start": _proc_start(os.getpid()),
            "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "python",
            "purpose": self.purpose,
        }

    def _refuse(self, holder: dict | None) -> FolderLockedError:
        who = describe(holder) if holder else "another process (its lock file gives no details)"
        what = f" for {holder['purpose']}" if holder and holder.get("purpose") else ""
        return FolderLockedError(
            f"{self.folder} is in use by {who}{what}; only one run may write into a folder. Wait for it to finish, "
            f"or choose another folder (lock file: {self.path})"
        )

    def _take(self) -> None:
        for _ in range(20):  # retries only while another process replaces the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as err:
                        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                            raise
                        raise self._refuse(read_holder(self.path)) from None
                    try:  # the file may have been removed (released) between our open and our flock
                        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                    except FileNotFoundError:
                        same = False
                    if not same:
                        os.close(fd)
                        fd = None
                        continue
                holder = read_holder(self.path)
                if holder:
                    self._check_leftover(holder)
                info = json.dumps(self._info(), indent=2).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, info, 0)
                os.fsync(fd)
                self._fd, fd = fd, None
                return
            finally:
                if fd is not None:
                    os.close(fd)
        raise FolderLockedError(f"could not take the lock {self.path}: it keeps changing")

    def _check_leftover(self, holder: dict) -> None:
        """A lock file nobody holds: stale if its process is gone from this host, else refused."""
        host, pid = holder.get("host"), holder.get("pid")
        if host != socket.gethostname():
            raise FolderLockedError(
                f"{self.folder} is locked by {describe(holder)}, on another host, which cannot be checked from here. "
                f"If that run is gone, delete {self.path}"
            )
        if isinstance(pid, int) and pid != os.getpid() and _alive(pid, holder.get("proc_start")):
            raise self._refuse(holder)
        logger.warning("%s: taking over the stale lock of %s (no longer running)", self.folder, describe(holder))


@contextlib.contextmanager
def lock_for_writing(output_dir, run_dir=None, output_inside: bool = False, purpose: str = "export"):
    """Hold the locks a writer of ``output_dir`` needs: its own, and the run folder's when it lies inside ``run_dir``.

    Args:
        output_dir (`str` or `os.PathLike`): the folder written.
        run_dir (`str` or `os.PathLike`, *optional*): the training run read from; locked too when ``output_dir`` is
            inside it (the default ``run_dir/pipeline`` export), so that the run's trainer and the writer exclude
            each other. The trainer itself passes, as the lock is re-entrant.
        output_inside (`bool`): the lock file of ``output_dir`` inside it (a folder written file by file) or next
            to it (a folder swapped in whole).
        purpose (`str`): what the writer does, shown to a refused one.
    """
    with contextlib.ExitStack() as stack:
        if run_dir is not None:
            run = os.path.realpath(os.fspath(run_dir))
            out = os.path.realpath(os.fspath(output_dir))
            if os.path.isdir(run) and (out == run or out.startswith(run + os.sep)):
                stack.enter_context(FolderLock(run, inside=True, purpose=purpose))
        stack.enter_context(FolderLock(output_dir, inside=output_inside, purpose=purpose))
        yield


def writes_into(output: str = "output_dir", run: str | None = "run_dir", purpose: str = "export"):
    """Decorate a function that writes the folder passed as its argument ``output`` (see :func:`lock_for_writing`)."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            with lock_for_writing(bound[output], bound.get(run) if run else None, purpose=purpose):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


class RunLock:
    """The training run's lock on its output folder, taken by the main process for all of them.

    :meth:`take` is called on every process at the same points; the main process locks (``create``: making the
    folder if needed, else only if it already exists) and tells the others, so that all stop with the same error
    when it failed. With Accelerate's ``save_on_each_node`` (node-local disks, each node writing its own copy of the
    run folder) the first process of every node locks its node's folder. :meth:`release` at the end, also on error.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = folder
        self._lock: FolderLock | None = None
        self._done = False

    def take(self, accelerator=None, create: bool = True) -> None:
        if self._done:
            return
        per_node = accelerator is not None and accelerator.project_configuration.save_on_each_node
        main = accelerator is None or accelerator.is_main_process or (per_node and accelerator.is_local_main_process)
        error, taken = None, self._lock is not None
        if main and not taken and (create or os.path.isdir(self.folder)):
            try:
                self._lock = lock_folder(self.folder, purpose="training")
                taken = True
            except Exception as err:  # every process must hear of it, whatever it is
                error = f"{type(err).__name__}: {err}" if not isinstance(err, FolderLockedError) else str(err)
        if per_node and accelerator.num_processes > 1:  # every node's first process: all hear of every failure
            gathered = gather_object([(accelerator.process_index, error, taken or not main)])
            failed = [(index, problem) for index, problem, _ in gathered if problem is not None]
            if failed and error is None:
                index, problem = failed[0]
                raise FolderLockedError(f"process {index} could not lock its node's run folder: {problem}")
            error, taken = (error if failed else None), all(done for _, _, done in gathered)
        elif accelerator is not None and accelerator.num_processes > 1:
            error, taken = broadcast_object_list([(error, taken)], from_process=0)[0]
        if error is not None:
            if main:
                raise FolderLockedError(error)
            raise FolderLockedError(f"the main process could not lock the run folder: {error}")
        self._done = taken

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def lock_folder(folder: str | os.PathLike, inside: bool = True, purpose: str = "") -> FolderLock:
    """Take the lock of ``folder`` (see :class:`FolderLock`); use as a context manager or call ``release()``.

    Raises:
        FolderLockedError: another live process holds it (the message names pid, host, start time and command).
    """
    return FolderLock(folder, inside=inside, purpose=purpose).acquire()


__all__ = [
    "LOCK_NAME",
    "FolderLock",
    "FolderLockedError",
    "RunLock",
    "lock_folder",
    "lock_for_writing",
    "lock_path",
    "read_holder",
    "writes_into",
]
