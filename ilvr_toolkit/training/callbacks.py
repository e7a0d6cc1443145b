"""Training callbacks: EMA sample grids, ILVR previews, throughput and memory.

Sampling runs on global rank 0 only, with the EMA weights when the EMA callback is present
(the raw weights otherwise), from fixed per-image seeds so that successive grids are
comparable. Images go to TensorBoard (``samples/ema``, ``ilvr/preview``) and, as PNG, to
``RUN/samples/``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchvision.utils import make_grid

from ilvr_toolkit.conditioning import ILVR, LowPass
from ilvr_toolkit.diffusion import (
    DiffusionConfig,
    PerImageNoise,
    StepHook,
    create_diffusion,
    ddim_sample,
    ddpm_sample,
    draw_x_T,
)
from ilvr_toolkit.images import to_float, to_uint8

from .checkpointing import EMA, atomic_open

__all__ = ["ILVRPreview", "SampleGrid", "TrainingSpeed", "generate", "sampling_network"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers
def sampling_network(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
    """The EMA UNet if an EMA callback holds one, else the module's own; and which it is."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA) and cb.averaged_unet() is not None:
            return cb.averaged_unet(), "ema"
    return pl_module.model, "raw"


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


@torch.no_grad()
def generate(
    net: nn.Module,
    diffusion_config: DiffusionConfig,
    num_images: int,
    image_size: int,
    *,
    seed: int,
    respacing: str,
    device: torch.device,
    hooks: Sequence[StepHook] = (),
    first_index: int = 0,
) -> torch.Tensor:
    """Samples as uint8 (N, 3, H, W): image i uses its own generator seeded (seed, i).

    ``respacing`` starting with ``"ddim"`` runs deterministic DDIM, otherwise ancestral DDPM.
    """
    diffusion = create_diffusion(diffusion_config, respacing=respacing)
    generators = [
        torch.Generator().manual_seed(seed * 1_000_003 + first_index + i) for i in range(num_images)
    ]
    noise = PerImageNoise(generators)
    x_T = draw_x_T(noise, (num_images, 3, image_size, image_size), device)
    sampler = ddim_sample if respacing.startswith("ddim") else ddpm_sample
    with _eval_mode(net):
        x0 = sampler(
            diffusion, net, x_T, noise=noise, hooks=hooks, clip_denoised=diffusion_config.clip_denoised
        )
    return to_uint8(x0).cpu()


def _write_png(grid: torch.Tensor, path: Path) -> None:
    """uint8 (3, H, W) -> PNG, atomically."""
    with atomic_open(path, "wb") as f:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(f, format="PNG")


def _publish(trainer: pl.Trainer, tag: str, grid: torch.Tensor, filename: str | None) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, global_step=trainer.global_step, dataformats="CHW")
    if filename:
        _write_png(grid, Path(trainer.default_root_dir) / "samples" / filename)


def _speed_pause(trainer: pl.Trainer) -> contextlib.AbstractContextManager:
    """Time spent inside is left out of the throughput figures."""
    for cb in trainer.callbacks:
        if isinstance(cb, TrainingSpeed):
            return cb.paused()
    return contextlib.nullcontext()


class _EveryNSteps(Callback):
    """Runs ``_run`` on global rank 0 after every ``every_n_steps``-th optimizer step."""

    def __init__(self, every_n_steps: int, at_start: bool) -> None:
        if every_n_steps < 0:
            raise ValueError("every_n_steps must be >= 0 (0 disables)")
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self._last_step = -1

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
        if trainer.global_step == self._last_step or not trainer.is_global_zero or trainer.sanity_checking:
            return
        self._last_step = trainer.global_step
        with _speed_pause(trainer):
            self._run(trainer, pl_module)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- sample grid
class SampleGrid(_EveryNSteps):
    """A grid of unconditional samples from fixed seeds every ``every_n_steps`` steps.

    Args:
        every_n_steps: optimizer steps between grids (0: never).
        num_images: images in the grid.
        respacing: sampling steps (``"ddim25"``: 25 DDIM steps; ``"50"``: 50 DDPM steps).
        seed: image i always starts from the generator seeded (seed, i).
        at_start: also sample before the first step of a fresh run (the initial weights).
        nrow: images per grid row (default: about sqrt(num_images)).
        save_png: also write ``RUN/samples/samples_{step:08d}.png``.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_images: int = 16,
        respacing: str = "ddim25",
        seed: int = 0,
        at_start: bool = False,
        nrow: int | None = None,
        save_png: bool = True,
    ) -> None:
        super().__init__(every_n_steps, at_start)
        self.num_images = num_images
        self.respacing = respacing
        self.seed = seed
        self.nrow = nrow or max(1, round(num_images**0.5))
        self.save_png = save_png

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net, which = sampling_network(trainer, pl_module)
        started = time.perf_counter()
        images = generate(
            net,
            pl_module.diffusion_config,
            self.num_images,
            pl_module.unet_config.image_size,
            seed=self.seed,
            respacing=self.respacing,
            device=next(net.parameters()).device,
        )
        grid = make_grid(images, nrow=self.nrow, padding=2, pad_value=0)
        name = f"samples_{trainer.global_step:08d}.png" if self.save_png else None
        _publish(trainer, f"samples/{which}", grid, name)
        log.info(
            "sample grid (%s weights, %s) in %.1fs", which, self.respacing, time.perf_counter() - started
        )


# --------------------------------------------------------------------------- ILVR preview
class ILVRPreview(_EveryNSteps):
    """ILVR translations of a few fixed references every ``every_n_steps`` steps.

    The grid has one column per reference: the reference, its low-pass phi_N (what ILVR
    keeps), and the translation.

    Args:
        every_n_steps: optimizer steps between previews (0: never).
        references: a folder of images or an LMDB (default: the training LMDB).
        num_images: the first this many references are used.
        factor: the down-sampling factor N of phi_N (divides the image size).
        respacing: sampling steps (DDPM unless it starts with ``"ddim"``).
        range_t: condition steps with respaced index > range_t (official semantics).
        mode: ``"paper"`` (y_{t-1}) or ``"official"`` (ilvr_adm's y_t).
        seed: per-image seeds, as for SampleGrid.
        save_png: also write ``RUN/samples/ilvr_{step:08d}.png``.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        references: str | None = None,
        num_images: int = 4,
        factor: int = 4,
        respacing: str = "100",
        range_t: int = 0,
        mode: str = "paper",
        seed: int = 0,
        at_start: bool = False,
        save_png: bool = True,
    ) -> None:
        super().__init__(every_n_steps, at_start)
        self.references = references
        self.num_images = num_images
        self.factor = factor
        self.respacing = respacing
        self.range_t = range_t
        self.mode = mode
        self.seed = seed
        self.save_png = save_png
        self._refs: torch.Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.every_n_steps or not trainer.is_global_zero:
            return
        size = pl_module.unet_config.image_size
        if size % self.factor:
            raise ValueError(f"ilvr_preview.factor={self.factor} does not divide the image size {size}")
        source = self.references or getattr(getattr(trainer, "datamodule", None), "path", None)
        if source is None:
            rank_zero_warn(
                "ILVR preview disabled: no references given and no training LMDB to take them from"
            )
            self.every_n_steps = 0
            return
        from ilvr_toolkit.data.references import ReferenceSet  # data is only needed here

        refs = ReferenceSet(source, size)
        count = min(self.num_images, len(refs))
        self._refs = torch.stack([refs[i]["image"] for i in range(count)])

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._refs is None:
            return
        net, which = sampling_network(trainer, pl_module)
        device = next(net.parameters()).device
        size = pl_module.unet_config.image_size
        reference = to_float(self._refs).to(device)
        lowpass = LowPass(size, self.factor, device)
        hook = ILVR(reference, self.factor, range_t=self.range_t, mode=self.mode, lowpass=lowpass)
        out = generate(
            net,
            pl_module.diffusion_config,
            reference.shape[0],
            size,
            seed=self.seed,
            respacing=self.respacing,
            device=device,
            hooks=[hook],
        )
        low = to_uint8(lowpass(reference)).cpu()
        grid = make_grid(torch.cat([self._refs, low, out]), nrow=reference.shape[0], padding=2, pad_value=0)
        name = f"ilvr_{trainer.global_step:08d}.png" if self.save_png else None
        _publish(trainer, f"ilvr/preview_{which}", grid, name)


# --------------------------------------------------------------------------- throughput
class TrainingSpeed(Callback):
    """Logs images/s (per device and in total), seconds per step and accelerator memory.

    Measured over the steps between two logging points (``every_n_steps``, default the
    trainer's ``log_every_n_steps``), data loading included, previews excluded.
    Metrics: ``perf/images_per_sec_per_device``, ``perf/images_per_sec``,
    ``perf/sec_per_step`` and on CUDA ``perf/gpu_mem_peak_gib`` (peak allocated since the
    last log) and ``perf/gpu_mem_reserved_gib``.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self._start: float | None = None
        self._images = 0
        self._steps = 0
        self._paused = 0.0
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - begin

    def _reset(self, device: torch.device) -> None:
        self._start = time.perf_counter()
        self._images = self._steps = 0
        self._paused = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            self._reset(pl_module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += int(images.shape[0])
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: same optimizer step
            return
        self._last_step = step
        self._steps += 1
        every = self.every_n_steps or trainer.log_every_n_steps
        if step % every or self._start is None:
            return
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - self._start - self._paused
        if elapsed <= 0:
            return
        per_device = self._images / elapsed
        metrics = {
            "perf/images_per_sec_per_device": per_device,
            "perf/images_per_sec": per_device * trainer.world_size,
            "perf/sec_per_step": elapsed / max(self._steps, 1),
        }
        if device.type == "cuda":
            metrics["perf/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            metrics["perf/gpu_mem_reserved_gib"] = torch.cuda.memory_reserved(device) / 2**30
        self.last_metrics = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._reset(device)
