"""One CLI language (issue 12 point 3, issue 13 point 3): the dataset converter and sample.py
driven as a user drives them. ``--help`` lists every option with its type and default,
``--print_config`` round-trips through ``--config``, a mistake is ONE line on stderr naming
the flag, value or file with exit status 2, and ``--debug`` adds the traceback."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from clirunner import Done, shared
from PIL import Image

from ilvr_toolkit.cli import UsageError, normalize_options, parse_options
from ilvr_toolkit.data import read_info, read_names
from ilvr_toolkit.data.prepare import BuildSettings
from ilvr_toolkit.data.prepare import build_parser as prepare_parser
from ilvr_toolkit.evaluation.runs import check_evaluation, evaluate_run
from ilvr_toolkit.models import load_model, save_model_file, save_plain_state_dict
from ilvr_toolkit.sampling import SampleConfig
from ilvr_toolkit.sampling.cli import build_parser as sample_parser
from ilvr_toolkit.sampling.cli import main as sample_main

REPO = Path(__file__).resolve().parents[1]
PREPARE = [sys.executable, "-m", "ilvr_toolkit.data.prepare"]
SAMPLE = [sys.executable, str(REPO / "sample.py")]
DEMO_CONFIG = REPO / "configs" / "sample_demo.yaml"


def _run(cmd: list[str], env: dict[str, str] | None = None) -> Done:
    """``cmd`` (``python ...``) in its own process forked from the session's runner (a fresh
    interpreter per command would spend ~6 s importing torch; test_faults_cli starts real ones)."""
    return shared()(*cmd[1:], env=env)


def _flat(text: str) -> str:
    """``--help`` text on one line; jsonargparse < 4.53 (allowed by pyproject) writes a type's
    None as ``None``, later ones as ``null``."""
    return " ".join(text.split()).replace("| None", "| null")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three good 24x20 images and one file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


# --------------------------------------------------------------------------- --help
def test_prepare_help_lists_every_option_with_type_and_default():
    done = _run([*PREPARE, "--help"])
    assert done.returncode == 0, done.stderr
    text = _flat(done.stdout)
    for option in ("--config", "--print_config", "--debug", "--output.dir", "--output.report", "--size"):
        assert option in text, option
    for expected in (
        "(required, type: str)",  # source, --output.dir
        "--quality QUALITY JPEG quality, 1-100. (type: int, default: 95)",
        "(type: Literal['png', 'jpeg'], default: png)",
        "(type: int, default: 0)",  # --compress_level
        "(type: int | null, default: null)",  # --workers
        "--strict {true,false}",
        "--overwrite {true,false}",
        "--progress {true,false}",
        "(alias: --out)",
    ):
        assert expected in text, expected
    hidden = {"start_method", "map_size", "commit_bytes"}  # Python API only
    for name in sorted({f.name for f in fields(BuildSettings)} - hidden):
        assert f"--{name} " in text, name


def test_sample_help_lists_the_shared_options():
    done = _run([*SAMPLE, "--help"])
    assert done.returncode == 0, done.stderr
    text = _flat(done.stdout)
    for expected in (
        "--debug",
        "--print_config",
        "--device DEVICE",
        "(type: str, default: auto)",
        "--seed SEED",
        "--batch_size BATCH_SIZE",
        "--output.dir DIR",
        "--progress {true,false}",
        "--workers WORKERS",
        "--threads THREADS",
        "(type: int | null, default: null)",
        "--sampler.respacing RESPACING",
    ):
        assert expected in text, expected


# --------------------------------------------------------------------------- --print_config
def test_prepare_print_config_round_trips_through_config(images, tmp_path):
    out = tmp_path / "data.lmdb"
    printed = _run(
        [*PREPARE, str(images), "--out", str(out), "--size", "8", "--size", "16", "--print_config"]
    )
    assert printed.returncode == 0, printed.stderr
    assert not out.exists()  # printing builds nothing
    config = tmp_path / "prepare.yaml"
    config.write_text(printed.stdout)
    again = _run([*PREPARE, "--config", str(config), "--print_config"])
    assert again.returncode == 0 and again.stdout == printed.stdout
    assert "size:\n- 8\n- 16\n" in printed.stdout and f"dir: {out}" in printed.stdout
    built = _run([*PREPARE, "--config", str(config), "--no-progress", "--workers", "0"])
    assert built.returncode == 0, built.stderr
    assert read_info(out).sizes == (8, 16) and read_names(out) == ["0.png", "1.png", "2.png"]
    assert "skipped 1" in built.stdout and "broken.png" in built.stdout


def test_sample_print_config_round_trips_through_config(tmp_path):
    printed = _run([*SAMPLE, "--config", str(DEMO_CONFIG), "--threads", "1", "--print_config"])
    assert printed.returncode == 0, printed.stderr
    assert "threads: 1" in printed.stdout and "workers: 4" in printed.stdout
    config = tmp_path / "sample.yaml"
    config.write_text(printed.stdout)
    again = _run([*SAMPLE, "--config", str(config), "--print_config"])
    assert again.returncode == 0 and again.stdout == printed.stdout


# --------------------------------------------------------------------------- user errors
def _one_error_line(done: Done, prog: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--quality", "500"], "--quality 500: expected an integer in 1..100"),
        (["--quality", "-5"], "--quality -5"),
        (["--workers", "-1"], "--workers -1: expected an integer >= 0"),
        (["--size", "4"], "--size 4: expected an integer >= 8"),
        (["--size", "x"], "--size x"),
        (["--format", "gif"], "--format gif: expected one of png, jpeg"),
        (["--compress_level", "10"], "--compress_level 10"),
        (["--bogus", "1"], "--bogus: unknown option; valid keys: compress_level, config, format"),
    ],
)
def test_prepare_bad_value_is_one_line_exit_2(images, tmp_path, extra, named):
    out = tmp_path / "never.lmdb"
    done = _run([*PREPARE, str(images), "--out", str(out), "--size", "16", *extra])
    assert named in _one_error_line(done, "python -m ilvr_toolkit.data.prepare")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing started


def test_prepare_missing_source_and_bad_config_files(tmp_path):
    prog = "python -m ilvr_toolkit.data.prepare"
    missing = tmp_path / "no_such_folder"
    line = _one_error_line(
        _run([*PREPARE, str(missing), "--out", str(tmp_path / "o.lmdb"), "--size", "16"]), prog
    )
    assert str(missing) in line and "no such file or folder" in line
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("size: [16\noutput: {dir: x}\n")
    line = _one_error_line(_run([*PREPARE, "--config", str(bad_yaml)]), prog)
    assert f"--config {bad_yaml}: invalid YAML at line 2" in line
    line = _one_error_line(_run([*PREPARE, "--config", str(tmp_path / "absent.yaml")]), prog)
    assert "absent.yaml: cannot read" in line
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("sizes: 16\n")
    line = _one_error_line(_run([*PREPARE, "--config", str(unknown)]), prog)
    assert f"--config {unknown}: unknown option 'sizes'" in line
    unknown.write_text("output:\n  dirr: x\n")  # a typo one level down
    line = _one_error_line(_run([*PREPARE, "--config", str(unknown)]), prog)
    assert f"--config {unknown}: unknown option 'output.dirr'; did you mean output.dir?" in line
    for text, got in (("", "nothing"), ("- 16\n", "a list")):
        unknown.write_text(text)
        line = _one_error_line(_run([*PREPARE, "--config", str(unknown)]), prog)
        assert line.endswith(f"--config {unknown}: expected options (key: value lines), got {got}"), line
    assert "source" in _one_error_line(
        _run([*PREPARE, "--out", str(tmp_path / "o.lmdb"), "--size", "16"]), prog
    )


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--batch_size", "0"], "--batch_size 0: expected an integer >= 1"),
        (["--samples_per_reference", "0"], "--samples_per_reference 0"),
        (["--num_samples", "0"], "--num_samples 0"),
        (["--sampler.respacing", "0"], "--sampler.respacing '0'"),
        (["--sampler.eta", "-1"], "--sampler.eta -1.0: expected a number in 0.0..1.0"),
        (["--num_shards", "0"], "--num_shards 0"),
        (["--shard_index", "2", "--num_shards", "2"], "--shard_index 2: expected an integer in 0..1"),
        (["--ilvr.factor", "0"], "--ilvr.factor 0"),
        (["--ilvr.range_t", "null", "--ilvr.fraction", "1.5"], "--ilvr.fraction 1.5"),
        (["--threads", "0"], "--threads 0: expected an integer >= 1"),
        (["--workers", "-1"], "--workers -1"),
        (["--device", "gpu"], "--device gpu: expected auto, cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:99"], "--device cuda:99: this machine has "),
        (["--seed", "-1"], "--seed -1: expected an integer >= 0"),
        (["--ilvr.factor", "[]"], "--ilvr.factor []: expected at least one factor N"),
        (["--ilvr.factor", "[4,4]"], "--ilvr.factor [4, 4]: 4 given twice; expected distinct factors N"),
        (["--ilvr.factor", "3"], "--ilvr.factor 3: expected a divisor of the model's image size 32"),
        (["--sampler.respacing", "2000"], "--sampler.respacing 2000: cannot keep 2000 steps"),
        (
            ["--sampler.respacing", "1"],
            "--sampler.respacing 1: a diffusion needs at least 2 timesteps, got 1",
        ),
        (
            ["--sampler.method", "ddim", "--sampler.respacing", "1"],
            "--sampler.respacing 1: a diffusion needs at least 2 timesteps, got 1",
        ),
        (["--ilvr.range_t", "200"], "--ilvr.range_t 200: range_t=200 outside [-1, 99]"),
        (["--task", "inpaint", "--mask", "configs"], "--mask configs: not a readable image"),
        (
            ["--inception_weights", "configs/demo.yaml"],
            "--inception_weights configs/demo.yaml: not a weights file",
        ),
        (["--output.dir", ""], "--output.dir: empty; expected a folder"),
        (["--output.dir", "README.md"], "--output.dir README.md: is a file, expected a folder"),
        (["--output.dir", "datasets/demo_references/out"], "inside --references datasets/demo_references"),
        (["--batch_size", "many"], "--batch_size many: expected int"),
        (["--sampler.method", "euler"], "--sampler.method euler: expected one of ddpm, ddim"),
        (["--no_such_option", "1"], "--no_such_option: unknown option; valid keys: batch_size"),
        (
            ["--model.checkpoint", "checkpoints/nope.pt"],
            "--model.checkpoint checkpoints/nope.pt: no such file (nothing is downloaded: checkpoints/README.md",
        ),
        (["--references", "no/such/folder"], "--references no/such/folder: no such file or folder"),
        (["--evaluate_against", "datasets/typo.lmdb"], "--evaluate_against datasets/typo.lmdb: no such"),
        (["--inception_weights", "nope.pth"], "--inception_weights nope.pth: no such file or folder"),
    ],
)
def test_sample_bad_value_is_one_line_exit_2(capsys, monkeypatch, tmp_path, extra, named):
    """The real ``sample.py`` entry point, in this process (a subprocess per case would spend
    most of the time importing torch); the subprocess path is checked just below."""
    monkeypatch.chdir(REPO)  # the demo config's paths are relative to the repository
    args = ["--config", str(DEMO_CONFIG), "--output.dir", str(tmp_path / "out"), *extra]
    code = sample_main(args, evaluate=evaluate_run, check=check_evaluation)  # what sample.py passes
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sample.py: error: "), captured.err
    assert named in lines[0] and not (tmp_path / "out").exists()


def _demo_args(path: Path, tmp_path: Path, *extra: str) -> list[str]:
    """sample.py's arguments: the demo config with the model file ``path``, into TMP/o."""
    return [
        "--config",
        str(DEMO_CONFIG),
        "--model.checkpoint",
        str(path),
        "--output.dir",
        str(tmp_path / "o"),
        *extra,
    ]


@pytest.mark.parametrize(
    ("stored", "named"),
    [
        (
            {"steps": 50},
            "the default respacing '100' (set --sampler.respacing): cannot keep 100 steps",
        ),
        ({"timestep_respacing": "ddim999"}, "its timestep_respacing 'ddim999' (set --sampler.respacing): "),
    ],
)
def test_sample_names_the_checkpoints_respacing_when_none_is_given(
    capsys, monkeypatch, tmp_path, stored, named
):
    """A respacing the model file brings (or the default) that its steps cannot take is the
    file's, not a ``--sampler.respacing None``."""
    monkeypatch.chdir(REPO)
    demo = load_model("checkpoints/demo.pt")
    path = tmp_path / "model.pt"
    save_model_file(path, demo.unet_config, demo.model.state_dict(), diffusion={**demo.diffusion, **stored})
    args = _demo_args(path, tmp_path, "--sampler.respacing", "null")
    code = sample_main(args, evaluate=evaluate_run, check=check_evaluation)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"sample.py: error: {path}: " in lines[0], lines
    assert named in lines[0] and "None" not in lines[0]


def test_sample_names_the_checkpoint_whose_stored_diffusion_settings_are_unknown(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.chdir(REPO)
    demo = load_model("checkpoints/demo.pt")
    path = tmp_path / "model.pt"
    unet, weights = demo.unet_config.to_dict(), demo.model.state_dict()  # save_model_file refuses this
    payload = {"format": "ilvr_toolkit.model/1", "unet": unet, "diffusion": {"diffusion_steps": 50}}
    torch.save({**payload, "state_dict": weights, "extra": {}}, path)  # a file written by other code
    assert sample_main(_demo_args(path, tmp_path), evaluate=evaluate_run, check=check_evaluation) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"sample.py: error: {path}: its stored diffusion settings: "
    )
    assert "unknown diffusion setting key diffusion_steps (known keys: " in lines[0]


DEMO_FLAGS = (
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2,2 --attention_resolutions 8 "
    "--num_head_channels 32 --use_scale_shift_norm True --learn_sigma True"
)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (
            "--noise_schedule Cosine",
            "--model.flags: unknown beta schedule 'Cosine'; expected 'linear' or 'cosine'",
        ),
        ("--diffusion_steps 10", "--model.flags: --diffusion_steps 10: the linear schedule needs T >= 21"),
    ],
)
def test_sample_names_model_flags_that_make_no_diffusion(capsys, monkeypatch, tmp_path, flags, named):
    """They used to be reported as ``--sampler.respacing None`` or ``--model.diffusion.steps``."""
    monkeypatch.chdir(REPO)
    path = tmp_path / "plain.pt"
    save_plain_state_dict(path, load_model("checkpoints/demo.pt").model)
    args = _demo_args(path, tmp_path, "--model.flags", f"{DEMO_FLAGS} {flags}")
    assert sample_main(args, evaluate=evaluate_run, check=check_evaluation) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sample.py: error: {named}"), lines


def test_sample_bad_yaml_names_the_file_and_debug_shows_the_traceback(tmp_path):
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("model:\n  checkpoint: checkpoints/demo.pt\n references: x\n")
    line = _one_error_line(_run([*SAMPLE, "--config", str(bad_yaml)]), "sample.py")
    assert f"--config {bad_yaml}: invalid YAML at line 3" in line
    debug = _run([*SAMPLE, "--config", str(DEMO_CONFIG), "--batch_size", "0", "--debug"])
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert (
        debug.stderr.strip().splitlines()[-1] == "sample.py: error: --batch_size 0: expected an integer >= 1"
    )


def test_prepare_debug_and_ilvr_debug_show_the_traceback(images, tmp_path):
    cmd = [*PREPARE, str(images), "--out", str(tmp_path / "o.lmdb"), "--size", "16", "--quality", "500"]
    for done in (_run([*cmd, "--debug"]), _run(cmd, env={"ILVR_DEBUG": "1"})):
        assert done.returncode == 2 and "Traceback (most recent call last)" in done.stderr
        assert "UsageError" in done.stderr
        assert done.stderr.strip().splitlines()[-1].endswith("--quality 500: expected an integer in 1..100")


def test_normalize_options_spellings():
    parser = prepare_parser()
    aliases = {"--out": "--output.dir"}
    argv = [
        "src",
        "--out=o",
        "--size",
        "8",
        "--size",
        "16",
        "--no-progress",
        "--strict",
        "--overwrite",
        "false",
    ]
    assert normalize_options(argv, parser, aliases, repeatable=("--size",)) == [
        "src",
        "--output.dir=o",
        "--size",
        "8",
        "--size+",
        "16",
        "--progress=false",
        "--strict=true",
        "--overwrite",
        "false",
    ]
    assert normalize_options(["--batch-size", "2", "--output.grid-max-rows=3"]) == [
        "--batch_size",
        "2",
        "--output.grid_max_rows=3",
    ]
    # a value that holds options (guided-diffusion's flag string, the README's form) is kept as given
    flags = "--image_size 256 --num-channels 256 --learn_sigma True"
    assert normalize_options(["--model.flags", flags]) == ["--model.flags", flags]
    assert normalize_options(["--out-dir=/my runs/x"]) == ["--out_dir=/my runs/x"]  # a space in the value


@pytest.mark.parametrize("flag, value", [("channels_last", "maybe"), ("winograd", "maybe"), ("compile", "2")])
def test_a_word_after_a_bool_flag_is_named(flag, value, capsys, tmp_path):
    """``--channels_last maybe`` was "unrecognized arguments: maybe" (the bare flag read as true);
    the words jsonargparse reads as bools (``--winograd=yes``) count with a space too."""
    assert (
        sample_main(["--config", str(DEMO_CONFIG), "--output.dir", str(tmp_path / "o"), f"--{flag}", value])
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sample.py: error: --{flag} {value}: expected true or false"
    ]
    assert not (tmp_path / "o").exists()
    parsed = parse_options(
        sample_parser(), ["--native_groupnorm", "yes", "--winograd", "Off", "--channels_last"]
    )
    assert parsed.native_groupnorm is True and parsed.winograd is False and parsed.channels_last is True


def test_yaml_number_respacing_is_read_as_the_string(tmp_path):
    """``respacing: 50`` in a config file (YAML reads a number) means what ``"50"`` does."""
    config = tmp_path / "run.yaml"
    config.write_text("sampler:\n  respacing: 50\n")
    namespace = parse_options(sample_parser(), ["--config", str(config)])
    assert SampleConfig.from_dict(namespace.as_dict()).sampler.respacing == "50"


def test_threads_and_slurm_cpus_per_task_are_named(capsys, monkeypatch, tmp_path):
    from ilvr_toolkit.runtime import tune_process

    for threads, error in (("3", TypeError), (1.5, TypeError), (-2, ValueError)):
        with pytest.raises(error, match=rf"threads: expected an int >= 1 .*got {threads!r}"):
            tune_process(threads)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "abc")
    code = sample_main(["--config", str(DEMO_CONFIG), "--output.dir", str(tmp_path / "o")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [
        "sample.py: error: SLURM_CPUS_PER_TASK='abc': expected a whole number of CPUs, >= 1"
    ]
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "0")  # not torch's default labelled as SLURM's
    with pytest.raises(UsageError, match="SLURM_CPUS_PER_TASK='0': expected a whole number of CPUs, >= 1"):
        tune_process()
