"""Reference images for ILVR, resized and cropped exactly like the official ILVR / guided-diffusion
loader (``center_crop_arr``, as used by ilvr_adm). They are made RGB as the converter does
(``imageops.load_rgb``): EXIF orientation applied (a phone photo is translated upright, as it
trains), alpha over white, 16-bit scaled; upstream ignores EXIF, drops alpha and clips 16-bit to
white. Plain RGB files load exactly as upstream.
"""

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.data.files import IMAGE_EXTENSIONS, list_image_files, unique_names
from ilvr_toolkit.data.imageops import BadImage, load_rgb, read_image_file
from ilvr_toolkit.data.lmdb_dataset import LMDBImageDataset
from ilvr_toolkit.data.lmdb_format import read_info

__all__ = ["ReferenceSet", "center_crop_arr", "collate_references", "load_reference"]


FULL_RESIZE_MAX = 4  # a long side of more outputs resamples only the centre crop's window of it


def _bicubic_taps(in_size: int, out_size: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's BICUBIC ``in_size`` -> ``out_size`` for outputs ``start .. start + count`` only: first
    inputs (count,), 8-bit weights (count, taps), as ``precompute_coeffs``, ``normalize_coeffs_8bpc``."""
    scale = float(np.float32(in_size)) / out_size  # Pillow's box is float32
    support = 2.0 * max(scale, 1.0)
    taps = np.arange(int(np.ceil(support)) * 2 + 1)
    center = (np.arange(start, start + count) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    used = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    x = np.abs(((taps + first[:, None]) - center[:, None] + 0.5) * (1.0 / max(scale, 1.0)))
    x = np.where(taps < used[:, None], x, 2.0)  # unused taps weigh 0; bicubic_filter (a = -0.5) as written:
    near = (1.5 * x - 2.5) * x * x + 1
    w = np.where(x < 1.0, near, np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))
    total = functools.reduce(np.add, w.T)  # in order, as the C loop adds them
    w = w / np.where(total != 0.0, total, 1.0)[:, None]
    fixed = np.where(w < 0, -0.5 + w * (1 << 22), 0.5 + w * (1 << 22)).astype(np.int64)
    return first, fixed


def _resample_window(arr: np.ndarray, axis: int, taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """HWC uint8 ``arr`` resampled along ``axis`` (0: rows, 1: columns) by ``_bicubic_taps``, in integers."""
    first, fixed = taps
    index = np.minimum(first[:, None] + np.arange(fixed.shape[1]), arr.shape[axis] - 1)  # unused taps weigh 0
    picked = np.moveaxis(np.take(arr, index, axis=axis).astype(np.int64), (axis, axis + 1), (0, 1))
    total = np.einsum("ok...,ok->o...", picked, fixed) + (1 << 21)
    return np.moveaxis(np.clip(total >> 22, 0, 255).astype(np.uint8), 0, axis)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's rule -> HWC uint8: ``Image.BOX`` halvings while the short side is at least
    twice ``image_size``, ``Image.BICUBIC`` to it, centre crop (``(h - res) // 2``, ``(w - res) // 2``).

    Bit-exact, in memory bounded by the output: along a side over ``FULL_RESIZE_MAX * image_size``
    (a 100000x1 strip) only the crop's window is resampled, by Pillow's arithmetic and pass order."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    (w, h), out = pil_image.size, [round(x * scale) for x in pil_image.size]
    if max(out) <= FULL_RESIZE_MAX * image_size:
        arr = np.asarray(pil_image.resize(tuple(out), resample=Image.BICUBIC))
        crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
        return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]
    axis, long_in = (1, w) if out[0] > out[1] else (0, h)  # the long side: numpy axis, length
    first, fixed = _bicubic_taps(long_in, out[1 - axis], (out[1 - axis] - image_size) // 2, image_size)
    lo, hi = int(first[0]), min(int(first[-1]) + fixed.shape[1], long_in)  # the window reads these
    arr = np.asarray(pil_image.crop((lo, 0, hi, h) if axis else (0, lo, w, hi)))
    # Pillow >= 13 runs the vertical pass first when it shrinks the height more than twice the width
    new_order = int(Image.__version__.split(".")[0]) >= 13  # (python-pillow/Pillow#9549)
    long_first = (new_order and h - out[1] > 0 and h - out[1] > (w - out[0]) * 2) != bool(axis)
    arr = _resample_window(arr, axis, (first - lo, fixed)) if long_first else arr
    out[1 - axis] = image_size if long_first else hi - lo
    arr = np.asarray(Image.fromarray(arr).resize(tuple(out), resample=Image.BICUBIC))
    return arr if long_first else _resample_window(arr, axis, (first - lo, fixed))


def load_reference(source: str | Path | bytes | bytearray | Image.Image, image_size: int) -> torch.Tensor:
    """A reference image (path, encoded bytes or PIL image) -> uint8 (3, image_size, image_size).

    Raises ``BadImage`` (a ValueError) if the file cannot be decoded.
    """
    if not isinstance(source, (bytes, bytearray, Image.Image)):
        source = read_image_file(source)
    arr = center_crop_arr(load_rgb(source), image_size)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # copy: PIL arrays are read-only


def _run_grid(folder: Path) -> Path | None:
    """``folder/grid.png`` if ``folder`` is a sample.py output folder (the overview, not an output)."""
    ran = (folder / "manifest.json").is_file() or (folder / ".manifest").is_dir()
    return folder / "grid.png" if ran else None


class NoImages(ValueError):
    """An image source (a folder, an LMDB, a list of files) that holds no image."""


def _first_size(files: Sequence[Path], source: Path) -> int:
    """The short side of the first image that opens (a damaged one is skipped, as a run skips it)."""
    for file in (f for f in files if f.is_file()):  # a regular file (a device would be read for ever)
        try:
            with Image.open(file) as image:
                return min(image.size)
        except Exception:  # noqa: BLE001 (Pillow raises many kinds for a damaged file)
            continue
    raise NoImages(f"no readable image in {source}")


class ReferenceSet(Dataset):
    """The reference images of a translation run, from a folder, an LMDB dataset or image files.

    - files (one path, or a list): ``names`` are the file stems;
    - folder: its image files (``files.list_image_files``; a sample.py output folder's
      ``grid.png`` is not one); ``names`` are the file stems, made unique
      (``files.unique_names``) when they clash;
    - LMDB (a folder holding ``data.mdb``): every index, named ``f"{index:05d}"``; the
      stored size closest above ``image_size`` is read and passed through the same
      preprocessing (a no-op when it already matches).

    ``image_size`` None: the short side of the first readable image (an LMDB's largest stored size).

    ``ds[i]`` is ``{"index": i, "name": str, "image": uint8 (3, H, W)}`` and raises on an
    unreadable image; ``try_get(i)`` returns ``(item, None)`` or ``(None, message)`` instead.
    """

    def __init__(self, source: str | Path | Sequence[str | Path], image_size: int | None = None):
        listed = not isinstance(source, str | os.PathLike)
        self.files: list[Path] = [Path(p) for p in source] if listed else []
        self.source = (self.files[0].parent if self.files else Path()) if listed else Path(source)
        self._lmdb: LMDBImageDataset | None = None
        if listed:
            self.names = [f.stem for f in self.files]
        elif self.source.is_dir() and (self.source / "data.mdb").is_file():
            if not (sizes := read_info(self.source).sizes):
                raise NoImages(f"LMDB {self.source} holds no images")
            image_size = image_size or max(sizes)
            stored = min((s for s in sizes if s >= image_size), default=max(sizes))  # closest above
            self._lmdb = LMDBImageDataset(self.source, stored)
            self.names = [f"{i:05d}" for i in range(len(self._lmdb))]
        elif self.source.is_dir():
            grid = _run_grid(self.source)  # once, not per file
            self.files = [f for f in list_image_files(self.source) if f != grid]
            self.names = unique_names([f.relative_to(self.source) for f in self.files])
        elif self.source.is_file():
            self.files, self.names = [self.source], [self.source.stem]
        else:
            raise FileNotFoundError(f"reference source not found: {self.source}")
        if not self.names:
            raise NoImages(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.source}")
        self.image_size = int(image_size or _first_size(self.files, self.source))

    def __len__(self) -> int:
        return len(self.names)

    def origin(self, index: int) -> str:
        """Where item ``index`` comes from: the file path, or ``LMDB[key]``."""
        if self._lmdb is not None:
            return f"{self.source}[{self._lmdb.size}-{index:05d}]"
        return os.fspath(self.files[index])

    def _check(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"reference index {index} out of range for {len(self)} images")
        return index

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check(int(index))
        try:
            data = self._lmdb.read_bytes(index) if self._lmdb is not None else self.files[index]
            image = load_reference(data, self.image_size)
        except (BadImage, OSError, KeyError) as e:
            raise BadImage(f"{self.origin(index)}: {e}") from None
        return {"index": index, "name": self.names[index], "image": image}

    def stamp(self, index: int) -> str | None:
        """``"size:mtime_ns"`` of image ``index``'s file (None: in an LMDB, or unreadable): a rerun
        that finds it unchanged does not read the file again for its :meth:`digest`."""
        if self._lmdb is not None:
            return None
        try:
            stat = self.files[self._check(int(index))].stat()
        except OSError:
            return None
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def digest(self, index: int) -> str | None:
        """SHA-256 of image ``index`` as stored (the file's bytes, or the LMDB record); None when
        it cannot be read. A rerun compares it with the one its outputs were made from."""
        index = self._check(int(index))
        try:
            if self._lmdb is not None:
                return hashlib.sha256(self._lmdb.read_bytes(index)).hexdigest()
            return hashlib.sha256(read_image_file(self.files[index])).hexdigest()
        except (OSError, KeyError, ValueError):
            return None

    def try_get(self, index: int) -> tuple[dict[str, Any] | None, str | None]:
        """``(item, None)``, or ``(None, reason)`` for an unreadable image; never raises for one."""
        index = self._check(int(index))
        try:
            return self[index], None
        except Exception as e:  # any decode failure is reported, the run goes on
            message = str(e) if isinstance(e, BadImage) else f"{self.origin(index)}: {type(e).__name__}: {e}"
            return None, message


def open_image_source(
    flag: str, source: str | os.PathLike, size: Any = None, kind: type = ReferenceSet, whole: bool = False
) -> Any:
    """``kind(source, size)``; a source without images (an empty folder or LMDB), or with ``whole``
    (FID reads every image) a broken link in it, is a usage error naming ``--flag`` and the file (a
    damaged LMDB stays the reader's error: exit status 1)."""
    try:
        images = kind(source, size)
    except NoImages as err:
        raise UsageError(f"--{flag} {source}: {err}") from None
    if whole and (broken := next((f for f in images.files if not f.exists()), None)) is not None:
        raise UsageError(
            f"--{flag} {source}: {broken}: a broken link (no file at {os.path.realpath(broken)})"
        )
    return images


def collate_references(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch items (``None`` entries, i.e. failed ``try_get``, are dropped).

    -> ``{"index": int64 (B,), "name": list[str], "image": uint8 (B, 3, H, W)}``.
    """
    items = [item for item in items if item is not None]
    if not items:
        empty = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        return {"index": torch.empty(0, dtype=torch.int64), "name": [], "image": empty}
    return default_collate(items)  # ints -> int64 tensor, strs -> list, tensors stacked
