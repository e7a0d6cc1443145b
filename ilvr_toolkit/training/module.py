"""The LightningModule that trains a domain DDPM: the UNet (attribute ``model``, so a checkpoint's
``state_dict`` holds it under ``"model."``; with the EMA callback, the EMA weights) and
``GaussianDiffusion.training_losses``. The hyperparameters hold the UNet and diffusion configs as
plain values, so ``models.load_model`` rebuilds a checkpoint with nothing else."""

import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from ilvr_toolkit import __version__
from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.diffusion import DiffusionConfig, GaussianDiffusion, create_diffusion
from ilvr_toolkit.images import to_float
from ilvr_toolkit.models import UNetConfig, build_unet, get_preset, load_model

log = logging.getLogger(__name__)

NanPolicy = Literal["raise", "skip"]


@dataclass
class OptimConfig:
    """AdamW settings (``torch.optim.AdamW``'s) and a linear lr warmup over ``warmup_steps``."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    fused: bool = False  # AdamW's fused kernel: 4.6x faster ffhq update on 2 CPU cores, rel. error 3e-9


def _check_optim(optim: OptimConfig) -> None:
    """:class:`UsageError` naming the first AdamW setting torch would refuse (only once training starts)."""
    betas = list(optim.betas)
    rules = (("lr", optim.lr >= 0, "a number >= 0"), ("eps", optim.eps >= 0, "a number >= 0"))
    rules += (("weight_decay", optim.weight_decay >= 0, "a number >= 0"),)
    rules += (("warmup_steps", optim.warmup_steps >= 0, "an integer >= 0"),)
    rules += (("betas", len(betas) == 2 and all(0 <= b < 1 for b in betas), "two numbers in [0, 1)"),)
    for name, ok, expected in rules:
        if not ok:
            raise UsageError(f"--model.optim.{name} {getattr(optim, name)}: expected {expected}")


def resolve_unet_config(unet: str | Mapping[str, Any] | UNetConfig) -> UNetConfig:
    """A UNetConfig from a preset name, a dict of UNetConfig fields, or a dict with a
    ``preset`` key whose other keys override that preset (e.g. ``{"preset": "ffhq",
    "dropout": 0.1}``)."""
    if isinstance(unet, UNetConfig):
        return unet
    if isinstance(unet, str):
        return get_preset(unet)
    if not isinstance(unet, Mapping):
        raise TypeError(
            f"model.unet must be a preset name or a dict of UNetConfig fields, not {type(unet).__name__}"
        )
    fields = dict(unet)
    preset = fields.pop("preset", None)
    base = get_preset(str(preset)).to_dict() if preset is not None else {}
    return UNetConfig.from_dict({**base, **fields})  # an unknown key is a ValueError naming it


class DiffusionModule(pl.LightningModule):
    """Trains an ADM UNet on uint8 image batches with the hybrid (eps-MSE + vb) loss.

    Args:
        unet: UNet preset name (``"ffhq"``, ``"tiny"``...) or UNetConfig fields (``preset``: the base).
        diffusion: the diffusion process (DiffusionConfig); ``learn_sigma`` must match the UNet's.
        optim: AdamW settings and warmup (``model.optim.lr`` ...; see OptimConfig).
        nan_policy: a non-finite loss or gradient: ``"raise"`` stops the run before the optimizer
            touches the weights (EMA and checkpoints stay finite); ``"skip"`` drops the update
            (global_step still advances; ``train/skipped_steps``). Under ``16-mixed`` the
            GradScaler skips overflowing steps; there only a non-finite *loss* counts.
        compile: ``torch.compile`` the UNet's forward (in place; state-dict keys unchanged).
        channels_last: UNet weights and batches in channels-last memory format (pays most under
            bf16-mixed; the same numbers up to rounding). See also ``unet.native_groupnorm``.
        init_from: fine-tune from the weights of a released plain state dict (checked against
            ``unet``), one of our checkpoints (its EMA weights) or a model file; optimizer and
            schedule start fresh. Recorded in the checkpoint's ``ilvr_toolkit`` entry.
    """

    flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor: not measured

    def __init__(
        self,
        unet: str | dict[str, Any] = "tiny",
        diffusion: DiffusionConfig = DiffusionConfig(),
        optim: OptimConfig = OptimConfig(),
        nan_policy: NanPolicy = "raise",
        compile: bool = False,
        channels_last: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.unet_config = resolve_unet_config(unet)
        if not isinstance(diffusion, DiffusionConfig):  # a dict from hparams (unknown keys refused), None
            diffusion = DiffusionConfig.from_dict(dict(diffusion or {}))
        self.diffusion_config = diffusion
        diffusion.check_training_settings()
        if diffusion.learn_sigma != self.unet_config.learn_sigma:
            raise ValueError(
                f"diffusion.learn_sigma={diffusion.learn_sigma} but the UNet has the opposite; they must agree"
            )
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f"nan_policy must be 'raise' or 'skip', got {nan_policy!r}")
        optim = OptimConfig(**optim) if isinstance(optim, Mapping) else optim  # from hparams
        _check_optim(optim)
        hparams = {"unet": self.unet_config.to_dict(), "diffusion": diffusion.to_dict()}
        hparams["optim"] = {**asdict(optim), "betas": [float(b) for b in optim.betas]}
        hparams.update(nan_policy=nan_policy, compile=bool(compile), channels_last=bool(channels_last))
        self.save_hyperparameters(hparams)  # plain values only: checkpoints load with weights_only=True
        self.model = build_unet(self.unet_config)
        # Training uses the base process; sampling callbacks build respaced ones.
        self.diffusion: GaussianDiffusion = create_diffusion(self.diffusion_config, respacing="")
        self.init_from = init_from
        if init_from:
            self._load_initial_weights(init_from)
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self._memory_format)  # before the EMA callback copies it
        self._generator: torch.Generator | None = None
        self._generator_step = -1  # the global step _generator was seeded for
        self._skipped_steps = 0
        # the micro-batches' loss since the last optimizer step: the last value, all finite?
        self._last_loss = self._loss_finite = None

    def _load_initial_weights(self, path: str) -> None:
        """Copy the weights of ``path`` into ``self.model`` (strict, architecture-checked)."""
        loaded = load_model(path, preset=self.unet_config)
        self.model.load_state_dict(loaded.model.state_dict(), strict=True)
        theirs = loaded.diffusion
        for key in ("steps", "noise_schedule", "learn_sigma"):
            if key in theirs and theirs[key] != getattr(self.diffusion_config, key):
                warnings.warn(
                    f"init_from {path}: it was trained with diffusion {key}={theirs[key]!r}, this run uses "
                    f"{getattr(self.diffusion_config, key)!r}",
                    stacklevel=2,
                )
        log.info("initialised the UNet from %s (%s, sha256 %s)", path, loaded.source_kind, loaded.sha256[:12])

    def on_fit_start(self) -> None:
        # After the EMA callback copied the module (its setup), so the EMA copy stays eager.
        if self.hparams.compile:
            self.model.compile()

    def on_train_start(self) -> None:
        self._generator = None  # seeded again by the first _draw of this (re)start

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.model(x, timesteps)

    def _draw(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform timesteps t (B,) and noise like x0, from this rank's generator."""
        gen = self._generator
        if gen is None or gen.device != x0.device or self._generator_step != self.global_step:
            # Per rank and per optimizer step (its micro-batches draw in turn), so that a resumed run
            # draws what the uninterrupted one did; seed_everything gives every rank the same global RNG.
            seed = torch.initial_seed() + 1_000_003 * self.global_rank + 7_919 * self.global_step
            gen = self._generator = (
                gen if gen is not None and gen.device == x0.device else torch.Generator(x0.device)
            )
            gen.manual_seed(seed % (2**63 - 1))
            self._generator_step = self.global_step
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device, generator=gen)
        return t, torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=gen)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        size = self.unet_config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"batch of {tuple(images.shape[-2:])} images, the UNet expects {size}x{size}")
        x0 = to_float(images).contiguous(memory_format=self._memory_format)
        t, noise = self._draw(x0)
        terms = self.diffusion.training_losses(self.model, x0, t, noise=noise)
        loss = terms["loss"].mean()
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._last_loss = loss.detach()
        self._log_terms(terms, t, batch_size=x0.shape[0])
        return loss

    def _log_terms(self, terms: dict[str, torch.Tensor], t: torch.Tensor, batch_size: int) -> None:
        """loss / mse / vb means and, on logging steps, their means by t-quartile (as
        guided-diffusion's ``log_loss_dict``). Values are this rank's batch (no collective)."""
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach().mean(), prog_bar=name == "loss", batch_size=batch_size)
        every = self.trainer.log_every_n_steps  # 0: no logging
        if not every or (self.global_step + 1) % every:  # only on steps that get logged
            return
        quartile = (4 * t // self.diffusion.num_timesteps).clamp_(max=3)
        counts = torch.bincount(quartile, minlength=4).tolist()
        for name, value in terms.items():
            sums = value.new_zeros(4, dtype=torch.float32).index_add_(0, quartile, value.detach().float())
            for q in range(4):
                if counts[q]:
                    self.log(f"train/{name}_q{q}", sums[q] / counts[q], batch_size=counts[q])

    def configure_optimizers(self) -> Any:
        hp = dict(self.hparams.optim)  # OptimConfig's fields: AdamW's arguments and warmup_steps
        warmup = int(hp.pop("warmup_steps"))
        hp["betas"] = tuple(hp["betas"])
        hp["fused"] = hp.get("fused") or None  # None: torch's foreach default
        optimizer = torch.optim.AdamW(self.model.parameters(), **hp)
        if warmup <= 0:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except under a mixed precision without a GradScaler (bf16-mixed):
        there the gradients are never scaled, so a fused AdamW (which Lightning refuses to clip,
        as it unscales internally under 16-mixed) is clipped like any optimizer, with the same calls."""
        plugin = self.trainer.precision_plugin
        if not (isinstance(plugin, MixedPrecision) and plugin.scaler is None and gradient_clip_val):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Grad norm logging (the lr is LearningRateMonitor's ``lr-AdamW``) and the NaN/inf guard (after
        backward and unscaling, before clipping and the step: a bad update never reaches the weights)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        self.log("train/grad_norm", norm, batch_size=1)
        loss, loss_finite = self._last_loss, self._loss_finite
        self._last_loss = self._loss_finite = None
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            # Overflowing fp16 gradients are the scaler's business (it skips the step); only a
            # non-finite loss counts, decided together so that every rank acts alike.
            loss_bad = loss_finite is not None and not bool(loss_finite)
            bad = self.trainer.strategy.reduce_boolean_decision(loss_bad, all=False)
        else:
            # Gradients are all-reduced already, so every rank reaches the same decision (a
            # NaN loss on one rank makes every rank's gradient NaN). One host sync per step.
            bad_t = ~torch.isfinite(norm)
            if loss_finite is not None and self.trainer.world_size == 1:
                bad_t = bad_t | ~loss_finite.to(bad_t.device)
            bad = bool(bad_t)
        if not bad:
            return
        where = f"global step {self.global_step} (epoch {self.current_epoch})"
        if self.hparams.nan_policy == "skip":
            self.model.zero_grad(set_to_none=True)
            self._skipped_steps += 1
            self.log("train/skipped_steps", float(self._skipped_steps), batch_size=1)
            log.warning(
                "non-finite loss/gradient at %s: update skipped (%d so far)", where, self._skipped_steps
            )
            return
        raise FloatingPointError(
            f"non-finite training loss or gradient at {where}: loss={float(loss) if loss is not None else 'n/a'}, "
            f"grad_norm={float(norm)}. The update was not applied and no checkpoint was written for this step; "
            "the newest checkpoint on disk is from before it. Try a lower lr, warmup_steps, "
            "gradient_clip_val, or precision 32-true / bf16-mixed; nan_policy=skip drops such steps instead."
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """On a resume, before Lightning restores the optimizer and LR schedule from ``checkpoint``:
        this run's ``model.optim`` settings (``lr``, ``betas``, ``eps``, ``weight_decay``) replace the
        checkpoint's (the warmup's progress is kept), with one log line naming what changed."""
        optim = dict(self.hparams.optim)
        ours = {key: optim[key] for key in ("lr", "eps", "weight_decay")} | {"betas": tuple(optim["betas"])}
        changed: dict[str, str] = {}
        for state in checkpoint.get("optimizer_states") or []:
            for group in state.get("param_groups", []):
                base = group.get("initial_lr", group["lr"])  # initial_lr: set by the warmup schedule
                theirs = {**group, "lr": base, "betas": tuple(group.get("betas", ()))}
                differ = {k: v for k, v in ours.items() if theirs.get(k) != v}
                changed.update({k: f"{k} {v} (the checkpoint's: {theirs.get(k)})" for k, v in differ.items()})
                group.update({k: v for k, v in ours.items() if k != "lr"})
                if int(optim["warmup_steps"]) <= 0 and group["lr"] != ours["lr"]:  # no warmup now: none left
                    changed["lr"] = f"lr {ours['lr']} (the checkpoint's: {group['lr']}, within its warmup)"
                    group["lr"] = ours["lr"]
                elif base != ours["lr"]:  # scaled: the warmup's factor stays
                    group["lr"] = ours["lr"] * (group["lr"] / base if base else 1.0)
                    group.update({"initial_lr": ours["lr"]} if "initial_lr" in group else {})
        for schedule in checkpoint.get("lr_schedulers") or []:
            if "base_lrs" in schedule:  # LambdaLR: lr = base_lr * warmup factor at its next step
                schedule["base_lrs"] = [ours["lr"]] * len(schedule["base_lrs"])
        if changed:
            log.info("resuming with %s", ", ".join(changed.values()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info: dict[str, Any] = {"version": __version__, "init_from": self.init_from}
        for cb in self.trainer.callbacks:  # called by the trainer: attached
            if getattr(cb, "ilvr_toolkit_key", None):  # EMA, FIDMonitor: their describe()
                info[cb.ilvr_toolkit_key] = cb.describe()
        checkpoint["ilvr_toolkit"] = info
