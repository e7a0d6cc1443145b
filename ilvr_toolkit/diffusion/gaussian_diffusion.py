"""Gaussian diffusion (Ho et al. 2020) with learned-range variance (Nichol & Dhariwal 2021).

Notation: alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s. All schedule tables are
float64 (kept on the CPU) and cast once per (device, dtype) to the sample's dtype; the
per-step arithmetic runs in that dtype (float32 for the reference fixtures). Indices ``t``
passed to the methods are *respaced* indices 0..num_timesteps-1; the network is always
called with the original timesteps ``timestep_map[t]`` (or rescaled: :meth:`_timesteps`).
"""

import math
from collections.abc import Callable
from typing import Any

import torch

from .config import DiffusionConfig
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import respace_betas, space_timesteps
from .schedules import get_named_beta_schedule

Net = Callable[..., torch.Tensor]
"""A network ``net(x, t, **model_kwargs) -> out`` called with original timesteps."""

_VARIANCE_TYPES = ("learned_range", "fixed_small", "fixed_large")
_FIXED_LOG_VAR = {"fixed_small": "posterior_log_variance_clipped", "fixed_large": "fixed_large_log_variance"}


class GaussianDiffusion:
    """A (possibly respaced) diffusion process.

    Args:
        betas: (T,) float64 betas of this process.
        timestep_map: (T,) original timestep of each index (identity when not respaced).
        variance: "learned_range", "fixed_small" or "fixed_large".
        original_num_steps: T of the base process the network was trained on.

    Attributes set after construction (``create_diffusion`` does, from the config):
        predict_xstart: the network's output (first C channels) is x_0, not eps.
        rescale_timesteps: the network gets ``t * 1000 / original_num_steps`` (float32).
        clip_denoised: the samplers clip the x_0 prediction to [-1, 1] (their default).
    """

    predict_xstart: bool = False
    rescale_timesteps: bool = False
    clip_denoised: bool = True

    def __init__(
        self,
        betas: torch.Tensor,
        *,
        timestep_map: list[int] | None = None,
        variance: str = "learned_range",
        use_kl: bool = False,
        rescale_learned_sigmas: bool = False,
        p2_gamma: float = 0.0,
        p2_k: float = 1.0,
        original_num_steps: int | None = None,
    ) -> None:
        if variance not in _VARIANCE_TYPES:
            raise ValueError(f"variance must be one of {_VARIANCE_TYPES}, got {variance!r}")
        self.variance, self.use_kl, self.rescale_learned_sigmas = variance, use_kl, rescale_learned_sigmas
        self.p2_gamma, self.p2_k = p2_gamma, p2_k
        self.betas = betas = betas.to(torch.float64)
        self.num_timesteps = int(betas.shape[0])
        if self.num_timesteps < 2:  # t = 0's clipped posterior log-variance is t = 1's
            raise ValueError(f"a diffusion needs at least 2 timesteps, got {self.num_timesteps}")
        self.original_num_steps = original_num_steps or self.num_timesteps
        kept = range(self.num_timesteps) if timestep_map is None else timestep_map
        self.timestep_map = torch.tensor(list(kept), dtype=torch.long)
        if self.timestep_map.shape != betas.shape:
            raise ValueError(
                f"timestep_map has {len(self.timestep_map)} entries for {self.num_timesteps} betas"
            )
        # The (T,) float64 tables, named as in guided-diffusion; alpha_bar = alphas_cumprod.
        self.alphas_cumprod = alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        self.sqrt_alphas_cumprod = alpha_bar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alpha_bar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alpha_bar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alpha_bar - 1.0).sqrt()
        self.posterior_variance = variance_t = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)  # eq. 7
        # The posterior variance is 0 at t = 0: clip its log to the value at t = 1.
        self.posterior_log_variance_clipped = torch.cat([variance_t[1:2], variance_t[1:]]).log()
        self.posterior_mean_coef1 = betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)
        self.posterior_mean_coef2 = (1.0 - alpha_bar_prev) * (1.0 - betas).sqrt() / (1.0 - alpha_bar)
        self.log_betas = betas.log()
        self.fixed_large_variance = torch.cat([variance_t[1:2], betas[1:]])
        self.fixed_large_log_variance = self.fixed_large_variance.log()
        self.snr = alpha_bar / (1.0 - alpha_bar)
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def table(self, name: str) -> torch.Tensor:
        """The (T,) float64 table ``name`` (e.g. "alphas_cumprod", "posterior_log_variance_clipped")."""
        return getattr(self, name)

    def _table_as(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The table ``name`` on ``device`` in ``dtype``, cast once per (device, dtype)."""
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device).to(dtype)
        return self._cache[key]

    def coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The (T,) table ``name`` (e.g. ``"alphas_cumprod"``) at respaced timesteps ``t`` (B,),
        shaped (B, 1, 1, 1) to broadcast against ``like`` (B, C, H, W), in its dtype and device."""
        return self._table_as(name, like.device, like.dtype)[t].view(-1, *([1] * (like.ndim - 1)))

    def _timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The network's timesteps (B,) for respaced indices t (B,): original ones (long), or
        with ``rescale_timesteps`` those times 1000 / original_num_steps (float32)."""
        steps = self._table_as("timestep_map", t.device, torch.long)[t]
        return steps.float() * (1000.0 / self.original_num_steps) if self.rescale_timesteps else steps

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (Ho et al. eq. 4).

        x_start = x_0 and noise = eps (B, C, H, W), t (B,) respaced indices -> x_t (B, C, H, W).
        """
        return (
            self.coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self.coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eq. 6-7).

        x_start = x_0 and x_t (B, C, H, W), t (B,) respaced indices -> mean (B, C, H, W),
        variance and log-variance (B, 1, 1, 1) (they depend on t alone).
        """
        mean = (
            self.coef("posterior_mean_coef1", t, x_t) * x_start
            + self.coef("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self.coef("posterior_variance", t, x_t)
        return mean, variance, self.coef("posterior_log_variance_clipped", t, x_t)

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t).

        x_t and eps (B, C, H, W), t (B,) respaced indices -> x_0 (B, C, H, W).
        """
        return (
            self.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self.coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1).

        x_t and pred_xstart = x_0 (B, C, H, W), t (B,) respaced indices -> eps (B, C, H, W).
        """
        numerator = self.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart
        return numerator / self.coef("sqrt_recipm1_alphas_cumprod", t, x_t)

    def p_mean_variance_from_output(
        self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a network output (B, C or 2C, H, W) for x = x_t (B, C, H, W).

        Returns mean, variance, log_variance, pred_xstart and eps, each (B, C, H, W).
        """
        out, channels = out.to(x.dtype), x.shape[1]
        expected = 2 * channels if self.variance == "learned_range" else channels
        if out.shape[1] != expected:
            raise ValueError(
                f"{self.variance} variance needs {expected} output channels, the network gave {out.shape[1]}: "
                "learn_sigma of the model and of the diffusion config must agree"
            )
        head = out[:, :channels]  # eps, or x_0 (predict_xstart)
        if self.variance == "learned_range":  # v in [-1, 1] interpolates log beta~_t .. log beta_t
            frac, min_log = (out[:, channels:] + 1) / 2, self.coef("posterior_log_variance_clipped", t, x)
            log_variance = frac * self.coef("log_betas", t, x) + (1 - frac) * min_log
        else:
            log_variance = self.coef(_FIXED_LOG_VAR[self.variance], t, x).expand_as(x)
        pred_xstart = head if self.predict_xstart else self.predict_xstart_from_eps(x, t, head)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        eps = self.predict_eps_from_xstart(x, t, pred_xstart) if self.predict_xstart else head
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        out = dict(mean=mean, variance=log_variance.exp(), log_variance=log_variance)
        return dict(out, pred_xstart=pred_xstart, eps=eps)

    def p_mean_variance(
        self,
        net: Net,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Call ``net(x, timestep_map[t])`` and return p(x_{t-1} | x_t) as above.

        x = x_t (B, C, H, W), t (B,) respaced indices -> mean, variance, log_variance,
        pred_xstart and eps, each (B, C, H, W) (``p_mean_variance_from_output``).
        """
        out = net(x, self._timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(out, x, t, clip_denoised)

    def _vb_terms_bpd(
        self, out: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L_{t} in bits per dim (B,): KL to the true posterior, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance_from_output(out, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def training_losses(
        self,
        net: Net,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example losses (B,) for x_0 (B, C, H, W) at indices t (B,): "loss" and, as applicable,
        "mse" (eps-MSE, or x_0-MSE with predict_xstart; P2-weighted when p2_gamma > 0) and "vb" (the
        variational term with the mean's gradient stopped, so it trains only the variance; Nichol &
        Dhariwal's hybrid objective ``loss = mse + vb``)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        out = net(x_t, self._timesteps(t), **(model_kwargs or {})).to(x_start.dtype)
        if self.use_kl:
            vb = self._vb_terms_bpd(out, x_start, x_t, t) * self.num_timesteps
            return {"loss": vb, "vb": vb}
        terms: dict[str, torch.Tensor] = {}
        head = out  # eps, or x_0 with predict_xstart
        if self.variance == "learned_range":
            channels = x_start.shape[1]
            head, v = out[:, :channels], out[:, channels:]
            terms["vb"] = self._vb_terms_bpd(torch.cat([head.detach(), v], dim=1), x_start, x_t, t)
            if self.rescale_learned_sigmas:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        squared = ((x_start if self.predict_xstart else noise) - head) ** 2
        if self.p2_gamma != 0.0:  # P2 weighting (Choi et al. 2022)
            squared = (self.p2_k + self.coef("snr", t, x_start)) ** (-self.p2_gamma) * squared
        terms["mse"] = mean_flat(squared)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def create_diffusion(config: DiffusionConfig, respacing: str | None = None) -> GaussianDiffusion:
    """The diffusion described by ``config``, respaced by ``respacing`` (default: the config's)."""
    betas = get_named_beta_schedule(config.noise_schedule, config.steps)
    spec = config.timestep_respacing if respacing is None else respacing
    kept = space_timesteps(config.steps, spec)
    if len(kept) != config.steps:
        betas = respace_betas(torch.cumprod(1.0 - betas, dim=0), kept)
    fixed = "fixed_small" if config.sigma_small else "fixed_large"
    options = {k: getattr(config, k) for k in ("use_kl", "rescale_learned_sigmas", "p2_gamma", "p2_k")}
    options.update(timestep_map=kept, original_num_steps=config.steps)
    diffusion = GaussianDiffusion(betas, variance="learned_range" if config.learn_sigma else fixed, **options)
    diffusion.predict_xstart, diffusion.rescale_timesteps = config.predict_xstart, config.rescale_timesteps
    diffusion.clip_denoised = config.clip_denoised
    return diffusion
