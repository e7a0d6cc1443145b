"""FID during training (:class:`FIDMonitor`). The reference statistics are computed in ``setup``
(sharded under DDP, cached like ``sample.py --evaluate_against``), so a missing Inception file stops
the run before its first step; each evaluation samples on rank 0 from fixed per-image seeds."""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ilvr_toolkit.cli import check_range
from ilvr_toolkit.evaluation import (
    FeatureStats,
    InceptionFeatureExtractor,
    cached_reference_stats,
    compute_image_set_stats,
)
from ilvr_toolkit.fileio import atomic_write_bytes
from ilvr_toolkit.sampling.config import SamplerSpec
from ilvr_toolkit.sampling.generate import NonFiniteSamples

from .callbacks import EveryNSteps, sample_images, sampling_weights

log = logging.getLogger(__name__)


@dataclass
class FIDReference:
    """What the samples are compared to (``--fid.reference.*``).

    Attributes:
        images: real images (folder or LMDB); None: the training LMDB.
        inception_weights: the FID Inception file (default: the torch hub cache).
        stats_cache_dir: where reference statistics are cached (default: the evaluation cache).
    """

    images: str | None = None
    inception_weights: str | None = None
    stats_cache_dir: str | None = None


class FIDMonitor(EveryNSteps):
    """FID of ``num_images`` samples (EMA weights) against the training set every ``every_n_steps``.

    Logged as ``fid/fid`` (and ``fid/seconds``), appended to ``RUN/fid.jsonl`` and kept in checkpoints
    (a resumed run continues the history). FID is biased upwards for small ``num_images``: compare
    values of one setting only (papers use 50k samples). The distance is computed on the CPU.

    Args:
        every_n_steps: optimizer steps between evaluations (0: never; it needs the Inception weights).
        num_images: samples per evaluation.
        sampler: method, respacing and eta, as ``sample.py --sampler.*`` (default: DDIM, ``ddim50``).
        batch_size: samples per forward pass and Inception batch.
        reference: the real images, the Inception file and the statistics cache.
        seed: image i always starts from the generator seeded (seed, i).
        at_start: also evaluate before the first step of a fresh run.
    """

    ilvr_toolkit_key = option = "fid"
    min_images = 2  # a covariance

    def __init__(
        self,
        every_n_steps: int = 0,
        num_images: int = 1000,
        sampler: SamplerSpec = SamplerSpec("ddim", "ddim50"),
        batch_size: int = 50,
        reference: FIDReference = FIDReference(),
        seed: int = 0,
        at_start: bool = False,
    ) -> None:
        super().__init__(every_n_steps, num_images, sampler, seed, at_start)
        check_range("fid.batch_size", batch_size, 1)
        self.batch_size, self.reference = batch_size, reference
        self.history: list[dict[str, Any]] = []
        self.extractor: InceptionFeatureExtractor | None = None
        self.real: FeatureStats | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Every fit, on every rank (a second fit must not leave rank 0 out of the collectives
        # in cached_reference_stats); from the second time on, the statistics come from the cache.
        if stage != "fit" or not self.every_n_steps:
            return
        source = self.reference.images or getattr(getattr(trainer, "datamodule", None), "path", None)
        if source is None:
            raise ValueError(
                "fid.every_n_steps is set but there is no fid.reference.images and no training LMDB"
            )
        tic = time.perf_counter()
        extractor = InceptionFeatureExtractor(self.reference.inception_weights)  # every rank: same error
        extractor = extractor.to(trainer.strategy.root_device)
        options = dict(image_size=pl_module.unet_config.image_size, cache_dir=self.reference.stats_cache_dir)
        options.update(batch_size=self.batch_size, kid=False, progress=True)  # before the fit's bar
        # all ranks take part (sharded), rank 0 gets the result
        real, info = cached_reference_stats(source, extractor, **options)
        if trainer.is_global_zero:  # statistics on the CPU: a cache hit loads them there
            self.extractor, self.real = extractor, real.to("cpu")
            how = "cache hit" if info.hit else f"computed ({info.reason})"
            seconds = time.perf_counter() - tic
            log.info(
                "FID reference statistics of %s (%d images): %s in %.1fs", source, real.count, how, seconds
            )

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sample, extract, compare (global rank 0, after ``setup``); log and append the FID."""
        tic, n = time.perf_counter(), self.num_images
        with sampling_weights(trainer, pl_module) as (net, which):  # on the training device
            seeds = (self.seeds(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size))
            # sample.py --unconditional --seed SEED's images 0 .. n-1
            batches = (
                sample_images(pl_module, net, s, self.sampler, strict=True, trainer=trainer) for s in seeds
            )
            try:
                fake = compute_image_set_stats(batches, self.extractor, kid=False, distributed=False)
            except NonFiniteSamples as error:  # no FID of zeroed pixels in the history
                log.warning("step %d: no FID: %s", trainer.global_step, error)
                return
        fid = self.real.frechet_distance(fake.to("cpu"))
        step, respacing = trainer.global_step, self.sampler.respacing
        seconds = round(time.perf_counter() - tic, 2)
        entry = dict(step=step, fid=fid, num_images=n, respacing=respacing, weights=which, seconds=seconds)
        self.history.append(entry)
        for logger in trainer.loggers:
            logger.log_metrics({"fid/fid": fid, "fid/seconds": seconds}, step=step)
        lines = "".join(json.dumps(e) + "\n" for e in self.history)
        atomic_write_bytes(Path(trainer.default_root_dir) / "fid.jsonl", lines.encode())
        log.info("step %d: FID %.3f (%d samples, %s)", step, fid, n, respacing)

    def describe(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "respacing": self.sampler.respacing,
            "history": self.history[-1:],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
