"""FID/KID cost: Inception feature extraction, the distances, and what the statistics cache saves.

    python bench/bench_fid.py [--n-images 32] [--batch-size 16] [--device auto|cpu|cuda]
        [--inception-weights PATH] [--tag _x]

Inception weights: ``--inception-weights`` (the real file) or, by default, random weights of
the same architecture written to a temp file -- the cost is the same, the values mean nothing.
Makes N smooth random 256x256 images (nothing downloaded), then measures:

- extraction: images/s of the Inception forward (uint8 256 px -> resize to 299 -> 2048-d),
  median over ``--repeats`` passes over the N images after a warm-up batch;
- distances at 1,000 images: FID (float64, pivoted-Cholesky trace term) and KID (100 subsets
  of 1,000) on 1,000 x 2048 synthetic features, i.e. the cost on top of extraction;
- cache: ``cached_reference_stats`` over a folder of the N images written as PNG, first call
  (decode + extract + write the .npz) vs second call (validate + load).

"per 1,000 images" figures scale the measured per-image cost; the cache saving is per
1,000 reference images, each time the same target set is evaluated again.
Prints a table and writes bench/results/fid<tag>.json (with the environment).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # bench/common.py
import torch
from PIL import Image

common.add_repo_to_path()
from ilvr_toolkit.evaluation import InceptionFeatureExtractor, cached_reference_stats  # noqa: E402
from ilvr_toolkit.evaluation.fid import FeatureStats, kernel_distance  # noqa: E402

SIZE = 256


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, 256, 256) low-frequency colour fields (image-like, compress like photos)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    x = x + 0.03 * torch.randn(x.shape, generator=g)  # some texture
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def synthetic_features(n: int, seed: int) -> torch.Tensor:
    """(n, 2048) float64 non-negative features with correlated dims (like pool3 after ReLU)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 256, generator=g, dtype=torch.float64)
    mix = torch.randn(256, 2048, generator=g, dtype=torch.float64) / 16
    return (latent @ mix + 0.3).clamp(min=0)


def stats_of(features: torch.Tensor) -> FeatureStats:
    mean = features.mean(0)
    centred = features - mean
    return FeatureStats(mean, centred.T @ centred / (len(features) - 1), len(features), features)


def _parse() -> argparse.Namespace:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--n-images", type=int, default=32, help="images extracted (twice: timing, cache)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--inception-weights", default=None, help="real weights file (default: random weights)")
    p.add_argument("--distance-n", type=int, default=1000, help="set size for the FID/KID distance timing")
    return p.parse_args()


def _time_extraction(args, extractor, images: torch.Tensor, device: torch.device, repeats: int):
    """Timing of the Inception forward over ``images`` (uint8 (N, 3, 256, 256)), after a warm-up."""
    extractor(images[: min(2, len(images))].to(device))  # warm-up (oneDNN / cuDNN choice)

    def extract_all() -> None:
        for k in range(0, len(images), args.batch_size):
            extractor(images[k : k + args.batch_size].to(device))

    return common.time_fn(extract_all, device, warmup=0, repeats=repeats)


def _time_distances(n: int, device: torch.device, repeats: int) -> tuple:
    """(FID timing, KID timing) at ``n`` vs ``n`` synthetic 2048-d features: the cost on top of extraction."""
    real, fake = stats_of(synthetic_features(n, 1)), stats_of(synthetic_features(n, 2))
    real_dev = FeatureStats(real.mean.to(device), real.cov.to(device), n)
    fake_dev = FeatureStats(fake.mean.to(device), fake.cov.to(device), n)
    fid_t = common.time_fn(lambda: fake_dev.frechet_distance(real_dev), device, warmup=0, repeats=repeats)
    real_f, fake_f = real.features.to(device), fake.features.to(device)
    kid_t = common.time_fn(lambda: kernel_distance(real_f, fake_f), device, warmup=0, repeats=repeats)
    return fid_t, kid_t


def _time_cache(args, extractor, images: torch.Tensor, tmp: Path) -> dict:
    """The statistics cache: build (decode + extract + write the .npz) vs load, in seconds."""
    folder = tmp / "target"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    kw = dict(image_size=SIZE, cache_dir=tmp / "cache", batch_size=args.batch_size)
    start = time.perf_counter()
    _, built = cached_reference_stats(folder, extractor, **kw)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    _, hit = cached_reference_stats(folder, extractor, **kw)
    hit_s = time.perf_counter() - start
    assert not built.hit and hit.hit
    return {
        "cache_build_s": build_s,
        "cache_hit_s": hit_s,
        "cache_file_mib": Path(hit.path).stat().st_size / 2**20,
    }


def _measure(args, device: torch.device) -> dict:
    """Every figure of the run, under the names of the JSON payload."""
    repeats = args.repeats or 1
    with tempfile.TemporaryDirectory(prefix="bench_fid_") as tmp:
        tmp = Path(tmp)
        weights = args.inception_weights or common.write_random_inception_weights(tmp / "inception.pth")
        start = time.perf_counter()
        extractor = InceptionFeatureExtractor(weights).to(device)
        load_s = time.perf_counter() - start
        images = smooth_images(args.n_images, args.seed)
        extract = _time_extraction(args, extractor, images, device, repeats)
        fid_t, kid_t = _time_distances(args.distance_n, device, repeats)
        cache = _time_cache(args, extractor, images, tmp)
    extract_1000 = 1000 / (args.n_images / extract.median)
    build_per_image = cache["cache_build_s"] / args.n_images
    return {
        "extract": extract,
        "extract_images_per_s": args.n_images / extract.median,
        "extract_s_per_1000": extract_1000,
        "distance_n": args.distance_n,
        "fid_distance": fid_t,
        "kid_100x1000": kid_t,
        "fid_kid_s_per_1000_outputs": extract_1000 + fid_t.median + kid_t.median,
        **cache,
        "cache_build_s_per_1000": 1000 * build_per_image,
        "cache_saved_s_per_1000_reference_images": 1000 * build_per_image - cache["cache_hit_s"],
        "load_inception_s": load_s,
    }


def _rows(m: dict, n_images: int) -> list[dict]:
    n = m["distance_n"]
    row = lambda what, value, unit, per_1000: {  # noqa: E731
        "what": what, "value": value, "unit": unit, "per 1,000 images (s)": per_1000,
    }  # fmt: skip
    return [
        row("Inception extraction", m["extract_images_per_s"], "images/s", m["extract_s_per_1000"]),
        row(f"FID distance, {n} vs {n}", m["fid_distance"].median, "s", None),
        row(f"KID 100 x {min(1000, n)}, {n} vs {n}", m["kid_100x1000"].median, "s", None),
        row("FID + KID of 1,000 outputs (extract + distances)", None, "s", m["fid_kid_s_per_1000_outputs"]),
        row(
            f"reference stats, build ({n_images} PNGs)", m["cache_build_s"], "s", m["cache_build_s_per_1000"]
        ),
        row("reference stats, cache hit", m["cache_hit_s"], "s", None),
        row(
            "time saved by the cache per evaluation",
            m["cache_build_s"] - m["cache_hit_s"],
            "s",
            m["cache_saved_s_per_1000_reference_images"],
        ),
        row("loading the Inception weights", m["load_inception_s"], "s", None),
    ]


def main() -> None:
    args = _parse()
    device = common.setup(args)
    m = _measure(args, device)
    rows = _rows(m, args.n_images)
    title = f"FID/KID on {device} ({'random' if not args.inception_weights else 'given'} Inception weights, {SIZE} px)"
    common.print_table(rows, title=title)
    payload = {
        "env": common.environment(device),
        "device": str(device),
        "image_size": SIZE,
        "n_images": args.n_images,
        "batch_size": args.batch_size,
        "weights": "random (timing only)" if not args.inception_weights else str(args.inception_weights),
        **m,
        "rows": rows,
    }
    path = common.write_json(f"fid{args.tag}", payload, args.out_dir)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
