"""FID and KID on Inception features, built on torchmetrics' metric states and DDP sync.

Features are extracted once per batch (:class:`~.inception.InceptionFeatureExtractor`) and fed
to both torchmetrics metrics through an identity "feature network", so the 95 MB Inception is
neither run twice nor held by the metric objects. The torchmetrics classes are subclassed only
where their behaviour differs from the reference:

- FID returns float64 (torchmetrics casts the result to the feature dtype, float32).
- KID gathers a single (possibly empty) feature tensor per process, so that processes holding
  different numbers of batches -- or none, like the ranks that do not hold the cached real
  features -- do the same collective calls; it shrinks the subset size to the smallest set,
  draws its subsets from a seeded generator, and evaluates the polynomial kernel once for all
  subsets.

:class:`InceptionMetrics` is a plain object (not an ``nn.Module``): keep it outside a
LightningModule's children so that it is never saved in a checkpoint nor copied by EMA.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, maximum_mean_discrepancy, poly_kernel
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from .inception import NUM_FEATURES, InceptionFeatureExtractor

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "trace_sqrt_product",
    "psd_factor",
    "FrechetDistance64",
    "KernelDistance",
    "InceptionMetrics",
]

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torch-fidelity's defaults
_FULL_KERNEL_MAX = 8192  # above this many features per set, kernels are built per subset


def psd_factor(sigma: torch.Tensor) -> torch.Tensor:
    """H (D, r) with sigma = H H^T up to round-off, r the numerical rank of the PSD matrix sigma.

    A clearly full-rank matrix is factored by LAPACK's Cholesky. Otherwise (the covariance of
    n <= 2048 images has rank n - 1) by Cholesky with symmetric pivoting -- largest remaining
    diagonal first, stable on positive semi-definite matrices -- stopped once every remaining
    diagonal is below D * eps * max diag (round-off): n - 1 column steps, not a full
    eigendecomposition of a 2048 x 2048 matrix, and no round-off 'directions' in the factor.
    """
    n = sigma.shape[0]
    diagonal = sigma.diagonal()
    tol = n * torch.finfo(sigma.dtype).eps * diagonal.max().clamp(min=0)
    chol, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0 and chol.diagonal().min().square() > 1e3 * tol:
        return chol
    residual = diagonal.clone()
    rows = torch.zeros(n, n, dtype=sigma.dtype, device=sigma.device)  # row k = column k of H
    rank = 0
    for k in range(n):
        p = int(torch.argmax(residual))
        pivot = residual[p]
        if pivot <= tol:
            break
        column = (sigma[p] - rows[:k].T @ rows[:k, p]) / pivot.sqrt()  # sigma is symmetric
        rows[k] = column
        residual = (residual - column.square()).clamp_(min=0)
        residual[p] = 0
        rank = k + 1
    return rows[:rank].T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Tr((sigma1 sigma2)^(1/2)) for symmetric PSD sigma1, sigma2 (float64).

    With sigma1 = H H^T (:func:`psd_factor`, H of rank r), the non-zero eigenvalues of
    sigma1 sigma2 = H H^T sigma2 are those of the small symmetric PSD matrix H^T sigma2 H
    (r x r), whose square roots are summed. This is the trace of scipy.linalg.sqrtm(sigma1 @
    sigma2) without its round-off in the null space: covariances of n < 2048 images have rank
    n - 1, and a general eigensolver (or sqrtm) turns each of the ~2000 zero eigenvalues into
    sqrt(round-off) ~ 1e-8 * scale, which keeps FID(x, x) away from 0. Pass the lower-rank
    matrix (fewer images) first: it is the one factored.
    """
    half = psd_factor(sigma1)
    inner = half.T @ sigma2 @ half
    inner = (inner + inner.T) / 2
    return torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64 (Heusel et al. 2017).

    Symmetric in its two distributions; :func:`trace_sqrt_product` decomposes ``sigma1``, so
    give the statistics with fewer images first.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    mean_term = (mu1 - mu2).square().sum()
    return float(mean_term + sigma1.trace() + sigma2.trace() - 2.0 * trace_sqrt_product(sigma1, sigma2))


@dataclass
class FeatureStats:
    """Statistics of one image set's Inception features: mean (D,), covariance (D, D), count; float64.

    ``features`` (n, D) are kept when KID is wanted (KID needs the features, not moments).
    """

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    features: torch.Tensor | None = None

    def frechet_distance(self, other: FeatureStats) -> float:
        a, b = (self, other) if self.count <= other.count else (other, self)
        return frechet_distance(a.mean, a.cov, b.mean, b.cov)


class _Features(nn.Module):
    """Identity 'feature network': the metrics receive features that were already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FrechetDistance64(FrechetInceptionDistance):
    """torchmetrics FID on given features, computed and returned in float64.

    States are torchmetrics' own (feature sum, sum of outer products, count; float64, summed
    across processes on ``compute``).
    """

    def __init__(self, num_features: int = NUM_FEATURES, **kwargs):
        super().__init__(feature=_Features(num_features), reset_real_features=False, **kwargs)

    def _stats(self, real: bool) -> FeatureStats:
        prefix = "real" if real else "fake"
        total = getattr(self, f"{prefix}_features_sum")
        outer = getattr(self, f"{prefix}_features_cov_sum")
        n = int(getattr(self, f"{prefix}_features_num_samples"))
        if n < 2:
            raise RuntimeError(f"FID needs at least 2 {prefix} images, got {n}")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        return FeatureStats(mean=mean, cov=cov, count=n)

    def compute(self) -> torch.Tensor:  # runs after torchmetrics has synced the states
        real, fake = self._stats(True), self._stats(False)
        return torch.tensor(real.frechet_distance(fake), dtype=torch.float64)

    def load_real(self, stats: FeatureStats) -> None:
        """Set the real-image states from cached statistics (inverse of ``_stats``)."""
        mean = stats.mean.to(self.real_features_sum.device, torch.float64)
        cov = stats.cov.to(mean.device, torch.float64)
        # Any n >= 2 gives back exactly this mean and covariance; a statistics file without a
        # count (pytorch-fid's mu/sigma .npz) gets the smallest.
        n = max(int(stats.count), 2)
        self.real_features_sum = mean * n
        self.real_features_cov_sum = cov * (n - 1) + n * torch.outer(mean, mean)
        self.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=mean.device)
        self._computed = None


def _canonical_order(features: torch.Tensor) -> torch.Tensor:
    return features[torch.argsort(features.sum(dim=1), stable=True)]


class KernelDistance(KernelInceptionDistance):
    """torchmetrics KID on given features: robust DDP gather, seeded subsets, kernel computed once."""

    def __init__(
        self,
        num_features: int = NUM_FEATURES,
        subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0,
        **kwargs,
    ):
        with warnings.catch_warnings():  # "KID keeps all features in memory": known, and wanted
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(
                feature=_Features(num_features),
                subsets=subsets,
                subset_size=subset_size,
                reset_real_features=False,
                **kwargs,
            )
        self.num_features = num_features
        self.seed = seed
        self.last_subset_size: int | None = None

    def update(self, imgs: torch.Tensor, real: bool) -> None:  # noqa: D102 - same as torchmetrics, float64
        (self.real_features if real else self.fake_features).append(imgs.double())

    def _concatenated(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) == 0:
            return torch.zeros(0, self.num_features, dtype=torch.float64, device=self.device)
        return dim_zero_cat(features)

    def _sync_dist(self, dist_sync_fn=gather_all_tensors, process_group=None) -> None:
        # torchmetrics gathers list states (dist_reduce_fx=None) element by element: every rank
        # must then hold the same number of tensors. One tensor each, possibly empty.
        self.real_features = [self._concatenated(self.real_features)]
        self.fake_features = [self._concatenated(self.fake_features)]
        super()._sync_dist(dist_sync_fn, process_group)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        # A canonical order (by feature sum) before drawing subsets: the result does not depend on
        # how the images were split over processes and batches (the gather order).
        real = _canonical_order(self._concatenated(self.real_features))
        fake = _canonical_order(self._concatenated(self.fake_features))
        m = min(self.subset_size, real.shape[0], fake.shape[0])
        if m < 2:
            raise RuntimeError(
                f"KID needs at least 2 real and 2 fake images, got {real.shape[0]} and {fake.shape[0]}"
            )
        self.last_subset_size = m
        kernel = lambda a, b: poly_kernel(a, b, self.degree, self.gamma, self.coef)  # noqa: E731
        # Small sets: the kernel on all pairs once, each subset an index into it (the same values
        # as torchmetrics' per-subset poly_mmd, at a fraction of the cost of 100 subsets).
        full = max(real.shape[0], fake.shape[0]) <= _FULL_KERNEL_MAX
        if full:
            k_rr, k_ff, k_rf = kernel(real, real), kernel(fake, fake), kernel(real, fake)
        generator = torch.Generator().manual_seed(self.seed)
        scores = []
        for _ in range(self.subsets):
            r = torch.randperm(real.shape[0], generator=generator)[:m].to(real.device)
            f = torch.randperm(fake.shape[0], generator=generator)[:m].to(real.device)
            if full:
                scores.append(maximum_mean_discrepancy(k_rr[r][:, r], k_rf[r][:, f], k_ff[f][:, f]))
            else:
                x, y = real[r], fake[f]
                scores.append(maximum_mean_discrepancy(kernel(x, x), kernel(x, y), kernel(y, y)))
        kid = torch.stack(scores)
        return kid.mean(), kid.std(unbiased=False)

    def load_real(self, features: torch.Tensor) -> None:
        self.real_features = [features.to(self.device, torch.float64)]
        self._computed = None


class InceptionMetrics:
    """FID + KID of generated ('fake') images against a real set, with one Inception pass per batch.

    Under torch.distributed each process updates with its own shard; ``compute`` gathers the
    states (torchmetrics' sync). Cached real statistics must be loaded on one process only
    (:meth:`load_real` on rank 0), or they would be counted once per process.

    Args:
        extractor: the Inception feature extractor (shared, not owned).
        kid: also compute KID (keeps all features in memory).
        kid_subsets, kid_subset_size: torch-fidelity's 100 x 1000 by default; the subset size
            shrinks to the smaller set when needed.
        device: where the metric states live (default: the extractor's device).
    """

    def __init__(
        self,
        extractor: InceptionFeatureExtractor | None,
        *,
        kid: bool = True,
        kid_subsets: int = KID_SUBSETS,
        kid_subset_size: int = KID_SUBSET_SIZE,
        kid_seed: int = 0,
        device: torch.device | str | None = None,
    ):
        self.extractor = extractor
        if device is None:
            device = next(extractor.parameters()).device if extractor is not None else "cpu"
        self.device = torch.device(device)
        self.fid = FrechetDistance64().to(self.device)
        self.kid = (
            KernelDistance(subsets=kid_subsets, subset_size=kid_subset_size, seed=kid_seed).to(self.device)
            if kid
            else None
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.extractor is None:
            raise RuntimeError("InceptionMetrics was built without an extractor: use update_features")
        return self.extractor(images)

    def update(self, images: torch.Tensor, real: bool) -> None:
        """images: uint8 (B, 3, H, W), or float in [-1, 1] (quantised with rounding)."""
        self.update_features(self.features(images), real)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        features = features.to(self.device, torch.float64)
        self.fid.update(features, real=real)
        if self.kid is not None:
            self.kid.update(features, real=real)

    def load_real(self, stats: FeatureStats) -> None:
        """Use cached real statistics (call on one process only under DDP)."""
        self.fid.load_real(stats)
        if self.kid is not None:
            if stats.features is None:
                raise ValueError(
                    "these cached statistics have no features: KID needs them (kid=False to skip)"
                )
            self.kid.load_real(stats.features)

    def compute(self) -> dict[str, float]:
        out = {"fid": float(self.fid.compute())}
        if self.kid is not None:
            kid_mean, kid_std = self.kid.compute()
            out.update(
                kid_mean=float(kid_mean), kid_std=float(kid_std), kid_subset_size=self.kid.last_subset_size
            )
        return out

    def reset_fake(self) -> None:
        """Forget the generated images, keep the real statistics (both metrics keep real states)."""
        self.fid.reset()
        if self.kid is not None:
            self.kid.reset()
