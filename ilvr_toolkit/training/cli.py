"""``train.py``: LightningCLI for domain DDPMs, with a fixed run directory and auto-resume.

    python train.py fit --config configs/ffhq256.yaml --data.path datasets/ffhq.lmdb
    python train.py fit --config configs/tiny.yaml --data.path datasets/tiny.lmdb --trainer.max_steps 500
    python train.py fit --config configs/afhq_dog256.yaml --init_from checkpoints/ffhq_10m.pt   # fine-tune
    python train.py fit --config configs/tiny.yaml --print_config                              # resolved config
    python train.py export runs/tiny/checkpoints/last.ckpt                                     # EMA -> .pt files

What the CLI adds to Lightning's:

- ``trainer.default_root_dir`` is the run directory (``RUN``); checkpoints go to
  ``RUN/checkpoints`` (not under a new ``version_N``), TensorBoard to ``RUN/tb``, the
  resolved config to ``RUN/config.yaml`` (atomically rewritten on every start; a config
  that changed is kept as ``config.<time>.yaml``).
- Rerunning the same command resumes from the newest of ``RUN/checkpoints/last.ckpt`` and
  ``RUN/hpc_ckpt_*.ckpt`` (``--auto_resume false`` starts over; ``--ckpt_path`` picks one).
- Always-on callbacks with their own config groups: ``--ema.*`` (EMA), ``--checkpoint.*``
  (last.ckpt / snapshots), ``--samples.*`` (EMA sample grids), ``--ilvr_preview.*``,
  ``--fid.*`` (FID of EMA samples every N steps; off unless ``--fid.every_n_steps``), plus
  Lightning's ``LearningRateMonitor`` and ``ThroughputMonitor``, and pre-emption
  (``--slurm_requeue``: under SLURM, SIGUSR1/SIGTERM save a checkpoint at the next step and
  stop; ``training/preemption.py``). Without a terminal the progress bar is replaced by plain
  ``step S/MAX ...`` lines.
- ``data.image_size`` is not a setting: it is the UNet's ``image_size``, so a dataset
  without images of that size is refused before training starts.
- Checkpoint writes are atomic (``AtomicCheckpointIO``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import LearningRateMonitor, ThroughputMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.environments import ClusterEnvironment
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ilvr_toolkit.cli import run_command
from ilvr_toolkit.data import ImageDataModule

from .callbacks import ILVRPreview, SampleGrid
from .checkpointing import (
    EMA,
    AtomicCheckpointIO,
    RunCheckpoint,
    atomic_open,
    find_resume_checkpoint,
)
from .fid_monitor import FIDMonitor
from .module import DiffusionModule, resolve_unet_config
from .preemption import Preemption, StepLines

__all__ = ["RunConfigSaver", "TrainCLI", "main"]

DEFAULT_RUN_DIR = "runs/default"


def _batch_size(batch: Any) -> int:
    """Images in a training batch (ThroughputMonitor's ``batch_size_fn``)."""
    return int((batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0])


def unet_image_size(unet: Any) -> int:
    """``data.image_size`` from ``model.unet`` (preset name or dict)."""
    return resolve_unet_config(unet).image_size


def checkpoint_dir(run_dir: str | None) -> str:
    return os.path.join(run_dir or DEFAULT_RUN_DIR, "checkpoints")


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config to ``RUN/config.yaml`` atomically (safe on requeue).

    When the file exists with different contents (the command changed between restarts),
    the old file is kept as ``config.<YYYYmmdd-HHMMSS>.yaml``.
    """

    def __init__(
        self, parser: LightningArgumentParser, config: Any, config_filename: str = "config.yaml", **_: Any
    ):
        super().__init__(
            parser, config, config_filename=config_filename, overwrite=True, save_to_log_dir=False
        )

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        text = self.parser.dump(self.config, skip_none=False)
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / self.config_filename
        if path.is_file():
            old = path.read_text()
            if old == text:
                return
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            path.with_name(f"{path.stem}.{stamp}{path.suffix}").write_text(old)
        with atomic_open(path, "w") as f:
            f.write(text)


class TrainCLI(LightningCLI):
    """LightningCLI over :class:`DiffusionModule` and :class:`ImageDataModule` (see module doc)."""

    def __init__(
        self,
        args: Any = None,
        run: bool = True,
        trainer_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        defaults = {"default_root_dir": DEFAULT_RUN_DIR, "log_every_n_steps": 50, **(trainer_defaults or {})}
        extra_callbacks = list(defaults.pop("callbacks", []) or [])
        monitors = [LearningRateMonitor("step"), ThroughputMonitor(batch_size_fn=_batch_size, window_size=20)]
        defaults["callbacks"] = [*monitors, *extra_callbacks]
        super().__init__(
            DiffusionModule,
            ImageDataModule,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=defaults,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EMA, "ema")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SampleGrid, "samples")
        parser.add_lightning_class_args(ILVRPreview, "ilvr_preview")
        parser.add_lightning_class_args(FIDMonitor, "fid")
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.link_arguments("model.unet", "data.image_size", compute_fn=unet_image_size)
        parser.add_argument(
            "--init_from",
            "--init-from",
            type=str | None,
            default=None,
            help="fine-tune: initial UNet weights (released plain .pt checked against model.unet, "
            "our .ckpt (its EMA weights) or an exported model file); optimizer state starts fresh",
        )
        parser.link_arguments("init_from", "model.init_from")
        parser.add_argument(
            "--auto_resume",
            type=bool,
            default=True,
            help="resume from the newest of RUN/checkpoints/last.ckpt and RUN/hpc_ckpt_*.ckpt when "
            "no --ckpt_path is given",
        )
        parser.add_argument(
            "--slurm_requeue",
            type=bool,
            default=True,
            help="under SLURM: on SIGUSR1 or SIGTERM save RUN/hpc_ckpt_K.ckpt at the next step and stop "
            "(scripts/slurm/train.sbatch then requeues the job)",
        )

    # ------------------------------------------------------------------ trainer
    def _setting(self, key: str, default: Any = None) -> Any:
        config = self.config_init
        return config.get(str(self.subcommand), config).get(key, default)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self._setting("trainer", {})
        run_dir = config.get("default_root_dir") or DEFAULT_RUN_DIR
        logger = config.get("logger")
        if logger is None or logger is True:
            kwargs["logger"] = TensorBoardLogger(
                save_dir=run_dir, name="", version="tb", default_hp_metric=False
            )
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        requeue = bool(self._setting("slurm_requeue", True))
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            plugins.append(SLURMEnvironment(auto_requeue=False))  # Preemption does it, at a step boundary
        kwargs["plugins"] = plugins
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        kwargs["callbacks"] = [*callbacks, Preemption(enabled=requeue)]
        if not sys.stdout.isatty() and config.get("enable_progress_bar") is not False:
            kwargs["callbacks"].append(StepLines())  # log files get lines, not bar frames
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ resume
    def before_fit(self) -> None:
        fit = self.config_init[self.subcommand]
        if fit.get("ckpt_path") is not None or not fit.get("auto_resume", True):
            return
        run_dir = self.trainer.default_root_dir
        ours = [cb for cb in self.trainer.callbacks if isinstance(cb, RunCheckpoint)]
        folder = (ours[0].dirpath if ours else None) or checkpoint_dir(run_dir)
        found = find_resume_checkpoint(run_dir, folder)
        if found is not None:
            rank_zero_info(f"resuming from {found} (newest of last.ckpt and hpc_ckpt_*.ckpt in {run_dir})")
            fit["ckpt_path"] = str(found)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``: ``export`` (``training/export.py``) or :class:`TrainCLI`,
    both under :func:`ilvr_toolkit.cli.run_command` (a user's mistake is one line)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "export":
        from .export import main as export_main

        return export_main(args[1:])
    return run_command("train.py", _fit, args)


def _fit(args: list[str]) -> int:
    TrainCLI(args=None if args == sys.argv[1:] else args)  # None: LightningCLI reads sys.argv
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Destroy the process group DDP leaves behind (Lightning does not), so that every rank
    exits cleanly: gloo/NCCL threads torn down during interpreter exit can abort a process
    ("terminate called without an active exception"), which a scheduler counts as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
