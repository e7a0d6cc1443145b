"""Host I/O around sampling: does decoding references and writing PNGs overlap the sampling?

    python bench/bench_pipeline.py [--n-refs 256] [--ref-size 1024] [--batch-size 32]
        [--batch-seconds 1.6] [--steps 2] [--workers 0 4] [--repeats 2] [--tag _x]

What a GPU run looks like from the host: per batch the accelerator is busy for some time
(``--batch-seconds``; default 1.6 s = batch 32 at the ~20 images/s arithmetic floor of
100-step ILVR at 256 on an H200), while the host decodes and resizes references (FFHQ-like
1024x1024 PNG/JPEG here) and encodes the output PNGs. The network is a stand-in that waits
``batch-seconds / steps`` per step in ``time.sleep`` (which, like a wait on a GPU, leaves the
GIL free) and predicts zeros; everything else is ``sampling.run``: plan, references,
ILVR hook, diffusion math (CPU, DDIM ``--steps``), manifest, PNGs. The diffusion math and
the low-pass run on the CPU here (on a GPU machine they run on the accelerator), so few
steps keep them from dominating. Reported per ``io_workers``: images/s, seconds per batch,
and how much the wall time exceeds the simulated accelerator time (host work not hidden:
the math above, filling and draining the pipeline, run start and end). Prints a table; writes bench/results/pipeline{tag}.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.add_repo_to_path()
import ilvr_toolkit.sampling.runner as runner  # noqa: E402
from ilvr_toolkit.models import LoadedModel, build_unet, get_preset  # noqa: E402
from ilvr_toolkit.sampling.cli import parse_config  # noqa: E402


def make_references(folder: Path, count: int, size: int, seed: int) -> None:
    """Smooth random photos (bicubic-upsampled noise), alternating PNG and JPEG (quality 95)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).resize(
            (size, size), Image.BICUBIC
        )
        image.save(folder / f"ref{i:04d}.{'png' if i % 2 else 'jpg'}", quality=95)


def stand_in_load(seconds_per_step: float):
    """A replacement for ``runner.load``: an ffhq-shaped model (meta, never run) and a net
    that waits ``seconds_per_step`` and predicts zeros (eps and the variance channels)."""
    config = get_preset("ffhq")

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds_per_step)
        return torch.zeros(x.shape[0], config.out_channels, *x.shape[2:], device=x.device)

    def load(sample_config, device):
        return LoadedModel(build_unet(config, device="meta"), config, {}, "stand-in", "stand-in"), net

    return load


def run_once(refs: Path, out: Path, args, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    config = parse_config(
        [
            "--model.checkpoint",
            "stand-in",
            "--references",
            str(refs),
            "--output.dir",
            str(out),
            "--device",
            "cpu",
            "--batch_size",
            str(args.batch_size),
            "--sampler.method",
            "ddim",
            "--sampler.respacing",
            f"ddim{args.steps}",
            "--ilvr.factor",
            "8",
            "--progress",
            "false",
            "--output.grid",
            "false",
            "--io_workers",
            str(workers),
        ]
    )
    tic = time.perf_counter()
    result = runner.run(config)
    wall = time.perf_counter() - tic
    n_batches = -(-len(result.written) // args.batch_size)
    simulated = n_batches * args.batch_seconds
    return {"wall_s": wall, "images": len(result.written), "batches": n_batches, "simulated_s": simulated}


def main(argv: list[str] | None = None) -> int:
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--n-refs", type=int, default=256)
    parser.add_argument("--ref-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--batch-seconds", type=float, default=1.6, help="simulated accelerator time per batch"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    args = parser.parse_args(argv)
    common.setup(args)
    repeats = args.repeats or 2
    runner.load = stand_in_load(args.batch_seconds / args.steps)
    work = Path(tempfile.mkdtemp(prefix="ilvr_pipeline_"))
    try:
        make_references(work / "refs", args.n_refs, args.ref_size, args.seed)
        runs: dict[int, list[dict]] = {w: [] for w in args.workers}
        for _ in range(repeats):  # interleaved: A B A B
            for workers in args.workers:
                runs[workers].append(run_once(work / "refs", work / "out", args, workers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for workers, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        first = results[0]
        rows.append(
            {
                "io_workers": workers,
                "images": first["images"],
                "wall s": wall,
                "img/s": first["images"] / wall,
                "s/batch": wall / first["batches"],
                "simulated accel. s": first["simulated_s"],
                "over accel. %": 100 * (wall / first["simulated_s"] - 1),
                "walls": [r["wall_s"] for r in results],
            }
        )
    title = (
        f"sampling.run with a stand-in accelerator ({args.batch_seconds} s per batch of {args.batch_size}, "
        f"DDIM {args.steps}), {args.n_refs} references of {args.ref_size}px, output 256px, "
        f"{torch.get_num_threads()} torch threads; median of {repeats}"
    )
    common.print_table(
        rows,
        ["io_workers", "images", "wall s", "img/s", "s/batch", "simulated accel. s", "over accel. %"],
        title=title,
    )
    path = common.write_json(
        f"pipeline{args.tag}", {"env": common.environment(), "args": vars(args), "rows": rows}, args.out_dir
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
