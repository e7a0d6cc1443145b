"""FID/KID as the reference TF FID computes them (torchmetrics, weights from a file), cached reference
statistics, faithfulness (SSIM/PSNR/L2, full and after phi_N). CLI: python -m ilvr_toolkit.evaluation"""

from .api import EvalSettings, evaluate_translation, format_table, pair_by_name, write_metrics
from .faithfulness import PSNR_CAP_DB, FaithfulnessMetrics
from .fid import FeatureStats, frechet_distance, inception_scores, kernel_distance
from .inception import InceptionFeatureExtractor, InceptionWeightsMissing
from .stats import ImageSet, cached_reference_stats, compute_image_set_stats, load_stats

__all__ = ["EvalSettings", "evaluate_translation", "format_table", "pair_by_name", "write_metrics"]
__all__ += ["PSNR_CAP_DB", "FaithfulnessMetrics", "FeatureStats", "frechet_distance", "inception_scores"]
__all__ += ["InceptionFeatureExtractor", "InceptionWeightsMissing", "ImageSet", "cached_reference_stats"]
__all__ += ["compute_image_set_stats", "load_stats", "kernel_distance"]
