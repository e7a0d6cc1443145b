"""Training of domain DDPMs: LightningModule, callbacks, checkpoint policy and the CLI.
Helpers used inside the package (``AtomicCheckpointIO``, ``OptimConfig``...) are imported from their modules."""

from .callbacks import ILVRPreview, SampleGrid, sample_images
from .checkpointing import EMA, RunCheckpoint, find_resume_checkpoint
from .fid_monitor import FIDMonitor, FIDReference
from .module import DiffusionModule, resolve_unet_config
from .preemption import Preemption

__all__ = ["ILVRPreview", "SampleGrid", "sample_images", "EMA", "RunCheckpoint", "find_resume_checkpoint"]
__all__ += ["FIDMonitor", "FIDReference", "DiffusionModule", "resolve_unet_config", "Preemption"]
