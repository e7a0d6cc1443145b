"""Process-wide runtime settings: the device, intra-op threads, and the glibc allocator tuning
of :func:`set_cpu_malloc`. The command-line tools apply both with :func:`tune_process` (on by
default, one log line says what was set); library users opt in by calling it themselves."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Iterator

import torch

from .cli import UsageError

__all__ = ["configure_threads", "resolve_device", "set_cpu_malloc", "tune_process", "tuned_cpu_malloc"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
# Any mallopt call freezes glibc's dynamic mmap threshold, so "untuned" cannot go back to
# the dynamic default; it is set to what the dynamic rule converges to once blocks of up to
# 32 MiB have been freed (mmap threshold 32 MiB, trim threshold twice that).
_GLIBC_UNTUNED = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20, _M_MMAP_MAX: 65536}
_GLIBC_TUNED = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: -1}  # -1: never trim (1 GiB still faulted at batch 8)
_MALLOC = {"tuned": False}  # what set_cpu_malloc last set in this process


def set_cpu_malloc(tuned: bool) -> bool:
    """Keep freed CPU tensor memory in the process instead of returning it to the OS.

    PyTorch's CPU allocator calls malloc/free directly. glibc serves every block above
    its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, so
    each large activation (a 128 x 256 x 256 fp32 map is 32 MiB) is page-faulted in and
    zeroed by the kernel again on every forward: measured 4.4e5-5.4e5 minor faults and
    ~0.7 s of system time per ffhq forward at batch 1 (``bench/bench_unet.py``).
    ``tuned=True`` sets ``M_MMAP_MAX=0`` (serve large blocks from the heap) and
    ``M_TRIM_THRESHOLD=-1`` (never shrink it), the runtime equivalent of ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<larger than the peak>``; the price is that the process keeps its peak heap
    until it exits. ``tuned=False`` sets glibc's converged defaults back (see
    ``_GLIBC_UNTUNED``; only a fresh process has the truly dynamic ones) and trims the heap.

    Affects the whole process (every thread, CUDA host allocations included); numerics are
    untouched (same kernels, same order). Returns False where this is not glibc.
    """
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # the process's C library
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return False  # not glibc (musl, macOS, Windows)
    ok = all(libc.mallopt(k, v) for k, v in (_GLIBC_TUNED if tuned else _GLIBC_UNTUNED).items())
    _MALLOC["tuned"] = tuned and ok
    if not tuned:
        libc.malloc_trim(0)
    return ok


@contextlib.contextmanager
def tuned_cpu_malloc(enabled: bool = True) -> Iterator[bool]:
    """:func:`set_cpu_malloc` ``(True)`` inside the block, glibc's defaults (and a heap trim)
    after it; yields whether the tuning is in effect. ``enabled=False``, or a process already
    tuned (``tune_process``, the command-line tools): leaves the allocator as it is."""
    if _MALLOC["tuned"]:
        yield True
        return
    applied = enabled and set_cpu_malloc(True)
    try:
        yield applied
    finally:
        if applied:
            set_cpu_malloc(False)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads and return the count in effect.

    ``threads`` None or 0: ``SLURM_CPUS_PER_TASK`` when the job runs under SLURM (a task
    bound to k CPUs runs k threads, not one per core of the node), else torch's default.
    """
    if threads is not None and not (isinstance(threads, int) and threads >= 0):
        error = ValueError if isinstance(threads, int) else TypeError
        raise error(f"threads: expected an int >= 1 (None or 0: automatic), got {threads!r}")
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if not threads and not ((slurm.isdigit() and int(slurm) >= 1) or slurm == ""):
        raise UsageError(f"SLURM_CPUS_PER_TASK={slurm!r}: expected a whole number of CPUs, >= 1")
    threads = threads or int(slurm or 0)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def tune_process(threads: int | None = None, cpu_malloc: bool = True) -> str:
    """Set torch's intra-op threads (:func:`configure_threads`) and, with ``cpu_malloc``, keep
    freed CPU memory in the process (:func:`set_cpu_malloc`: no page-fault storm per forward or
    training step; bitwise the same numbers). Logs and returns one line saying what was set."""
    count = configure_threads(threads)
    source = (
        "--threads"
        if threads
        else "SLURM_CPUS_PER_TASK"
        if os.environ.get("SLURM_CPUS_PER_TASK")
        else "torch"
    )
    tuned = cpu_malloc and set_cpu_malloc(True)
    malloc = "keeps freed memory (M_MMAP_MAX=0, no trimming)" if tuned else "glibc default"
    line = f"process tuning: {count} torch threads ({source}); malloc: {malloc}"
    logging.getLogger("ilvr_toolkit").info(line)
    return line


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; anything else as ``torch.device`` reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:  # a user's value: one line, exit status 2
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from error
    count = torch.cuda.device_count() if device.type == "cuda" else None
    if count is not None and (device.index or 0) >= count:
        raise UsageError(f"--device {name}: this machine has {count} usable CUDA devices; use cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use cpu or auto")
    return device
