"""Scheduled jobs on a real SLURM (``.ci/slurm_up.sh`` starts a single-node cluster): the
journey of docs/cluster.md through ``sbatch``. Training at the first submission; pre-emption by
SIGUSR1 and by SIGTERM (checkpoint, one note line, requeue, resume to the same max_steps);
a signal to a step of two tasks, passed on only once both can take it;
a job array, a rerun of one task and the merge, equal to one process file for file.

Without ``sbatch`` these tests are skipped (outside CI only; with ``CI=true`` they fail). The
pre-emption handling itself is also tested without SLURM (first test).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clirunner import Done, shared
from PIL import Image

from ilvr_toolkit.data.prepare import build_lmdb

REPO = Path(__file__).resolve().parents[1]
TINY32 = REPO / "tests" / "fixtures" / "reference" / "tiny32.pt"
SMALL_UNET = json.dumps({"preset": "tiny16", "channel_mult": [1]})
FAST = ["--model.unet", SMALL_UNET, "--data.batch_size", "4", "--samples.every_n_steps", "0"]
TRACEBACK = re.compile(r"Traceback|killed by signal|exited unexpectedly")


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (CI starts a cluster with .ci/slurm_up.sh)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"no SLURM cluster answers (sinfo: {probe.stderr.strip() or probe.stdout.strip()})"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the SLURM tests: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def lmdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 random 16 px images: one batch of configs/tiny.yaml's 32 per epoch."""
    root = tmp_path_factory.mktemp("slurm_data")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(40):
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(image).resize((32, 32), Image.Resampling.BICUBIC).save(
            root / "images" / f"{i:03d}.png"
        )
    build_lmdb(root / "images", root / "tiny.lmdb", [16], workers=0, progress=False)
    return root / "tiny.lmdb"


# --------------------------------------------------------------------------- helpers
def sbatch(*args: str, env: dict[str, str] | None = None) -> str:
    """Submit from the repository root (the scripts find their helpers there), with this
    environment plus ``env`` (sbatch hands it to the job); the job id."""
    environ = {**os.environ, **(env or {})}
    done = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=REPO, capture_output=True, text=True, env=environ
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job: str, timeout: float = 300) -> dict[str, str]:
    """Poll until the job has ended (not requeued, not pending); its final scontrol fields."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        }:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} did not end within {timeout} s: {job_info(job)}")


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_for_line(log: Path, pattern: str, job: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and re.search(pattern, log.read_text(errors="replace"), re.MULTILINE):
            return
        if job_info(job).get("JobState") in ENDED:  # not REQUEUED / COMPLETING: a requeue passes through them
            break
        time.sleep(0.3)
    pytest.fail(f"no line {pattern!r} in {log}: {log.read_text() if log.is_file() else '(no log)'}")


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# --------------------------------------------------------------------------- without SLURM
def test_sigterm_saves_at_a_step_boundary_leaves_the_note_and_resumes(lmdb: Path, tmp_path: Path) -> None:
    """Preemption under SLURM's environment, without the scheduler: SIGTERM during training
    (one DataLoader worker, which receives it too) -> hpc_ckpt at the next step, the note,
    exit 0 without a traceback; the rerun resumes from it and stops at max_steps."""
    run_dir, note = tmp_path / "run", tmp_path / "note"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "ILVR_REQUEUE_NOTE": str(note),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ilvr-train",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    args = [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--data.path", str(lmdb)]
    args += [*FAST, "--data.workers", "1", "--trainer.default_root_dir", str(run_dir)]
    proc = subprocess.Popen(
        [*args, "--trainer.max_steps", "400"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # the first plain progress line: training (and the handler) is live
        lines.append(line)
        if line.startswith("step 1/"):
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in [proc.pid, *map(int, workers)]:  # as slurmstepd does: every process of the step
        os.kill(pid, signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert not TRACEBACK.search(out), out[-3000:]
    step = ckpt_step(run_dir / "hpc_ckpt_1.ckpt")
    assert 1 <= step < 400
    assert note.read_text() == f"saved checkpoint at step {step}\n"

    done = subprocess.run(
        [*args, "--trainer.max_steps", str(step + 2)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from {run_dir / 'hpc_ckpt_1.ckpt'}" in done.stdout + done.stderr
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == step + 2


def test_shard_count_is_fixed_and_the_merge_waits_for_every_shard(tmp_path: Path) -> None:
    """Outside SLURM: the first shard fixes the count; another count is refused (exit 2, one
    line); the merge command refuses while a shard is missing; the last shard merges."""
    out = tmp_path / "out"
    config = _sample_config(tmp_path, out)

    def sample(*args: str) -> Done:  # forked from the session's runner: no ~6 s of imports each
        return shared()("sample.py", "--config", str(config), "--progress", "false", *args)

    assert sample("--shard_index", "0", "--num_shards", "2").returncode == 0
    assert json.loads((out / ".shards.json").read_text())["num_shards"] == 2
    assert not (out / "manifest.json").exists()
    refused = sample("--shard_index", "0", "--num_shards", "3")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"sample.py: error: --num_shards 3: {out} holds a run of 2 shards ({out}/.shards.json); "
        "pass --num_shards 2, or another --output.dir"
    )
    waiting = shared()("-m", "ilvr_toolkit.sampling.merge", str(out))
    assert waiting.returncode == 2 and "shards [1] (not finished) of 2 are incomplete" in waiting.stderr
    assert sample("--shard_index", "1", "--num_shards", "2").returncode == 0
    assert json.loads((out / "manifest.json").read_text())["num_images"] == 4


# --------------------------------------------------------------------------- training jobs
def test_first_submission_trains_to_completion(cluster: None, lmdb: Path, tmp_path: Path) -> None:
    """The command of docs/cluster.md, no other sbatch option: COMPLETED, a log of plain
    progress lines, a checkpoint at max_steps. A ``CUDA_VISIBLE_DEVICES`` exported where the
    job was submitted (no GPU behind it) does not make it a GPU job."""
    run_dir = tmp_path / "run"
    job = sbatch(
        "scripts/slurm/train.sbatch", "configs/tiny.yaml", "--trainer.max_steps", "30",
        "--trainer.default_root_dir", str(run_dir), "--data.path", str(lmdb), env={"CUDA_VISIBLE_DEVICES": "0"},
    )  # fmt: skip
    info = wait_job(job)
    log = REPO / f"slurm-ilvr-train-{job}.out"
    text = log.read_text()
    shutil.move(log, tmp_path / log.name)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), text
    assert "cpu x 1 per node, 1 node(s), 1 threads, 0 workers" in text
    assert "warning: CUDA_VISIBLE_DEVICES=0 but SLURM gave the job no GPUs: running on the CPU" in text
    assert re.search(r"^step 30/30 ", text, re.MULTILINE), text
    assert "\r" not in text and not TRACEBACK.search(text), text
    assert "Tip:" not in text, text  # Lightning's cloud-service adverts are not in a job's log
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 30


def test_a_job_whose_first_argument_is_no_config_file_says_so(cluster: None, tmp_path: Path) -> None:
    """``sbatch SCRIPT --config F`` (the config file goes first): one line in the log, FAILED 2,
    not ``--config --config: cannot read``; no argument at all: the usage line. ``--chdir``
    elsewhere: one line, not ``python: can't open file DIR/train.py``."""
    cases = {
        "train": ("scripts/slurm/train.sbatch", "--config", "configs/tiny.yaml"),
        "sample": ("--array=0", "scripts/slurm/sample_array.sbatch", "--config", "configs/sample_demo.yaml"),
        "bare": ("scripts/slurm/train.sbatch",),
        "chdir": (f"--chdir={tmp_path}", "scripts/slurm/train.sbatch", "configs/tiny.yaml"),
    }
    jobs = {name: sbatch(f"--output={tmp_path}/{name}.out", *args) for name, args in cases.items()}
    chdir = jobs.pop("chdir")
    info, text = wait_job(chdir), (tmp_path / "chdir.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), text
    where = f"sbatch --chdir {tmp_path}: run the job from the repository root (train.py is not in {tmp_path})"
    assert text == f"error: {where}\n", text
    for name, job in jobs.items():
        info, text = wait_job(job), (tmp_path / f"{name}.out").read_text()
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), text
        got = "" if name == "bare" else "the config file comes first, got --config; "
        script = "sample_array.sbatch" if name == "sample" else "train.sbatch"
        assert text.startswith(f"error: {got}usage: sbatch "), text
        assert script in text and len(text.splitlines()) == 1, text


def test_two_task_jobs_named_bash_train_as_two_ranks_and_fail_once_on_a_mistake(
    cluster: None, lmdb: Path, tmp_path: Path
) -> None:
    """``--job-name=bash`` (Lightning reads bash/interactive as "srun not used"): the two tasks
    are ranks 0 and 1 of one DDP group (they used to be two rank-0 groups, EADDRINUSE, FAILED
    143). A mistake both tasks meet: its line once, FAILED 2 (srun's 143 for the task that
    --kill-on-bad-exit stopped used to win)."""
    run_dir, log, bad = tmp_path / "run", tmp_path / "train.out", tmp_path / "bad.out"
    args = ["--job-name=bash", "--ntasks-per-node=2", "scripts/slurm/train.sbatch", "configs/tiny.yaml"]
    args += FAST
    args += ["--data.path", str(lmdb), "--trainer.max_steps", "2"]
    job = sbatch(f"--output={log}", *args, "--trainer.default_root_dir", str(run_dir))
    failing = sbatch(
        f"--output={bad}", *args, "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path)
    )
    info, text = wait_job(job), log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "GLOBAL_RANK: 1" in text and not TRACEBACK.search(text), text
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 2
    info, text = wait_job(failing), bad.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), text
    assert len(re.findall(r"^train\.py: error: --trainer\.devices 1: ", text, re.MULTILINE)) == 1, text


def test_preempted_job_saves_requeues_and_resumes(cluster: None, lmdb: Path, tmp_path: Path) -> None:
    """One job pre-empted twice: ``scancel --signal=USR1 --batch`` (to the batch shell, as
    ``--signal=B:USR1@120`` near the time limit) while Python still starts (the shell keeps
    it until the training can save, then forwards it), then, once resumed,
    ``scancel --signal=TERM`` (to every task and DataLoader worker, as a pre-emption with grace
    time). Each time: a checkpoint, one note line, a requeue; the job ends at max_steps."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    job = sbatch(
        f"--output={log}", "--cpus-per-task=2", "scripts/slurm/train.sbatch", "configs/tiny.yaml",
        "--data.path", str(lmdb), *FAST, "--trainer.max_steps", "40", "--trainer.default_root_dir", str(run_dir),
    )  # fmt: skip
    wait_for_line(log, r"^job \d+ restart 0 on ", job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for_line(log, r"; requeued\n(.*\n)*step \d+/40 ", job)
    assert "got SIGUSR1 while python train.py starts; passing it on once it can save" in log.read_text()
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    info = wait_job(job)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), text
    notes = [int(s) for s in re.findall(r"^saved checkpoint at step (\d+); requeued$", text, re.MULTILINE)]
    assert len(notes) == 2 and 1 <= notes[0] < notes[1] < 40, text
    for step, after in zip(notes, text.split("; requeued")[1:], strict=True):
        # resumed from hpc_ckpt_K.ckpt or last.ckpt (same step); the next line is step S+1
        assert f"resuming from {run_dir}/" in after and f"\nstep {step + 1}/40 " in after, text
    assert "2 threads, 1 workers" in text and not TRACEBACK.search(text), text
    assert ckpt_step(run_dir / "hpc_ckpt_2.ckpt") == notes[1]
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 40
    assert re.search(r"^step 40/40 ", text, re.MULTILINE), text


def test_a_requeue_before_training_can_save_says_slurm_requeued_it(
    cluster: None, lmdb: Path, tmp_path: Path
) -> None:
    """``scontrol requeue`` while Python still starts: nothing is saved and SLURM requeues the job
    itself; the log says so (it used to say "not requeued: submit the same command again",
    which started a second copy)."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    job = sbatch(
        f"--output={log}", "scripts/slurm/train.sbatch", "configs/tiny.yaml", "--data.path", str(lmdb), *FAST,
        "--trainer.max_steps", "3", "--trainer.default_root_dir", str(run_dir),
    )  # fmt: skip
    wait_for_line(log, r"^job \d+ restart 0 on ", job)
    subprocess.run(["scontrol", "requeue", job], check=True)
    info = wait_job(job)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text
    assert "nothing saved; requeued by SLURM: it resumes from the last checkpoint" in text, text
    assert "not requeued" not in text and re.search(r"^step 3/3 ", text, re.MULTILINE), text


def test_a_job_that_may_not_be_requeued_says_so_once(cluster: None, lmdb: Path, tmp_path: Path) -> None:
    """``sbatch --no-requeue``, warned near its time limit: the checkpoint is saved and the log
    says the requeue failed (it used to say "requeued" first, then the failure)."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    job = sbatch(
        "--no-requeue", f"--output={log}", "scripts/slurm/train.sbatch", "configs/tiny.yaml", "--data.path",
        str(lmdb), *FAST, "--trainer.max_steps", "100000", "--trainer.default_root_dir", str(run_dir),
    )  # fmt: skip
    wait_for_line(log, r"^step 1/", job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_job(job)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "0"), text
    line = re.search(r"^saved checkpoint at step (\d+); (.*)$", text, re.MULTILINE)
    assert line is not None and line.group(2).startswith(f"error: scontrol requeue {job} failed"), text
    assert "; requeued" not in text and ckpt_step(run_dir / "hpc_ckpt_1.ckpt") == int(line.group(1)), text


TASK = """import os, sys, time
from pathlib import Path
from ilvr_toolkit.batchjob import StopSignals
rank, flags = os.environ["SLURM_PROCID"], Path(sys.argv[1])
while rank == "1" and not (flags / "go").exists():  # still importing: a signal now would end it
    time.sleep(0.1)
stop = StopSignals().start()
print(f"rank {rank} ready", flush=True)
while not stop.requested:
    time.sleep(0.1)
stop.stop()
print(f"rank {rank} stopped by signal {stop.signum}", flush=True)
while not (flags / "end").exists():  # finishing
    time.sleep(0.1)
"""


def test_two_task_step_gets_the_signal_once_every_task_is_ready(cluster: None, tmp_path: Path) -> None:
    """``--ntasks-per-node=2``, rank 1 slower to start than rank 0, a stale ready file of rank 1
    left by an earlier run of the job id: a signal to the batch shell waits until both tasks
    are ready, then reaches both; one while the tasks finish is not passed on, and says so."""
    (tmp_path / "task.py").write_text(TASK)
    script, log, tmp = tmp_path / "job.sh", tmp_path / "job.out", tmp_path / "tmp"
    script.write_text(
        '#!/bin/bash\nsource "${SLURM_SUBMIT_DIR}/scripts/slurm/common.sh" || exit 1\n'
        f"run_step python {tmp_path / 'task.py'} {tmp_path}\n"
    )
    tmp.mkdir()
    job = sbatch("--hold", "--ntasks-per-node=2", f"--output={log}", str(script), env={"TMPDIR": str(tmp)})
    node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True).stdout.strip()
    (tmp / f"ilvr-ready-{job}.{node}.1").touch()  # as if a killed run of this job id had left it
    subprocess.run(["scontrol", "release", job], check=True)
    wait_for_line(log, r"^rank 0 ready$", job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    starts = f"got SIGUSR1 while python {tmp_path / 'task.py'} starts; passing it on once it can save"
    wait_for_line(log, re.escape(starts), job)
    time.sleep(2)  # the batch shell looks every second
    (tmp_path / "go").touch()
    wait_for_line(log, r"^rank 1 stopped by signal 10$", job)
    wait_for_line(log, r"^rank 0 stopped by signal 10$", job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for_line(
        log, f"got SIGUSR1 while python {re.escape(str(tmp_path))}/task.py finishes; not passed on", job
    )
    (tmp_path / "end").touch()
    info = wait_job(job)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), text
    assert text.count(starts) == 1 and not TRACEBACK.search(text), text
    assert not list(tmp.iterdir()), text  # the ready files are gone with the step


# --------------------------------------------------------------------------- sampling arrays
def _sample_config(tmp_path: Path, out: Path, count: int = 4, steps: int = 8, batch: int = 2) -> Path:
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(refs / f"ref{i}.png")
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(
        f"model: {{checkpoint: {TINY32}, preset: tiny32}}\nreferences: {refs}\nsampler: {{respacing: '{steps}'}}\n"
        f"ilvr: {{factor: 4}}\nbatch_size: {batch}\ndevice: cpu\noutput: {{dir: {out}}}\n"
    )
    return config


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _entries(out: Path) -> dict[str, dict]:
    images = json.loads((out / "manifest.json").read_text())["images"]
    skip = ("seconds", "reference_stamp")  # timing; the files' mtimes (each run has its own copy)
    return {name: {k: v for k, v in entry.items() if k not in skip} for name, entry in images.items()}


def test_array_rerun_and_merge_equal_one_process(cluster: None, tmp_path: Path) -> None:
    """``--array=0-1``, then a rerun of task 0 (after losing its images) and of task 1
    (nothing to do); the last to finish writes the run's manifest and grid; the merge command
    writes the same; all equal to ``python sample.py`` of the same config."""
    out = tmp_path / "array"
    config = _sample_config(tmp_path, out)
    logs = f"--output={tmp_path}/%x-%A_%a.out"
    wrong = sbatch(
        "--array=1-2", logs, "scripts/slurm/sample_array.sbatch", str(config)
    )  # shard 0 would never run
    for k in (1, 2):
        info, text = wait_job(f"{wrong}_{k}"), (tmp_path / f"ilvr-sample-{wrong}_{k}.out").read_text()
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), text
        assert "sample.py: error: --array: this first submission runs 2 task(s), ids 1..2 (step 1)" in text, (
            text
        )
        assert "submit --array=0-2" in text, text
    assert not out.exists() or not any(out.iterdir())  # nothing fixed, nothing written
    array = sbatch("--array=0-1", logs, "scripts/slurm/sample_array.sbatch", str(config))
    infos = [wait_job(f"{array}_{k}") for k in range(2)]
    assert [(i["JobState"], i["ExitCode"]) for i in infos] == [("COMPLETED", "0:0")] * 2
    assert json.loads((out / ".shards.json").read_text())["num_shards"] == 2
    assert sorted(p.name for p in out.glob("*.png")) == ["grid.png", *(f"ref{i}_s0.png" for i in range(4))]
    first_manifest = _entries(out)

    for name in ["ref0_s0.png", "ref1_s0.png", "manifest.json"]:  # shard 0 lost (same batches on rerun)
        (out / name).unlink()
    rerun = sbatch("--array=0", logs, "scripts/slurm/sample_array.sbatch", str(config))  # an array of 1
    assert wait_job(f"{rerun}_0")["JobState"] == "COMPLETED"
    rerun_log = (tmp_path / f"ilvr-sample-{rerun}_0.out").read_text()
    assert "shard 0 of the run's 2 shards" in rerun_log and "wrote 2 images (0 already there)" in rerun_log
    assert _entries(out) == first_manifest  # merged again by the rerun
    again = sbatch("--array=1", logs, "scripts/slurm/sample_array.sbatch", str(config))
    assert wait_job(f"{again}_1")["JobState"] == "COMPLETED"
    assert "wrote 0 images (2 already there)" in (tmp_path / f"ilvr-sample-{again}_1.out").read_text()

    single = tmp_path / "single"
    done = shared()("sample.py", "--config", str(_sample_config(tmp_path, single)), "--progress", "false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(out) == _files(single)
    assert _entries(out) == _entries(single)

    (out / "manifest.json").unlink()
    merge = [sys.executable, "-m", "ilvr_toolkit.sampling.merge", str(out)]
    subprocess.run(merge, cwd=REPO, check=True, capture_output=True)
    assert _entries(out) == first_manifest


def test_two_tasks_per_array_task_split_its_shard(cluster: None, tmp_path: Path) -> None:
    """``--ntasks-per-node=2``: the two srun tasks of each array task split its shard (they used
    to both translate all of it as rank 0, and both merge); the result equals one process's."""
    out = tmp_path / "split"
    config = _sample_config(tmp_path, out, count=8, batch=1)
    logs = f"--output={tmp_path}/%a.out"
    array = sbatch(
        "--array=0-1", "--ntasks-per-node=2", logs, "scripts/slurm/sample_array.sbatch", str(config)
    )
    infos = [wait_job(f"{array}_{k}") for k in range(2)]
    texts = [(tmp_path / f"{k}.out").read_text() for k in range(2)]
    assert [(i["JobState"], i["ExitCode"]) for i in infos] == [("COMPLETED", "0:0")] * 2, texts
    for text in texts:  # 4 images per shard, 2 per task
        assert text.count("wrote 2 images (0 already there)") == 2 and "ILVR rank 1 2/2" in text, text
        assert not TRACEBACK.search(text), text
    single = tmp_path / "single"
    config = _sample_config(tmp_path, single, count=8, batch=1)
    done = shared()("sample.py", "--config", str(config), "--progress", "false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(out) == _files(single)
    entries, alone = _entries(out), _entries(single)
    ranks = [entry.pop("rank") for entry in entries.values()] + [e.pop("rank") for e in alone.values()]
    assert entries == alone and sorted(ranks[:8]) == [0] * 4 + [1] * 4  # each task wrote half its shard


def test_preempted_sampling_finishes_its_batch_requeues_and_resumes(cluster: None, tmp_path: Path) -> None:
    """A 2-task array stopped during its translation: task 1 (whose job id is the array's, the
    case ``scontrol show job ID`` lists every task for) by ``scancel --signal=USR1 --batch``,
    as near its time limit; task 0 by ``scontrol requeue``. Each writes the batch it is
    sampling, exits and comes back; the requeued task writes only the rest, the last merges."""
    out = tmp_path / "out"
    config = _sample_config(tmp_path, out, count=12, steps=50, batch=1)
    array = sbatch(
        "--array=0-1", f"--output={tmp_path}/%a.out", "scripts/slurm/sample_array.sbatch", str(config)
    )
    logs = [tmp_path / f"{k}.out" for k in range(2)]
    stops = {1: ["scancel", "--signal=USR1", "--batch"], 0: ["scontrol", "requeue"]}
    deadline = time.monotonic() + 240
    while stops and time.monotonic() < deadline:  # each as soon as its first batch is written
        for k in [k for k in stops if logs[k].is_file() and "ILVR 1/6 " in logs[k].read_text()]:
            subprocess.run([*stops.pop(k), f"{array}_{k}"], check=True)
        time.sleep(0.3)
    assert not stops, [log.read_text() for log in logs if log.is_file()]
    infos = [wait_job(f"{array}_{k}") for k in range(2)]
    texts = [log.read_text() for log in logs]
    for k, how in ((0, r"requeued by SLURM \(scontrol requeue or pre-emption\)"), (1, "requeued")):
        info = infos[k]
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), texts[k]
        first = re.search(
            # slurmstepd's "CANCELLED ... DUE TO JOB REQUEUE" may come first: "requeued" follows the requeue
            rf"^wrote (\d+) images \(0 already there\).*\n(?:slurmstepd.*\n)?"
            rf"stopped after a batch, \1 images written; {how}$",
            texts[k],
            re.MULTILINE,
        )
        assert first is not None and 1 <= int(first.group(1)) < 6, texts[k]
        written = int(first.group(1))
        assert f"wrote {6 - written} images ({written} already there)" in texts[k], texts[k]
        assert not TRACEBACK.search(texts[k]), texts[k]
    assert json.loads((out / "manifest.json").read_text())["num_images"] == 12
