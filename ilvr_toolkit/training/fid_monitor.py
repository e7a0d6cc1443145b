"""FID during training: Frechet distance of EMA samples to the training data, every N steps.

The reference statistics are computed once, in ``setup`` (sharded over every process under
DDP, then cached on disk like ``sample.py --evaluate_against`` does), so a missing
Inception file or an unreadable reference set stops the run before its first step. Each
evaluation then samples on global rank 0 only, from fixed per-image seeds (the same starting
noise every time, so the curve follows the model), and never talks to the other processes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ilvr_toolkit.evaluation import (
    FeatureStats,
    InceptionFeatureExtractor,
    cached_reference_stats,
    compute_image_set_stats,
)
from ilvr_toolkit.fileio import atomic_write_bytes
from ilvr_toolkit.sampling.config import SamplerSpec
from ilvr_toolkit.sampling.seeds import image_seed

from .callbacks import _EveryNSteps, sample_images, sampling_weights

__all__ = ["FIDMonitor"]

log = logging.getLogger(__name__)


def _on_cpu(stats: FeatureStats) -> FeatureStats:
    return FeatureStats(stats.mean.cpu(), stats.cov.cpu(), stats.count)


class FIDMonitor(_EveryNSteps):
    """FID of ``num_images`` samples (EMA weights) against the training set every ``every_n_steps``.

    Logged to every logger as ``fid/fid`` (with ``fid/seconds``) and appended to
    ``RUN/fid.jsonl``; the history is kept in checkpoints, so a resumed run continues it.
    FID is biased upwards for small ``num_images``: compare values of one setting only (the
    published numbers use 50k samples). Sampling runs in float32 on the training device
    (a copy of the EMA weights when the EMA lives elsewhere); the Frechet distance is
    computed on the CPU in float64.

    Args:
        every_n_steps: optimizer steps between evaluations (0: never; the default, because
            it needs the Inception weights, see README "Evaluation").
        num_images: samples per evaluation.
        respacing: the sampler (``"ddim50"``; ``"100"`` = 100 DDPM steps).
        batch_size: samples per forward pass and Inception batch.
        reference: real images (folder or LMDB); default: the training LMDB.
        inception_weights: the FID Inception file (default: the torch hub cache).
        stats_cache_dir: where reference statistics are cached (default: the evaluation cache).
        seed: image i always starts from the generator seeded (seed, i).
        at_start: also evaluate before the first step of a fresh run.
    """

    ilvr_toolkit_key = "fid"

    def __init__(
        self,
        every_n_steps: int = 0,
        num_images: int = 1000,
        respacing: str = "ddim50",
        batch_size: int = 50,
        reference: str | None = None,
        inception_weights: str | None = None,
        stats_cache_dir: str | None = None,
        seed: int = 0,
        at_start: bool = False,
    ) -> None:
        super().__init__(every_n_steps, at_start)
        if num_images < 2 or batch_size < 1:
            raise ValueError("fid.num_images must be >= 2 and fid.batch_size >= 1")
        self.num_images = num_images
        self.respacing = respacing
        self.batch_size = batch_size
        self.reference = reference
        self.inception_weights = inception_weights
        self.stats_cache_dir = stats_cache_dir
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self._extractor: InceptionFeatureExtractor | None = None
        self._real: FeatureStats | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Every fit, on every rank (a second fit must not leave rank 0 out of the collectives
        # in cached_reference_stats); from the second time on, the statistics come from the cache.
        if stage != "fit" or not self.every_n_steps:
            return
        source = self.reference or getattr(getattr(trainer, "datamodule", None), "path", None)
        if source is None:
            raise ValueError("fid.every_n_steps is set but there is no fid.reference and no training LMDB")
        device = trainer.strategy.root_device
        extractor = InceptionFeatureExtractor(self.inception_weights).to(device)  # every rank: same error
        real, info = cached_reference_stats(  # all ranks take part (sharded), rank 0 gets the result
            source,
            extractor,
            image_size=pl_module.unet_config.image_size,
            cache_dir=self.stats_cache_dir,
            batch_size=self.batch_size,
            kid=False,
        )
        if trainer.is_global_zero:  # statistics on the CPU: a cache hit loads them there
            self._extractor, self._real = extractor, _on_cpu(real)
            log.info(
                "FID reference statistics of %s (%d images): %s in %.1fs",
                source,
                real.count,
                "cache hit" if info.hit else f"computed ({info.reason})",
                info.seconds,
            )

    # ------------------------------------------------------------------ evaluation
    def _samples(self, net: torch.nn.Module, pl_module: pl.LightningModule) -> Iterator:
        """Batches of ``sample.py --unconditional --seed SEED``'s images 0 .. num_images-1."""
        sampler = SamplerSpec("ddim" if self.respacing.startswith("ddim") else "ddpm", self.respacing)
        for start in range(0, self.num_images, self.batch_size):
            stop = min(start + self.batch_size, self.num_images)
            yield sample_images(
                pl_module, net, [image_seed(self.seed, i, 0) for i in range(start, stop)], sampler
            )

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Sample, extract, compare; returns the FID (global rank 0 after ``setup``)."""
        if self._extractor is None or self._real is None:
            raise RuntimeError("FIDMonitor.evaluate needs setup() on global rank 0 first")
        tic = time.perf_counter()
        with sampling_weights(trainer, pl_module) as (net, which):  # on the training device
            fake = compute_image_set_stats(
                self._samples(net, pl_module), self._extractor, kid=False, distributed=False
            )
        fid = float(self._real.frechet_distance(_on_cpu(fake)))
        entry = {
            "step": trainer.global_step,
            "fid": fid,
            "num_images": self.num_images,
            "respacing": self.respacing,
            "weights": which,
            "seconds": round(time.perf_counter() - tic, 2),
        }
        self.history.append(entry)
        self._publish(trainer, entry)
        return fid

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fid = self.evaluate(trainer, pl_module)
        log.info(
            "step %d: FID %.3f (%d samples, %s)", trainer.global_step, fid, self.num_images, self.respacing
        )

    def _publish(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"fid/fid": entry["fid"], "fid/seconds": entry["seconds"]}, step=entry["step"])
        lines = "".join(json.dumps(e) + "\n" for e in self.history)
        atomic_write_bytes(Path(trainer.default_root_dir) / "fid.jsonl", lines.encode())

    # ------------------------------------------------------------------ checkpoints
    def describe(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "respacing": self.respacing, "history": self.history[-1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
