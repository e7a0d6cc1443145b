"""Beta schedules, float64, defined exactly as guided-diffusion defines them."""

import math
from collections.abc import Callable

import torch


def betas_for_alpha_bar(
    num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> torch.Tensor:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), i = 0..T-1 (float64)."""
    n = num_steps
    betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


def get_named_beta_schedule(name: str, num_steps: int) -> torch.Tensor:
    """The (T,) float64 betas of schedule ``name`` in {"linear", "cosine"}.

    ``linear``: Ho et al.'s 1e-4 .. 0.02 for T = 1000, rescaled by 1000 / T so that other T
    keep the same overall noise (valid for T >= 21: beta_T = 20 / T). ``cosine``: Nichol & Dhariwal's alpha_bar(t) =
    cos^2((t + 0.008) / 1.008 * pi / 2), betas capped at 0.999.
    """
    if name == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=torch.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")
