"""Evaluation: FID/KID matching the reference TensorFlow FID (torchmetrics + torch-fidelity's
Inception, offline), cached reference statistics, and faithfulness metrics (SSIM / PSNR / L2,
at full resolution and after ILVR's low-pass phi_N).

CLI: ``python -m ilvr_toolkit.evaluation --help``.
"""

from .api import PairSource, evaluate_translation, format_table, pair_by_name, write_metrics
from .faithfulness import PSNR_CAP_DB, FaithfulnessMetrics
from .fid import FeatureStats, FrechetDistance64, InceptionMetrics, KernelDistance, frechet_distance
from .inception import (
    WEIGHTS_FILENAME,
    WEIGHTS_SHA256_PREFIX,
    InceptionFeatureExtractor,
    InceptionWeightsMissing,
    default_weights_path,
    locate_inception_weights,
    write_random_inception_weights,
)
from .sources import ImageSet, dataset_identity, open_image_set
from .stats import (
    StatsCacheInfo,
    cached_reference_stats,
    compute_image_set_stats,
    default_cache_dir,
    load_stats,
    save_stats,
)

__all__ = [
    "PSNR_CAP_DB",
    "WEIGHTS_FILENAME",
    "WEIGHTS_SHA256_PREFIX",
    "FaithfulnessMetrics",
    "FeatureStats",
    "FrechetDistance64",
    "ImageSet",
    "InceptionFeatureExtractor",
    "InceptionMetrics",
    "InceptionWeightsMissing",
    "KernelDistance",
    "PairSource",
    "StatsCacheInfo",
    "cached_reference_stats",
    "compute_image_set_stats",
    "dataset_identity",
    "default_cache_dir",
    "default_weights_path",
    "evaluate_translation",
    "format_table",
    "frechet_distance",
    "load_stats",
    "locate_inception_weights",
    "open_image_set",
    "pair_by_name",
    "save_stats",
    "write_metrics",
    "write_random_inception_weights",
]
