"""Reading LMDB image datasets (ours and rosinality's) as uint8 CHW tensors."""

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ilvr_toolkit.data.imageops import BadImage, load_rgb
from ilvr_toolkit.data.lmdb_format import BadRecord, LMDBInfo, image_key, opened, read_info, reading

__all__ = ["BadRecord", "DatasetReplaced", "LMDBImageDataset", "decode_bytes"]
_LOG = logging.getLogger(__name__)
_SKIP_HINT = "--data.loader.on_bad_record skip skips such records; python -m ilvr_toolkit.data.prepare --verify lists them"


class DatasetReplaced(ValueError):
    """The path holds another LMDB than when the dataset was made (``prepare --overwrite``): its
    length and records no longer match. One line even when re-raised by a DataLoader (as ``BadRecord``)."""

    def __init__(self, message: str):
        super().__init__(message.rstrip().splitlines()[-1].split("DatasetReplaced: ", 1)[-1])


def _identity(data_file: str) -> tuple[int, int]:
    st = os.stat(data_file)
    return st.st_dev, st.st_ino


def decode_bytes(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Encoded PNG/JPEG/WebP/... bytes -> uint8 (3, H, W) RGB (``imageops.load_rgb``; ``BadImage``
    if damaged). Not torchvision.io: its PNG decoder (0.29) ends the process on a corrupt chunk."""
    return torch.from_numpy(np.array(load_rgb(data))).permute(2, 0, 1)


class LMDBImageDataset(Dataset):
    """Images of one size from an LMDB dataset: ``ds[i]`` is uint8 (3, size, size).

    With ``return_index`` an item is ``(image, i)``. ``flip`` mirrors horizontally with
    probability 1/2 (torch's RNG, which DataLoader seeds per worker).

    A record that does not decode raises ``BadRecord`` (a ValueError) naming its key and index (``on_bad_record``
    "error"), or ("skip") is replaced by the next good index (cyclically, so batches keep their
    size); each process logs every bad record once with its running count (``self.skipped``).

    The LMDB is opened lazily and shared per process (``lmdb_format.reading``), so the dataset
    works with fork, spawn and forkserver DataLoader workers.
    """

    def __init__(
        self,
        path: str | Path,
        size: int,
        flip: bool = False,
        return_index: bool = False,
        on_bad_record: Literal["error", "skip"] = "error",
    ):
        self.path, self.size = os.fspath(path), int(size)
        self.flip, self.return_index, self.on_bad_record = flip, return_index, on_bad_record
        self.skipped: set[int] = set()  # bad indices this process has met
        self._opened: tuple[int, tuple] | None = None  # (pid, lmdb_format.opened(path))
        self.info: LMDBInfo = read_info(self.path)
        self.identity = _identity(opened(self.path)[1])  # data.mdb's; each process checks it on opening
        if self.size not in self.info.sizes:
            available = ", ".join(map(str, self.info.sizes)) or "none"
            raise ValueError(f"{self.path} has no images of size {self.size}; sizes available: {available}")

    def __len__(self) -> int:
        return self.info.length

    def read_bytes(self, index: int) -> bytes:
        """The stored (encoded) image ``index`` at this dataset's size; ``BadRecord`` if damaged."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        if self._opened is None or self._opened[0] != os.getpid():  # first read in this process
            env = opened(self.path)
            if _identity(env[1]) != self.identity:
                raise DatasetReplaced(
                    f"{self.path}: the dataset was replaced while in use (python -m "
                    "ilvr_toolkit.data.prepare --overwrite?); restart the run"
                )
            self._opened = (os.getpid(), env)
        with reading(self._opened[1]) as get:
            if (data := get(image_key(self.size, index))) is None:
                raise KeyError(f"{self.path}: key {image_key(self.size, index)!r} missing")
            return data

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_opened": None}  # an LMDB environment does not pickle (spawn workers)

    def decode(self, index: int) -> torch.Tensor:
        """Image ``index`` as uint8 (3, size, size); ValueError naming key and index if damaged."""
        try:
            image = decode_bytes(self.read_bytes(index))
            if image.shape[1:] != (self.size, self.size):
                raise BadImage(f"is {image.shape[2]}x{image.shape[1]}, expected {self.size}x{self.size}")
        except (KeyError, BadImage) as error:
            problem = "is missing" if isinstance(error, KeyError) else error
            raise BadRecord(
                f"{self.path}: record {image_key(self.size, index)!r} (index {index}) {problem}"
            ) from None
        return image

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        start = int(index) + (len(self) if int(index) < 0 else 0)
        for step in range(max(1, len(self))):  # "skip": the next index that decodes, cyclically
            index = (start + step) % len(self) if step else start
            try:
                image = self.decode(index)
                break
            except BadRecord as error:
                if self.on_bad_record == "error" or step == len(self) - 1:
                    raise BadRecord(f"{error}; {_SKIP_HINT}") from None
                if index not in self.skipped:
                    self.skipped.add(index)
                    _LOG.warning("%s: skipped (%d so far)", error, len(self.skipped))
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image, index) if self.return_index else image
