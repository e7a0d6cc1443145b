"""Issue 13 point 6: a full disk. Tests run as root (chmod does not make a folder read-only), so
a full disk is RLIMIT_FSIZE with SIGXFSZ ignored (writes past the limit fail with EFBIG) in the
command's process; read-only output (a parent that is a regular file) is in test_faults_cli.
Each case: one error line naming the file, nothing partial under a final name, no temp file
left, and what was there before (the previous checkpoint, earlier images) kept byte for byte."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from faultkit import make_images
from random_inception import write_random_inception_weights
from test_faults_cli import TRAIN, fill, tiny_sample, world  # noqa: F401  (world: the fixture)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def assert_one_line_naming(done, path: Path) -> None:
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert ": error: " in last and str(path) in last and "File too large" in last, last


def test_training_checkpoint_on_a_full_disk_keeps_the_previous_one(runner, world, tmp_path):  # noqa: F811
    args = [fill(a, {**world, "tmp": str(tmp_path)}) for a in TRAIN]
    args += ["--checkpoint.last_every_n_steps", "1", "--samples.every_n_steps", "0"]
    args += ["--ilvr_preview.every_n_steps", "0", "--trainer.enable_progress_bar", "false"]
    assert runner(*args, "--trainer.max_steps", "2").returncode == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    before = digests(checkpoints)
    done = runner(*args, "--trainer.max_steps", "4", fsize=200_000)  # a checkpoint is ~3 MB
    assert_one_line_naming(done, checkpoints / "last.ckpt")
    assert digests(checkpoints) == before and not list(tmp_path.rglob("*.tmp"))


def test_sample_png_on_a_full_disk_keeps_earlier_outputs(runner, tmp_path):
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a"]) + ["--workers", "0"]
    assert runner(*cmd).returncode == 0
    before = digests(out)
    tiny_sample(tmp_path, ["b"], seed=1)
    done = runner(*cmd, fsize=1500)  # the manifest part fits, a 32x32 PNG of noise does not
    assert_one_line_naming(done, out / "b_s0.png")
    assert not (out / "b_s0.png").exists() and not list(out.rglob("*.tmp"))
    after = digests(out)
    kept = [k for k in before if not k.startswith((".manifest", ".lock"))]  # .lock: its holder's pid
    assert {k: after[k] for k in kept} == {
        k: before[k] for k in kept
    }  # the PNG, grid and manifest of the first run


def test_converter_on_a_full_disk_leaves_nothing(runner, world, tmp_path):  # noqa: F811
    out = tmp_path / "o.lmdb"
    done = runner(
        "-m", "ilvr_toolkit.data.prepare", world["images"], "--out", str(out), "--size", "16", fsize=3000
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert str(out) in last and "File too large" in last and len(done.stderr.strip().splitlines()) <= 2
    assert list(tmp_path.iterdir()) == []


def test_export_on_a_full_disk_leaves_neither_file_and_can_be_rerun(runner, tmp_path):
    """The model file does not fit (the plain state dict does): one line naming it (torch.save's
    RuntimeError was a traceback), no ``NAME.pt`` left, and the same command works later."""
    import torch

    from ilvr_toolkit.models import UNetModel, get_preset

    config = get_preset("tiny")
    weights = {f"model.{k}": v for k, v in UNetModel(config).state_dict().items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {"hyper_parameters": {"unet": config.to_dict()}, "state_dict": weights, "global_step": 30}, ckpt
    )
    args = ["train.py", "export", str(ckpt), "--weights", "raw", "--output.dir"]
    assert runner(*args, str(tmp_path / "y")).returncode == 0
    plain, model_file = (tmp_path / "y" / f"raw_step00000030{ext}" for ext in (".pt", ".model.pt"))
    assert model_file.stat().st_size > plain.stat().st_size + 600  # the config, the diffusion
    done = runner(*args, str(tmp_path / "x"), fsize=plain.stat().st_size + 300)
    assert_one_line_naming(done, tmp_path / "x" / "raw_step00000030.model.pt")
    assert list((tmp_path / "x").iterdir()) == []
    assert runner(*args, str(tmp_path / "x")).returncode == 0 and len(list((tmp_path / "x").iterdir())) == 2
    before = {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()}
    done = runner(*args, str(tmp_path / "x"), "--overwrite", "true", fsize=plain.stat().st_size + 300)
    assert done.returncode == 1  # --overwrite that fails keeps the earlier pair whole
    assert {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()} == before


def test_torch_save_on_a_full_disk_is_an_error_naming_the_file(tmp_path):
    """On ENOSPC (a tmpfs that fills) torch.save raises ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``; atomic_open turns it into an OSError naming the file."""
    import errno
    import os

    import pytest
    import torch

    from ilvr_toolkit.fileio import atomic_open

    class FillingDisk:  # the file handle of a disk with 1000 bytes free
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    with pytest.raises(OSError, match="No space left") as raised, atomic_open(tmp_path / "m.pt") as handle:
        torch.save({"w": torch.zeros(10_000)}, FillingDisk(handle))
    assert raised.value.filename == str(tmp_path / "m.pt") and list(tmp_path.iterdir()) == []


def test_evaluation_on_a_full_cache_disk_warns_and_writes_the_metrics(runner, tmp_path):
    """The statistics cache is optional: computed metrics were thrown away (exit 1) when it could not be written."""
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    outs, target = make_images(tmp_path / "outs", 3), make_images(tmp_path / "target", 3, seed=1)
    cache, metrics = tmp_path / "cache", tmp_path / "metrics.json"
    args = [
        "-m",
        "ilvr_toolkit.evaluation",
        "--outputs",
        str(outs),
        "--target",
        str(target),
        "--device",
        "cpu",
    ]
    args += ["--cache_dir", str(cache), "--inception_weights", str(weights), "--metrics_json", str(metrics)]
    done = runner(*args, fsize=100_000)  # the cache file is ~34 MB
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if "not cached" in line]
    assert len(warned) == 1 and str(cache) in warned[0] and "File too large" in warned[0], done.stderr
    assert "fid" in json.loads(metrics.read_text()) and not list(cache.glob("*"))
