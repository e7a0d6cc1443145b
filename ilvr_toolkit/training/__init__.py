"""Training of domain DDPMs: LightningModule, callbacks, checkpoint policy and the CLI."""

from .callbacks import ILVRPreview, SampleGrid, sample_images, sampling_weights
from .checkpointing import (
    EMA,
    AtomicCheckpointIO,
    RunCheckpoint,
    atomic_torch_save,
    find_resume_checkpoint,
)
from .fid_monitor import FIDMonitor
from .module import DiffusionModule, OptimConfig, resolve_diffusion_config, resolve_unet_config
from .preemption import Preemption

__all__ = [
    "EMA",
    "AtomicCheckpointIO",
    "DiffusionModule",
    "FIDMonitor",
    "ILVRPreview",
    "OptimConfig",
    "RunCheckpoint",
    "SampleGrid",
    "Preemption",
    "atomic_torch_save",
    "find_resume_checkpoint",
    "resolve_diffusion_config",
    "resolve_unet_config",
    "sample_images",
    "sampling_weights",
]
