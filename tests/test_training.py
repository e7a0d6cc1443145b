"""Training: the tiny config fits (1 process and 2-process DDP on CPU), resume after SIGKILL
and after a SLURM requeue restores exactly what was saved, fine-tuning starts from the given
weights, export round-trips, every shipped config builds, failures are refused cleanly.

Runs that must be killed or use DDP go through ``python train.py`` in a subprocess; the
others run the CLI in-process (faster). The model is a 16x16 UNet with one level (0.18M
parameters) so that a step takes a fraction of a second on a loaded 2-core CPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import free_port
from faultkit import Payload
from PIL import Image

from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.data.prepare import build_lmdb
from ilvr_toolkit.fileio import remove_dead_temps
from ilvr_toolkit.models import CheckpointError, build_unet, get_preset, load_model
from ilvr_toolkit.models.config import UNetConfig
from ilvr_toolkit.training import EMA, find_resume_checkpoint
from ilvr_toolkit.training.checkpointing import atomic_torch_save
from ilvr_toolkit.training.cli import TrainCLI
from ilvr_toolkit.training.cli import main as train_main
from ilvr_toolkit.training.export import export_checkpoint
from ilvr_toolkit.training.export import main as export_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY32 = REPO / "tests" / "fixtures" / "reference" / "tiny32.pt"
SMALL_UNET = json.dumps({"preset": "tiny16", "channel_mult": [1]})


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One intra-op thread: on a shared, loaded CPU, OpenMP threads that wait on each other
    make these tiny convolutions tens of times slower than a single thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lmdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 smooth random images (gradients + blobs) stored at 16 and 32 px."""
    root = tmp_path_factory.mktemp("train_data")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    for i in range(24):
        a, b, c = rng.uniform(-1, 1, 3)
        base = np.stack([a * xx + b * yy, b * xx - c * yy, c * xx + a * yy], -1)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[..., None] * rng.uniform(-1, 1, 3)
        img = np.clip((base + blob + 1) * 127.5, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    out = root / "tiny.lmdb"
    build_lmdb(folder, out, [16, 32], workers=0, progress=False)
    return out


def common_args(lmdb: Path, run_dir: Path, **overrides: Any) -> list[str]:
    settings = {
        "--config": str(CONFIGS / "tiny.yaml"),
        "--data.path": str(lmdb),
        "--trainer.default_root_dir": str(run_dir),
        "--model.unet": SMALL_UNET,
        "--data.batch_size": "4",
        "--data.workers": "0",
        "--trainer.accelerator": "cpu",
        "--trainer.log_every_n_steps": "1",
        "--trainer.enable_progress_bar": "false",
        "--samples.every_n_steps": "0",
        "--ilvr_preview.every_n_steps": "0",
        "--ema.decay": "0.9",
        "--model.optim.warmup_steps": "2",
        "--checkpoint.last_every_n_steps": "2",
    }
    settings.update({f"--{k}": str(v) for k, v in overrides.items()})
    return [x for kv in settings.items() for x in kv]


class Probe(pl.Callback):
    """Records, at the start of training (after any restore), what the run starts from."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        self.ckpt_path = trainer.ckpt_path
        self.global_step = trainer.global_step
        self.raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        saved = {"state_dict": pl_module.state_dict()}
        ema.on_save_checkpoint(trainer, pl_module, saved)  # the stock hook puts the EMA weights there
        self.ema = {k: v.detach().clone() for k, v in saved["state_dict"].items()}
        self.n_averaged = int(saved["averaging_state"]["n_averaged"])
        self.ema_latest_update_step = ema.state_dict()["latest_update_step"]
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())  # live tensors otherwise
        self.lr_schedulers = [
            copy.deepcopy(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs
        ]


def run_inprocess(args: list[str], probe: Probe | None = None) -> TrainCLI:
    defaults = {"callbacks": [probe]} if probe is not None else None
    return TrainCLI(args=["fit", *args], trainer_defaults=defaults)


def train_subprocess(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "fit", *args],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def wait_for_step(path: Path, min_step: int, proc: subprocess.Popen, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if path.is_file():
            ckpt = load_ckpt(path)  # atomic writes: never a partial file
            if ckpt["global_step"] >= min_step:
                return ckpt
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout}s")


def assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ"
    for key in want:
        assert torch.equal(got[key].cpu(), want[key].cpu()), f"{what}: {key} differs"


def assert_restored(probe: Probe, ckpt: dict, path: Path) -> None:
    """The resumed run starts from exactly what ``ckpt`` holds."""
    assert Path(probe.ckpt_path) == path
    assert probe.global_step == ckpt["global_step"] > 0
    assert_same_tensors(probe.raw, ckpt["current_model_state"], "raw weights")
    assert_same_tensors(probe.ema, ckpt["state_dict"], "EMA weights")
    assert probe.n_averaged == int(ckpt["averaging_state"]["n_averaged"])
    assert probe.ema_latest_update_step == ckpt["callbacks"]["EMA"]["latest_update_step"]
    saved_opt = ckpt["optimizer_states"][0]
    assert probe.optimizer["param_groups"] == saved_opt["param_groups"]
    assert set(probe.optimizer["state"]) == set(saved_opt["state"])
    for index, state in saved_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(probe.optimizer["state"][index][name], value), f"optimizer {index}.{name}"
    assert probe.lr_schedulers == ckpt["lr_schedulers"]
    # The raw and EMA weights are distinct states (the test would be vacuous otherwise).
    assert any(not torch.equal(probe.raw[k], probe.ema[k]) for k in probe.raw)


# --------------------------------------------------------------------------- single process
@pytest.fixture(scope="module")
def tiny_run(lmdb_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny_run")
    args = common_args(
        lmdb_path,
        run_dir,
        **{
            "trainer.max_steps": 5,
            "samples.every_n_steps": 4,
            "samples.num_images": 2,
            "samples.sampler.respacing": "ddim3",
            "ilvr_preview.every_n_steps": 4,
            "ilvr_preview.num_images": 2,
            "ilvr_preview.sampler.respacing": "3",
        },
    )
    run_inprocess(args)
    return run_dir


def test_tiny_fit_single_process(tiny_run: Path) -> None:
    last = tiny_run / "checkpoints" / "last.ckpt"
    ckpt = load_ckpt(last)  # weights_only=True: hyperparameters are plain
    assert ckpt["global_step"] == 5  # max_steps is not a multiple of the cadence: saved at the end
    hp = ckpt["hyper_parameters"]
    assert UNetConfig.from_dict(hp["unet"]).channel_mult == (1,)
    assert hp["diffusion"]["learn_sigma"] is True and hp["diffusion"]["steps"] == 1000
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    assert ckpt["ilvr_toolkit"]["ema"]["decay"] == 0.9
    assert (tiny_run / "config.yaml").is_file()
    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 5 and json.loads(
        json.dumps(saved["model"]["unet"])
    ) == json.loads(SMALL_UNET)
    assert (tiny_run / "samples" / "samples_00000004.png").is_file()
    assert (tiny_run / "samples" / "ilvr_00000004.png").is_file()
    assert not list(tiny_run.glob("version_*")) and not list((tiny_run / "tb").glob("version_*"))

    loaded = load_model(last)  # the sampling-side loader reads our checkpoint with no flags
    assert loaded.source_kind == "lightning" and loaded.unet_config.image_size == 16

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/mse", "train/vb", "train/grad_norm", "lr-AdamW", "train/samples"):
        assert tag in tags, (tag, sorted(tags))
    assert any(t.startswith("train/loss_q") for t in tags)
    assert {"samples/ema", "ilvr/preview_ema"} <= set(events.Tags()["images"])


def test_fid_monitor_logs_fid_keeps_its_history_and_names_missing_weights(
    lmdb_path: Path, tmp_path: Path
) -> None:
    """--fid.*: reference statistics once (cached), FID of EMA samples every 2 steps to the
    loggers and RUN/fid.jsonl, the history continued after a resume; a missing Inception
    file stops the run before its first step, naming the file."""
    from random_inception import write_random_inception_weights
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ilvr_toolkit.evaluation import InceptionWeightsMissing

    weights = write_random_inception_weights(tmp_path / "inception_random.pth")
    run_dir, cache = tmp_path / "run", tmp_path / "stats"
    fid_args = {
        "fid.every_n_steps": 2,
        "fid.num_images": 4,
        "fid.batch_size": 4,
        "fid.sampler.respacing": "ddim2",
        "fid.reference.inception_weights": str(weights),
        "fid.reference.stats_cache_dir": str(cache),
    }
    run_inprocess(common_args(lmdb_path, run_dir, **{"trainer.max_steps": 4, **fid_args}))
    history = [json.loads(line) for line in (run_dir / "fid.jsonl").read_text().splitlines()]
    assert [e["step"] for e in history] == [2, 4]
    assert all(math.isfinite(e["fid"]) and e["fid"] > 0 and e["weights"] == "ema" for e in history)
    assert len(list(cache.glob("*.npz"))) == 1
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    assert [s.step for s in events.Scalars("fid/fid")] == [2, 4]
    assert load_ckpt(run_dir / "checkpoints" / "last.ckpt")["ilvr_toolkit"]["fid"]["history"][-1]["step"] == 4

    run_inprocess(common_args(lmdb_path, run_dir, **{"trainer.max_steps": 6, **fid_args}))  # resumes
    history = [json.loads(line) for line in (run_dir / "fid.jsonl").read_text().splitlines()]
    assert [e["step"] for e in history] == [2, 4, 6]

    missing = tmp_path / "nowhere" / "weights-inception-2015-12-05-6726825d.pth"
    fresh = tmp_path / "fresh"
    with pytest.raises(
        InceptionWeightsMissing,
        match="sha256 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    ):
        run_inprocess(
            common_args(
                lmdb_path,
                fresh,
                **{"trainer.max_steps": 2, **fid_args, "fid.reference.inception_weights": str(missing)},
            )
        )
    assert not list(fresh.rglob("*.ckpt"))


def test_export_round_trip_and_rerun_after_finish(tiny_run: Path, lmdb_path: Path) -> None:
    last = tiny_run / "checkpoints" / "last.ckpt"
    ckpt = load_ckpt(last)
    result = export_checkpoint(last)
    assert result["plain"].parent == tiny_run / "export"
    config = UNetConfig.from_dict(ckpt["hyper_parameters"]["unet"])
    plain = torch.load(result["plain"], weights_only=True)
    net = build_unet(config)
    net.load_state_dict(plain, strict=True)
    ema = build_unet(config)
    ema.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items()}, strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(net.eval()(x, t), ema.eval()(x, t))
    described = load_model(result["model_file"])
    assert described.source_kind == "ilvr_toolkit" and described.diffusion["steps"] == 1000
    before = result["model_file"].read_bytes()
    with pytest.raises(UsageError, match=rf"^--name ema_step\d+: {result['plain']} exists; choose another"):
        export_checkpoint(last)  # what is there is kept
    assert result["model_file"].read_bytes() == before
    assert export_checkpoint(last, overwrite=True)["model_file"] == result["model_file"]
    assert_same_tensors(described.model.state_dict(), plain, "self-describing file")

    # The CLI: --output.dir (and the older --out-dir), files as export_checkpoint writes them.
    for flag in ("--output.dir", "--out-dir"):
        out = tiny_run / f"cli{flag.count('.')}"
        assert export_main([str(last), flag, str(out), "--name", "m"]) == 0
        assert_same_tensors(torch.load(out / "m.pt", weights_only=True), plain, f"export {flag}")

    # Rerunning a finished run resumes at max_steps and does nothing.
    probe = Probe()
    run_inprocess(common_args(lmdb_path, tiny_run, **{"trainer.max_steps": 6}), probe)
    assert probe.global_step == 5 and Path(probe.ckpt_path) == last
    assert load_ckpt(last)["global_step"] == 6


# --------------------------------------------------------------------------- DDP
def test_tiny_fit_ddp_two_processes(lmdb_path: Path, tmp_path: Path) -> None:
    """2-process DDP (gloo), with the FID monitor on: its reference statistics are sharded
    over both processes in setup, its evaluation runs on rank 0 alone (no deadlock)."""
    from random_inception import write_random_inception_weights

    weights = write_random_inception_weights(tmp_path / "inception_random.pth")
    run_dir = tmp_path / "run"
    args = common_args(
        lmdb_path,
        run_dir,
        **{
            "trainer.devices": 2,
            "trainer.strategy": "ddp",
            "trainer.max_steps": 3,
            "fid.every_n_steps": 2,
            "fid.num_images": 2,
            "fid.sampler.respacing": "ddim2",
            "fid.reference.inception_weights": str(weights),
            "fid.reference.stats_cache_dir": str(tmp_path / "stats"),
        },
    )
    proc = train_subprocess(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "Starting with 2 processes" in out or "MEMBER: 2/2" in out
    assert "terminate called" not in out  # every rank left the process group and exited cleanly
    ckpt = load_ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    history = [json.loads(line) for line in (run_dir / "fid.jsonl").read_text().splitlines()]
    assert [e["step"] for e in history] == [2] and math.isfinite(history[0]["fid"])


def test_ctrl_c_under_ddp_stops_every_rank_at_one_saved_step(lmdb_path: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals every rank of a 2-process DDP run (gloo): they agree on one
    step, save it and exit 130 (the output pipe closes: no rank hangs in a collective)."""
    args = common_args(lmdb_path, tmp_path, **{"trainer.devices": 2, "trainer.strategy": "ddp"})
    proc = train_subprocess([*args, "--trainer.max_steps", "100000"], start_new_session=True)
    wait_for_step(tmp_path / "checkpoints" / "last.ckpt", 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, hpc = proc.communicate(timeout=120)[0], tmp_path / "hpc_ckpt_1.ckpt"
    assert proc.returncode == 130 and "Traceback" not in out and "terminate called" not in out, out[-3000:]
    step = load_ckpt(hpc)["global_step"]
    assert (
        out.strip().splitlines()[-1].startswith(f"train.py: stopped by signal 2 at step {step} (saved {hpc})")
    )


# --------------------------------------------------------------------------- resume
def test_sigkill_then_rerun_resumes_exactly(lmdb_path: Path, tmp_path: Path) -> None:
    args = common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 1000})
    proc = train_subprocess(args)
    last = tmp_path / "checkpoints" / "last.ckpt"
    wait_for_step(last, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = load_ckpt(last)
    step = saved["global_step"]

    probe = Probe()
    run_inprocess(common_args(lmdb_path, tmp_path, **{"trainer.max_steps": step + 1}), probe)
    assert_restored(probe, saved, last)
    assert load_ckpt(last)["global_step"] == step + 1
    # The restart changed the command (max_steps): the earlier config is kept aside.
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["max_steps"] == step + 1
    assert [
        yaml.safe_load(p.read_text())["trainer"]["max_steps"] for p in tmp_path.glob("config.*.yaml")
    ] == [1000]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stop_signal_outside_slurm_saves_exits_128_plus_signal_and_the_rerun_resumes(
    lmdb_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """No SLURM, no batch script (as under ``timeout``, docker stop, k8s, or Ctrl-C in a terminal,
    which signals the whole process group): SIGTERM or SIGINT saves RUN/hpc_ckpt_1.ckpt at a step
    boundary and exits 128 + signal with one line, so that whatever runs train.py sees an
    unfinished run; a second signal while the first is handled changes nothing; running it
    again resumes from that checkpoint."""
    for key in [k for k in os.environ if k.startswith("SLURM_") or k.startswith("ILVR_")]:
        monkeypatch.delenv(key)
    args = common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 100000})
    proc = train_subprocess(args, start_new_session=True)
    wait_for_step(tmp_path / "checkpoints" / "last.ckpt", 2, proc)
    os.killpg(proc.pid, signum)
    os.killpg(proc.pid, signum)  # the second arrives while the first is pending or being answered
    out, hpc = proc.communicate(timeout=120)[0], tmp_path / "hpc_ckpt_1.ckpt"
    assert proc.returncode == 128 + signum and "Traceback" not in out, out[-3000:]
    assert "KeyboardInterrupt" not in out, out[-3000:]
    step = load_ckpt(hpc)["global_step"]
    assert step >= 2 and out.strip().splitlines()[-1] == (
        f"train.py: stopped by signal {int(signum)} at step {step} (saved {hpc}); rerun the same command to resume"
    )
    rerun = train_subprocess(common_args(lmdb_path, tmp_path, **{"trainer.max_steps": step + 1}))
    out = rerun.communicate(timeout=300)[0]
    # from hpc_ckpt_1.ckpt, or last.ckpt when it was saved at the same step just after (every step here)
    resumed = re.search(r"^resuming from (\S+) ", out, re.MULTILINE)
    assert rerun.returncode == 0 and resumed is not None, out[-3000:]
    assert load_ckpt(Path(resumed.group(1)))["global_step"] >= step, out[-3000:]
    assert load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == step + 1


def test_ctrl_c_during_a_long_preview_stops_it_and_the_run_saves_at_the_next_step(
    lmdb_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a preview samples (a 1000-step grid before the first step: about a minute)
    ends the preview at its next sampling step, not after it; the run saves and exits 130."""
    for key in [k for k in os.environ if k.startswith("SLURM_") or k.startswith("ILVR_")]:
        monkeypatch.delenv(key)
    preview = {"samples.every_n_steps": 1000, "samples.at_start": "true", "samples.num_images": 16}
    preview.update({"samples.sampler.method": "ddpm", "samples.sampler.respacing": "1000"})
    args = common_args(lmdb_path, tmp_path, **preview, **{"trainer.max_steps": 100000})
    proc = train_subprocess(args, start_new_session=True)
    lines = []
    for line in proc.stdout:  # the preview starts just after setup says so
        lines.append(line)
        if line.startswith("pre-emption: on "):
            break
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    assert proc.returncode == 130 and "step 0: samples stopped by a stop signal" in out, out[-3000:]
    assert not (tmp_path / "samples").exists(), "the preview ran to its end"
    assert out.strip().splitlines()[-1].startswith(f"train.py: stopped by signal 2 at step 1 (saved {hpc})")


def test_ctrl_c_before_the_stop_handler_is_set_up_exits_130_with_one_line(
    lmdb_path: Path, tmp_path: Path
) -> None:
    """Ctrl-C inside ``Trainer.fit`` before our handler is set up (here: in ``prepare_data``; under
    DDP, just after the ranks met), which Lightning's own handler answers with sys.exit(1): one
    line and 130, as Ctrl-C at any other moment."""
    patch = (
        "import sys; from ilvr_toolkit.data.datamodule import ImageDataModule as D\n"
        "def prepare_data(self): raise KeyboardInterrupt\n"
        "D.prepare_data = prepare_data; from ilvr_toolkit.training.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 2})
    done = subprocess.run(
        [sys.executable, "-c", patch, "fit", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1] == "train.py: interrupted", done.stderr[-3000:]


def test_devices_that_contradict_the_slurm_tasks_name_the_option(
    lmdb_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``--trainer.devices 2`` in a job of one task per node: Lightning's ValueError was exit 1
    without the option's name."""
    from ilvr_toolkit.training.cli import main

    slurm = {"SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "ilvr-train", "SLURM_NTASKS": "1", "SLURM_NNODES": "1"}
    slurm.update(SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    args = common_args(lmdb_path, tmp_path, **{"trainer.devices": 2, "trainer.max_steps": 1})
    assert main(["fit", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("train.py: error: --trainer.devices 2: You set"), lines[-3:]


def test_finetune_starts_from_released_weights_and_exports_to_preset(lmdb_path: Path, tmp_path: Path) -> None:
    released = torch.load(TINY32, weights_only=True)
    probe = Probe()
    args = common_args(
        lmdb_path,
        tmp_path,
        **{"model.unet": "tiny32", "init_from": str(TINY32), "trainer.max_steps": 1, "data.batch_size": 2},
    )
    run_inprocess(args, probe)
    assert probe.global_step == 0 and probe.ckpt_path is None
    assert_same_tensors({k[6:]: v for k, v in probe.raw.items()}, released, "initial raw weights")
    assert_same_tensors({k[6:]: v for k, v in probe.ema.items()}, released, "initial EMA weights")
    assert probe.optimizer["state"] == {}  # optimizer starts fresh

    ckpt = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["ilvr_toolkit"]["init_from"] == str(TINY32)
    result = export_checkpoint(tmp_path / "checkpoints" / "last.ckpt", out_dir=tmp_path / "export")
    net = build_unet(get_preset("tiny32"))
    net.load_state_dict(torch.load(result["plain"], weights_only=True), strict=True)
    ema = build_unet(get_preset("tiny32"))
    ema.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items()}, strict=True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 500])
    with torch.no_grad():
        assert torch.equal(net.eval()(x, t), ema.eval()(x, t))
    assert load_model(result["plain"], preset="tiny32").source_kind == "plain"


def test_finetune_refuses_a_checkpoint_of_another_architecture(lmdb_path: Path, tmp_path: Path) -> None:
    args = common_args(lmdb_path, tmp_path, **{"model.unet": "tiny", "init_from": str(TINY32)})
    with pytest.raises(CheckpointError, match="channel_mult"):
        TrainCLI(args=args, run=False)


# --------------------------------------------------------------------------- failures
def test_dataset_of_the_wrong_size_is_refused_before_training(lmdb_path: Path, tmp_path: Path) -> None:
    args = common_args(lmdb_path, tmp_path, **{"model.unet": "tiny32", "trainer.max_steps": 1})
    args[args.index("--model.unet") + 1] = json.dumps(
        {"preset": "tiny16", "image_size": 64, "channel_mult": [1]}
    )
    with pytest.raises(ValueError, match="no images of size 64"):
        run_inprocess(args)
    assert not (tmp_path / "checkpoints").exists()


def test_resuming_with_another_model_is_refused_before_anything_is_written(
    lmdb_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_inprocess(common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 2}))
    config = (tmp_path / "config.yaml").read_bytes()
    other = json.dumps({"preset": "tiny16", "channel_mult": [1, 2]})
    args = common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 4, "model.unet": other})
    assert train_main(["fit", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train.py: error: --model.unet: {tmp_path} holds a run of another model (channel_mult [1] vs "
        "[1, 2]); use the run's settings or a new --trainer.default_root_dir"
    )
    assert (tmp_path / "config.yaml").read_bytes() == config and not list(tmp_path.glob("config.*.yaml"))
    assert load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_user_errors_end_in_one_line(lmdb_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """train.py and train.py export: a mistake found after parsing is one line, no traceback."""
    assert export_main([str(tmp_path / "missing.ckpt")]) == 2
    assert (
        capsys.readouterr().err
        == f"train.py export: error: checkpoint {tmp_path / 'missing.ckpt'}: no such file\n"
    )
    args = common_args(lmdb_path, tmp_path / "run", **{"data.path": tmp_path / "nowhere.lmdb"})
    assert train_main(["fit", *args]) == 2  # checked before any work: a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: --data.path ") and "nowhere.lmdb" in err[-1]
    assert not any("Traceback" in line for line in err)


class _NaNAt:
    """Wraps training_losses: the loss becomes NaN from step ``step`` on."""

    def __init__(self, module: Any, step: int) -> None:
        self.module, self.step, self.inner = module, step, module.diffusion.training_losses

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        terms = self.inner(*args, **kwargs)
        if self.module.global_step >= self.step:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


def _nan_cli(lmdb: Path, run_dir: Path, policy: str) -> TrainCLI:
    args = common_args(lmdb, run_dir, **{"trainer.max_steps": 4, "model.nan_policy": policy})
    args += ["--checkpoint.last_every_n_steps", "1"]
    cli = TrainCLI(args=args, run=False)
    cli.model.diffusion.training_losses = _NaNAt(cli.model, 2)
    return cli


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints_finite(
    lmdb_path: Path, tmp_path: Path
) -> None:
    cli = _nan_cli(lmdb_path, tmp_path, "raise")
    with pytest.raises(FloatingPointError, match="non-finite training loss or gradient at global step 2"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    for states in (ckpt["state_dict"], ckpt["current_model_state"]):
        assert all(torch.isfinite(v).all() for v in states.values())
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_nan_policy_skip_drops_the_update(lmdb_path: Path, tmp_path: Path) -> None:
    cli = _nan_cli(lmdb_path, tmp_path, "skip")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4 and cli.model._skipped_steps == 2
    at_2 = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert at_2["global_step"] == 4
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


# --------------------------------------------------------------------------- configs
def _train_configs() -> list[Path]:
    found = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("protocols/*.yaml"))
    return [p for p in found if {"model", "trainer"} <= set(yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("config", _train_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_train_config_instantiates(config: Path, lmdb_path: Path, tmp_path: Path) -> None:
    args = [
        "--config",
        str(config),
        "--data.path",
        str(lmdb_path),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    cli = TrainCLI(args=args, run=False)
    unet = cli.model.unet_config
    assert cli.datamodule.image_size == unet.image_size
    assert sum(p.numel() for p in cli.model.model.parameters()) > 0
    if unet.image_size == 256:  # the released recipe: the reference layout exactly
        manifest = json.loads(
            (REPO / "tests" / "fixtures" / "reference" / "manifest_ffhq256.json").read_text()
        )
        shapes = {k: list(v.shape) for k, v in cli.model.model.state_dict().items()}
        assert shapes == {k: list(v) for k, v in manifest["state_dict"].items()}
        hp = cli.model.hparams
        assert hp.optim["lr"] == 2e-5 and hp.diffusion["p2_gamma"] == 1.0 and hp.diffusion["p2_k"] == 1.0
        assert cli.datamodule.batch_size == 8
        ema = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EMA))
        assert ema.decay == 0.9999


class _LastStepProbe(pl.Callback):
    """Before each step: the global step recorded in last.ckpt (None if absent)."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen.append(load_ckpt(self.path)["global_step"] if self.path.is_file() else None)


def test_time_based_last_checkpoint(lmdb_path: Path, tmp_path: Path) -> None:
    probe = _LastStepProbe(tmp_path / "checkpoints" / "last.ckpt")
    args = common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 4, "checkpoint.last_every_n_steps": 0})
    args += ["--checkpoint.last_every_minutes", "1e-6"]
    TrainCLI(args=["fit", *args], trainer_defaults={"callbacks": [probe]})
    assert probe.seen == [None, 1, 2, 3]
    assert load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_save_top_k_keeps_the_newest_snapshots_and_a_resume_goes_on(lmdb_path: Path, tmp_path: Path) -> None:
    """--checkpoint.save_top_k K > 1 keeps the newest K ``step=N.ckpt`` (it was refused: no monitor),
    also after a resume; last.ckpt is none of them. K < -1 is one line naming the option."""

    def run(steps: int, keep: int = 2) -> list[str]:
        snapshots = {"checkpoint.every_n_train_steps": 1, "checkpoint.save_top_k": keep}
        run_inprocess(common_args(lmdb_path, tmp_path, **{"trainer.max_steps": steps, **snapshots}))
        return sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))

    assert run(5) == ["last.ckpt", "step=00000004.ckpt", "step=00000005.ckpt"]
    assert run(7) == ["last.ckpt", "step=00000006.ckpt", "step=00000007.ckpt"]  # resumed at step 5
    assert load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 7
    assert run(10, keep=3) == ["last.ckpt", *(f"step={n:08d}.ckpt" for n in (8, 9, 10))]
    assert run(12, keep=1) == ["last.ckpt", "step=00000012.ckpt"]  # a smaller K: the oldest go at once
    assert run(14, keep=2) == ["last.ckpt", "step=00000013.ckpt", "step=00000014.ckpt"]  # K=1's is tracked
    with pytest.raises(
        UsageError, match=r"^--checkpoint.save_top_k -2: expected -1 \(all\), 0 \(none\) or K"
    ):
        run(8, keep=-2)


# --------------------------------------------------------------------------- small units
def test_ema_update_rule() -> None:
    plain, warm = EMA(decay=0.9), EMA(decay=0.9, warmup=True)
    for ema, n, want in [
        (plain, 1, 0.1),
        (plain, 50, 0.1),
        (warm, 1, 1 - 2 / 11),
        (warm, 50, 1 - 51 / 60),
        (warm, 100, 0.1),
    ]:
        averaged = [torch.zeros(3)]
        ema.update(averaged, [torch.ones(3)], torch.tensor(n))
        assert torch.allclose(averaged[0], torch.full((3,), want)), (ema.warmup, n)
    assert warm.decay_at(1000) == 0.9 and plain.describe()["decay"] == 0.9
    # start_step / update_every_n_steps decide which optimizer steps (0-based) update the EMA
    late = EMA(start_step=3, update_every_n_steps=2)
    assert [i for i in range(9) if late.should_update(step_idx=i)] == [3, 5, 7]
    assert not late.should_update(epoch_idx=0) and plain.should_update(step_idx=0)


def test_resume_picks_the_newest_and_stale_temp_files_are_removed(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"global_step": 1}, last)
    hpc = tmp_path / "hpc_ckpt_3.ckpt"
    atomic_torch_save({"global_step": 2}, hpc)
    os.utime(last, ns=(time.time_ns(), time.time_ns() - 10**9))
    assert find_resume_checkpoint(tmp_path) == hpc
    os.utime(last, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert find_resume_checkpoint(tmp_path) == last
    stale = tmp_path / "checkpoints" / ".last.ckpt.0123abcd.tmp"
    stale.write_bytes(b"partial")
    assert remove_dead_temps(tmp_path / "checkpoints") == [stale] and not stale.exists()
    assert last.is_file()


# --------------------------------------------------------------------------- one generation path
def test_ilvr_preview_equals_sample_py_on_the_checkpoint_of_that_step(
    lmdb_path: Path, tmp_path: Path
) -> None:
    """The preview at step S is byte for byte what ``sample.py`` writes for the checkpoint
    of step S with the same references, N, respacing, range, mode and seed."""
    from ilvr_toolkit.sampling.cli import main as sample_main

    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(refs / f"r{i}.png")
    settings = {"ilvr.factor": 4, "ilvr.range_t": 1, "ilvr.mode": "official", "sampler.respacing": "5"}
    preview = {f"ilvr_preview.{k}": v for k, v in settings.items()}
    preview.update({"ilvr_preview.references": refs, "ilvr_preview.num_images": 3, "ilvr_preview.seed": 7})
    run_dir = tmp_path / "run"
    run_inprocess(
        common_args(
            lmdb_path, run_dir, **{"trainer.max_steps": 2, "ilvr_preview.every_n_steps": 2, **preview}
        )
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load_ckpt(last)["global_step"] == 2
    out = tmp_path / "sampled"
    args = [f"--{k}={v}" for k, v in settings.items()] + ["--seed=7", "--batch_size=3", "--device=cpu"]
    args += [f"--model.checkpoint={last}", f"--references={refs}", f"--output.dir={out}", "--progress=false"]
    assert sample_main(args) == 0
    grid = torch.from_numpy(np.array(Image.open(run_dir / "samples" / "ilvr_00000002.png"))).permute(2, 0, 1)
    row = 2  # rows: references, phi_N(references), translations; make_grid pads by 2 px
    for i in range(3):
        cell = grid[:, 2 + row * 18 : 18 + row * 18, 2 + i * 18 : 18 + i * 18]
        png = torch.from_numpy(np.array(Image.open(out / f"r{i}_s0.png"))).permute(2, 0, 1)
        assert torch.equal(cell, png), f"reference {i}: preview and sample.py differ"
    source = torch.from_numpy(np.array(Image.open(refs / "r0.png"))).permute(2, 0, 1)
    assert torch.equal(grid[:, 2:18, 2:18], source)  # the crop is where the test thinks it is
    assert not torch.equal(grid[:, 38:54, 2:18], grid[:, 38:54, 20:36])  # distinct translations


def test_auto_resume_never_runs_code_from_a_planted_checkpoint(lmdb_path: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "payload": Payload(marker)}, tmp_path / "checkpoints" / "last.ckpt")
    args = common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 2})
    proc = train_subprocess(args, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]  # refused, not trained over
    assert not marker.exists(), "the planted checkpoint's code ran on resume"


def test_a_preview_with_nan_pixels_warns_and_training_goes_on():
    """sample.py stops on NaN samples; a training preview warns (naming the step) and keeps them."""
    from ilvr_toolkit.sampling.config import SamplerSpec
    from ilvr_toolkit.sampling.generate import NonFiniteSamples
    from ilvr_toolkit.training.callbacks import sample_images
    from ilvr_toolkit.training.module import DiffusionModule

    module = DiffusionModule(unet="tiny16")
    with torch.no_grad():
        next(module.model.parameters()).fill_(float("nan"))
    with pytest.warns(UserWarning, match=r"step 0: sampling gave NaN/inf pixels in 2 of 2 images"):
        images = sample_images(module, module.model, [1, 2], SamplerSpec(respacing="2"))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    with pytest.raises(NonFiniteSamples):  # the FID monitor's call: no FID of zeroed pixels
        sample_images(module, module.model, [1, 2], SamplerSpec(respacing="2"), strict=True)


def test_log_every_n_steps_0_trains_without_logging(lmdb_path, tmp_path):
    """Lightning's "no logging" value divided by zero in the per-quartile loss terms."""
    cli = run_inprocess(
        common_args(lmdb_path, tmp_path / "run", **{"trainer.max_steps": 2, "trainer.log_every_n_steps": 0})
    )
    assert cli.trainer.global_step == 2


# --------------------------------------------------------------------------- resume settings
def test_training_precisions_without_float32_weights_are_refused_before_training(
    lmdb_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """EMA.update crashed after step 1 under 64-true / bf16-true; transformer-engine is not installed."""
    for precision in ("64-true", "bf16-true", "transformer-engine"):
        args = common_args(
            lmdb_path, tmp_path / "run", **{"trainer.precision": precision, "trainer.max_steps": 2}
        )
        assert train_main(["fit", *args]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"train.py: error: --trainer.precision {precision}: not supported for training (the EMA, the "
            "loss and the checkpoints are float32); use 32-true (or 32), bf16-mixed or 16-mixed"
        )
    assert not (tmp_path / "run").exists()


class GradNorm(pl.Callback):
    """The total gradient norm of the last step, after clipping (before the next zero_grad)."""

    norm: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norm = float(torch.nn.utils.get_total_norm(grads))


def test_fused_adamw_is_clipped_under_bf16_mixed_and_refused_with_clipping_under_16_mixed(
    lmdb_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """bf16-mixed has no GradScaler: the fused AdamW's gradients are clipped like any (Lightning refused
    it, "does not allow for gradient clipping", a traceback); 16-mixed: one line before anything is written."""
    fast = {"trainer.precision": "bf16-mixed", "model.optim.fused": "true", "trainer.max_steps": 1}
    probe = GradNorm()
    clip = {"trainer.gradient_clip_val": 1e-3}
    cli = run_inprocess(common_args(lmdb_path, tmp_path / "bf16", **fast, **clip), probe)  # type: ignore[arg-type]
    assert cli.trainer.global_step == 1 and probe.norm is not None and 0 < probe.norm <= 1e-3 * 1.001
    args = common_args(lmdb_path, tmp_path / "fp16", **{**fast, "trainer.precision": "16-mixed"})
    assert train_main(["fit", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train.py: error: --model.optim.fused true with --trainer.gradient_clip_val 1.0 under 16-mixed: the "
        "fused AdamW unscales inside its step, so nothing can clip the gradients; set "
        "--trainer.gradient_clip_val 0 or --model.optim.fused false, or use bf16-mixed"
    )
    assert not (tmp_path / "fp16").exists()


@pytest.mark.parametrize(
    "unet, line",
    [
        ("{preset: tiny16, winograd: maybe}", "--model.unet: winograd maybe: expected true or false"),
        ("{preset: tiny16, native_groupnorm: 3}", "--model.unet: native_groupnorm 3: expected true or false"),
        (
            "{preset: tiny16, winogard: true}",
            "--model.unet: unknown UNetConfig key winogard (did you mean winograd?)",
        ),
    ],
)
def test_model_unet_mistakes_are_one_line_naming_the_key(
    unet: str, line: str, lmdb_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A bool setting must be a bool (a truthy "maybe" turned Winograd on); a misspelled key names the
    closest one (not the link that computes data.image_size)."""
    args = common_args(lmdb_path, tmp_path / "run", **{"model.unet": unet, "trainer.max_steps": 1})
    assert train_main(["fit", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"train.py: error: {line}"]
    assert not (tmp_path / "run").exists()


def test_ckpt_path_refuses_weights_files_and_old_checkpoints_before_writing(
    tiny_run: Path, lmdb_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    last = tiny_run / "checkpoints" / "last.ckpt"
    model_file = export_checkpoint(last, tmp_path / "export")["model_file"]
    old = load_ckpt(last)
    old["hyper_parameters"]["lr"] = old["hyper_parameters"].pop("optim")["lr"]  # a 0.1.0 key
    torch.save(old, tmp_path / "old.ckpt")
    for path in (REPO / "checkpoints" / "demo.pt", model_file):
        assert train_main(["fit", *common_args(lmdb_path, tmp_path / "run", ckpt_path=path)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"train.py: error: --ckpt_path {path}: not a train.py checkpoint (.ckpt) but a file of weights "
            f"only; to start from released or exported weights use --init_from {path}"
        )
    assert (
        train_main(["fit", *common_args(lmdb_path, tmp_path / "run", ckpt_path=tmp_path / "old.ckpt")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"train.py: error: --ckpt_path {tmp_path / 'old.ckpt'}: its hyper_parameters do not "
    )
    assert "'model.lr'" in err and "--init_from" in err
    assert not (tmp_path / "run").exists()


def test_ckpt_path_keeps_the_given_settings_and_refuses_another_model(
    tiny_run: Path, lmdb_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """LightningCLI puts the checkpoint's hyper_parameters over the given model settings."""
    last = tiny_run / "checkpoints" / "last.ckpt"
    other = json.dumps({"preset": "tiny16", "channel_mult": [1, 2]})
    args = common_args(lmdb_path, tmp_path / "run", ckpt_path=last, **{"model.unet": other})
    assert train_main(["fit", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train.py: error: --model.unet: --ckpt_path {last} holds a run of another model (channel_mult [1] "
        "vs [1, 2]); leave out --model.unet (the checkpoint's is used), or start a new run with --init_from"
    )
    assert not (tmp_path / "run").exists()
    args = common_args(lmdb_path, tmp_path / "run", ckpt_path=last, **{"model.optim.lr": 0.1})
    cli = run_inprocess(args + ["--trainer.max_steps", "1"])  # the checkpoint's step is past it: no step
    assert cli.model.hparams.optim["lr"] == 0.1 and cli.config.fit.model.optim.lr == 0.1
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["optim"]["lr"] == 0.1
    # settings given at their defaults count as given: the default UNet (tiny), a config's lr 1e-4
    args = common_args(lmdb_path, tmp_path / "run2", ckpt_path=last, **{"model.unet": "tiny"})
    assert train_main(["fit", *args]) == 2
    assert "--model.unet: --ckpt_path" in capsys.readouterr().err.strip().splitlines()[-1]
    default_lr = tmp_path / "lr.yaml"
    default_lr.write_text("model:\n  optim:\n    lr: 0.0001\n")
    args = common_args(lmdb_path, tmp_path / "run3", ckpt_path=last) + ["--config", str(default_lr)]
    assert run_inprocess(args + ["--trainer.max_steps", "1"]).model.hparams.optim["lr"] == 1e-4


def test_resume_applies_a_changed_lr(
    lmdb_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpoint's optimizer param_groups and LambdaLR base_lrs held the old lr."""

    class StepLrs(pl.Callback):
        """The lr each optimizer step uses (LambdaLR sets the next one only after the step)."""

        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            self.lrs.append(optimizer.param_groups[0]["lr"])

    run_inprocess(common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 2, "model.optim.warmup_steps": 4}))
    step_lrs = StepLrs()
    resume = common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 3, "model.optim.warmup_steps": 4})
    with caplog.at_level("INFO"):
        cli = TrainCLI(
            args=["fit", *resume, "--model.optim.lr", "0.1"], trainer_defaults={"callbacks": [step_lrs]}
        )
    assert "resuming with lr 0.1 (the checkpoint's: 0.0003)" in caplog.text
    assert step_lrs.lrs == [pytest.approx(0.1 * 3 / 4)]  # the first step after it: warmup step 3 of 4
    group = cli.trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == 0.1 and group["lr"] == pytest.approx(0.1)  # warmup 4: step 3 is its last
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [0.1]
    used = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"][0]
    assert used["initial_lr"] == 0.1
    run_inprocess(
        common_args(lmdb_path, tmp_path / "b", **{"trainer.max_steps": 1, "model.optim.warmup_steps": 8})
    )
    cli = run_inprocess(common_args(lmdb_path, tmp_path / "b", **{"trainer.max_steps": 2}))  # no warmup now
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 3e-4  # not stuck at 1/8 of it


def test_resume_at_an_epoch_end_draws_the_uninterrupted_runs_t_and_noise(tmp_path: Path) -> None:
    """8 identical images, batch 4: every batch is the same, so only t and noise make the losses."""
    folder = tmp_path / "images"
    folder.mkdir()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for i in range(8):
        image.save(folder / f"{i}.png")
    build_lmdb(folder, tmp_path / "same.lmdb", [16], workers=0, progress=False)

    class Losses(pl.Callback):
        def __init__(self) -> None:
            self.at: dict[int, float] = {}

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, index: int) -> None:
            self.at[trainer.global_step] = float(outputs["loss"])

    def run(run_dir: Path, steps: int) -> dict[int, float]:
        losses = Losses()
        args = common_args(
            tmp_path / "same.lmdb", run_dir, **{"trainer.max_steps": steps, "data.flip": "false"}
        )
        TrainCLI(args=["fit", *args], trainer_defaults={"callbacks": [losses]})
        return losses.at

    straight = run(tmp_path / "straight", 4)
    assert run(tmp_path / "resumed", 2) == {k: straight[k] for k in (1, 2)}  # epoch 0: 2 steps
    assert run(tmp_path / "resumed", 4) == {k: straight[k] for k in (3, 4)}


def test_each_step_and_each_rank_draws_its_own_t_and_noise() -> None:
    """_draw seeds per (rank, global step): without either term every step (or every DDP rank)
    would train on the same t and noise."""
    from ilvr_toolkit.training.module import DiffusionModule

    class Placed(DiffusionModule):
        global_step = 0  # plain attributes in place of the Trainer's
        global_rank = 0

    module, x0 = Placed(unet="tiny16"), torch.zeros(8, 3, 16, 16)

    def draw(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        module.global_step, module.global_rank = step, rank
        module.on_train_start()  # a (re)start: the next draw seeds again
        return module._draw(x0)

    first = draw(0, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, draw(0, 0), strict=True))  # the seed is reproducible
    for other in (draw(1, 0), draw(0, 1)):  # the next step; the same step on rank 1
        assert not torch.equal(other[0], first[0]) and not torch.equal(other[1], first[1])


def test_data_path_and_export_output_dir_mistakes_name_the_flag(
    tiny_run: Path, lmdb_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    big = json.dumps({"preset": "tiny16", "image_size": 64, "channel_mult": [1]})
    for path, said in (
        (
            lmdb_path,
            "has no images of size 64 (the model's image_size); sizes available: 16, 32; build one with",
        ),
        (lmdb_path.parent / "images", f"no LMDB at {lmdb_path.parent / 'images'} (missing "),
        (lmdb_path / "data.mdb", "is a file, expected an LMDB folder; build one with"),
    ):
        args = common_args(path, tmp_path / "run", **{"model.unet": big, "trainer.max_steps": 1})
        assert train_main(["fit", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"train.py: error: --data.path {path}: {said}"), err
        assert "ilvr_toolkit.data.prepare" in err and "--size 64" in err
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert export_main([str(tiny_run / "checkpoints" / "last.ckpt"), "--output.dir", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"train.py export: error: --output.dir {out}: {tmp_path / 'file'} is a file, expected a folder "
            "(made if missing)\n"
        )


def test_auto_resume_passes_over_a_foreign_pickle(
    lmdb_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A planted hpc_ckpt_K.ckpt that weights_only refuses blocked the resume (exit 1)."""
    run_inprocess(common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 2}))
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "payload": Payload(marker)}, tmp_path / "hpc_ckpt_9.ckpt")
    probe = Probe()
    run_inprocess(common_args(lmdb_path, tmp_path, **{"trainer.max_steps": 3}), probe)
    assert re.search(r"hpc_ckpt_9.ckpt is not a readable .* skipped; resuming from .*last", caplog.text)
    assert Path(probe.ckpt_path) == tmp_path / "checkpoints" / "last.ckpt" and probe.global_step == 2
    assert not marker.exists()


def test_a_legacy_format_checkpoint_resumes_by_ckpt_path_and_auto_resume(
    tiny_run: Path, lmdb_path: Path, tmp_path: Path
) -> None:
    """A good non-zip checkpoint (``_use_new_zipfile_serialization=False``), which cannot be
    memory-mapped, was called damaged by --ckpt_path and passed over by auto-resume."""
    ckpt = load_ckpt(tiny_run / "checkpoints" / "last.ckpt")
    for run_dir, given in ((tmp_path / "a", tmp_path / "legacy.ckpt"), (tmp_path / "b", None)):
        legacy = given or run_dir / "hpc_ckpt_1.ckpt"
        legacy.parent.mkdir(exist_ok=True)
        torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
        probe, steps = Probe(), {"trainer.max_steps": ckpt["global_step"] + 1}
        run_inprocess(
            common_args(lmdb_path, run_dir, **steps, **({"ckpt_path": given} if given else {})), probe
        )
        assert_restored(probe, ckpt, legacy)


def test_out_of_memory_in_a_training_step_is_one_line_naming_the_batch_size(
    lmdb_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The allocator's RuntimeError (here a real one: 40 TB asked) was a long traceback."""
    from ilvr_toolkit.diffusion import GaussianDiffusion

    monkeypatch.setattr(GaussianDiffusion, "training_losses", lambda *a, **k: torch.empty(10**13))
    assert train_main(["fit", *common_args(lmdb_path, tmp_path / "run", **{"trainer.max_steps": 1})]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train.py: error: out of memory at --data.batch_size 4 (DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 40000000000000 bytes); lower --data.batch_size and rerun"
    )


def test_rerun_with_ckpt_path_resumes_from_the_runs_newer_checkpoint(
    tiny_run: Path, lmdb_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A requeued job (or a rerun) of a command with --ckpt_path F goes on from RUN's own later
    checkpoint, not back to F (which lost the steps since and let pre-emption delete them)."""
    start = shutil.copy(tiny_run / "checkpoints" / "last.ckpt", tmp_path / "start.ckpt")
    step, run = load_ckpt(start)["global_step"], tmp_path / "run"
    args = common_args(lmdb_path, run, ckpt_path=start)
    run_inprocess([*args, "--trainer.max_steps", str(step + 2)])
    last = run / "checkpoints" / "last.ckpt"
    assert load_ckpt(last)["global_step"] == step + 2
    probe = Probe()
    with caplog.at_level("INFO"):
        run_inprocess([*args, "--trainer.max_steps", str(step + 3)], probe)
    assert Path(probe.ckpt_path) == last and probe.global_step == step + 2
    said = f"--ckpt_path {start}: {run} holds a newer checkpoint (step {step + 2}): resuming from {last}"
    assert said in caplog.text
    probe = Probe()  # --auto_resume false: exactly the given file
    run_inprocess([*args, "--trainer.max_steps", str(step + 3), "--auto_resume", "false"], probe)
    assert Path(probe.ckpt_path) == start and probe.global_step == step
