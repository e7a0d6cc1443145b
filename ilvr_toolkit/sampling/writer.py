"""Atomic file output: a killed run never leaves a half-written file behind."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..fileio import atomic_open, atomic_write_bytes

__all__ = ["atomic_write_bytes", "save_png", "write_json", "read_json", "create_json_once"]


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


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
