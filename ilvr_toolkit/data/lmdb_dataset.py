"""Reading LMDB image datasets (ours and rosinality's) as uint8 CHW tensors."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from ilvr_toolkit.data.lmdb_format import LMDBInfo, image_key, open_lmdb, read_info

__all__ = ["LMDBImageDataset", "decode_bytes"]


def decode_bytes(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Encoded PNG/JPEG/WebP/... bytes -> uint8 (3, H, W) RGB tensor (torchvision.io)."""
    if not isinstance(data, bytearray):
        data = bytearray(data)  # writable, so torch.frombuffer shares it without a warning
    return decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)


class LMDBImageDataset(Dataset):
    """Images of one size from an LMDB dataset: ``ds[i]`` is uint8 (3, size, size).

    With ``return_index`` an item is ``(image, i)``. ``flip`` mirrors horizontally with
    probability 1/2 (torch's RNG, which DataLoader seeds per worker).

    The LMDB is opened lazily and shared per process (``open_lmdb``); pickling drops the
    handle, so the dataset works with fork, spawn and forkserver DataLoader workers.
    """

    def __init__(self, path: str | Path, size: int, flip: bool = False, return_index: bool = False):
        self.path = os.fspath(path)
        self.size = int(size)
        self.flip = flip
        self.return_index = return_index
        self.info: LMDBInfo = read_info(self.path)
        if self.size not in self.info.sizes:
            available = ", ".join(map(str, self.info.sizes)) or "none"
            raise ValueError(f"{self.path} has no images of size {self.size}; sizes available: {available}")
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.info.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None, "_pid": None}

    def _environment(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = open_lmdb(self.path), os.getpid()
        return self._env

    def read_bytes(self, index: int) -> bytearray:
        """The stored (encoded) image ``index`` at this dataset's size (one copy out of the map)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        with self._environment().begin(buffers=True) as txn:
            data = txn.get(image_key(self.size, index))
            if data is None:
                raise KeyError(f"{self.path}: key {image_key(self.size, index)!r} missing")
            return bytearray(data)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        index = int(index)
        if index < 0:
            index += len(self)
        image = decode_bytes(self.read_bytes(index))
        if image.shape[1:] != (self.size, self.size):
            raise ValueError(
                f"{self.path}: image {index} is {image.shape[2]}x{image.shape[1]}, "
                f"expected {self.size}x{self.size} (key {image_key(self.size, index)!r})"
            )
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image, index) if self.return_index else image
