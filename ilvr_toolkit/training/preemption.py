"""Training as a scheduled job: on pre-emption save and leave the note "saved checkpoint at step S"
for ``scripts/slurm/train.sbatch`` (it requeues; the job resumes; exit 0), or, without that script,
exit 128 + signal (``training/cli.py``); plain progress lines in logs. Lightning's own handler
(``auto_requeue``) is off: it saves inside the signal handler, at any point of a step.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ..batchjob import STOP_SIGNALS, StopSignals, leave_note
from .checkpointing import hpc_checkpoints

__all__ = ["Preemption", "StepLines"]


class Preemption(Callback):
    """SIGUSR1 / SIGTERM, and Ctrl-C (SIGINT) even when not ``enabled`` -> ``RUN/hpc_ckpt_K.ckpt``
    at the next step boundary, stop (under SLURM or not; ``saved_path``, ``saved_step`` and
    ``signum`` say what happened). A second Ctrl-C meanwhile changes nothing (blocked, then dropped).
    For library users: ``Trainer.fit`` then returns normally; check ``signum`` (None: not stopped)
    before treating the run as finished. From setup on, Ctrl-C cannot interrupt a hang (Ctrl-\\ can).
    A preview or FID evaluation that samples meanwhile stops at its next sampling step
    (``callbacks.StopRequested``), so the grace time of a pre-emption is not spent on it.

    The ranks agree at every step boundary (one tiny all-reduce, only with several ranks), so all
    of them save the same step. Lightning raises its ``SIGTERMException`` at a step boundary when
    it saw SIGTERM too (``train.py`` catches it); if nothing was saved yet, ``on_exception`` saves.
    After an error, ``on_exception`` ends the ranks this process started (DDP): none waits on it.
    Older ``hpc_ckpt_*`` files are deleted once the new one is written.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signals: StopSignals | None = None
        self.saved_step: int | None = None
        self.saved_path: Path | None = None
        self.signum = int(signal.SIGTERM)  # the signal that stopped training (when saved_path is set)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before the DataLoader workers are forked: they inherit the blocked signals
        if stage != "fit" or self.signals is not None:
            return
        watched = set(STOP_SIGNALS) if self.enabled else set()  # disabled: they end the task
        if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:  # Ctrl-C, unless ignored (a background job)
            watched.add(signal.SIGINT)
        self.signals = StopSignals(frozenset(watched)).start()  # tells the batch script: signals may come
        if names := "/".join(signal.Signals(s).name for s in sorted(watched)):
            rank_zero_info(f"pre-emption: on {names}, save a checkpoint at the next step and stop")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.signals is not None:
            self.signals.stop()
            self.signals = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.signals is None or self.saved_step is not None:
            return
        requested = self.signals.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self.save(trainer)
            trainer.should_stop = True

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and self.signals is not None and self.saved_step is None:
            self.save(trainer)
        if isinstance(exception, Exception) and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signal.SIGKILL)  # the ranks started here: none waits on this one
        self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown hook after an exception

    def save(self, trainer: pl.Trainer) -> Path:
        """Save ``RUN/hpc_ckpt_K.ckpt`` on every rank; rank 0 leaves the note for the batch script."""
        older = hpc_checkpoints(trainer.default_root_dir)
        path = Path(trainer.default_root_dir) / f"hpc_ckpt_{max(older, default=0) + 1}.ckpt"
        path = Path(trainer.strategy.broadcast(str(path)))
        trainer.save_checkpoint(path, weights_only=False)
        self.saved_step, self.saved_path = trainer.global_step, path
        self.signum = int((self.signals.signum if self.signals else None) or signal.SIGTERM)
        if trainer.is_global_zero:
            for old in older.values():  # the new one is not among them
                with contextlib.suppress(OSError):
                    old.unlink()
            leave_note(f"saved checkpoint at step {trainer.global_step}")
        rank_zero_info(f"pre-emption: saved {path} at step {trainer.global_step}; stopping")
        return path


class StepLines(ProgressBar):
    """Progress as plain lines (``step S/MAX loss ...``) for logs written without a terminal:
    at the first step, every ``every_seconds`` and at the last step; rank 0 only."""

    def __init__(self, every_seconds: float = 30.0) -> None:
        super().__init__()
        self.every_seconds, self.enabled = every_seconds, True
        self.last_line: float | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        last = trainer.global_step >= trainer.max_steps > 0
        due = self.last_line is None or now - self.last_line >= self.every_seconds or last
        if not (self.enabled and trainer.is_global_zero and due):
            return
        self.last_line = now
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        total = trainer.max_steps if trainer.max_steps > 0 else "?"
        print(f"step {trainer.global_step}/{total} epoch {trainer.current_epoch} {text}".rstrip(), flush=True)
