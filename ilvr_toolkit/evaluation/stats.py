"""Image sets (folder, LMDB, files; read like ILVR's references) and their Inception statistics,
cached (what torchmetrics lacks) in an ``.npz`` like NVlabs/edm's: ``mu`` (D,), ``sigma`` (D, D)
float64, ``count``, ``features`` (n, D) float32 for KID, ``meta``; named by a content hash."""

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from ..batchjob import progress_bar, worker_ends_on_parents_sigterm
from ..data.references import ReferenceSet
from ..fileio import atomic_open
from .fid import FeatureStats, gather_stats
from .inception import NUM_FEATURES, InceptionFeatureExtractor

log = logging.getLogger(__name__)

Source = str | os.PathLike | Sequence[str | os.PathLike]
CACHE_VERSION = 2


@dataclass
class EvalSettings:
    """How to evaluate (the evaluation command's options).

    Args:
        factor: ILVR's low-pass N: adds SSIM/PSNR after phi_N (None: full resolution only).
        image_size: evaluation size (default: the first output's); every set is brought to it.
        inception_weights: the FID Inception file (default: the torch hub cache).
        cache_dir: where reference statistics are cached (default ``~/.cache/ilvr_toolkit/fid_stats``).
        batch_size: images per Inception / metric batch.
        device: auto|cpu|cuda|cuda:N.
        kid: also compute KID (keeps every feature in memory and in the cache).
        kid_subsets: KID's number of subsets (torch-fidelity's 100).
        kid_subset_size: images per KID subset (torch-fidelity's 1000; shrunk to the smaller set).
        workers: DataLoader processes decoding the images.
        seed: seed of KID's subset draws.
        progress: show progress (the command line's default; log lines when stderr is a file).
    """

    factor: int | None = None
    image_size: int | None = None
    inception_weights: str | None = None
    cache_dir: str | None = None
    batch_size: int = 50
    device: str = "auto"
    kid: bool = True
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    workers: int = 0
    seed: int = 0
    progress: bool = False


class ImageSet(Dataset):
    """``images[i]`` -> uint8 (3, S, S), the images of a :class:`ReferenceSet` (a folder, an LMDB or
    image files; S by default the first image's short side); ``names[i]``: their names."""

    def __init__(self, source: Source, image_size: int | None = None):
        self.references = refs = ReferenceSet(source, image_size)
        self.source, self.image_size, self.names = refs.source, refs.image_size, refs.names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.references[index]["image"]

    def identity(self) -> dict[str, Any]:
        """The cache's content key: relative names, sizes, mtimes of the folder's images (an LMDB's
        data.mdb, not lock.mdb which readers touch): cheap, yet any added or rewritten file changes it."""
        root = self.source.resolve()
        listed = [f.resolve() for f in self.references.files]  # of a run folder, without its grid.png
        files = [root / "data.mdb"] if (root / "data.mdb").is_file() else listed
        digest = hashlib.sha256()
        for f in files:
            stat, name = f.stat(), Path(os.path.relpath(f, root)).as_posix()  # a list: files of any folder
            digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return {"path": str(root), "count": len(files), "listing_sha256": digest.hexdigest()}


def rank_world() -> tuple[int, int]:
    ready = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)


def batches_of(images: Dataset, batch_size: int, workers: int = 0) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, S, S) of this process's shard (images rank, rank + W, ...), in order."""
    rank, world = rank_world()
    shard = Subset(images, range(rank, len(images), world))
    loader = DataLoader(shard, batch_size, num_workers=workers, worker_init_fn=worker_ends_on_parents_sigterm)
    yield from loader if len(shard) else []


def default_cache_dir() -> Path:
    """``$ILVR_TOOLKIT_CACHE/fid_stats``, else ``$XDG_CACHE_HOME/ilvr_toolkit/fid_stats`` (``~/.cache``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ilvr_toolkit"
    return Path(os.environ.get("ILVR_TOOLKIT_CACHE") or base) / "fid_stats"


def save_stats(path: str | os.PathLike, stats: FeatureStats, meta: dict[str, Any]) -> Path:
    """Write statistics atomically (temp file + rename)."""
    arrays = {"mu": stats.mean.cpu().double().numpy(), "sigma": stats.cov.cpu().double().numpy()}
    arrays.update(count=np.asarray(stats.count), meta=np.asarray(json.dumps(meta, sort_keys=True)))
    arrays.update({} if stats.features is None else {"features": stats.features.cpu().float().numpy()})
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def load_stats(path: str | os.PathLike) -> tuple[FeatureStats, dict[str, Any]]:
    """Read a statistics file written by :func:`save_stats`."""
    with np.load(path, allow_pickle=False) as z:
        features = torch.from_numpy(z["features"]).double() if "features" in z else None
        mu, sigma = torch.from_numpy(z["mu"]), torch.from_numpy(z["sigma"])
        return FeatureStats(mu, sigma, int(z["count"]), features), json.loads(str(z["meta"]))


def compute_image_set_stats(
    batches: Iterable[torch.Tensor],
    extractor: InceptionFeatureExtractor,
    kid: bool = True,
    distributed: bool = True,
) -> FeatureStats:
    """Statistics of image batches (B, 3, H, W), uint8 or float in [-1, 1]; under torch.distributed
    (and ``distributed``), of every process's batches: gathered by torchmetrics' sync, all must call."""
    device, sync = next(extractor.parameters()).device, distributed and rank_world()[1] > 1
    return gather_stats(map(extractor, batches), kid, sync, device)


def image_set_stats(
    images: ImageSet, extractor: InceptionFeatureExtractor, s: EvalSettings, desc: str = "Inception features"
) -> FeatureStats:
    """:func:`compute_image_set_stats` of ``images`` with ``s.batch_size``, ``s.workers``, ``s.kid``;
    with ``s.progress``, rank 0 shows its shard's progress as ``desc``."""
    rank, world = rank_world()
    bar = progress_bar(len(range(rank, len(images), world)), desc, s.progress and rank == 0)
    with contextlib.closing(bar):
        return compute_image_set_stats(
            counted(batches_of(images, s.batch_size, s.workers), bar), extractor, s.kid
        )


def counted(batches: Iterable[Any], bar: Any) -> Iterator[Any]:
    """``batches``, each counted on ``bar`` (``update(len(batch))``) once the next one is asked for,
    i.e. once the consumer is done with it."""
    for batch in batches:
        yield batch
        bar.update(len(batch))


@dataclass
class StatsCacheInfo:  # how the reference statistics were obtained (reported in metrics.json)
    path: str
    hit: bool
    reason: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _try_load(path: Path, kid: bool, count: int) -> tuple[FeatureStats | None, str]:
    try:  # a missing, truncated, damaged or foreign file is recomputed
        stats, meta = load_stats(path)
    except Exception as error:  # noqa: BLE001 (np.load raises many kinds)
        return None, "no cache file" if not path.is_file() else f"unreadable cache file ({error})"
    if meta.get("version") != CACHE_VERSION or (kid and stats.features is None):
        return None, "cache of another version, or without the features KID needs"
    d, arrays = NUM_FEATURES, [stats.mean, stats.cov] + ([] if stats.features is None else [stats.features])
    shapes = [(d,), (d, d)] + ([] if stats.features is None else [(count, d)])
    if [tuple(a.shape) for a in arrays] != shapes or stats.count != count or meta.get("count") != count:
        got = ", ".join(str(tuple(a.shape)) for a in arrays)
        return (
            None,
            f"damaged cache file (count {stats.count}, shapes {got}; expected {count} of {d} features)",
        )
    if not all(bool(torch.isfinite(a).all()) for a in arrays):
        return None, "damaged cache file (not finite numbers in it)"
    return stats, ""


def cached_reference_stats(
    source: Source | ImageSet,
    extractor: InceptionFeatureExtractor,
    s: EvalSettings | None = None,
    **options: Any,
) -> tuple[FeatureStats | None, StatsCacheInfo]:
    """Statistics of a reference set, from the cache when its content key matches. Under
    torch.distributed every process calls: rank 0 decides hit or miss, on a miss all compute a
    shard and rank 0 writes the file; the statistics are returned on rank 0 (else ``None``).
    Uses ``image_size``, ``cache_dir``, ``batch_size``, ``workers``, ``kid`` (keep the features)."""
    s, (rank, world) = replace(s or EvalSettings(), **options), rank_world()
    images = source if isinstance(source, ImageSet) else ImageSet(source, s.image_size)
    identity = images.identity()
    key = hashlib.sha256(json.dumps([identity, images.image_size, extractor.sha256]).encode()).hexdigest()
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(identity["path"]).name)[:48]
    path = Path(s.cache_dir or default_cache_dir()) / f"{name}-{key[:16]}.npz"
    meta = {"version": CACHE_VERSION, "identity": identity, "image_size": images.image_size}
    meta.update(inception_sha256=extractor.sha256, count=len(images))
    stats, reason = _try_load(path, s.kid, len(images)) if rank == 0 else (None, "")
    hit = [stats is not None]
    if world > 1:
        dist.broadcast_object_list(hit, src=0)
    if not hit[0]:
        stats = image_set_stats(images, extractor, s, f"FID statistics of {identity['path']}")
        if rank == 0:
            try:  # the cache is optional: a full or read-only disk costs the next run a recompute
                save_stats(path, stats, {**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
            except OSError as error:
                log.warning("reference statistics not cached: %s: %s", path, error.strerror or error)
                reason += f"; not cached ({error.strerror or error})"
        if world > 1:
            dist.barrier()
    info = StatsCacheInfo(str(path), hit[0], reason, meta)
    return (stats if rank == 0 else None), info
