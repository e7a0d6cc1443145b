"""The one generation path: ``sample.py``, training previews and the FID monitor call
:func:`generate` with per-image seeds from :func:`~ilvr_toolkit.sampling.seeds.image_seed`,
so a preview image is the image ``sample.py`` writes for the same weights and settings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..conditioning import ILVR, LowPass, resolve_range_t
from ..diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    PerImageNoise,
    create_diffusion,
    ddim_sample,
    ddpm_sample,
    draw_x_T,
)
from ..images import to_float, to_uint8
from .config import ILVRSpec, SamplerSpec
from .seeds import image_generators

__all__ = ["Condition", "generate", "ilvr_range_t", "sampling_diffusion"]


@dataclass
class Condition:
    """ILVR conditioning of one batch.

    Attributes:
        reference: uint8 (B, 3, H, W), one reference per image of the batch.
        lowpass: phi_N (its ``factor`` is N), on the sampling device.
        range_t: respaced steps with index > range_t are conditioned (``resolve_range_t``).
        mode: ``paper`` (y_{t-1}) or ``official`` (y_t).
    """

    reference: torch.Tensor
    lowpass: LowPass
    range_t: int
    mode: str = "paper"


def sampling_diffusion(config: DiffusionConfig, sampler: SamplerSpec) -> GaussianDiffusion:
    """``config`` respaced as ``sampler`` says; ``respacing`` None: the model's own
    ``timestep_respacing`` (flags / checkpoint) if it has one, else 100 steps. The one rule
    for sample.py, training previews and the FID monitor."""
    spec = sampler.respacing
    return create_diffusion(config, respacing=(config.timestep_respacing or "100") if spec is None else spec)


def ilvr_range_t(spec: ILVRSpec, diffusion: GaussianDiffusion) -> int:
    """The respaced ``range_t`` of ``spec`` (range_t, fraction or stop_timestep) for ``diffusion``."""
    steps = diffusion.timestep_map.tolist()
    return resolve_range_t(
        steps, range_t=spec.range_t, fraction=spec.fraction, stop_timestep=spec.stop_timestep
    )


@torch.no_grad()
def generate(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    seeds: Sequence[int],
    image_size: int,
    device: torch.device,
    sampler: SamplerSpec,
    condition: Condition | None = None,
) -> torch.Tensor:
    """Samples as uint8 (B, 3, H, W) on the CPU, B = ``len(seeds)``.

    Image b draws all its noise (x_T and every step's z) from its own generator seeded
    ``seeds[b]``, so it does not depend on the batch it is computed in. ``net(x, t)`` takes
    original timesteps; ``diffusion`` is already respaced (``sampler.respacing``).
    """
    noise = PerImageNoise(image_generators(seeds, device))
    x_T = draw_x_T(noise, (len(seeds), 3, image_size, image_size), device)
    hooks = []
    if condition is not None:
        reference = to_float(condition.reference).to(device)
        factor = condition.lowpass.factor
        hooks.append(ILVR(reference, factor, condition.range_t, condition.mode, lowpass=condition.lowpass))
    if sampler.method == "ddim":
        x0 = ddim_sample(diffusion, net, x_T, noise=noise, hooks=hooks, eta=sampler.eta)
    else:
        x0 = ddpm_sample(diffusion, net, x_T, noise=noise, hooks=hooks)
    return to_uint8(x0).cpu()
