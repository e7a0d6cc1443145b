"""Sampling throughput, unconditional vs ILVR, and the ILVR overhead.

    python bench/bench_sampling.py                  # CPU: ffhq 256 DDPM 4 steps + tiny32 at full steps
    python bench/bench_sampling.py --device cuda    # CUDA: ffhq 256 bf16, DDPM 100 / DDIM 25 / DDIM 50
    python bench/bench_sampling.py --cases ffhq:ddpm:100:32 tiny32:ddim25:8

A case is ``preset:respacing:batch`` where respacing is a guided-diffusion respacing
string ("100", "ddim25", ...): a plain number samples with DDPM, ``ddimN`` with DDIM
(eta 0). Each case runs the same loop (random UNet weights, per-image generators, the
runner's ``make_net``) without hooks and with an ILVR hook (N = --factor, every step
conditioned), alternately U I I U U I ... after one warm-up of each (on the CPU, 256x256
cases: 2 rounds and no warm-up loop, the isolated timings below warm up instead), so drift
on a shared machine hits both alike. The overhead is the median over rounds of
t_ILVR / t_uncond - 1.

Because a 2% effect drowns in the noise of a loaded machine, the hook is also timed on its
own (median of many calls on a real step) against the median time of one sampler step:
"hook/step" is the overhead that the A/B ratio estimates, measured more precisely.

Also checked, per case: the low-pass matrices are built once, before the loop (no
``resize_matrix`` call and no new buffer during sampling); on CUDA, one ILVR loop runs
under ``torch.cuda.set_sync_debug_mode("error")``: any host-device synchronisation inside
the loop fails the check. Writes bench/results/sampling<tag>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.add_repo_to_path()
import ilvr_toolkit.conditioning.lowpass as lowpass_module  # noqa: E402
from ilvr_toolkit.conditioning import ILVR, LowPass  # noqa: E402
from ilvr_toolkit.diffusion import (  # noqa: E402
    DiffusionConfig,
    PerImageNoise,
    Step,
    create_diffusion,
    ddim_sample,
    ddpm_sample,
    draw_x_T,
)
from ilvr_toolkit.models import build_unet  # noqa: E402
from ilvr_toolkit.sampling.runner import make_net  # noqa: E402

CPU_CASES = ["ffhq:4:1", "tiny32:100:4", "tiny32:ddim25:4", "tiny32:ddim50:4"]
CUDA_CASES = ["ffhq:100:32", "ffhq:ddim25:32", "ffhq:ddim50:32"]


@dataclass
class Case:
    preset: str
    respacing: str
    batch: int

    @classmethod
    def parse(cls, text: str) -> Case:
        try:
            preset, respacing, batch = text.split(":")
            return cls(preset, respacing, int(batch))
        except ValueError:
            raise SystemExit(f"a case is preset:respacing:batch, e.g. ffhq:ddim25:8; got {text!r}") from None

    @property
    def sampler(self) -> str:
        return "ddim" if self.respacing.startswith("ddim") else "ddpm"

    @property
    def label(self) -> str:
        steps = self.respacing[4:] if self.sampler == "ddim" else self.respacing
        return f"{self.preset} {self.sampler.upper()} {steps} steps, batch {self.batch}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser)
    parser.add_argument(
        "--cases", nargs="+", default=None, help=f"default: CPU {CPU_CASES}, CUDA {CUDA_CASES}"
    )
    parser.add_argument(
        "--precision",
        choices=list(common.PRECISIONS),
        default=None,
        help="UNet autocast precision (default: fp32 on CPU, bf16 on CUDA)",
    )
    parser.add_argument("--channels-last", choices=["on", "off"], default="on")
    parser.add_argument(
        "--native-groupnorm",
        choices=["on", "off"],
        default="off",
        help="GroupNorm in the autocast dtype (sample.py's native_groupnorm)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument(
        "--malloc",
        choices=["default", "tuned"],
        default="tuned",
        help="CPU: glibc allocator as is or tuned (common.set_cpu_malloc)",
    )
    parser.add_argument("--factor", type=common.positive_int, default=4, help="ILVR down-sampling factor N")
    parser.add_argument(
        "--hook-calls", type=common.positive_int, default=50, help="isolated hook timings per case"
    )
    parser.add_argument("--no-sync-check", action="store_true", help="skip the CUDA sync-debug loop")
    return parser.parse_args(argv)


def build_net(preset: str, device: torch.device, args):
    model = common.randomize_parameters_(build_unet(preset), seed=args.seed).eval().requires_grad_(False)
    model = model.to(device)
    model.set_native_groupnorm(args.native_groupnorm == "on")
    channels_last = args.channels_last == "on"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model, dynamic=False)
    return make_net(model, device, args.precision, channels_last), model.config


def make_sampler(
    case: Case,
    diffusion,
    net,
    x_T_seed: int,
    device: torch.device,
    image_size: int,
    lowpass: LowPass | None,
    reference: torch.Tensor | None,
):
    """A closure running one full loop with fresh per-image generators (same seeds each run)."""
    loop = ddim_sample if case.sampler == "ddim" else ddpm_sample

    def run() -> torch.Tensor:
        gens = [torch.Generator(device=device).manual_seed(x_T_seed + i) for i in range(case.batch)]
        noise = PerImageNoise(gens)
        x_T = draw_x_T(noise, (case.batch, 3, image_size, image_size), device)
        hooks = (
            []
            if lowpass is None
            else [ILVR(reference, lowpass.factor, range_t=-1, mode="paper", lowpass=lowpass)]
        )
        return loop(diffusion, net, x_T, noise=noise, hooks=hooks)

    return run


def time_hook(
    case: Case, diffusion, reference: torch.Tensor, lowpass: LowPass, device, calls: int
) -> common.Timing:
    """The ILVR hook alone on a mid-loop step (its noise draw, q_sample and low-pass)."""
    gens = [torch.Generator(device=device).manual_seed(100 + i) for i in range(case.batch)]
    noise = PerImageNoise(gens)
    hook = ILVR(reference, lowpass.factor, range_t=-1, mode="paper", lowpass=lowpass)
    x = torch.randn_like(reference)
    i = diffusion.num_timesteps // 2
    step = Step(
        i,
        int(diffusion.timestep_map[i]),
        int(diffusion.timestep_map[max(i - 1, 0)]),
        x,
        x,
        x,
        diffusion,
        noise,
    )
    return common.time_fn(lambda: hook(step), device, warmup=3, repeats=calls)


def time_step(diffusion, net, case: Case, device, image_size: int, repeats: int) -> common.Timing:
    """One reverse step without hooks (network + posterior + noise draw)."""
    gens = [torch.Generator(device=device).manual_seed(200 + i) for i in range(case.batch)]
    noise = PerImageNoise(gens)
    x = torch.randn(case.batch, 3, image_size, image_size, device=device)
    t = torch.full((case.batch,), diffusion.num_timesteps // 2, device=device, dtype=torch.long)

    def step() -> None:
        with torch.no_grad():
            out = diffusion.p_mean_variance(net, x, t)
            out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise(x.shape, x.device, x.dtype)

    return common.time_fn(step, device, warmup=1, repeats=repeats)


class LowPassWatch:
    """Counts ``resize_matrix`` calls while active and checks that the low-pass buffers stay
    the same tensors: the matrices must be built once, before sampling, never per step."""

    def __init__(self, lowpass: LowPass) -> None:
        self.lowpass, self.calls = lowpass, 0
        self._original = lowpass_module.resize_matrix

    def _pointers(self) -> tuple[int, int]:
        return self.lowpass.down_matrix.data_ptr(), self.lowpass.up_matrix.data_ptr()

    def __enter__(self) -> LowPassWatch:
        def counting(*a, **k):
            self.calls += 1
            return self._original(*a, **k)

        self.before = self._pointers()
        lowpass_module.resize_matrix = counting
        return self

    def __exit__(self, *exc) -> None:
        lowpass_module.resize_matrix = self._original
        self.after = self._pointers()

    def result(self) -> dict:
        no_cast = self.lowpass.down_matrix.to(torch.float32) is self.lowpass.down_matrix
        unchanged = self.before == self.after
        return {
            "resize_matrix_calls_in_loops": self.calls,
            "buffers_unchanged": unchanged,
            "fp32_use_without_copy": no_cast,
            "ok": self.calls == 0 and unchanged and no_cast,
        }


def sync_check(run_ilvr, device: torch.device) -> dict:
    """One ILVR loop with host-device synchronisations turned into errors (CUDA only)."""
    if device.type != "cuda":
        return {"ok": None, "note": "CUDA only"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_ilvr()
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return {"ok": True}
    except RuntimeError as error:
        torch.cuda.set_sync_debug_mode("default")
        return {"ok": False, "error": str(error).splitlines()[0][:300]}


def run_case(case: Case, args, device: torch.device, nets: dict) -> dict:
    if case.preset not in nets:
        nets[case.preset] = build_net(case.preset, device, args)
    net, config = nets[case.preset]
    size = config.image_size
    diffusion = create_diffusion(DiffusionConfig(learn_sigma=config.learn_sigma), respacing=case.respacing)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 7)
    reference = (torch.rand(case.batch, 3, size, size, generator=gen) * 2 - 1).to(device)
    lowpass = LowPass(size, args.factor, device)
    runs = {
        "uncond": make_sampler(case, diffusion, net, 1000, device, size, None, None),
        "ilvr": make_sampler(case, diffusion, net, 1000, device, size, lowpass, reference),
    }
    big_on_cpu = device.type == "cpu" and size > 64
    rounds = args.repeats if args.repeats is not None else (2 if big_on_cpu else 3)
    # The isolated timings come first and warm up the network, the tables and the low-pass;
    # on the CPU a 256x256 case then skips the full warm-up loops (each costs minutes).
    hook = time_hook(case, diffusion, reference, lowpass, device, args.hook_calls)
    step = time_step(diffusion, net, case, device, size, repeats=2)
    warmup = args.warmup if args.warmup is not None else (0 if big_on_cpu else 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with LowPassWatch(lowpass) as watch:  # every ILVR loop below is watched
        timings = common.interleave(runs, device, rounds=rounds, warmup=warmup)
    ratios = [i / u for i, u in zip(timings["ilvr"].seconds, timings["uncond"].seconds, strict=True)]
    checks = {"lowpass": watch.result()}
    if not args.no_sync_check:
        checks["sync"] = sync_check(runs["ilvr"], device)
    return {
        "case": case.label,
        "uncond img/s": case.batch / timings["uncond"].median,
        "ILVR img/s": case.batch / timings["ilvr"].median,
        "A/B overhead %": 100 * (statistics.median(ratios) - 1),
        "A/B spread %": 100 * (max(ratios) - min(ratios)),
        "hook ms": hook.median * 1e3,
        "step ms": step.median * 1e3,
        "hook/step %": 100 * hook.median / step.median,
        "lowpass static": "ok" if checks["lowpass"]["ok"] else "FAIL",
        "no syncs": {None: "-", True: "ok", False: "FAIL"}[checks.get("sync", {}).get("ok")],
        "peak GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "timings": {k: v.to_dict() for k, v in timings.items()},
        "ratios": ratios,
        "hook": hook.to_dict(),
        "step": step.to_dict(),
        "checks": checks,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.setup(args)
    cuda = device.type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if not cuda and args.malloc == "tuned":
        common.set_cpu_malloc(True)
    cases = [Case.parse(c) for c in (common.parse_list(args.cases) or (CUDA_CASES if cuda else CPU_CASES))]
    nets: dict = {}
    rows = []
    for case in cases:
        print(f"{case.label} ...", flush=True)
        rows.append(run_case(case, args, device, nets))
        print(
            f"  uncond {rows[-1]['uncond img/s']:.3g} img/s, ILVR {rows[-1]['ILVR img/s']:.3g} img/s, "
            f"A/B {rows[-1]['A/B overhead %']:+.2f}%, hook/step {rows[-1]['hook/step %']:.3f}% "
            f"(load average {common.load_average()})",
            flush=True,
        )
    columns = [
        "case",
        "uncond img/s",
        "ILVR img/s",
        "A/B overhead %",
        "A/B spread %",
        "hook ms",
        "step ms",
        "hook/step %",
        "lowpass static",
        "no syncs",
    ]
    title = (
        f"Sampling, {device}, precision {args.precision}, channels_last {args.channels_last}, "
        f"native GroupNorm {args.native_groupnorm}, compile {args.compile}, ILVR N={args.factor} on every step, {torch.get_num_threads()} CPU threads"
    )
    common.print_table(rows, columns, title=title)
    path = common.write_json(
        f"sampling{args.tag}",
        {"env": common.environment(device), "args": vars(args), "rows": rows},
        args.out_dir,
    )
    print(f"wrote {path}")
    failed = [r["case"] for r in rows if "FAIL" in (r["lowpass static"], r["no syncs"])]
    if failed:
        print(f"checks FAILED for: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
