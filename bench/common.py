"""Helpers shared by the bench/ scripts: devices and precisions, timing, tables, JSON.

Timing rules (see docs/benchmarks.md):

- warm up first (module load, oneDNN/cuDNN algorithm choice, compilation stay out);
- on CUDA, time with events around the region; on the CPU with ``perf_counter``, after a
  synchronize either way;
- repeat and take the median; report the spread (min, max) next to it;
- compare variants *interleaved* (A B B A A B ...) in one process, so drift from other jobs
  on a shared machine hits both alike, and prefer ratios measured in the same run over
  absolute numbers.

Results go to ``bench/results/<name>.json`` (git-ignored) with the environment they were
measured in (torch version, CPU/GPU, threads, load average, command line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"

#: Autocast dtype per precision name (None: plain float32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "PRECISIONS",
    "REPO",
    "RESULTS_DIR",
    "Timing",
    "add_common_args",
    "add_repo_to_path",
    "autocast",
    "build_extension",
    "count_flops",
    "environment",
    "format_table",
    "interleave",
    "load_average",
    "matmul_gflops",
    "parse_list",
    "print_table",
    "randomize_parameters_",
    "resolve_device",
    "set_cpu_malloc",
    "setup",
    "synchronize",
    "time_fn",
    "write_json",
    "write_random_inception_weights",
]


def add_repo_to_path() -> None:
    """Make ``import ilvr_toolkit`` work from a plain checkout (no ``pip install -e``)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


add_repo_to_path()
sys.path.insert(1, str(REPO / "tests"))  # the test helpers below
from random_inception import write_random_inception_weights  # noqa: E402  (tests/random_inception.py)

from ilvr_toolkit.runtime import set_cpu_malloc  # noqa: E402  (the bench scripts' allocator switch)


# --------------------------------------------------------------------------- devices
def build_extension(name: str, source: Path):  # noqa: ANN201 (a compiled extension module)
    """Compile a bench C++ source as extension module ``name`` with the library's Winograd flags."""
    add_repo_to_path()
    from ilvr_toolkit.models import winograd

    return winograd.build(name, winograd.BUILD_FLAGS, source)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` ("fp32" disables it)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf if ``out`` is not finite)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# G of Winograd F(4x4, 3x3) in float64 (the kernel's C++ has its own float32 copy): U = G g G^T
WINOGRAD_G = torch.tensor(
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6]]
    + [[1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
    dtype=torch.float64,
)


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds of repeated runs of one thing; summary statistics over them."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def min(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def max(self) -> float:
        return max(self.seconds) if self.seconds else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: the run-to-run noise of this measurement."""
        return (self.max - self.min) / self.median if self.seconds else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.min,
            "max_s": self.max,
            "spread": self.spread,
            "seconds": self.seconds,
        }


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    synchronize(device)
    tic = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - tic


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return Timing([_time_once(fn, device) for _ in range(repeats)])


def interleave(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device,
    *,
    rounds: int = 3,
    warmup: int = 1,
    between: Callable[[], Any] | None = None,
) -> dict[str, Timing]:
    """Time several variants alternately: round r runs them in order, round r+1 reversed
    (A B, B A, A B, ...), so a slow drift of the machine affects each variant alike.

    ``between`` (if given) runs untimed before each timed call (e.g. a reference matmul
    measurement that must sit next to it in time).
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    out = {name: Timing() for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            if between is not None:
                between()
            out[name].seconds.append(_time_once(fns[name], device))
    return out


def matmul_gflops(
    device: torch.device,
    n: int = 2048,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> tuple[float, Timing]:
    """(median GFLOP/s, timing) of an n x n x n matmul on random data (never zeros)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    timing = time_fn(lambda: torch.mm(a, b), device, warmup=warmup, repeats=repeats)
    return 2.0 * n**3 / timing.median / 1e9, timing


# --------------------------------------------------------------------------- models
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter`` counts them (matmuls,
    convolutions and attention; 2 per multiply-add; elementwise ops are not counted).
    Works on the meta device, so a big model can be counted without running it."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def randomize_parameters_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with random non-zero values of a sane scale, in place.

    A freshly built ADM UNet zero-initialises the last conv of every residual branch, the
    attention output projections and the output head, so its output is exactly zero: that
    makes numerical comparisons vacuous (0 == 0) and can make kernels run faster than on
    real weights. Weights get N(0, 1/fan_in) (variance-preserving), biases N(0, 0.02),
    norm scales 1 + N(0, 0.1).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        if p.ndim >= 2:
            fan_in = p[0].numel()
            values = torch.randn(p.shape, generator=gen) / fan_in**0.5
        elif name.endswith("weight"):  # norm scales
            values = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            values = 0.02 * torch.randn(p.shape, generator=gen)
        p.copy_(values.to(p.dtype))
    return model


# --------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    return None


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "git_commit": _git_commit(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


# --------------------------------------------------------------------------- output
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (dicts) over ``columns`` (default: first row's keys)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    numeric = [
        all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns
    ]
    lines += [
        "| "
        + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True))
        + " |"
        for r in cells
    ]
    return "\n".join(lines)


def print_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, title: str | None = None
) -> None:
    if title:
        print(f"\n{title}")
    print(format_table(rows, columns), flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.device, torch.dtype, Path)):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    return value


def write_json(name: str, payload: Mapping[str, Any], out_dir: Path | str | None = None) -> Path:
    """Write ``payload`` to ``<out_dir>/<name>.json`` atomically (temp file + rename)."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(payload), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------- arguments
def positive_int(text: str) -> int:
    """argparse ``type`` of a count (threads, rounds, repeats, steps): an int >= 1, else argparse's
    one line ``argument --threads: expected an integer >= 1, got '-1'`` (exit 2), not a traceback later."""
    return _count(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse ``type`` of a count that may be 0 (warm-up runs): an int >= 0."""
    return _count(text, 0)


def _count(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--warmup", type=nonnegative_int, default=None, help="untimed runs first (default: per script)"
    )
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed runs (default: per script)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help=f"JSON folder (default {RESULTS_DIR})")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name (results/<name><tag>.json)")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply the common arguments; returns the device."""
    add_repo_to_path()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def parse_list(values: Iterable[str] | None, cast: Callable[[str], Any] = str) -> list[Any] | None:
    """Accept both ``--x 1 2 3`` and ``--x 1,2,3``."""
    if values is None:
        return None
    return [cast(v) for item in values for v in str(item).split(",") if v != ""]
