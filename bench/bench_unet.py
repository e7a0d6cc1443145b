"""UNet forward throughput: images/s and achieved FLOP/s, against a plain matmul.

    python bench/bench_unet.py                         # CPU: ffhq, batch 1 and 2, fp32/bf16, NCHW/NHWC,
                                                       #      glibc malloc as is / tuned
    python bench/bench_unet.py --device cuda           # CUDA: batch 1..64, fp32/bf16, NHWC on/off
    python bench/bench_unet.py --compile both          # also torch.compile'd (slow to build on CPU)
    python bench/bench_unet.py --profile               # + torch.profiler breakdown of one forward

The preset's UNet gets random (non-zero) weights. FLOPs are counted once with
``torch.utils.flop_counter`` on the meta device (matmuls, convolutions, attention; 2 per
multiply-add), so TFLOP/s = counted FLOPs / measured time.

Every timed forward is bracketed by reference matmuls (n x n x n, same dtype as the
precision's compute dtype; median of 3 before and of 3 after, averaged) and the two are
compared as a ratio per round: the ratio
"UNet FLOP/s / matmul FLOP/s" holds on a machine shared with other jobs, where absolute
numbers drift. All configurations are timed round-robin (order reversed every round), and
the table shows medians over rounds. On the CPU the slower variants are compared at the
first batch size only (NCHW) and at the first precision too (untuned malloc), to keep the
run under 5 minutes. Writes
bench/results/unet<tag>.json.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.add_repo_to_path()
from ilvr_toolkit.models import build_unet, get_preset  # noqa: E402

CPU_BATCHES = [1, 2]
CUDA_BATCHES = [1, 4, 16, 32, 64]

#: profiler op name -> category for the breakdown (first matching substring wins).
CATEGORIES = [
    ("convolution", "conv"),
    ("group_norm", "group_norm"),
    ("silu", "silu"),
    ("scaled_dot_product", "attention"),
    ("flash_attention", "attention"),
    ("softmax", "attention"),
    ("bmm", "attention"),
    ("baddbmm", "attention"),
    ("addmm", "linear"),
    ("upsample", "resample"),
    ("avg_pool", "resample"),
    ("cat", "cat/copy"),
    ("copy_", "cat/copy"),
    ("clone", "cat/copy"),
    ("contiguous", "cat/copy"),
    ("add", "add/mul"),
    ("mul", "add/mul"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser)
    parser.add_argument("--preset", default="ffhq")
    parser.add_argument(
        "--batch-sizes", nargs="+", default=None, help=f"default: CPU {CPU_BATCHES}, CUDA {CUDA_BATCHES}"
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(common.PRECISIONS))
    parser.add_argument("--channels-last", choices=["on", "off", "both"], default="both")
    parser.add_argument(
        "--compile",
        choices=["on", "off", "both"],
        default=None,
        help="torch.compile the UNet (default: off on CPU, both on CUDA)",
    )
    parser.add_argument(
        "--compile-batch-sizes",
        nargs="+",
        default=None,
        help="batch sizes to compile for (default: all; each is its own graph)",
    )
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's)")
    parser.add_argument(
        "--malloc",
        choices=["default", "tuned", "both"],
        default=None,
        help="CPU only: glibc allocator as is, or tuned to keep freed memory "
        "(common.set_cpu_malloc); default: both (the untuned rows at the first batch size only)",
    )
    parser.add_argument("--attention", choices=["sdpa", "math"], default="sdpa")
    parser.add_argument(
        "--native-groupnorm",
        choices=["on", "off"],
        default="off",
        help="GroupNorm in the autocast dtype (UNetConfig.native_groupnorm); "
        "bench/proposals.py times it interleaved against the stock path",
    )
    parser.add_argument(
        "--matmul-size", type=int, default=None, help="reference matmul n (CPU 2048, CUDA 8192)"
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 matmuls/convs on CUDA")
    parser.add_argument("--profile", action="store_true", help="profile one forward per profiled config")
    parser.add_argument("--profile-only", action="store_true", help="only the profile, no timing table")
    return parser.parse_args(argv)


def flops_per_image(preset: str) -> int:
    """Counted FLOPs of one batch-1 forward (meta device: nothing is computed)."""
    model = build_unet(preset, device="meta").eval()
    size = model.config.image_size
    x = torch.empty(1, model.config.in_channels, size, size, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad():
        return common.count_flops(lambda: model(x, t))


def _switch_list(value: str) -> list[bool]:
    return {"on": [True], "off": [False], "both": [False, True]}[value]


def make_models(args, device: torch.device, layouts: list[bool]) -> dict[bool, torch.nn.Module]:
    """One model per memory layout (channels_last False/True), same random weights."""
    base = build_unet(
        get_preset(args.preset).replace(
            attention_backend=args.attention, native_groupnorm=args.native_groupnorm == "on"
        )
    )
    common.randomize_parameters_(base, seed=args.seed)
    base = base.eval().requires_grad_(False)
    models = {}
    for channels_last in layouts:
        model = base if len(models) == 0 else build_unet(base.config).eval().requires_grad_(False)
        if model is not base:
            model.load_state_dict(base.state_dict())
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[channels_last] = model
    return models


def forward_fn(net, x: torch.Tensor, t: torch.Tensor, device: torch.device, precision: str):
    def run() -> torch.Tensor:
        with torch.no_grad(), common.autocast(device, precision):
            return net(x, t)

    return run


def categorize(name: str) -> str:
    lowered = name.lower()
    for needle, category in CATEGORIES:
        if needle in lowered:
            return category
    return "other"


def profile_forward(fn, device: torch.device, label: str) -> dict[str, float]:
    """Self time per category of one forward (after a warm-up), printed and returned (ms)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    common.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        common.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    by_category: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        micros = getattr(event, attr, 0.0) or 0.0
        if not event.key.startswith("aten::") or micros <= 0:
            continue
        by_category[categorize(event.key)] += micros / 1e3
        by_op[event.key] += micros / 1e3
    total = sum(by_category.values())
    rows = [
        {"category": k, "ms": v, "share": v / total}
        for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])
    ]
    common.print_table(
        rows,
        title=f"profile ({'device' if device.type == 'cuda' else 'CPU'} self time) {label}: {total:.0f} ms",
    )
    top = [
        {"op": k, "ms": v, "share": v / total} for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    ]
    common.print_table(top)
    return {"total_ms": total, **{r["category"]: r["ms"] for r in rows}}


def _key(cfg: dict) -> tuple:
    return cfg["batch"], cfg["precision"], cfg["channels_last"], cfg["compile"], cfg["malloc"]


def _label(cfg: dict) -> str:
    return (
        f"batch {cfg['batch']} {cfg['precision']} channels_last={cfg['channels_last']} "
        f"compile={cfg['compile']} malloc={cfg['malloc']}"
    )


def build_configs(args, device: torch.device, settings: dict) -> list[dict]:
    """Every (batch, precision, layout, compile, malloc) to time, each with its forward closure."""
    models = make_models(args, device, settings["layouts"])
    size = next(iter(models.values())).config.image_size
    nets = {}
    for channels_last, use_compile in itertools.product(settings["layouts"], settings["compile"]):
        net = models[channels_last]
        nets[channels_last, use_compile] = (
            torch.compile(net, mode=args.compile_mode, dynamic=False) if use_compile else net
        )
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    configs = []
    batches, mallocs = settings["batches"], settings["mallocs"]
    grid = itertools.product(
        batches, settings["precisions"], settings["layouts"], settings["compile"], mallocs
    )
    for batch, precision, channels_last, use_compile, malloc in grid:
        if use_compile and settings["compile_batches"] and batch not in settings["compile_batches"]:
            continue
        untuned = len(mallocs) > 1 and malloc == "default"
        if untuned and (batch != batches[0] or precision != settings["precisions"][0]):
            continue  # CPU: the allocator is compared at the first batch size and precision only
        if (
            batch != batches[0]
            and settings["compare_first_batch_only"]
            and len(settings["layouts"]) > 1
            and not channels_last
        ):
            continue  # CPU: NCHW is compared at the first batch size only
        x = torch.randn(batch, 3, size, size, generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        configs.append(
            {
                "batch": batch,
                "precision": precision,
                "channels_last": channels_last,
                "compile": use_compile,
                "malloc": malloc,
                "fn": forward_fn(nets[channels_last, use_compile], x, t, device, precision),
            }
        )
    return configs


class MatmulReference:
    """n x n x n matmul FLOP/s per compute dtype, on random data, measured on demand."""

    def __init__(self, device: torch.device, n: int, dtypes: set[torch.dtype]) -> None:
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.device, self.flops = device, 2.0 * n**3
        self.mats = {
            dt: [torch.randn(n, n, generator=gen).to(device=device, dtype=dt) for _ in range(2)]
            for dt in dtypes
        }

    def rate(self, dtype: torch.dtype, repeats: int = 3) -> float:
        a, b = self.mats[dtype]
        return (
            self.flops / common.time_fn(lambda: torch.mm(a, b), self.device, warmup=1, repeats=repeats).median
        )


def run_rounds(
    configs: list[dict],
    reference: MatmulReference,
    ref_dtypes: dict,
    flops: int,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict:
    """Warm every config up, then ``repeats`` round-robin rounds of (matmul, forward) pairs."""
    prepare = (
        (lambda cfg: None)
        if device.type == "cuda"
        else (lambda cfg: common.set_cpu_malloc(cfg["malloc"] == "tuned"))
    )
    print(f"warm-up ({warmup} per config, {len(configs)} configs; compilation happens here)", flush=True)
    for cfg in configs:
        prepare(cfg)
        for _ in range(warmup):
            cfg["fn"]()
        common.synchronize(device)
    records = defaultdict(lambda: {"seconds": [], "matmul": [], "ratio": [], "faults": []})
    for r in range(repeats):
        for cfg in configs if r % 2 == 0 else list(reversed(configs)):
            prepare(cfg)
            before = reference.rate(ref_dtypes[cfg["precision"]])
            faults = _minor_faults()
            seconds = common.time_fn(cfg["fn"], device, warmup=0, repeats=1).seconds[0]
            faults = _minor_faults() - faults
            mm = (before + reference.rate(ref_dtypes[cfg["precision"]])) / 2  # bracket the forward
            rec = records[_key(cfg)]
            rec["faults"].append(faults)
            rec["seconds"].append(seconds)
            rec["matmul"].append(mm)
            rec["ratio"].append(cfg["batch"] * flops / seconds / mm)
        print(f"round {r + 1}/{repeats} done (load average {common.load_average()})", flush=True)
    if device.type != "cuda":
        common.set_cpu_malloc(False)
    return records


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def summarize(configs: list[dict], records: dict, flops: int, cuda: bool) -> tuple[list[dict], list[str]]:
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    rows = []
    for cfg in configs:
        rec = records[_key(cfg)]
        seconds = statistics.median(rec["seconds"])
        rows.append(
            {
                "batch": cfg["batch"],
                "precision": cfg["precision"],
                "channels_last": "on" if cfg["channels_last"] else "off",
                "compile": "on" if cfg["compile"] else "off",
                "malloc": cfg["malloc"],
                "ms/forward": seconds * 1e3,
                "spread": (max(rec["seconds"]) - min(rec["seconds"])) / seconds,
                "img/s": cfg["batch"] / seconds,
                f"UNet {unit}": cfg["batch"] * flops / seconds / scale,
                f"matmul {unit}": statistics.median(rec["matmul"]) / scale,
                "ratio": statistics.median(rec["ratio"]),
                "faults/forward": statistics.median(rec["faults"]),
                "seconds": rec["seconds"],
                "ratios": rec["ratio"],
            }
        )
    columns = [
        "batch",
        "precision",
        "channels_last",
        "compile",
        *([] if cuda else ["malloc"]),
        "ms/forward",
        "spread",
        "img/s",
        f"UNet {unit}",
        f"matmul {unit}",
        "ratio",
        *([] if cuda else ["faults/forward"]),
    ]
    return rows, columns


def _settings(args: argparse.Namespace, cuda: bool) -> dict:
    """What varies between the timed configurations."""
    return {
        "batches": common.parse_list(args.batch_sizes, int) or (CUDA_BATCHES if cuda else CPU_BATCHES),
        "precisions": list(dict.fromkeys(common.parse_list(args.precisions))),
        "layouts": _switch_list(args.channels_last),
        "compile": _switch_list(args.compile or ("both" if cuda else "off")),
        "compile_batches": common.parse_list(args.compile_batch_sizes, int),
        "compare_first_batch_only": not cuda,
        "mallocs": ["default"]
        if cuda
        else {"both": ["default", "tuned"]}.get(args.malloc or "both", [args.malloc]),
    }


def _profiles(configs: list[dict], first_batch: int, device: torch.device) -> dict:
    """torch.profiler tables of the first batch size's eager configurations, by label."""
    profiles = {}
    for cfg in configs:
        if cfg["batch"] == first_batch and not cfg["compile"]:
            if device.type != "cuda":
                common.set_cpu_malloc(cfg["malloc"] == "tuned")
            profiles[_label(cfg)] = profile_forward(cfg["fn"], device, _label(cfg))
    return profiles


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.setup(args)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    settings = _settings(args, cuda)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (10 if cuda else 3)
    matmul_n = args.matmul_size or (8192 if cuda else 2048)
    flops = flops_per_image(args.preset)
    print(f"{args.preset}: {flops / 1e9:.1f} GFLOP per image per forward (counted)", flush=True)
    configs = build_configs(args, device, settings)
    profiles = {}
    if args.profile or args.profile_only:
        profiles = _profiles(configs, settings["batches"][0], device)
        if args.profile_only:
            payload = {"env": common.environment(device), "profiles": profiles}
            common.write_json(f"unet_profile{args.tag}", payload, args.out_dir)
            return 0
    ref_dtypes = {p: (common.PRECISIONS[p] or torch.float32) for p in settings["precisions"]}
    reference = MatmulReference(device, matmul_n, set(ref_dtypes.values()))
    records = run_rounds(configs, reference, ref_dtypes, flops, device, warmup, repeats)
    rows, columns = summarize(configs, records, flops, cuda)
    common.print_table(rows, columns, title=(
        f"UNet forward, {args.preset} ({flops / 1e9:.1f} GFLOP/img), {device}, "
        f"{torch.get_num_threads()} CPU threads, attention={args.attention}, "
        f"native GroupNorm {args.native_groupnorm}; ratio = UNet FLOP/s / "
        f"{matmul_n}^3 matmul FLOP/s (same dtype, measured around each forward), median of {repeats} rounds"
    ))  # fmt: skip
    payload = {
        "env": common.environment(device), "preset": args.preset, "gflop_per_image": flops / 1e9,
        "matmul_size": matmul_n, "attention": args.attention, "native_groupnorm": args.native_groupnorm,
        "warmup": warmup, "repeats": repeats, "rows": rows, **({"profiles": profiles} if args.profile else {}),
    }  # fmt: skip
    print(f"wrote {common.write_json(f'unet{args.tag}', payload, args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
