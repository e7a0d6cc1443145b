"""Training of domain DDPMs: LightningModule, callbacks, checkpoint policy and the CLI."""

from .callbacks import ILVRPreview, SampleGrid, TrainingSpeed, generate, sampling_network
from .checkpointing import (
    EMA,
    AtomicCheckpointIO,
    RunCheckpoint,
    atomic_torch_save,
    find_resume_checkpoint,
)
from .fid_monitor import FIDMonitor
from .module import DiffusionModule, resolve_diffusion_config, resolve_unet_config
from .preemption import Preemption

__all__ = [
    "EMA",
    "AtomicCheckpointIO",
    "DiffusionModule",
    "FIDMonitor",
    "ILVRPreview",
    "RunCheckpoint",
    "SampleGrid",
    "Preemption",
    "TrainingSpeed",
    "atomic_torch_save",
    "find_resume_checkpoint",
    "generate",
    "resolve_diffusion_config",
    "resolve_unet_config",
    "sampling_network",
]
