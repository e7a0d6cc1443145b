"""The Inception-v3 of the reference TensorFlow FID, from a file, never from the network: torchmetrics
gives the network (``NoTrainInceptionV3``, ``antialias=False``: TF1's resize, as the reference FID)
and takes the weights file; ours adds the named error for a missing file, its sha256 (in every
cache key), a ``weights_only`` check of its bytes, float64 features outside autocast."""

import hashlib
import io
import os
from pathlib import Path

import torch
from torch import nn

from ilvr_toolkit.images import to_uint8

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"  # 95,628,359 bytes
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILENAME
NUM_FEATURES = 2048


def default_weights_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (torch.hub.get_dir())."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


class InceptionWeightsMissing(FileNotFoundError):
    """No FID Inception weights file (never downloaded): the message says what, from where, to where."""

    def __init__(self, searched: Path):
        super().__init__(
            f"FID Inception weights not found at {searched}. Get {WEIGHTS_FILENAME} (95,628,359 bytes, sha256 "
            f"{WEIGHTS_SHA256}) from {WEIGHTS_URL} on a machine with internet access and put it at {default_weights_path()} "
            "(the torch hub cache) or pass its path with --inception_weights. Nothing is downloaded at run time."
        )


class InceptionFeatureExtractor(nn.Module):
    """uint8 images (B, 3, H, W) (or float in [-1, 1]) -> pool3 features (B, 2048), float64.

    ``sha256``: the weights file's; ``official``: it is the released file (FIDs comparable with papers)."""

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3  # imports torch-fidelity: only when used

        self.weights_path = Path(weights_path).expanduser() if weights_path else default_weights_path()
        if not self.weights_path.is_file():
            raise InceptionWeightsMissing(self.weights_path)
        data = self.weights_path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.official = self.sha256 == WEIGHTS_SHA256
        if weights_path is None and not self.official:
            raise ValueError(
                f"{self.weights_path}: sha256 {self.sha256}, not {WEIGHTS_SHA256} (the released file): "
                f"replace it with the released file from {WEIGHTS_URL}, or pass --inception_weights "
                f"{self.weights_path} to use it anyway (FID/KID then not comparable with papers)"
            )
        try:  # torch-fidelity loads with weights_only=False: check these bytes with the safe loader first
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError (code or objects), zip errors, EOFError
            raise ValueError(f"{self.weights_path}: not a weights file ({type(error).__name__})") from None
        self.net = NoTrainInceptionV3(
            "inception-v3-compat", [str(NUM_FEATURES)], io.BytesIO(data), antialias=False
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8(images)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        device = next(self.parameters()).device
        with torch.autocast(device_type=device.type, enabled=False):  # the reference FID is float32
            return self.net(x.to(device)).double()
