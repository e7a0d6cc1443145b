"""The one generation path: ``sample.py``, training previews and the FID monitor call
:func:`generate` with per-image seeds from :func:`~ilvr_toolkit.sampling.seeds.image_seed`,
so a preview image is the image ``sample.py`` writes for the same weights and settings."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..conditioning import Projection, resolve_range_t
from ..diffusion import DiffusionConfig, GaussianDiffusion, PerImageNoise, create_diffusion
from ..diffusion.sampling import ddim_sample, ddpm_sample, diffuse_to, draw_x_T
from ..images import to_float, to_uint8
from .config import ILVRSpec, SamplerSpec
from .seeds import image_generators

__all__ = ["Condition", "NonFiniteSamples", "generate", "ilvr_range_t", "sampling_diffusion"]


class NonFiniteSamples(ValueError):
    """Sampling gave NaN or inf (a damaged checkpoint, an overflow): ``images`` holds the batch
    anyway (uint8, non-finite pixels as 0), ``seeds`` the seeds of the images affected."""

    def __init__(self, images: torch.Tensor, seeds: list[int], total: int):
        super().__init__(
            f"sampling gave NaN/inf pixels in {len(seeds)} of {total} images (seed {seeds[0]}"
            f"{', ...' if len(seeds) > 1 else ''}): check the checkpoint's weights and --precision"
        )
        self.images, self.seeds = images, seeds


@dataclass
class Condition:
    """The projection conditioning of one batch (``conditioning.Projection``).

    Attributes:
        reference: uint8 (B, 3, H, W), one reference y per image of the batch.
        operator: P (phi_N for ILVR; ``sampling.tasks.run_operators``), on the sampling device.
        range_t: respaced steps with index > range_t are conditioned (``resolve_range_t``).
        mode: ``paper`` (y_{t-1}) or ``official`` (y_t).
        start_index: SDEdit: start at respaced index k from y diffused to k (None: from x_T).
    """

    reference: torch.Tensor
    operator: torch.nn.Module
    range_t: int
    mode: str = "paper"
    start_index: int | None = None


def sampling_diffusion(config: DiffusionConfig, sampler: SamplerSpec) -> GaussianDiffusion:
    """``config`` respaced as ``sampler`` says; ``respacing`` None: the model's own
    ``timestep_respacing`` (flags / checkpoint) if it has one, else 100 steps. The one rule
    for sample.py, training previews and the FID monitor."""
    spec = sampler.respacing
    return create_diffusion(config, respacing=(config.timestep_respacing or "100") if spec is None else spec)


def ilvr_range_t(spec: ILVRSpec, diffusion: GaussianDiffusion, task: str = "ilvr") -> int:
    """The respaced ``range_t`` of ``spec`` (range_t, fraction or stop_timestep) for ``diffusion``;
    none given: 0 for ILVR (the official default), -1 for the other tasks (P(x_0) = P(y))."""
    given = {k: getattr(spec, k) for k in ("range_t", "fraction", "stop_timestep")}
    if task != "ilvr" and all(v is None for v in given.values()):
        return -1
    return resolve_range_t(diffusion.timestep_map.tolist(), **given)


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

    Image b draws all its noise (x_T, or with an SDEdit start the draw that diffuses its
    reference in x_T's place, then every step's z) from its own generator seeded ``seeds[b]``,
    so it does not depend on the batch it is computed in. ``net(x, t)`` takes original
    timesteps; ``diffusion`` is already respaced (``sampler.respacing``). Raises
    :class:`NonFiniteSamples` when an image holds NaN or inf (instead of a black PNG).
    """
    noise = PerImageNoise(image_generators(seeds, device))
    hooks, start = [], None
    if condition is not None:
        y, start = to_float(condition.reference).to(device), condition.start_index
        hooks.append(Projection(y, condition.operator, range_t=condition.range_t, mode=condition.mode))
    shape = (len(seeds), 3, image_size, image_size)
    x = draw_x_T(noise, shape, device) if start is None else diffuse_to(diffusion, y, start, noise)
    if sampler.method == "ddim":
        x0 = ddim_sample(diffusion, net, x, noise=noise, hooks=hooks, eta=sampler.eta, start_index=start)
    else:
        x0 = ddpm_sample(diffusion, net, x, noise=noise, hooks=hooks, start_index=start)
    bad = (~torch.isfinite(x0)).flatten(1).any(1).tolist()
    if any(bad):
        images = to_uint8(torch.nan_to_num(x0, nan=-1.0)).cpu()
        raise NonFiniteSamples(images, [s for s, b in zip(seeds, bad, strict=True) if b], len(seeds))
    return to_uint8(x0).cpu()
