"""The task of a run (``--task``, ``--mask``, ``--sdedit``; docs/conditioning.md): its operator P
per factor, its conditioned range, its SDEdit start and its references (super-resolution: the
low-resolution inputs, upsampled once as they are read, so sampler, grid and metrics see one y)."""

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..cli import UsageError
from ..conditioning import Compose, Grayscale, LowPass, Mask
from ..data.references import ReferenceSet, open_image_source
from ..diffusion import GaussianDiffusion
from ..images import to_float, to_uint8
from .config import SampleConfig, SDEditSpec
from .generate import Condition, ilvr_range_t

__all__ = ["load_mask", "run_factors", "run_operators", "reference_set", "sdedit_start", "task_setup"]

#: tasks whose operator P has no factor N: one output set whatever --ilvr.factor says
FACTOR_FREE = ("inpaint", "colorize")


def run_factors(config: SampleConfig, unconditional: bool) -> list[int | None]:
    """The factors N a run makes outputs for: ``[None]`` unconditional or for a task without N."""
    return [None] if unconditional or config.task in FACTOR_FREE else list(config.ilvr.factors)


def check_factors(factors: list[int | None], image_size: int) -> None:
    """Every factor N divides the model's image size, else a usage error naming it."""
    for n in (n for n in factors if n is not None and image_size % n):
        raise UsageError(f"--ilvr.factor {n}: expected a divisor of the model's image size {image_size}")


def load_mask(path: str, image_size: int) -> torch.Tensor:
    """The mask PNG at ``path`` as float (1, 1, H, W) in {0, 1}: white (255) = kept, black = 0."""
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"))
    except (OSError, ValueError) as error:
        raise UsageError(
            f"--mask {path}: not a readable image ({getattr(error, 'strerror', None) or error})"
        ) from None
    if gray.shape != (image_size, image_size):
        got = f"{gray.shape[1]}x{gray.shape[0]}"
        raise UsageError(f"--mask {path}: expected {image_size}x{image_size} (the model's size), got {got}")
    if (grey := np.setdiff1d(gray, [0, 255])).size:
        raise UsageError(f"--mask {path}: expected only black (0) and white (255), found {grey[0]}")
    return torch.from_numpy(gray == 255).float()[None, None]


def run_operators(
    config: SampleConfig, image_size: int, device: torch.device, factors: list[int | None]
) -> dict[int | None, torch.nn.Module]:
    """P of ``config.task`` for each factor N: phi_N (ilvr, superres), the mask (inpaint), the
    channel mean (colorize), the mask after phi_N (local_edit)."""
    mask = Mask(load_mask(config.mask, image_size)).to(device) if config.mask else None
    table = {
        "inpaint": lambda n: mask,
        "colorize": lambda n: Grayscale(),
        "local_edit": lambda n: Compose(LowPass(image_size, n, device), mask),
    }
    return {n: table.get(config.task, lambda n: LowPass(image_size, n, device))(n) for n in factors}


class _Upsampled(ReferenceSet):
    """Super-resolution inputs: read at image_size / N, returned as y = up_N(z), uint8."""

    def __init__(self, source: str, lowpass: LowPass) -> None:
        super().__init__(source, lowpass.image_size // lowpass.factor)
        self.lowpass = lowpass

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        return {**item, "image": to_uint8(self.lowpass.up(to_float(item["image"])))}


def reference_set(config: SampleConfig, image_size: int) -> ReferenceSet:
    """The run's references y at ``image_size`` (superres: the upsampled low-resolution inputs)."""
    if config.task == "superres":
        check_factors(config.ilvr.factors, image_size)
        lowpass = LowPass(image_size, config.ilvr.factors[0])
        return open_image_source("references", config.references, lowpass, _Upsampled)
    return open_image_source("references", config.references, image_size)


def sdedit_start(spec: SDEditSpec, num_steps: int) -> int | None:
    """The respaced start index k of ``spec``, None for the full run (k = num_steps - 1)."""
    k = spec.start_index if spec.strength is None else max(round(spec.strength * num_steps), 1) - 1
    if k is not None and k >= num_steps:
        raise UsageError(f"--sdedit.start_index {k}: the sampler has steps 0..{num_steps - 1}")
    return None if k is None or k == num_steps - 1 else k


def task_setup(
    config: SampleConfig, image_size: int, diffusion: GaussianDiffusion, device: torch.device, factors: list
) -> Callable[[torch.Tensor, int | None], Condition]:
    """``condition(references, N)``: the Condition of a batch of uint8 references (B, 3, H, W)
    for factor N (P, the resolved range, mode, SDEdit start: fixed once per run). The task
    settings are among the run's settings a rerun must match (``manifest.check_same_run``)."""
    check_factors(factors, image_size)
    operators = run_operators(config, image_size, device, factors)
    try:
        range_t, mode = ilvr_range_t(config.ilvr, diffusion, config.task), config.ilvr.mode
    except ValueError as error:
        raise UsageError(f"--ilvr.range_t {config.ilvr.range_t}: {error}") from None
    start = sdedit_start(config.sdedit, diffusion.num_timesteps)
    return lambda reference, n: Condition(reference, operators[n], range_t, mode, start)
