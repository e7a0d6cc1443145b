"""Plain, serialisable description of a diffusion process, and its factory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["DiffusionConfig"]


@dataclass
class DiffusionConfig:
    """Settings of the diffusion process (guided-diffusion names where they exist).

    Attributes:
        steps: number of steps T of the base process.
        noise_schedule: "linear" or "cosine".
        learn_sigma: the network outputs 2C channels (eps, then v for the learned-range
            variance); otherwise the variance is fixed.
        sigma_small: with fixed variance, use the posterior variance (fixed-small) instead of
            beta_t (fixed-large).
        use_kl: train on the variational bound alone (``loss = vb * T``).
        rescale_learned_sigmas: scale the vb term of the hybrid loss by T / 1000.
        timestep_respacing: sampling steps kept (``"100"``, ``"10,10,5"``, ``"ddim50"``;
            empty keeps all).
        p2_gamma, p2_k: P2 weighting lambda_t = 1 / (k + SNR(t))^gamma of the eps-MSE
            (Choi et al. 2022); gamma = 0 is no weighting.
        clip_denoised: clip the x0 prediction to [-1, 1] while sampling.
    """

    steps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool = True
    sigma_small: bool = False
    use_kl: bool = False
    rescale_learned_sigmas: bool = False
    timestep_respacing: str = ""
    p2_gamma: float = 0.0
    p2_k: float = 1.0
    clip_denoised: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionConfig:
        """Build from a dict, ignoring keys this version does not know (forward compatible)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> DiffusionConfig:
        return DiffusionConfig(**{**self.to_dict(), **changes})
