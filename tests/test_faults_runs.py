"""Issue 13 point 4: concurrency and reruns, driven through the real commands.

- a second train.py on a run directory in use is refused at once, naming the holder (pid, host);
  the first run loses nothing; once the holder is gone its lock is taken over;
- start-up cleanups remove only temp files whose writer is gone;
- a damaged newest checkpoint (empty hpc_ckpt, truncated last.ckpt) is passed over, saying so;
- a rerun of sample.py into an output folder continues the same run or names the setting that
  differs, and the manifest only ever describes images that run made.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from clirunner import REPO
from faultkit import flip_tensor_bytes
from test_faults_cli import MERGE, TRAIN, fill, tiny_sample, world  # noqa: F401  (world: the fixture)

from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.fileio import lock_folder, remove_dead_temps
from ilvr_toolkit.sampling.manifest import SAME_RUN, check_same_run
from ilvr_toolkit.training.checkpointing import atomic_torch_save, find_resume_checkpoint


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_train_is_refused_then_a_dead_holders_lock_is_taken_over(runner, world, tmp_path):  # noqa: F811
    args = [fill(a, {**world, "tmp": str(tmp_path)}) for a in TRAIN]
    args += ["--checkpoint.last_every_n_steps", "1", "--samples.every_n_steps", "0"]
    args += ["--ilvr_preview.every_n_steps", "0", "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, *args, "--trainer.max_steps", "100000"], cwd=REPO, env=env, stderr=subprocess.PIPE
    )
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.exists(), first.communicate(timeout=30)[1][-3000:]
        # the running first train.py's own temps come and go (it saves every step): not in the snapshot
        files = sorted(p.name for p in run.rglob("*") if not p.name.endswith(".tmp"))
        started = time.monotonic()
        second = runner(*args, "--trainer.max_steps", "1")
        assert time.monotonic() - started < 60 and second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert f"in use by pid {first.pid} on {socket.gethostname()}" in line and str(run / ".lock") in line
        assert first.poll() is None and set(files) <= {
            p.name for p in run.rglob("*")
        }  # nothing of it removed
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    step = torch.load(last, weights_only=True)["global_step"]
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"")  # a damaged newer checkpoint: passed over
    third = runner(*args, "--trainer.max_steps", str(step + 1))
    assert third.returncode == 0, third.stderr[-3000:]
    assert (
        f"{run / 'hpc_ckpt_1.ckpt'} (0 bytes) is truncated or corrupted (File is not a zip file): skipped"
        in third.stderr
    )
    assert f"resuming from {last}" in third.stderr
    assert torch.load(last, weights_only=True)["global_step"] == step + 1


def test_lock_records_its_holder_and_a_stale_one_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(f"{dead_pid()} {socket.gethostname()}")  # its holder died
    assert lock_folder(tmp_path) is None
    other = subprocess.run(
        [sys.executable, "-c", f"from ilvr_toolkit.fileio import lock_folder; print(lock_folder({str(tmp_path)!r}))"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert other.stdout.strip() == f"pid {os.getpid()} on {socket.gethostname()}"
    # A holder killed while a child it forked (a DataLoader worker) lives on: the lock is free.
    code = "import os, sys, time; from ilvr_toolkit.fileio import lock_folder; lock_folder(sys.argv[1]); "
    code += "pid = os.fork(); time.sleep(60) if pid == 0 else print(pid, flush=True)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=env
    )
    child = int(holder.stdout.readline())  # not .communicate(): the child keeps the pipe open 60 s
    try:
        assert (
            holder.wait(timeout=60) == 0 and os.kill(child, 0) is None
        )  # the holder is gone, its child lives
        assert lock_folder(run) is None
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdout.close()


def test_cleanup_removes_only_temps_whose_writer_is_gone(tmp_path):
    host = socket.gethostname()
    names = {
        "live": f".a.png.0123abcd.{os.getpid()}@{host}.tmp",
        "dead": f".a.png.0123abcd.{dead_pid()}@{host}.tmp",
        "elsewhere": ".a.png.0123abcd.1@another-host.example.tmp",
        "old format": ".last.ckpt.0123abcd.tmp",
        "other dead": f".b.ckpt.0123abcd.{dead_pid()}@{host}.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    removed = remove_dead_temps(tmp_path)
    assert sorted(removed) == sorted(tmp_path / names[k] for k in ("dead", "old format", "other dead"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in ("live", "elsewhere"))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    atomic_torch_save({"global_step": 2}, checkpoints / "step=00000002.ckpt")
    atomic_torch_save({"global_step": 4, "weights": torch.randn(1000)}, checkpoints / "last.ckpt")
    assert find_resume_checkpoint(tmp_path) == checkpoints / "last.ckpt"
    hpc = tmp_path / "hpc_ckpt_3.ckpt"
    hpc.write_bytes(b"")  # newest, empty
    assert find_resume_checkpoint(tmp_path) == checkpoints / "last.ckpt"
    member = flip_tensor_bytes(checkpoints / "last.ckpt")  # 64 changed bytes of its weights
    caplog.clear()
    with warnings.catch_warnings(record=True) as warned:  # a warning echoed its source line too
        assert find_resume_checkpoint(tmp_path) == checkpoints / "step=00000002.ckpt"
    said = [r.getMessage() for r in caplog.records]  # one log line naming each (the empty one too)
    assert not warned and len(said) == 2 and any(s.startswith(f"{hpc} (0 bytes) is truncated") for s in said)
    assert (
        f"{checkpoints / 'last.ckpt'} is corrupted: its member {member} fails its CRC32 check: skipped; "
        f"resuming from {checkpoints / 'step=00000002.ckpt'}"
    ) in said
    data = (checkpoints / "last.ckpt").read_bytes()
    (checkpoints / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    assert find_resume_checkpoint(tmp_path) == checkpoints / "step=00000002.ckpt"
    (checkpoints / "step=00000002.ckpt").write_bytes(b"garbage")  # nothing left to resume from
    with pytest.raises(
        UsageError, match=rf"^{tmp_path}: every checkpoint is damaged .*{hpc}.*; move them aside"
    ):
        find_resume_checkpoint(tmp_path)  # not a fresh start that would overwrite them


def test_sample_rerun_continues_the_same_run_or_names_the_setting_that_differs(runner, tmp_path):
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b"])
    host = socket.gethostname()
    live, dead = (
        out / f".a_s0.png.0123abcd.{os.getpid()}@{host}.tmp",
        out / f".a_s0.png.0123abcd.{dead_pid()}@{host}.tmp",
    )
    out.mkdir()
    live.write_bytes(b"being written")
    dead.write_bytes(b"left by a killed run")
    assert runner(*cmd, "--batch_size", "1").returncode == 0
    assert live.exists() and not dead.exists()
    images = {p.name: p.read_bytes() for p in out.glob("*_s0.png")}
    manifest = (out / "manifest.json").read_text()
    again = runner(*cmd, "--batch_size", "2", "--workers", "0")  # runtime settings may change
    assert again.returncode == 0 and "(2 already there)" in again.stdout, again.stderr
    for flag, value, word in (
        ("--seed", "1", "--seed 1"),
        ("--sampler.respacing", "3", "--sampler.respacing 3"),
    ):
        done = runner(*cmd, flag, value)
        line = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and line.startswith(
            f"sample.py: error: {word}: {out} holds a run made with"
        )
    other = tmp_path / "demo_copy.pt"  # the same weights, saved again: another file (sha256)
    torch.save(torch.load(REPO / "checkpoints" / "demo.pt", weights_only=True), other)
    done = runner(*cmd, "--model.checkpoint", str(other))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        f"sample.py: error: --model.checkpoint {other}: {out} holds a run made with another model (sha256 "
    )
    tiny_sample(tmp_path, ["0_first"])  # a reference added in front: every index would move
    done = runner(*cmd)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"sample.py: error: --references {tmp_path / 'refs'}: reference 0 is now '0_first', but {out} "
        "made a_s0.png from 'a' there (a file added, removed or renamed before it); restore the folder "
        "or use a new --output.dir"
    )
    assert {p.name: p.read_bytes() for p in out.glob("*_s0.png")} == images
    assert (
        json.loads((out / "manifest.json").read_text())["config"]["seed"]
        == json.loads(manifest)["config"]["seed"]
    )


@pytest.fixture(scope="module")
def first_runs(runner, tmp_path_factory):
    """One finished tiny ILVR run (--ilvr.factor 4) and one unconditional run (--num_samples 2)."""
    tmp = tmp_path_factory.mktemp("same_run")
    cmd = tiny_sample(tmp, ["a"])
    runs = {"ilvr": cmd, "unconditional": [*cmd[:4], str(tmp / "uncond"), *cmd[5:]]}
    runs["unconditional"] += ["--unconditional", "true", "--num_samples", "2"]
    for args in runs.values():
        done = runner(*args)
        assert done.returncode == 0, done.stderr[-2000:]
    return runs


@pytest.mark.parametrize(
    "run, flag, value, shown, before",
    [
        ("ilvr", "--ilvr.factor", "8", "8", "4"),
        ("ilvr", "--ilvr.range_t", "1", "1", "0"),
        ("ilvr", "--ilvr.mode", "official", "official", "paper"),
        ("ilvr", "--sampler.method", "ddim", "ddim", "ddpm"),
        ("ilvr", "--sampler.eta", "0.5", "0.5", "0.0"),
        ("ilvr", "--precision", "bf16", "bf16", "fp32"),
        ("ilvr", "--channels_last", "true", "true", "false"),
        ("ilvr", "--native_groupnorm", "true", "true", "false"),
        ("ilvr", "--winograd", "true", "true", "false"),
        ("ilvr", "--samples_per_reference", "2", "2", "1"),
        ("ilvr", "--unconditional", "true", "true", "false"),
        ("unconditional", "--num_samples", "3", "3", "2"),
    ],
)
def test_a_rerun_with_another_setting_that_makes_the_images_is_refused(
    runner, first_runs, run, flag, value, shown, before
):
    """Every SAME_RUN setting without a refusal test elsewhere (seed, respacing, model, references:
    above; task, mask, sdedit: test_tasks.py; class_labels: test_guided_diffusion.py)."""
    cmd = first_runs[run]
    out = Path(cmd[cmd.index("--output.dir") + 1])
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    done = runner(*cmd, flag, value)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"sample.py: error: {flag} {shown}: {out} holds a run made with {before} "
        f"({out / '.manifest' / 'settings.json'})"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == files


def test_a_reference_whose_content_changed_is_named_until_its_outputs_are_removed(runner, tmp_path):
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b"])
    assert runner(*cmd).returncode == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    os.utime(tmp_path / "refs" / "a.png", (1, 1))  # touched, same bytes: still the same run
    assert runner(*cmd).returncode == 0
    tiny_sample(tmp_path, ["b"], seed=1)  # b rewritten with another image under the same name
    done = runner(*cmd)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"sample.py: error: --references {tmp_path / 'refs'}: 'b' has changed since {out} made b_s0.png "
        "from it; restore it, delete its outputs (b_*.png) to make them anew, or use a new --output.dir"
    )
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before  # nothing rewritten
    (out / "b_s0.png").unlink()
    shard = [*cmd, "--num_shards", "2", "--shard_index", "1"]  # b, made anew by another part of OUT
    again = runner(*shard)
    assert again.returncode == 0 and "wrote 1 images" in again.stdout, again.stdout + again.stderr
    assert (out / "a_s0.png").read_bytes() == before["a_s0.png"]
    assert (out / "b_s0.png").read_bytes() != before["b_s0.png"]  # made from the new b
    assert runner(*shard).returncode == 0  # the new content is recorded (the old part's entry is stale)


def _start_together(out, seeds, monkeypatch) -> dict[int, str]:
    """``check_same_run`` of two runs (seeds) started at the same instant: each thread holds at
    its first fsync (writing its settings) until the other got there too. Each run's outcome."""
    barrier, fsync, held = threading.Barrier(2, timeout=30), os.fsync, set()

    def fsync_together(fd: int) -> None:
        if threading.get_ident() not in held:
            held.add(threading.get_ident())
            barrier.wait()
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_together)
    outcome = {}

    def start(index: int, seed: int) -> None:
        try:
            check_same_run(out, {**dict.fromkeys(SAME_RUN), "seed": seed}, {"model.sha256": "ab"})
            outcome[index] = "proceeds"
        except UsageError as error:
            outcome[index] = str(error)

    threads = [threading.Thread(target=start, args=item) for item in enumerate(seeds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcome


def test_two_runs_started_together_with_different_settings_one_proceeds(tmp_path, monkeypatch):
    settings = tmp_path / "out" / ".manifest" / "settings.json"
    outcome = _start_together(tmp_path / "out", (1, 2), monkeypatch)
    winners = [k for k, v in outcome.items() if v == "proceeds"]
    assert len(winners) == 1 and len(outcome) == 2, outcome
    winner, loser = (1, 2) if winners == [0] else (2, 1)
    assert (
        outcome[1 - winners[0]]
        == f"--seed {loser}: {tmp_path / 'out'} holds a run made with {winner} ({settings})"
    )
    assert json.loads(settings.read_text())["seed"] == winner
    assert not [p.name for p in settings.parent.iterdir() if p.name != "settings.json"]  # no temp left
    # the same settings started together: both proceed (shards, SLURM arrays, torchrun ranks)
    monkeypatch.undo()  # else the first fsync patch also holds a thread whose id was seen before
    assert _start_together(tmp_path / "same", (3, 3), monkeypatch) == {0: "proceeds", 1: "proceeds"}


def test_nan_weights_stop_sample_py_in_one_line_instead_of_black_images(runner, tmp_path):
    """A checkpoint with a NaN weight made black PNGs (NaN -> uint8 0) and exit status 0."""
    payload = torch.load(REPO / "checkpoints" / "demo.pt", weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.dtype.is_floating_point and v.ndim == 4)
    payload["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    done = runner(*tiny_sample(tmp_path, ["a", "b"]), "--model.checkpoint", str(tmp_path / "nan.pt"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("sample.py: error: sampling gave NaN/inf pixels in 2 of 2 images (seed ")
    )
    assert not list((tmp_path / "out").glob("*.png"))


def test_settings_file_without_hard_links(tmp_path, monkeypatch):
    """A filesystem without hard links (exFAT, some network mounts): written anyway, no temp left."""

    def no_links(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    config = {key: 1 for key in SAME_RUN}
    check_same_run(tmp_path, config, {})
    check_same_run(tmp_path, config, {})  # the same run again: accepted
    with pytest.raises(UsageError, match="holds a run made with"):
        check_same_run(tmp_path, {**config, "seed": 2}, {})
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["settings.json"]


def _hold(path, name: str, shared: bool = False) -> subprocess.Popen:
    """A live process of this host holding ``path/name`` (as a running merge or sample.py would;
    ``shared``: as a running shard holds ``OUT/.lock``)."""
    code = "import sys, time; from ilvr_toolkit.fileio import lock_folder; "
    code += "print(lock_folder(sys.argv[1], sys.argv[2], len(sys.argv) > 3), flush=True); time.sleep(600)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path), name, *(["shared"] if shared else [])],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert holder.stdout.readline().strip() == "None"
    return holder


def test_a_stale_merge_lock_is_taken_over_a_live_one_defers_and_merge_runs_from_anywhere(runner, tmp_path):
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b", "c"]) + ["--num_shards", "2"]
    assert runner(*cmd, "--shard_index", "0").returncode == 0
    assert runner(*cmd, "--shard_index", "1").returncode == 0 and (out / "manifest.json").exists()
    lock = out / ".shards" / "merge.lock"
    lock.touch()  # left by a killed merge (or an older version's O_EXCL lock): nobody holds it
    (out / "manifest.json").unlink()
    assert runner(*cmd, "--shard_index", "1").returncode == 0 and (out / "manifest.json").exists()
    (out / "manifest.json").unlink()
    holder = _hold(lock.parent, lock.name)
    try:
        done = runner(*cmd, "--shard_index", "1")  # a live merge: this shard leaves it to that one
        assert done.returncode == 0 and not (out / "manifest.json").exists()
        who = f"pid {holder.pid} on {socket.gethostname()}"
        assert f"{who} is merging the run ({lock})" in done.stderr
        merge = ["-m", "ilvr_toolkit.sampling.merge", str(out)]
        done = runner(*merge)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
            f"python -m ilvr_toolkit.sampling.merge: error: {out}: {who} is merging this run ({lock}); "
            "wait for it, or pass --force"
        )
        done = runner(
            *merge, "--force", cwd=tmp_path
        )  # another working directory: paths were stored absolute
        assert done.returncode == 0 and (out / "manifest.json").exists(), done.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
    stored = json.loads((out / ".shards.json").read_text())["config"]
    assert stored["model"]["checkpoint"] == str(REPO / "checkpoints" / "demo.pt")
    assert stored["references"] == str(tmp_path / "refs")


def test_a_second_sample_py_into_one_folder_is_refused_while_shards_run_side_by_side(runner, tmp_path):
    """A running one-process sample.py locked out only shard 0: shard 1 ran beside it."""
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b"])

    def refused(extra: list[str], holder: subprocess.Popen) -> None:
        done = runner(*cmd, *extra)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
            f"sample.py: error: --output.dir {out}: in use by pid {holder.pid} on {socket.gethostname()} "
            f"({out / '.lock'})"
        ), done.stderr[-2000:]

    holder = _hold(out, ".lock")  # a running one-process sample.py holds OUT/.lock
    try:
        for k in ([], ["0"], ["1"]):
            refused(["--num_shards", "2", "--shard_index", *k] if k else [], holder)
        assert not list(out.glob("*.png")) and not (out / ".shards.json").exists()  # refused: nothing fixed
    finally:
        holder.kill()
        holder.wait()
    holder = _hold(out, ".lock", shared=True)  # a running shard holds OUT/.lock shared
    try:
        refused([], holder)  # a one-process run beside a shard
        done = runner(*cmd, "--num_shards", "2", "--shard_index", "1")  # its own part, its own lock
        assert done.returncode == 0 and [p.name for p in out.glob("*.png")] == ["b_s0.png"], done.stderr
    finally:
        holder.kill()
        holder.wait()
    assert runner(*cmd, "--num_shards", "2", "--shard_index", "0").returncode == 0  # the holder is gone
    assert (out / "manifest.json").exists()


def test_a_refused_shard_fixes_nothing_and_the_merge_keeps_the_images_settings(runner, tmp_path):
    """A shard refused for its --seed stored its config in OUT/.shards.json: the merge wrote it."""
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b"])
    assert runner(*cmd).returncode == 0
    (out / "manifest.json").unlink()
    (out / "b_s0.png").unlink()  # a run stopped midway
    done = runner(*cmd, "--shard_index", "0", "--num_shards", "2", "--seed", "1")
    assert done.returncode == 2 and not (out / ".shards.json").exists(), done.stderr[-2000:]
    for k in ("0", "1"):
        assert runner(*cmd, "--shard_index", k, "--num_shards", "2").returncode == 0
    assert runner(*MERGE, str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 0 and manifest["num_images"] == 2
    record = json.loads((out / ".shards.json").read_text())
    record["config"]["seed"] = 1  # as an older version stored it
    (out / ".shards.json").write_text(json.dumps(record))
    done = runner(*MERGE, str(out))
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(
        f"python -m ilvr_toolkit.sampling.merge: error: {out / '.shards.json'}: its config is not the one "
        f"the images were made with (--seed 1: {out} holds a run made with 0"
    ), done.stderr[-2000:]


def test_a_stale_done_marker_is_no_finished_shard(runner, tmp_path):
    """Markers were never checked: references added or an output deleted, a rerun merged a subset."""
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b", "c", "d"]) + ["--num_shards", "2"]
    for k in ("0", "1"):
        assert runner(*cmd, "--shard_index", k).returncode == 0
    (out / "manifest.json").unlink()
    tiny_sample(tmp_path, ["e", "f"])  # appended: shard 1 is now d, e, f
    for why in ("finished with other references or settings", "d_s0.png missing"):
        done = runner(*cmd, "--shard_index", "0")
        assert done.returncode == 0 and not (out / "manifest.json").exists(), done.stderr[-2000:]
        assert f"shard 0 done; waiting for shards [1] ({why}) before the merge" in done.stderr
        merged = runner(*MERGE, str(out))
        assert merged.returncode == 2 and merged.stderr.strip().splitlines()[-1] == (
            f"python -m ilvr_toolkit.sampling.merge: error: {out}: shards [1] ({why}) of 2 are incomplete; "
            "rerun them (sbatch --array=<those> with the same command) or pass --force to merge what is there"
        )
        assert runner(*cmd, "--shard_index", "1").returncode == 0
        assert json.loads((out / "manifest.json").read_text())["num_images"] == 6
        (out / "manifest.json").unlink()
        (out / "d_s0.png").unlink()  # an output of shard 1 deleted


def test_the_rerun_check_compares_resolved_paths_and_the_model_by_its_digest(runner, tmp_path):
    """``refs/`` is ``refs``, ``./checkpoints/demo.pt`` the same model; a run stopped before its
    first image keeps its settings (a second run may be starting in it), and a reference put in
    front of the ones no image was made from is fine."""
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b"])
    assert runner(*cmd).returncode == 0
    same = [*cmd, "--references", f"{tmp_path / 'refs'}/", "--model.checkpoint", "./checkpoints/demo.pt"]
    done = runner(*same)
    assert done.returncode == 0 and "(2 already there)" in done.stdout, done.stderr[-2000:]
    for png in out.glob("*.png"):  # as a run stopped before its first image leaves the folder
        png.unlink()
    assert runner(*cmd, "--seed", "1").returncode == 2
    tiny_sample(tmp_path, ["0_first"])  # a reference in front: no image was made from the old order
    done = runner(*cmd)
    assert done.returncode == 0 and "wrote 3 images" in done.stdout, done.stderr[-2000:]


def test_a_fixed_reference_leaves_failed_references(runner, tmp_path):
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["cat"])
    (tmp_path / "refs" / "dog.png").write_bytes(b"not a png")
    assert runner(*cmd).returncode == 0
    assert list(json.loads((out / "manifest.json").read_text())["failed_references"]) == ["dog"]
    (tmp_path / "refs" / "dog.png").unlink()
    tiny_sample(tmp_path, ["dog"], seed=1)
    assert runner(*cmd).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "dog_s0.png" in manifest["images"] and manifest["failed_references"] == {}


def test_a_stop_signal_during_the_evaluation_is_one_line_and_leaves_no_old_metrics(runner, tmp_path):
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b"])  # FID: 2 images at least
    script = tmp_path / "preempted.py"  # sample.py whose metrics step is pre-empted midway
    script.write_text(
        "import os, signal, sys\nimport ilvr_toolkit.evaluation.runs as runs\n"
        "from ilvr_toolkit.sampling.cli import main\n"
        "runs.evaluate_translation = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)\n"
        "sys.exit(main(evaluate=runs.evaluate_run))\n"
    )
    out.mkdir()
    (out / "metrics.json").write_text('{"evaluate_against": "an earlier target"}')
    done = runner(str(script), *cmd[1:], "--evaluate_against", str(tmp_path / "refs"))
    assert done.returncode == 128 + signal.SIGTERM, (done.signal, done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1] == (
        "sample.py: stopped by signal 15 during the evaluation; rerun to evaluate"
    )
    assert (out / "manifest.json").exists() and not (out / "metrics.json").exists()


def test_a_read_only_output_folder_is_named(runner, tmp_path):
    """A finished run in a folder this user may not write: its mode for a plain user, a read-only
    bind mount in a private mount namespace for root (whom modes do not stop)."""
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    assert runner(*cmd).returncode == 0
    prefix = read_only_prefix(out)
    done = subprocess.run([*prefix, sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"sample.py: error: --output.dir {out}: not writable (permission denied)"
    ), done.stderr[-2000:]
    evaluate = evaluation_args(out, tmp_path / "refs")  # a finished run it cannot lock: evaluated
    done = subprocess.run(
        [*prefix, sys.executable, *evaluate], cwd=REPO, env=env, capture_output=True, text=True
    )
    out.chmod(0o755)
    assert done.returncode == 0 and "SSIM" in done.stdout + done.stderr, done.stderr[-2000:]


def evaluation_args(out: Path, refs: Path) -> list[str]:
    """The evaluation command (SSIM/PSNR/L2 at N=4, CPU) of ``tiny_sample``'s outputs in ``out``."""
    return [
        "-m",
        "ilvr_toolkit.evaluation",
        "--outputs",
        str(out),
        "--references",
        str(refs),
        "--factor",
        "4",
        "--device",
        "cpu",
    ]


def read_only_prefix(folder: Path) -> list[str]:
    """The command prefix that runs a command with ``folder`` read-only: a bind mount in a private
    mount namespace for root (whom modes do not stop), else the folder's mode (restore it after)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("root without mount namespaces here: no way to make a folder read-only for root")
    shell = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", shell, "sh"]


def test_a_failed_first_shard_does_not_fix_the_run_and_a_damaged_record_is_one_line(runner, tmp_path):
    """A first array attempt with a bad model wrote OUT/.shards.json (its count and config) for
    good; a damaged .shards.json was a KeyError/TypeError traceback in sample.py and in merge."""
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b", "c"])
    (tmp_path / "bad.pt").write_bytes(b"x")
    failed = runner(
        *cmd, "--shard_index", "0", "--num_shards", "2", "--model.checkpoint", str(tmp_path / "bad.pt")
    )
    assert failed.returncode == 1 and not (out / ".shards.json").exists(), failed.stderr[-2000:]
    done = runner(*cmd, "--shard_index", "0", "--num_shards", "3")
    assert done.returncode == 0 and json.loads((out / ".shards.json").read_text())["num_shards"] == 3
    for damaged in ('{"config": {}}', "[1, 2]", '{"num_shards": "two", "config": {}}'):
        (out / ".shards.json").write_text(damaged)
        for result in (
            runner(*cmd, "--shard_index", "1", "--num_shards", "3"),
            runner("-m", "ilvr_toolkit.sampling.merge", str(out)),
        ):
            lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("INFO ")]
            assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
            assert f"error: {out / '.shards.json'}: damaged" in lines[0] and "delete it" in lines[0], lines
    for damaged, why in (
        ('{"num_shards": 3, "conf', "not valid JSON"),  # truncated
        ('{"num_shards": 3, "config": {}}', "its config is not sample.py's (--model.checkpoint: no model"),
        ('{"num_shards": 3, "config": {"batch_size": "x"}}', "its config is not sample.py's (--batch_size x"),
    ):
        (out / ".shards.json").write_text(damaged)
        result = runner("-m", "ilvr_toolkit.sampling.merge", str(out))
        lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("INFO ")]
        assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
        assert f"error: {out / '.shards.json'}: {why}" in lines[0] and "delete it" in lines[0], lines


def test_a_folder_that_cannot_be_locked_is_worked_in_with_a_warning(tmp_path, monkeypatch, caplog):
    """A file system without POSIX locks (ENOLCK), or another user's lock file (EACCES on open):
    the run goes on as before locks existed, saying so, instead of a traceback."""
    import errno

    import ilvr_toolkit.fileio as fileio

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "lockf", no_locks)
    with caplog.at_level("WARNING", logger="ilvr_toolkit"):
        assert lock_folder(tmp_path / "a") is None
    monkeypatch.undo()
    (tmp_path / "b").mkdir()
    real_open = os.open

    def refused(path, *args):  # the lock file is another user's, 0644
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args)

    (tmp_path / "b" / ".lock").write_text("")
    monkeypatch.setattr(fileio.os, "open", refused)
    with caplog.at_level("WARNING", logger="ilvr_toolkit"):
        assert lock_folder(tmp_path / "b") is None
    said = [r.getMessage() for r in caplog.records]
    assert any("a/.lock: cannot lock it (No locks available)" in m for m in said), said
    assert any("b/.lock: cannot lock it (Permission denied)" in m for m in said), said


def test_a_lock_that_is_a_symbolic_link_is_refused_never_followed(runner, tmp_path):
    """OUT/.lock (and every other lock) linked to a file of the user's: it was truncated and
    overwritten with "pid host"; now it is refused, naming the link, and the file is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("DATA")
    for folder, name in ((tmp_path / "a", ".lock"), (tmp_path / "b" / ".shards", "merge.lock")):
        folder.mkdir(parents=True)
        (folder / name).symlink_to(victim)
        with pytest.raises(
            UsageError, match=f"^{folder / name}: a symbolic link, not a lock file; remove it$"
        ):
            lock_folder(folder, name)
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a"])
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    done = runner(*cmd)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"sample.py: error: {out / '.lock'}: a symbolic link, not a lock file; remove it"
    ), done.stderr[-2000:]
    assert victim.read_text() == "DATA"


def test_a_read_only_run_folder_is_named_by_train_py(world, tmp_path, monkeypatch):  # noqa: F811
    """train.py in a run folder on a read-only file system (a bind mount in a private mount
    namespace for root, the folder's mode for a plain user): a traceback-less one line naming
    --trainer.default_root_dir, exit 2, as sample.py's --output.dir; EROFS as lock_folder meets it."""
    import errno

    import ilvr_toolkit.fileio as fileio

    run = tmp_path / "run"
    run.mkdir()
    real_open = os.open

    def read_only(path, *args):  # a file system mounted read-only, as lock_folder meets it anywhere
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args)

    monkeypatch.setattr(fileio.os, "open", read_only)
    with pytest.raises(
        UsageError, match=r"^--x .*run: not writable \(Read-only file system: .*run/\.lock\)$"
    ):
        lock_folder(run, named=f"--x {run}")
    monkeypatch.undo()
    args = [fill(a, {**world, "tmp": str(tmp_path)}) for a in TRAIN]
    prefix = read_only_prefix(run)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*prefix, sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    run.chmod(0o755)
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and line.startswith(
        f"train.py: error: --trainer.default_root_dir {run}: not writable ("
    ), done.stderr[-2000:]
    assert line.endswith(f"{run / '.lock'})") and not list(run.iterdir())


def test_valid_json_of_another_layout_in_a_run_folder_is_one_line(runner, tmp_path):
    """A manifest part, settings.json or a shard's done marker of valid JSON but the wrong layout
    was an AttributeError/TypeError traceback: now one line naming the file (exit 1), or, for a
    done marker (which its shard rewrites), that shard counts as incomplete; a shard count that
    no run can have (10**12: merge looped for ever) is named damaged."""
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b"])
    assert runner(*cmd).returncode == 0
    part, settings = out / ".manifest" / "shard0-rank0.json", out / ".manifest" / "settings.json"
    good = {p: p.read_text() for p in (part, settings)}
    entry = json.loads(good[part])
    entry["images"]["a_s0.png"]["reference_index"] = "x"
    for path, text in (
        (part, "[]"),
        (settings, "[]"),
        (part, '{"images": [1, 2]}'),
        (part, json.dumps(entry)),
    ):
        path.write_text(text)
        done = runner(*cmd)
        assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
            f"sample.py: error: {path}: damaged (valid JSON, but not the layout ilvr_toolkit writes)"
        ), done.stderr[-2000:]
        path.write_text(good[path])
    sharded = tmp_path / "sharded"
    for k in (0, 1):
        assert (
            runner(
                *cmd, "--output.dir", str(sharded), "--num_shards", "2", "--shard_index", str(k)
            ).returncode
            == 0
        )
    marker, record = sharded / ".shards" / "0.done", sharded / ".shards.json"
    for made in ("5", "[1]"):
        marker.write_text(f'{{"planned": ["a_s0.png"], "made": {made}}}')
        done = runner(*MERGE, str(sharded))
        assert (
            done.returncode == 2
            and "shards [0] (finished with other references or settings)"
            in (done.stderr.strip().splitlines()[-1])
        ), done.stderr[-2000:]
    count = json.loads(record.read_text())
    record.write_text(json.dumps({**count, "num_shards": 10**12}))
    done = runner(*MERGE, str(sharded))
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(
        f"python -m ilvr_toolkit.sampling.merge: error: {record}: damaged (num_shards 1000000000000: "
    ), done.stderr[-2000:]


def test_evaluation_refuses_an_unfinished_or_running_sample_run(runner, tmp_path):
    """A killed run (parts in .manifest/, no manifest.json) and a running one (OUT/.lock held) were
    scored over the images there, exit 0; two evaluations may run side by side."""
    out, cmd = tmp_path / "out", tiny_sample(tmp_path, ["a", "b", "c"])
    assert runner(*cmd).returncode == 0
    evaluate = evaluation_args(out, tmp_path / "refs")
    assert lock_folder(out, shared=True) is None  # this process, as another evaluation of the folder
    assert runner(*evaluate).returncode == 0
    (out / "manifest.json").unlink()  # as a run killed after two of its three images left it
    part = out / ".manifest" / "shard0-rank0.json"
    record = json.loads(part.read_text())
    del record["images"]["c_s0.png"]
    part.write_text(json.dumps(record))
    done = runner(*evaluate)
    prog = "python -m ilvr_toolkit.evaluation: error: "
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"{prog}--outputs {out}: the sample.py run is not finished (no manifest.json; 2 images so far); "
        "rerun sample.py to finish it"
    ), done.stderr
    assert lock_folder(out) is None  # this process, as a sample.py run that works there
    done = runner(*evaluate)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"{prog}--outputs {out}: in use by pid {os.getpid()} on {socket.gethostname()} ({out / '.lock'}); "
        "evaluate it once it is done"
    ), done.stderr
