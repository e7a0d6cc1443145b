"""The one place where images cross between uint8 (0..255: files, LMDB, metrics) and float in
[-1, 1] (the diffusion), with rounding (not truncation) on the way out."""

import torch

__all__ = ["to_float", "to_uint8"]


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (..., C, H, W) in 0..255 -> float in [-1, 1] (same shape)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    return images.to(dtype) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (..., C, H, W) in [-1, 1] -> uint8 in 0..255, rounded to nearest and clamped; uint8 passes."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
