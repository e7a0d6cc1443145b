"""How faithful a translation is to its reference, as EGSDE/SDDM report it: on RGB in [0, 1], per
image, averaged, torchmetrics in float64: ``ssim`` (Gaussian 11, sigma 1.5), ``psnr`` (capped per
image at :data:`PSNR_CAP_DB`: JSON has no infinity), ``l2`` (EGSDE's ``torch.norm(s - t)``), and
what torchmetrics lacks: ``ssim_lowpass`` / ``psnr_lowpass`` after ILVR's phi_N (``LowPass``),
``ssim_kept`` / ``psnr_kept`` after a task's P (a mask...), on both images: what P promises to keep."""

from typing import Any

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.image import PeakSignalNoiseRatio as PSNR
from torchmetrics.image import StructuralSimilarityIndexMeasure as SSIM

from ilvr_toolkit.conditioning.lowpass import LowPass

PSNR_CAP_DB = 100.0  # one 8-bit level off in one value of 3x256x256 is 100.9 dB: 'identical'


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> x / 255; float (taken to be in [-1, 1]) -> (x + 1) / 2; float64."""
    return images.double() / 255.0 if images.dtype == torch.uint8 else (images.double() + 1.0) / 2.0


def _metric(name: str) -> Metric:
    if name.startswith("ssim"):
        return SSIM(data_range=1.0)
    return PSNR(1.0, reduction="none", dim=(1, 2, 3)) if name.startswith("psnr") else MeanMetric()


class FaithfulnessMetrics:
    """SSIM / PSNR / L2 of (output, reference) pairs; ILVR's ``factor`` N adds the low-pass variants
    (need ``image_size``, the side of the square images), ``operator`` P (moved to float64) the kept ones."""

    def __init__(
        self,
        image_size: int | None = None,
        factor: int | None = None,
        device: str = "cpu",
        operator: torch.nn.Module | None = None,
    ):
        self.device, self.factor = torch.device(device), factor
        if factor is not None and image_size is None:
            raise ValueError("the low-pass metrics need image_size")
        self.lowpass = LowPass(image_size, factor, self.device, torch.float64) if factor is not None else None
        views = {"_lowpass": self.lowpass, "_kept": operator}
        self.views = {k: op.to(self.device, torch.float64) for k, op in views.items() if op is not None}
        names = ["ssim", "psnr", "l2"] + [metric + k for k in self.views for metric in ("ssim", "psnr")]
        # .to() first: it resets the dtype to float32
        self.metrics = {name: _metric(name).to(self.device).set_dtype(torch.float64) for name in names}

    def update(self, outputs: torch.Tensor, references: torch.Tensor) -> None:
        """outputs, references: (B, 3, H, W), uint8 or float in [-1, 1]; item i of each is a pair."""
        if outputs.shape != references.shape:
            raise ValueError(f"outputs {tuple(outputs.shape)} != references {tuple(references.shape)}")
        x, y = to_unit_range(outputs.to(self.device)), to_unit_range(references.to(self.device))
        self.metrics["l2"].update((x - y).flatten(1).norm(dim=1))
        views = [("", x, y)] + [(suffix, op(x), op(y)) for suffix, op in self.views.items()]
        for suffix, a, b in views:
            self.metrics["ssim" + suffix].update(a, b)
            self.metrics["psnr" + suffix].update(a, b)

    def compute(self) -> dict[str, Any]:
        out = {k: m.compute() for k, m in self.metrics.items()}
        out = {k: float(v.clamp(max=PSNR_CAP_DB).mean() if k[:4] == "psnr" else v) for k, v in out.items()}
        return {**out, "lowpass_factor": self.factor} if self.factor is not None else out
