"""Host work that overlaps sampling: decoding the next batch's references and writing the
last batch's PNGs on worker threads, while the accelerator samples the current batch.

PIL releases the GIL while it decodes, resizes and compresses, so the threads run truly in
parallel with the sampling loop (64 PNG writes at 256x256 took 1.02 s on one thread and
0.46 s on two, on this project's 2-core machine; see ``bench/bench_pipeline.py``).
"""

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


class BackgroundIO:
    """A small thread pool for prefetching and writing (``workers=0``: inline). Leaving the ``with``
    block waits for every write and re-raises the first error: no success with a file missing."""

    def __init__(self, workers: int) -> None:
        if workers < 0:
            raise ValueError(f"io_workers must be >= 0, got {workers}")
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ilvr-io") if workers else None
        self._writes: list[Future] = []

    def prefetch(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Callable[[], list[Any]]:
        """Start ``fn`` over ``items`` now; the returned callable waits for the results (in
        order). Inline mode computes them when the callable is called."""
        if self._pool is None:
            return lambda: [fn(item) for item in items]
        futures = [self._pool.submit(fn, item) for item in items]
        return lambda: [future.result() for future in futures]

    def write(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the background (inline mode: now); errors surface in :meth:`drain`."""
        if self._pool is None:
            fn(*args)
        else:
            self._writes.append(self._pool.submit(fn, *args))

    def check(self) -> None:
        """Raise the first error of the writes finished so far, without waiting for the others."""
        if any(future.done() and future.exception() is not None for future in self._writes):
            self.drain()

    def drain(self) -> None:
        """Wait for every write submitted so far; raise the first error (log the others)."""
        writes, self._writes = self._writes, []
        errors = [error for error in (future.exception() for future in writes) if error is not None]
        for error in errors[1:]:
            log.error("another background write failed too: %s", error)
        if errors:
            raise errors[0]

    def __enter__(self) -> "BackgroundIO":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        failing = exc_type is not None
        if self._pool is not None:  # already failing: drop queued work, let running writes finish
            self._pool.shutdown(wait=True, cancel_futures=failing)
        if not failing:
            self.drain()
        for future in self._writes:  # failing: keep the run's error, log the writes' own
            if not future.cancelled() and future.exception() is not None:
                log.error("background write failed while the run was stopping: %s", future.exception())
        self._writes = []
