"""Opt-in fast 3x3 convolution for float32 on the CPU: Winograd F(4x4, 3x3) (Lavin & Gray 2016).

A 3x3 stride-1 convolution computes each 4x4 output tile from a 6x6 input tile ``d`` as
``y = A^T [(G g G^T) . (B^T d B)] A``: 36 multiplications per tile and channel pair instead of 144.
The kernel (``winograd.cpp``, built with the system's C++ compiler on first use and cached by
torch under ``TORCH_EXTENSIONS_DIR``) runs the transforms in bands of tile rows that stay in cache,
with 36 GEMMs in between (its own AVX-512 kernel; MKL on CPUs without AVX-512), and the filter
transforms: 1.85-2.2x the direct (oneDNN) convolution forward per ffhq 3x3 layer, 1.75-2.4x with
backward, on a 2-core AVX-512 host (docs/benchmarks.md). Not bitwise: relative error 2-4.5e-6
against float64 up to 512 channels (the direct convolution: 2e-7); bound in
``tests/test_winograd.py``. Gradients: the input's by the same kernel (flipped, transposed
filters), the filters' in the Winograd domain (``dU = sum_t (A gy A^T)(B^T d B)^T``, ``G^T dU G``).
"""

import functools
import hashlib
import logging
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..fileio import atomic_write_bytes

SOURCE = Path(__file__).with_name("winograd.cpp")
BAND_TILES = 256  # tiles per band: V and M of one band stay in L2/L3 (measured best 128-512)
MIN_PIXELS = 32 * 32  # N * H * W below this: the filter transform costs more than it saves
MIN_CHANNELS = 16  # in and out; the RGB convolutions keep the direct kernel
BUILD_FLAGS = ["-O3", "-march=native", "-fopenmp"]  # C++ flags (linked with -fopenmp too)


def _cpu_tag() -> str:
    """Short hash of this CPU's instruction sets and torch's version: the kernel is built with
    ``-march=native``, so nodes of another kind (a shared home on a cluster) build their own."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(f"{flags} {torch.__version__}".encode()).hexdigest()[:10]


class BuildStopped(InterruptedError):
    """The build ended because a stop signal (``signum``; None: not known here) reached the
    process group (``timeout``, Ctrl-C, a scheduler): not a failure of the compiler."""

    def __init__(self, message: str, signum: int | None) -> None:
        super().__init__(message)
        self.signum = signum


def build_folder(name: str) -> Path:
    """Where torch builds extension ``name`` by default (``TORCH_EXTENSIONS_DIR/name``, else its
    per-user cache), given to ``cpp_extension.load`` explicitly so that the module is checked first."""
    from torch.utils.cpp_extension import get_default_build_root

    if root := os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(root) / name
    accelerators = (("rocm", torch.version.hip), ("cu", torch.version.cuda))
    accelerator = next((f"{k}{v.replace('.', '')}" for k, v in accelerators if v), "cpu")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}" / name


def _drop_unverified(library: Path) -> bool:
    """Delete ``library`` (the built module) unless it matches the sha256 recorded beside it when
    it was built and loaded: a damaged file (truncated: SIGBUS on load) is linked again. True if dropped."""
    record = Path(f"{library}.sha256")
    if not library.exists():
        return False
    try:
        if record.read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest():
            return False
    except OSError:
        pass  # no record (an older build): linked again, once
    library.unlink()
    return True


@functools.cache
def kernel():
    """The compiled kernel module (built on first use; a few seconds to a minute). Raises
    OSError naming the source file if it cannot be built (no C++ compiler, no ninja)."""
    return build(f"ilvr_winograd_{_cpu_tag()}", BUILD_FLAGS)


def build(name: str, flags: list[str], source: Path = SOURCE):  # noqa: ANN201 (an extension module)
    """Compile ``source`` (default ``winograd.cpp``) as extension ``name`` with C++ ``flags`` (tests
    build a variant with ``-mno-avx512f``: the MKL path of CPUs without AVX-512; the bench builds
    its candidate kernels); OSError naming the source as :func:`kernel`."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns that there is no CUDA runtime
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    logging.getLogger(__name__).info("Winograd kernel %s: compiled on first use (~20 s), then cached", name)
    folder = build_folder(name)
    library, damaged = folder / f"{name}.so", False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        damaged = _drop_unverified(library)
        module = cpp_extension.load(
            name, [str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(folder)
        )
        if library.exists():  # (not under another name: torch's name_v1 for changed sources in one process)
            atomic_write_bytes(f"{library}.sha256", hashlib.sha256(library.read_bytes()).hexdigest().encode())
        return module
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        stops = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP}
        signum = min(signal.sigpending() & stops, default=None)  # blocked by a StopSignals: pending
        if signum is not None or "interrupted by user" in str(error):  # ninja's words for a signal
            raise BuildStopped(
                f"winograd: the kernel build was stopped by a signal: {first}", signum
            ) from error
        hint = f"; {library} was damaged and could not be linked again: delete {folder}" if damaged else ""
        raise OSError(
            f"winograd: could not build the C++ kernel {source} (needs a C++ compiler and ninja; "
            f"or run without winograd): {first}{hint}"
        ) from error


def transform_filters(weight: torch.Tensor) -> torch.Tensor:
    """Filters g (O, C, 3, 3) float32 CPU -> U = G g G^T as (36, O, C) (the kernel's ``filters``;
    not differentiable: :func:`conv3x3`'s autograd Function owns the filters' gradient)."""
    return kernel().filters(weight, False)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Winograd convolution, padding 1: x (N, C, H, W) float32 CPU with H, W multiples of 4,
    weight (O, C, 3, 3), bias (O,) or None -> (N, O, H, W). Differentiable (once)."""
    return _WinogradConv.apply(x, weight, bias)


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        no_bias = x.new_empty(0)
        return kernel().conv3x3(x, transform_filters(weight), no_bias if bias is None else bias, BAND_TILES)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        """dL/dx = grad (*) flipped, transposed filters (the same kernel); dL/dg = G^T dU G with
        dU from the kernel (Winograd domain); dL/db = grad summed over N, H, W."""
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # once for both kernels (each would copy a strided one)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            u = kernel().filters(weight, True)  # of the flipped, transposed filters: (36, C, O)
            grad_x = kernel().conv3x3(grad, u, grad.new_empty(0), BAND_TILES)
        if ctx.needs_input_grad[1]:
            grad_w = kernel().filters_grad(kernel().conv3x3_grad_u(x, grad, BAND_TILES))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=1)`` (same parameters and state-dict keys) that runs
    :func:`conv3x3` when ``winograd`` is set and the call qualifies (:meth:`uses_winograd`)."""

    winograd: bool = False

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def uses_winograd(self, x: torch.Tensor) -> bool:
        """float32 NCHW-contiguous CPU input (N, C, H, W) outside autocast, H and W multiples of 4,
        >= 16 channels in and out, N * H * W >= MIN_PIXELS, the module still 3x3 / stride 1 /
        padding 1 / zeros / one group; otherwise the stock kernel runs."""
        if not self.winograd or x.dim() != 4:
            return False
        n, c, h, w = x.shape
        return (
            (self.stride, self.padding, self.dilation, self.groups) == ((1, 1), (1, 1), (1, 1), 1)
            and self.padding_mode == "zeros"
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and x.is_contiguous()
            and not torch.is_autocast_enabled("cpu")
            and h % 4 == 0
            and w % 4 == 0
            and n * h * w >= MIN_PIXELS
            and min(c, self.out_channels) >= MIN_CHANNELS
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(x, self.weight, self.bias) if self.uses_winograd(x) else super().forward(x)
