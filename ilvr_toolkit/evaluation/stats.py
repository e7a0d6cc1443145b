"""Reference statistics: computed once per (dataset, image size, Inception weights), cached on disk.

A cache file is an ``.npz`` (no pickle) holding ``mu`` (D,) and ``sigma`` (D, D) in float64 --
the names pytorch-fid uses -- plus ``count``, optionally ``features`` (n, D) float32 for KID
(the Inception outputs are float32, so this is lossless), and ``meta``: a JSON string with
the dataset identity (see :func:`~.sources.dataset_identity`), image size and the weights'
sha256. The file name depends on the dataset *path*, size and weights only; its identity is
checked on load, so a dataset that changed (files added, removed, rewritten) is recomputed
and its cache file replaced, never silently reused.

Distributed: :func:`compute_image_set_stats` shards the images over the processes and
gathers the statistics with torchmetrics' own state sync, so every process returns the same
statistics; only rank 0 writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..fileio import atomic_open
from .fid import FeatureStats, InceptionMetrics
from .inception import InceptionFeatureExtractor
from .sources import ImageSet, identity_digest, iterate_images, open_image_set, shard_indices

__all__ = [
    "CACHE_VERSION",
    "StatsCacheInfo",
    "default_cache_dir",
    "stats_cache_path",
    "save_stats",
    "load_stats",
    "compute_image_set_stats",
    "cached_reference_stats",
    "dist_rank_world",
]

CACHE_VERSION = 1


def dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_cache_dir() -> Path:
    """``$ILVR_TOOLKIT_CACHE`` or ``$XDG_CACHE_HOME/ilvr_toolkit/fid_stats`` (``~/.cache/...``)."""
    if os.environ.get("ILVR_TOOLKIT_CACHE"):
        return Path(os.environ["ILVR_TOOLKIT_CACHE"]) / "fid_stats"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ilvr_toolkit" / "fid_stats"


def stats_cache_path(
    identity: dict[str, Any], image_size: int, extractor_sha256: str, cache_dir: str | os.PathLike
) -> Path:
    """``<cache_dir>/<dataset name>-<hash of path>-<size>px-inception<sha[:8]>.npz``."""
    path = str(identity.get("path", "set"))
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).name)[:48] or "set"
    where = hashlib.sha256(f"{identity.get('kind')}:{path}".encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{name}-{where}-{image_size}px-inception{extractor_sha256[:8]}.npz"


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def save_stats(path: str | os.PathLike, stats: FeatureStats, meta: dict[str, Any]) -> Path:
    """Write statistics atomically (temp file + rename)."""
    arrays = {
        "mu": stats.mean.detach().cpu().double().numpy(),
        "sigma": stats.cov.detach().cpu().double().numpy(),
        "count": np.asarray(stats.count, dtype=np.int64),
        "meta": np.asarray(json.dumps(meta, sort_keys=True)),
    }
    if stats.features is not None:
        arrays["features"] = stats.features.detach().cpu().float().numpy()
    path = Path(path)
    _atomic_npz(path, arrays)
    return path


def load_stats(path: str | os.PathLike) -> tuple[FeatureStats, dict[str, Any]]:
    """Read a statistics file (ours, or a pytorch-fid style ``mu``/``sigma`` npz)."""
    with np.load(path, allow_pickle=False) as z:
        mean = torch.from_numpy(z["mu"].astype(np.float64))
        cov = torch.from_numpy(z["sigma"].astype(np.float64))
        count = int(z["count"]) if "count" in z else 0
        features = torch.from_numpy(z["features"]).double() if "features" in z else None
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
    return FeatureStats(mean=mean, cov=cov, count=count, features=features), meta


@dataclass
class StatsCacheInfo:
    """How the reference statistics were obtained (reported in metrics.json)."""

    path: str
    hit: bool
    seconds: float
    reason: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def compute_image_set_stats(
    images: ImageSet | Dataset | Iterable[torch.Tensor],
    extractor: InceptionFeatureExtractor,
    *,
    batch_size: int = 50,
    keep_features: bool = True,
    num_workers: int = 0,
    distributed: bool | None = None,
) -> FeatureStats:
    """Inception statistics of an image set (mean, covariance, count; features if ``keep_features``).

    ``images``: a map-style dataset of uint8 (3, H, W) images (an :class:`ImageSet`), or any
    iterable of batches (B, 3, H, W), uint8 or float in [-1, 1] (a DataLoader, a generator).
    Under torch.distributed (``distributed`` defaults to "initialised") a dataset is sharded
    over the processes (an iterable of batches is taken to be this process's shard already)
    and the result, gathered by torchmetrics' state sync, is the same on every process.
    """
    rank, world = dist_rank_world()
    if distributed is False:
        rank, world = 0, 1
    metrics = InceptionMetrics(extractor, kid=keep_features)
    if isinstance(images, Dataset) and hasattr(images, "__len__"):
        batches: Iterable[torch.Tensor] = iterate_images(
            images, batch_size, shard_indices(len(images), rank, world), num_workers
        )
    else:
        batches = images
    for batch in batches:
        metrics.update(batch, real=True)
    should_sync = world > 1
    with metrics.fid.sync_context(should_sync=should_sync, distributed_available=lambda: should_sync):
        stats = metrics.fid._stats(real=True)
        stats = FeatureStats(stats.mean.clone(), stats.cov.clone(), stats.count)
    if metrics.kid is not None:
        with metrics.kid.sync_context(should_sync=should_sync, distributed_available=lambda: should_sync):
            stats.features = metrics.kid._concatenated(metrics.kid.real_features).clone()
    return stats


def cached_reference_stats(
    source: str | os.PathLike | ImageSet,
    extractor: InceptionFeatureExtractor,
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 50,
    keep_features: bool = True,
    num_workers: int = 0,
    rebuild: bool = False,
) -> tuple[FeatureStats | None, StatsCacheInfo]:
    """Statistics of a reference set (folder or LMDB), from the cache when it is still valid.

    Under torch.distributed, rank 0 decides hit or miss; on a miss every process computes its
    shard and rank 0 writes the file. The statistics are returned on rank 0 only (``None``
    elsewhere): load them into the metric on that one process.
    """
    start = time.perf_counter()
    rank, world = dist_rank_world()
    images = open_image_set(source, image_size)
    identity = images.identity()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = stats_cache_path(identity, images.image_size, extractor.sha256, cache_dir)
    meta = {
        "version": CACHE_VERSION,
        "identity": identity,
        "identity_sha256": identity_digest(identity),
        "image_size": images.image_size,
        "inception_sha256": extractor.sha256,
        "with_features": keep_features,
    }

    stats, reason = None, "rebuild requested" if rebuild else ""
    if rank == 0 and not rebuild:
        stats, reason = _try_load(path, meta, keep_features)
    if world > 1:
        flag = [stats is not None]
        dist.broadcast_object_list(flag, src=0)
        hit = flag[0]
    else:
        hit = stats is not None
    if hit:
        return (stats if rank == 0 else None), StatsCacheInfo(
            str(path), True, time.perf_counter() - start, "", meta
        )

    stats = compute_image_set_stats(
        images, extractor, batch_size=batch_size, keep_features=keep_features, num_workers=num_workers
    )
    if rank == 0:
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        meta["count"] = stats.count
        save_stats(path, stats, meta)
    if world > 1:
        dist.barrier()
    info = StatsCacheInfo(str(path), False, time.perf_counter() - start, reason or "no cache file", meta)
    return (stats if rank == 0 else None), info


def _try_load(path: Path, expected: dict[str, Any], need_features: bool) -> tuple[FeatureStats | None, str]:
    if not path.is_file():
        return None, "no cache file"
    try:
        stats, meta = load_stats(path)
    except Exception as e:  # a truncated or foreign file is recomputed, not fatal
        return None, f"unreadable cache file ({type(e).__name__}: {e})"
    for key in ("version", "identity_sha256", "image_size", "inception_sha256"):
        if meta.get(key) != expected[key]:
            return None, f"stale cache ({key} changed)"
    if need_features and stats.features is None:
        return None, "cache has no features (needed for KID)"
    return stats, ""
