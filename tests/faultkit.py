"""Helpers of the fault tests (``test_faults_*.py``): a pickle payload that leaves a marker
file when it is unpickled, the real CLIs run in their own processes (forked by ``clirunner``), the one-line
error check, tiny LMDB datasets and ways to damage them."""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path

import lmdb
import numpy as np
from clirunner import Done, shared
from PIL import Image

from ilvr_toolkit.data.lmdb_format import image_key
from ilvr_toolkit.data.prepare import build_lmdb

REPO = Path(__file__).resolve().parents[1]
TINY32 = REPO / "tests" / "fixtures" / "reference" / "tiny32.pt"
NO_WEIGHTS_ONLY = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


class Payload:
    """Unpickling this runs ``Path(marker).touch()``: what a planted file would do (any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def run(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> Done:
    """``python ARGS`` in the repository root, importing this checkout (not the installed one),
    in its own process forked from the session's :func:`clirunner.shared` runner. ``env`` is
    set in that process before the command starts, like a shell's ``VAR=1 python ...``."""
    return shared()(*args, env=env, timeout=timeout)


def error_line(done: Done, prog: str) -> str:
    """The one error line ``PROG: error: ...`` a refused command ends with (no traceback, no signal)."""
    assert done.returncode in (1, 2), (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr[-3000:]
    return errors[0]


def make_images(folder: Path, count: int = 8, size: int = 32, seed: int = 0) -> Path:
    """``count`` smooth random RGB PNGs of ``size`` px."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:02d}.png")
    return folder


def tiny_lmdb(root: Path, sizes: tuple[int, ...] = (16,), count: int = 8) -> Path:
    """A converted LMDB of ``count`` images at ``sizes`` under ``root``."""
    out = root / "tiny.lmdb"
    build_lmdb(make_images(root / "images", count), out, list(sizes), workers=0, progress=False)
    return out


def put(path: Path, key: bytes, value: bytes) -> None:
    """Store ``value`` under ``key`` (a planted record or metadata value), through lmdb itself."""
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


def damage_record(path: Path, index: int, how: str, size: int = 16) -> bytes:
    """Overwrite bytes of record ``index`` inside data.mdb itself (every stored copy of it):
    ``"header"`` zeroes its signature, ``"middle"`` overwrites compressed data (a PNG whose
    IDAT checksum fails). Returns the key."""
    key = image_key(size, index)
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        value = txn.get(key)
    env.close()
    data = (path / "data.mdb").read_bytes()
    assert value is not None and value in data
    mid = len(value) // 2
    broken = b"\0" * 8 + value[8:] if how == "header" else value[:mid] + b"\xff" * 16 + value[mid + 16 :]
    (path / "data.mdb").write_bytes(data.replace(value, broken))
    return key


def damage_size(path: Path, key: bytes) -> None:
    """Add 8 MiB to the stored size of ``key``'s value in every leaf node holding it (found as
    size, flags, key length, key): an overflow value then runs past the end of data.mdb, an
    inline one past its page (LMDB: MDB_CORRUPTED)."""
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        size = len(txn.get(key))
    env.close()
    data = bytearray((path / "data.mdb").read_bytes())
    found = [m.start() - 6 for m in re.finditer(re.escape(struct.pack("<H", len(key)) + key), data)]
    nodes = [at for at in found if struct.unpack_from("<I", data, at)[0] == size]  # mn_lo, mn_hi
    assert nodes, f"no leaf node of {key!r} with size {size}"
    for at in nodes:
        struct.pack_into("<H", data, at + 2, 0x80)  # mn_hi: + 128 << 16 bytes
    (path / "data.mdb").write_bytes(data)


def flip_tensor_bytes(path: Path, count: int = 64) -> str:
    """Invert ``count`` bytes in the middle of the largest member (tensor data) of the torch.save
    zip archive ``path``, in place (size and layout unchanged); return that member's name."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda m: m.file_size)
        stored = archive.read(member)
    assert len(stored) >= 2 * count, "the largest member is too small to damage in its middle"
    data = bytearray(path.read_bytes())
    middle = data.find(stored) + len(stored) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(data)
    return member.filename
