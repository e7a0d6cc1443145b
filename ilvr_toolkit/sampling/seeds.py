"""Per-image random streams: an image's noise depends on (run seed, image index, sample index)
only, never on the batch it is computed in, the number of processes, or a resume."""

from collections.abc import Sequence

import numpy as np
import torch


def image_seed(run_seed: int, image_index: int, sample_index: int) -> int:
    """A 63-bit seed mixed from the three integers by numpy's SeedSequence (well spread:
    neighbouring images get unrelated streams)."""
    state = np.random.SeedSequence([run_seed, image_index, sample_index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def image_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per seed, living on ``device`` (so draws need no host-device copy)."""
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
