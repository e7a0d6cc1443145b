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


def main() -> None:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--n-images", type=int, default=32, help="images extracted (twice: timing, cache)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--inception-weights", default=None, help="real weights file (default: random weights)")
    p.add_argument("--distance-n", type=int, default=1000, help="set size for the FID/KID distance timing")
    args = p.parse_args()
    device = common.setup(args)
    repeats = args.repeats or 1

    with tempfile.TemporaryDirectory(prefix="bench_fid_") as tmp:
        tmp = Path(tmp)
        weights = args.inception_weights or common.write_random_inception_weights(tmp / "inception.pth")
        start = time.perf_counter()
        extractor = InceptionFeatureExtractor(weights).to(device)
        load_s = time.perf_counter() - start
        images = smooth_images(args.n_images, args.seed)

        # --- extraction throughput
        extractor(images[: min(2, len(images))].to(device))  # warm-up (oneDNN / cuDNN choice)

        def extract_all() -> None:
            for k in range(0, len(images), args.batch_size):
                extractor(images[k : k + args.batch_size].to(device))

        extract = common.time_fn(extract_all, device, warmup=0, repeats=repeats)
        images_per_s = args.n_images / extract.median

        # --- distances at --distance-n images (cost on top of the extraction)
        n = args.distance_n
        real, fake = stats_of(synthetic_features(n, 1)), stats_of(synthetic_features(n, 2))
        real_dev = FeatureStats(real.mean.to(device), real.cov.to(device), n)
        fake_dev = FeatureStats(fake.mean.to(device), fake.cov.to(device), n)
        fid_t = common.time_fn(lambda: fake_dev.frechet_distance(real_dev), device, warmup=0, repeats=repeats)
        real_f, fake_f = real.features.to(device), fake.features.to(device)
        kid_t = common.time_fn(lambda: kernel_distance(real_f, fake_f), device, warmup=0, repeats=repeats)

        # --- the statistics cache: build (decode + extract + write) vs load
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
        cache_file_mb = Path(hit.path).stat().st_size / 2**20

    per_1000 = lambda seconds_per_image: 1000 * seconds_per_image  # noqa: E731
    extract_1000 = per_1000(1 / images_per_s)
    build_per_image = build_s / args.n_images
    rows = [
        {
            "what": "Inception extraction",
            "value": images_per_s,
            "unit": "images/s",
            "per 1,000 images (s)": extract_1000,
        },
        {
            "what": f"FID distance, {n} vs {n}",
            "value": fid_t.median,
            "unit": "s",
            "per 1,000 images (s)": None,
        },
        {
            "what": f"KID 100 x {min(1000, n)}, {n} vs {n}",
            "value": kid_t.median,
            "unit": "s",
            "per 1,000 images (s)": None,
        },
        {
            "what": "FID + KID of 1,000 outputs (extract + distances)",
            "value": None,
            "unit": "s",
            "per 1,000 images (s)": extract_1000 + fid_t.median + kid_t.median,
        },
        {
            "what": f"reference stats, build ({args.n_images} PNGs)",
            "value": build_s,
            "unit": "s",
            "per 1,000 images (s)": per_1000(build_per_image),
        },
        {"what": "reference stats, cache hit", "value": hit_s, "unit": "s", "per 1,000 images (s)": None},
        {
            "what": "time saved by the cache per evaluation",
            "value": build_s - hit_s,
            "unit": "s",
            "per 1,000 images (s)": per_1000(build_per_image) - hit_s,
        },
        {"what": "loading the Inception weights", "value": load_s, "unit": "s", "per 1,000 images (s)": None},
    ]
    title = f"FID/KID on {device} ({'random' if not args.inception_weights else 'given'} Inception weights, {SIZE} px)"
    common.print_table(rows, title=title)
    payload = {
        "env": common.environment(device),
        "device": str(device),
        "image_size": SIZE,
        "n_images": args.n_images,
        "batch_size": args.batch_size,
        "weights": "random (timing only)" if not args.inception_weights else str(args.inception_weights),
        "extract": extract,
        "extract_images_per_s": images_per_s,
        "extract_s_per_1000": extract_1000,
        "distance_n": n,
        "fid_distance": fid_t,
        "kid_100x1000": kid_t,
        "fid_kid_s_per_1000_outputs": extract_1000 + fid_t.median + kid_t.median,
        "cache_build_s": build_s,
        "cache_hit_s": hit_s,
        "cache_file_mib": cache_file_mb,
        "cache_saved_s_per_1000_reference_images": per_1000(build_per_image) - hit_s,
        "load_inception_s": load_s,
        "rows": rows,
    }
    path = common.write_json(f"fid{args.tag}", payload, args.out_dir)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
