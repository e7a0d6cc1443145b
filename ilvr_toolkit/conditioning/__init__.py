"""Conditioning of the reverse process: the exact ILVR low-pass operator and the ILVR hook."""

from .ilvr import ILVR, reference_index, resolve_range_t
from .lowpass import LowPass, cubic_kernel, resize_matrix

__all__ = ["ILVR", "LowPass", "cubic_kernel", "reference_index", "resize_matrix", "resolve_range_t"]
