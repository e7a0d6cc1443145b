"""Timestep respacing with guided-diffusion's section syntax.

``"100"`` keeps 100 evenly strided steps, ``"10,10,5"`` splits the process into three equal
sections keeping 10, 10 and 5 steps of each, ``"ddim50"`` keeps 50 steps with the integer
stride DDIM uses. The respaced process keeps alpha_bar at the kept steps and re-derives
beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}; the network always receives the original
timesteps (``timestep_map``).
"""

import re

import torch

_COUNTS = re.compile(r"\d+(\s*,\s*\d+)*")


def _ddim_stride_steps(num_steps: int, desired: int) -> list[int]:
    for stride in range(1, num_steps):
        steps = list(range(0, num_steps, stride))
        if len(steps) == desired:
            return steps
    raise ValueError(f"cannot keep exactly {desired} of {num_steps} steps with an integer stride")


def _section_steps(start: int, size: int, count: int) -> list[int]:
    if not 1 <= count <= size:
        raise ValueError(f"cannot keep {count} steps from a section of {size}")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    # Python's round (half to even) on the accumulated float stride, as guided-diffusion does.
    steps, position = [], 0.0
    for _ in range(count):
        steps.append(start + round(position))
        position += stride
    return steps


def parse_respacing(spec: str) -> tuple[list[int], bool]:
    """A respacing string as ``(counts, ddim)``: ``"100"`` -> ([100], False), ``"10,20,30"`` ->
    ([10, 20, 30], False), ``"ddim50"`` (or ``"ddim 50"``) -> ([50], True), ``""`` -> ([], False)
    (every step). Anything else (another word, a sign, a count 0, ``ddim`` with several counts) is
    a ValueError ``not step counts``; whether the process has that many steps is
    :func:`space_timesteps`'s to say."""
    spec = spec.strip()
    ddim = spec.startswith("ddim")
    body = spec[len("ddim") :].strip() if ddim else spec
    counts = [int(n) for n in body.split(",")] if _COUNTS.fullmatch(body) else []
    if spec and (not counts or 0 in counts or (ddim and len(counts) > 1)):
        raise ValueError("not step counts")
    return counts, ddim


def space_timesteps(num_steps: int, section_counts: str | list[int] | int) -> list[int]:
    """Sorted original timesteps kept by ``section_counts`` (see module docstring; "" keeps all)."""
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        section_counts, ddim = parse_respacing(section_counts)
        if not section_counts:
            return list(range(num_steps))
        if ddim:
            return _ddim_stride_steps(num_steps, section_counts[0])
    size_per, extra = divmod(num_steps, len(section_counts))
    kept, start = set(), 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        kept.update(_section_steps(start, size, count))
        start += size
    return sorted(kept)


def respace_betas(alphas_cumprod: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Betas (len(kept),) float64 of the process that keeps alpha_bar at the ``kept`` steps."""
    kept_bar = alphas_cumprod[torch.tensor(kept, dtype=torch.long)]
    return 1.0 - kept_bar / torch.cat([kept_bar.new_ones(1), kept_bar[:-1]])
