"""``train.py``: LightningCLI for domain DDPMs, with a fixed run directory and auto-resume.

    python train.py fit --config configs/tiny.yaml --data.path datasets/tiny.lmdb --trainer.max_steps 500
    python train.py fit --config configs/afhq_dog256.yaml --init_from checkpoints/ffhq_10m.pt   # fine-tune
    python train.py fit --config configs/tiny.yaml --print_config                              # resolved config
    python train.py export runs/tiny/checkpoints/last.ckpt                                     # EMA -> .pt files

What it adds to Lightning's CLI (the run directory layout is in docs/training.md): a fixed run
directory ``RUN`` = ``trainer.default_root_dir`` (no ``version_N``); resume from the newest of
``last.ckpt`` and ``hpc_ckpt_*.ckpt``; always-on callbacks (``--ema.*``, ``--checkpoint.*``,
``--samples.*``, ``--ilvr_preview.*``, ``--fid.*``), pre-emption and plain log lines. The
dataset's ``data.image_size`` is the UNet's, so a dataset without that size is refused before training.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import LearningRateMonitor, ThroughputMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.environments import ClusterEnvironment
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only

from ..cli import (
    UsageError,
    check_config_files,
    check_paths,
    check_range,
    run_command,
    setup_logging,
    unknown_key,
)
from ..data import ImageDataModule
from ..evaluation.stats import rank_world
from ..fileio import atomic_write_bytes, lock_folder
from ..models import load_state_dict_file
from ..runtime import tune_process
from .callbacks import EveryNSteps, ILVRPreview, SampleGrid
from .checkpointing import EMA, AtomicCheckpointIO, RunCheckpoint, find_resume_checkpoint
from .fid_monitor import FIDMonitor
from .module import DiffusionModule, resolve_unet_config
from .preemption import Preemption, StepLines

__all__ = ["RunConfigSaver", "TrainCLI", "main"]

DEFAULT_RUN_DIR = "runs/default"
# float32 weights (EMA.update, the checkpoints): "*-true" other than 32 and transformer-engine are not
TRAIN_PRECISIONS = {"32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16"}


def _as_list(value: Any) -> list[Any]:
    """A trainer setting that takes one item or a list (``plugins``, ``callbacks``) as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value] if value is not None else []


def _batch_size(batch: Any) -> int:
    """Images in a training batch (ThroughputMonitor's ``batch_size_fn``)."""
    return int((batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0])


def checkpoint_dir(run_dir: str | None) -> str:
    return os.path.join(run_dir or DEFAULT_RUN_DIR, "checkpoints")


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config to ``RUN/config.yaml`` atomically (safe on requeue); one with other
    contents (the command changed between restarts) is kept as ``config.<YYYYmmdd-HHMMSS>.yaml``."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        text = self.parser.dump(self.config, skip_unset=False)
        path = Path(trainer.default_root_dir) / self.config_filename
        old = path.read_text() if path.is_file() else None
        if old == text:
            return
        if old is not None:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            path.with_name(f"{path.stem}.{stamp}{path.suffix}").write_text(old)
        atomic_write_bytes(path, text.encode())  # creates RUN


MAIN_HELP = (
    "train.py fit: train a domain DDPM on an LMDB dataset (rerun the same command to resume); "
    "train.py export CKPT: its EMA weights as guided-diffusion files (train.py export --help). "
    "--debug (or ILVR_DEBUG=1): on an error, print the traceback too."
)
FIT_HELP = "Train (or resume) a domain DDPM; docs/training.md. --debug: on an error, print the traceback too."


class TrainCLI(LightningCLI):
    """LightningCLI over :class:`DiffusionModule` and :class:`ImageDataModule` (see module doc)."""

    def __init__(
        self,
        args: Any = None,
        run: bool = True,
        trainer_defaults: dict[str, Any] | None = None,
        preemption: Preemption | None = None,
        **kwargs: Any,
    ):
        self.preemption = preemption or Preemption()  # the caller's: it tells what stopped training
        self.fit_parser: LightningArgumentParser | None = None  # its keys: the valid ones for a typo
        self.ckpt_hparams: dict[str, Any] | None = None  # --ckpt_path's, read before LightningCLI does
        self.given_model: dict[str, Any] = {}  # the model settings given, put back over those
        strict = {"exit_on_error": False, "allow_abbrev": False}  # --model.optim.l is no --model.optim.lr
        defaults = {"default_root_dir": DEFAULT_RUN_DIR, "log_every_n_steps": 50, **(trainer_defaults or {})}
        monitors = [LearningRateMonitor("step"), ThroughputMonitor(batch_size_fn=_batch_size, window_size=20)]
        defaults["callbacks"] = [*monitors, *(defaults.pop("callbacks", []) or [])]
        super().__init__(
            DiffusionModule,
            ImageDataModule,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            trainer_defaults=defaults,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            parser_kwargs={"fit": {**strict, "description": FIT_HELP}, **strict, "description": MAIN_HELP},
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` only: the module has no validation, test or predict step."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.fit_parser = self.fit_parser or parser  # called for fit first, then validate, test ...
        groups = {"ema": EMA, "checkpoint": RunCheckpoint, "samples": SampleGrid}
        for key, callback in {**groups, "ilvr_preview": ILVRPreview, "fid": FIDMonitor}.items():
            parser.add_lightning_class_args(callback, key)
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.link_arguments("model.unet", "data.image_size", compute_fn=_unet_image_size)
        parser.add_argument(
            "--init_from", "--init-from", type=str | None, default=None,
            help="fine-tune: initial UNet weights (released plain .pt checked against model.unet, "
            "our .ckpt (its EMA weights) or an exported model file); optimizer state starts fresh",
        )  # fmt: skip
        parser.link_arguments("init_from", "model.init_from")
        parser.add_argument(
            "--auto_resume", type=bool, default=True,
            help="resume from the newest of RUN/checkpoints/last.ckpt and RUN/hpc_ckpt_*.ckpt, also over "
            "a --ckpt_path of an earlier step (false: from --ckpt_path, else from scratch)",
        )  # fmt: skip
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="torch intra-op threads, >= 1 (null: SLURM_CPUS_PER_TASK under SLURM, else torch's default)",
        )  # fmt: skip
        parser.add_argument(
            "--cpu_malloc", type=Literal["tuned", "default"], default="tuned",
            help="tuned: glibc malloc keeps freed memory (no page-fault storm per step; same numbers)",
        )  # fmt: skip
        parser.add_argument(
            "--slurm_requeue", type=bool, default=True,
            help="on SIGUSR1 or SIGTERM (Ctrl-C: always) save RUN/hpc_ckpt_K.ckpt at the next step and stop: "
            "under scripts/slurm/train.sbatch exit 0 (it requeues the job), else exit 128 + signal (rerun to resume)",
        )  # fmt: skip

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, check the paths, lock the run directory (rank 0: the launching process of DDP)."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:  # an unknown key: name its file and the valid keys
            configs = check_config_files(sys.argv[1:] if args is None else list(args))
            if (line := unknown_key(error, self.fit_parser.get_defaults(), configs)) is None:
                raise
            raise UsageError(line) from None
        fit = self.config.get("fit") if self.config.get("subcommand") == "fit" else None
        if fit is None:
            return
        ckpt = fit.ckpt_path if fit.ckpt_path not in ("last", "hpc", "best") else None
        run_dir = fit.trainer.default_root_dir or DEFAULT_RUN_DIR
        named = {"data.path": fit.data.path, "init_from": fit.init_from, "ckpt_path": ckpt}
        # missing Inception weights: FIDMonitor's setup names the file, its hash and where it goes
        named.update({"fid.reference.images": fit.fid.reference.images})
        check_paths({**named, "ilvr_preview.references": fit.ilvr_preview.references})
        if (precision := fit.trainer.precision) is not None and str(precision) not in TRAIN_PRECISIONS:
            raise UsageError(
                f"--trainer.precision {precision}: not supported for training (the EMA, the loss and "
                "the checkpoints are float32); use 32-true (or 32), bf16-mixed or 16-mixed"
            )
        if fit.model.optim.fused and fit.trainer.gradient_clip_val and str(precision) in ("16-mixed", "16"):
            raise UsageError(  # GradScaler: fused AdamW unscales inside its step, Lightning cannot clip
                f"--model.optim.fused true with --trainer.gradient_clip_val {fit.trainer.gradient_clip_val} "
                "under 16-mixed: the fused AdamW unscales inside its step, so nothing can clip the gradients; "
                "set --trainer.gradient_clip_val 0 or --model.optim.fused false, or use bf16-mixed"
            )
        if ckpt:
            self.ckpt_hparams = _resume_hparams(parser, self.config, ckpt)
            self.given_model = self._given_model_settings(fit.model, ckpt, _model_keys_named(args))
        named = f"--trainer.default_root_dir {run_dir}"
        holder = lock_folder(run_dir, named=named) if rank_zero_only.rank == 0 else None
        if holder is not None:
            raise UsageError(f"--trainer.default_root_dir {run_dir}: in use by {holder} ({run_dir}/.lock)")

    def _setting(self, key: str, default: Any = None) -> Any:
        config = self.config_init
        return config.get(str(self.subcommand), config).get(key, default)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        if self.subcommand == "fit" and self.ckpt_hparams is not None:
            self._keep_given_model_settings(config)
        if (threads := config.get("threads")) is not None:
            check_range("threads", threads, 1)
        trainer = config.get("trainer") or {}
        # Lightning takes these unchecked: a negative clip value silently turns clipping off, 0 divides
        for key, low in {
            "accumulate_grad_batches": 1,
            "log_every_n_steps": 0,
            "gradient_clip_val": 0.0,
        }.items():
            if trainer.get(key) is not None:
                check_range(f"trainer.{key}", trainer[key], low)

    def _given_model_settings(self, model: Any, ckpt: str, named: set[str]) -> dict[str, Any]:
        """The ``model.*`` settings given (``named`` keys, or not at their defaults), before LightningCLI
        puts the ``--ckpt_path`` checkpoint's over them; a UNet of another architecture is refused."""
        defaults = self.fit_parser.get_defaults().model
        given = {k: v for k, v in model.items() if _named(k, named) or v != defaults.get(k)}
        if "unet" in given:
            ours, theirs = resolve_unet_config(given["unet"]), self.ckpt_hparams.get("unet")
            if differ := _model_differences(theirs, ours.architecture()):
                raise UsageError(
                    f"--model.unet: --ckpt_path {ckpt} holds a run of another model ({differ}); leave "
                    "out --model.unet (the checkpoint's is used), or start a new run with --init_from"
                )
            if theirs is None or ours.to_dict() == resolve_unet_config(theirs).to_dict():
                given.pop("unet")
        return given

    def _keep_given_model_settings(self, config: Any) -> None:
        """Put the given model settings back over the checkpoint's (as auto-resume uses them), saying so."""
        model = config.model
        kept = [
            f"model.{k} {v} (the checkpoint's: {model.get(k)})"
            for k, v in self.given_model.items()
            if model.get(k) != v
        ]
        for key, value in self.given_model.items():
            model[key] = value
        if kept:
            rank_zero_info(
                f"--ckpt_path {config.ckpt_path}: the given settings replace the checkpoint's: {'; '.join(kept)}"
            )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self._setting("trainer", {})
        run_dir = config.get("default_root_dir") or DEFAULT_RUN_DIR
        if config.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(run_dir, name="", version="tb", default_hp_metric=False)
        plugins = _as_list(config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        requeue = bool(self._setting("slurm_requeue", True))
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            plugins.append(SLURMEnvironment(auto_requeue=False))  # Preemption does it, at a step boundary
        kwargs["plugins"] = plugins
        self.preemption.enabled = requeue
        kwargs["callbacks"] = [*_as_list(config.get("callbacks")), self.preemption]
        if not sys.stdout.isatty() and config.get("enable_progress_bar") is not False:
            kwargs["callbacks"].append(StepLines())  # log files get lines, not bar frames
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as error:  # name the trainer setting it is about
            raise UsageError(
                f"{_trainer_option(str(error), config)}{error}"
            ) from None  # e.g. devices vs SLURM

    def before_fit(self) -> None:
        environment = getattr(self.trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment):  # devices/nodes vs the job's tasks: before fit says it
            try:
                environment.validate_settings(
                    num_devices=self.trainer.num_devices, num_nodes=self.trainer.num_nodes
                )
            except ValueError as error:
                raise UsageError(
                    f"{_trainer_option(str(error), self._setting('trainer', {}))}{error}"
                ) from None
        self.datamodule.check_batch_size(self.trainer.world_size)
        for callback in self.trainer.callbacks:  # previews, FID: their samplers, before the first step
            if isinstance(callback, EveryNSteps) and callback.every_n_steps:
                callback.check_sampler(self.model.diffusion_config)
        _MEMORY["setting"] = f"--data.batch_size {self.datamodule.batch_size}"  # what running out names
        fit = self.config_init[self.subcommand]
        tune_process(fit.get("threads"), cpu_malloc=fit.get("cpu_malloc", "tuned") == "tuned")
        # resume never unpickles code, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says
        fit["weights_only"] = True
        given = fit.get("ckpt_path")
        if given in ("last", "hpc", "best") or not fit.get("auto_resume", True):
            return
        run_dir = self.trainer.default_root_dir
        ours = self.trainer.checkpoint_callback  # the RunCheckpoint
        folder = (ours.dirpath if ours else None) or checkpoint_dir(run_dir)
        if (found := _newer_in_run(run_dir, folder, given)) is not None:
            stored = (load_state_dict_file(found, mmap=True).get("hyper_parameters") or {}).get("unet")
            if differ := _model_differences(stored, self.model.unet_config.architecture()):
                raise UsageError(
                    f"--model.unet: {run_dir} holds a run of another model ({differ}); "
                    "use the run's settings or a new --trainer.default_root_dir"
                )
            if given is None:
                rank_zero_info(
                    f"resuming from {found} (newest of last.ckpt and hpc_ckpt_*.ckpt in {run_dir})"
                )
            fit["ckpt_path"] = str(found)


def _newer_in_run(run_dir: str, folder: str, given: str | None) -> Path | None:
    """The checkpoint to resume from in ``run_dir`` (``find_resume_checkpoint``): with a ``--ckpt_path``
    (``given``), only one of a later step (this run's, written since it started from ``given``: a
    requeued job or a rerun must not go back to ``given`` and lose them), saying so."""
    try:
        found = find_resume_checkpoint(run_dir, folder)
    except UsageError:  # every one damaged: --ckpt_path is what the error advises
        if given is None:
            raise
        return None
    if given is None or found is None:
        return found
    step = load_state_dict_file(found, mmap=True).get("global_step", 0)
    if step <= load_state_dict_file(given, mmap=True).get("global_step", 0):
        return None
    rank_zero_info(
        f"--ckpt_path {given}: {run_dir} holds a newer checkpoint (step {step}): resuming from {found}"
    )
    return found


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``: ``export`` (``training/export.py``) or :class:`TrainCLI`,
    both under :func:`ilvr_toolkit.cli.run_command` (a user's mistake is one line)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "export":
        from .export import main as export_main

        return export_main(args[1:])
    _MEMORY["setting"] = ""  # until this run's settings are known
    memory = lambda: _MEMORY["setting"]  # noqa: E731
    return run_command("train.py", _fit, args, (MisconfigurationException,), _rank, memory)


#: the setting an out-of-memory error names (set once the run's settings are known)
_MEMORY = {"setting": ""}


def _no_adverts(record: logging.LogRecord) -> bool:
    """Drop Lightning's "💡 Tip: ... try installing ..." lines (cloud-service adverts) from the log."""
    return not str(record.msg).startswith("💡 Tip:")


def _fit(args: list[str]) -> int:
    setup_logging()
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_no_adverts)
    check_config_files(args)  # a missing file or invalid YAML: one line naming the file
    stop = Preemption()
    try:
        TrainCLI(args=None if args == sys.argv[1:] else args, preemption=stop)  # None: reads sys.argv
    except SIGTERMException:  # Lightning saw SIGTERM too: it ends fit with this SystemExit(0)
        if stop.saved_path is None:  # --slurm_requeue false: Lightning's handler stopped training
            print("train.py: stopped by signal 15, nothing saved since the last checkpoint", file=sys.stderr)
            return 143
    except SystemExit as exit_:  # Ctrl-C before our handler is set up (DDP start): Lightning's sys.exit(1)
        if exit_.code != 1 or not isinstance(exit_.__context__, KeyboardInterrupt):
            raise
        if rank_zero_only.rank == 0:
            print("train.py: interrupted", file=sys.stderr)  # as run_command says it
        return 130
    except RuntimeError as error:  # a collective whose peer's process ended: one line, not gloo's traceback
        if not (_rank() and _PEER_GONE.search(str(error))):
            raise
        raise ConnectionError("another process of the run stopped (its error, if any, is above)") from error
    _leave_process_group()
    if stop.saved_path is None or os.environ.get("ILVR_REQUEUE_NOTE"):
        return 0  # done, or stopped for the batch script, which requeues (its note says so)
    if rank_zero_only.rank == 0:
        print(
            f"train.py: stopped by signal {stop.signum} at step {stop.saved_step} (saved {stop.saved_path}); "
            "rerun the same command to resume",
            file=sys.stderr,
        )
    return 128 + stop.signum  # the run is not complete: a retry loop or scheduler must see it


def _model_differences(stored: Any, ours: dict[str, Any]) -> str:
    """The architecture settings in which a checkpoint's ``unet`` hyperparameter (None: unknown)
    differs from ``ours`` (``UNetConfig.architecture()``), e.g. ``channel_mult [1] vs [1, 2]``; '' if none."""
    theirs = resolve_unet_config(stored).architecture() if stored is not None else ours
    return ", ".join(f"{k} {theirs.get(k)} vs {v}" for k, v in ours.items() if theirs.get(k) != v)


def _unet_image_size(unet: Any) -> int:
    """``data.image_size`` from ``model.unet``; a mistake in it is a :class:`UsageError` naming
    ``--model.unet`` (not the link that computes the size)."""
    try:
        return resolve_unet_config(unet).image_size
    except (TypeError, ValueError, KeyError) as error:  # KeyError: an unknown preset
        raise UsageError(f"--model.unet: {error.args[0] if error.args else error}") from None


def _named(key: str, named: set[str]) -> bool:
    """Whether setting ``key`` (``optim.lr``; ``unet``, a dict) is, is in, or holds one of ``named``."""
    return any(n == key or n.startswith(f"{key}.") or key.startswith(f"{n}.") for n in named)


def _model_keys_named(args: Any) -> set[str]:
    """The ``model.*`` keys that ``args`` (None: ``sys.argv[1:]``) or its ``--config`` files set,
    even to their defaults: ``--model.unet tiny`` names ``unet``, ``model: {optim: {lr: 1}}`` ``optim.lr``."""
    if isinstance(args, dict):
        sections = [_model_section(args)]
    else:
        args = sys.argv[1:] if args is None else list(args)
        sections = [_model_section(_yaml_text(Path(path).read_text())) for path in check_config_files(args)]
        for token, after in zip(args, [*args[1:], ""], strict=True):
            option, eq, value = token.partition("=")
            if option == "--model":
                sections.append(_yaml_text(value if eq else after))
            elif option.startswith("--model."):
                sections.append({option.removeprefix("--model."): None})
    return {key for section in sections for key in _dotted(section)}


def _dotted(section: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's leaves: ``{optim: {lr: 1}}`` -> ``[optim.lr]``."""
    if not isinstance(section, dict):
        return [prefix.rstrip(".")] if prefix else []
    return [key for k, v in section.items() for key in _dotted(v, f"{prefix}{k}.")]


def _model_section(config: Any) -> Any:
    """``config``'s ``model`` (or ``fit: model``) section, if it has one."""
    config = config.get("fit", config) if isinstance(config, dict) else None
    return config.get("model") if isinstance(config, dict) else None


def _yaml_text(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # the parser names it


def _resume_hparams(parser: LightningArgumentParser, config: Any, path: str) -> dict[str, Any]:
    """The hyper_parameters of the ``--ckpt_path`` checkpoint, checked before anything is written: a
    weights file or a checkpoint whose settings this version lacks is a :class:`UsageError`."""
    ckpt = load_state_dict_file(path, mmap=True)  # checked, not loaded; LightningCLI loads it next
    if "pytorch-lightning_version" not in ckpt:
        raise UsageError(
            f"--ckpt_path {path}: not a train.py checkpoint (.ckpt) but a file of weights only; to start "
            f"from released or exported weights use --init_from {path}"
        )
    hparams = dict(ckpt.get("hyper_parameters") or {})
    try:  # what LightningCLI does next, which would blame an option the user never gave
        parser.parse_object({"fit": {"model": hparams}}, config.clone())
    except argparse.ArgumentError as error:
        raise UsageError(
            f"--ckpt_path {path}: its hyper_parameters do not fit this version ({error}; docs/training.md, "
            f"keys renamed since 0.1.0); to start from its weights use --init_from {path}"
        ) from None
    return hparams


def _trainer_option(message: str, trainer: Any) -> str:
    """``--trainer.KEY VALUE: `` for the first trainer setting a Lightning error names, else ''."""
    aliases = {"duration": "max_time", "backend": "accelerator"}  # Timer(duration=), "no gpu backend"
    for word in re.findall(r"\w+", message):
        value = trainer.get(key := aliases.get(word, word))
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return f"--trainer.{key} {value}: "
    return ""


_PEER_GONE = re.compile(r"by peer|remote (worker|process)")  # gloo's, NCCL's words for it


def _rank() -> str:
    """``"rank R: "`` in a process of a run with several ranks, else ``""``."""
    rank, world = rank_world()
    return f"rank {rank}: " if world > 1 else ""


def _leave_process_group() -> None:
    """Destroy the process group DDP leaves behind (Lightning does not), so that every rank
    exits cleanly: gloo/NCCL threads torn down during interpreter exit can abort a process
    ("terminate called without an active exception"), which a scheduler counts as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
