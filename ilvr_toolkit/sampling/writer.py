"""Atomic file output: a killed run never leaves a half-written file behind."""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..fileio import atomic_write_bytes

__all__ = ["atomic_write_bytes", "save_png", "write_json", "read_json", "create_json_once"]


def save_png(path: str | Path, image: torch.Tensor) -> None:
    """Save a uint8 (3, H, W) image as PNG, atomically."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"save_png expects uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())


def create_json_once(path: Path, data: Any) -> None:
    """Write ``path`` unless it exists, atomically and exclusively (a link of a complete temp file):
    of several processes creating it at once, exactly one writes it. On a filesystem without hard
    links (exFAT, some network mounts) it is still atomic, but two at once may both write it."""
    # atomic_open's temp name (unique across hosts; remove_dead_temps spares it while its writer lives)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{os.getpid()}@{socket.gethostname()}.tmp")
    write_json(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links here
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
