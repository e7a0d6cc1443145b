"""Evaluation: FID/KID on an Inception of the real architecture with random weights (read from a
temp file, as the real weights would be), the statistics cache, DDP, faithfulness metrics."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image
from random_inception import write_random_inception_weights

from ilvr_toolkit.conditioning.lowpass import LowPass
from ilvr_toolkit.evaluation import (
    PSNR_CAP_DB,
    FaithfulnessMetrics,
    InceptionFeatureExtractor,
    InceptionWeightsMissing,
    cached_reference_stats,
    evaluate_translation,
    format_table,
    inception_scores,
    load_stats,
    pair_by_name,
    write_metrics,
)
from ilvr_toolkit.evaluation.__main__ import build_parser
from ilvr_toolkit.evaluation.__main__ import main as cli_main
from ilvr_toolkit.evaluation.fid import gather_stats
from ilvr_toolkit.evaluation.inception import WEIGHTS_FILENAME, WEIGHTS_SHA256
from ilvr_toolkit.images import to_float

SIZE = 32
NOISE_LEVELS = (8.0, 24.0, 64.0)


def smooth_images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """uint8 (n, 3, size, size): random low-frequency colour fields (image-like, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noisy = images.float() + sigma * torch.randn(images.shape, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)


def save_folder(folder: Path, images: torch.Tensor, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        name = names[i] if names else f"img{i:03d}"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    return write_random_inception_weights(
        tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=0
    )


@pytest.fixture(scope="module")
def extractor(weights_file) -> InceptionFeatureExtractor:
    torch.manual_seed(0)
    return InceptionFeatureExtractor(weights_file)


@pytest.fixture(scope="module")
def base_images() -> torch.Tensor:
    return smooth_images(8, seed=1)


@pytest.fixture(scope="module")
def features(extractor, base_images) -> dict:
    """Features of the base set and of three noisier copies (one Inception pass each)."""
    out = {"base": extractor(base_images)}
    for k, sigma in enumerate(NOISE_LEVELS):
        out[sigma] = extractor(add_noise(base_images, sigma, seed=10 + k))
    return out


def fid_of(real: torch.Tensor, fake: torch.Tensor, kid: bool = True) -> dict:
    return inception_scores(*(gather_stats([x], kid, sync=False, device="cpu") for x in (real, fake)))


@pytest.fixture(scope="module")
def fids(features) -> dict:
    """FID/KID of the base set against itself and its noisy copies (each eigensolve done once)."""
    return {key: fid_of(features["base"], features[key]) for key in ("base", *NOISE_LEVELS)}


# --- the Inception weights: file only, a named error, no network ------------------------------


def test_missing_weights_named_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(InceptionWeightsMissing) as err:
        InceptionFeatureExtractor()
    message = str(err.value)
    expected_place = tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    assert WEIGHTS_FILENAME in message and WEIGHTS_SHA256 in message
    assert str(expected_place) in message and "--inception_weights" in message
    with pytest.raises(InceptionWeightsMissing, match=WEIGHTS_SHA256):
        InceptionFeatureExtractor(tmp_path / "nowhere.pth")
    # the CLI reports it as one line (a missing file: exit 1), before reading any image
    save_folder(tmp_path / "a", smooth_images(2, seed=0))
    assert cli_main(["--outputs", str(tmp_path / "a"), "--target", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m ilvr_toolkit.evaluation: error: ") and err.count("\n") == 1
    assert WEIGHTS_FILENAME in err


def test_extractor_loads_from_file_without_network(weights_file, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_network)
    extractor = InceptionFeatureExtractor(weights_file)
    assert extractor.net.use_antialias is False  # the TF1-compatible resize of the reference FID
    assert not extractor.official and len(extractor.sha256) == 64
    # the state dict of the file is what the network holds
    saved = torch.load(weights_file, weights_only=True)
    assert torch.equal(
        extractor.net.Mixed_7c.branch_pool.conv.weight, saved["Mixed_7c.branch_pool.conv.weight"]
    )


def test_features_float64_rounded_and_outside_autocast(extractor, base_images):
    x = base_images[:1]
    f = extractor(x)
    assert f.dtype == torch.float64 and f.shape == (1, 2048)
    # float images in [-1, 1] are quantised with rounding: the same features as their uint8
    # (+0.4 of a step rounds back; truncation would not survive the -0.4)
    floats = torch.cat([to_float(x) + 0.4 / 127.5, to_float(x) - 0.4 / 127.5])
    assert torch.equal(extractor(floats), f.expand(2, -1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(extractor(x), f)


# --- FID / KID values ----------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero(fids):
    assert abs(fids["base"]["fid"]) < 1e-6 * fids[NOISE_LEVELS[0]]["fid"]


def test_fid_grows_with_noise(fids):
    values = [fids[sigma]["fid"] for sigma in NOISE_LEVELS]
    assert 0 < values[0] < values[1] < values[2], values
    kids = [fids[sigma]["kid_mean"] for sigma in NOISE_LEVELS]
    assert kids[0] < kids[1] < kids[2], kids


def test_fid_and_kid_match_direct_numpy_scipy(features, fids):
    """pytorch-fid's formula, Tr(sqrtm(s1 s2)), evaluated by scipy on the n x n Gram form.

    With centred features A1 (n1, D), A2 (n2, D): s1 s2 = A1^T (A1 A2^T A2) / c has the non-zero
    eigenvalues of G = A1 A2^T A2 A1^T / c (n1 x n1), so Tr(sqrtm(s1 s2)) = Tr(sqrtm(G)): the
    same number without sqrtm's round-off on 2048 - n null directions (and 1000x faster).
    ILVR_FULL_SQRTM=1 also runs sqrtm on the 2048 x 2048 product itself (~20-60 s on 2 cores).
    """
    import scipy.linalg

    real, fake = features["base"], features[NOISE_LEVELS[1]]
    ours = fids[NOISE_LEVELS[1]]

    x, y = real.numpy(), fake.numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    a1, a2 = x - mu1, y - mu2
    n1, n2 = len(x), len(y)
    gram = (a1 @ a2.T) @ (a2 @ a1.T) / ((n1 - 1) * (n2 - 1))
    trace_s1 = (a1**2).sum() / (n1 - 1)
    trace_s2 = (a2**2).sum() / (n2 - 1)
    fid_scipy = float(
        ((mu1 - mu2) ** 2).sum() + trace_s1 + trace_s2 - 2 * np.trace(scipy.linalg.sqrtm(gram)).real
    )
    assert ours["fid"] == pytest.approx(fid_scipy, rel=1e-5)
    if os.environ.get("ILVR_FULL_SQRTM") == "1":
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        fid_full = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
        assert ours["fid"] == pytest.approx(fid_full, rel=1e-5)

    # KID: with subsets as large as the sets, every subset is the whole set -> the unbiased MMD^2
    # with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3
    m, d = x.shape
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    assert ours["kid_subset_size"] == m
    assert ours["kid_mean"] == pytest.approx(mmd, rel=1e-9)


# --- statistics cache ----------------------------------------------------------------------------


def test_cached_statistics_give_the_direct_fid_and_are_invalidated(
    tmp_path, extractor, base_images, features, fids
):
    target = save_folder(tmp_path / "target", base_images)
    cache = tmp_path / "cache"
    kw = dict(image_size=SIZE, cache_dir=cache, batch_size=len(base_images))

    built, info = cached_reference_stats(target, extractor, **kw)
    assert not info.hit and Path(info.path).is_file() and built.count == len(base_images)
    loaded, info2 = cached_reference_stats(target, extractor, **kw)
    assert info2.hit and info2.path == info.path
    assert torch.equal(loaded.mean, built.mean) and torch.equal(loaded.cov, built.cov)
    assert torch.equal(loaded.features, built.features)

    # the direct FID: real features fed to the metric (fids fixture) vs the same from the cache file
    cached = inception_scores(loaded, gather_stats([features[NOISE_LEVELS[1]]], True, False, "cpu"))
    direct = fids[NOISE_LEVELS[1]]
    assert cached["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    assert cached["kid_mean"] == pytest.approx(direct["kid_mean"], rel=1e-6)

    # the dataset changes (one image rewritten, four removed): its content key changes, so the
    # cache is not reused; the new statistics are computed, then found
    save_folder(target, add_noise(base_images[:1], 30.0, seed=6), names=["img000"])
    os.utime(target / "img000.png", ns=(1, 1))  # a different mtime even on a coarse clock
    for i in range(4, len(base_images)):
        (target / f"img{i:03d}.png").unlink()
    rebuilt, info3 = cached_reference_stats(target, extractor, **kw)
    assert not info3.hit and info3.reason == "no cache file" and rebuilt.count == 4
    assert info3.path != info.path and not torch.equal(rebuilt.mean, built.mean)
    again, info4 = cached_reference_stats(target, extractor, **kw)
    assert info4.hit and info4.path == info3.path and torch.equal(again.cov, rebuilt.cov)
    # a truncated cache file is recomputed, not fatal
    Path(info4.path).write_bytes(Path(info4.path).read_bytes()[:100])
    _, info5 = cached_reference_stats(target, extractor, **kw)
    assert not info5.hit and "unreadable" in info5.reason


def test_an_image_rewritten_in_place_invalidates_the_cached_statistics(tmp_path, extractor):
    """The same names and count: only the rewritten file's size and mtime tell the content changed."""
    images = smooth_images(2, seed=55)
    target = save_folder(tmp_path / "target", images)
    kw = dict(image_size=SIZE, cache_dir=tmp_path / "cache", batch_size=2)
    built, info = cached_reference_stats(target, extractor, **kw)
    save_folder(target, add_noise(images[:1], 30.0, seed=6), names=["img000"])
    os.utime(target / "img000.png", ns=(1, 1))  # a different mtime even on a coarse clock
    rebuilt, info2 = cached_reference_stats(target, extractor, **kw)
    assert not info2.hit and info2.path != info.path and not torch.equal(rebuilt.mean, built.mean)


def test_statistics_cached_with_other_inception_weights_are_not_reused(tmp_path, extractor):
    target = save_folder(tmp_path / "target", smooth_images(2, seed=56))
    kw = dict(image_size=SIZE, cache_dir=tmp_path / "cache", batch_size=2)
    built, info = cached_reference_stats(target, extractor, **kw)
    other = InceptionFeatureExtractor(write_random_inception_weights(tmp_path / "other.pth", seed=1))
    again, info2 = cached_reference_stats(target, other, **kw)
    assert not info2.hit and info2.path != info.path and not torch.equal(again.mean, built.mean)
    assert info2.meta["inception_sha256"] == other.sha256 != extractor.sha256


# --- distributed: 2 processes give the 1-process result ------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, args: dict, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        extractor = InceptionFeatureExtractor(args.pop("weights"))
        # the target statistics, computed sharded over the 2 processes and cached by rank 0 ...
        stats, info = cached_reference_stats(
            args["target"],
            extractor,
            image_size=args["image_size"],
            cache_dir=args["cache_dir"],
            batch_size=args["batch_size"],
        )
        assert not info.hit and (stats is None) == (rank != 0)
        # ... then loaded from the cache by rank 0 only
        result = evaluate_translation(**args, extractor=extractor)
        write_metrics(Path(out_dir) / f"rank{rank}.json", result)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, weights_file):
    refs = smooth_images(4, seed=20)
    outputs = save_folder(
        tmp_path / "outputs", add_noise(refs, 30.0, seed=21), [f"r{i}_s0" for i in range(4)]
    )
    references = save_folder(tmp_path / "refs", refs, [f"r{i}" for i in range(4)])
    target = save_folder(tmp_path / "target", smooth_images(5, seed=22))
    common = dict(
        outputs=str(outputs),
        references=str(references),
        target=str(target),
        factor=4,
        image_size=SIZE,
        batch_size=2,
        device="cpu",
    )

    torch.multiprocessing.spawn(
        _ddp_worker,
        args=(
            2,
            free_port(),
            {**common, "weights": str(weights_file), "cache_dir": str(tmp_path / "c2")},
            str(tmp_path),
        ),
        nprocs=2,
    )
    # the one-process reference, through the CLI
    argv = ["--outputs", str(outputs), "--target", str(target), "--references", str(references)]
    argv += ["--factor", "4", "--image_size", str(SIZE), "--batch_size", "2", "--device", "cpu"]
    argv += ["--cache_dir", str(tmp_path / "c1"), "--inception_weights", str(weights_file)]
    assert cli_main([*argv, "--metrics_json", str(tmp_path / "single.json")]) == 0
    single = json.loads((tmp_path / "single.json").read_text())
    assert single["num_outputs"] == 4 and single["num_target"] == 5 and single["num_pairs"] == 4
    multi = json.loads((tmp_path / "rank0.json").read_text())
    assert multi["target_stats_cache_hit"] is True
    assert multi["num_target"] == 5  # cached statistics counted once, not once per process
    for key in ("fid", "kid_mean", "ssim", "psnr", "l2", "ssim_lowpass", "psnr_lowpass"):
        assert multi[key] == pytest.approx(single[key], rel=1e-6, abs=1e-12), key
    other = json.loads((tmp_path / "rank1.json").read_text())
    assert other["fid"] == pytest.approx(multi["fid"], rel=1e-12)
    # the statistics gathered from 2 shards are those of 1 process
    (two,), (one,) = (list((tmp_path / c).glob("*.npz")) for c in ("c2", "c1"))
    (s2, _), (s1, _) = load_stats(two), load_stats(one)
    assert s2.count == s1.count == 5
    # (equal up to float32 convolution round-off: the shards are batched and threaded differently)
    assert (s2.mean - s1.mean).abs().max() < 1e-6 * s1.mean.abs().max()
    assert (s2.cov - s1.cov).abs().max() < 1e-5 * s1.cov.abs().max()


# --- faithfulness ----------------------------------------------------------------------------------


def test_ssim_psnr_of_an_image_with_itself():
    x = smooth_images(3, seed=30)
    metrics = FaithfulnessMetrics(SIZE, factor=4)
    metrics.update(x, x.clone())
    out = metrics.compute()
    assert out["ssim"] == pytest.approx(1.0, abs=1e-12) and out["ssim_lowpass"] == pytest.approx(
        1.0, abs=1e-12
    )
    assert out["psnr"] == PSNR_CAP_DB and out["psnr_lowpass"] == PSNR_CAP_DB
    assert out["l2"] == 0.0


def test_psnr_ssim_l2_definitions():
    from skimage.metrics import structural_similarity

    x = smooth_images(2, seed=31, size=256)  # SSIM's border handling differs between libraries: 256 px
    y = add_noise(x, 20.0, seed=32)
    metrics = FaithfulnessMetrics()
    metrics.update(x, y)
    out = metrics.compute()
    a, b = x.double() / 255, y.double() / 255
    psnr = (10 * torch.log10(1.0 / (a - b).square().flatten(1).mean(1))).mean()
    assert out["psnr"] == pytest.approx(float(psnr), rel=1e-6)  # torchmetrics: 10 / ln(10) in float32
    assert out["l2"] == pytest.approx(float((a - b).flatten(1).norm(dim=1).mean()), rel=1e-9)  # EGSDE's L2
    ssim_sk = np.mean(
        [
            structural_similarity(
                a[i].numpy(),
                b[i].numpy(),
                channel_axis=0,
                data_range=1.0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for i in range(2)
        ]
    )
    assert out["ssim"] == pytest.approx(ssim_sk, abs=3e-3)


def test_lowpass_metrics_use_the_ilvr_operator():
    """y = x + h with h invisible to down_N (D h D^T = 0): identical after ILVR's phi_N only."""
    factor = 4
    x = to_float(smooth_images(2, seed=33)).double()
    lowpass = LowPass(SIZE, factor, dtype=torch.float64)
    d = lowpass.down_matrix
    null = torch.eye(SIZE, dtype=torch.float64) - torch.linalg.pinv(d) @ d  # projector onto ker(D)
    g = torch.Generator().manual_seed(34)
    h = null @ (0.2 * torch.randn(2, 3, SIZE, SIZE, generator=g, dtype=torch.float64)) @ null.T
    assert (lowpass(h)).abs().max() < 1e-12
    metrics = FaithfulnessMetrics(SIZE, factor=factor)
    metrics.update(x + h, x)
    out = metrics.compute()
    assert out["psnr"] < 40 and out["ssim"] < 0.99
    assert out["psnr_lowpass"] == PSNR_CAP_DB and out["ssim_lowpass"] == pytest.approx(1.0, abs=1e-9)
    assert torch.equal(metrics.lowpass.down_matrix, lowpass.down_matrix)
    assert torch.equal(metrics.lowpass.up_matrix, lowpass.up_matrix)


def test_pairing_and_explicit_pairs(tmp_path):
    assert pair_by_name(["a_s0", "a_s1", "b_N8_s0", "c"], ["a", "b", "c"]) == [(0, 0), (1, 0), (2, 1), (3, 2)]
    with pytest.raises(ValueError, match="zz_s0"):
        pair_by_name(["zz_s0"], ["a"])
    refs = smooth_images(3, seed=40)
    outs = add_noise(refs, 10.0, seed=41)
    out_dir = save_folder(tmp_path / "out", outs, [f"x{i}_s0" for i in range(3)])
    ref_dir = save_folder(tmp_path / "ref", refs, [f"x{i}" for i in range(3)])
    by_folder = evaluate_translation(out_dir, references=ref_dir, factor=4, device="cpu")
    pairs = [(out_dir / f"x{i}_s0.png", to_float(refs[i])) for i in range(3)]  # the lead's mapping form
    by_pairs = evaluate_translation(pairs=pairs, factor=4, image_size=SIZE, device="cpu")
    assert by_folder["num_pairs"] == by_pairs["num_pairs"] == 3
    for key in ("ssim", "psnr", "l2", "ssim_lowpass", "psnr_lowpass"):
        assert by_pairs[key] == pytest.approx(by_folder[key], rel=1e-12), key


def test_no_pairs_and_a_batch_size_below_one_are_named(tmp_path):
    with pytest.raises(ValueError, match="pairs: expected at least one"):
        evaluate_translation(pairs=[], device="cpu")
    pairs = [(to_float(image), to_float(image)) for image in smooth_images(2, seed=42)]
    for batch_size in (0, -1, 2.0):
        with pytest.raises(ValueError, match=rf"batch_size: expected an int >= 1, got {batch_size}"):
            evaluate_translation(pairs=pairs, batch_size=batch_size, device="cpu")


def test_progress_counts_every_image_once_and_is_off_by_default(tmp_path, weights_file, caplog):
    """Log lines (stderr is no terminal here) per stage, ending at N/N; the library is quiet unless
    asked, the command line shows it by default."""
    outputs = save_folder(tmp_path / "outputs", smooth_images(5, seed=1))
    target = save_folder(tmp_path / "target", smooth_images(7, seed=2))
    pairs = [(to_float(image), to_float(image)) for image in smooth_images(3, seed=3)]
    options = dict(inception_weights=weights_file, batch_size=2, device="cpu")

    def lines(**more) -> list[str]:  # a cache of its own: the target's statistics computed each time
        caplog.clear()
        options["cache_dir"] = tmp_path / f"cache{len(more)}"
        with caplog.at_level("INFO", logger="ilvr_toolkit"):
            evaluate_translation(outputs, target=target, kid=False, **options, **more)
            evaluate_translation(pairs=pairs, **options, **more)
        return [r.getMessage() for r in caplog.records if r.name == "ilvr_toolkit"]

    assert lines() == []
    shown = lines(progress=True)
    for stage, total in ((f"FID statistics of {target}", 7), ("FID features of the outputs", 5)):
        mine = [line for line in shown if line.startswith(stage + " ")]
        assert mine[0].startswith(f"{stage} 2/{total} ") and mine[-1].startswith(f"{stage} {total}/{total} ")
    assert [line.split(" (")[0] for line in shown if line.startswith("SSIM")][-1] == "SSIM/PSNR pairs 3/3"
    assert build_parser().get_defaults().progress is True


def test_write_metrics_and_table(tmp_path):
    metrics = {
        "fid": 74.371,
        "kid_mean": 0.0123,
        "kid_std": 0.0004,
        "ssim": 0.5,
        "psnr": float("inf"),
        "num_outputs": 500,
        "num_target": 500,
        "kid_subsets": 100,
        "kid_subset_size": 500,
        "inception_official": False,
    }
    path = write_metrics(tmp_path / "run" / "metrics.json", metrics)
    loaded = json.loads(path.read_text())
    assert loaded["fid"] == 74.371 and loaded["psnr"] is None
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left
    table = format_table(metrics, published={"fid": 74.37})
    assert "| FID" in table and "74.37" in table and "12.30 ± 0.40" in table and "not comparable" in table
    kept = format_table({"ssim": 0.5, "ssim_kept": 1.0, "psnr_kept": 100.0})  # a task's P(x_0) vs P(y)
    assert "| SSIM of P(x_0), P(y) | 1.0000 |" in kept and "| PSNR of P(x_0), P(y) (dB) | 100.00 |" in kept


def test_to_uint8_rounds_floats_and_passes_uint8_through():
    from ilvr_toolkit.images import to_uint8

    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert to_uint8(x) is x and torch.equal(to_uint8(to_float(x)), x)


@pytest.mark.parametrize("name", ["afhq_cat2dog", "afhq_wild2dog", "celebahq_male2female"])
def test_protocol_configs(name):
    import yaml

    from ilvr_toolkit.sampling.config import ILVRSpec, ModelSpec, OutputSpec, SamplerSpec

    config = yaml.safe_load(
        (Path(__file__).parents[1] / "configs" / "protocols" / f"{name}.yaml").read_text()
    )
    published = config.pop("published")
    assert (
        published["fid"]
        == {"afhq_cat2dog": 74.37, "afhq_wild2dog": 75.33, "celebahq_male2female": 46.12}[name]
    )
    ModelSpec(**config.pop("model"))
    ilvr = ILVRSpec(**config.pop("ilvr"))
    assert ilvr.factors == [32] and ilvr.range_t == 20
    assert SamplerSpec(**config.pop("sampler")).respacing == "100"
    OutputSpec(**config.pop("output"))
    assert config["references"] and config["evaluate_against"]


# --- the command's options, checked before any work ----------------------------------------------


def _cli_error(args: list[str], capsys) -> tuple[int, str]:
    code = cli_main(args)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m ilvr_toolkit.evaluation: error: "), err
    return code, err


def test_metrics_json_never_replaces_what_is_not_a_metrics_file(tmp_path, monkeypatch, capsys):
    """An image, a FIFO (a special file), a symlink to an image: refused up front, left as they were;
    a symlink to a metrics file: its target is written, the link stays; a failed final write names the file."""
    outs = save_folder(tmp_path / "out", smooth_images(2, seed=50, size=16), ["a_s0", "b_s0"])
    refs = save_folder(tmp_path / "ref", smooth_images(2, seed=51, size=16), ["a", "b"])
    args = ["--outputs", str(outs), "--references", str(refs), "--device", "cpu", "--metrics_json"]
    image, fifo, link = outs / "a_s0.png", tmp_path / "fifo", tmp_path / "link.json"
    os.mkfifo(fifo)
    (tmp_path / "png_link.json").symlink_to(image)
    before = image.read_bytes()
    for path in (image, fifo, tmp_path / "png_link.json"):
        code, err = _cli_error([*args, str(path)], capsys)
        assert code == 2 and f"--metrics_json {path}: exists and is not a metrics file" in err
    assert image.read_bytes() == before and fifo.is_fifo() and (tmp_path / "png_link.json").is_symlink()
    with pytest.raises(OSError, match="not a regular file"):  # the writer itself never replaces one
        write_metrics(fifo, {"fid": 1.0})
    assert fifo.is_fifo()
    (tmp_path / "manifest.json").write_text('{"num_images": 2, "images": {}}\n')  # JSON, not metrics
    code, err = _cli_error([*args, str(tmp_path / "manifest.json")], capsys)
    assert code == 2 and "manifest.json: exists and is not a metrics file" in err
    (tmp_path / "empty.json").touch()  # nothing to lose
    assert cli_main([*args, str(tmp_path / "empty.json")]) == 0
    (tmp_path / "old.json").write_text('{"fid": 1.0, "num_outputs": 2}\n')
    link.symlink_to(tmp_path / "old.json")
    assert cli_main([*args, str(link)]) == 0
    assert link.is_symlink() and json.loads((tmp_path / "old.json").read_text())["num_pairs"] == 2
    real_open = os.open
    monkeypatch.setattr(
        os, "open", lambda p, *a: real_open("/nonexistent/x", *a) if ".tmp" in str(p) else real_open(p, *a)
    )
    code, err = _cli_error([*args, str(tmp_path / "new.json")], capsys)
    assert code == 1 and f"--metrics_json {tmp_path / 'new.json'}: cannot write:" in err and ".tmp" not in err


def test_options_are_checked_before_any_work(tmp_path, weights_file, monkeypatch, capsys):
    """--factor, --references that do not pair, an .npz --target, a folder --inception_weights, a
    --cache_dir that cannot be written, a wrong-hash default Inception file: one line naming each."""
    outs = save_folder(tmp_path / "out", smooth_images(2, seed=52, size=16), ["a_s0", "b_s0"])
    others = save_folder(tmp_path / "others", smooth_images(2, seed=53, size=16), ["x", "y"])
    (tmp_path / "stats.npz").write_bytes(b"PK")
    (tmp_path / "file").write_text("x")
    base = ["--outputs", str(outs), "--device", "cpu", "--inception_weights", str(weights_file)]
    cases = [
        (["--references", str(outs), "--factor", "5"], "--factor 5: expected a divisor of the image size 16"),
        (
            ["--references", str(others)],
            f"--references {others}: no reference found for 2 outputs: a_s0, b_s0;",
        ),
        (["--target", str(tmp_path / "stats.npz")], "stats.npz: a statistics file; give the target images"),
        (
            ["--target", str(outs), "--inception_weights", str(tmp_path)],
            "is a folder, expected the .pth file",
        ),
        (["--target", str(outs), "--cache_dir", str(tmp_path / "file")], "--cache_dir"),
        (["--target", str(outs), "--cache_dir", str(tmp_path / "file" / "sub")], "--cache_dir"),
    ]
    for extra, words in cases:
        code, err = _cli_error([*base, *extra], capsys)
        assert code == 2 and words in err, err
    assert "<stem>_N<N>_s<k> pairs with the reference <stem>" in _cli_error([*base, *cases[1][0]], capsys)[1]
    wrong = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes(b"not the released file")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, err = _cli_error(["--outputs", str(outs), "--target", str(outs), "--device", "cpu"], capsys)
    assert code == 1 and "replace it with the released file from https://" in err
    assert f"or pass --inception_weights {wrong} to use it anyway" in err


def test_a_damaged_statistics_cache_is_recomputed(tmp_path, extractor):
    """Wrong shapes, a count that is not the set's, NaN: recomputed, the reason recorded."""
    target = save_folder(tmp_path / "target", smooth_images(2, seed=54))
    kw = dict(image_size=SIZE, cache_dir=tmp_path / "cache", batch_size=2)
    good, info = cached_reference_stats(target, extractor, **kw)
    with np.load(info.path) as z:
        saved = dict(z)
    damaged = [
        dict(mu=np.zeros(10), sigma=np.eye(10), features=np.zeros((2, 10), np.float32)),
        dict(count=np.asarray(5)),
        dict(mu=np.where(np.arange(len(saved["mu"])) == 0, np.nan, saved["mu"])),
    ]
    for change in damaged:
        with open(info.path, "wb") as f:
            np.savez(f, **{**saved, **change})
        again, info2 = cached_reference_stats(target, extractor, **kw)
        assert not info2.hit and info2.reason.startswith("damaged cache file"), info2.reason
        assert torch.allclose(again.mean, good.mean) and torch.isfinite(again.cov).all()
