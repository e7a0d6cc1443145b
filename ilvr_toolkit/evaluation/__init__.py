"""FID/KID as the reference TF FID computes them (torchmetrics, weights from a file), cached reference
statistics, faithfulness (SSIM/PSNR/L2, full and after phi_N). CLI: python -m ilvr_toolkit.evaluation"""

from .api import EvalSettings, evaluate_translation, format_table, pair_by_name, write_metrics
from .faithfulness import PSNR_CAP_DB, FaithfulnessMetrics
from .fid import FeatureStats, InceptionMetrics, frechet_distance
from .inception import InceptionFeatureExtractor, InceptionWeightsMissing, write_random_inception_weights
from .stats import ImageSet, cached_reference_stats, compute_image_set_stats, load_stats

__all__ = ["PSNR_CAP_DB", "EvalSettings", "FaithfulnessMetrics", "FeatureStats", "ImageSet", "InceptionFeatureExtractor",
           "InceptionMetrics", "InceptionWeightsMissing", "cached_reference_stats", "compute_image_set_stats",
           "evaluate_translation", "format_table", "frechet_distance", "load_stats", "pair_by_name", "write_metrics",
           "write_random_inception_weights"]  # fmt: skip
