"""ADM UNet with guided-diffusion state-dict names, its configs/presets and checkpoint I/O."""

from .checkpoint import (
    CheckpointError,
    LoadedModel,
    check_state_dict,
    load_model,
    load_state_dict_file,
    save_model_file,
    save_plain_state_dict,
    sha256_file,
)
from .config import PRESETS, RELEASED_CHECKPOINTS, UNetConfig, get_preset
from .unet import UNetModel, build_unet

__all__ = [
    "PRESETS",
    "RELEASED_CHECKPOINTS",
    "CheckpointError",
    "LoadedModel",
    "UNetConfig",
    "UNetModel",
    "build_unet",
    "check_state_dict",
    "get_preset",
    "load_model",
    "load_state_dict_file",
    "save_model_file",
    "save_plain_state_dict",
    "sha256_file",
]
