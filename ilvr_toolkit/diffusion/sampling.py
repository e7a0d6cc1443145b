"""Sampling loops as plain functions: ancestral DDPM and DDIM, with per-step hooks.

Both loops share one calling convention ``loop(diffusion, net, x_T, *, noise, hooks)`` (a class
label is bound to ``net`` with ``functools.partial``, or given as ``model_kwargs=``).
After each reverse step they build a :class:`Step` and pass it to every hook in order; a
hook returns ``None`` (observe only) or a new ``x_prev`` that replaces the step's result.
ILVR is such a hook, so it works unchanged under both loops.

``start_index=k`` starts the loop at respaced index k from the given x_k (SDEdit, Meng et al.
2022, with :func:`diffuse_to`). Draw order: x_T (or diffuse_to's), then per step the sampler's, the hooks'.
"""

import functools
import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .gaussian_diffusion import GaussianDiffusion, Net
from .noise import NoiseSource

__all__ = ["Step", "StepHook", "ddpm_sample", "ddim_sample", "diffuse_to", "draw_x_T"]


@dataclass
class Step:
    """What a hook sees after the reverse step x_t -> x_{t-1}.

    Attributes:
        index: respaced index i of the step's input x_t (num_timesteps-1 .. 0).
        t: original timestep of x_t, ``timestep_map[i]``.
        t_prev: original timestep of x_prev (``timestep_map[i-1]``), or -1 when x_prev is
            the final sample x_0.
        x_t: (B, C, H, W) the step's input.
        x_prev: (B, C, H, W) the sample the step produced (after earlier hooks).
        pred_xstart: (B, C, H, W) the step's (clipped) x_0 prediction.
        diffusion: the process being sampled.
        noise: the run's noise source (hooks draw from it so replays stay in order).
    """

    index: int
    t: int
    t_prev: int
    x_t: torch.Tensor
    x_prev: torch.Tensor
    pred_xstart: torch.Tensor
    diffusion: GaussianDiffusion
    noise: NoiseSource


StepHook = Callable[[Step], "torch.Tensor | None"]


def draw_x_T(noise: NoiseSource, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape`` (B, C, H, W), float32, from ``noise``."""
    return noise(shape, torch.device(device), torch.float32)


def diffuse_to(
    diffusion: GaussianDiffusion, reference: torch.Tensor, index: int, noise: NoiseSource
) -> torch.Tensor:
    """A draw of q(x_k | x_0 = reference) (Ho et al. eq. 4) at respaced index k = ``index``
    (0 <= k < num_timesteps): one draw eps ~ N(0, I) from ``noise``, shape of ``reference`` (B, C, H, W)."""
    index = operator.index(index)  # 2.5 is a TypeError, not step 2
    if not 0 <= index < diffusion.num_timesteps:
        raise ValueError(f"index {index} outside [0, {diffusion.num_timesteps - 1}]")
    eps = noise(reference.shape, reference.device, reference.dtype)
    t = torch.full((reference.shape[0],), index, device=reference.device, dtype=torch.long)
    return diffusion.q_sample(reference, t, eps)


def _run_hooks(step: Step, hooks: Sequence[StepHook]) -> torch.Tensor:
    for hook in hooks:
        if (changed := hook(step)) is not None:
            step.x_prev = changed
    return step.x_prev


def _loop(
    diffusion: GaussianDiffusion,
    x_T: torch.Tensor,
    hooks: Sequence[StepHook],
    noise: NoiseSource,
    step_fn: Callable[[torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    start_index: int | None,
) -> torch.Tensor:
    x, start = x_T, diffusion.num_timesteps - 1 if start_index is None else start_index
    if not 0 <= start < diffusion.num_timesteps:
        raise ValueError(f"start_index {start} outside [0, {diffusion.num_timesteps - 1}]")
    timesteps = diffusion.timestep_map.tolist()
    for i in reversed(range(start + 1)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x_prev, pred_xstart = step_fn(x, i, t)
        t_prev = timesteps[i - 1] if i > 0 else -1
        x = _run_hooks(Step(i, timesteps[i], t_prev, x, x_prev, pred_xstart, diffusion, noise), hooks)
    return x


def _binds_model_kwargs(sampler: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Also accept guided-diffusion's ``model_kwargs`` (e.g. ``{"y": labels}``, public here since
    0.1): ``sampler(diffusion, net, x_T, model_kwargs=k, ...)`` samples ``partial(net, **k)``."""

    @functools.wraps(sampler)
    def bound(
        diffusion: GaussianDiffusion, net: Net, x_T: torch.Tensor, *, model_kwargs: Any = None, **options: Any
    ):
        net = functools.partial(net, **model_kwargs) if model_kwargs else net
        return sampler(diffusion, net, x_T, **options)

    signature, keyword = inspect.signature(sampler), inspect.Parameter.KEYWORD_ONLY  # for help() and IDEs
    extra = inspect.Parameter("model_kwargs", keyword, default=None, annotation=dict[str, Any] | None)
    bound.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    return bound


@_binds_model_kwargs
@torch.no_grad()
def ddpm_sample(
    diffusion: GaussianDiffusion,
    net: Net,
    x_T: torch.Tensor,
    *,
    noise: NoiseSource,
    hooks: Sequence[StepHook] = (),
    clip_denoised: bool | None = None,
    start_index: int | None = None,
) -> torch.Tensor:
    """Ancestral sampling x_{t-1} = mu_theta(x_t, t) + sigma_t z (Ho et al. Alg. 2).

    One noise draw z per step, including the last one where it is unused (the official
    order, so recorded runs replay exactly). ``x_T`` is x_k with ``start_index`` k (SDEdit).
    ``clip_denoised`` None: ``diffusion.clip_denoised`` (the config's, default True).
    ``model_kwargs`` (e.g. ``{"y": labels}``): more arguments of ``net`` (guided-diffusion's).
    Returns x_0 (B, C, H, W).
    """
    clip_denoised = diffusion.clip_denoised if clip_denoised is None else clip_denoised

    def step_fn(x: torch.Tensor, i: int, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = diffusion.p_mean_variance(net, x, t, clip_denoised)
        z = noise(x.shape, x.device, x.dtype)
        if i == 0:
            return out["mean"], out["pred_xstart"]
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * z, out["pred_xstart"]

    return _loop(diffusion, x_T, hooks, noise, step_fn, start_index)


@_binds_model_kwargs
@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion,
    net: Net,
    x_T: torch.Tensor,
    *,
    noise: NoiseSource,
    hooks: Sequence[StepHook] = (),
    eta: float = 0.0,
    clip_denoised: bool | None = None,
    start_index: int | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 has the DDPM
    posterior variance (eta in [0, 1]). Noise is drawn only when eta > 0; ``start_index`` and
    ``clip_denoised``, ``model_kwargs`` as in ddpm_sample. Returns x_0 (B, C, H, W)."""
    if not 0.0 <= eta <= 1.0:  # NaN too
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    clip_denoised = diffusion.clip_denoised if clip_denoised is None else clip_denoised

    def step_fn(x: torch.Tensor, i: int, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = diffusion.p_mean_variance(net, x, t, clip_denoised)
        x0 = out["pred_xstart"]
        eps = diffusion.predict_eps_from_xstart(x, t, x0)
        alpha_bar = diffusion.coef("alphas_cumprod", t, x)
        alpha_bar_prev = diffusion.coef("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        sigma = sigma * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta > 0:
            z = noise(x.shape, x.device, x.dtype)
            if i > 0:
                mean = mean + sigma * z
        return mean, x0

    return _loop(diffusion, x_T, hooks, noise, step_fn, start_index)
