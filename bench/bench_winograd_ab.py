"""A/B two versions of the Winograd kernel (``ilvr_toolkit/models/winograd.cpp``) in one process.

    git show REV:ilvr_toolkit/models/winograd.cpp > /tmp/winograd_old.cpp
    python bench/bench_winograd_ab.py --old /tmp/winograd_old.cpp --threads 2 --rounds 8

Per layer: the forward kernel and the filter gradient (``conv3x3_grad_u``) of the ffhq UNet's
largest 3x3 shapes, both versions interleaved (A B, B A, ...), with the largest difference of
their outputs (0 when only the data movement changed). Whole network (``--net``): the ffhq
forward at batch 1 and 4 and a forward + backward at batch 2 with each version swapped in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import torch

common.add_repo_to_path()

from ilvr_toolkit.models import build_unet  # noqa: E402
from ilvr_toolkit.models import winograd as wg  # noqa: E402

LAYERS = ["1,128,128,256", "2,128,128,128", "2,256,256,64", "2,512,512,32", "2,512,512,16"]


def layer_rows(kernels: dict, rounds: int) -> list[dict]:
    """ms per call of each kernel version on each layer shape (median of interleaved rounds)."""
    rows, cpu = [], torch.device("cpu")
    for spec in LAYERS:
        n, c, o, h = map(int, spec.split(","))
        x, gy, bias = torch.randn(n, c, h, h), torch.randn(n, o, h, h), torch.randn(o)
        u = wg.transform_filters(torch.randn(o, c, 3, 3))
        ops = {v: _ops(k, x, u, bias, gy) for v, k in kernels.items()}
        diff = max((ops["old"][op]() - ops["new"][op]()).abs().max().item() for op in ops["old"])
        fns = {f"{v} {op}": fn for v, vops in ops.items() for op, fn in vops.items()}
        t = {name: timing.median * 1e3 for name, timing in common.interleave(fns, cpu, rounds=rounds).items()}
        rows.append(
            {
                "layer (N,C,O,H)": spec,
                "fwd old ms": t["old fwd"],
                "fwd new ms": t["new fwd"],
                "fwd x": t["old fwd"] / t["new fwd"],
                "grad_u old ms": t["old grad_u"],
                "grad_u new ms": t["new grad_u"],
                "grad_u x": t["old grad_u"] / t["new grad_u"],
                "max |old - new|": diff,  # forward and filter gradient
            }
        )
    return rows


def _ops(k, x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, gy: torch.Tensor) -> dict:
    return {
        "fwd": lambda: k.conv3x3(x, u, bias, wg.BAND_TILES),
        "grad_u": lambda: k.conv3x3_grad_u(x, gy, wg.BAND_TILES),
    }


def net_rows(kernels: dict, rounds: int) -> list[dict]:
    """Whole ffhq UNet with Winograd on, each kernel version swapped in (seconds per call)."""
    model = build_unet("ffhq")
    model.set_winograd(True)

    def case(batch: int, train: bool):  # noqa: ANN202
        x, t = torch.randn(batch, 3, 256, 256), torch.full((batch,), 500)

        def run() -> None:
            if train:
                model.zero_grad(set_to_none=True)
                model(x, t).square().mean().backward()
            else:
                with torch.no_grad():
                    model(x, t)

        return run

    rows = []
    for name, fn in {
        "forward b1": case(1, False),
        "forward b4": case(4, False),
        "fwd+bwd b2": case(2, True),
    }.items():
        fns = {v: _swapped(kernels[v], fn) for v in kernels}
        t = common.interleave(fns, torch.device("cpu"), rounds=rounds)
        rows.append({"case": name, "old s": t["old"].median, "new s": t["new"].median})
        rows[-1]["x"] = rows[-1]["old s"] / rows[-1]["new s"]
    return rows


class _TorchFilters:
    """A kernel from before 2026-12-01 18:00 (no ``filters`` / ``filters_grad``): the filter
    transforms by the PyTorch ops its Python side ran then, so the A/B covers the whole change."""

    def __init__(self, module) -> None:  # noqa: ANN001
        self.module, self.gg = module, torch.kron(common.WINOGRAD_G, common.WINOGRAD_G).float()

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.module, name)

    def filters(self, weight: torch.Tensor, flip_t: bool) -> torch.Tensor:
        weight = weight.flip(2, 3).transpose(0, 1) if flip_t else weight
        out_ch, in_ch = weight.shape[:2]
        return (self.gg @ weight.reshape(out_ch * in_ch, 9).T).reshape(36, out_ch, in_ch)

    def filters_grad(self, grad_u: torch.Tensor) -> torch.Tensor:
        return (self.gg.T @ grad_u.reshape(36, -1)).T.reshape(*grad_u.shape[1:], 3, 3)


def _swapped(module, fn):  # noqa: ANN001, ANN202
    def run() -> None:
        original = wg.kernel
        wg.kernel = lambda: module
        try:
            fn()
        finally:
            wg.kernel = original

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the other winograd.cpp")
    parser.add_argument("--new", type=Path, default=wg.SOURCE, help="default: the package's winograd.cpp")
    parser.add_argument("--threads", type=common.positive_int, default=None)
    parser.add_argument(
        "--rounds", type=common.positive_int, default=8, help="interleaved timed calls per variant"
    )
    parser.add_argument("--net", action="store_true", help="also the whole ffhq network")
    args = parser.parse_args(argv)
    for path in (args.old, args.new):
        if not path.is_file():
            parser.error(f"{path}: no such file")
    if args.threads:
        torch.set_num_threads(args.threads)
    common.set_cpu_malloc(True)
    kernels = {v: common.build_extension(f"ilvr_winograd_ab_{v}", getattr(args, v)) for v in ("old", "new")}
    kernels = {v: k if hasattr(k, "filters") else _TorchFilters(k) for v, k in kernels.items()}
    rows = layer_rows(kernels, args.rounds)
    common.print_table(rows, title="Winograd kernel per layer: old vs new (ms, medians)")
    nets = net_rows(kernels, max(2, args.rounds // 2)) if args.net else []
    if nets:
        common.print_table(nets, title="ffhq UNet, Winograd on: old vs new kernel (s, medians)")
    common.write_json("winograd_ab", {"env": common.environment(), "layers": rows, "net": nets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
