"""The projection step (ILVR, Choi et al. 2021, Alg. 1, with any linear P) as a sampler hook.

After each reverse step x'_{t-1} ~ p_theta(x_{t-1} | x_t) the hook replaces the part of the
sample that P sees by that of the reference y diffused to the same noise level:

    x_{t-1} = P(y_{t-1}) + (I - P)(x'_{t-1}) = x'_{t-1} + P(y_{t-1} - x'_{t-1})

(P is linear, so one call does it). P = phi_N is ILVR; a mask is inpainting by replacement,
the channel mean is colourisation, phi_N of an upsampled image is super-resolution (see
``operators``). ``mode`` picks the noise level of y:

- ``"paper"`` (default): y_{t-1}, the level of the sample the step produced (respaced
  index i-1; the clean reference after the last step, i = 0).
- ``"official"``: y_t, the level of the step's *input* (respaced index i), as the released
  ilvr_adm code does (a porting slip confirmed by its maintainer, ilvr_adm issue #13).

Steps with respaced index i > range_t are conditioned (the official ``range_t``); the last
step has i = 0, so it is conditioned only with range_t = -1 (``fraction=1``).

Guarantee (paper mode, range_t = -1): the last step gives x_0 = x' + P(y - x'), hence
P(x_0) - P(y) = (P - P^2)(x' - y). For idempotent P (Mask, Grayscale, a composition of
commuting ones) P(x_0) = P(y) exactly, up to float rounding (and before the uint8 output
clamps x_0 to [-1, 1]). For phi_N (not idempotent) the bound per image and channel is
||phi_N(x_0) - phi_N(y)||_F <= ||phi_N - phi_N^2||_2 ||x' - y||_F, the operator norm of
A (x) A - A^2 (x) A^2 with A = U @ D (``LowPass``), itself <= ||A - A^2||_2 (||A||_2 + ||A||_2^2).
"""

from typing import Literal

import torch

from ..diffusion.sampling import Step, diffuse_to
from .lowpass import LowPass

__all__ = ["ILVR", "Projection", "resolve_range_t", "reference_index"]

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
      (1.0 = every step, range_t -1; 0.5 = the first half of the steps; 0 = none); the number of
      steps is ``round(fraction * num_steps)``, the nearest whole number (a tie to the even one);
    - ``stop_timestep``: an original timestep; steps whose input timestep is above it are
      conditioned.
    """
    if sum(v is not None for v in (range_t, fraction, stop_timestep)) > 1:
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
    if mode not in ("paper", "official"):
        raise ValueError(f"ILVR mode must be 'paper' or 'official', got {mode!r}")
    return index - 1 if mode == "paper" else index


class Projection:
    """Step hook x <- x + P(y_level - x) conditioning a batch on ``reference`` (B, C, H, W).

    Args:
        reference: y in [-1, 1], one per image of the batch, on the sampling device; it is
            diffused with the run's noise source, one draw per conditioned step (none at the
            last step in paper mode, which uses the clean y).
        operator: the linear P, a module (B, C, H, W) -> (B, C, H, W); moved to y's device.
        range_t: steps with respaced index > range_t are conditioned (-1: every step).
        mode: "paper" (y_{t-1}) or "official" (y_t); see the module docstring.
        fraction, stop_timestep: instead of range_t (see :func:`resolve_range_t`), resolved
            against the sampled diffusion's ``timestep_map`` at the first step.
    """

    def __init__(
        self,
        reference: torch.Tensor,
        operator: torch.nn.Module,
        *,
        range_t: int = 0,
        mode: Mode = "paper",
        fraction: float | None = None,
        stop_timestep: int | None = None,
    ) -> None:
        reference_index(1, mode)  # validates mode
        check_reference(reference)
        if not isinstance(operator, torch.nn.Module):
            raise TypeError(
                f"operator: expected a torch.nn.Module (B, C, H, W) -> (B, C, H, W), got {operator!r}"
            )
        self.reference, self.mode, self.operator = reference, mode, operator.to(reference.device)
        if range_t != 0 and (fraction is not None or stop_timestep is not None):
            raise ValueError("give at most one of range_t, fraction, stop_timestep")
        given = {"fraction": fraction, "stop_timestep": stop_timestep}
        self.range = given if fraction is not None or stop_timestep is not None else {"range_t": range_t}
        self.range_t: int | None = range_t if "range_t" in self.range else None  # the last diffusion's
        self._resolved_for: torch.Tensor | None = None

    def diffused_reference(self, step: Step) -> torch.Tensor:
        """y at the noise level this mode assigns to ``step`` (B, C, H, W)."""
        level = reference_index(step.index, self.mode)
        return self.reference if level < 0 else diffuse_to(step.diffusion, self.reference, level, step.noise)

    def is_conditioned(self, index: int) -> bool:
        """Whether the step of respaced ``index`` is conditioned (``range_t`` resolved)."""
        return index > self.range_t

    def __call__(self, step: Step) -> torch.Tensor | None:
        """The new sample x_prev + P(y_level - x_prev) (B, C, H, W) for a conditioned step, None
        (x_prev unchanged) for the others; a ValueError when y and the samples differ in shape."""
        timestep_map = step.diffusion.timestep_map
        if self._resolved_for is not timestep_map:  # another diffusion: its own range_t
            self.range_t = resolve_range_t(timestep_map.tolist(), **self.range)  # checked per diffusion
            self._resolved_for = timestep_map
        x = step.x_prev
        if self.reference.shape != x.shape:
            raise ValueError(
                f"reference: shape {tuple(self.reference.shape)}, the samples' is {tuple(x.shape)}"
            )
        if not self.is_conditioned(step.index):
            return None
        return x + self.operator(self.diffused_reference(step).to(x.dtype) - x)


def check_reference(reference: torch.Tensor) -> None:
    """A reference batch y is a float tensor (B, C, H, W) in [-1, 1] (range not checked: a
    sync); a TypeError or ValueError naming ``reference`` otherwise."""
    if not isinstance(reference, torch.Tensor) or not reference.is_floating_point():
        got = reference.dtype if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise TypeError(
            f"reference: expected a float tensor (B, C, H, W) in [-1, 1], got {got} (images.to_float converts uint8)"
        )
    if reference.ndim != 4:
        raise ValueError(f"reference: expected (B, C, H, W), got shape {tuple(reference.shape)}")


class ILVR(Projection):
    """ILVR: :class:`Projection` with P = phi_N of ``factor`` N (``lowpass``: a prebuilt one to
    share across batches), ``range_t`` and ``mode`` as there; ``lowpass`` is its operator."""

    def __init__(
        self,
        reference: torch.Tensor,
        factor: int,
        range_t: int = 0,
        mode: Mode = "paper",
        lowpass: LowPass | None = None,
    ) -> None:
        check_reference(reference)
        lowpass = lowpass if lowpass is not None else LowPass(reference.shape[-1], factor, reference.device)
        if lowpass.factor != factor or lowpass.image_size != reference.shape[-1]:
            raise ValueError("the shared low-pass operator does not match the factor or image size")
        super().__init__(reference, lowpass, range_t=range_t, mode=mode)
        self.lowpass = self.operator
