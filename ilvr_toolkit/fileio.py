"""Atomic file writes, the one implementation every package uses (stdlib only): a job killed at
any moment leaves the old file or the new one, never a half-written one (temp file in the same
folder, so the final step is a rename; fsync it, ``os.replace`` it over the target, fsync the folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .cli import UsageError

__all__ = ["atomic_open", "atomic_write_bytes", "lock_folder", "pid_alive", "remove_dead_temps"]

_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}(?:\.(\d+)@(.+))?\.tmp$")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", exclusive: bool = False) -> Iterator[IO[Any]]:
    """Open a temp file for writing that replaces ``path`` when the block ends without error
    (``exclusive``: that becomes ``path`` only if there is none yet, see :func:`_link_once`).

    The temp file (``.NAME.<8 hex>.<pid>@<host>.tmp`` beside ``path``) gets mode 0o666 minus
    the umask, like a plain ``open``; it is removed if the block raises. What is at ``path`` is
    replaced only if it is a file or a symlink (the link itself), else OSError before any write.
    A process killed midway leaves it behind: :func:`remove_dead_temps` deletes it once its writer
    is gone.
    """
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_symlink()):  # a device, a FIFO: never replaced
        raise OSError(errno.EEXIST, "exists and is not a regular file: not replaced", os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = None
    while fd is None:  # the writer in the name: start-up cleanups remove only temps whose writer is gone
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.{os.getpid()}@{socket.gethostname()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as error:  # name the file asked for, not the temp file
            raise OSError(error.errno, f"cannot write: {error.strerror}", os.fspath(path)) from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            _link_once(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = error.__context__ if isinstance(error, RuntimeError) else error  # torch.save's RuntimeError
        written = isinstance(cause, OSError) and (cause is error or cause.errno in _WRITE_ERRORS)
        if written and not cause.filename:  # a failed write (a full disk): name the file
            raise OSError(cause.errno, f"cannot write: {cause.strerror}", os.fspath(path)) from error
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _link_once(tmp: Path, path: Path) -> None:
    """``tmp`` becomes ``path`` unless that exists (a hard link: of several processes creating it at
    once, exactly one does); on a filesystem without hard links (exFAT, some network mounts) still
    atomically, but two at once may both write it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links here
        if not path.exists():
            os.replace(tmp, path)
            return
    os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's counts)."""
    try:
        return os.kill(pid, 0) is None
    except OSError as error:
        return error.errno != errno.ESRCH


def remove_dead_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files of :func:`atomic_open` in ``folder`` whose writer is gone: a pid of
    this host that no longer runs, or none (an older version's); those of live writers stay."""
    removed = []
    for entry in Path(folder).glob(".*.tmp"):
        pid, host = match.group(1, 2) if (match := _TEMP.match(entry.name)) else ("", "")
        if pid is None or (host == socket.gethostname() and not pid_alive(int(pid))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


def lock_folder(
    folder: str | os.PathLike[str], name: str = ".lock", shared: bool = False, named: str = ""
) -> str | None:
    """Hold ``FOLDER/NAME`` (``pid host``) until this process ends, however; None, or its holder.
    A POSIX lock: forked children (DataLoader workers) do not inherit it, the same process may retake it;
    a file left by a killed holder (or by ``touch``) is simply taken. ``shared``: a read lock, held
    beside other shared ones but refused (and refusing) an exclusive one. A UsageError, beginning
    with ``named`` (the flag and folder the user gave), when the folder is not writable; one naming
    the lock when it is a symbolic link (never followed: it would overwrite the file it points to)."""
    path = Path(folder) / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UsageError(f"{path}: a symbolic link, not a lock file; remove it") from None
        if error.errno == errno.EACCES and path.is_file():  # another user's lock file in a shared folder
            return _unlocked(path, error)
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UsageError(f"{named or folder}: not writable ({error.strerror}: {path})") from None
        raise
    try:
        fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        holder = os.read(fd, 512).decode(errors="replace").split() + ["?", "?"]
        os.close(fd)
        return f"pid {holder[0]} on {holder[1]}"
    except OSError as error:  # ENOLCK, EOPNOTSUPP: a file system without POSIX locks
        os.close(fd)
        return _unlocked(path, error)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}".encode(), 0)
    return None  # fd stays open: closing any descriptor of the file would release the lock


def _unlocked(path: Path, error: OSError) -> None:
    """Go on without the lock ``path`` (a warning): the work is what it was before locks."""
    logging.getLogger("ilvr_toolkit").warning(
        "%s: cannot lock it (%s): a second copy working here at the same time would not be noticed",
        path,
        error.strerror,
    )
