"""The ADM UNet (Dhariwal & Nichol 2021) with guided-diffusion's state-dict layout.

Module names and order mirror guided-diffusion's ``UNetModel``, so the official plain state dicts
(ILVR, P2-weighting) load with ``strict=True`` and no key conversion. Numerics follow it too:
GroupNorm (32 groups), the timestep embedding MLP and the ``out`` head run in float32, the rest in
the autocast dtype (``native_groupnorm``: GroupNorm too, see :class:`GroupNorm32`).
"""

import contextlib
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ATTENTION_BACKENDS, UNetConfig, get_preset
from .winograd import Conv3x3
from .winograd import kernel as winograd_kernel


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast on ``device`` if it is active there (meta and friends: no-op)."""
    try:
        active = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # device type without autocast support
        active = False
    return torch.autocast(device.type, enabled=False) if active else contextlib.nullcontext()


def _zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (guided-diffusion's init of every residual branch's last layer)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding in float32 of timesteps (B,) (original ones, integer or float): (B, dim),
    ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period^(-i / (dim // 2))``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (B, C, *) -> (B, C, *) in float32 (also under autocast), returned in the input's dtype.

    ``native = False`` (guided-diffusion's numerics): a bf16/fp16 input is normalised on a float32
    copy. ``native = True``: the kernel reads and writes the input's dtype (statistics and affine in
    float32: at most one rounding step away, ``tests/test_fast_paths.py``); 1.13-1.18x per bf16 ffhq
    CPU forward, slower in channels-last backward (docs/benchmarks.md).
    """

    native: bool = False

    def _native_for(self, x: torch.Tensor) -> bool:
        """Native for bf16/fp16 inputs, except fp16 with gradients off the CPU (fp16 gamma/beta
        gradients, summed over N*H*W and GradScaler-scaled, would overflow)."""
        if not self.native or x.dtype not in (torch.bfloat16, torch.float16):
            return False
        return x.device.type == "cpu" or x.dtype == torch.bfloat16 or not torch.is_grad_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()  # always affine here
        native = self._native_for(x)
        if native and x.device.type != "cpu":
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        with _no_autocast(x.device):
            y = F.group_norm(x if native else x.float(), self.num_groups, weight, bias, self.eps)
        return y.to(x.dtype)  # a no-op when native

    def act(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``silu(self(x) * (1 + scale) + shift)`` (scale/shift (B, C, 1, 1) or None), (B, C, *).
        Without autograd the affine and SiLU write into the norm's output (the same roundings:
        bitwise equal; no allocation, 2 of the 4 memory passes saved, docs/benchmarks.md).
        ResBlock and the ``out`` head call this for norm + SiLU: their ``nn.SiLU`` entries stay
        for guided-diffusion's module layout but are not called (a hook on them never fires,
        and an output a hook on the norm keeps is then overwritten when nothing needs grad)."""
        h = self(x)
        if any(v is not None and v.requires_grad for v in (h, scale, shift)):
            return F.silu(h if scale is None else h * (1 + scale) + shift)
        if scale is not None:
            h.mul_(1 + scale).add_(shift)
        return F.silu(h, inplace=True)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class _Checkpointed(nn.Module):
    """A block whose ``_forward`` is recomputed in backward when ``use_checkpoint`` is set."""

    use_checkpoint: bool = False

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes the timestep embedding ``emb`` (B, D) to its ResBlocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _upsample(channels: int) -> nn.Sequential:
    """Nearest 2x upsampling, then a 3x3 conv (key ``conv``). (B, C, H, W) -> (B, C, 2H, 2W)."""
    conv = Conv3x3(channels, channels)
    return nn.Sequential(OrderedDict(up=nn.Upsample(scale_factor=2), conv=conv))


def _downsample(channels: int) -> nn.Sequential:
    """Strided 3x3 conv (key ``op``). (B, C, H, W) -> (B, C, H/2, W/2)."""
    return nn.Sequential(OrderedDict(op=nn.Conv2d(channels, channels, 3, stride=2, padding=1)))


class ResBlock(_Checkpointed):
    """Residual block conditioned on the timestep embedding, optionally resampling.

    x: (B, C, H, W), emb: (B, D) -> (B, C_out, H', W') with H' = H, 2H (``up``) or H/2 (``down``).
    With ``use_scale_shift_norm`` the embedding gives (scale, shift) applied after the second
    norm as ``norm(h) * (1 + scale) + shift``; otherwise it is added before it. ``config``
    gives D (``time_embed_dim``), dropout, use_scale_shift_norm and use_checkpoint.
    """

    def __init__(
        self, channels: int, out_channels: int, config: UNetConfig, up: bool = False, down: bool = False
    ):
        super().__init__()
        self.use_scale_shift_norm, self.use_checkpoint = config.use_scale_shift_norm, config.use_checkpoint
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), Conv3x3(channels, out_channels))
        # parameter-free resamplers (nearest 2x up, 2x2 average pool down), shared by h and x
        resample = nn.Upsample(scale_factor=2) if up else nn.AvgPool2d(2) if down else nn.Identity()
        self.h_upd = self.x_upd = resample
        emb_out = 2 * out_channels if self.use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(config.time_embed_dim, emb_out))
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=config.dropout),
            _zero_module(Conv3x3(out_channels, out_channels)),
        )
        same = out_channels == channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[0].act(x)  # norm, SiLU; resampled between them and the first conv
        h = self.in_layers[2](self.h_upd(h))
        x = self.x_upd(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            h = self.out_layers[0].act(h, *emb_out.chunk(2, dim=1))
        else:
            h = self.out_layers[0].act(h + emb_out)
        return self.skip_connection(x) + self.out_layers[3](self.out_layers[2](h))


def qkv_attention(
    qkv: torch.Tensor, num_heads: int, legacy: bool = True, backend: str = "sdpa"
) -> torch.Tensor:
    """Multi-head self-attention on a packed (B, 3*H*C, T) tensor -> (B, H*C, T).

    ``legacy=True`` reads the channels per head as [q_h, k_h, v_h] (guided-diffusion's
    ``QKVAttentionLegacy``); ``legacy=False`` as [q for all heads, k..., v...]
    (``QKVAttention``, ``use_new_attention_order``). Scores are scaled by 1/sqrt(C).
    ``backend="sdpa"`` uses ``F.scaled_dot_product_attention``; ``"math"`` spells the
    computation out (q and k each scaled by C^(-1/4), softmax in float32) as the reference.
    """
    b, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * num_heads = {3 * num_heads}")
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = qkv.reshape(b, num_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = (z.reshape(b, num_heads, ch, length) for z in qkv.chunk(3, dim=1))
    # q, k, v: (B, H, C, T)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2)
    elif backend == "math":
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bhct,bhcs->bhts", q * scale, k * scale)  # (B, H, T_query, T_key)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = torch.einsum("bhts,bhcs->bhct", weight, v)
    else:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return out.reshape(b, num_heads * ch, length)


class AttentionBlock(_Checkpointed):
    """Spatial self-attention with a residual connection. (B, C, H, W) -> (B, C, H, W).

    ``config`` gives num_head_channels (which overrides ``num_heads``), use_new_attention_order,
    use_checkpoint and attention_backend.
    """

    def __init__(self, channels: int, num_heads: int, config: UNetConfig):
        super().__init__()
        per_head = config.num_head_channels  # -1: num_heads heads
        if channels % (num_heads if per_head == -1 else per_head):
            what = f"num_heads={num_heads}" if per_head == -1 else f"num_head_channels={per_head}"
            raise ValueError(f"{channels} channels are not divisible by {what}")
        self.num_heads = num_heads if per_head == -1 else channels // per_head
        self.legacy_order, self.backend = not config.use_new_attention_order, config.attention_backend
        self.use_checkpoint = config.use_checkpoint
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero_module(nn.Conv1d(channels, channels, 1))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy_order, self.backend)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """ADM UNet: ``forward(x, timesteps, y=None) -> (B, out_channels, H, W)``.

    Built from a :class:`UNetConfig`; its state dict has exactly guided-diffusion's keys.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        self.side_multiple = 2 ** (len(c.channel_mult) - 1)  # H and W of an input: multiples of it
        emb_dim = c.time_embed_dim
        self.time_embed = nn.Sequential(
            nn.Linear(c.num_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)
        ch = int(c.channel_mult[0] * c.num_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv3x3(c.in_channels, ch))])
        skip_chans, ds = [ch], 1  # channels of every skip connection, downsample rate
        for level, mult in enumerate(c.channel_mult):  # the down path
            for _ in range(c.num_res_blocks):
                out_ch = int(mult * c.num_channels)
                layers: list[nn.Module] = [ResBlock(ch, out_ch, c)]
                ch = out_ch
                if ds in c.attention_ds:
                    layers.append(AttentionBlock(ch, c.num_heads, c))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(c.channel_mult) - 1:
                down = ResBlock(ch, ch, c, down=True) if c.resblock_updown else _downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, c), AttentionBlock(ch, c.num_heads, c), ResBlock(ch, ch, c)
        )
        self.output_blocks = nn.ModuleList()
        heads_up = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample
        for level, mult in reversed(list(enumerate(c.channel_mult))):  # the up path, consuming the skips
            for i in range(c.num_res_blocks + 1):
                out_ch = int(mult * c.num_channels)
                layers = [ResBlock(ch + skip_chans.pop(), out_ch, c)]
                ch = out_ch
                if ds in c.attention_ds:
                    layers.append(AttentionBlock(ch, heads_up, c))
                if level and i == c.num_res_blocks:
                    layers.append(ResBlock(ch, ch, c, up=True) if c.resblock_updown else _upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero_module(Conv3x3(ch, c.out_channels)))
        self.set_native_groupnorm(c.native_groupnorm)
        self.set_winograd(c.winograd)

    # -- runtime settings
    def set_attention_backend(self, backend: str) -> None:
        """Switch every attention block to ``"sdpa"`` or ``"math"`` (no change to the weights)."""
        self.config = self.config.replace(attention_backend=backend)  # which checks the name
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.backend = backend

    def set_native_groupnorm(self, native: bool) -> None:
        """GroupNorm in the autocast dtype (True) or on float32 copies (False; guided-diffusion's)."""
        for module in self.modules():
            if isinstance(module, GroupNorm32):
                module.native = bool(native)
        self.config = self.config.replace(native_groupnorm=bool(native))

    def set_winograd(self, enabled: bool) -> None:
        """Winograd F(4x4, 3x3) for the float32 CPU 3x3 convolutions that qualify (True; builds the
        kernel now, OSError if it cannot) or the stock kernels only (False). See ``models/winograd.py``."""
        if enabled:
            winograd_kernel()
        for module in self.modules():
            if isinstance(module, Conv3x3):
                module.winograd = bool(enabled)
        self.config = self.config.replace(winograd=bool(enabled))

    # -- forward
    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W); timesteps: (B,) original timesteps; y: (B,) class labels or None.
        Returns (B, out_channels, H, W) in ``x``'s dtype (eps first, then v with learn_sigma);
        H and W must be multiples of 2 ** (len(channel_mult) - 1)."""
        if x.shape[-1] % self.side_multiple or x.shape[-2] % self.side_multiple:
            raise ValueError(
                f"x of shape {tuple(x.shape)}: H and W must be multiples of {self.side_multiple} here"
            )
        emb = self._embed(timesteps, y, x)
        skips = []
        h = x.to(self.input_blocks[0][0].weight.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        with _no_autocast(h.device):
            return self.out[2](self.out[0].act(h.to(self.out[2].weight.dtype))).to(x.dtype)

    def _embed(self, timesteps: torch.Tensor, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Timestep (+ class) embedding (B, 4 * num_channels), computed without autocast."""
        if (y is None) != (self.config.num_classes is None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        with _no_autocast(x.device):
            t_emb = timestep_embedding(t, self.config.num_channels).to(self.time_embed[0].weight.dtype)
            emb = self.time_embed(t_emb)
            if y is not None:
                emb = emb + self.label_emb(y)
        return emb


def build_unet(config: UNetConfig | str, device: torch.device | str | None = None) -> UNetModel:
    """Build a UNet from a config or a preset name (on ``device``; ``"meta"`` builds no storage)."""
    if isinstance(config, str):
        config = get_preset(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return UNetModel(config)
