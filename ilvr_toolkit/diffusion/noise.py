"""Explicit sources of Gaussian noise: a sampler never calls ``torch.randn`` itself; every draw (x_T,
each step's noise, a hook's) comes from a ``NoiseSource``, so a run can be replayed draw for draw, or
seeded per image so that an image does not depend on the batch it was computed in."""

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class NoiseSource(Protocol):
    """Where a sampler's Gaussian draws come from: called with the shape, device and dtype of each
    draw, in the order the sampler needs them (x_T, then each step's, and its hooks')."""

    def __call__(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Standard normal noise of ``shape`` (B, ...) on ``device``."""


class GeneratorNoise:
    """Batch-shaped draws from one generator (the official code's global-RNG order)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One draw of ``shape`` from the generator (on its device), moved to ``device``/``dtype``."""
        noise = torch.randn(tuple(shape), generator=self.generator, device=self.generator.device)
        return noise.to(device=device, dtype=dtype)


class PerImageNoise:
    """One generator per image: row b of every draw comes from ``generators[b]`` alone, whatever else
    is in the batch (batch size, number of processes, resumes). Generators may live on the device."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    def __call__(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Noise of ``shape`` (B, ...): row b one draw of ``shape[1:]`` from ``generators[b]``;
        a ValueError when B is not the number of generators."""
        if shape[0] != len(self.generators):
            raise ValueError(f"asked for {shape[0]} images of noise, have {len(self.generators)} generators")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)


class ReplayNoise:
    """Feeds recorded tensors back in the order they were drawn (for fixture tests)."""

    def __init__(self, draws: Sequence[torch.Tensor]) -> None:
        self.draws, self.position = list(draws), 0

    def __call__(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The next recorded draw, which must have ``shape`` (a ValueError otherwise; a
        RuntimeError once every draw is used)."""
        if self.position >= len(self.draws):
            raise RuntimeError(f"replay exhausted after {len(self.draws)} draws")
        draw = self.draws[self.position]
        if tuple(draw.shape) != tuple(shape):
            raise ValueError(
                f"replay draw {self.position} has shape {tuple(draw.shape)}, asked {tuple(shape)}"
            )
        self.position += 1
        return draw.to(device=device, dtype=dtype)

    @property
    def remaining(self) -> int:
        return len(self.draws) - self.position
