"""Plain, serialisable description of a diffusion process, and its factory."""

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from ..cli import UsageError, check_range
from ..flags import checked_fields, diffusion_settings  # stdlib only, shared with models
from .respace import space_timesteps


@dataclass
class DiffusionConfig:
    """Settings of the diffusion process (guided-diffusion names where they exist).

    Attributes:
        steps: number of steps T of the base process.
        noise_schedule: "linear" or "cosine".
        learn_sigma: the network outputs 2C channels (eps, then v for the learned-range variance).
        sigma_small: a fixed variance is the posterior's (fixed-small), not beta_t (fixed-large).
        use_kl: train on the variational bound alone (``loss = vb * T``).
        predict_xstart: the network predicts x_0 instead of eps.
        rescale_timesteps: the network is fed t * 1000 / T (float), T of the base process, not t.
        rescale_learned_sigmas: scale the vb term of the hybrid loss by T / 1000.
        timestep_respacing: sampling steps kept (``"100"``, ``"10,10,5"``, ``"ddim50"``; empty: all).
        p2_gamma, p2_k: P2 weighting lambda_t = 1 / (k + SNR(t))^gamma of the eps-MSE
            (Choi et al. 2022); gamma = 0 is no weighting.
        clip_denoised: clip the x0 prediction to [-1, 1] while sampling.
    """

    steps: int = 1000
    noise_schedule: Literal["linear", "cosine"] = "linear"
    learn_sigma: bool = True
    sigma_small: bool = False
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    rescale_learned_sigmas: bool = False
    timestep_respacing: str = ""
    p2_gamma: float = 0.0
    p2_k: float = 1.0
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        check_range("model.diffusion.steps", self.steps, 2)  # GaussianDiffusion's least
        self.timestep_respacing = str(self.timestep_respacing or "")  # ``100`` in a YAML file
        if self.noise_schedule == "linear" and self.steps <= 20:  # beta_T = 0.02 * 1000 / T
            raise UsageError(
                f"--model.diffusion.steps {self.steps}: the linear schedule needs T >= 21 (its last "
                f"beta, 20 / T, must stay below 1); use more steps or --model.diffusion.noise_schedule cosine"
            )

    def check_training_settings(self) -> None:
        """:class:`UsageError` naming the ``--model.diffusion.*`` option unless P2's gamma and k are
        numbers >= 0 and ``timestep_respacing`` is step counts of these ``steps`` (not checked when
        made: a checkpoint's stored values matter only where they are used)."""
        check_range("model.diffusion.p2_gamma", self.p2_gamma, 0.0)
        check_range("model.diffusion.p2_k", self.p2_k, 0.0)
        try:
            kept = space_timesteps(self.steps, self.timestep_respacing)
        except ValueError as error:
            reason = str(error) if str(error).startswith("cannot") else "not step counts"
            raise UsageError(
                f"--model.diffusion.timestep_respacing {self.timestep_respacing!r}: {reason}; expected "
                f"counts such as 100, 10,20,30 or ddim50 of the {self.steps} steps, or '' (all)"
            ) from None
        if len(kept) < 2:  # what GaussianDiffusion needs: refused here, not by sample.py after training
            raise UsageError(
                f"--model.diffusion.timestep_respacing {self.timestep_respacing!r}: a diffusion needs at "
                f"least 2 timesteps, got {len(kept)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DiffusionConfig":
        """Build from a dict of these fields; an unknown key is a ValueError naming it."""
        return cls(**checked_fields(cls, data, "diffusion setting"))

    @classmethod
    def from_guided_diffusion_flags(cls, flags: str | Mapping[str, Any]) -> "DiffusionConfig":
        """The diffusion that guided-diffusion's ``create_gaussian_diffusion`` builds from
        ``flags`` (a README string or a dict; flags left out take its scripts' defaults,
        e.g. ``learn_sigma False``); see :func:`ilvr_toolkit.models.parse_flags`."""
        return cls.from_dict(diffusion_settings(flags))

    def replace(self, **changes: Any) -> "DiffusionConfig":
        return replace(self, **changes)
