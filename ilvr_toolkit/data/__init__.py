"""Datasets (datasets/README.md): the LMDB converter, the LMDB reader and DataModule, reference
images. Names are imported on first use, so the converter (CLI and its worker processes) never
imports torch, and DataLoader workers started with "spawn" do not import Lightning."""

import importlib
from typing import Any

_SOURCES = {
    "datamodule": ["ImageDataModule", "LoaderOptions"],
    "files": ["IMAGE_EXTENSIONS", "list_image_files", "unique_names"],
    "imageops": ["BadImage", "load_rgb"],
    "lmdb_dataset": ["LMDBImageDataset", "decode_bytes"],
    "lmdb_format": ["LMDBInfo", "image_key", "open_lmdb", "read_info", "read_names"],
    "prepare": ["BuildReport", "BuildSettings", "build_lmdb"],
    "references": ["ReferenceSet", "center_crop_arr", "collate_references", "load_reference"],
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if (module := _MODULE_OF.get(name)) is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
