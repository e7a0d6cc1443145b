"""Training previews: sample grids and ILVR translations, on global rank 0, with the EMA weights
(raw without a weight-averaging callback), through ``sampling.generate`` with ``sample.py``'s
per-image seeds: image i is ``sample.py``'s sample 0 of reference i, so a preview equals what
``sample.py`` writes for that step's checkpoint. To TensorBoard and ``RUN/samples/*.png``."""

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchvision.utils import make_grid

from ilvr_toolkit.cli import UsageError, check_range
from ilvr_toolkit.conditioning import LowPass
from ilvr_toolkit.diffusion import DiffusionConfig, GaussianDiffusion
from ilvr_toolkit.images import to_float, to_uint8
from ilvr_toolkit.sampling.config import ILVRSpec, SamplerSpec
from ilvr_toolkit.sampling.generate import (
    Condition,
    NonFiniteSamples,
    generate,
    ilvr_range_t,
    sampling_diffusion,
)
from ilvr_toolkit.sampling.seeds import image_seed
from ilvr_toolkit.sampling.writer import save_png

from .preemption import Preemption

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """A stop signal came while a preview or an FID evaluation was sampling; it is dropped and the
    run's :class:`Preemption` saves and stops at the next step boundary."""


def _stoppable(trainer: pl.Trainer | None, net: nn.Module) -> Callable[..., torch.Tensor]:
    """``net`` that raises :class:`StopRequested` before a call once the run's
    :class:`Preemption` callback has seen a stop signal on this rank (a check per sampling step)."""
    callbacks = trainer.callbacks if trainer is not None else []
    stopper = next((cb for cb in callbacks if isinstance(cb, Preemption)), None)

    def checked(*args: Any, **kwargs: Any) -> torch.Tensor:
        if stopper is not None and stopper.signals is not None and stopper.signals.requested:
            raise StopRequested
        return net(*args, **kwargs)

    return checked


@contextlib.contextmanager
def sampling_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[tuple[nn.Module, str]]:
    """``(pl_module.model, "ema")`` in eval mode holding the EMA weights while inside (swapped by the
    stock ``WeightAveraging``'s own validation hooks), or ``(pl_module.model, "raw")`` without one."""
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)), None)
    net, was_training = pl_module.model, pl_module.model.training
    if ema is not None:
        ema.on_validation_epoch_start(trainer, pl_module)
    net.eval()
    try:
        yield net, "raw" if ema is None else "ema"
    finally:
        net.train(was_training)
        if ema is not None:
            ema.on_validation_epoch_end(trainer, pl_module)


def sample_images(
    pl_module: pl.LightningModule,
    net: nn.Module,
    seeds: Sequence[int],
    sampler: SamplerSpec,
    condition: Condition | None = None,
    strict: bool = False,
    trainer: pl.Trainer | None = None,
) -> torch.Tensor:
    """uint8 (len(seeds), 3, H, W) from ``net`` with the module's diffusion respaced as
    ``sampler.respacing`` (the call ``sample.py`` makes for a batch). NaN/inf samples: a warning
    (``strict``: :class:`NonFiniteSamples`). A stop signal that ``trainer``'s :class:`Preemption`
    sees meanwhile: :class:`StopRequested`."""
    diffusion = sampling_diffusion(pl_module.diffusion_config, sampler)
    device, size = next(net.parameters()).device, pl_module.unet_config.image_size
    try:
        return generate(_stoppable(trainer, net), diffusion, seeds, size, device, sampler, condition)
    except NonFiniteSamples as error:  # a preview: warn, keep training
        if strict:
            raise
        rank_zero_warn(f"step {pl_module.global_step}: {error}")
        return error.images


def _publish(trainer: pl.Trainer, tag: str, grid: torch.Tensor, filename: str | None) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, global_step=trainer.global_step, dataformats="CHW")
    if filename:
        save_png(Path(trainer.default_root_dir) / "samples" / filename, grid)


class EveryNSteps(Callback):
    """Runs the subclass's ``_run(trainer, pl_module)`` on global rank 0 after every ``every_n_steps``-th
    optimizer step (once per step under gradient accumulation), with the settings all of them have."""

    option, min_images = "samples", 1  # the config group (errors name --<option>.KEY)

    def __init__(self, every_n_steps: int, num_images: int, sampler: SamplerSpec, seed: int, at_start: bool):
        check_range(f"{self.option}.every_n_steps", every_n_steps, 0)
        check_range(f"{self.option}.num_images", num_images, self.min_images)
        self.every_n_steps, self.num_images, self.sampler = every_n_steps, num_images, sampler
        self.seed, self.at_start, self.last_step = seed, at_start, -1

    def check_sampler(self, config: DiffusionConfig) -> GaussianDiffusion:
        """The diffusion this callback samples with (``config`` respaced as ``sampler`` says), built
        before training: one it cannot be is a :class:`UsageError` naming ``--OPTION.sampler.respacing``
        then, not a crash at the first preview after hours of training."""
        try:
            return sampling_diffusion(config, self.sampler)
        except ValueError as error:
            given = self.sampler.respacing
            said = given if given is not None else f"null (so {config.timestep_respacing or '100'!r})"
            raise UsageError(f"--{self.option}.sampler.respacing {said}: {error}") from None

    def seeds(self, start: int, stop: int) -> list[int]:
        """``sample.py``'s seeds of images start .. stop-1 (sample 0 of reference i)."""
        return [image_seed(self.seed, i, 0) for i in range(start, stop)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps and self.at_start and trainer.global_step == 0:
            self._maybe_run(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._maybe_run(trainer, pl_module)

    def _maybe_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self.last_step and trainer.is_global_zero:
            self.last_step = trainer.global_step
            try:
                self._run(trainer, pl_module)
            except StopRequested:  # rank 0 alone samples: no other rank waits on this one
                log.info("step %d: %s stopped by a stop signal", trainer.global_step, self.option)


class SampleGrid(EveryNSteps):
    """A grid of unconditional samples from fixed seeds every ``every_n_steps`` steps.

    Args:
        every_n_steps: optimizer steps between grids (0: never).
        num_images: images in the grid.
        sampler: method (``ddim``/``ddpm``), respacing (``ddim25``: 25 DDIM-strided steps) and eta.
        seed: image i is ``sample.py --unconditional --seed SEED``'s image i.
        at_start: also sample before the first step of a fresh run (the initial weights).
        nrow: images per grid row (default: about sqrt(num_images)).
        save_png: also write ``RUN/samples/samples_{step:08d}.png``.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_images: int = 16,
        sampler: SamplerSpec = SamplerSpec("ddim", "ddim25"),
        seed: int = 0,
        at_start: bool = False,
        nrow: int | None = None,
        save_png: bool = True,
    ) -> None:
        super().__init__(every_n_steps, num_images, sampler, seed, at_start)
        if nrow is not None:
            check_range("samples.nrow", nrow, 1)
        self.nrow, self.save_png = nrow or max(1, round(num_images**0.5)), save_png

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        with sampling_weights(trainer, pl_module) as (net, which):
            images = sample_images(
                pl_module, net, self.seeds(0, self.num_images), self.sampler, trainer=trainer
            )
        name = f"samples_{trainer.global_step:08d}.png" if self.save_png else None
        _publish(trainer, f"samples/{which}", make_grid(images, nrow=self.nrow), name)
        log.info("sample grid (%s weights) in %.1fs", which, time.perf_counter() - started)


class ILVRPreview(EveryNSteps):
    """ILVR translations of a few fixed references every ``every_n_steps`` steps: per reference a
    column (the reference, then for each N phi_N and the translation); the translations are
    ``sample.py --references REFS --seed SEED``'s (same ``ilvr`` and ``sampler``) on this step's weights.

    Args:
        every_n_steps: optimizer steps between previews (0: never).
        references: a folder of images or an LMDB (default: the training LMDB).
        num_images: the first this many references are used.
        ilvr: factor N (each divides the image size), range_t / fraction / stop_timestep, mode.
        sampler: method, respacing and eta, as ``sample.py --sampler.*``.
        seed: the run seed of ``sample.py``.
        at_start: also translate before the first step of a fresh run.
        save_png: also write ``RUN/samples/ilvr_{step:08d}.png``.
    """

    option = "ilvr_preview"

    def __init__(
        self,
        every_n_steps: int = 5000,
        references: str | None = None,
        num_images: int = 4,
        ilvr: ILVRSpec = ILVRSpec(),
        sampler: SamplerSpec = SamplerSpec(),
        seed: int = 0,
        at_start: bool = False,
        save_png: bool = True,
    ) -> None:
        super().__init__(every_n_steps, num_images, sampler, seed, at_start)
        self.references, self.ilvr, self.save_png = references, ilvr, save_png
        self.images: torch.Tensor | None = None

    def check_sampler(self, config: DiffusionConfig) -> GaussianDiffusion:
        """As for every preview, and ``ilvr.range_t`` must fit its steps."""
        diffusion = super().check_sampler(config)
        try:
            ilvr_range_t(self.ilvr, diffusion)
        except ValueError as error:
            raise UsageError(f"--ilvr_preview.ilvr.range_t {self.ilvr.range_t}: {error}") from None
        return diffusion

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.every_n_steps or not trainer.is_global_zero:
            return
        size = pl_module.unet_config.image_size
        if any(size % n for n in self.ilvr.factors):
            raise ValueError(
                f"ilvr_preview.ilvr.factor={self.ilvr.factor} does not divide the image size {size}"
            )
        source = self.references or getattr(getattr(trainer, "datamodule", None), "path", None)
        if source is None:
            rank_zero_warn(
                "ILVR preview disabled: no references given and no training LMDB to take them from"
            )
            self.every_n_steps = 0
            return
        from ilvr_toolkit.data.references import ReferenceSet  # data is only needed here

        refs = ReferenceSet(source, size)
        self.images = torch.stack([refs[i]["image"] for i in range(min(self.num_images, len(refs)))])

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.images is None:
            return
        count, size, rows = self.images.shape[0], self.images.shape[-1], [self.images]
        seeds = self.seeds(0, count)
        with sampling_weights(trainer, pl_module) as (net, which):
            device = next(net.parameters()).device
            range_t = ilvr_range_t(self.ilvr, sampling_diffusion(pl_module.diffusion_config, self.sampler))
            for factor in self.ilvr.factors:
                lowpass = LowPass(size, factor, device)
                condition = Condition(self.images, lowpass, range_t, self.ilvr.mode)
                out = sample_images(pl_module, net, seeds, self.sampler, condition, trainer=trainer)
                rows += [to_uint8(lowpass(to_float(self.images).to(device))).cpu(), out]
        name = f"ilvr_{trainer.global_step:08d}.png" if self.save_png else None
        _publish(trainer, f"ilvr/preview_{which}", make_grid(torch.cat(rows), nrow=count), name)
