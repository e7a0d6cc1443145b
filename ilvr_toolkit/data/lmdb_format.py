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

import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

__all__ = ["LENGTH_KEY", "META_KEY", "NAMES_KEY", "LMDBInfo", "image_key", "open_lmdb", "read_info"]
__all__ += ["read_names"]

LENGTH_KEY = b"length"
META_KEY = b"__ilvr_toolkit_meta__"
NAMES_KEY = b"__ilvr_toolkit_names__"
_IMAGE_KEY = re.compile(rb"^(\d+)-\d+$")
_READ_OPTIONS = {"readonly": True, "lock": False, "readahead": False, "meminit": False, "max_spare_txns": 1}


def image_key(size: int, index: int) -> bytes:
    """rosinality's key: ``f"{size}-{str(index).zfill(5)}"`` (6+ digits past 99999)."""
    return f"{size}-{str(index).zfill(5)}".encode()


# One read-only environment per (file, process). lmdb >= 3 refuses to open the same file twice
# in one process, and an environment must not be used across fork, so the cache records the
# pid that opened each entry; a forked child closes its inherited copy (which only unmaps the
# child's view: read-only, lock=False, nothing shared with the parent) and opens its own.
_ENVS: dict[tuple[int, int], tuple[int, lmdb.Environment]] = {}
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
        good = len(metas[0]) == 152 and struct.unpack_from("<I", metas[0], 16)[0] == 0xBEEFC0DE
        psize = struct.unpack_from("<I", metas[0], 40)[0] if good else 0  # mm_dbs[0].md_pad
        if psize:
            f.seek(psize)
            metas.append(f.read(152))
    if not 512 <= psize <= 1 << 16:
        raise ValueError(f"{data_file}: not an LMDB data file ({size} bytes, no valid header)")
    last_page, _ = max(
        (struct.unpack_from("<QQ", m, 136) for m in metas if len(m) == 152), key=lambda m: m[1]
    )
    if size < (last_page + 1) * psize:
        raise ValueError(
            f"{data_file}: truncated ({size} bytes, its metadata needs {(last_page + 1) * psize}); "
            "rebuild it with python -m ilvr_toolkit.data.prepare (--verify checks a dataset)"
        )


def open_lmdb(path: str | Path) -> lmdb.Environment:
    """The shared read-only environment of the LMDB at ``path`` for this process.

    Keyed by the data file's (device, inode), so the same files reached through another path
    share an entry, while a dataset rebuilt at the same path gets a new one (environments
    already handed out keep reading the old files until dropped).
    """
    path = os.fspath(path)
    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    try:
        st = os.stat(data_file)
    except FileNotFoundError:
        raise FileNotFoundError(f"no LMDB at {path} (missing {data_file})") from None
    key = (st.st_dev, st.st_ino)
    if key not in _ENVS:
        check_not_truncated(data_file, st.st_size)
    pid = os.getpid()
    with _ENVS_LOCK:
        owner, env = _ENVS.get(key, (None, None))
        if owner == pid:
            return env
        if env is not None:
            env.close()  # inherited through fork: drop the child's mapping only
        env = lmdb.open(path, subdir=os.path.isdir(path), **_READ_OPTIONS)
        _ENVS[key] = (pid, env)
        return env


@dataclass(frozen=True)
class LMDBInfo:
    """What an LMDB image dataset holds. ``meta`` is None for foreign (e.g. rosinality) LMDBs."""

    path: str
    length: int
    sizes: tuple[int, ...]
    meta: dict[str, Any] | None


def _scan_sizes(txn: lmdb.Transaction) -> tuple[int, ...]:
    """Sizes present as ``{size}-{index}`` keys, by a skip scan over the sorted keys.

    After a key with prefix ``b"256-"`` the cursor jumps to ``b"256."`` ('.' sorts right after
    '-'), past every other key of that size, so the scan costs one seek per size.
    """
    sizes: set[int] = set()
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
    with open_lmdb(path).begin() as txn:
        raw_length, raw_meta = txn.get(LENGTH_KEY), txn.get(META_KEY)
        if raw_length is None:
            raise ValueError(f"{path} is not an LMDB image dataset: no {LENGTH_KEY!r} key")
        try:  # text and JSON, never pickle
            length, meta = int(raw_length), None if raw_meta is None else json.loads(raw_meta)
            sizes = tuple(sorted(int(s) for s in meta["sizes"])) if meta else _scan_sizes(txn)
        except (ValueError, TypeError, KeyError):
            raise ValueError(
                f"{path}: damaged {LENGTH_KEY!r} or {META_KEY!r} entry; rebuild the dataset"
            ) from None
    return LMDBInfo(path=os.fspath(path), length=length, sizes=sizes, meta=meta)


def read_names(path: str | Path) -> list[str] | None:
    """The source file name of every index (datasets written by our converter), else None."""
    with open_lmdb(path).begin() as txn:
        raw = txn.get(NAMES_KEY)
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        raise ValueError(f"{path}: damaged {NAMES_KEY!r} entry (not JSON); rebuild the dataset") from None
