"""Diffusion mathematics (imports torch only): schedules, respacing, GaussianDiffusion,
noise sources and the DDPM / DDIM sampling loops with per-step hooks."""

from .config import DiffusionConfig
from .gaussian_diffusion import GaussianDiffusion, Net, create_diffusion
from .noise import GeneratorNoise, NoiseSource, PerImageNoise, ReplayNoise
from .respace import respace_betas, space_timesteps
from .sampling import Step, StepHook, ddim_sample, ddpm_sample, diffuse_to, draw_x_T
from .schedules import get_named_beta_schedule

__all__ = ["DiffusionConfig", "GaussianDiffusion", "Net", "create_diffusion", "get_named_beta_schedule"]
__all__ += ["GeneratorNoise", "NoiseSource", "PerImageNoise", "ReplayNoise", "respace_betas"]
__all__ += ["space_timesteps", "Step", "StepHook", "ddim_sample", "ddpm_sample", "diffuse_to", "draw_x_T"]
