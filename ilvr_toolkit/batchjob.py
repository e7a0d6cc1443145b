"""What a job without a terminal needs (docs/cluster.md): SIGUSR1/SIGTERM turned into a flag
read at a step or batch boundary (:class:`StopSignals`), a one-line note for the batch script,
which requeues the job after its tasks ended (``ILVR_REQUEUE_NOTE``), and plain progress lines.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .fileio import atomic_write_bytes

__all__ = ["StopSignals", "LineProgress", "leave_note", "progress_bar", "signals_ready"]
__all__ += ["worker_ends_on_parents_sigterm"]

STOP_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGTERM})

log = logging.getLogger("ilvr_toolkit")


def leave_note(text: str) -> None:
    """Write ``text`` to ``$ILVR_REQUEUE_NOTE`` (the batch script prints it and requeues)."""
    if path := os.environ.get("ILVR_REQUEUE_NOTE"):
        atomic_write_bytes(path, (text + "\n").encode())


def signals_ready(ready: bool = True) -> None:
    """Tell the batch script that a stop signal may reach this task now (it touches
    ``$ILVR_STOP_READY.<node>.<SLURM_LOCALID>``; one that comes earlier waits until every task's
    file is there) or, with ``ready=False``, no more: the task is finishing (the file is renamed
    ``<that>.done``)."""
    name, env = os.environ.get("ILVR_STOP_READY"), os.environ
    path = Path(f"{name}.{env.get('SLURMD_NODENAME', 'node')}.{env.get('SLURM_LOCALID', '0')}")
    with contextlib.suppress(OSError):
        if name and ready:
            path.touch()
        elif name:
            path.rename(f"{path}.done")


def worker_ends_on_parents_sigterm(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a worker forked while :class:`StopSignals` blocks SIGTERM keeps
    it blocked (a pre-emption signals every process of the step; the worker must live until the
    training process saved), so its parent could not end it either: the DataLoader's shutdown and
    multiprocessing's exit handler ``terminate()`` a worker with SIGTERM, then wait for it (after a
    worker's error: forever). A thread takes SIGTERM here: the parent's ends the worker, others are dropped."""
    parent = multiprocessing.parent_process()
    if parent is None or signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        return

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent.pid:
            pass
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


class StopSignals:
    """While started, SIGUSR1 and SIGTERM (or the given ``signals``) set :attr:`requested` instead
    of ending the process.

    The main thread also blocks both signals (``pthread_sigmask``), so that processes forked
    meanwhile (DataLoader workers) inherit them blocked: slurmstepd signals every process of
    a step, and a worker ended by SIGTERM makes the DataLoader fail the training with "worker
    killed by signal". A signal that no thread accepts stays pending; :attr:`requested` sees
    it. ``stop()`` drops what is pending (already answered) and restores everything.
    """

    def __init__(self, signals: frozenset[int] = STOP_SIGNALS) -> None:
        self.signum: int | None = None
        self.signals = signals
        self._previous: dict[int, Any] = {}
        self._mask: set[int] = set()

    def start(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self.signum = None
            self._previous = {s: signal.signal(s, self._handler) for s in self.signals}
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
            signals_ready()
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        if self.signum is None and self._previous:
            self.signum = min(signal.sigpending() & self.signals, default=None)
        return self.signum is not None

    def stop(self) -> None:
        if not self._previous:
            return
        signals_ready(False)
        while signal.sigpending() & self.signals - self._mask:
            signal.sigtimedwait(self.signals - self._mask, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class LineProgress:
    """``desc done/total`` log lines: at the first update, every ``every_seconds``, at the end."""

    def __init__(self, total: int, desc: str, every_seconds: float = 30.0) -> None:
        self.total, self.desc, self.every_seconds = total, desc, every_seconds
        self.done, self._start, self._last = 0, time.monotonic(), None

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._last is None or now - self._last >= self.every_seconds or self.done >= self.total:
            rate = self.done / max(now - self._start, 1e-9)
            log.info("%s %d/%d (%.2f/s)", self.desc, self.done, self.total, rate)
            self._last = now

    def close(self) -> None:
        """Nothing to release (the interface of a tqdm bar)."""


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """Progress over ``total`` images with ``update(n)`` and ``close()``: a tqdm bar on a terminal,
    :class:`LineProgress` log lines when stderr is a file (a batch job's log), nothing when not
    ``enabled``."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True)
