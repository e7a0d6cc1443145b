"""sample.py end to end on the fixture model: outputs, batch/process invariance, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torchrun
from PIL import Image

from ilvr_toolkit.sampling import SampleConfig, plan_items, run, shard_range
from ilvr_toolkit.sampling.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(40, 32), (64, 64), (100, 37), (32, 90), (300, 200)]


def _make_refs(folder: Path, count: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"ref{i:02d}.png")
    return folder


def _args(checkpoint: Path, refs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model.checkpoint",
        str(checkpoint),
        "--model.preset",
        "tiny32",
        "--references",
        str(refs),
        "--sampler.respacing",
        "8",
        "--device",
        "cpu",
        "--output.dir",
        str(out),
        "--progress",
        "false",
        *extra,
    ]


def _pngs(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("ref*_s*.png"))}


def _pngs_any(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*_s*.png"))}


def _assert_same_images(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Identical, or (batch-size-dependent kernels) at most 1 grey level on <= 0.1% of pixels."""
    assert a.keys() == b.keys()
    for name in a:
        diff = np.abs(a[name].astype(int) - b[name].astype(int))
        assert diff.max() <= 1, name
        assert (diff > 0).mean() <= 1e-3, name


@pytest.fixture()
def refs(tmp_path):
    return _make_refs(tmp_path / "refs")


@pytest.fixture()
def tiny32_path(reference_dir):
    return reference_dir / "tiny32.pt"


def test_sample_py_end_to_end(tmp_path, refs, tiny32_path):
    (refs / "broken.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    args = _args(
        tiny32_path, refs, out, "--samples_per_reference", "2", "--ilvr.factor", "4", "--batch_size", "4"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("ref*_s*.png"))) == 10
    assert {p.name for p in out.glob("ref00_s*.png")} == {"ref00_s0.png", "ref00_s1.png"}
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 4 * 32 and grid.size[1] > 5 * 32
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 10
    assert manifest["checkpoint"]["sha256"] and manifest["config"]["ilvr"]["factor"] == 4
    assert "broken" in manifest["failed_references"]
    assert all("seed" in v and "seconds" in v for v in manifest["images"].values())
    assert "broken" in proc.stdout and "grid" in proc.stdout


def test_same_noise_and_images_for_batch_size_1_and_3(tmp_path, refs, tiny32_path, monkeypatch):
    import ilvr_toolkit.sampling.generate as generate

    draws: dict[int, list[torch.Tensor]] = {}

    class Recording(generate.PerImageNoise):
        def __call__(self, shape, device, dtype):
            noise = super().__call__(shape, device, dtype)
            for g, row in zip(self.generators, noise, strict=True):
                draws.setdefault(g.initial_seed(), []).append(row.clone())
            return noise

    monkeypatch.setattr(generate, "PerImageNoise", Recording)
    results = {}
    for batch in (1, 3):
        draws.clear()
        run(parse_config(_args(tiny32_path, refs, tmp_path / f"b{batch}", "--batch_size", str(batch))))
        results[batch] = ({k: torch.stack(v) for k, v in draws.items()}, _pngs(tmp_path / f"b{batch}"))
    noise1, noise3 = results[1][0], results[3][0]
    assert noise1.keys() == noise3.keys() and len(noise1) == 5
    for seed in noise1:
        assert torch.equal(noise1[seed], noise3[seed])
    a, b = results[1][1], results[3][1]
    print(f"batch 1 vs 3: {sum(np.array_equal(a[k], b[k]) for k in a)}/{len(a)} PNGs bit-identical")
    _assert_same_images(a, b)


def test_fast_settings_close_to_fp32(tmp_path, refs, tiny32_path, monkeypatch):
    """bf16 + channels_last + native GroupNorm (+ the tuned CPU allocator, on by default)
    through sample.py's options: every GroupNorm runs natively, and the PNGs stay within a
    few grey levels of the fp32 run (bf16 keeps 8 bits of mantissa)."""
    import ilvr_toolkit.models.unet as unet_module

    native_calls = []
    original = unet_module.GroupNorm32.forward

    def spy(self, x):
        native_calls.append(self.native)
        return original(self, x)

    run(parse_config(_args(tiny32_path, refs, tmp_path / "fp32", "--cpu_malloc", "default")))
    monkeypatch.setattr(unet_module.GroupNorm32, "forward", spy)
    fast = _args(
        tiny32_path,
        refs,
        tmp_path / "fast",
        "--precision",
        "bf16",
        "--channels_last",
        "true",
        "--native_groupnorm",
        "true",
    )
    run(parse_config(fast))
    assert native_calls and all(native_calls)
    manifest = json.loads((tmp_path / "fast" / "manifest.json").read_text())
    assert manifest["config"]["native_groupnorm"] and manifest["config"]["cpu_malloc"] == "tuned"
    assert manifest["unet"]["native_groupnorm"]  # the model as it ran
    a, b = _pngs(tmp_path / "fp32"), _pngs(tmp_path / "fast")
    assert a.keys() == b.keys() and len(a) == 5
    diffs = [np.abs(a[k].astype(int) - b[k].astype(int)) for k in a]
    mean, worst = float(np.mean([d.mean() for d in diffs])), max(int(d.max()) for d in diffs)
    print(f"bf16 fast settings vs fp32: mean |diff| {mean:.3f} grey levels, max {worst}")
    assert mean <= 2.0


def test_two_processes_equal_one(tmp_path, refs, tiny32_path):
    single, double = tmp_path / "single", tmp_path / "double"
    run(parse_config(_args(tiny32_path, refs, single, "--batch_size", "2")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun(str(ROOT / "sample.py"), *_args(tiny32_path, refs, double, "--batch_size", "2"))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _pngs(single), _pngs(double)
    identical = sum(np.array_equal(a[k], b[k]) for k in a)
    print(f"1 vs 2 processes: {identical}/{len(a)} PNGs bit-identical")
    _assert_same_images(a, b)
    manifest = json.loads((double / "manifest.json").read_text())
    assert {v["rank"] for v in manifest["images"].values()} == {0, 1}


def test_kill_and_resume(tmp_path, tiny32_path):
    refs = _make_refs(tmp_path / "refs", count=12)
    out, full = tmp_path / "out", tmp_path / "full"
    args = _args(
        tiny32_path, refs, out, "--batch_size", "1", "--sampler.respacing", "25", "--output.grid", "false"
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "sample.py"), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while len(list(out.glob("ref*_s*.png"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("ref*_s*.png")}
    assert 3 <= len(before) < 12, "the run must be killed mid-way"
    result = run(parse_config(args))
    assert sorted(result.written) == sorted(
        f"ref{i:02d}_s0.png" for i in range(12) if f"ref{i:02d}_s0.png" not in before
    )
    assert result.skipped_existing == len(before)
    for name, mtime in before.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was computed again"
    assert not list(out.glob(".*.tmp"))
    for png in out.glob("ref*_s*.png"):
        Image.open(png).load()  # none truncated
    run(
        parse_config(
            _args(
                tiny32_path,
                refs,
                full,
                "--batch_size",
                "4",
                "--sampler.respacing",
                "25",
                "--output.grid",
                "false",
            )
        )
    )
    _assert_same_images(_pngs(out), _pngs(full))


def test_background_io_same_outputs_as_inline(tmp_path, refs, tiny32_path):
    """Worker threads for references and PNGs (default 4) write the same files and manifest
    entries as doing it all in the main thread (io_workers 0), with a corrupt reference in
    the mix (reported by a worker thread)."""
    (refs / "ref99_broken.png").write_bytes(b"\x89PNG truncated")
    results, manifests = {}, {}
    for workers in (0, 4):
        out = tmp_path / f"io{workers}"
        results[workers] = run(
            parse_config(_args(tiny32_path, refs, out, "--batch_size", "2", "--io_workers", str(workers)))
        )
        manifests[workers] = json.loads((out / "manifest.json").read_text())
    assert sorted(results[0].written) == sorted(results[4].written) and len(results[0].written) == 5
    a, b = _pngs(tmp_path / "io0"), _pngs(tmp_path / "io4")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same process, same kernels: bit-identical

    def entries(manifest):
        return {k: {f: v for f, v in e.items() if f != "seconds"} for k, e in manifest["images"].items()}

    assert entries(manifests[0]) == entries(manifests[4])
    assert (
        manifests[0]["failed_references"].keys()
        == manifests[4]["failed_references"].keys()
        == {"ref99_broken"}
    )


def test_background_io_with_lmdb_references(tmp_path, refs, tiny32_path):
    """References read from an LMDB by worker threads (read-only environment shared by the
    threads): the same PNGs as reading them in the main thread."""
    from ilvr_toolkit.data import build_lmdb

    lmdb = tmp_path / "refs.lmdb"
    build_lmdb(refs, lmdb, [32], workers=0, progress=False)
    for workers in (0, 4):
        result = run(
            parse_config(
                _args(
                    tiny32_path,
                    lmdb,
                    tmp_path / f"lmdb{workers}",
                    "--batch_size",
                    "2",
                    "--io_workers",
                    str(workers),
                    "--output.grid",
                    "false",
                )
            )
        )
        assert len(result.written) == 5 and not result.failed_references
    a, b = (_pngs_any(tmp_path / f"lmdb{w}") for w in (0, 4))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_failed_png_write_stops_the_run_and_loses_nothing(tmp_path, refs, tiny32_path, monkeypatch):
    """A write error in a worker thread (disk full, say) ends the run with that error; the
    PNGs written before it stay, the manifest lists only PNGs that exist, and a rerun
    finishes the set."""
    import ilvr_toolkit.sampling.runner as runner

    out = tmp_path / "out"
    args = _args(tiny32_path, refs, out, "--batch_size", "2", "--io_workers", "2", "--output.grid", "false")
    original = runner.save_png

    def failing(path, image):
        if Path(path).name == "ref02_s0.png":
            raise OSError(28, "No space left on device")
        original(path, image)

    monkeypatch.setattr(runner, "save_png", failing)
    with pytest.raises(OSError, match="No space left"):
        run(parse_config(args))
    written = {p.name for p in out.glob("ref*_s*.png")}
    assert {"ref00_s0.png", "ref01_s0.png"} <= written and not {"ref02_s0.png", "ref04_s0.png"} & written
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(runner, "save_png", original)
    result = run(parse_config(args))
    assert "ref02_s0.png" in result.written and result.skipped_existing == len(written)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["images"]) == [f"ref{i:02d}_s0.png" for i in range(5)]


def test_manifest_part_files_stay_bounded_and_resume(tmp_path, refs, tiny32_path, monkeypatch):
    """A part was one file rewritten whole after every batch (70k images: 1.7 s a save): now its
    file takes PART_LIMIT entries, then the next begins, so a save writes at most a batch more.
    A run killed between a save and its PNGs resumes; the merge and recorded_images read every
    file, an image saved again by the rerun with its later entry."""
    import ilvr_toolkit.sampling.manifest as manifest
    import ilvr_toolkit.sampling.runner as runner

    (refs / "zz_broken.jpg").write_bytes(b"not an image")
    monkeypatch.setattr(manifest, "PART_LIMIT", 2, raising=False)
    saved, write_json, save_png = [], manifest.write_json, runner.save_png

    def counting(path, data):
        if Path(path).parent.name == manifest.PARTS_DIR:
            saved.append(len(data["images"]) + len(data["failed"]))
        write_json(path, data)

    def failing(path, image):  # a kill after ref01's entry was saved, before its PNG
        if Path(path).name == "ref01_s0.png":
            raise OSError(28, "No space left on device")
        save_png(path, image)

    monkeypatch.setattr(manifest, "write_json", counting)
    monkeypatch.setattr(runner, "save_png", failing)
    out = tmp_path / "out"
    args = _args(tiny32_path, refs, out, "--io_workers", "0", "--output.grid", "false")
    with pytest.raises(OSError, match="No space left"):
        run(parse_config([*args, "--batch_size", "1"]))
    monkeypatch.setattr(runner, "save_png", save_png)
    result = run(parse_config([*args, "--batch_size", "2"]))
    assert sorted(result.written) == [f"ref{i:02d}_s0.png" for i in range(1, 5)] and max(saved) <= 2
    parts = sorted(p.name for p in (out / manifest.PARTS_DIR).glob("shard*.json"))
    assert parts == [f"shard0-rank0{n}.json" for n in (".1", ".2", ".3", "")], parts
    merged = json.loads((out / "manifest.json").read_text())
    assert sorted(merged["images"]) == [f"ref{i:02d}_s0.png" for i in range(5)]
    assert merged["images"]["ref01_s0.png"]["batch_size"] == 2 and list(merged["failed_references"]) == [
        "zz_broken"
    ]
    assert dict(manifest.recorded_images(out)) == merged["images"]
    again = run(parse_config([*args, "--batch_size", "2"]))  # a finished run's rerun reads every file
    assert not again.written and again.skipped_existing == 5
    assert sorted(p.name for p in (out / manifest.PARTS_DIR).glob("shard*.json")) == parts


def test_background_io_unit():
    from ilvr_toolkit.sampling.background import BackgroundIO

    done = []
    with BackgroundIO(0) as io:  # inline
        io.write(done.append, 1)
        assert done == [1]
        assert io.prefetch(lambda i: i * 2, [1, 2])() == [2, 4]
    with pytest.raises(ValueError, match="boom"), BackgroundIO(2) as io:
        io.write(time.sleep, 0.05)
        io.write(lambda: (_ for _ in ()).throw(ValueError("boom")))
        assert io.prefetch(lambda i: i + 1, [1, 2, 3])() == [2, 3, 4]
    with pytest.raises(ValueError, match="io_workers"):
        BackgroundIO(-1)
    with BackgroundIO(2) as io:  # check(): a finished failure raises at once, without waiting
        io.write(lambda: (_ for _ in ()).throw(OSError("disk full")))
        time.sleep(0.2)
        with pytest.raises(OSError, match="disk full"):
            io.check()
        io.check()  # reported once


def test_fewer_references_than_batch_unconditional_and_lmdb(tmp_path, refs, tiny32_path):
    out = tmp_path / "few"
    result = run(parse_config(_args(tiny32_path, refs, out, "--batch_size", "16", "--ilvr.factor", "[4, 8]")))
    assert len(result.written) == 10 and (out / "ref00_N8_s0.png").exists()
    uncond = run(
        parse_config(
            [
                "--model.checkpoint",
                str(tiny32_path),
                "--model.preset",
                "tiny32",
                "--unconditional",
                "true",
                "--num_samples",
                "3",
                "--sampler.method",
                "ddim",
                "--sampler.respacing",
                "5",
                "--output.dir",
                str(tmp_path / "uncond"),
                "--progress",
                "false",
                "--device",
                "cpu",
            ]
        )
    )
    assert sorted(uncond.written) == ["000000_s0.png", "000001_s0.png", "000002_s0.png"]


def test_errors_are_named(tmp_path, refs, tiny32_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        run(parse_config(_args(tmp_path / "missing.pt", refs, tmp_path / "o")))
    with pytest.raises(ValueError, match="learn_sigma"):
        cfg = parse_config(_args(tiny32_path, refs, tmp_path / "o"))
        cfg.model.preset = None
        from ilvr_toolkit.models import get_preset, save_model_file
        from ilvr_toolkit.models.checkpoint import load_state_dict_file

        wrong = get_preset("tiny32").replace(learn_sigma=False)
        sd = load_state_dict_file(tiny32_path)
        save_model_file(tmp_path / "wrong.pt", wrong, sd)  # refused: the weights have 6 channels
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="(?i)no .*image|empty"):
        run(parse_config(_args(tiny32_path, empty, tmp_path / "o2")))


def test_shards_partition_references():
    covered = [i for s in range(3) for i in shard_range(10, s, 3)]
    assert covered == list(range(10))
    items = plan_items(["a", "b"], samples_per_reference=2, factors=[4], run_seed=0)
    assert [i.filename for i in items] == ["a_s0.png", "a_s1.png", "b_s0.png", "b_s1.png"]
    assert items[0].seed != items[1].seed != items[2].seed


def test_default_config_is_sane():
    assert SampleConfig().ilvr.mode == "paper"


def _sampling_configs() -> list[Path]:
    import yaml

    found = sorted((ROOT / "configs").rglob("*.yaml"))
    return [p for p in found if "trainer" not in (yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("path", _sampling_configs(), ids=lambda p: p.name)
def test_every_sampling_config_parses(path):
    from ilvr_toolkit.models import get_preset

    config = parse_config(["--config", str(path)])
    assert config.model.checkpoint
    if config.model.preset:
        get_preset(config.model.preset)
    assert all(isinstance(n, int) and n >= 1 for n in config.ilvr.factors)


def test_one_respacing_rule_for_sample_py_and_training_previews() -> None:
    from ilvr_toolkit.diffusion import DiffusionConfig
    from ilvr_toolkit.sampling.config import SamplerSpec
    from ilvr_toolkit.sampling.generate import sampling_diffusion

    plain = DiffusionConfig()  # a training config: no respacing of its own
    assert sampling_diffusion(plain, SamplerSpec()).num_timesteps == 100  # None: 100 steps, not 1000
    assert sampling_diffusion(plain, SamplerSpec(respacing="25")).num_timesteps == 25
    assert sampling_diffusion(plain, SamplerSpec(respacing="")).num_timesteps == 1000
    flagged = plain.replace(timestep_respacing="ddim50")  # a model whose flags say how it samples
    assert sampling_diffusion(flagged, SamplerSpec()).num_timesteps == 50
    assert sampling_diffusion(flagged, SamplerSpec(respacing="10")).num_timesteps == 10


def test_sigterm_outside_a_batch_script_finishes_the_batch_and_exits_non_zero(tmp_path: Path) -> None:
    """A plain ``kill`` (no SLURM batch script to requeue) stops after the current batch, keeps
    every PNG written, and says the run is incomplete: exit 128 + SIGTERM, not 0."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "ILVR_REQUEUE_NOTE"}
    cmd = [sys.executable, str(ROOT / "sample.py"), "--config", str(ROOT / "configs" / "sample_demo.yaml")]
    cmd += [
        "--output.dir",
        str(out),
        "--batch_size",
        "2",
        "--evaluate_against",
        "null",
        "--progress",
        "false",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list(out.glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal 15 after a batch; rerun to resume" in err
    written = list(out.glob("*.png"))
    assert 0 < len(written) < 48 and not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()


@pytest.mark.parametrize(
    ("env", "layout"),
    [
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, (0, 1)),  # a batch script: no step
        (
            {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1"},
            (1, 2),
        ),
        (
            {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "MASTER_PORT": "1"},
            (3, 4),
        ),
        (
            {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4", "RANK": "1", "WORLD_SIZE": "2"},
            (1, 2),
        ),  # torchrun
        ({}, (0, 1)),
    ],
)
def test_ranks_come_from_torchrun_or_the_srun_step(monkeypatch, env, layout):
    """srun tasks split a shard even with MASTER_ADDR exported (the batch scripts do; the tasks
    used to all run it as rank 0); a batch script's own SLURM_PROCID/SLURM_NTASKS are one process."""
    from ilvr_toolkit.sampling.distributed import init_ranks

    for key in [k for k in os.environ if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # no process group in this test
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ranks = init_ranks(torch.device("cpu"))
    assert (ranks.rank, ranks.world_size, ranks.initialised_here) == (*layout, False)


def test_the_merged_manifest_lists_only_outputs_that_exist(tmp_path: Path) -> None:
    """A part saves an entry before its PNG is written (a kill between the two) or lists an
    output deleted since: the merge keeps only entries whose PNG is there, and a reference that
    failed once but has an output now leaves failed_references."""
    from ilvr_toolkit.sampling.manifest import PARTS_DIR, merge_manifest

    (tmp_path / PARTS_DIR).mkdir()
    entries = {name: {"reference": name.split("_")[0], "seconds": 1.0} for name in ("a_s0.png", "b_s0.png")}
    part = {"images": entries, "failed": {"a": "unreadable", "c": "unreadable"}}
    (tmp_path / PARTS_DIR / "shard0-rank0.json").write_text(json.dumps(part))
    (tmp_path / "a_s0.png").write_bytes(b"png")
    manifest = merge_manifest(tmp_path, {"config": {}})
    assert sorted(manifest["images"]) == ["a_s0.png"] and manifest["num_images"] == 1
    assert manifest["failed_references"] == {"c": "unreadable"}
    assert json.loads((tmp_path / "manifest.json").read_text())["images"] == {"a_s0.png": entries["a_s0.png"]}
