"""Datasets: the LMDB converter (``python -m ilvr_toolkit.data.prepare``), the LMDB reader and
DataModule for training, and ILVR reference-image loading. See datasets/README.md.

Names are imported on first use, so the converter (CLI and its worker processes) never
imports torch, and DataLoader workers started with "spawn" do not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ilvr_toolkit.data.datamodule import ImageDataModule, LoaderOptions
    from ilvr_toolkit.data.files import IMAGE_EXTENSIONS, list_image_files, unique_names
    from ilvr_toolkit.data.imageops import BadImage
    from ilvr_toolkit.data.lmdb_dataset import LMDBImageDataset, decode_bytes
    from ilvr_toolkit.data.lmdb_format import LMDBInfo, image_key, open_lmdb, read_info, read_names
    from ilvr_toolkit.data.prepare import BuildReport, BuildSettings, build_lmdb
    from ilvr_toolkit.data.references import ReferenceSet, center_crop_arr, collate_references, load_reference

_SOURCES = {
    "datamodule": ["ImageDataModule", "LoaderOptions"],
    "files": ["IMAGE_EXTENSIONS", "list_image_files", "unique_names"],
    "imageops": ["BadImage"],
    "lmdb_dataset": ["LMDBImageDataset", "decode_bytes"],
    "lmdb_format": ["LMDBInfo", "image_key", "open_lmdb", "read_info", "read_names"],
    "prepare": ["BuildReport", "BuildSettings", "build_lmdb"],
    "references": ["ReferenceSet", "center_crop_arr", "collate_references", "load_reference"],
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImage",
    "BuildReport",
    "BuildSettings",
    "ImageDataModule",
    "LMDBImageDataset",
    "LMDBInfo",
    "LoaderOptions",
    "ReferenceSet",
    "build_lmdb",
    "center_crop_arr",
    "collate_references",
    "decode_bytes",
    "image_key",
    "list_image_files",
    "load_reference",
    "open_lmdb",
    "read_info",
    "read_names",
    "unique_names",
]
assert sorted(__all__) == sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
