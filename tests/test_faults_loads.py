"""No code from files (issue 13, point 1): a pickle payload planted in every kind of file the
tools load never runs, with or without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, and the refusal
is one line naming the file. Each case drives a real command (``train.py``, ``sample.py``,
``python -m ilvr_toolkit.evaluation``, the converter) on tiny inputs."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from faultkit import (
    NO_WEIGHTS_ONLY,
    TINY32,
    Payload,
    error_line,
    flip_tensor_bytes,
    make_images,
    put,
    run,
    tiny_lmdb,
)

from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.data.lmdb_format import LENGTH_KEY, META_KEY, NAMES_KEY, image_key
from ilvr_toolkit.models import CheckpointError, get_preset, load_model, load_state_dict_file
from ilvr_toolkit.models.checkpoint import MODEL_FORMAT
from ilvr_toolkit.training.checkpointing import atomic_torch_save, find_resume_checkpoint

ENVS = pytest.mark.parametrize("env", [{}, NO_WEIGHTS_ONLY], ids=["default", "force_no_weights_only"])
EVAL = ["-m", "ilvr_toolkit.evaluation"]
TRAIN_UNET = json.dumps({"preset": "tiny16", "channel_mult": [1]})


@pytest.fixture(scope="module")
def lmdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lmdb(tmp_path_factory.mktemp("loads"), sizes=(16, 32))


def train_args(lmdb: Path, run_dir: Path, *extra: str) -> list[str]:
    settings = {
        "--config": "configs/tiny.yaml",
        "--data.path": str(lmdb),
        "--trainer.default_root_dir": str(run_dir),
        "--model.unet": TRAIN_UNET,
        "--data.batch_size": "4",
        "--data.workers": "0",
        "--trainer.accelerator": "cpu",
        "--trainer.max_steps": "2",
        "--trainer.enable_progress_bar": "false",
        "--samples.every_n_steps": "0",
        "--ilvr_preview.every_n_steps": "0",
    }
    return ["train.py", "fit", *[x for kv in settings.items() for x in kv], *extra]


def sample_args(checkpoint: Path, refs: Path, out: Path, *extra: str) -> list[str]:
    common = ["--references", str(refs), "--sampler.respacing", "4", "--device", "cpu"]
    return ["sample.py", "--model.checkpoint", str(checkpoint), *common, "--output.dir", str(out), *extra]


# --------------------------------------------------------------------------- torch.load files
@ENVS
@pytest.mark.parametrize("where", ["ckpt_path", "last.ckpt", "hpc_ckpt_1.ckpt"])
def test_training_resume_never_runs_a_planted_checkpoint(lmdb_path, tmp_path, where, env):
    """Lightning resume: an explicit --ckpt_path, and the two files auto-resume finds."""
    marker, run_dir = tmp_path / "code-ran", tmp_path / "run"
    planted = {"ckpt_path": tmp_path / "given.ckpt", "last.ckpt": run_dir / "checkpoints" / "last.ckpt"}
    planted = planted.get(where, run_dir / where)
    planted.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 1, "payload": Payload(marker)}, planted)
    extra = ["--ckpt_path", str(planted)] if where == "ckpt_path" else []
    done = run(train_args(lmdb_path, run_dir, *extra), env=env)
    assert not marker.exists(), "the planted checkpoint's code ran"
    line = error_line(done, "train.py")
    assert str(planted) in line and "weights_only=True refuses" in line, line
    assert not (run_dir / "checkpoints" / "step=2.ckpt").exists()


@ENVS
@pytest.mark.parametrize("kind", ["model.pt", "plain.pt"])
def test_sample_py_never_runs_a_planted_model_file(tmp_path, kind, env):
    """An exported self-describing .model.pt, and a plain state dict loaded with a preset."""
    marker, planted = tmp_path / "code-ran", tmp_path / f"planted.{kind}"
    if kind == "model.pt":
        unet = get_preset("tiny32").to_dict()
        torch.save(
            {"format": MODEL_FORMAT, "unet": unet, "state_dict": {}, "extra": Payload(marker)}, planted
        )
        extra = []
    else:
        weights = torch.load(TINY32, map_location="cpu", weights_only=True)
        torch.save({**weights, "time_embed.0.weight": Payload(marker)}, planted)
        extra = ["--model.preset", "tiny32"]
    refs = make_images(tmp_path / "refs", count=1, size=32)
    done = run(sample_args(planted, refs, tmp_path / "out", *extra), env=env)
    line = error_line(done, "sample.py")
    assert str(planted) in line and "weights_only" in line
    assert not marker.exists(), "the planted model file's code ran"
    assert not list(tmp_path.glob("out/*.png"))


@ENVS
@pytest.mark.parametrize("command", ["init_from", "export"])
def test_train_py_never_runs_a_planted_file_to_fine_tune_or_export(lmdb_path, tmp_path, command, env):
    """``--init_from`` a plain state dict (the released files), and ``train.py export`` of a .ckpt."""
    marker, planted = tmp_path / "code-ran", tmp_path / "planted.pt"
    torch.save({"time_embed.0.weight": Payload(marker)}, planted)
    if command == "export":
        args = ["train.py", "export", str(planted), "--output.dir", str(tmp_path / "export")]
    else:
        args = train_args(lmdb_path, tmp_path / "run", "--model.unet", "tiny32", "--init_from", str(planted))
    line = error_line(run(args, env=env), "train.py export" if command == "export" else "train.py")
    assert str(planted) in line and "weights_only" in line
    assert not marker.exists(), "the planted file's code ran"


@ENVS
def test_evaluation_never_runs_planted_inception_weights(tmp_path, env):
    marker, planted = tmp_path / "code-ran", tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": Payload(marker)}, planted)
    images = make_images(tmp_path / "images", count=2, size=32)
    args = [*EVAL, "--outputs", str(images), "--target", str(images), "--inception_weights", str(planted)]
    line = error_line(run(args, env=env), "python -m ilvr_toolkit.evaluation")
    assert str(planted) in line and "not a weights file" in line
    assert not marker.exists(), "the planted Inception file's code ran"


def eval_args(folder: Path, weights_file: Path, cache: Path) -> list[str]:
    """Evaluation of FOLDER/outputs against FOLDER/target with the statistics cache ``cache``."""
    args = [*EVAL, "--outputs", str(folder / "outputs"), "--target", str(folder / "target")]
    args += ["--inception_weights", str(weights_file), "--cache_dir", str(cache), "--kid", "false"]
    return [*args, "--metrics_json", str(cache.parent / "m.json")]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    from random_inception import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture(scope="module")
def stats_world(tmp_path_factory, weights_file) -> Path:
    """Two folders and the statistics cache a first evaluation wrote (FOLDER/cache)."""
    folder = tmp_path_factory.mktemp("stats")
    make_images(folder / "outputs", count=2, size=32)
    make_images(folder / "target", count=3, size=32, seed=1)
    done = run(eval_args(folder, weights_file, folder / "cache"))
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


@ENVS
def test_evaluation_recomputes_a_planted_statistics_cache(tmp_path, env, weights_file, stats_world):
    """The statistics cache is .npz read with allow_pickle=False: a planted object array is
    not unpickled; the cache counts as unreadable (named in metrics.json) and is rewritten."""
    marker, cache = tmp_path / "code-ran", shutil.copytree(stats_world / "cache", tmp_path / "cache")
    (stats_file,) = cache.glob("*.npz")
    with open(stats_file, "wb") as f:
        np.savez(
            f, mu=np.array([Payload(marker)], dtype=object), meta=np.array([Payload(marker)], dtype=object)
        )
    done = run(eval_args(stats_world, weights_file, cache), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not marker.exists(), "the planted statistics cache's code ran"
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["target_stats"] == str(stats_file) and metrics["target_stats_cache_hit"] is False
    assert "unreadable cache file" in metrics["target_stats_reason"], metrics
    assert np.load(stats_file, allow_pickle=False)["mu"].dtype == np.float64  # rewritten clean


# --------------------------------------------------------------------------- LMDB records and metadata
def test_the_payload_runs_when_unpickled(tmp_path):
    """The tests above can fail: unpickled without the safe loader, the payload leaves its marker."""
    marker = tmp_path / "code-ran"
    torch.save({"payload": Payload(marker)}, tmp_path / "planted.ckpt")
    torch.load(tmp_path / "planted.ckpt", weights_only=False)  # deliberately unsafe: the control case
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@ENVS
def test_the_forked_commands_read_the_torch_load_setting_at_call_time(tmp_path, env):
    """The commands above are forked from one interpreter that imported torch before ``env`` was
    set: a plain ``torch.load`` (no ``weights_only``) in such a command still obeys
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, so the force_no_weights_only cases do test that setting."""
    marker, planted, script = tmp_path / "code-ran", tmp_path / "planted.ckpt", tmp_path / "load.py"
    torch.save({"payload": Payload(marker)}, planted)
    script.write_text(f"import torch\ntorch.load({str(planted)!r})\n")  # deliberately no weights_only
    done = run([str(script)], env=env)
    assert marker.exists() == bool(env) and (done.returncode == 0) == bool(env), done.stderr[-2000:]


@pytest.mark.parametrize("key", [META_KEY, LENGTH_KEY, NAMES_KEY], ids=lambda k: k.decode())
def test_lmdb_metadata_is_json_never_unpickled(lmdb_path, tmp_path, key):
    """LMDB metadata is JSON text: a pickle there is a damaged dataset, named, never run."""
    marker = tmp_path / "code-ran"
    planted = shutil.copytree(lmdb_path, tmp_path / "planted.lmdb")
    put(planted, key, pickle.dumps(Payload(marker)))
    expected = f"{planted}: damaged"
    if key != NAMES_KEY:  # the reader needs no names; the converter reads them
        line = error_line(run(train_args(planted, tmp_path / "run")), "train.py")
        assert expected in line and key.decode() in line
        refs_run = run(sample_args(TINY32, planted, tmp_path / "out", "--model.preset", "tiny32"))
        assert expected in error_line(refs_run, "sample.py")
    convert = run(
        ["-m", "ilvr_toolkit.data.prepare", str(planted), "--out", str(tmp_path / "o.lmdb"), "--size", "16"]
    )
    assert expected in error_line(convert, "python -m ilvr_toolkit.data.prepare")
    assert not marker.exists() and not (tmp_path / "o.lmdb").exists()


def test_lmdb_records_are_decoded_as_images_never_unpickled(lmdb_path, tmp_path):
    """A pickle stored as an image record is a bad record: training names it (key and index),
    sample.py reports that reference as failed, the converter skips it saying why."""
    marker = tmp_path / "code-ran"
    planted = shutil.copytree(lmdb_path, tmp_path / "planted.lmdb")
    for size in (16, 32):
        put(planted, image_key(size, 2), pickle.dumps(Payload(marker)))
    line = error_line(run(train_args(planted, tmp_path / "run")), "train.py")
    assert f"{planted}: record b'16-00002' (index 2) not an image" in line
    out = tmp_path / "out"
    done = run(sample_args(TINY32, planted, out, "--model.preset", "tiny32", "--batch_size", "8"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "00002" in json.loads((out / "manifest.json").read_text())["failed_references"]
    report = tmp_path / "report.json"
    args = [str(planted), "--output.dir", str(tmp_path / "o.lmdb"), "--size", "16", "--report", str(report)]
    assert run(["-m", "ilvr_toolkit.data.prepare", *args]).returncode == 0
    assert [name for name, _ in json.loads(report.read_text())["skipped"]] == ["02.png"]
    assert not marker.exists(), "a planted LMDB record's code ran"


def test_checkpoint_faults_are_told_apart(tmp_path: Path) -> None:
    """64 changed bytes inside a tensor (torch.load checks no CRC32 and loads them), files that are
    no checkpoint (random bytes, text, another zip), a truncated one and one holding Python
    objects: each is refused with its own reason, naming the file (and the damaged member)."""
    damaged = tmp_path / "damaged.pt"
    shutil.copyfile(TINY32, damaged)
    member = flip_tensor_bytes(damaged)
    torch.load(damaged, weights_only=True)  # torch itself loads the changed weights without a word
    with pytest.raises(
        CheckpointError, match=f"^{damaged} is corrupted: its member {member} fails its CRC32"
    ):
        load_model(damaged, preset="tiny32")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("notes.txt", "not tensors")
    torch.save({"payload": Payload(tmp_path / "code-ran")}, tmp_path / "objects.pt")
    alien = "is not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy pickle)"
    cases = {"random.ckpt": np.random.default_rng(0).bytes(4096), "notes.txt": b"some notes\n"}
    cases.update({"half.pt": TINY32.read_bytes()[:30000], "empty.pt": b""})
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    said = {
        "random.ckpt": alien,
        "notes.txt": alien,
        "other.zip": alien,
        "half.pt": "is truncated or corrupted",
    }
    said.update({"empty.pt": "(0 bytes) is truncated or corrupted", "objects.pt": "holds Python objects"})
    for name, reason in said.items():
        with pytest.raises(CheckpointError, match=re.escape(reason)) as refused:
            load_state_dict_file(tmp_path / name)
        assert str(refused.value).startswith(str(tmp_path / name)), str(refused.value)
    assert not (tmp_path / "code-ran").exists()
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict_file(tmp_path / "legacy.pt")["w"], torch.ones(3))  # no CRC32s: loads


def test_both_torch_load_switches_set_name_the_environment_not_the_file(tmp_path, monkeypatch):
    """torch.load refuses every file then; auto-resume called each checkpoint damaged."""
    both = {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "true"}
    said = "environment: TORCH_FORCE_WEIGHTS_ONLY_LOAD and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD are both set"
    done = run(["sample.py", "--model.checkpoint", "checkpoints/demo.pt", "--unconditional", "true",
                "--device", "cpu", "--output.dir", str(tmp_path / "out")], env=both)  # fmt: skip
    assert done.returncode == 2 and error_line(done, "sample.py").startswith(f"sample.py: error: {said}")
    atomic_torch_save({"global_step": 1}, tmp_path / "run" / "checkpoints" / "last.ckpt")
    for name, value in both.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=f"^{said}; torch.load accepts one: unset one$"):
        find_resume_checkpoint(tmp_path / "run")
