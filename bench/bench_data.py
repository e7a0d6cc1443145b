"""Data-loading benchmark: our LMDB reader vs torchvision ImageFolder over the same PNGs.

    python bench/bench_data.py [--n-images 800] [--workers 2] [--batch-size 32] [--repeats 3]
        [--format png|jpeg] [--compress-level N] [--device auto|cpu|cuda] [--tag _x]

Makes N 256x256 RGB PNGs (crops of scikit-image's bundled photos, nothing downloaded) in a
class folder, converts them with our converter, then times a DataLoader over each with the
same batch size, workers, shuffling and uint8 (B, 3, 256, 256) output (ImageFolder with
``PILToTensor``). Throughput is measured from the first batch of an epoch to its end (worker
start-up excluded); epochs alternate between the two loaders (``--repeats`` each) and the
ratio is the median of the per-epoch-pair ratios, so drift from other jobs hits both alike.
On a CUDA box batches are also moved to the GPU (pinned memory, non_blocking).
Prints a table and writes JSON to bench/results/data{tag}.json (with the environment).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common  # bench/common.py: shared timing/JSON conventions
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import PILToTensor

common.add_repo_to_path()
from ilvr_toolkit.data import LMDBImageDataset, build_lmdb, read_info  # noqa: E402

SIZE = 256


def _photos() -> list[np.ndarray]:
    """RGB photos bundled with scikit-image (no download); a synthetic fallback without it."""
    try:
        from skimage import data

        names = [
            "astronaut",
            "coffee",
            "chelsea",
            "rocket",
            "immunohistochemistry",
            "hubble_deep_field",
            "retina",
        ]
        return [getattr(data, name)() for name in names]
    except Exception:  # scikit-image missing: smooth random fields, PNG-compressible like photos
        rng = np.random.default_rng(0)
        fields = []
        for _ in range(6):
            small = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            big = np.asarray(Image.fromarray(small).resize((768, 768), Image.BICUBIC)).astype(np.int16)
            fields.append(np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8))
        return fields


def _bases() -> list[Image.Image]:
    """The photos at three scales (short side 1.25, 1.5, 2 x SIZE): crops of these are the images."""
    bases = []
    for photo in map(Image.fromarray, _photos()):
        for factor in (1.25, 1.5, 2.0):
            scale = factor * SIZE / min(photo.size)
            size = (round(photo.size[0] * scale), round(photo.size[1] * scale))
            bases.append(photo.resize(size, Image.Resampling.LANCZOS))
    return bases


def _write_pngs(folder: Path, indices: range, seed: int) -> None:
    bases = _bases()
    for i in indices:
        rng = np.random.default_rng([seed, i])
        base = bases[i % len(bases)]
        x = int(rng.integers(0, base.size[0] - SIZE + 1))
        y = int(rng.integers(0, base.size[1] - SIZE + 1))
        img = base.crop((x, y, x + SIZE, y + SIZE))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(folder / f"{i:06d}.png")  # Pillow's default zlib level 6, like most datasets


def make_pngs(folder: Path, n: int, processes: int = 2, seed: int = 0) -> None:
    """N distinct 256x256 PNGs: random crops (and flips) of the photos at a few scales."""
    folder.mkdir(parents=True, exist_ok=True)
    processes = max(1, processes)
    with ProcessPoolExecutor(processes) as pool:
        list(
            pool.map(
                _write_pngs,
                [folder] * processes,
                [range(k, n, processes) for k in range(processes)],
                [seed] * processes,
            )
        )


def _epoch(loader: DataLoader, device: torch.device) -> tuple[float, int]:
    """(seconds, images) from the first batch to the end; the first batch is not counted."""
    start, images = None, 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        x = x.to(device, non_blocking=True)
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, SIZE, SIZE)
        if start is None:
            start = time.perf_counter()
            continue
        images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, images


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser)  # --device --threads --repeats (timed epochs) --out-dir --tag ...
    parser.add_argument("--n-images", type=int, default=800)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--format", choices=["png", "jpeg"], default="png", help="storage format of our LMDB")
    parser.add_argument(
        "--compress-level", type=int, default=None, help="our PNG zlib level (default: converter's)"
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of our LMDB")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the files here (default: a temp folder)"
    )
    return parser.parse_args(argv)


def _prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    """(PNG folder, LMDB path): the N PNGs (kept if already there) and our LMDB of them."""
    t0 = time.perf_counter()
    folder = workdir / "images"
    if not (folder / "class0").is_dir() or len(list((folder / "class0").iterdir())) != args.n_images:
        shutil.rmtree(folder, ignore_errors=True)
        make_pngs(folder / "class0", args.n_images, processes=max(1, args.workers), seed=args.seed)
    print(f"{args.n_images} PNGs ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    lmdb_path = workdir / "data.lmdb"
    level = {} if args.compress_level is None else {"compress_level": args.compress_level}
    report = build_lmdb(
        folder, lmdb_path, SIZE, workers=args.workers, format=args.format, quality=args.quality,
        overwrite=True, progress=False, **level,
    )  # fmt: skip
    print(report.summary(), file=sys.stderr)
    return folder, lmdb_path


def _rates(
    args: argparse.Namespace, folder: Path, lmdb_path: Path, device: torch.device
) -> dict[str, list[float]]:
    """images/s of each loader per epoch, epochs interleaved so load from other jobs hits both alike."""
    loader_args = dict(
        batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=False,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    )  # fmt: skip
    loaders = {
        "ImageFolder+PIL": DataLoader(ImageFolder(str(folder), transform=PILToTensor()), **loader_args),
        "LMDB (ours)": DataLoader(LMDBImageDataset(lmdb_path, SIZE), **loader_args),
    }
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.repeats or 3):
        for name, loader in loaders.items():
            seconds, images = _epoch(loader, device)
            rates[name].append(images / seconds)
    return rates


def _report(
    args: argparse.Namespace, rates: dict[str, list[float]], folder: Path, lmdb_path: Path, device
) -> None:
    """Prints the table and the ratio; writes bench/results/data<tag>.json."""
    theirs, ours = rates["ImageFolder+PIL"], rates["LMDB (ours)"]
    pair_ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
    ratio, epochs = statistics.median(pair_ratios), len(ours)
    png_bytes = sum(p.stat().st_size for p in (folder / "class0").iterdir())
    lmdb_bytes = (lmdb_path / "data.mdb").stat().st_size
    rows = [
        {
            "loader": name,
            "images/s (median)": statistics.median(r),
            "min": min(r),
            "max": max(r),
            "MiB on disk": (png_bytes if name.startswith("ImageFolder") else lmdb_bytes) / 2**20,
        }
        for name, r in rates.items()
    ]
    stored = f"{args.format}" + (f" q{args.quality}" if args.format == "jpeg" else "")
    common.print_table(
        rows,
        title=f"{args.n_images} images {SIZE}x{SIZE}, batch {args.batch_size}, {args.workers} workers, "
        f"{epochs} epochs each, device {device}; ours stored as {stored}",
    )
    print(
        f"ratio ours / ImageFolder: {ratio:.2f}x (median of per-epoch pairs {', '.join(f'{x:.2f}' for x in pair_ratios)})"
    )
    payload = {
        "env": common.environment(device),
        "n_images": args.n_images, "size": SIZE, "batch_size": args.batch_size, "workers": args.workers,
        "epochs": epochs, "format": args.format, "compress_level": read_info(lmdb_path).meta.get("compress_level"),
        "quality": args.quality if args.format == "jpeg" else None,
        "images_per_s": rates, "rows": rows, "ratio": ratio, "pair_ratios": pair_ratios,
        "png_folder_bytes": png_bytes, "lmdb_bytes": lmdb_bytes,
    }  # fmt: skip
    path = common.write_json(f"data{args.tag}", payload, args.out_dir)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = common.setup(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        folder, lmdb_path = _prepare(args, workdir)
        _report(args, _rates(args, folder, lmdb_path, device), folder, lmdb_path, device)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
