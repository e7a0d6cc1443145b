"""Training-step throughput: images/s per device and peak memory, through the real loop.

    python bench/bench_train.py                                        # CPU: tiny (b 32), ffhq (b 1, 2), fp32
    python bench/bench_train.py --device cuda --precision bf16-mixed   # GPU: tiny (b 256), ffhq (b 8, 16, 32)
    python bench/bench_train.py --configs ffhq --batch-sizes ffhq=8,16 --precision 32-true bf16-mixed --steps 20
    python bench/bench_train.py --compile                              # also torch.compile'd (slow to build)

Each case runs ``Trainer.fit`` on :class:`DiffusionModule` with the model and diffusion
settings of ``configs/<name>.yaml`` (``ffhq`` = ``ffhq256.yaml``, the 93.6M ADM with
P2-weighted hybrid loss; ``tiny`` = ``tiny.yaml``), AdamW, the EMA callback (decay 0.9999,
updated every step, on the training device) and the NaN guard, i.e. exactly what
``train.py`` runs per step, minus checkpointing, logging and previews. Batches are random
uint8 images already in memory (no data loading in the measurement).

A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (after a device
synchronize at both ends; the EMA update is inside); the first ``--warmup`` steps are
dropped (allocator, cuDNN/oneDNN algorithm choice, compilation). Reported: median step time
(min, max), images/s per device = batch / median, and peak memory: on CUDA the peak
allocated during the timed steps (``torch.cuda.max_memory_allocated``); on the CPU the
process's peak RSS so far (``ru_maxrss``, a high-water mark over all earlier cases too).
Prints a table and writes bench/results/train<tag>.json.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import resource
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.add_repo_to_path()
import pytorch_lightning as pl  # noqa: E402

from ilvr_toolkit.diffusion import DiffusionConfig  # noqa: E402
from ilvr_toolkit.training import EMA, DiffusionModule, resolve_unet_config  # noqa: E402

CONFIG_FILES = {"tiny": "tiny.yaml", "ffhq": "ffhq256.yaml"}
CPU_BATCHES = {"tiny": [32], "ffhq": [1, 2]}
CUDA_BATCHES = {"tiny": [256], "ffhq": [8, 16, 32]}


class _Images(torch.utils.data.Dataset):
    """``count`` random uint8 (3, size, size) images, made once."""

    def __init__(self, count: int, size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (count, 3, size, size), generator=gen, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class _StepTimer(pl.Callback):
    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.seconds: list[float] = []
        self.peak_bytes: int | None = None
        self._tic = 0.0
        self._step = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._step == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        common.synchronize(self.device)
        self._tic = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        common.synchronize(self.device)
        if self._step >= self.warmup:
            self.seconds.append(time.perf_counter() - self._tic)
        self._step += 1
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)


def model_settings(name: str) -> dict[str, Any]:
    """``model`` section of configs/<file> (unet, diffusion, optimizer settings)."""
    config = yaml.safe_load((common.REPO / "configs" / CONFIG_FILES[name]).read_text())
    return dict(config["model"])


@dataclass(frozen=True)
class Case:
    """One timed configuration: a config file, a batch size and the settings that vary."""

    name: str
    batch: int
    precision: str
    compile: bool = False
    channels_last: bool = False
    native_gn: bool = False


def build_module(case: Case) -> DiffusionModule:
    """The :class:`DiffusionModule` of configs/<case.name> with the case's settings."""
    settings = model_settings(case.name)
    settings["diffusion"] = DiffusionConfig(**settings.get("diffusion", {}))
    settings["unet"] = resolve_unet_config(settings.get("unet", "tiny")).replace(
        native_groupnorm=case.native_gn
    )
    settings["compile"] = case.compile
    settings["channels_last"] = case.channels_last
    settings.pop("init_from", None)
    return DiffusionModule(**settings)


def run_case(case: Case, device: torch.device, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    """One ``Trainer.fit`` of ``steps + warmup`` steps; the row of the table."""
    module = build_module(case)
    size = module.unet_config.image_size
    params = sum(p.numel() for p in module.model.parameters())
    loader = torch.utils.data.DataLoader(
        _Images(case.batch * (steps + warmup), size, seed), batch_size=case.batch
    )
    timer = _StepTimer(device, warmup)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=case.precision,
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[EMA(decay=0.9999), timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    step_s = statistics.median(timer.seconds)
    cuda = device.type == "cuda"
    peak = timer.peak_bytes if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {
        **asdict(case),
        "config": case.name,
        "params_M": params / 1e6,
        "image": size,
        "step_s": step_s,
        "step_min_s": min(timer.seconds),
        "step_max_s": max(timer.seconds),
        "images_per_s": case.batch / step_s,
        "peak_mem_gib": peak / 2**30 if peak else None,
        "peak_mem_kind": "cuda_allocated" if cuda else "process_max_rss",
        "timed_steps": len(timer.seconds),
    }
    del trainer, module, loader
    if cuda:
        torch.cuda.empty_cache()
    return row


def parse_batches(items: list[str] | None, device: torch.device) -> dict[str, list[int]]:
    batches = dict(CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES)
    for item in items or []:
        name, _, values = item.partition("=")
        batches[name] = [int(v) for v in values.split(",") if v]
    return batches


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--configs", nargs="+", default=["tiny", "ffhq"], choices=sorted(CONFIG_FILES))
    parser.add_argument("--batch-sizes", nargs="*", help="per config: ffhq=1,2 tiny=32")
    parser.add_argument("--precision", nargs="+", default=None, help="32-true, bf16-mixed, 16-mixed")
    parser.add_argument(
        "--steps", type=common.positive_int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)"
    )
    parser.add_argument("--compile", action="store_true", help="also time with torch.compile")
    parser.add_argument(
        "--channels-last",
        choices=["on", "off", "both"],
        default="off",
        help="DiffusionModule(channels_last=...)",
    )
    parser.add_argument(
        "--native-groupnorm",
        choices=["on", "off", "both"],
        default="off",
        help="UNetConfig.native_groupnorm (only differs under bf16/16-mixed)",
    )
    return parser.parse_args(argv)


def cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    """Every case the arguments ask for, in the order they run."""
    precisions = args.precision or (["32-true", "bf16-mixed"] if device.type == "cuda" else ["32-true"])
    batches = parse_batches(args.batch_sizes, device)
    switch = {"on": [True], "off": [False], "both": [False, True]}
    product = list(
        itertools.product(
            precisions,
            [False, True] if args.compile else [False],
            switch[args.channels_last],
            switch[args.native_groupnorm],
        )
    )
    return [
        Case(name, batch, *variant) for name in args.configs for batch in batches[name] for variant in product
    ]


COLUMNS = ["config", "batch", "precision", "compile", "channels_last", "native_gn"]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = common.setup(args)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    cuda = device.type == "cuda"
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    rows = []
    for case in cases(args, device):
        try:
            row = run_case(case, device, steps, warmup, args.seed)
        except torch.cuda.OutOfMemoryError:
            row = {**asdict(case), "config": case.name, "error": "OOM"}
            torch.cuda.empty_cache()
        rows.append(row)
        common.print_table([row], [*COLUMNS, "step_s", "images_per_s", "peak_mem_gib"])
    common.print_table(
        rows,
        [
            *COLUMNS[:1],
            "params_M",
            "image",
            *COLUMNS[1:],
            "step_s",
            "step_min_s",
            "step_max_s",
            "images_per_s",
            "peak_mem_gib",
        ],
        title=f"training step on {device} (images/s per device; peak memory: {rows[0].get('peak_mem_kind')})",
    )
    payload = {
        "environment": common.environment(device),
        "device": str(device),
        "steps": steps,
        "warmup": warmup,
        "rows": rows,
    }
    path = common.write_json(f"train{args.tag}", payload, args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
