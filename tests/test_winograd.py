"""The opt-in Winograd F(4x4, 3x3) convolution (``models/winograd.py``): numerics against float64,
when it runs and when it must not, a failed build, and its plumbing (sample.py, training, export).

Relative errors are ||out - ref|| / ||ref|| over whole tensors, ref in float64 (or the stock
float32 path where stated). Bounds and what was measured on the CPU (AMD EPYC, AVX-512):

| what                                   | compared with              | bound     | measured          |
| -------------------------------------- | -------------------------- | --------- | ----------------- |
| conv3x3 forward, random small shapes   | float64 F.conv2d           | rel 1e-5  | <= 1.5e-6 (200 shapes, a one-off run; the test draws 25) |
| conv3x3 forward, 3 bands, partial last | float64 F.conv2d           | rel 1e-5  | 7.7e-7            |
| conv3x3 gradients x, weight, bias      | float64 autograd of conv2d | rel 1e-5  | 1.2e-6, 2.0e-6, 1.2e-7 |
| forward + 3 gradients, bands of 1-40 tiles, small shapes | float64 autograd | rel 1e-5 | <= 1.4e-6 (100 draws, one-off; the test draws 20) |
| C = 272, O = 31, both GEMM builds: forward, dL/dx, dL/dg, dL/db | float64 autograd | rel 1e-5 | AVX-512 2.3e-6, 1.3e-6, 1.4e-6, 1.3e-7; MKL 1.6e-6, same |
| filter transforms U, flipped U, G^T dU G | float64 einsum           | rel 1e-6  | 2.3e-8, 2.3e-8, 4.7e-8 |
| tiny UNet forward (N=8, 32x32)         | stock float32 path         | rel 1e-5  | 2.8e-6            |
| tiny UNet training step: loss / grads  | stock float32 path         | rel 1e-4  | 0 / 1.2e-5 (summed over the batch) |
| calls that do not qualify              | stock float32 path         | identical | identical         |
| sample.py PNGs (tiny32, 8 DDPM steps)  | --winograd false           | mean 0.01, max 2 grey levels | 1e-4 / 1 |
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sampling import _args, _pngs, refs, tiny32_path  # noqa: F401  (fixtures)
from test_training import common_args, lmdb_path, run_inprocess  # noqa: F401  (fixture)

from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.models import build_unet, get_preset, load_model, winograd
from ilvr_toolkit.sampling import run
from ilvr_toolkit.sampling.cli import main as sample_main
from ilvr_toolkit.sampling.cli import parse_config
from ilvr_toolkit.training import DiffusionModule
from ilvr_toolkit.training.export import export_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402  (bench/common.py: randomize_parameters_, rel_err)

rel_err = common.rel_err
G64 = common.WINOGRAD_G  # float64, written out apart from the kernel's float32 copy

REL = 1e-5


def _conv_case(n: int, c: int, o: int, h: int, w: int, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(o, c, 3, 3, generator=gen) / (9 * c) ** 0.5
    return x, weight, torch.randn(o, generator=gen) if bias else None


def _ref64(x, weight, bias):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)


@pytest.fixture()
def spy(monkeypatch):
    """Counts the calls of ``winograd.conv3x3`` (what ``Conv3x3`` runs when it qualifies)."""
    calls = []
    original = winograd.conv3x3

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(winograd, "conv3x3", counting)
    return calls


# --------------------------------------------------------------------------- the kernel
def _shapes(channels: int, tiles: int) -> dict:
    """Strategies for n, c, o (1..channels), h, w (multiples of 4, 1..tiles tiles)."""
    sides = st.integers(1, tiles).map(lambda k: 4 * k)
    return dict(n=st.integers(1, 3), c=st.integers(1, channels), o=st.integers(1, channels), h=sides, w=sides)


@settings(max_examples=25, deadline=None)
@given(**_shapes(24, 10), bias=st.booleans())
def test_forward_matches_float64(n, c, o, h, w, bias):
    x, weight, b = _conv_case(n, c, o, h, w, bias)
    assert rel_err(winograd.conv3x3(x, weight, b), _ref64(x, weight, b)) <= REL


def test_forward_several_bands_with_a_partial_last():
    """68x68: 17 tiles a row, so a band is 256 // 17 = 15 tile rows; 2 images = 34 tile rows:
    bands of 15, 15 (across the image boundary) and 4."""
    x, weight, b = _conv_case(2, 16, 20, 68, 68, True, seed=1)
    assert (2 * 68 // 4) // (winograd.BAND_TILES // (68 // 4)) == 2  # two full bands, then a partial one
    err = rel_err(winograd.conv3x3(x, weight, b), _ref64(x, weight, b))
    print(f"3 bands: rel {err:.2e}")
    assert err <= REL


def _assert_gradients_match_float64(x, weight, b, x_grad: bool) -> None:
    """The forward and dL/dx, dL/dg, dL/db of ``sum(conv3x3(x) * upstream)`` against float64
    autograd of conv2d (x needs no gradient when ``x_grad`` is False, like the first layer)."""
    upstream = torch.randn(
        x.shape[0], weight.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(3)
    )
    leaves = [t for t in (x if x_grad else None, weight, b) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    out = winograd.conv3x3(x, weight, b)
    (out * upstream).sum().backward()
    doubles = [t.detach().double().requires_grad_(True) for t in leaves]
    x64 = doubles[0] if x_grad else x.double()
    w64, b64 = doubles[1 if x_grad else 0], (doubles[-1] if b is not None else None)
    out64 = F.conv2d(x64, w64, b64, padding=1)
    (out64 * upstream.double()).sum().backward()
    assert x_grad or x.grad is None
    assert rel_err(out.detach(), out64.detach()) <= REL
    for got, want in zip(leaves, doubles, strict=True):
        assert rel_err(got.grad, want.grad) <= REL, got.shape


@pytest.mark.parametrize("x_grad, bias", [(True, True), (False, True), (True, False)])
def test_gradients_match_float64(x_grad, bias):
    """dL/dx (the kernel on flipped filters), dL/dg, dL/db against float64 autograd of conv2d;
    also the first layer's case (x needs no gradient) and no bias."""
    x, weight, b = _conv_case(2, 12, 18, 20, 28, bias, seed=2)
    _assert_gradients_match_float64(x, weight, b, x_grad)


@settings(max_examples=20, deadline=None)
@given(**_shapes(20, 6), band=st.integers(1, 40))
def test_any_band_size_matches_float64(n, c, o, h, w, band):
    """Bands of any size (tiles per band, rounded down to whole tile rows, at least one row; the
    last one partial, bands across image boundaries): forward and all three gradients."""
    x, weight, b = _conv_case(n, c, o, h, w, True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(winograd, "BAND_TILES", band)
        _assert_gradients_match_float64(x, weight, b, x_grad=True)


@settings(max_examples=20, deadline=None)
@given(o=st.integers(1, 70), c=st.integers(1, 70))
def test_filter_transforms_match_float64(o, c):
    """U = G g G^T (36, O, C), the same of the flipped, transposed filters (36, C, O), and the
    filters' gradient G^T dU G, against float64 einsums (blocks of 64 filters, a partial last)."""
    gen = torch.Generator().manual_seed(o * 100 + c)
    weight, grad_u = torch.randn(o, c, 3, 3, generator=gen), torch.randn(36, o, c, generator=gen)
    k = winograd.kernel()
    for flip_t, g in [(False, weight.double()), (True, weight.double().flip(2, 3).transpose(0, 1))]:
        want = torch.einsum("ik,jl,pqkl->ijpq", G64, G64, g).reshape(36, *g.shape[:2])
        assert rel_err(k.filters(weight, flip_t), want) <= 1e-6, flip_t
    want = torch.einsum("ik,jl,ijoc->ockl", G64, G64, grad_u.double().reshape(6, 6, o, c))
    assert rel_err(k.filters_grad(grad_u), want) <= 1e-6


@pytest.fixture(scope="module")
def mkl_build():
    """The kernel built without AVX-512: the MKL GEMM path that CPUs without it take."""
    name = f"ilvr_winograd_test_no_avx512_{winograd._cpu_tag()}"  # -march=native: one per CPU type
    return winograd.build(name, [*winograd.BUILD_FLAGS, "-mno-avx512f"])


@pytest.mark.parametrize("gemm", ["native", "mkl"])
def test_many_channels_match_float64(gemm, mkl_build, monkeypatch):
    """Both GEMM paths over shapes the small draws miss: C = 272 in slices of 128, 128, 16 and
    O = 31 in blocks of 14, 14, 3 rows (swapped for dL/dx), bands of 36 tiles (a 32-column
    block and a masked 4-column one), forward and all three gradients."""
    if gemm == "mkl":
        assert mkl_build.gemm_kind() == "mkl"
        monkeypatch.setattr(winograd, "kernel", lambda: mkl_build)
    elif "avx512f" in Path("/proc/cpuinfo").read_text():
        assert winograd.kernel().gemm_kind() == "avx512"
    monkeypatch.setattr(winograd, "BAND_TILES", 40)  # 9 tiles a row: bands of 4 rows = 36 tiles
    x, weight, b = _conv_case(2, 272, 31, 20, 36, True, seed=4)
    _assert_gradients_match_float64(x, weight, b, x_grad=True)


def test_kernel_checks_bias_and_handles_empty_shapes():
    """A bias of the wrong size is refused (not read past its end); W = 0 or N = 0: empty output;
    C = 0: the bias; O = 0: a zero input gradient (the GEMM of no channels still writes its zeros)."""
    x, weight, _ = _conv_case(1, 16, 32, 8, 8, False)
    with pytest.raises(RuntimeError, match="bias"):
        winograd.conv3x3(x, weight, torch.randn(64)[:1])
    for shape in [(1, 16, 4, 0), (0, 16, 4, 4), (1, 16, 0, 4)]:
        y = winograd.conv3x3(torch.randn(shape, requires_grad=True), weight.requires_grad_(True))
        assert y.shape == (shape[0], 32, *shape[2:])
        y.sum().backward()
        assert weight.grad is not None and not weight.grad.any()
        weight.grad = None
    garbage = torch.full((4096,), 7.0)  # freed memory that an unwritten output would show
    del garbage
    bias = torch.tensor([1.0, 2.0, 3.0])  # C = 0: y is the bias; O = 0: dL/dx is 0
    assert torch.equal(
        winograd.conv3x3(torch.randn(1, 0, 8, 8), torch.randn(3, 0, 3, 3), bias),
        bias.view(1, 3, 1, 1).expand(1, 3, 8, 8),
    )
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    winograd.conv3x3(x, torch.randn(0, 4, 3, 3)).sum().backward()
    assert x.grad is not None and not x.grad.any()


def test_kernel_releases_the_gil():
    """sample.py's I/O threads run Python while a batch samples: the kernel must not hold the GIL.
    A spinning thread counts while one C++ call (~0.2 s) runs; with the GIL held it could only
    run in the one switch interval (5 ms) before the call, released it gets its share of the cores."""
    import threading
    import time

    x, weight, b = _conv_case(2, 128, 128, 256, 256, True)
    kernel, u = winograd.kernel(), winograd.transform_filters(weight)
    kernel.conv3x3(x, u, b, winograd.BAND_TILES)  # warm (allocator)
    counts, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counts[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.05)
        start = counts[0]
        time.sleep(0.1)  # the spinning thread alone: its rate
        rate, before = (counts[0] - start) / 0.1, counts[0]
        kernel.conv3x3(x, u, b, winograd.BAND_TILES)
        during = counts[0] - before
    finally:
        stop.set()
        thread.join()
    print(f"spins during the call: {during / rate * 1e3:.0f} ms worth")
    assert during > rate * 0.06  # measured: 187 ms worth released, 18 ms with the GIL held


# --------------------------------------------------------------------------- the UNet
@pytest.fixture(scope="module")
def tiny_pair():
    """The tiny UNet with random weights, twice: stock and with Winograd (same weights)."""
    stock = common.randomize_parameters_(build_unet("tiny"), seed=0).eval().requires_grad_(False)
    fast = build_unet(get_preset("tiny").replace(winograd=True)).eval().requires_grad_(False)
    fast.load_state_dict(stock.state_dict(), strict=True)
    return stock, fast


def test_unet_forward_close_to_stock_and_winograd_runs(tiny_pair, spy):
    stock, fast = tiny_pair
    x, t = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) * 120
    with torch.no_grad():
        ref, out = stock(x, t), fast(x, t)
    # N*H*W = 8192 at 32x32, 2048 at 16x16: only the calls at or over MIN_PIXELS
    assert spy and all(s[0] * s[2] * s[3] >= winograd.MIN_PIXELS for s in spy)
    err = rel_err(out, ref)
    print(f"tiny UNet forward: {len(spy)} Winograd convs, rel {err:.2e}")
    assert ref.abs().max() > 0.1 and err <= REL


@pytest.mark.parametrize("case", ["bf16-autocast", "channels_last", "h%4", "small-NHW"])
def test_unet_calls_that_do_not_qualify_run_the_stock_kernel(tiny_pair, spy, case):
    stock, fast = tiny_pair
    size, batch = {"h%4": 34, "small-NHW": 16}.get(case, 32), 2 if case == "small-NHW" else 4
    assert case != "small-NHW" or batch * size * size < winograd.MIN_PIXELS
    x, t = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)), torch.arange(batch)
    fmt = torch.channels_last if case == "channels_last" else torch.contiguous_format
    outs = []
    for model in (stock, fast):
        model.to(memory_format=fmt)
        try:
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=case == "bf16-autocast"):
                outs.append(model(x.contiguous(memory_format=fmt), t))
        finally:
            model.to(memory_format=torch.contiguous_format)
    assert not spy and torch.equal(outs[0], outs[1])


def test_unet_training_step_close_to_stock(spy):
    """One loss.backward() at batch 4, 32x32 (4096 pixels: Winograd forward and backward)."""
    ref, fast = DiffusionModule(unet="tiny"), DiffusionModule(unet={"preset": "tiny", "winograd": True})
    common.randomize_parameters_(ref.model, seed=0)
    fast.model.load_state_dict(ref.model.state_dict())
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1
    t, noise = torch.tensor([0, 10, 500, 999]), torch.randn(4, 3, 32, 32, generator=gen)
    losses = []
    for module in (ref, fast):
        loss = module.diffusion.training_losses(module.model, x0, t, noise=noise)["loss"].mean()
        loss.backward()
        losses.append(loss.detach())
    grads = [torch.cat([p.grad.flatten() for p in m.model.parameters()]) for m in (ref, fast)]
    print(f"training step: loss rel {rel_err(losses[1], losses[0]):.1e}, grads {rel_err(*grads[::-1]):.1e}")
    assert spy and rel_err(losses[1], losses[0]) <= 1e-4 and rel_err(grads[1], grads[0]) <= 1e-4


def test_winograd_is_a_runtime_setting():
    stock, fast = build_unet("tiny"), build_unet(get_preset("tiny").replace(winograd=True))
    assert stock.state_dict().keys() == fast.state_dict().keys()
    stock.load_state_dict(fast.state_dict(), strict=True)
    fast.load_state_dict(stock.state_dict(), strict=True)
    assert fast.config.architecture() == stock.config.architecture() and fast.config.winograd
    assert all(m.winograd for m in fast.modules() if isinstance(m, winograd.Conv3x3))
    fast.set_winograd(False)
    assert not fast.config.winograd and not any(
        m.winograd for m in fast.modules() if isinstance(m, winograd.Conv3x3)
    )


# --------------------------------------------------------------------------- a failed build
@pytest.fixture()
def no_compiler(monkeypatch):
    """``cpp_extension.load`` fails as it does without a compiler; the cached kernel is dropped
    for the test and rebuilt (from torch's build folder) after it."""
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'x'\nninja: build stopped: subcommand failed.")

    winograd.kernel.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", fail)
    yield
    monkeypatch.undo()
    winograd.kernel.cache_clear()


def test_build_failure_is_one_oserror_naming_the_source(no_compiler):
    with pytest.raises(OSError) as info:
        winograd.kernel()
    message = str(info.value)
    assert "\n" not in message and str(winograd.SOURCE) in message and "Error building extension" in message


def test_sample_py_build_failure_is_one_line_exit_1(no_compiler, refs, tiny32_path, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    args = _args(tiny32_path, refs, out, "--winograd", "true", "--cpu_malloc", "default")
    assert sample_main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: winograd: could not build"), lines
    assert "winograd.cpp" in lines[0]
    assert not out.exists()


def test_sample_py_stop_signal_during_the_build_is_a_stop(refs, tiny32_path, tmp_path, capsys, monkeypatch):  # noqa: F811
    """SIGTERM to the process group while the kernel builds (``timeout``, a scheduler): ninja reports
    "interrupted by user"; sample.py says it stopped, exit 128 + 15, not "could not build"."""
    import signal
    import threading

    from torch.utils import cpp_extension

    def interrupted(*args, **kwargs):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # held by sample.py's StopSignals
        raise RuntimeError("Error building extension 'x'\nninja: build stopped: interrupted by user.")

    winograd.kernel.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", interrupted)
    try:
        out = tmp_path / "out"
        code = sample_main(_args(tiny32_path, refs, out, "--winograd", "true", "--cpu_malloc", "default"))
    finally:
        monkeypatch.undo()
        winograd.kernel.cache_clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 143
        and lines[-1] == "sample.py: stopped by signal 15 while the Winograd kernel was built; rerun"
    )
    assert not any(
        "error" in line for line in lines
    )  # (the test's own import of cpp_extension logs a warning)


def test_damaged_cached_kernel_is_linked_again_before_loading(tmp_path):
    """A cached module cut short (a full disk, a killed copy) is found by its recorded sha256 before
    it is loaded (loading it: SIGBUS) and linked again from the cached object file (no compile)."""
    import os
    import shutil
    import subprocess

    name = f"ilvr_winograd_{winograd._cpu_tag()}"
    winograd.kernel()  # the suite's one build: its folder is copied, the copy damaged
    folder = shutil.copytree(
        winograd.build_folder(name), tmp_path / "ext" / name, ignore=shutil.ignore_patterns("lock")
    )
    library = folder / f"{name}.so"
    size, compiled = library.stat().st_size, (folder / "winograd.o").stat().st_mtime_ns
    with open(library, "r+b") as f:
        f.truncate(1000)
    load = "from ilvr_toolkit.models import winograd; print(winograd.kernel().gemm_kind())"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", load], env=env, cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert library.stat().st_size == size and (folder / "winograd.o").stat().st_mtime_ns == compiled


# --------------------------------------------------------------------------- sample.py, training
def test_sample_py_winograd_close_to_stock_and_resume_refused(refs, tiny32_path, tmp_path, spy):  # noqa: F811
    outs = {flag: tmp_path / flag for flag in ("false", "true")}
    for flag, out in outs.items():
        run(parse_config(_args(tiny32_path, refs, out, "--winograd", flag, "--output.grid", "false")))
        assert (len(spy) > 0) == (flag == "true")  # batch of 5 at 32x32: 5120 pixels
    manifest = json.loads((outs["true"] / "manifest.json").read_text())
    assert manifest["config"]["winograd"] and manifest["unet"]["winograd"] and manifest["num_images"] == 5
    a, b = _pngs(outs["false"]), _pngs(outs["true"])
    assert a.keys() == b.keys() and len(a) == 5
    diffs = [np.abs(a[k].astype(int) - b[k].astype(int)) for k in a]
    mean, worst = float(np.mean([d.mean() for d in diffs])), max(int(d.max()) for d in diffs)
    print(f"winograd vs stock PNGs: mean |diff| {mean:.4f} grey levels, max {worst}")
    assert mean <= 0.01 and worst <= 2  # measured 1e-4 / 1: one pixel rounds the other way
    with pytest.raises(UsageError, match="--winograd false: .* made with true"):
        run(parse_config(_args(tiny32_path, refs, outs["true"], "--winograd", "false")))
    # a folder written before the setting existed resumes with its default (and only that)
    settings_path = outs["false"] / ".manifest" / "settings.json"
    settings_json = json.loads(settings_path.read_text())
    del settings_json["winograd"]
    settings_path.write_text(json.dumps(settings_json))
    run(
        parse_config(_args(tiny32_path, refs, outs["false"], "--winograd", "false", "--output.grid", "false"))
    )
    with pytest.raises(UsageError, match="--winograd true: .* made with false"):
        run(parse_config(_args(tiny32_path, refs, outs["false"], "--winograd", "true")))


def test_training_fit_with_winograd_exports_without_it(lmdb_path, tmp_path, spy):  # noqa: F811
    unet = "{preset: tiny, winograd: true}"  # as on the command line; 32 px, batch 4: 4096 pixels
    args = common_args(lmdb_path, tmp_path, **{"model.unet": unet, "trainer.max_steps": 3})
    cli = run_inprocess(args)
    assert cli.trainer.global_step == 3 and spy
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.model.model.config.winograd
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["hyper_parameters"]["unet"]["winograd"]
    exported = export_checkpoint(last, tmp_path / "export", name="m")
    assert not load_model(exported["model_file"]).unet_config.winograd
