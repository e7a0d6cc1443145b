"""Does training work? The tiny config on real image patches: the loss falls, and EMA samples
move closer to the data than the samples of the initial weights.

    python bench/train_quality.py                      # 600 steps of configs/tiny.yaml (CPU: ~10-20 min)
    python bench/train_quality.py --steps 200 --num-samples 128 --threads 2

Data: ``--num-images`` random 64x64 crops of the colour photos bundled with scikit-image
(astronaut, coffee, chelsea, rocket, immunohistochemistry, hubble_deep_field, retina; nothing
is downloaded), converted with ``python -m ilvr_toolkit.data.prepare`` to a 16x16 LMDB.

Training: ``train.py fit --config configs/tiny.yaml`` settings (the tiny16 UNet, hybrid loss,
AdamW 3e-4 with 50 warmup steps, EMA 0.995), run through the same CLI class, for ``--steps``.

Figures:

- loss: mean ``train/loss`` (and ``train/mse``) over the first and the last 10% of steps,
  from the run's TensorBoard log;
- feature distance: the Fréchet distance (the FID formula) between Gaussian fits to
  features of ``--num-samples`` samples and of the training images, for samples from the
  initial weights (what the EMA starts as) and from the final EMA weights. Features are
  NOT Inception's (no download): ``RFD`` uses a fixed random conv net (3 conv+ReLU layers,
  32/64/128 channels, He-initialised from seed 0, global-average-pooled from every layer:
  224 dims) and ``pixel FD`` uses the pixels themselves (16x16x3 = 768 dims). The noise
  floor is the same distance between two disjoint halves of the data.
  Samples: ancestral DDPM with 100 respaced steps, per-image seeds.

Writes bench/results/train_quality<tag>.json plus the sample grids and the run folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
from ilvr_toolkit.data import LMDBImageDataset, build_lmdb  # noqa: E402
from ilvr_toolkit.images import to_float  # noqa: E402
from ilvr_toolkit.models import build_unet  # noqa: E402
from ilvr_toolkit.sampling.config import SamplerSpec  # noqa: E402
from ilvr_toolkit.sampling.seeds import image_seed  # noqa: E402
from ilvr_toolkit.training import sample_images  # noqa: E402
from ilvr_toolkit.training.cli import TrainCLI  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"]


# --------------------------------------------------------------------------- data
def make_patches(folder: Path, count: int, crop: int, seed: int) -> None:
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)()[..., :3] for name in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - crop + 1)
        x = rng.integers(0, photo.shape[1] - crop + 1)
        Image.fromarray(photo[y : y + crop, x : x + crop]).save(folder / f"{i:05d}.png")


# --------------------------------------------------------------------------- features
class RandomFeatures(torch.nn.Module):
    """A fixed random conv net; features = global average pool of every layer (224 dims)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = torch.nn.ModuleList()
        for c_in, c_out, stride in [(3, 32, 1), (32, 64, 2), (64, 128, 2)]:
            conv = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * c_in)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64 (the FID formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s_a @ s_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))


def distances(images: torch.Tensor, reference: torch.Tensor, net: RandomFeatures) -> dict[str, float]:
    """uint8 (N, 3, H, W) images vs reference -> {"rfd", "pixel_fd"}."""
    x, r = to_float(images), to_float(reference)
    return {
        "rfd": frechet_distance(net(x).double().numpy(), net(r).double().numpy()),
        "pixel_fd": frechet_distance(x.flatten(1).double().numpy(), r.flatten(1).double().numpy()),
    }


# --------------------------------------------------------------------------- run
def loss_curve(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def window_mean(curve: list[tuple[int, float]], first: bool, fraction: float = 0.1) -> float:
    n = max(1, int(len(curve) * fraction))
    part = curve[:n] if first else curve[-n:]
    return float(np.mean([v for _, v in part]))


def sample(net: torch.nn.Module, cli: TrainCLI, count: int, batch: int, seed: int) -> torch.Tensor:
    """``sample.py --unconditional``'s images 0..count-1 (100 DDPM steps) in batches."""
    seeds = [image_seed(seed, i, 0) for i in range(count)]
    parts = [seeds[start : start + batch] for start in range(0, count, batch)]
    return torch.cat(
        [sample_images(cli.model, net.eval(), part, SamplerSpec("ddpm", "100")) for part in parts]
    )


def save_grid(images: torch.Tensor, path: Path, nrow: int = 16) -> None:
    from torchvision.utils import make_grid

    grid = make_grid(images[: nrow * nrow], nrow=nrow, padding=1)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).resize(
        (grid.shape[2] * 2, grid.shape[1] * 2), Image.NEAREST
    ).save(path)


MARKER = ".train_quality"  # written into every work folder; an existing folder without it is never emptied


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp folder (kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    return parser.parse_args(argv)


def _work_dir(given: Path | None) -> Path:
    """An empty work folder: ``given`` (emptied only if an earlier run of this script made it) or a temp one."""
    if given is None:
        work = Path(tempfile.mkdtemp(prefix="ilvr_train_quality_"))
    else:
        if given.exists() and (not given.is_dir() or any(given.iterdir())):
            if not (given / MARKER).is_file():
                raise SystemExit(
                    f"--work-dir {given}: exists and was not made by this script; choose another"
                )
            shutil.rmtree(given)
        work = given
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()
    return work


def _train_cli(args: argparse.Namespace, lmdb: Path, run_dir: Path) -> TrainCLI:
    """``train.py fit --config configs/tiny.yaml`` on the patches, not yet run."""
    return TrainCLI(
        args=[
            "--config", str(common.REPO / "configs" / "tiny.yaml"),
            "--data.path", str(lmdb),
            "--data.batch_size", str(args.batch_size),
            "--data.workers", "0",
            "--trainer.default_root_dir", str(run_dir),
            "--trainer.max_steps", str(args.steps),
            "--trainer.accelerator", "cpu",
            "--trainer.log_every_n_steps", str(min(5, args.steps)),
            "--trainer.enable_progress_bar", "false",
            "--samples.every_n_steps", "0",
            "--ilvr_preview.every_n_steps", "0",
            "--checkpoint.last_every_n_steps", str(max(args.steps // 4, 1)),
            "--seed_everything", str(args.seed),
        ],
        run=False,
    )  # fmt: skip


def _print(result: dict) -> None:
    before, after, floor = (
        result[k] for k in ("distance_initial_weights", "distance_ema_trained", "distance_data_halves_floor")
    )
    rows = [
        {"": "loss (hybrid)", "start": result["loss_first_10pct"], "end": result["loss_last_10pct"]},
        {"": "mse", "start": result["mse_first_10pct"], "end": result["mse_last_10pct"]},
        {
            "": "RFD (random conv features)",
            "start": before["rfd"],
            "end": after["rfd"],
            "floor": floor["rfd"],
        },
        {"": "pixel FD", "start": before["pixel_fd"], "end": after["pixel_fd"], "floor": floor["pixel_fd"]},
    ]
    common.print_table(rows, ["", "start", "end", "floor"], title=f"tiny config, {result['steps']} steps")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = _work_dir(args.work_dir)
    started = time.perf_counter()
    make_patches(work / "patches", args.num_images, crop=64, seed=args.seed)
    lmdb = work / "patches.lmdb"
    build_lmdb(work / "patches", lmdb, [16], workers=0, progress=False)
    data = LMDBImageDataset(lmdb, 16)
    reference = torch.stack([data[i] for i in range(len(data))])
    run_dir = work / "run"
    cli = _train_cli(args, lmdb, run_dir)
    features = RandomFeatures(args.seed)
    initial = build_unet(cli.model.unet_config)
    initial.load_state_dict(cli.model.model.state_dict())  # the EMA starts as these weights
    before = sample(initial, cli, args.num_samples, 64, seed=1)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    trained_at = time.perf_counter()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ema = build_unet(cli.model.unet_config)
    ema.load_state_dict({k[len("model.") :]: v for k, v in ckpt["state_dict"].items()})
    after = sample(ema, cli, args.num_samples, 64, seed=1)
    half = len(reference) // 2
    perm = torch.randperm(len(reference), generator=torch.Generator().manual_seed(args.seed))
    loss, mse = loss_curve(run_dir / "tb", "train/loss"), loss_curve(run_dir / "tb", "train/mse")
    for images, name in ((before, "samples_initial"), (after, "samples_ema_trained"), (reference, "data")):
        save_grid(images, work / f"{name}.png")
    result = {
        "steps": int(ckpt["global_step"]), "batch_size": args.batch_size, "num_images": len(reference),
        "num_samples": args.num_samples,
        "loss_first_10pct": window_mean(loss, True), "loss_last_10pct": window_mean(loss, False),
        "mse_first_10pct": window_mean(mse, True), "mse_last_10pct": window_mean(mse, False),
        "distance_initial_weights": distances(before, reference, features),
        "distance_ema_trained": distances(after, reference, features),
        "distance_data_halves_floor": distances(reference[perm[:half]], reference[perm[half:]], features),
        "train_seconds": trained_at - started, "total_seconds": time.perf_counter() - started, "work_dir": str(work),
    }  # fmt: skip
    _print(result)
    path = common.write_json(f"train_quality{args.tag}", {"environment": common.environment(), **result})
    print(f"\nwrote {path}; grids in {work}")
    print(json.dumps({k: result[k] for k in ("loss_first_10pct", "loss_last_10pct")}))
    rfd = result["distance_ema_trained"]["rfd"] < result["distance_initial_weights"]["rfd"]
    return 0 if result["loss_last_10pct"] < result["loss_first_10pct"] and rfd else 1


if __name__ == "__main__":
    raise SystemExit(main())
