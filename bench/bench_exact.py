"""Exact fp32 path against the baseline, and every convolution against the host's best.

    python bench/bench_exact.py                      # ffhq: forward b1, b4; train step b2; convs
    python bench/bench_exact.py --rounds 5 --threads 2
    python bench/bench_exact.py --skip-convs --cases forward1 train2
    python bench/bench_exact.py --skip-convs --rounds 1 --repeats 1 --variants exact \
        --cases forward1 forward2 forward4 forward8 train1 train2 train4 train8   # faults per call

Baseline (issue 17): the same network with glibc's default allocator and every fast path off,
which runs at the official guided-diffusion code's speed. Each measurement runs in a **fresh
process** (the allocator is process-wide, and only a fresh process has glibc's truly dynamic
mmap threshold), and the variants alternate A B, B A, ... over ``--rounds`` rounds so a drift
of the machine hits every variant alike. Variants:

- ``baseline``: default malloc, AdamW with torch's default (foreach) implementation;
- ``exact``: the command-line tools' process tuning (``ilvr_toolkit.runtime.tune_process``:
  glibc malloc keeps freed memory), the same kernels, bitwise the same numbers;
- ``fused`` (training only): ``exact`` + ``model.optim.fused: true`` (AdamW's fused kernel;
  error bound in tests/test_fast_paths.py);
- ``winograd``: ``exact`` + ``--winograd true`` (Winograd F(4x4, 3x3) for the float32 3x3
  convolutions, ``ilvr_toolkit.models.winograd``; error bound in tests/test_winograd.py);
  training also with the fused AdamW;
- ``bf16``, the opt-in fast path (error bounds in tests/test_fast_paths.py): forward as
  ``sample.py --precision bf16 --channels_last true --native_groupnorm true``; training as
  ``train.py --trainer.precision bf16-mixed --model.channels_last true --model.optim.fused true``
  (bf16 autocast around forward and loss). Pays where the CPU has bf16 dot products
  (AVX512-BF16, AMX); its first values differ from fp32 within those bounds.

A training step is what ``train.py`` runs per step: q_sample at random t, the UNet forward,
the P2-weighted hybrid loss, backward, AdamW, the EMA update (``get_ema_multi_avg_fn``).
Reported per case: median seconds per call, ratio baseline/variant, minor page faults per
call, and (training) the first-step loss of each variant, which must be equal.

Convolutions: every distinct Conv2d shape of the UNet at batch 2 is timed alone, forward and
backward (the gradients training computes: the weights', and the input's except for the first
conv, whose input is the data), as GFLOP/s and as a share of the best GFLOP/s any of them
reached in the same run; ``ms lost`` is what running a shape at 90% of that best would save
per training step (its calls per forward x (forward + backward time - time at 90%)).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from ilvr_toolkit.diffusion import DiffusionConfig, create_diffusion  # noqa: E402
from ilvr_toolkit.models import build_unet, get_preset  # noqa: E402

CASES = ["forward1", "forward4", "train2"]  # default; any forwardN / trainN is accepted
VARIANTS = {
    "forward": ["baseline", "exact", "winograd", "bf16"],
    "train": ["baseline", "exact", "fused", "winograd", "bf16"],
}


def build(preset: str, seed: int) -> torch.nn.Module:
    return common.randomize_parameters_(build_unet(get_preset(preset)), seed)


def forward_fn(net: torch.nn.Module, batch: int, size: int, bf16: bool = False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last) if bf16 else x
    t = torch.full((batch,), 500, dtype=torch.long)

    def call() -> float:
        with torch.no_grad(), autocast(bf16):
            return float(net(x, t).double().sum())

    return call


def autocast(bf16: bool):  # noqa: ANN201
    return common.autocast(torch.device("cpu"), "bf16" if bf16 else "fp32")


def train_fn(net: torch.nn.Module, batch: int, size: int, fused: bool, bf16: bool = False):
    """One step as train.py: loss, backward, AdamW, EMA; returns the loss."""
    diffusion = create_diffusion(DiffusionConfig(learn_sigma=True, p2_gamma=1.0))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=fused or None)
    ema = [p.detach().clone() for p in net.parameters()]
    update = torch.optim.swa_utils.get_ema_multi_avg_fn(0.9999)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    if bf16:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def call() -> float:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        with autocast(bf16):
            loss = diffusion.training_losses(net, x0, t, noise=noise)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            update(ema, [p.detach() for p in net.parameters()], torch.tensor(1))
        return float(loss)

    return call


def parse_case(case: str) -> tuple[str, int]:
    """``"train8"`` -> ``("train", 8)``."""
    match = re.fullmatch(r"(forward|train)([1-9][0-9]*)", case)
    if not match:
        raise argparse.ArgumentTypeError(f"case {case!r}: expected forwardN or trainN, e.g. forward8")
    return match[1], int(match[2])


def child(args: argparse.Namespace) -> None:
    """One variant of one case in this (fresh) process; prints a JSON line."""
    kind, batch = parse_case(args.case)
    if args.variant != "baseline":
        from ilvr_toolkit.runtime import tune_process

        tune_process(args.threads)
    elif args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build(args.preset, args.seed)
    size = get_preset(args.preset).image_size
    bf16 = args.variant == "bf16"
    if bf16:
        net.to(memory_format=torch.channels_last).set_native_groupnorm(kind == "forward")
    net.set_winograd(args.variant == "winograd")
    fn = (
        forward_fn(net, batch, size, bf16)
        if kind == "forward"
        else train_fn(net, batch, size, args.variant in ("fused", "winograd", "bf16"), bf16)
    )
    first = fn()  # warm-up (allocator, oneDNN primitives); its value is the first-step loss
    seconds, faults = [], []
    for _ in range(args.repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tic = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - tic)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"first": first, "seconds": seconds, "faults": faults}))


def run_variant(args: argparse.Namespace, case: str, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--case", case, "--variant", variant, "--preset", args.preset]
    cmd += ["--repeats", str(args.repeats), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_cases(args: argparse.Namespace) -> list[dict]:
    rows = []
    for case in args.cases:
        variants = [v for v in VARIANTS[parse_case(case)[0]] if v in args.variants]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else reversed(variants):
                runs[variant].append(run_variant(args, case, variant))
        medians = {v: statistics.median(s for run in runs[v] for s in run["seconds"]) for v in variants}
        for v in variants:
            faults = [f for run in runs[v] for f in run["faults"]]
            rows.append({
                "case": case, "variant": v, "s/call": medians[v],
                "ratio": medians["baseline"] / medians[v] if "baseline" in medians else None, "faults/call": statistics.median(faults),
                "first value": runs[v][0]["first"],
            })  # fmt: skip
    return rows


def conv_shapes(net: torch.nn.Module, batch: int, size: int) -> list[tuple]:
    """(conv module, input shape, calls per forward) of every distinct Conv2d call in one forward."""
    seen: dict[tuple, list] = {}

    def hook(module, inputs, _output) -> None:
        key = (
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            tuple(inputs[0].shape),
        )
        seen.setdefault(key, [module, tuple(inputs[0].shape), 0])[2] += 1

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(torch.randn(batch, 3, size, size), torch.full((batch,), 500))
    for h in handles:
        h.remove()
    return [tuple(v) for v in seen.values()]


def time_conv(
    conv: torch.nn.Conv2d, shape: tuple, calls: int, repeats: int, channels_last: bool = False
) -> dict:
    """Forward and backward GFLOP/s of ``conv`` on random input (no input gradient for data), and
    the filter gradient's alone; ``channels_last``: input and filters in that layout."""
    cpu, layout = torch.device("cpu"), torch.channels_last if channels_last else torch.contiguous_format
    conv = conv.to(memory_format=layout)
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_(shape[1] != 3)
    out = conv(x)  # its graph is kept: backward is timed alone
    flops = 2 * out.numel() * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    grad, wrt = torch.randn_like(out), (x, conv.weight) if x.requires_grad else (conv.weight,)
    with torch.no_grad():
        fwd = common.time_fn(lambda: conv(x), cpu, repeats=repeats).median
    bwd = common.time_fn(
        lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True), cpu, repeats=repeats
    ).median
    bwd_w = common.time_fn(  # the filters' gradient alone: where the backward's gap is
        lambda: torch.autograd.grad(out, conv.weight, grad, retain_graph=True), cpu, repeats=repeats
    ).median
    name = f"{conv.in_channels}->{conv.out_channels} k{conv.kernel_size[0]} s{conv.stride[0]} @{shape[-1]}"
    return {
        "conv": name,
        "calls": calls,
        "fwd GFLOP/s": flops / fwd / 1e9,
        "bwd GFLOP/s": len(wrt) * flops / bwd / 1e9,
        "of it dW GFLOP/s": flops / bwd_w / 1e9,
        "work": (1 + len(wrt)) * flops,  # forward + backward FLOPs
        "seconds": fwd + bwd,
    }


def measure_convs(args: argparse.Namespace) -> list[dict]:
    """Every distinct convolution of the UNet at batch 2, against the best of them."""
    common.set_cpu_malloc(True)
    net = build(args.preset, args.seed)
    shapes = conv_shapes(net, 2, get_preset(args.preset).image_size)
    repeats = max(5, args.repeats)
    rows = [time_conv(conv, shape, calls, repeats, args.channels_last) for conv, shape, calls in shapes]
    best = max(max(r["fwd GFLOP/s"], r["bwd GFLOP/s"], r["of it dW GFLOP/s"]) for r in rows)
    for r in rows:
        r["fwd/best"], r["bwd/best"] = r["fwd GFLOP/s"] / best, r["bwd GFLOP/s"] / best
        r["dW/best"] = r["of it dW GFLOP/s"] / best
        at_90 = r.pop("work") / (0.9 * best * 1e9)
        r["ms lost"] = 1e3 * r["calls"] * max(0.0, r.pop("seconds") - at_90)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ffhq")
    parser.add_argument("--cases", nargs="+", default=CASES, help="forwardN / trainN (N = batch size)")
    parser.add_argument("--variants", nargs="+", default=sorted({v for vs in VARIANTS.values() for v in vs}))
    parser.add_argument(
        "--rounds", type=common.positive_int, default=2, help="A/B rounds, each variant a fresh process"
    )
    parser.add_argument(
        "--repeats", type=common.positive_int, default=3, help="timed calls per process after one warm-up"
    )
    parser.add_argument("--threads", type=common.positive_int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-convs", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="time the convolutions channels_last")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        [parse_case(case) for case in args.cases]
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure_cases(args)
    common.print_table(rows, title=f"exact fp32 path vs baseline ({args.preset})")
    convs = [] if args.skip_convs else measure_convs(args)
    if convs:
        common.print_table(convs, title="convolutions at batch 2 (share of the best GFLOP/s in this run)")
        short = [r for r in convs if min(r["fwd/best"], r["bwd/best"]) < 0.9]
        step = next((r["s/call"] for r in rows if r["case"] == "train2" and r["variant"] == "exact"), None)
        lost = sum(r["ms lost"] for r in convs)
        share = f", {lost / 10 / step:.1f}% of the exact training step" if step else ""
        print(
            f"\n{len(short)} of {len(convs)} conv shapes under 90% of the best; bringing them to 90% "
            f"would save {lost:.0f} ms per batch-2 training step{share}"
        )
    common.write_json(
        "exact_channels_last" if args.channels_last else "exact",
        {"env": common.environment(), "cases": rows, "convs": convs},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
