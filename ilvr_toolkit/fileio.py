"""Atomic file writes, the one implementation every package uses (stdlib only).

A long job killed at any moment must leave either the old file or the new one, never a
half-written one: write a temp file in the same folder (same file system, so the final step
is a rename), fsync it, ``os.replace`` it over the target, fsync the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "lock_folder",
    "pid_alive",
    "remove_dead_temps",
    "unlock_folder",
]

_TEMP = re.compile(r"^\.(.+)\.[0-9a-f]{8}(?:\.(\d+)@(.+))?\.tmp$")
_LOCKS: dict[Path, int] = {}


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file for writing that replaces ``path`` when the block ends without error.

    The temp file (``.NAME.<8 hex>.<pid>@<host>.tmp`` beside ``path``) gets mode 0o666 minus
    the umask, like a plain ``open``; it is removed if the block raises. A process killed midway
    leaves it behind: :func:`remove_dead_temps` deletes it once its writer is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # the writer in the name: start-up cleanups remove only temps whose writer is gone
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.{os.getpid()}@{socket.gethostname()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and not error.filename:  # a full disk: name the file
            raise OSError(error.errno, f"cannot write: {error.strerror}", os.fspath(path)) from error
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (another user's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _gone(pid: str, host: str) -> bool:
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def remove_dead_temps(folder: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temp files of :func:`atomic_open` in ``folder`` (for ``names`` only, if given)
    whose writer is gone (a pid of this host that no longer runs; no pid: an older version's)."""
    folder, wanted = Path(folder), None if names is None else set(names)
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        match = _TEMP.match(entry.name)
        if match and (wanted is None or match.group(1) in wanted):
            if match.group(2) is None or _gone(match.group(2), match.group(3)):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def lock_folder(folder: str | os.PathLike[str]) -> str | None:
    """Hold ``FOLDER/.lock`` (``flock``, recording ``pid host job``) until :func:`unlock_folder`
    or the end of this process, however it ends; None, or who holds it (``pid P on HOST``).

    A lock whose holder is gone although the file system still has it locked (a pid of this
    host that no longer runs, or this very SLURM job before its requeue) is taken over."""
    path = Path(folder) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = [str(os.getpid()), socket.gethostname(), os.environ.get("SLURM_JOB_ID", "-")]
    retried = False
    while True:
        fd = _LOCKS.get(path) or os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, host, job = (os.read(fd, 512).decode(errors="replace").split() + ["?"] * 3)[:3]
            os.close(fd)
            if retried or not (_gone(pid, host) or job == me[2] != "-"):
                return f"pid {pid} on {host}"
            path.unlink(missing_ok=True)
            retried = True
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, " ".join(me).encode(), 0)
        _LOCKS[path] = fd
        return None


def unlock_folder(folder: str | os.PathLike[str]) -> None:
    """Release the lock :func:`lock_folder` took (the file stays: removing it would race)."""
    fd = _LOCKS.pop(Path(folder) / ".lock", None)
    if fd is not None:
        os.close(fd)
