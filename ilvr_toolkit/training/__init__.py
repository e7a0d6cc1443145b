"""Training of domain DDPMs: LightningModule, callbacks, checkpoint policy and the CLI.

Helpers used inside the package (``AtomicCheckpointIO``, ``OptimConfig``, ``sampling_weights``
...) are imported from their modules."""

from .callbacks import ILVRPreview, SampleGrid, sample_images
from .checkpointing import EMA, RunCheckpoint, find_resume_checkpoint
from .fid_monitor import FIDMonitor, FIDReference
from .module import DiffusionModule, resolve_unet_config
from .preemption import Preemption

__all__ = [
    "EMA",
    "DiffusionModule",
    "FIDMonitor",
    "FIDReference",
    "ILVRPreview",
    "Preemption",
    "RunCheckpoint",
    "SampleGrid",
    "find_resume_checkpoint",
    "resolve_unet_config",
    "sample_images",
]
