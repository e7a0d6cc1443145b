"""Linear operators P for the projection step besides phi_N (``LowPass``): masks, grayscale and
their composition. Each maps (B, C, H, W) -> (B, C, H, W), keeps its constants as buffers (moved
once by ``.to(device, dtype)``) and allocates nothing per call beyond its output.

Mask and Grayscale are orthogonal projections (P = P^2 = P^T); a composition of commuting
idempotents (e.g. a mask and grayscale) is again idempotent. phi_N is not (D @ U != I).
"""

import torch

__all__ = ["Mask", "Grayscale", "Compose"]


class Mask(torch.nn.Module):
    """P(x) = m * x for a mask m (1 or B, 1, H, W) with values in {0, 1} (1 = kept)."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        if mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(f"a mask is (1 or B, 1, H, W), got {tuple(mask.shape)}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask values must be 0 or 1")
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """m * x for x (B, C, H, W) -> (B, C, H, W) (the mask broadcast over channels)."""
        return x * self.mask.to(x.dtype)


class Grayscale(torch.nn.Module):
    """P(x) = the per-pixel mean over channels, broadcast back to every channel (a view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The channel mean of x (B, C, H, W), expanded back to (B, C, H, W)."""
        return x.mean(dim=1, keepdim=True).expand_as(x)


class Compose(torch.nn.Sequential):
    """P = P_k o ... o P_1 for ``Compose(P_1, ..., P_k)``: applied in the given order."""
