"""Atomic file output: a killed run never leaves a half-written file behind."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..fileio import atomic_open, atomic_write_bytes

__all__ = ["atomic_write_bytes", "save_png", "write_json", "read_json", "create_json_once", "fits"]


def save_png(path: str | Path, image: torch.Tensor) -> None:
    """Save a uint8 (3, H, W) image as PNG, atomically."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"save_png expects uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode()


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_bytes(path, _json_bytes(data))


def create_json_once(path: Path, data: Any) -> None:
    """Write ``path`` unless it exists, atomically and exclusively (``atomic_open(exclusive=True)``):
    of several processes creating it at once, exactly one writes it."""
    with atomic_open(path, "wb", exclusive=True) as handle:
        handle.write(_json_bytes(data))


def read_json(path: str | Path, shape: Any = None) -> Any:
    """The JSON in ``path``; a ValueError naming the file when it is not JSON, or (``shape``) valid
    JSON of another layout than ``shape`` (see :func:`fits`): a damaged file, not a traceback later."""
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
    if shape is not None and not fits(data, shape):
        raise ValueError(f"{path}: damaged (valid JSON, but not the layout ilvr_toolkit writes)")
    return data


def fits(value: Any, shape: Any) -> bool:
    """Whether ``value`` has the layout ``shape``: a type or tuple of types (a bool is no int),
    ``[item]`` a list of such items, ``{str: item}`` an object of such values, ``{"key": shape,
    ...}`` an object whose keys listed there match where present (others are free)."""
    if isinstance(shape, list):
        return isinstance(value, list) and all(fits(item, shape[0]) for item in value)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return False
        if str in shape:
            return all(fits(item, shape[str]) for item in value.values())
        return all(fits(value[key], item) for key, item in shape.items() if key in value)
    return isinstance(value, shape) and (not isinstance(value, bool) or shape is bool)
