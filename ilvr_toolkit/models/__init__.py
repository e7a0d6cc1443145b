"""ADM UNet with guided-diffusion state-dict names, its configs/presets and checkpoint I/O, guided-diffusion flags."""

from ..flags import diffusion_settings, parse_flags
from .checkpoint import (
    ArchitectureMismatch,
    ArchitectureNotGiven,
    CheckpointError,
    LoadedModel,
    check_checkpoint_file,
    check_state_dict,
    load_model,
    load_state_dict_file,
    save_model_file,
    save_plain_state_dict,
    sha256_file,
)
from .config import PRESET_FLAGS, PRESETS, RELEASED_CHECKPOINTS, UNetConfig, get_preset
from .unet import UNetModel, build_unet

__all__ = ["diffusion_settings", "parse_flags", "CheckpointError", "LoadedModel", "check_state_dict"]
__all__ += ["load_model", "load_state_dict_file", "save_model_file", "save_plain_state_dict", "sha256_file"]
__all__ += ["PRESET_FLAGS", "PRESETS", "RELEASED_CHECKPOINTS", "UNetConfig", "get_preset", "UNetModel"]
__all__ += ["build_unet", "check_checkpoint_file", "ArchitectureNotGiven", "ArchitectureMismatch"]
