"""``python -m ilvr_toolkit.evaluation``: compare two image sets, or build / show cached statistics.

Examples::

    # FID/KID of translated images against the target domain (folder, LMDB or stats .npz),
    # plus SSIM/PSNR/L2 against the source references (full resolution and low-pass N=32)
    python -m ilvr_toolkit.evaluation runs/cat2dog/samples data/afhq_dog_val.lmdb \\
        --references data/afhq/val/cat --factor 32 --json runs/cat2dog/metrics.json

    # two sets whose images correspond by name: FID/KID and SSIM/PSNR/L2 between them
    python -m ilvr_toolkit.evaluation set_a/ set_b/ --paired

    # reference statistics, computed once and cached (keyed by dataset, size and weights)
    python -m ilvr_toolkit.evaluation --stats build data/afhq_dog_val.lmdb --image-size 256
    python -m ilvr_toolkit.evaluation --stats show data/afhq_dog_val.lmdb --image-size 256

Nothing is downloaded: the Inception weights come from ``--inception-weights`` or the torch
hub cache (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .api import evaluate_translation, format_table, write_metrics
from .inception import InceptionFeatureExtractor, InceptionWeightsMissing, weights_sha256
from .sources import dataset_identity, identity_digest, is_lmdb, open_image_set
from .stats import cached_reference_stats, default_cache_dir, load_stats, stats_cache_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ilvr_toolkit.evaluation",
        description="FID/KID (reference TF-FID settings, offline) and SSIM/PSNR/L2 of image sets.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    p.add_argument("sets", nargs="*", help="OUTPUTS [TARGET]: folders / LMDBs (TARGET may be a stats .npz)")
    p.add_argument(
        "--stats", choices=["build", "show"], help="build or show the cached statistics of one set"
    )
    p.add_argument("--rebuild", action="store_true", help="with --stats build: recompute even if cached")
    p.add_argument("--references", help="source images paired with OUTPUTS by name (<stem>_s<k> -> <stem>)")
    p.add_argument(
        "--paired", action="store_true", help="OUTPUTS and TARGET correspond by name: add SSIM/PSNR/L2"
    )
    p.add_argument("--factor", type=int, default=None, help="ILVR low-pass factor N: adds low-pass SSIM/PSNR")
    p.add_argument(
        "--image-size", type=int, default=None, help="evaluation size (default: the first image's)"
    )
    p.add_argument(
        "--inception-weights", default=None, help="path of weights-inception-2015-12-05-6726825d.pth"
    )
    p.add_argument("--cache-dir", default=None, help=f"statistics cache (default {default_cache_dir()})")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-kid", action="store_true", help="skip KID (and keeping features in memory / cache)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--json", default=None, help="write the metrics there (atomically)")
    return p


def _device(name: str | None) -> torch.device:
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stats_build(args) -> int:
    (source,) = args.sets
    extractor = InceptionFeatureExtractor(args.inception_weights).to(_device(args.device))
    stats, info = cached_reference_stats(
        source,
        extractor,
        image_size=args.image_size,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        keep_features=not args.no_kid,
        num_workers=args.workers,
        rebuild=args.rebuild,
    )
    state = "up to date, loaded" if info.hit else f"computed ({info.reason})"
    print(
        f"{info.path}\n  {state}: {stats.count} images at {info.meta['image_size']} px in {info.seconds:.1f} s"
    )
    return 0


def _stats_show(args) -> int:
    (source,) = args.sets
    if Path(source).suffix == ".npz":
        path, expected = Path(source), None
    else:
        image_size = args.image_size or open_image_set(source).image_size
        identity = dataset_identity(source)
        cache_dir = args.cache_dir or default_cache_dir()
        path = stats_cache_path(identity, image_size, weights_sha256(args.inception_weights), cache_dir)
        expected = identity_digest(identity)
        if not path.is_file():
            print(f"no cached statistics for {source} at {image_size} px (would be {path})")
            return 1
    stats, meta = load_stats(path)
    print(path)
    if expected is not None:
        print(
            "  valid (dataset unchanged)"
            if meta.get("identity_sha256") == expected
            else "  STALE: the dataset changed"
        )
    print(f"  images: {stats.count}   features kept (KID): {stats.features is not None}")
    for key in ("image_size", "created", "inception_sha256"):
        if key in meta:
            print(f"  {key}: {meta[key]}")
    if "identity" in meta:
        print(f"  dataset: {meta['identity'].get('kind')} {meta['identity'].get('path')}")
    print(f"  |mu| = {stats.mean.norm():.6g}   tr(sigma) = {stats.cov.trace():.6g}")
    return 0


def _compare(args, parser) -> int:
    if not 1 <= len(args.sets) <= 2:
        parser.error("give OUTPUTS and TARGET (or OUTPUTS with --references)")
    outputs = args.sets[0]
    target = args.sets[1] if len(args.sets) == 2 else None
    references = args.references
    if args.paired:
        if target is None or is_lmdb(target) or Path(target).suffix == ".npz":
            parser.error("--paired needs TARGET to be a folder of images named like OUTPUTS")
        references = references or target
    if target is None and references is None:
        parser.error("nothing to compute: give TARGET and/or --references")
    metrics = evaluate_translation(
        outputs,
        references=references,
        target=target,
        factor=args.factor,
        image_size=args.image_size,
        inception_weights=args.inception_weights,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        device=_device(args.device),
        kid=not args.no_kid,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        num_workers=args.workers,
    )
    print(format_table(metrics))
    if args.json:
        print(f"wrote {write_metrics(args.json, metrics)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.stats:
            if len(args.sets) != 1:
                parser.error("--stats build|show takes one image set (or, for show, a .npz)")
            return _stats_build(args) if args.stats == "build" else _stats_show(args)
        return _compare(args, parser)
    except (InceptionWeightsMissing, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
