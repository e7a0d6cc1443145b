"""What a run has to produce: one work item per output image, sharded and resumable."""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .seeds import image_seed

__all__ = ["WorkItem", "output_name", "plan_items", "shard_range", "batches"]


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


def output_name(stem: str, factor: int | None, sample: int) -> str:
    """``<stem>_s<k>.png``, or ``<stem>_N<N>_s<k>.png`` with ``factor`` (a run of several N)."""
    return f"{stem}_N{factor}_s{sample}.png" if factor is not None else f"{stem}_s{sample}.png"


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
                filename = output_name(names[ref], factor if several else None, k)
                items.append(WorkItem(ref, k, factor, filename, image_seed(run_seed, ref, k)))
    return items


def batches(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Consecutive batches of at most ``batch_size`` items, never mixing two factors."""
    out: list[list[WorkItem]] = []
    for _, group in itertools.groupby(items, key=lambda item: item.factor):
        group = list(group)
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return out
