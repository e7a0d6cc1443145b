"""Image sets to evaluate: a folder, an LMDB dataset, or an explicit list of files.

Images are read with ``ilvr_toolkit.data``'s reference loader, so a set is brought to the
evaluation size exactly as ILVR's references are (guided-diffusion's ``center_crop_arr``; a
no-op for images already at that size). Each set also has an *identity*: what the
statistics cache compares to decide whether the data changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "ImageSet",
    "open_image_set",
    "is_lmdb",
    "dataset_identity",
    "identity_digest",
    "iterate_images",
    "reference_name_for",
    "shard_indices",
]

_SAMPLE_SUFFIX = re.compile(r"(_N\d+)?_s\d+$")


def is_lmdb(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path.is_dir() and (path / "data.mdb").is_file()) or (path.is_file() and path.suffix == ".mdb")


class ImageSet(Dataset):
    """``ds[i]`` -> uint8 (3, S, S); ``names[i]`` the image's name (file stem, or LMDB index)."""

    def __init__(
        self, source: str | os.PathLike | Sequence[str | os.PathLike], image_size: int | None = None
    ):
        from ilvr_toolkit.data.references import ReferenceSet  # evaluation -> data: reading only

        self._files: list[Path] | None = None
        self._references: Any = None
        if isinstance(source, (str, os.PathLike)):
            self.source: str | list[str] = os.fspath(source)
            if image_size is None:
                image_size = _native_size(Path(source))
            self._references = ReferenceSet(source, image_size)
            self.names: list[str] = list(self._references.names)
        else:
            files = [Path(p) for p in source]
            if not files:
                raise ValueError("empty list of image files")
            self.source = [os.fspath(p) for p in files]
            if image_size is None:
                image_size = _native_size(files[0])
            self._files = files
            self.names = [p.stem for p in files]
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._references is not None:
            return self._references[index]["image"]
        from ilvr_toolkit.data.references import load_reference

        return load_reference(self._files[index], self.image_size)

    def identity(self) -> dict[str, Any]:
        return dataset_identity(self.source)


def _native_size(path: Path) -> int:
    """Side of the first image of a folder/file/LMDB (used when no image size is given)."""
    if is_lmdb(path):
        from ilvr_toolkit.data.lmdb_format import read_info

        return max(read_info(path).sizes)
    if path.is_dir():
        from ilvr_toolkit.data.files import list_image_files

        files = list_image_files(path)
        if not files:
            raise ValueError(f"no images in {path}")
        path = files[0]
    from PIL import Image

    with Image.open(path) as img:
        return min(img.size)


def open_image_set(
    source: str | os.PathLike | Sequence[str | os.PathLike] | ImageSet, image_size: int | None = None
) -> ImageSet:
    if isinstance(source, ImageSet):
        return source
    return ImageSet(source, image_size)


def dataset_identity(source: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Any]:
    """What identifies an image set's content cheaply: paths, sizes, mtimes (no pixel hashing).

    - folder: every image file's relative path, byte size and mtime (hashed), and their count;
    - LMDB: the data file's size and mtime (``lock.mdb`` is excluded: readers touch it);
    - list of files: as a folder, over the given paths.
    Any added, removed, rewritten or touched file changes it.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).resolve()
        if is_lmdb(path):
            data = path / "data.mdb" if path.is_dir() else path
            st = data.stat()
            return {"kind": "lmdb", "path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        if path.is_dir():
            from ilvr_toolkit.data.files import list_image_files

            files = list_image_files(path)
            return {"kind": "folder", "path": str(path), **_listing(files, path)}
        return {"kind": "files", "path": str(path), **_listing([path], path.parent)}
    files = [Path(p).resolve() for p in source]
    common = Path(os.path.commonpath([str(p) for p in files])) if files else Path("/")
    if common in files:  # a single file
        common = common.parent
    return {"kind": "files", "path": str(common), **_listing(files, common)}


def _listing(files: list[Path], root: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(
            f"{f.resolve().relative_to(root.resolve()).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
        )
    return {"count": len(files), "listing_sha256": digest.hexdigest()}


def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices of process ``rank``: rank, rank + W, ... (no padding, no duplicates)."""
    return list(range(rank, n, world_size))


def iterate_images(
    images: ImageSet | Dataset,
    batch_size: int,
    indices: Sequence[int] | None = None,
    num_workers: int = 0,
) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, S, S) of ``images`` (optionally only ``indices``), in order."""
    dataset = Subset(images, list(indices)) if indices is not None else images
    if len(dataset) == 0:
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    yield from loader


def reference_name_for(output_name: str) -> str:
    """The reference of output ``<stem>_s<k>`` or ``<stem>_N<N>_s<k>`` is ``<stem>`` (sample.py's naming)."""
    return _SAMPLE_SUFFIX.sub("", output_name)
