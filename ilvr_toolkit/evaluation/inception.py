"""The Inception-v3 feature extractor of the reference (TensorFlow) FID, loaded offline.

The network is torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port of the 2015-12-05
TensorFlow graph) with ``antialias=False``, i.e. torch-fidelity's bilinear resize that
reproduces TF1's ``resize_bilinear`` -- what the reference FID does. The weights always
come from a file: an explicit path, else the torch hub cache where torch-fidelity would put
its download. Nothing is ever fetched from the network; a missing file raises
:class:`InceptionWeightsMissing` saying what to download and where to put it.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
from torch import nn

from ilvr_toolkit.images import to_uint8

__all__ = [
    "WEIGHTS_FILENAME",
    "WEIGHTS_SHA256_PREFIX",
    "WEIGHTS_URL",
    "InceptionWeightsMissing",
    "InceptionFeatureExtractor",
    "default_weights_path",
    "locate_inception_weights",
    "weights_sha256",
    "as_uint8",
    "write_random_inception_weights",
]

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# torch hub convention: the hex string in the file name is the prefix of the file's sha256.
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILENAME
NUM_FEATURES = 2048


class InceptionWeightsMissing(FileNotFoundError):
    """The FID Inception weights are not on disk (and will not be downloaded)."""

    def __init__(self, searched: list[Path]):
        self.searched = searched
        where = ", ".join(str(p) for p in searched)
        super().__init__(
            f"FID Inception weights not found (looked for {where}). "
            f"Get {WEIGHTS_FILENAME} (sha256 {WEIGHTS_SHA256_PREFIX}...) from {WEIGHTS_URL} "
            f"on a machine with internet access, then put it at {default_weights_path()} "
            f"(the torch hub cache, $TORCH_HOME/hub/checkpoints/) or pass its path with "
            f"--inception-weights / inception_weights=. Nothing is downloaded at run time."
        )


def default_weights_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (torch.hub.get_dir())."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def locate_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use: ``path`` if given (must exist), else the torch hub cache file."""
    candidate = Path(path).expanduser() if path is not None else default_weights_path()
    if not candidate.is_file():
        raise InceptionWeightsMissing([candidate])
    return candidate


def weights_sha256(path: str | os.PathLike | None = None) -> str:
    """sha256 of the weights file (located as by :func:`locate_inception_weights`), without loading it."""
    digest = hashlib.sha256()
    with open(locate_inception_weights(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images pass through; float images are taken to be in [-1, 1] and quantised with rounding."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {images.dtype}")
    return to_uint8(images)


class InceptionFeatureExtractor(nn.Module):
    """uint8 images (B, 3, H, W) -> 2048-d pool3 features (B, 2048), float64.

    Attributes:
        sha256: hex digest of the weights file (part of every statistics cache key).
        official: whether the file is the released TF-FID port (its sha256 has the published prefix);
            FIDs from other weights are not comparable with published numbers.
    """

    num_features = NUM_FEATURES

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        # imported here so that importing the package does not import torch-fidelity
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = locate_inception_weights(weights_path)
        data = path.read_bytes()
        self.weights_path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.official = self.sha256.startswith(WEIGHTS_SHA256_PREFIX)
        if weights_path is None and path.name == WEIGHTS_FILENAME and not self.official:
            raise ValueError(
                f"{path} has sha256 {self.sha256[:8]}..., expected {WEIGHTS_SHA256_PREFIX}...: "
                "the file is corrupt or not the released weights; delete it and fetch it again."
            )
        # torch-fidelity loads the file with weights_only=False. Check the very same bytes with the
        # safe loader first (plain tensors only), then hand them over from memory: no second read
        # of the path, and never a network call (the URL is used only when no file is given).
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(NUM_FEATURES)],
            feature_extractor_weights_path=io.BytesIO(data),  # type: ignore[arg-type]
            antialias=False,
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        """Always in evaluation mode (BatchNorm running statistics are part of the metric)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (B, 3, H, W) in 0..255, or float in [-1, 1] (quantised here with rounding)."""
        x = as_uint8(images)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        device = next(self.parameters()).device
        # The reference FID runs in float32: never under an outer autocast (bf16/fp16 features).
        with torch.autocast(device_type=device.type, enabled=False):
            features = self.net(x.to(device))
        return features.double()


# --- random weights with the real architecture, for tests and benchmarks -------------------


class _InceptionSkeleton(nn.Module):
    """torch-fidelity's FeatureExtractorInceptionV3 layer layout, without its weight loading.

    Only used to produce a state dict of the right names and shapes; the strict
    ``load_state_dict`` inside the real module checks that the two layouts agree.
    """

    def __init__(self):
        super().__init__()
        from torch_fidelity import feature_extractor_inceptionv3 as tf

        self.Conv2d_1a_3x3 = tf.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = tf.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = tf.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = tf.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = tf.BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = tf.InceptionA(192, pool_features=32)
        self.Mixed_5c = tf.InceptionA(256, pool_features=64)
        self.Mixed_5d = tf.InceptionA(288, pool_features=64)
        self.Mixed_6a = tf.InceptionB(288)
        self.Mixed_6b = tf.InceptionC(768, channels_7x7=128)
        self.Mixed_6c = tf.InceptionC(768, channels_7x7=160)
        self.Mixed_6d = tf.InceptionC(768, channels_7x7=160)
        self.Mixed_6e = tf.InceptionC(768, channels_7x7=192)
        self.Mixed_7a = tf.InceptionD(768)
        self.Mixed_7b = tf.InceptionE_1(1280)
        self.Mixed_7c = tf.InceptionE_2(2048)
        self.fc = nn.Linear(2048, 1008)


_LAST_OUTPUTS = (
    "branch1x1",
    "branch3x3_2a",
    "branch3x3_2b",
    "branch3x3dbl_3a",
    "branch3x3dbl_3b",
    "branch_pool",
)


def write_random_inception_weights(
    path: str | os.PathLike, seed: int = 0, feature_gain: float = 10.0
) -> Path:
    """Write an Inception-v3 state dict with random weights (He-normal convs, identity BatchNorm
    except a gain ``feature_gain`` on the outputs of the last block).

    FIDs computed with it are meaningless as numbers but exercise exactly the code path of the
    real weights file: for tests and timing only.
    """
    generator = torch.Generator().manual_seed(seed)
    skeleton = _InceptionSkeleton()
    for module in skeleton.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            # He init keeps activations O(1) through the ~50 ReLU layers (PyTorch's default shrinks them).
            with torch.no_grad():
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
    with torch.no_grad():
        # Random nets give pool3 features that barely vary between images (std ~0.015): scale the
        # last block's outputs (relu(g * x) = g * relu(x)) to the spread of the real network's
        # features, so FIDs are O(1..100) as with real weights, well above float64 round-off.
        for name in _LAST_OUTPUTS:
            getattr(skeleton.Mixed_7c, name).bn.weight.fill_(feature_gain)
        skeleton.fc.weight.normal_(0.0, 2048**-0.5, generator=generator)  # unused by FID/KID
        skeleton.fc.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(skeleton.state_dict(), tmp)
    os.replace(tmp, path)
    return path
