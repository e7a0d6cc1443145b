"""Conditioning of the reverse process: linear operators P (the exact ILVR low-pass phi_N, masks,
grayscale, compositions) and one step hook, ``Projection`` (x <- x + P(y - x)); ILVR is it with phi_N."""

from .lowpass import LowPass, cubic_kernel, resize_matrix
from .operators import Compose, Grayscale, Mask
from .projection import ILVR, Projection, reference_index, resolve_range_t

__all__ = ["ILVR", "Compose", "Grayscale", "LowPass", "Mask", "Projection"]
__all__ += ["cubic_kernel", "reference_index", "resize_matrix", "resolve_range_t"]
