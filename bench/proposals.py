"""Fewer passes over the activations around GroupNorm: one applied fast path and one
proposal for ilvr_toolkit/models, timed against the stock model.

    python bench/proposals.py --threads 1                         # ffhq, batch 1, fp32, channels_last
    python bench/proposals.py --precision bf16 --batch 2          # where native-gn can pay
    python bench/proposals.py --device cuda --precision bf16 --batch 32

Variants, timed interleaved in one process against the stock model:

``epilogue``: stock ``ResBlock._forward`` (use_scale_shift_norm) makes five full passes over
h after the conv: group_norm (statistics + normalise/affine), ``* (1 + scale)``,
``+ shift``, SiLU, each writing a new tensor. Proposed: fold the per-sample scale/shift into
the GroupNorm affine (for one sample ``GN(h; w, b) * (1 + s) + t == GN(h; w * (1 + s),
b * (1 + s) + t)`` exactly; for B > 1 the same with h viewed as one sample of B*C channels
and B*G groups when h is NCHW-contiguous, else GN + one ``addcmul``), then SiLU in place
on that fresh tensor when no gradient is recorded (inference only). Same for ``in_layers``.
(The in-place half is in the model now, bitwise: ``GroupNorm32.act``; the fold is not.)

``native-gn`` (applied: ``UNetConfig.native_groupnorm``, sample.py ``--native_groupnorm``):
under bf16/fp16 autocast the stock GroupNorm32 casts its input to float32 and its output
back (two extra full passes per norm, 65 norms per ffhq forward). PyTorch's group_norm
already accumulates the statistics of reduced-precision inputs in float32, so the setting
calls it on the bf16 tensor directly: the same float32 computation rounded once (within one
rounding step of the stock output, ``tests/test_fast_paths.py``). No change in fp32.

``both``: the two together. Reported: the speed-up (median over rounds of stock time /
variant time) and the relative error against the stock output and against plain fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.add_repo_to_path()
from ilvr_toolkit.models import build_unet, unet  # noqa: E402


def _silu(h: torch.Tensor) -> torch.Tensor:
    return F.silu(h, inplace=not torch.is_grad_enabled())


def norm_silu(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm32 then SiLU, the SiLU in place on the norm's fresh output."""
    return _silu(norm(x))


def norm_scale_shift(
    norm: torch.nn.GroupNorm, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``GroupNorm32(h) * (1 + scale) + shift`` in float32, with one pass where possible.

    h: (B, C, H, W); scale, shift: (B, C, 1, 1). Returns float32 (B, C, H, W) like
    GroupNorm32 does before its cast back to h's dtype.
    """
    b, c = h.shape[:2]
    x = h.float()
    gain = (1 + scale.float()).reshape(b, c)  # (B, C)
    weight = norm.weight.float()[None] * gain  # (B, C)
    bias = norm.bias.float()[None] * gain + shift.float().reshape(b, c)
    with unet._no_autocast(h.device):
        if b == 1:
            return F.group_norm(x, norm.num_groups, weight[0], bias[0], norm.eps)
        if x.is_contiguous():
            y = F.group_norm(
                x.reshape(1, b * c, *x.shape[2:]),
                b * norm.num_groups,
                weight.reshape(-1),
                bias.reshape(-1),
                norm.eps,
            )
            return y.reshape(x.shape)
        y = F.group_norm(x, norm.num_groups, None, None, norm.eps)
        return torch.addcmul(bias[:, :, None, None], y, weight[:, :, None, None])


def _resblock_forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    in_norm, in_conv = self.in_layers[0], self.in_layers[2]
    h = norm_silu(in_norm, x)
    if self.updown:
        h, x = self.h_upd(h), self.x_upd(x)
    h = in_conv(h)
    emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
    norm, dropout, conv = self.out_layers[0], self.out_layers[2], self.out_layers[3]
    if self.use_scale_shift_norm:
        scale, shift = emb_out.chunk(2, dim=1)
        h = _silu(norm_scale_shift(norm, h, scale, shift)).to(h.dtype)
    else:
        h = norm_silu(norm, h + emb_out)
    return self.skip_connection(x) + conv(dropout(h))


VARIANTS = ("epilogue", "native-gn", "both")


@contextlib.contextmanager
def proposal(variant: str, model: torch.nn.Module):
    """Run ``model`` with ``variant`` inside this block (epilogue: a class-level patch)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    original_res = unet.ResBlock._forward
    if variant in ("epilogue", "both"):
        unet.ResBlock._forward = _resblock_forward
    model.set_native_groupnorm(variant in ("native-gn", "both"))
    try:
        yield
    finally:
        unet.ResBlock._forward = original_res
        model.set_native_groupnorm(False)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser)
    parser.add_argument("--preset", default="ffhq")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=list(common.PRECISIONS), default="fp32")
    parser.add_argument("--channels-last", choices=["on", "off"], default="on")
    parser.add_argument("--malloc", choices=["default", "tuned"], default="tuned")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="default: epilogue in fp32; all three under autocast",
    )
    return parser.parse_args(argv)


def _inputs(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model with random weights, x (B, 3, S, S), t (B,)) in the layout asked for."""
    model = common.randomize_parameters_(build_unet(args.preset), seed=args.seed).eval().requires_grad_(False)
    model = model.to(device)
    size = model.config.image_size
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    if args.channels_last == "on":
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    return model, x, t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _rows(timings: dict, outputs: dict, ref32: torch.Tensor, batch: int) -> list[dict]:
    """One row per variant: time, speed-up over stock (median of paired rounds), errors."""
    rows = []
    for name, timing in timings.items():
        ratios = sorted(s / v for s, v in zip(timings["stock"].seconds, timing.seconds, strict=True))
        rows.append(
            {
                "variant": name,
                "ms/forward": timing.median * 1e3,
                "spread": timing.spread,
                "img/s": batch / timing.median,
                "speed-up": statistics.median(ratios),
                "rel err vs stock": _rel(outputs[name], outputs["stock"]),
                "rel err vs fp32": _rel(outputs[name], ref32),
                "seconds": timing.seconds,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = common.setup(args)
    if device.type == "cpu" and args.malloc == "tuned":
        common.set_cpu_malloc(True)
    variants = args.variants or (["epilogue"] if args.precision == "fp32" else list(VARIANTS))
    model, x, t = _inputs(args, device)

    def forward(variant: str | None):
        def run() -> torch.Tensor:
            patches = proposal(variant, model) if variant else contextlib.nullcontext()
            with torch.no_grad(), common.autocast(device, args.precision), patches:
                return model(x, t)

        return run

    with torch.no_grad():
        ref32 = model(x, t).float()  # plain fp32, stock
    fns = {"stock": forward(None), **{v: forward(v) for v in variants}}
    outputs = {name: fn().float() for name, fn in fns.items()}
    repeats = args.repeats or (4 if device.type == "cpu" else 20)
    timings = common.interleave(fns, device, rounds=repeats, warmup=1 if args.warmup is None else args.warmup)
    rows = _rows(timings, outputs, ref32, args.batch)
    columns = ["variant", "ms/forward", "spread", "img/s", "speed-up", "rel err vs stock", "rel err vs fp32"]
    common.print_table(rows, columns, title=(
        f"GroupNorm proposals, {args.preset} batch {args.batch} {args.precision} channels_last {args.channels_last}, "
        f"{device}, {torch.get_num_threads()} threads; speed-up = median over {repeats} rounds of stock/variant"
    ))  # fmt: skip
    best = max(rows[1:], key=lambda r: r["speed-up"])
    payload = {
        "env": common.environment(device), "args": vars(args), "rows": rows, "best": best["variant"],
        "speedup": best["speed-up"], "rel_error": best["rel err vs stock"],
    }  # fmt: skip
    common.write_json(f"proposals{args.tag}", payload, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
