"""Fast-path candidates written in PyTorch ops, timed against what the UNet runs today.

    python bench/bench_candidates.py --threads 2
    python bench/bench_candidates.py --threads 1 --rounds 7 --only winograd

Neither is in the library as written here: each is kept with its measurement so the decision
can be re-checked on another host (docs/benchmarks.md has the figures and the reasoning). The
Winograd idea is in the library as a native kernel that keeps the transformed tiles in cache
(``ilvr_toolkit.models.winograd``, F(4x4, 3x3); ``--only winograd-native`` times it here).

``winograd``: F(2x2, 3x3) (Lavin & Gray 2016) for the 3x3 stride-1 convolutions: weights
``U = G g G^T`` (16 per filter pair), input tiles ``V = B^T d B`` (4x4, stride 2), 16 batched
GEMMs ``M = U V`` (2.25x fewer multiplications), output ``A^T M A``. Timed against
``nn.Conv2d`` (oneDNN's direct convolution) on the ffhq UNet's 3x3 shapes, forward, batch 1.

``dw-gemm``: the 3x3 filter gradient (oneDNN's weakest direction here) as bands of im2col rows
and MKL GEMMs (``candidates/dw_im2col.cpp``, C++), with MKL's own large-GEMM rate beside it.

``gn-silu``: GroupNorm -> scale-shift -> SiLU as one ``autograd.Function``: the statistics and
both affines fold into one per-(sample, channel) multiply-add applied in place on the
normalised tensor, SiLU in place; backward recomputes the pre-activation from ``x`` and uses
aten's GroupNorm backward. Timed against the stock ops (forward with autograd, and forward +
backward) on the ffhq shapes at batch 2. (Without autograd the UNet already applies the
scale-shift and SiLU in place: ``GroupNorm32.act``, bitwise the stock path.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

aten = torch.ops.aten
B_T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
G = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]


def _rows(d: torch.Tensor, dim: int) -> torch.Tensor:
    """B^T applied along ``dim`` (size 4) of d: the four sums and differences, stacked."""
    d0, d1, d2, d3 = d.unbind(dim)
    return torch.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3], dim)


def winograd_conv3x3(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F(2x2, 3x3) convolution, padding 1: x (N, C, H, W) with even H, W; w (O, C, 3, 3) -> (N, O, H, W)."""
    n, c, h, wd = x.shape
    o = w.shape[0]
    g = w.new_tensor(G)
    u = torch.einsum("ai,ocij,bj->aboc", g, w, g).reshape(16, o, c)
    tiles = F.pad(x, (1, 1, 1, 1)).unfold(2, 4, 2).unfold(3, 4, 2)  # (N, C, H/2, W/2, 4, 4)
    v = _rows(_rows(tiles.permute(4, 5, 1, 0, 2, 3), 0), 1)  # (4, 4, C, N, H/2, W/2)
    m = torch.bmm(u, v.reshape(16, c, -1)).view(4, 4, o, n, h // 2, wd // 2)
    r = torch.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])  # A^T over rows: (2, 4, O, N, h, w)
    y = torch.stack([r[:, 0] + r[:, 1] + r[:, 2], r[:, 1] - r[:, 2] - r[:, 3]], 1)  # (2, 2, O, N, h, w)
    return y.permute(3, 2, 4, 0, 5, 1).reshape(n, o, h, wd) + b.view(1, -1, 1, 1)


class GroupNormSiLU(torch.autograd.Function):
    """y = silu(gamma' * xhat + beta') for x (N, C, L) and per-sample gamma', beta' (N, C)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, groups, eps):  # noqa: ANN001, ANN205
        n, c, length = x.shape
        z, mean, rstd = aten.native_group_norm(x, None, None, n, c, length, groups, eps)
        ctx.save_for_backward(x, mean, rstd, gamma, beta)
        ctx.groups, ctx.eps = groups, eps
        return F.silu(z.mul_(gamma[..., None]).add_(beta[..., None]), inplace=True)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, mean, rstd, gamma, beta = ctx.saved_tensors
        n, c, length = x.shape
        xhat = aten.native_group_norm(x, None, None, n, c, length, ctx.groups, ctx.eps)[0]
        dz = aten.silu_backward(dy, torch.addcmul(beta[..., None], xhat, gamma[..., None]))
        dgamma, dbeta = torch.einsum("ncl,ncl->nc", dz, xhat), dz.sum(-1)
        dz.mul_(gamma[..., None])  # the gradient of xhat; aten's backward with no weight
        mask = [True, False, False]
        dx = aten.native_group_norm_backward(dz, x, mean, rstd, None, n, c, length, ctx.groups, mask)[0]
        return dx, dgamma, dbeta, None, None


def gn_silu_fused(x, weight, bias, scale, shift):  # noqa: ANN001, ANN201
    n, c = x.shape[:2]
    gamma, beta = weight * (1 + scale.view(n, c)), bias * (1 + scale.view(n, c)) + shift.view(n, c)
    return GroupNormSiLU.apply(x.reshape(n, c, -1), gamma, beta, 32, 1e-5).view(x.shape)


def gn_silu_stock(x, weight, bias, scale, shift):  # noqa: ANN001, ANN201
    return F.silu(F.group_norm(x, 32, weight, bias) * (1 + scale) + shift)


def winograd_row(c_in: int, c_out: int, size: int, rounds: int, cpu: torch.device) -> dict:
    x, conv = torch.randn(1, c_in, size, size), torch.nn.Conv2d(c_in, c_out, 3, padding=1)
    fns = {"direct": lambda: conv(x), "winograd": lambda: winograd_conv3x3(x, conv.weight, conv.bias)}
    with torch.no_grad():
        err = common.rel_err(fns["winograd"](), fns["direct"]())
        t = common.interleave(fns, cpu, rounds=rounds)
    return {
        "conv 3x3": f"{c_in}->{c_out} @{size}",
        "direct ms": 1e3 * t["direct"].median,
        "winograd ms": 1e3 * t["winograd"].median,
        "speed-up": t["direct"].median / t["winograd"].median,
        "rel err": err,
    }


def gn_silu_row(c: int, size: int, rounds: int, cpu: torch.device) -> dict:
    x = torch.randn(2, c, size, size, requires_grad=True)
    params = [torch.randn(c, requires_grad=True) for _ in "wb"]
    params += [torch.randn(2, c, 1, 1, requires_grad=True) for _ in "st"]
    inputs, grad = (x, *params), torch.randn(2, c, size, size)
    variants = {"stock": gn_silu_stock, "fused": gn_silu_fused}
    outs = {
        k: (f(*inputs).detach(), *torch.autograd.grad(f(*inputs), inputs, grad)) for k, f in variants.items()
    }
    row: dict = {
        "shape": f"2x{c}x{size}x{size}",
        "rel err (out, grads)": max(
            common.rel_err(a, b) for a, b in zip(outs["fused"], outs["stock"], strict=True)
        ),
    }
    forward = {k: (lambda f=f: f(*inputs)) for k, f in variants.items()}
    both = {k: (lambda f=f: torch.autograd.grad(f(*inputs), inputs, grad)) for k, f in variants.items()}
    for what, fns in [("forward", forward), ("fwd+bwd", both)]:
        t = common.interleave(fns, cpu, rounds=rounds)
        row[f"{what} stock ms"], row[f"{what} fused ms"] = 1e3 * t["stock"].median, 1e3 * t["fused"].median
        row[f"{what} speed-up"] = t["stock"].median / t["fused"].median
    return row


def winograd_native_row(c_in: int, c_out: int, size: int, rounds: int, cpu: torch.device) -> dict:
    """The library's kernel (``Conv3x3`` with ``winograd`` on) vs off, batch 2: forward under
    ``no_grad`` and forward + backward (input and filter gradients), errors against float64."""
    from ilvr_toolkit.models.winograd import Conv3x3

    convs = {k: Conv3x3(c_in, c_out) for k in ("direct", "winograd")}
    convs["winograd"].load_state_dict(convs["direct"].state_dict())
    convs["winograd"].winograd = True
    x, grad = torch.randn(2, c_in, size, size, requires_grad=True), torch.randn(2, c_out, size, size)
    ref = torch.nn.functional.conv2d(x.double(), convs["direct"].weight.double(), padding=1)
    ref = ref + convs["direct"].bias.double().view(-1, 1, 1)
    wino = convs["winograd"]
    grads = torch.autograd.grad(wino(x), (x, wino.weight), grad)
    ref_grads = torch.autograd.grad(ref, (x, convs["direct"].weight), grad.double())
    with torch.no_grad():
        forward = common.interleave({k: (lambda c=c: c(x)) for k, c in convs.items()}, cpu, rounds=rounds)
        err = common.rel_err(wino(x).double(), ref)
    both = {k: (lambda c=c: torch.autograd.grad(c(x), (x, c.weight), grad)) for k, c in convs.items()}
    both = common.interleave(both, cpu, rounds=rounds)
    return {
        "conv 3x3 (batch 2)": f"{c_in}->{c_out} @{size}",
        "fwd direct ms": 1e3 * forward["direct"].median,
        "fwd winograd ms": 1e3 * forward["winograd"].median,
        "fwd speed-up": forward["direct"].median / forward["winograd"].median,
        "fwd+bwd speed-up": both["direct"].median / both["winograd"].median,
        "rel err out": err,
        "rel err grads": max(common.rel_err(a.double(), b) for a, b in zip(grads, ref_grads, strict=True)),
    }


def dw_gemm_rows(rounds: int, cpu: torch.device) -> list[dict]:
    """Filter gradient of the 3x3 convolutions (batch 2): oneDNN (autograd) vs im2col bands + MKL
    GEMM (``candidates/dw_im2col.cpp``, best of 4 band sizes), and MKL's sgemm on large square
    products: the ceiling of any GEMM-based convolution on this host."""
    source = Path(__file__).resolve().parent / "candidates" / "dw_im2col.cpp"
    kernel = common.build_extension("ilvr_bench_dw_im2col", source)
    rows = [_dw_row(kernel, *shape, rounds, cpu) for shape in DW_SHAPES]
    for n in (2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        gflops = 2 * n**3 / common.time_fn(lambda a=a, b=b: a @ b, cpu, repeats=rounds).median / 1e9
        rows.append({"dW 3x3 (batch 2)": f"MKL sgemm {n}^3", "im2col+GEMM GFLOP/s": gflops})
    return rows


def _dw_row(kernel, c_in: int, c_out: int, size: int, rounds: int, cpu: torch.device) -> dict:  # noqa: ANN001
    x, gy = torch.randn(2, c_in, size, size), torch.randn(2, c_out, size, size)
    weight = torch.randn(c_out, c_in, 3, 3, requires_grad=True)
    out, flops = F.conv2d(x, weight, padding=1), 2 * gy.numel() * c_in * 9
    fns = {"oneDNN": lambda: torch.autograd.grad(out, weight, gy, retain_graph=True)}
    fns |= {f"gemm {p}": (lambda p=p: kernel.dw3x3(x, gy, p)) for p in (256, 512, 1024, 2048)}
    t = common.interleave(fns, cpu, rounds=rounds)
    best = min((k for k in t if k != "oneDNN"), key=lambda k: t[k].median)
    return {
        "dW 3x3 (batch 2)": f"{c_in}->{c_out} @{size}",
        "oneDNN GFLOP/s": flops / t["oneDNN"].median / 1e9,
        "im2col+GEMM GFLOP/s": flops / t[best].median / 1e9,
        "band px": best.split()[1],
        "rel diff": common.rel_err(fns[best](), fns["oneDNN"]()[0]),
    }


DW_SHAPES = [(128, 128, 256), (128, 128, 128), (256, 256, 64), (512, 512, 32), (512, 512, 16), (512, 512, 8)]
WINOGRAD_SHAPES = [(128, 128, 256), (256, 128, 128), (256, 256, 64), (512, 512, 16), (512, 512, 8)]
# the ffhq UNet's 3x3 convolutions by FLOPs (in, out, size): 83% of a forward's
NATIVE_SHAPES = [(128, 128, 256), (256, 128, 256), (256, 256, 128), (128, 128, 128), (256, 256, 64)]
NATIVE_SHAPES += [(384, 128, 128), (512, 512, 32), (256, 256, 32), (512, 512, 16)]
GN_SHAPES = [(128, 256), (256, 64), (512, 16)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=common.positive_int, default=None)
    parser.add_argument("--rounds", type=common.positive_int, default=5)
    parser.add_argument("--only", choices=["winograd", "winograd-native", "gn-silu", "dw-gemm"], default=None)
    args = parser.parse_args(argv)
    common.add_repo_to_path()
    from ilvr_toolkit.runtime import tune_process

    tune_process(args.threads)
    cpu, out = torch.device("cpu"), {"env": common.environment()}
    if args.only in (None, "winograd"):
        out["winograd"] = [winograd_row(*shape, args.rounds, cpu) for shape in WINOGRAD_SHAPES]
        common.print_table(
            out["winograd"], title="Winograd F(2x2,3x3) in PyTorch ops vs nn.Conv2d (forward, batch 1)"
        )
    if args.only in (None, "winograd-native"):
        rows = [winograd_native_row(*shape, args.rounds, cpu) for shape in NATIVE_SHAPES]
        out["winograd_native"] = rows
        common.print_table(out["winograd_native"], title="ilvr_toolkit.models.winograd vs oneDNN (direct)")
    if args.only in (None, "gn-silu"):
        out["gn_silu"] = [gn_silu_row(*shape, args.rounds, cpu) for shape in GN_SHAPES]
        common.print_table(
            out["gn_silu"], title="GroupNorm+scale-shift+SiLU as one autograd.Function vs stock ops"
        )
    if args.only in (None, "dw-gemm"):
        out["dw_gemm"] = dw_gemm_rows(args.rounds, cpu)
        common.print_table(out["dw_gemm"], title="3x3 filter gradient: oneDNN vs im2col bands + MKL GEMM")
    common.write_json("candidates", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
