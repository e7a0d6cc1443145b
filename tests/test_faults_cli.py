"""Issue 13 point 3: a fault matrix over every entry point, driven as a user drives them.

Each case runs the real command in its own process (``clirunner``) with one bad input and
checks what a user sees: a non-zero exit status (2 for a usage error), never a death by
signal, no traceback, at most two lines on stderr, and the flag, file or value named. Every
case fails before any heavy work (no training step, no sampling), so the matrix is fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clirunner import REPO
from PIL import Image

from ilvr_toolkit.data import build_lmdb

SMALL_UNET = json.dumps({"preset": "tiny16", "channel_mult": [1]})
TRAIN = ["train.py", "fit", "--config", "configs/tiny.yaml", "--data.path", "{lmdb}"]
TRAIN += ["--trainer.default_root_dir", "{tmp}/run", "--model.unet", SMALL_UNET, "--data.workers", "0"]
TRAIN += ["--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--data.batch_size", "2"]
EXPORT = ["train.py", "export"]
TINY32_PT = REPO / "tests" / "fixtures" / "reference" / "tiny32.pt"  # a plain state dict
TINY32_FLAGS = (
    "--learn_sigma True --num_res_blocks 1 --num_channels 32 --image_size 32 --channel_mult 1,2,2,2 "
)
TINY32_FLAGS += "--attention_resolutions 16 --num_heads 4 --timestep_respacing abc"
SAMPLE = ["sample.py", "--config", "configs/sample_demo.yaml", "--output.dir", "{tmp}/out"]
SAMPLE += ["--evaluate_against", "null", "--ilvr.factor", "4", "--progress", "false"]
PREPARE = ["-m", "ilvr_toolkit.data.prepare"]
EVALUATE = ["-m", "ilvr_toolkit.evaluation", "--device", "cpu"]
MERGE = ["-m", "ilvr_toolkit.sampling.merge"]

# (id, command, expected exit status (None: any non-zero), words the error must contain)
CASES = [
    # ---- train.py fit
    ("fit-steps-0", [*TRAIN, "--model.diffusion.steps", "0"], 2, ["--model.diffusion.steps", "0"]),
    (
        "fit-steps-1",
        [*TRAIN, "--model.diffusion.steps", "1", "--model.diffusion.noise_schedule", "cosine"],
        2,
        ["--model.diffusion.steps 1: expected an integer >= 2"],
    ),
    (
        "fit-respacing-1",
        [*TRAIN, "--model.diffusion.timestep_respacing", "1"],
        2,
        ["--model.diffusion.timestep_respacing '1': a diffusion needs at least 2 timesteps, got 1"],
    ),
    (
        "fit-linear-10-steps",
        [*TRAIN, "--model.diffusion.steps", "10"],
        2,
        ["--model.diffusion.steps 10", "T >= 21"],
    ),
    (
        "fit-p2-gamma-null",
        [*TRAIN, "--model.diffusion.p2_gamma", "null"],
        2,
        ["--model.diffusion.p2_gamma None"],
    ),
    ("fit-p2-k-negative", [*TRAIN, "--model.diffusion.p2_k", "-1"], 2, ["--model.diffusion.p2_k -1"]),
    (
        "fit-respacing-abc",
        [*TRAIN, "--model.diffusion.timestep_respacing", "abc"],
        2,
        ["timestep_respacing 'abc'"],
    ),
    ("fit-ema-device", [*TRAIN, "--ema.device", "gpu0"], 2, ["--ema.device gpu0", "cuda:N"]),
    ("fit-samples-images", [*TRAIN, "--samples.num_images", "-1"], 2, ["--samples.num_images -1"]),
    ("fit-samples-nrow", [*TRAIN, "--samples.nrow", "0"], 2, ["--samples.nrow 0"]),
    (
        "fit-preview-every",
        [*TRAIN, "--ilvr_preview.every_n_steps", "-5"],
        2,
        ["--ilvr_preview.every_n_steps -5"],
    ),
    ("fit-fid-batch", [*TRAIN, "--fid.batch_size", "0"], 2, ["--fid.batch_size 0"]),
    (
        "fit-last-minutes",
        [*TRAIN, "--checkpoint.last_every_minutes", "-1"],
        2,
        ["--checkpoint.last_every_minutes -1"],
    ),
    (
        "fit-accumulate-0",
        [*TRAIN, "--trainer.accumulate_grad_batches", "0"],
        2,
        ["--trainer.accumulate_grad_batches 0"],
    ),
    ("fit-log-every", [*TRAIN, "--trainer.log_every_n_steps", "-1"], 2, ["--trainer.log_every_n_steps -1"]),
    (
        "fit-clip-negative",
        [*TRAIN, "--trainer.gradient_clip_val", "-1"],
        2,
        ["--trainer.gradient_clip_val -1"],
    ),
    ("train-validate", ["train.py", "validate", *TRAIN[2:]], 2, ["'validate'", "choose from 'fit'"]),
    ("fit-model-null", [*TRAIN, "--config", "{model_null}"], 2, ["'model' is empty (null)"]),
    ("fit-bad-yaml", [*TRAIN, "--config", "{bad_yaml}"], 2, ["{bad_yaml}", "invalid YAML"]),
    ("fit-missing-yaml", [*TRAIN, "--config", "{tmp}/nope.yaml"], 2, ["nope.yaml"]),
    (
        "fit-unknown-key-yaml",
        [*TRAIN, "--config", "{unknown_yaml}"],
        2,
        ["'modle.unet'; did you mean model?"],
    ),
    ("fit-unknown-flag", [*TRAIN, "--no_such_flag", "1"], 2, ["--no_such_flag"]),
    (
        "fit-typo-nested-flag",
        [*TRAIN, "--model.diffusion.noise_schedul", "cosine"],
        2,
        ["--model.diffusion.noise_schedul: unknown option; did you mean --model.diffusion.noise_schedule?"],
    ),
    (
        "fit-typo-nested-yaml",
        [*TRAIN, "--config", "{typo_yaml}"],
        2,
        [
            "--config {typo_yaml}: unknown option 'model.diffusion.noise_schedul'; did you mean model.diffusion"
        ],
    ),
    (
        "fit-typo-no-match",
        [*TRAIN, "--data.zzz", "1"],
        2,
        ["--data.zzz: unknown option; valid keys under data: "],
    ),
    (
        "fit-abbreviated",
        [*TRAIN, "--model.optim.l", "1"],
        2,
        ["--model.optim.l: unknown option; did you mean"],
    ),
    ("fit-batch-0", [*TRAIN, "--data.batch_size", "0"], 2, ["--data.batch_size 0"]),
    ("fit-workers--1", [*TRAIN, "--data.workers", "-1"], 2, ["--data.workers -1"]),
    ("fit-max-steps-type", [*TRAIN, "--trainer.max_steps", "many"], 2, ["--trainer.max_steps", "many"]),
    ("fit-data-missing", [*TRAIN, "--data.path", "{tmp}/nowhere.lmdb"], 2, ["nowhere.lmdb"]),
    ("fit-init-missing", [*TRAIN, "--init_from", "{tmp}/none.pt"], 2, ["--init_from", "none.pt"]),
    ("fit-init-empty", [*TRAIN, "--init_from", "{empty}"], None, ["empty.pt"]),
    ("fit-ckpt-missing", [*TRAIN, "--ckpt_path", "{tmp}/none.ckpt"], 2, ["--ckpt_path", "none.ckpt"]),
    ("fit-ckpt-empty", [*TRAIN, "--ckpt_path", "{empty}"], None, ["empty.pt"]),
    ("fit-unet-preset", [*TRAIN, "--model.unet", "tiny99"], 2, ["tiny99"]),
    ("fit-schedule", [*TRAIN, "--model.diffusion.noise_schedule", "wavy"], 2, ["noise_schedule", "wavy"]),
    ("fit-ema-decay", [*TRAIN, "--ema.decay", "1.5"], 2, ["decay", "1.5"]),
    ("fit-lr", [*TRAIN, "--model.optim.lr", "-1"], 2, ["--model.optim.lr -1.0: expected a number >= 0"]),
    ("fit-betas", [*TRAIN, "--model.optim.betas", "[0.9,1.5]"], 2, ["--model.optim.betas (0.9, 1.5)"]),
    ("fit-warmup", [*TRAIN, "--model.optim.warmup_steps", "-5"], 2, ["--model.optim.warmup_steps -5"]),
    ("fit-last-every", [*TRAIN, "--checkpoint.last_every_n_steps", "-1"], 2, ["last_every_n_steps"]),
    (
        "fit-save-top-k",
        [*TRAIN, "--checkpoint.save_top_k", "-2"],
        2,
        ["--checkpoint.save_top_k -2: expected -1 (all), 0 (none) or K >= 1 (the newest K)"],
    ),
    ("fit-preview-respacing", [*TRAIN, "--samples.sampler.respacing", "0"], 2, ["respacing", "0"]),
    ("fit-root-under-file", [*TRAIN, "--trainer.default_root_dir", "{txt}/run"], None, ["notes.txt/run"]),
    # ---- train.py export
    ("export-missing", [*EXPORT, "{tmp}/none.ckpt"], 2, ["none.ckpt"]),
    ("export-empty", [*EXPORT, "{empty}"], None, ["empty.pt"]),
    ("export-not-torch", [*EXPORT, "{txt}"], None, ["notes.txt is not a PyTorch checkpoint (neither"]),
    ("export-weights", [*EXPORT, "{empty}", "--weights", "best"], 2, ["--weights", "best"]),
    # ---- sample.py
    ("sample-respacing-0", [*SAMPLE, "--sampler.respacing", "0"], 2, ["--sampler.respacing", "0"]),
    ("sample-respacing-syntax", [*SAMPLE, "--sampler.respacing", "10,x"], 2, ["--sampler.respacing", "10,x"]),
    ("sample-respacing-too-many", [*SAMPLE, "--sampler.respacing", "5000"], None, ["5000 steps"]),
    (
        "sample-respacing-1",
        [*SAMPLE, "--sampler.respacing", "1"],
        2,
        ["--sampler.respacing 1: a diffusion needs"],
    ),
    ("sample-shards-0", [*SAMPLE, "--num_shards", "0"], 2, ["--num_shards 0"]),
    (
        "sample-flags-no-unet",
        [
            *SAMPLE,
            "--model.flags",
            "--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --num_heads_upsample 0",
        ],
        2,
        ["--model.flags: num_heads_upsample must be -1 (unset) or >= 1, got 0"],
    ),
    (
        "sample-flags-groups",
        [*SAMPLE, "--model.flags", "--image_size 32 --num_channels 30 --num_res_blocks 1 --channel_mult 1,2"],
        2,
        ["--model.flags: num_channels (30) must be divisible by num_groups (32)"],
    ),
    (
        "sample-flags-respacing",
        [
            *SAMPLE,
            "--model.checkpoint",
            str(TINY32_PT),
            "--sampler.respacing",
            "null",
            "--model.flags",
            TINY32_FLAGS,
        ],
        2,
        ["--model.flags: --timestep_respacing abc: "],
    ),
    (
        "sample-preset-mismatch",
        [*SAMPLE, "--model.checkpoint", str(TINY32_PT), "--model.preset", "tiny16"],
        2,
        ["--model.preset: checkpoint ", "does not fit the UNet config"],
    ),
    (
        "sample-superres-factor",
        [*SAMPLE, "--task", "superres", "--ilvr.factor", "3"],
        2,
        ["--ilvr.factor 3: "],
    ),
    (
        "sample-plain-without-preset",
        [*SAMPLE, "--model.checkpoint", str(TINY32_PT)],
        2,
        ["--model.preset: ", "tiny32.pt is a plain state dict", "give --model.preset NAME or --model.flags"],
    ),
    ("sample-ddim-eta-2", [*SAMPLE, "--sampler.eta", "2"], 2, ["--sampler.eta 2", "0.0..1.0"]),
    ("sample-batch-0", [*SAMPLE, "--batch_size", "0"], 2, ["--batch_size 0"]),
    ("sample-spr-0", [*SAMPLE, "--samples_per_reference", "0"], 2, ["--samples_per_reference 0"]),
    ("sample-num-0", [*SAMPLE, "--unconditional", "--num_samples", "0"], 2, ["--num_samples 0"]),
    ("sample-eta", [*SAMPLE, "--sampler.method", "ddim", "--sampler.eta", "-1"], 2, ["--sampler.eta -1"]),
    ("sample-workers", [*SAMPLE, "--workers", "-1"], 2, ["--workers -1"]),
    ("sample-factor-divide", [*SAMPLE, "--ilvr.factor", "3"], 2, ["--ilvr.factor 3", "32"]),
    ("sample-range-t", [*SAMPLE, "--ilvr.range_t", "100000"], 2, ["--ilvr.range_t 100000"]),
    ("sample-unreadable-refs", [*SAMPLE, "--references", "{bad_images}"], None, ["{bad_images}"]),
    ("sample-empty-refs", [*SAMPLE, "--references", "{empty_dir}"], 2, ["--references {empty_dir}"]),
    ("sample-no-model", ["sample.py", "--seed", "1"], 2, ["--model.checkpoint: no model given"]),
    (
        "sample-out-dangling",
        [*SAMPLE, "--output.dir", "{dangling}"],
        2,
        ["--output.dir {dangling}: a dangling link"],
    ),
    ("sample-eval-typo", [*SAMPLE, "--evaluate_against", "{tmp}/typo.lmdb"], 2, ["--evaluate_against"]),
    (
        "sample-eval-not-data",
        [*SAMPLE, "--evaluate_against", "{empty_dir}"],
        2,
        ["--evaluate_against {empty_dir}"],
    ),
    ("sample-ckpt-text", [*SAMPLE, "--model.checkpoint", "{txt}"], None, ["notes.txt"]),
    ("sample-ckpt-empty", [*SAMPLE, "--model.checkpoint", "{empty}"], None, ["empty.pt"]),
    ("sample-model-null", [*SAMPLE, "--config", "{model_null}"], 2, ["'model' is empty (null)"]),
    ("sample-bad-yaml", [*SAMPLE, "--config", "{bad_yaml}"], 2, ["{bad_yaml}"]),
    ("sample-unknown-key", [*SAMPLE, "--config", "{unknown_yaml}"], 2, ["modle"]),
    ("sample-preset", [*SAMPLE, "--model.preset", "ffhq99"], 2, ["ffhq99"]),
    (
        "sample-out-under-file",  # named before the model loads, exit 2
        [*SAMPLE, "--output.dir", "{txt}/out"],
        2,
        ["--output.dir {txt}/out: cannot be made: {txt} is a file, expected a folder"],
    ),
    (
        "sample-out-unmakeable",
        [*SAMPLE, "--output.dir", "/sys/ilvr_out/x"],
        2,
        ["--output.dir /sys/ilvr_out/x"],
    ),
    ("sample-precision", [*SAMPLE, "--precision", "fp8"], 2, ["--precision", "fp8"]),
    ("sample-seed-type", [*SAMPLE, "--seed", "1.5"], 2, ["--seed", "1.5"]),
    # ---- the dataset converter
    (
        "prepare-quality-500",
        [*PREPARE, "{images}", "--out", "{tmp}/o.lmdb", "--size", "16", "--quality", "500"],
        2,
        ["--quality 500"],
    ),
    (
        "prepare-quality--5",
        [*PREPARE, "{images}", "--out", "{tmp}/o.lmdb", "--size", "16", "--quality", "-5"],
        2,
        ["--quality -5"],
    ),
    (
        "prepare-workers",
        [*PREPARE, "{images}", "--out", "{tmp}/o.lmdb", "--size", "16", "--workers", "-1"],
        2,
        ["--workers -1"],
    ),
    ("prepare-missing", [*PREPARE, "{tmp}/none", "--out", "{tmp}/o.lmdb", "--size", "16"], 2, ["none"]),
    ("prepare-size", [*PREPARE, "{images}", "--out", "{tmp}/o.lmdb", "--size", "4"], 2, ["--size 4"]),
    (
        "prepare-out-under-file",
        [*PREPARE, "{images}", "--out", "{txt}/o.lmdb", "--size", "16"],
        2,
        ["--output.dir", "notes.txt is a file, expected a folder"],
    ),
    (
        "prepare-report-not-json",  # notes.txt would be replaced by the report
        [*PREPARE, "{images}", "--out", "{tmp}/o.lmdb", "--size", "16", "--output.report", "{txt}"],
        2,
        ["--output.report", "notes.txt: exists and is not a report file"],
    ),
    ("prepare-bad-yaml", [*PREPARE, "--config", "{bad_yaml}"], 2, ["{bad_yaml}"]),
    # ---- evaluation
    ("eval-nothing", [*EVALUATE], 2, ["--outputs"]),
    ("eval-outputs-missing", [*EVALUATE, "--outputs", "{tmp}/none", "--references", "{images}"], 2, ["none"]),
    ("eval-target-missing", [*EVALUATE, "--outputs", "{images}", "--target", "{tmp}/t.lmdb"], 2, ["t.lmdb"]),
    (
        "eval-outputs-empty",
        [*EVALUATE, "--outputs", "{empty_dir}", "--references", "{images}"],
        2,
        ["--outputs {empty_dir}"],
    ),
    (
        "eval-refs-empty",
        [*EVALUATE, "--outputs", "{images}", "--references", "{empty_dir}"],
        2,
        ["--references"],
    ),
    (
        "eval-batch-0",
        [*EVALUATE, "--outputs", "{images}", "--references", "{images}", "--batch_size", "0"],
        2,
        ["--batch_size 0"],
    ),
    (
        "eval-factor-0",
        [*EVALUATE, "--outputs", "{images}", "--references", "{images}", "--factor", "0"],
        2,
        ["--factor 0"],
    ),
    # ---- merge of a sharded run
    ("merge-missing", [*MERGE, "{tmp}/none"], 2, ["none: no such folder"]),
    ("merge-not-sharded", [*MERGE, "{empty_dir}"], 2, ["{empty_dir}"]),
    ("merge-bad-json", [*MERGE, "{bad_shards}"], None, [".shards.json"]),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """The files the cases name: good and bad inputs, built once."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    build_lmdb(images, root / "tiny.lmdb", [16], workers=0, progress=False)
    (root / "bad_images").mkdir()
    for i in range(3):
        (root / "bad_images" / f"{i}.png").write_bytes(b"not a png")
    (root / "empty_dir").mkdir()
    (root / "notes.txt").write_text("not what was asked for\n")
    (root / "empty.pt").write_bytes(b"")
    (root / "bad.yaml").write_text("model:\n  unet: tiny16\n unet: x\n")
    (root / "model_null.yaml").write_text("model:\n")
    (root / "unknown.yaml").write_text("modle:\n  unet: tiny16\n")
    (root / "typo.yaml").write_text("model:\n  diffusion:\n    noise_schedul: cosine\n")
    (root / "bad_shards").mkdir()
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "bad_shards" / ".shards.json").write_text("{ not json")
    names = (
        "images",
        "bad_images",
        "empty_dir",
        "notes.txt",
        "empty.pt",
        "bad.yaml",
        "model_null.yaml",
        "dangling",
    )
    paths = {
        name.split(".")[0]: str(root / name) for name in (*names, "unknown.yaml", "typo.yaml", "bad_shards")
    }
    return {
        **paths,
        "txt": paths["notes"],
        "empty": paths["empty"],
        "lmdb": str(root / "tiny.lmdb"),
        "tmp": str(root),
        "bad_yaml": paths["bad"],
        "unknown_yaml": paths["unknown"],
        "typo_yaml": paths["typo"],
    }


def tiny_sample(tmp_path: Path, names: list[str], seed: int = 0) -> list[str]:
    """sample.py with the demo model, 2 steps, into TMP/out, on TMP/refs where random images
    ``names`` (40x40) are added."""
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(refs / f"{name}.png")
    return [
        *fill_all(SAMPLE, {"tmp": str(tmp_path)}),
        "--references",
        str(refs),
        "--sampler.respacing",
        "2",
        "--samples_per_reference",
        "1",
    ]


def fill_all(args: list[str], world: dict[str, str]) -> list[str]:
    return [fill(arg, world) for arg in args]


def fill(text: str, world: dict[str, str]) -> str:
    for key, value in world.items():
        text = text.replace("{" + key + "}", value)
    return text


# Found only when the Trainer is built, the dataset opened or the callbacks set up, after Lightning
# printed its seed and device lines: the error is one line naming the file or value, but stderr
# has up to 6 ("poor").
POOR = [
    ("fit-data-is-file", [*TRAIN, "--data.path", "{txt}"], None, ["notes.txt"]),
    ("fit-preview-factor", [*TRAIN, "--ilvr_preview.ilvr.factor", "3"], None, ["factor=3", "16"]),
    ("fit-devices-0", [*TRAIN, "--trainer.devices", "0"], 2, ["--trainer.devices 0", "not a valid input"]),
    ("fit-max-time", [*TRAIN, "--trainer.max_time", "10min"], 2, ["--trainer.max_time 10min", "DD:HH:MM:SS"]),
    (
        "fit-sbatch-option",
        [*TRAIN, "--ntasks-per-node=2"],
        2,
        ["--ntasks-per-node: unknown", "before the script"],
    ),
    # a preview's or the FID monitor's sampler: refused before the first step, not at its first run
    (
        "fit-samples-respacing-1",
        [*TRAIN, "--samples.sampler.method", "ddpm", "--samples.sampler.respacing", "1"],
        2,
        ["--samples.sampler.respacing 1: a diffusion needs at least 2 timesteps, got 1"],
    ),
    (
        "fit-preview-range-t",
        [*TRAIN, "--ilvr_preview.sampler.respacing", "3", "--ilvr_preview.ilvr.range_t", "5"],
        2,
        ["--ilvr_preview.ilvr.range_t 5: range_t=5 outside [-1, 2]"],
    ),
    (
        "fit-fid-respacing",
        [*TRAIN, "--fid.every_n_steps", "1", "--fid.sampler.respacing", "ddim1"],
        2,
        ["--fid.sampler.respacing ddim1: cannot keep exactly 1 of 1000 steps"],
    ),
    (
        "fit-batch-over-data",
        [*TRAIN, "--data.batch_size", "8"],
        2,
        ["--data.batch_size 8", "4 images", "at most 4"],
    ),
]


def check_one_line(done, expected: int | None, words: list[str], max_lines: int = 2) -> str:
    """The matrix's verdict on one command: '' when handled well, else why not."""
    lines = done.stderr.strip().splitlines()
    if done.signal is not None:
        return f"crash: killed by signal {done.signal}"
    if "Traceback" in done.stderr or not lines:
        return "crash: traceback or no message"
    if done.returncode == 0 or (expected is not None and done.returncode != expected):
        return f"poor: exit status {done.returncode}"
    if len(lines) > max_lines or not lines[-1].split(": error: ")[1:]:
        return f"poor: {len(lines)} lines"
    missing = [w for w in words if w not in lines[-1]]
    return f"poor: {missing} not named" if missing else ""


@pytest.mark.parametrize(
    ("command", "expected", "words", "max_lines"),
    [(*c[1:], 2) for c in CASES] + [(*c[1:], 8) for c in POOR],
    ids=[c[0] for c in CASES + POOR],
)
def test_fault_matrix(runner, world, tmp_path, command, expected, words, max_lines):
    world = {**world, "tmp": str(tmp_path)}
    done = runner(*[fill(arg, world) for arg in command])
    verdict = check_one_line(done, expected, [fill(w, world) for w in words], max_lines)
    assert verdict == "", f"{verdict}\n{done.stderr[-3000:]}"
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "out").exists()


def test_fresh_interpreters_and_debug(runner, world, tmp_path):
    """A case through a plain ``python train.py`` (no zygote: the forked commands behave the
    same), and ``--debug`` through the runner."""
    cmd = [fill(arg, {**world, "tmp": str(tmp_path)}) for arg in [*TRAIN, "--model.diffusion.steps", "0"]]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    fresh = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO, env=env)
    for done, debug in ((fresh, False), (runner(*cmd, "--debug"), True)):
        assert done.returncode == 2 and ("Traceback" in done.stderr) == debug, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("train.py: error: --model.diffusion.steps 0")


def test_out_of_memory_is_one_line_naming_the_batch_size(tmp_path, capsys):
    """The CPU allocator's RuntimeError (4 GiB of address space), and CUDA's OutOfMemoryError."""
    import resource

    import torch

    from ilvr_toolkit.cli import run_command

    cmd = [
        "sample.py",
        "--model.checkpoint",
        "checkpoints/demo.pt",
        "--unconditional",
        "true",
        "--threads",
        "1",
    ]
    cmd += ["--num_samples", "4096", "--batch_size", "4096", "--sampler.respacing", "2", "--device", "cpu"]
    limit = (4 * 2**30, 4 * 2**30)
    done = subprocess.run(
        [sys.executable, *cmd, "--output.dir", str(tmp_path / "out")], capture_output=True, text=True,
        cwd=REPO, timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, limit),
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "sample.py: error: out of memory at --batch_size 4096 (DefaultCPUAllocator: can't allocate memory"
        )
    )

    def cuda(_: list[str]) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total ...")

    assert run_command("train.py", cuda, [], memory=lambda: "--data.batch_size 64") == 1
    assert capsys.readouterr().err == (
        "train.py: error: out of memory at --data.batch_size 64 (CUDA out of memory. Tried to allocate "
        "2.00 GiB); lower --data.batch_size and rerun\n"
    )
