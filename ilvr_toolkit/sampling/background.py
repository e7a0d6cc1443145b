"""Host work that overlaps sampling: decoding the next batch's references and writing the
last batch's PNGs on worker threads, while the accelerator samples the current batch.

PIL releases the GIL while it decodes, resizes and compresses, so the threads run truly in
parallel with the sampling loop (64 PNG writes at 256x256 took 1.02 s on one thread and
0.46 s on two, on this project's 2-core machine; see ``bench/bench_pipeline.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["BackgroundIO"]

T = TypeVar("T")
R = TypeVar("R")


class BackgroundIO:
    """A small thread pool for prefetching and writing; ``workers=0`` runs everything inline.

    Use as a context manager: leaving the block waits for every write and re-raises the first
    write error, so a run never reports success with a file missing.
    """

    def __init__(self, workers: int) -> None:
        if workers < 0:
            raise ValueError(f"io_workers must be >= 0, got {workers}")
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ilvr-io") if workers else None
        self._writes: list[Future] = []

    def prefetch(self, fn: Callable[[T], R], items: Sequence[T]) -> Callable[[], list[R]]:
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

    def drain(self) -> None:
        """Wait for every write submitted so far; raise the first error among them."""
        writes, self._writes = self._writes, []
        errors = [error for error in (future.exception() for future in writes) if error is not None]
        if errors:
            raise errors[0]

    def __enter__(self) -> BackgroundIO:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.drain()
            else:  # already failing: let the writes finish, keep the original error
                for future in self._writes:
                    future.exception()
                self._writes = []
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
