"""What a run has to produce: one work item per output image, sharded and resumable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .seeds import image_seed

__all__ = ["WorkItem", "plan_items", "shard_range", "batches"]


@dataclass(frozen=True)
class WorkItem:
    """One output image.

    Attributes:
        reference: index of its reference in the reference set (the sample number in
            unconditional mode); the "global image index" its noise is seeded from.
        sample: k, the sample number of this reference (0 .. samples_per_reference-1).
        factor: the ILVR factor N, or None when unconditional.
        filename: ``<stem>_s<k>.png`` (``<stem>_N<N>_s<k>.png`` when several N are run).
        seed: its generator's seed, from (run seed, reference, sample).
    """

    reference: int
    sample: int
    factor: int | None
    filename: str
    seed: int


def shard_range(count: int, shard_index: int, num_shards: int) -> range:
    """The contiguous index range [start, stop) of shard ``shard_index`` of ``num_shards``."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} outside [0, {num_shards})")
    return range(count * shard_index // num_shards, count * (shard_index + 1) // num_shards)


def plan_items(
    names: Sequence[str],
    *,
    samples_per_reference: int,
    factors: Sequence[int | None],
    run_seed: int,
    indices: range | None = None,
) -> list[WorkItem]:
    """Work items for references ``indices`` (all by default), ordered by factor then index.

    Every factor of a reference reuses the same noise (same seed), so a grid over N compares
    the effect of N alone.
    """
    indices = range(len(names)) if indices is None else indices
    several = len(factors) > 1
    items = []
    for factor in factors:
        for ref in indices:
            for k in range(samples_per_reference):
                middle = f"_N{factor}" if several else ""
                filename = f"{names[ref]}{middle}_s{k}.png"
                items.append(WorkItem(ref, k, factor, filename, image_seed(run_seed, ref, k)))
    return items


def batches(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Consecutive batches of at most ``batch_size`` items, never mixing two factors."""
    out: list[list[WorkItem]] = []
    for item in items:
        if out and len(out[-1]) < batch_size and out[-1][0].factor == item.factor:
            out[-1].append(item)
        else:
            out.append([item])
    return out
