"""How faithful a translation is to its reference: SSIM, PSNR and L2, as EGSDE/SDDM report them.

All on RGB in [0, 1] (uint8 / 255, or (x + 1) / 2 for float images in [-1, 1]), per image,
then averaged over images:

- ``ssim``: torchmetrics SSIM (Gaussian window 11, sigma 1.5, data_range 1);
- ``psnr``: torchmetrics PSNR per image (data_range 1), each capped at :data:`PSNR_CAP_DB`
  (identical images would be +inf, and JSON has no infinity);
- ``l2``: the Euclidean norm of the difference of the two whole images (EGSDE's ``L2``:
  ``torch.norm(s - t)`` of two 3x256x256 tensors in [0, 1]);
- ``ssim_lowpass`` / ``psnr_lowpass``: the same after the low-pass phi_N of ILVR applied to
  both images -- exactly ``ilvr_toolkit.conditioning.lowpass.LowPass``, the operator the
  sampler uses -- i.e. how well the translation keeps what ILVR promises to keep.

The metric objects are torchmetrics ``Metric`` s, so under torch.distributed ``compute``
gathers every process's images.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ilvr_toolkit.conditioning.lowpass import LowPass

__all__ = ["PSNR_CAP_DB", "FaithfulnessMetrics", "to_unit_range"]

PSNR_CAP_DB = 100.0
"""PSNR reported for identical images (and the cap of every per-image PSNR). Two 8-bit images
differing by one level in one value out of 3x256x256 are at 100.9 dB: anything at the cap is
'identical up to less than one quantisation step'."""


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> /255; float (taken to be in [-1, 1]) -> (x + 1) / 2; float64 out."""
    if images.dtype == torch.uint8:
        return images.double() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {images.dtype}")
    return (images.double() + 1.0) / 2.0


def _float64(metric, device: torch.device):
    # .to() first: torchmetrics' .to() resets the metric's dtype to the default (float32)
    return metric.to(device).set_dtype(torch.float64)


def _psnr(device: torch.device) -> PeakSignalNoiseRatio:
    return _float64(PeakSignalNoiseRatio(data_range=1.0, reduction="none", dim=(1, 2, 3)), device)


def _ssim(device: torch.device) -> StructuralSimilarityIndexMeasure:
    return _float64(StructuralSimilarityIndexMeasure(data_range=1.0), device)


class FaithfulnessMetrics:
    """Accumulates SSIM / PSNR / L2 of (output, reference) pairs; ``factor`` adds the low-pass variants.

    Args:
        image_size: side of the (square) images; needed for the low-pass operator.
        factor: ILVR's N (None: full-resolution metrics only).
        device: where the computation happens.
    """

    def __init__(
        self, image_size: int | None = None, factor: int | None = None, device: torch.device | str = "cpu"
    ):
        self.device = torch.device(device)
        self.factor = factor
        self.ssim, self.psnr = _ssim(self.device), _psnr(self.device)
        self.l2 = _float64(MeanMetric(), self.device)
        self.lowpass: LowPass | None = None
        if factor is not None:
            if image_size is None:
                raise ValueError("the low-pass metrics need image_size")
            self.lowpass = LowPass(image_size, factor, device=self.device, dtype=torch.float64)
            self.ssim_lowpass, self.psnr_lowpass = _ssim(self.device), _psnr(self.device)

    def _metrics(self) -> list:
        extra = [self.ssim_lowpass, self.psnr_lowpass] if self.lowpass is not None else []
        return [self.ssim, self.psnr, self.l2, *extra]

    def update(self, outputs: torch.Tensor, references: torch.Tensor) -> None:
        """outputs, references: (B, 3, H, W), uint8 or float in [-1, 1]; item i of each is a pair."""
        if outputs.shape != references.shape:
            raise ValueError(
                f"outputs {tuple(outputs.shape)} and references {tuple(references.shape)} differ in shape"
            )
        x = to_unit_range(outputs.to(self.device))
        y = to_unit_range(references.to(self.device))
        self.ssim.update(x, y)
        self.psnr.update(x, y)
        self.l2.update((x - y).flatten(1).norm(dim=1))
        if self.lowpass is not None:
            lx, ly = self.lowpass(x), self.lowpass(y)
            self.ssim_lowpass.update(lx, ly)
            self.psnr_lowpass.update(lx, ly)

    def compute(self) -> dict[str, float]:
        out = {
            "ssim": float(self.ssim.compute()),
            "psnr": float(self.psnr.compute().clamp(max=PSNR_CAP_DB).mean()),
            "l2": float(self.l2.compute()),
        }
        if self.lowpass is not None:
            out["ssim_lowpass"] = float(self.ssim_lowpass.compute())
            out["psnr_lowpass"] = float(self.psnr_lowpass.compute().clamp(max=PSNR_CAP_DB).mean())
            out["lowpass_factor"] = self.factor
        return out

    def reset(self) -> None:
        for metric in self._metrics():
            metric.reset()
