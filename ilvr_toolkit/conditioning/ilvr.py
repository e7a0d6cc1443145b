"""ILVR (Choi et al. 2021, Alg. 1) as a per-step sampler hook.

After each reverse step x'_{t-1} ~ p_theta(x_{t-1} | x_t) the hook replaces the low
frequencies of the sample by those of the reference y diffused to the same noise level:

    x_{t-1} = phi_N(y_{t-1}) + (I - phi_N)(x'_{t-1}) = x'_{t-1} + phi_N(y_{t-1} - x'_{t-1})

(phi_N is linear, so one low-pass call does it). ``mode`` picks the noise level of y:

- ``"paper"`` (default): y_{t-1}, the level of the sample the step produced (respaced
  index i-1; the clean reference after the last step).
- ``"official"``: y_t, the level of the step's *input* (respaced index i), as the released
  ilvr_adm code does (a porting slip confirmed by its maintainer, ilvr_adm issue #13).

Steps with respaced index i > range_t are conditioned (the official ``range_t``).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..diffusion.sampling import Step
from .lowpass import LowPass

__all__ = ["ILVR", "resolve_range_t", "reference_index"]

Mode = Literal["paper", "official"]


def resolve_range_t(
    timestep_map: list[int],
    *,
    range_t: int | None = None,
    fraction: float | None = None,
    stop_timestep: int | None = None,
) -> int:
    """The respaced ``range_t`` (steps with index i > range_t are conditioned) from one of:

    - ``range_t``: given directly in respaced steps (official semantics; 0 = every step but
      the last, -1 = every step);
    - ``fraction``: the share of the sampling steps conditioned, counted from x_T
      (1.0 = every step, range_t -1; 0.5 = the first half of the steps; 0 = none);
    - ``stop_timestep``: an original timestep; steps whose input timestep is above it are
      conditioned.
    """
    given = [v is not None for v in (range_t, fraction, stop_timestep)]
    if sum(given) > 1:
        raise ValueError("give at most one of range_t, fraction, stop_timestep")
    num_steps = len(timestep_map)
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"ILVR fraction must lie in [0, 1], got {fraction}")
        return num_steps - round(fraction * num_steps) - 1
    if stop_timestep is not None:
        return sum(1 for t in timestep_map if t <= stop_timestep) - 1
    resolved = 0 if range_t is None else int(range_t)
    if not -1 <= resolved < num_steps:
        raise ValueError(f"range_t={resolved} outside [-1, {num_steps - 1}] for {num_steps} sampling steps")
    return resolved


def reference_index(index: int, mode: Mode) -> int:
    """Respaced index of the noise level the reference gets at step ``index`` (-1 = clean)."""
    if mode == "official":
        return index
    if mode == "paper":
        return index - 1
    raise ValueError(f"ILVR mode must be 'paper' or 'official', got {mode!r}")


class ILVR:
    """Step hook conditioning a batch on ``reference`` (B, C, H, W) in [-1, 1].

    Args:
        reference: the references, one per image of the batch, on the sampling device.
        factor: the down-sampling factor N of phi_N (a divisor of the image size).
        range_t: steps with respaced index > range_t are conditioned (see resolve_range_t).
        mode: "paper" (y_{t-1}) or "official" (y_t); see the module docstring.
        lowpass: a prebuilt operator to share across batches (built here otherwise).
    """

    def __init__(
        self,
        reference: torch.Tensor,
        factor: int,
        range_t: int = 0,
        mode: Mode = "paper",
        lowpass: LowPass | None = None,
    ) -> None:
        reference_index(1, mode)  # validates mode
        self.reference = reference
        self.range_t = range_t
        self.mode: Mode = mode
        self.lowpass = (
            lowpass if lowpass is not None else LowPass(reference.shape[-1], factor, reference.device)
        )
        if self.lowpass.factor != factor or self.lowpass.image_size != reference.shape[-1]:
            raise ValueError("the shared low-pass operator does not match the factor or image size")
        self.lowpass = self.lowpass.to(reference.device)

    def is_conditioned(self, index: int) -> bool:
        return index > self.range_t

    def diffused_reference(self, step: Step) -> torch.Tensor:
        """y at the noise level this mode assigns to ``step`` (B, C, H, W)."""
        level = reference_index(step.index, self.mode)
        if level < 0:
            return self.reference
        eps = step.noise(self.reference.shape, self.reference.device, self.reference.dtype)
        t = torch.full((self.reference.shape[0],), level, device=self.reference.device, dtype=torch.long)
        return step.diffusion.q_sample(self.reference, t, eps)

    def __call__(self, step: Step) -> torch.Tensor | None:
        if not self.is_conditioned(step.index):
            return None
        y = self.diffused_reference(step)
        x = step.x_prev
        return x + self.lowpass(y.to(x.dtype) - x)
