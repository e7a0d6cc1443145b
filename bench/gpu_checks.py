"""Correctness checks that need a CUDA GPU, and the summary table of bench/gpu_check.sh.

    python bench/gpu_checks.py env                 # versions, packages, matmul/copy ceilings
    python bench/gpu_checks.py fixture             # ILVR fixture replay in fp32 / tf32 / bf16 / fp16
    python bench/gpu_checks.py sync                # no host-device syncs in the loops; CUDA graphs
    python bench/gpu_checks.py compile             # torch.compile vs eager (tiny32 fp32, ffhq bf16)
    python bench/gpu_checks.py ddp-lightning       # Lightning DDP on 1 GPU with the training module
    python bench/gpu_checks.py ddp-train --work D  # train.py fit --trainer.strategy ddp (needs lmdb)
    python bench/gpu_checks.py other SCRIPT -- ARGS  # run another bench script with the ARGS it knows
    python bench/gpu_checks.py summary             # the table (reads what the steps wrote)

Every check appends one JSON line per result to ``$CHECKS`` (default
``bench/results/gpu_checks.jsonl``): name, status (PASS / FAIL / SKIP / INFO), detail and
numbers. Bounds (relative errors are ||out - ref|| / ||ref|| over the whole tensor):

- fixture replay (tiny32, 10 DDPM steps, ILVR official mode, recorded noise) vs the
  official code's output: fp32 with TF32 off max |diff| <= 1e-4 (the CPU acceptance bound);
  TF32 convolutions rel <= 3e-3; bf16 autocast rel <= 3e-2; fp16 autocast rel <= 5e-3
  (CPU autocast measured 1.0e-2 for bf16 and 1.5e-3 for fp16 on this fixture).
- torch.compile vs eager: tiny32 fp32 (TF32 off) rel <= 1e-4; ffhq bf16: the compiled
  model's error against eager fp32 at most max(1.5 x eager bf16's, eager bf16's + 2e-3).
- CUDA graph replay vs eager (tiny32 fp32): rel <= 1e-6.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.add_repo_to_path()

FIXTURES = common.REPO / "tests" / "fixtures" / "reference"
CHECKS = Path(os.environ.get("CHECKS", common.RESULTS_DIR / "gpu_checks.jsonl"))


def record(name: str, status: str, detail: str = "", **numbers) -> dict:
    entry = {"name": name, "status": status, "detail": detail, **numbers, "time": time.strftime("%H:%M:%S")}
    CHECKS.parent.mkdir(parents=True, exist_ok=True)
    with CHECKS.open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
    print(f"CHECK {name}: {status} {detail}", flush=True)
    return entry


rel_err = common.rel_err


def _cuda() -> torch.device:
    """The CUDA device; ``GPU_CHECKS_DEVICE=cpu`` dry-runs the checks' code on the CPU
    (CUDA-only parts are skipped there, bounds still apply) to test this script itself."""
    if os.environ.get("GPU_CHECKS_DEVICE") == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: these checks need one")
    return torch.device("cuda")


@contextlib.contextmanager
def no_syncs(device: torch.device):
    """Host-device synchronisations raise inside this block (CUDA; a no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def random_unet(preset: str, device: torch.device, seed: int = 0):
    from ilvr_toolkit.models import build_unet

    model = common.randomize_parameters_(build_unet(preset), seed=seed)
    return model.eval().requires_grad_(False).to(device)


# --------------------------------------------------------------------------- env
def check_env(args) -> None:
    device = _cuda()
    env = common.environment(device)
    packages = {}
    for name in (
        "pytorch_lightning",
        "lightning",
        "torchmetrics",
        "torchvision",
        "lmdb",
        "jsonargparse",
        "docstring_parser",
        "typeshed_client",
        "tensorboard",
        "scipy",
        "PIL",
        "triton",
    ):
        try:
            module = __import__(name)
            packages[name] = getattr(module, "__version__", "yes")
        except Exception as error:  # noqa: BLE001 (any import failure means: missing)
            packages[name] = f"MISSING ({type(error).__name__})"
    print(json.dumps({"env": env, "packages": packages}, indent=1))
    missing = [k for k, v in packages.items() if str(v).startswith("MISSING")]
    if device.type != "cuda":
        record(
            "env",
            "INFO",
            f"CPU dry run, torch {torch.__version__}; missing: {', '.join(missing) or 'none'}",
            packages=packages,
        )
        return
    # Ceilings on this card (METHOD.md): a big copy and big matmuls, random data.
    n = 1 << 28  # 1 GiB of fp32
    copy = _copy_timing(device, n)
    bf16, _ = common.matmul_gflops(device, 8192, torch.bfloat16, repeats=10, warmup=3)
    fp32, _ = common.matmul_gflops(device, 8192, torch.float32, repeats=5, warmup=2)
    with tf32(True):
        tf32_rate, _ = common.matmul_gflops(device, 8192, torch.float32, repeats=5, warmup=2)
    record(
        "env",
        "INFO",
        f"{env.get('gpu')} torch {torch.__version__} cuda {torch.version.cuda}; missing: "
        f"{', '.join(missing) or 'none'}",
        copy_tb_s=2 * 4 * n / copy.median / 1e12,
        bf16_matmul_tflops=bf16 / 1e3,
        fp32_matmul_tflops=fp32 / 1e3,
        tf32_matmul_tflops=tf32_rate / 1e3,
        packages=packages,
        gpu=env.get("gpu"),
    )


def _copy_timing(device: torch.device, n: int) -> common.Timing:
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return common.time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=10)


# --------------------------------------------------------------------------- fixture
FIXTURE_BOUNDS = {  # precision label -> (metric, bound)
    "fp32": ("max_abs", 1e-4),
    "fp32+tf32": ("rel", 3e-3),
    "bf16": ("rel", 3e-2),
    "fp16": ("rel", 5e-3),
    "bf16+native-gn": ("rel", 3e-2),
    "fp16+native-gn": ("rel", 5e-3),
}


def replay_fixture(
    model, device: torch.device, precision: str, channels_last: bool = False, native_groupnorm: bool = False
) -> tuple:
    from ilvr_toolkit.conditioning import ILVR
    from ilvr_toolkit.diffusion import DiffusionConfig, ReplayNoise, create_diffusion, ddpm_sample
    from ilvr_toolkit.sampling.runner import make_net

    rec = torch.load(FIXTURES / "tiny32_ilvr_ref.pt", map_location="cpu", weights_only=True)
    model.set_native_groupnorm(native_groupnorm)
    net = make_net(model, device, precision, channels_last)
    diffusion = create_diffusion(DiffusionConfig(timestep_respacing="10"))
    noise = ReplayNoise(rec["rng_draws"])
    x_T = noise((2, 3, 32, 32), device, torch.float32)
    steps: list[torch.Tensor] = []
    hooks = [
        ILVR(rec["ref_img"].to(device), rec["down_N"], rec["range_t"], "official"),
        lambda s: steps.append(s.x_prev),
    ]
    out = ddpm_sample(diffusion, net, x_T, noise=noise, hooks=hooks).cpu()
    step_diff = max(
        (got.cpu() - want["sample"]).abs().max().item() for got, want in zip(steps, rec["steps"], strict=True)
    )
    return out, rec["output"], step_diff, noise.remaining


def check_fixture(args) -> None:
    from ilvr_toolkit.models import load_model

    device = _cuda()
    model = load_model(FIXTURES / "tiny32.pt", preset="tiny32").model.eval().requires_grad_(False).to(device)
    for label, precision, allow_tf32 in [
        ("fp32", "fp32", False),
        ("fp32+tf32", "fp32", True),
        ("bf16", "bf16", False),
        ("fp16", "fp16", False),
        ("bf16+native-gn", "bf16", False),
        ("fp16+native-gn", "fp16", False),
    ]:
        with tf32(allow_tf32):
            out, ref, step_diff, remaining = replay_fixture(
                model, device, precision, native_groupnorm=label.endswith("native-gn")
            )
        numbers = {
            "max_abs": (out - ref).abs().max().item(),
            "rel": rel_err(out, ref),
            "max_step_diff": step_diff,
        }
        metric, bound = FIXTURE_BOUNDS[label]
        ok = numbers[metric] <= bound and remaining == 0
        record(
            f"fixture {label}",
            "PASS" if ok else "FAIL",
            f"max|diff| {numbers['max_abs']:.2e}, rel {numbers['rel']:.2e} (bound {metric} <= {bound:g})",
            **numbers,
            bound=bound,
            metric=metric,
        )


# --------------------------------------------------------------------------- sync + graphs
def check_sync(args) -> None:
    """Sampling loops (DDPM and DDIM, ILVR hook, per-image CUDA generators) and the ffhq UNet
    forward under sync debug mode "error": any host-device synchronisation raises."""
    from ilvr_toolkit.diffusion import ddim_sample, ddpm_sample
    from ilvr_toolkit.sampling.runner import make_net

    device = _cuda()
    model = random_unet("tiny32", device)
    for precision, sampler, respacing in [("fp32", ddpm_sample, "10"), ("bf16", ddim_sample, "ddim10")]:
        run = _ilvr_loop(sampler, respacing, make_net(model, device, precision, channels_last=True), device)
        run()  # warm-up: lazy inits (cuBLAS handles, table casts) may sync once
        _expect_no_syncs(f"no syncs in loop ({sampler.__name__}, {precision}, ILVR)", run, device)
    # The big UNet alone (its forward must not sync either: it runs 100x per image).
    size = 256 if device.type == "cuda" else 64
    net = make_net(random_unet("ffhq", device), device, "bf16", channels_last=True)
    x = torch.randn(2, 3, size, size, device=device)
    t = torch.tensor([10, 900], device=device)
    net(x, t)
    _expect_no_syncs("no syncs in ffhq UNet forward (bf16)", lambda: net(x, t), device)
    if device.type == "cuda":
        try:
            check_cuda_graph(model, device)
        except Exception as error:  # noqa: BLE001 (optional fast path: report, go on)
            record(
                "CUDA graph tiny32 forward == eager", "FAIL", f"{type(error).__name__}: {str(error)[:200]}"
            )


def _expect_no_syncs(name: str, fn, device: torch.device) -> None:
    if device.type != "cuda":
        fn()
        record(name, "SKIP", "CPU dry run: sync debug mode needs CUDA")
        return
    try:
        with no_syncs(device):
            fn()
        torch.cuda.synchronize()
        record(name, "PASS", "sync debug mode 'error' raised nothing")
    except RuntimeError as error:
        record(name, "FAIL", str(error).splitlines()[0][:200])


def _ilvr_loop(sampler, respacing: str, net, device: torch.device, batch: int = 4, size: int = 32):
    """A closure running one ILVR sampling loop with per-image CUDA generators."""
    from ilvr_toolkit.conditioning import ILVR, LowPass
    from ilvr_toolkit.diffusion import DiffusionConfig, PerImageNoise, create_diffusion, draw_x_T

    diffusion = create_diffusion(DiffusionConfig(), respacing=respacing)
    lowpass = LowPass(size, 4, device)
    ref = torch.rand(batch, 3, size, size, device=device) * 2 - 1

    def run() -> torch.Tensor:
        noise = PerImageNoise([torch.Generator(device=device).manual_seed(i) for i in range(batch)])
        x_T = draw_x_T(noise, (batch, 3, size, size), device)
        return sampler(diffusion, net, x_T, noise=noise, hooks=[ILVR(ref, 4, range_t=-1, lowpass=lowpass)])

    return run


def check_cuda_graph(model, device: torch.device) -> None:
    """Optional fast path: a captured CUDA graph of the tiny32 forward equals eager and
    removes the launch overhead that dominates small models."""
    with tf32(False):
        x = torch.randn(8, 3, 32, 32, device=device)
        t = torch.randint(0, 1000, (8,), device=device)
        with torch.no_grad():
            eager = model(x, t)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    model(x, t)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = model(x, t)
            graph.replay()
            err = rel_err(static_out, eager)
            t_eager = common.time_fn(lambda: model(x, t), device, warmup=3, repeats=20).median
            t_graph = common.time_fn(graph.replay, device, warmup=3, repeats=20).median
    record(
        "CUDA graph tiny32 forward == eager",
        "PASS" if err <= 1e-6 else "FAIL",
        f"rel {err:.1e}; eager {t_eager * 1e3:.2f} ms, graph {t_graph * 1e3:.2f} ms ({t_eager / t_graph:.1f}x)",
        rel=err,
        eager_ms=t_eager * 1e3,
        graph_ms=t_graph * 1e3,
    )


# --------------------------------------------------------------------------- compile
def check_compile(args) -> None:
    """torch.compile: tiny32 fp32 equals eager; ffhq bf16 as close to fp32 as eager, and its speed."""
    device = _cuda()
    with tf32(False):
        _compile_tiny(device)
        _compile_ffhq(args, device)


def _compile_tiny(device: torch.device) -> None:
    tiny = random_unet("tiny32", device)
    x = torch.randn(4, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (4,), device=device)
    with torch.no_grad():
        eager = tiny(x, t)
        tic = time.perf_counter()
        compiled = torch.compile(tiny, dynamic=False)(x, t)
        seconds = time.perf_counter() - tic
    err = rel_err(compiled, eager)
    record(
        "compile tiny32 fp32 == eager",
        "PASS" if err <= 1e-4 else "FAIL",
        f"rel {err:.1e} (bound 1e-4), compiled in {seconds:.0f} s",
        rel=err,
        compile_s=seconds,
    )


def _compile_ffhq(args, device: torch.device) -> None:
    batch = args.batch
    size = 256 if device.type == "cuda" else 64  # the CPU dry run only tests this code
    big = random_unet("ffhq", device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad():
        ref = big(x, t)  # eager fp32, TF32 off
        with torch.autocast(device.type, dtype=torch.bfloat16):
            eager_bf16 = big(x, t)
            net = torch.compile(big, dynamic=False, mode=args.mode)
            tic = time.perf_counter()
            comp_bf16 = net(x, t)
            common.synchronize(device)
            seconds = time.perf_counter() - tic

            def run_eager():
                return big(x, t)

            def run_compiled():
                return net(x, t)

            timings = common.interleave(
                {"eager": run_eager, "compiled": run_compiled}, device, rounds=6, warmup=2
            )
    e_err, c_err = rel_err(eager_bf16, ref), rel_err(comp_bf16, ref)
    bound = max(1.5 * e_err, e_err + 2e-3)
    speed = {k: batch / v.median for k, v in timings.items()}
    record(
        f"compile ffhq bf16 batch {batch} close to eager",
        "PASS" if c_err <= bound else "FAIL",
        f"rel vs fp32: eager bf16 {e_err:.2e}, compiled {c_err:.2e} (bound {bound:.2e}); compiled in {seconds:.0f} s",
        eager_rel=e_err,
        compiled_rel=c_err,
        bound=bound,
        compile_s=seconds,
    )
    record(
        f"compile ffhq bf16 batch {batch} speed",
        "INFO",
        f"eager {speed['eager']:.1f} img/s, compiled {speed['compiled']:.1f} img/s "
        f"({speed['compiled'] / speed['eager']:.2f}x)",
        eager_img_s=speed["eager"],
        compiled_img_s=speed["compiled"],
        eager_tflops=speed["eager"] * 387.9e9 / 1e12,
        compiled_tflops=speed["compiled"] * 387.9e9 / 1e12,
    )


# --------------------------------------------------------------------------- DDP
def _training_module():
    """The project's LightningModule if it imports, else a minimal stand-in (same loss)."""
    import pytorch_lightning as pl

    try:
        from ilvr_toolkit.training.module import DiffusionModule

        return DiffusionModule(unet="tiny"), "DiffusionModule"
    except Exception as error:  # noqa: BLE001 (fall back to the stand-in on any failure)
        print(f"DiffusionModule unavailable ({type(error).__name__}: {error}); using a stand-in", flush=True)

    from ilvr_toolkit.diffusion import DiffusionConfig, create_diffusion
    from ilvr_toolkit.models import build_unet

    class StandIn(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_unet("tiny")
            self.diffusion = create_diffusion(DiffusionConfig(), respacing="")

        def training_step(self, batch, batch_idx):
            x0 = batch[0].float() / 127.5 - 1
            t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
            loss = self.diffusion.training_losses(self.model, x0, t)["loss"].mean()
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    return StandIn(), "stand-in"


def check_ddp_lightning(args) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    device = _cuda()
    module, kind = _training_module()
    before = [p.detach().clone() for p in module.model.parameters()]
    images = torch.randint(0, 256, (args.steps * args.batch, 3, 32, 32), dtype=torch.uint8)  # one epoch
    loader = DataLoader(
        TensorDataset(images), batch_size=args.batch, shuffle=True, num_workers=2, drop_last=True
    )
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            import torch.distributed as dist

            seen["dist"] = dist.is_available() and dist.is_initialized()
            seen["wrapped"] = type(trainer.strategy.model).__name__
            if batch_idx == 4:
                common.synchronize(device)
                seen["t0"] = time.perf_counter()
            seen["last"] = batch_idx

    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        strategy="ddp",
        max_steps=args.steps,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.work,
        callbacks=[Probe()],
    )
    trainer.fit(module, loader)
    common.synchronize(device)
    rate = (seen["last"] - 4) * args.batch / (time.perf_counter() - seen["t0"])
    changed = any(not torch.equal(a, b.cpu()) for a, b in zip(before, module.model.parameters(), strict=True))
    loss = trainer.callback_metrics.get("train/loss")
    finite = loss is not None and bool(torch.isfinite(loss))
    ok = seen.get("dist") and "DistributedDataParallel" in seen.get("wrapped", "") and changed and finite
    record(
        f"DDP 1 {'GPU' if device.type == 'cuda' else 'CPU process'} (Lightning, bf16-mixed, tiny)",
        "PASS" if ok else "FAIL",
        f"{kind}: strategy {type(trainer.strategy).__name__}, wrapped in {seen.get('wrapped')}, "
        f"process group {seen.get('dist')}, weights changed {changed}, loss {float(loss) if loss is not None else None:.4g}, "
        f"{rate:.0f} img/s (32x32)",
        img_s=rate,
    )


def _tiny_images(folder: Path) -> None:
    """96 smooth random 48x48 PNGs (what ``prepare`` turns into the 16x16 LMDB)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(96):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((48, 48), Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")


def _ddp_commands(args, work: Path, with_fid: bool) -> list[list[str]]:
    """prepare, fit, and with the FID monitor a resumed fit for ``every`` more steps."""
    lmdb_path = work / "tiny.lmdb"
    prep = [sys.executable, "-m", "ilvr_toolkit.data.prepare", str(work / "images"), "--out", str(lmdb_path)]
    fit = [
        sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--data.path", str(lmdb_path),
        "--trainer.accelerator", "gpu" if _cuda().type == "cuda" else "cpu", "--trainer.devices", "1",
        "--trainer.strategy", "ddp", "--trainer.max_steps", str(args.steps),
        "--trainer.default_root_dir", str(work / "run"), "--data.workers", "2",
        "--data.loader.persistent_workers", "false",
    ]  # fmt: skip
    if not with_fid:
        return [[*prep, "--size", "16"], fit]
    weights = common.write_random_inception_weights(work / "inception_random.pth")
    every = max(1, args.steps // 2)
    fit += [
        "--fid.every_n_steps", str(every), "--fid.num_images", "16", "--fid.batch_size", "16",
        "--fid.sampler.respacing", "ddim5", "--fid.reference.inception_weights", str(weights),
        "--fid.reference.stats_cache_dir", str(work / "stats"),
    ]  # fmt: skip
    at = fit.index("--trainer.max_steps") + 1
    return [[*prep, "--size", "16"], fit, [*fit[:at], str(args.steps + every), *fit[at + 1 :]]]


def _record_fid(work: Path) -> None:
    history_file = work / "run" / "fid.jsonl"
    history = (
        [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else []
    )
    steps = [e["step"] for e in history]
    ok = len(steps) >= 3 and all(math.isfinite(e["fid"]) for e in history)
    record(
        "FID monitor in DDP fit + resume (cache hit)",
        "PASS" if ok else "FAIL",
        f"evaluations at steps {steps}, FID {[round(e['fid'], 2) for e in history]}, "
        f"seconds {[e['seconds'] for e in history]}",
    )


def check_ddp_train(args) -> None:
    """``train.py fit --config configs/tiny.yaml`` with DDP on one GPU, on a made-up LMDB; with
    torch-fidelity present also the FID monitor (random Inception weights), then a resumed
    fit whose reference statistics come from the cache (CPU-loaded statistics vs CUDA
    features: the case a CPU test cannot reach)."""
    repo, name = common.REPO, "DDP 1 GPU (train.py fit)"
    missing = [m for m in ("lmdb", "jsonargparse") if not _importable(m)]
    if not (repo / "train.py").exists() or not (repo / "configs" / "tiny.yaml").exists():
        record(name, "SKIP", "train.py or configs/tiny.yaml missing")
        return
    if missing:
        record(name, "SKIP", f"missing packages {missing} (carry wheels in .whl/)")
        return
    work = Path(args.work)
    _tiny_images(work / "images")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    with_fid = _importable("torch_fidelity")
    for step, cmd in zip(
        ("prepare", "fit", "resumed fit"), _ddp_commands(args, work, with_fid), strict=False
    ):
        print("$ " + " ".join(cmd), flush=True)
        tic = time.perf_counter()
        done = subprocess.run(cmd, cwd=repo, env=env, text=True, capture_output=True, timeout=args.timeout)
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
            record(name, "FAIL", f"{step} rc {done.returncode}: {tail}")
            return
    ckpts = sorted(str(p.relative_to(work)) for p in (work / "run").rglob("*.ckpt"))
    record(
        name,
        "PASS" if ckpts else "FAIL",
        f"{args.steps} steps in {time.perf_counter() - tic:.0f} s; checkpoints: {ckpts[:3]}",
    )
    if with_fid:
        _record_fid(work)
    else:
        record(
            "FID monitor in DDP fit + resume (cache hit)",
            "SKIP",
            "torch_fidelity missing (carry wheels in .whl/)",
        )


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- other scripts
def known_args(script: Path, wanted: list[str]) -> list[str]:
    """The part of ``wanted`` (``--flag value...`` groups) that ``script --help`` mentions."""
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=common.REPO
    )
    known = set(re.findall(r"--[A-Za-z0-9][\w.-]*", done.stdout))
    groups, current = [], []
    for token in wanted:
        if token.startswith("--"):
            if current:
                groups.append(current)
            current = [token]
        elif current:
            current.append(token)
    if current:
        groups.append(current)
    kept = [g for g in groups if g[0].split("=")[0] in known]
    dropped = [g[0] for g in groups if g[0].split("=")[0] not in known]
    if dropped:
        print(f"{script.name}: not passing {dropped} (its --help does not list them)", flush=True)
    return [token for group in kept for token in group]


def run_other(args) -> None:
    script = common.REPO / "bench" / args.script
    name = f"bench {args.script}"
    if not script.exists():
        record(name, "SKIP", "not in this checkout")
        return
    try:
        argv = known_args(script, args.rest)
    except subprocess.TimeoutExpired:
        record(name, "FAIL", "--help timed out")
        return
    cmd = [sys.executable, str(script), *argv]
    print("$ " + " ".join(cmd), flush=True)
    tic = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=common.REPO, text=True, capture_output=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        record(name, "FAIL", f"timed out after {args.timeout} s")
        return
    print(done.stdout[-6000:], done.stderr[-4000:], sep="\n", flush=True)
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    status = "PASS" if done.returncode == 0 else "FAIL"
    last = (done.stderr.strip().splitlines() or [""])[-1][:160] if done.returncode else ""
    record(
        name,
        status,
        f"rc {done.returncode} in {time.perf_counter() - tic:.0f} s {last}",
        table=table[-12:],
        argv=argv,
    )


# --------------------------------------------------------------------------- summary
def summary(args) -> None:
    entries = []
    if CHECKS.exists():
        entries = [json.loads(line) for line in CHECKS.read_text().splitlines() if line.strip()]
    results = Path(args.results)
    benches = {}
    for path in sorted(results.glob("*.json")) if results.is_dir() else []:
        with contextlib.suppress(Exception):
            benches[path.stem] = json.loads(path.read_text())
    rows = [{"check": e["name"], "status": e["status"], "detail": e["detail"][:150]} for e in entries]
    for row in benches.get("unet_gpu", {}).get("rows", []):
        if row["precision"] == "bf16" or row["batch"] == 1:
            rows.append(
                {
                    "check": f"UNet ffhq b{row['batch']} {row['precision']} cl={row['channels_last']}",
                    "status": "INFO",
                    "detail": f"{row['img/s']:.1f} img/s, {row['UNet TFLOP/s']:.0f} TFLOP/s "
                    f"({row['ratio']:.2f} of matmul {row['matmul TFLOP/s']:.0f})",
                }
            )
    for row in benches.get("sampling_gpu", {}).get("rows", []):
        goal = " (goal >= 10)" if "DDPM 100" in row["case"] else ""
        rows.append(
            {
                "check": f"sampling {row['case']}",
                "status": "INFO",
                "detail": f"uncond {row['uncond img/s']:.2f} img/s, ILVR {row['ILVR img/s']:.2f} img/s{goal}, "
                f"overhead A/B {row['A/B overhead %']:+.2f}%, hook/step {row['hook/step %']:.3f}%, "
                f"lowpass {row['lowpass static']}, syncs {row['no syncs']}",
            }
        )
    for row in benches.get("proposals_gpu", {}).get("rows", [])[1:]:
        rows.append(
            {
                "check": f"proposal {row['variant']} (ffhq bf16 b32)",
                "status": "INFO",
                "detail": f"{row['speed-up']:.3f}x vs stock; rel err vs stock {row['rel err vs stock']:.1e}, "
                f"vs fp32 {row['rel err vs fp32']:.1e}",
            }
        )
    summary_path = Path(args.out) / "gpu_check_summary.json" if args.out else None
    if summary_path:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps({"checks": entries, "benches": benches}, indent=1, default=str))
    for entry in entries:
        if entry.get("table"):
            print(f"\n{entry['name']} (its own table):")
            print("\n".join(entry["table"]))
    counts = {s: sum(1 for e in entries if e["status"] == s) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"\n=== gpu_check summary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped ==="
    )
    print(common.format_table(rows, ["check", "status", "detail"]))


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    sub.add_parser("fixture")
    sub.add_parser("sync")
    p = sub.add_parser("compile")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mode", default=None)
    for name in ("ddp-lightning", "ddp-train"):
        p = sub.add_parser(name)
        p.add_argument("--work", default="/tmp/ilvr_gpu_check")
        p.add_argument("--steps", type=int, default=30)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--timeout", type=int, default=150)
    p = sub.add_parser("other")
    p.add_argument("script")
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p = sub.add_parser("summary")
    p.add_argument("--results", default=str(common.RESULTS_DIR))
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    if args.command == "other" and "--" in args.rest:  # "other SCRIPT [--timeout N] -- ARGS"
        cut = args.rest.index("--")
        own, args.rest = args.rest[:cut], args.rest[cut + 1 :]
        if own[:1] == ["--timeout"] and len(own) == 2:
            args.timeout = int(own[1])
        elif own:
            parser.error(f"other: unexpected {own} before '--'")
    handlers = {
        "env": check_env,
        "fixture": check_fixture,
        "sync": check_sync,
        "compile": check_compile,
        "ddp-lightning": check_ddp_lightning,
        "ddp-train": check_ddp_train,
        "other": run_other,
        "summary": summary,
    }
    try:
        handlers[args.command](args)
    except Exception as error:  # noqa: BLE001 (a crashed check is a FAIL line, then the traceback)
        record(args.command, "FAIL", f"crashed: {type(error).__name__}: {str(error)[:200]}")
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
