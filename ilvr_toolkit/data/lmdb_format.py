"""The LMDB image layout and the per-process environment cache (no torch here).

Layout (rosinality/stylegan2-pytorch, also read by denoising-diffusion-pytorch)::

    b"{size}-{index:05d}"      encoded image (PNG or JPEG), index 0..length-1, one entry per size
    b"length"                  str(count).encode()

plus, for datasets written by ``ilvr_toolkit.data.prepare``::

    b"__ilvr_toolkit_meta__"   JSON: sizes, length, format, source, filter, tool version, skipped
    b"__ilvr_toolkit_names__"  JSON list: source file name of each index (traceability)

Foreign readers ignore the two extra keys; foreign LMDBs (no metadata) open here too, their
sizes found by scanning the keys.
"""

import contextlib
import ctypes
import fcntl
import json
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

__all__ = ["LENGTH_KEY", "META_KEY", "NAMES_KEY", "BadRecord", "LMDBInfo", "image_key", "open_lmdb"]
__all__ += ["close_lmdb", "not_read_elsewhere", "opened", "read_info", "read_names", "reading"]

LENGTH_KEY = b"length"
META_KEY = b"__ilvr_toolkit_meta__"
NAMES_KEY = b"__ilvr_toolkit_names__"
_IMAGE_KEY = re.compile(rb"^(\d+)-\d+$")
_READ_OPTIONS = {"readonly": True, "lock": False, "readahead": False, "meminit": False, "max_spare_txns": 1}


class BadRecord(ValueError):
    """A record that does not decode or is damaged. Re-raised by a DataLoader from its worker, with the
    worker's traceback as the message, it keeps only its own last line: the CLI's error stays one line."""

    def __init__(self, message: str):
        super().__init__(message.rstrip().splitlines()[-1].split("BadRecord: ", 1)[-1])


def image_key(size: int, index: int) -> bytes:
    """rosinality's key: ``f"{size}-{str(index).zfill(5)}"`` (6+ digits past 99999)."""
    return f"{size}-{str(index).zfill(5)}".encode()


# One read-only environment per (file, process). lmdb >= 3 refuses to open the same file twice
# in one process, and an environment must not be used across fork, so the cache records the
# pid that opened each entry; a forked child closes its inherited copy (which only unmaps the
# child's view: read-only, lock=False, nothing shared with the parent) and opens its own.
# Each entry also holds an fd of data.mdb with a shared flock (``_reader_lock``): how prepare
# --overwrite sees that a running process reads the dataset (lock=False leaves LMDB's reader
# table empty). A forked child closes its inherited copy, which keeps the parent's lock (flock
# belongs to the open file description, shared with the parent), and takes its own.
_ENVS: dict[tuple[int, int], tuple[int, lmdb.Environment, int | None, int | None]] = {}  # + map address, fd
_ENVS_LOCK = threading.Lock()


def _reset_lock_after_fork() -> None:
    global _ENVS_LOCK
    _ENVS_LOCK = threading.Lock()  # the parent may have forked while another thread held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)


def check_not_truncated(data_file: str, size: int) -> None:
    """Refuse a data file shorter than its newest meta page says (``(last page + 1) * page
    size``): mapping it would end the process with SIGBUS at the first read past the end."""
    with open(data_file, "rb") as f:
        metas = [f.read(152)]  # page header (16 bytes), then MDB_meta up to mm_txnid
        psize = struct.unpack_from("<I", metas[0], 40)[0] if _is_meta(metas[0]) else 0  # mm_dbs[0].md_pad
        if psize:
            f.seek(psize)
            metas.append(f.read(152))
    if not 512 <= psize <= 1 << 16:
        raise ValueError(f"{data_file}: not an LMDB data file ({size} bytes, no valid header)")
    last_page, _ = max((struct.unpack_from("<QQ", m, 136) for m in metas if _is_meta(m)), key=lambda m: m[1])
    if size < (last_page + 1) * psize:
        raise ValueError(
            f"{data_file}: truncated or damaged ({size} bytes, its metadata needs {(last_page + 1) * psize}); "
            "rebuild it with python -m ilvr_toolkit.data.prepare (--verify checks a dataset)"
        )


def _is_meta(page: bytes) -> bool:
    """A meta page's first 152 bytes, with LMDB's magic number (a damaged one is not read)."""
    return len(page) == 152 and struct.unpack_from("<I", page, 16)[0] == 0xBEEFC0DE


def open_lmdb(path: str | Path) -> lmdb.Environment:
    """The shared read-only environment of the LMDB at ``path`` for this process.

    Keyed by the data file's (device, inode), so the same files reached through another path
    share an entry, while a dataset rebuilt at the same path gets a new one (environments
    already handed out keep reading the old files until dropped).
    """
    return _open(path)[0]


def _mappings(data_file: str, st: os.stat_result, maps: str = "/proc/self/maps") -> set[int]:
    """Addresses where this process maps ``data_file`` (of its offset 0), found by its path or its
    (device, inode): maps prints the device as hex "major:minor"; empty without /proc."""
    try:
        with open(maps) as lines:
            fields = [line.split(maxsplit=5) for line in lines]
    except OSError:
        return set()
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    real, ours = os.path.realpath(data_file), (device, str(st.st_ino))
    mine = [f for f in fields if len(f) == 6 and (tuple(f[3:5]) == ours or f[5].rstrip("\n") == real)]
    return {int(f[0].split("-")[0], 16) - int(f[2], 16) for f in mine}


_MARGIN = (1 << 32) + (1 << 20)  # past a damaged record's start: its size (32 bits), node offsets (16)


def _zeros_past_end(start: int, size: int, map_size: int) -> bool:
    """Map zero pages over the map past the end of data.mdb (Linux): LMDB following a damaged node, or
    py-lmdb touching a value that runs past the end, reads zeros there instead of ending the
    process with SIGBUS; ``reading`` then rejects such values. False if the mapping failed."""
    begin = start + -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    if begin >= start + map_size:
        return True
    map_zeros = ctypes.CDLL(None).mmap  # mmap(address, length, prot, flags, fd, offset)
    map_zeros.restype = ctypes.c_void_p
    map_zeros.argtypes = (ctypes.c_void_p, ctypes.c_size_t, *[ctypes.c_int] * 3, ctypes.c_long)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10  # MAP_FIXED: replace those pages of LMDB's map
    return map_zeros(begin, start + map_size - begin, mmap.PROT_READ, flags, -1, 0) == begin


def opened(path: str | Path) -> tuple[lmdb.Environment, str, int, int | None]:
    """The LMDB at ``path`` opened for :func:`reading` in this process (keep it; not across fork)."""
    return _open(path)


def _data_file(path: str) -> str:
    return os.path.join(path, "data.mdb") if os.path.isdir(path) else path


def _reader_lock(data_file: str) -> int | None:
    """An fd of ``data_file`` holding a shared flock while this process reads it; never fails the
    reader (no flock on this file system, ENOLCK, a replacement under way: an fd without the lock)."""
    try:
        fd = os.open(data_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return fd


def _open(path: str | Path) -> tuple[lmdb.Environment, str, int, int | None]:
    """``open_lmdb``, with the data file's name, its present size and its address in the map."""
    path = os.fspath(path)
    data_file = _data_file(path)
    try:
        st = os.stat(data_file)
    except FileNotFoundError:
        raise FileNotFoundError(f"no LMDB at {path} (missing {data_file})") from None
    key = (st.st_dev, st.st_ino)
    if key not in _ENVS:
        check_not_truncated(data_file, st.st_size)
    pid = os.getpid()
    with _ENVS_LOCK:
        owner, env, start, fd = _ENVS.get(key, (None, None, None, None))
        if owner != pid:
            if env is not None:
                env.close()  # inherited through fork: drop the child's mapping only
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)  # the child's copy: never LOCK_UN, which would unlock the parent too
            before = _mappings(data_file, st)
            env = lmdb.open(path, subdir=os.path.isdir(path), map_size=st.st_size + _MARGIN, **_READ_OPTIONS)
            new = _mappings(data_file, st) - before
            start = new.pop() if len(new) == 1 else None  # None: unknown, values are not checked
            if start is not None and not _zeros_past_end(start, st.st_size, env.info()["map_size"]):
                start = None
            _ENVS[key] = (pid, env, start, _reader_lock(data_file))
    return env, data_file, st.st_size, start


def close_lmdb(path: str | Path) -> None:
    """Close this process's environment of the LMDB at ``path`` and drop its reader lock (e.g. of
    a dataset opened only to verify it); what :func:`opened` returned for it must not be used after."""
    with contextlib.suppress(OSError):
        st = os.stat(_data_file(os.fspath(path)))
        with _ENVS_LOCK:
            _, env, _, fd = _ENVS.pop((st.st_dev, st.st_ino), (None, None, None, None))
        if env is not None:
            env.close()
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def not_read_elsewhere(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on the LMDB at ``path`` (nothing if it has no data file), or raise
    BlockingIOError if another running process reads it (:func:`_open`'s shared lock). This
    process's own reads do not count (its lock is converted, then made shared again); where the
    file system has no flock nothing is held (other hosts on NFS may not be seen either)."""
    data_file, pid, fd, own = _data_file(os.fspath(path)), os.getpid(), None, None
    with contextlib.suppress(OSError):  # no data.mdb (an empty folder), not readable: nothing held
        st = os.stat(data_file)
        owner, _, _, own = _ENVS.get((st.st_dev, st.st_ino), (None, None, None, None))
        own = own if owner == pid else None
        fd = os.open(data_file, os.O_RDONLY | os.O_CLOEXEC) if own is None else own
    try:
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:  # ENOLCK, a file system without flock: not seen
            if isinstance(error, BlockingIOError):
                raise
        yield
    finally:
        if fd is not None and own is None:
            os.close(fd)
        elif own is not None:  # a failed conversion dropped it too
            with contextlib.suppress(OSError):
                fcntl.flock(own, fcntl.LOCK_SH | fcntl.LOCK_NB)


@contextlib.contextmanager
def reading(path: str | Path | tuple) -> Iterator[Callable[[bytes], bytes | None]]:
    """``get(key)`` in one read-only transaction of the LMDB at ``path``: the value (copied), None if
    absent, ``BadRecord`` naming the file and key if damaged. A damaged size or page number can
    place a value past the end of data.mdb, where reading the map ends the process with SIGBUS,
    so the value's place in the map (a view, not read) is checked before it is copied. ``path``
    may also be what :func:`opened` returned in this process (no file-system call per read)."""
    env, data_file, size, start = path if isinstance(path, tuple) else _open(path)
    txn = env.begin(buffers=True)

    def get(key: bytes) -> bytes | None:
        nonlocal txn
        try:
            view = txn.get(key)
        except lmdb.Error as error:  # MDB_CORRUPTED, MDB_PAGE_NOTFOUND...: the transaction is dead
            txn.abort()
            txn = env.begin(buffers=True)
            raise BadRecord(f"{data_file}: record {key.decode()} is damaged ({error})") from None
        if view is not None and len(view) and start is not None:
            if not start <= np.frombuffer(view, np.uint8).ctypes.data <= start + size - len(view):
                raise BadRecord(
                    f"{data_file}: record {key.decode()} is damaged (points past the end of the file)"
                )
        return None if view is None else bytes(view)

    try:
        yield get
    finally:
        txn.abort()


@dataclass(frozen=True)
class LMDBInfo:
    """What an LMDB image dataset holds. ``meta`` is None for foreign (e.g. rosinality) LMDBs."""

    path: str
    length: int
    sizes: tuple[int, ...]
    meta: dict[str, Any] | None


def _scan_sizes(path: str | Path) -> tuple[int, ...]:
    """Sizes present as ``{size}-{index}`` keys, by a skip scan over the sorted keys.

    After a key with prefix ``b"256-"`` the cursor jumps to ``b"256."`` ('.' sorts right after
    '-'), past every other key of that size, so the scan costs one seek per size.
    """
    sizes: set[int] = set()
    with open_lmdb(path).begin() as txn:
        cursor = txn.cursor()
        found = cursor.first()
        while found:
            if (match := _IMAGE_KEY.match(cursor.key())) is None:
                found = cursor.next()
            else:
                sizes.add(int(match.group(1)))
                found = cursor.set_range(match.group(1) + b".")
    return tuple(sorted(sizes))


def read_info(path: str | Path) -> LMDBInfo:
    """Length, sizes and (if ours) metadata of the LMDB image dataset at ``path``."""
    with reading(path) as get:
        raw_length, raw_meta = get(LENGTH_KEY), get(META_KEY)
    if raw_length is None:
        raise ValueError(f"{path} is not an LMDB image dataset: no {LENGTH_KEY!r} key")
    try:  # text and JSON, never pickle
        length, meta = int(raw_length), None if raw_meta is None else json.loads(raw_meta)
        sizes = tuple(sorted(int(s) for s in meta["sizes"])) if meta else _scan_sizes(path)
        if length < 0 or (meta and meta.get("length", length) != length):
            raise ValueError
        if length and sizes:  # more records than there are: an epoch that never ends (its last one
            with contextlib.suppress(BadRecord), reading(path) as get:  # damaged: there, skipped later)
                if get(image_key(sizes[0], length - 1)) is None:
                    raise ValueError
    except (ValueError, TypeError, KeyError):
        raise ValueError(
            f"{path}: damaged {LENGTH_KEY!r} or {META_KEY!r} entry; rebuild the dataset"
        ) from None
    return LMDBInfo(path=os.fspath(path), length=length, sizes=sizes, meta=meta)


def read_names(path: str | Path) -> list[str] | None:
    """The source file name of every index (datasets written by our converter), else None."""
    with reading(path) as get:
        raw = get(NAMES_KEY)
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        raise ValueError(f"{path}: damaged {NAMES_KEY!r} entry (not JSON); rebuild the dataset") from None
