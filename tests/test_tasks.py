"""sample.py's tasks end to end on the fixture model: inpaint, colorize, superres, local_edit and
SDEdit starts; what each keeps in the written PNGs, one-line errors, per-image seeds, shards,
resume and the per-task faithfulness metrics."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.conditioning import LowPass
from ilvr_toolkit.data.references import ReferenceSet
from ilvr_toolkit.images import to_float
from ilvr_toolkit.sampling import run
from ilvr_toolkit.sampling.cli import main, parse_config

SIZE = 32


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    for i in range(3):  # smooth colour images (a random 4x4 colour field, upsampled)
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        coarse.resize((40 + 8 * i, 40), Image.Resampling.BICUBIC).save(folder / f"ref{i}.png")
    return folder


@pytest.fixture(scope="module")
def mask_png(tmp_path_factory) -> tuple[Path, np.ndarray]:
    keep = np.ones((SIZE, SIZE), dtype=bool)
    keep[8:24, 4:20] = False  # the hole to fill
    path = tmp_path_factory.mktemp("mask") / "mask.png"
    Image.fromarray(np.where(keep, 255, 0).astype(np.uint8)).save(path)
    return path, keep


def _args(reference_dir: Path, refs: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--model.checkpoint", str(reference_dir / "tiny32.pt"), "--model.preset", "tiny32"),
        *("--references", str(refs), "--sampler.respacing", "8", "--device", "cpu"),
        *("--output.dir", str(out), "--progress", "false", "--output.grid", "false", *extra),
    ]


def _run(reference_dir, refs, out, *extra):
    return run(parse_config(_args(reference_dir, refs, out, *extra)))


def _pngs(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(out.glob("ref*_s*.png"))}


def _references(refs: Path, size: int = SIZE) -> list[np.ndarray]:
    return [ReferenceSet(refs, size)[i]["image"].permute(1, 2, 0).numpy().astype(int) for i in range(3)]


def test_inpaint_keeps_every_white_pixel_exactly(reference_dir, refs, mask_png, tmp_path):
    mask, keep = mask_png
    task = ("--task", "inpaint", "--mask", str(mask), "--ilvr.factor", "[2, 4]")  # N: not used by inpaint
    _run(reference_dir, refs, tmp_path / "o", *task, "--output.grid", "true")
    outputs, references = _pngs(tmp_path / "o"), _references(refs)
    assert sorted(outputs) == ["ref0_s0.png", "ref1_s0.png", "ref2_s0.png"]  # one set, not one per N
    grid = np.asarray(Image.open(tmp_path / "o" / "grid.png")).astype(int)
    for row, (out, ref) in enumerate(zip(outputs.values(), references, strict=True)):
        assert np.array_equal(out[keep], ref[keep])
        assert np.abs(out[~keep] - ref[~keep]).mean() > 5  # the hole is generated, not copied
        y, x = 2 + row * (SIZE + 2), 2 + (SIZE + 2)  # the grid's second column is P(y): the kept part
        p_of_y = grid[y : y + SIZE, x : x + SIZE]
        assert np.array_equal(p_of_y[keep], ref[keep]) and (np.abs(p_of_y[~keep] - 127.5) <= 0.5).all()
    with pytest.raises(UsageError, match=r"^--task colorize: .* holds a run made with inpaint"):
        _run(reference_dir, refs, tmp_path / "o", "--task", "colorize")
    other = tmp_path / "other_mask.png"
    Image.fromarray(255 - np.asarray(Image.open(mask))).save(other)
    with pytest.raises(
        UsageError, match=rf"^--mask {other}: .* holds a run made with another mask \(sha256 "
    ):
        _run(reference_dir, refs, tmp_path / "o", *task[:3], str(other))
    assert _run(reference_dir, refs, tmp_path / "o", *task[:4]).skipped_existing == 3  # N changed: not used


def test_colorize_keeps_the_grey_image(reference_dir, refs, tmp_path):
    n = ("--ilvr.factor", "3")  # no divisor of 32, but colorize has no N
    _run(reference_dir, refs, tmp_path / "o", "--task", "colorize", "--samples_per_reference", "2", *n)
    outputs, references = _pngs(tmp_path / "o"), _references(refs)
    for name, out in outputs.items():
        ref = references[int(name[3])]
        error = np.abs(out.mean(axis=2) - ref.mean(axis=2))
        inside = ((out > 0) & (out < 255)).all(axis=2)  # x_0 was not clamped to [-1, 1] here
        assert error[inside].max() <= 0.5 + 1e-9 and inside.sum() > 100  # uint8 rounding only
        assert out.std(axis=2).mean() > 1  # colour was added


def test_superres_x4_from_8x8_inputs(reference_dir, tmp_path):
    low = tmp_path / "low"
    low.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(low / f"ref{i}.png")
    args = ("--task", "superres", "--ilvr.factor", "4", "--output.grid", "true")
    result = _run(reference_dir, low, tmp_path / "o", *args)
    free = _pngs(_run(reference_dir, low, tmp_path / "free", *args, "--ilvr.fraction", "0").out_dir)
    lowpass = LowPass(SIZE, 4, dtype=torch.float64)
    for i, (out, unconditioned) in enumerate(zip(_pngs(tmp_path / "o").values(), free.values(), strict=True)):
        z = to_float(torch.from_numpy(np.array(Image.open(low / f"ref{i}.png"))).permute(2, 0, 1)).double()
        y = result.references.get(i)  # y = up_4(z) in uint8: what the sampler and the metrics use
        assert y.shape == (3, SIZE, SIZE)
        assert (to_float(y).double() - lowpass.up(z).clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-9
        error = [
            (lowpass(to_float(torch.from_numpy(x.astype(np.uint8)).permute(2, 0, 1)).double()) - lowpass(
                to_float(y).double())).abs().mean() for x in (out, unconditioned)
        ]  # fmt: skip
        assert error[0] < 0.3 * error[1]
    assert (tmp_path / "o" / "grid.png").exists()


def test_sdedit_strength_one_is_the_full_run_and_lower_strengths_stay_closer(reference_dir, refs, tmp_path):
    _run(reference_dir, refs, tmp_path / "plain")
    plain = _pngs(tmp_path / "plain")
    for tag, extra in (("s1", ("--sdedit.strength", "1")), ("k7", ("--sdedit.start_index", "7"))):
        _run(reference_dir, refs, tmp_path / tag, *extra)
        assert all(
            np.array_equal(a, b) for a, b in zip(plain.values(), _pngs(tmp_path / tag).values(), strict=True)
        )
    free = ("--ilvr.fraction", "0")  # no projection: pure SDEdit
    distance = {}
    for strength in ("1", "0.5", "0.25"):
        _run(reference_dir, refs, tmp_path / strength, "--sdedit.strength", strength, *free)
        outputs = _pngs(tmp_path / strength).values()
        distance[strength] = np.mean(
            [np.abs(o - r).mean() for o, r in zip(outputs, _references(refs), strict=True)]
        )
    assert distance["0.25"] < distance["0.5"] < distance["1"]


def test_local_edit_operator_is_the_mask_times_the_low_pass(reference_dir, refs, mask_png, tmp_path):
    """docs/conditioning.md: local_edit's P is Compose(LowPass(N), Mask(m)) = m * phi_N(x), not phi_N(m * x)."""
    from ilvr_toolkit.sampling.tasks import run_operators

    task = ("--task", "local_edit", "--mask", str(mask_png[0]), "--ilvr.factor", "4")
    config = parse_config(_args(reference_dir, refs, tmp_path / "o", *task))
    operator = run_operators(config, SIZE, torch.device("cpu"), [4])[4]
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keep = torch.from_numpy(mask_png[1]).float()
    torch.testing.assert_close(operator(x), keep * LowPass(SIZE, 4, torch.device("cpu"))(x))


def test_seeds_shards_and_resume_with_a_task(reference_dir, refs, mask_png, tmp_path):
    task = ("--task", "local_edit", "--mask", str(mask_png[0]), "--sdedit.strength", "0.5")
    _run(reference_dir, refs, tmp_path / "b3", *task, "--batch_size", "3")
    _run(reference_dir, refs, tmp_path / "b1", *task, "--batch_size", "1")
    for shard in ("0", "1"):
        _run(reference_dir, refs, tmp_path / "sh", *task, "--num_shards", "2", "--shard_index", shard)
    b3 = _pngs(tmp_path / "b3")
    for other in (_pngs(tmp_path / "b1"), _pngs(tmp_path / "sh")):
        assert other.keys() == b3.keys()
        assert all(np.abs(b3[k] - other[k]).max() <= 1 for k in b3)  # batch-size dependent kernels
    (tmp_path / "b3" / "ref1_s0.png").unlink()
    assert _run(reference_dir, refs, tmp_path / "b3", *task).written == ["ref1_s0.png"]  # resumed
    with pytest.raises(Exception, match=r"--sdedit.strength 0.25: .* holds a run made with 0.5"):
        _run(reference_dir, refs, tmp_path / "b3", *task[:4], "--sdedit.strength", "0.25")
    with pytest.raises(Exception, match=r"^--task inpaint: .* holds a run made with local_edit"):
        _run(reference_dir, refs, tmp_path / "b3", "--task", "inpaint", "--mask", str(mask_png[0]))


def test_per_task_faithfulness_compares_p_of_output_and_reference(
    reference_dir, refs, mask_png, tmp_path, monkeypatch
):
    from ilvr_toolkit.evaluation.runs import evaluate_run

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))  # FID skipped: faithfulness only
    config = parse_config(
        _args(reference_dir, refs, tmp_path / "o", "--task", "inpaint", "--mask", str(mask_png[0]))
    )
    result = run(config)
    manifest = json.loads(result.manifest.read_text())  # as a folder begun by an earlier version left it:
    first = next(iter(manifest["images"]))
    manifest["images"][first]["factor"] = 4  # an entry of its single N
    stale = first.replace("_s0", "_N8_s0")  # and an output of one of its several N
    (result.out_dir / stale).write_bytes((result.out_dir / first).read_bytes())
    manifest["images"][stale] = {**manifest["images"][first], "factor": 8}
    result.manifest.write_text(json.dumps(manifest))
    everything = evaluate_run(dataclasses.replace(config, evaluate_against=str(refs)), result)
    assert [k for k, v in everything.items() if isinstance(v, dict)] == ["inpaint"]  # one set, as now
    metrics = everything["inpaint"]
    assert metrics["num_pairs"] == 3
    assert metrics["psnr_kept"] == 100.0 and metrics["ssim_kept"] == pytest.approx(1.0)  # kept exactly
    assert metrics["psnr"] < 40 and "psnr_lowpass" not in metrics


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--task", "inpaint"), "--mask: required by --task inpaint"),
        (("--task", "colorize", "--mask", "{mask}"), "--mask: not used by --task colorize"),
        (("--task", "inpaint", "--mask", "{big}"), r"--mask .*big.png: expected 32x32 .*got 48x32"),
        (("--task", "inpaint", "--mask", "{grey}"), r"--mask .*grey.png: expected only black .*found 128"),
        (("--task", "inpaint", "--mask", "{missing}"), r"--mask .*missing.png: no such file"),
        (("--task", "inpaint", "--mask", "{text}"), r"cannot identify image file .*text.png"),
        (("--task", "superres", "--ilvr.factor", "[2, 4]"), "super-resolution takes one factor"),
        (("--task", "paint"), "--task paint: expected"),
        (("--sdedit.strength", "0"), r"--sdedit.strength 0.0: expected a number in \(0, 1\]"),
        (("--sdedit.strength", "0.5", "--sdedit.start_index", "2"), "give at most one"),
        (("--sdedit.start_index", "8"), r"--sdedit.start_index 8: the sampler has steps 0..7"),
        (("--sdedit.strength", "0.5", "--unconditional", "true"), "with --sdedit: needs --references"),
    ],
)
def test_task_errors_are_one_line(reference_dir, refs, mask_png, tmp_path, capsys, extra, message):
    Image.fromarray(np.zeros((32, 48), dtype=np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(tmp_path / "grey.png")
    (tmp_path / "text.png").write_text("not a PNG")
    paths = {"mask": mask_png[0], **{k: tmp_path / f"{k}.png" for k in ("big", "grey", "missing", "text")}}
    extra = [e.format(**paths) for e in extra]
    assert main(_args(reference_dir, refs, tmp_path / "o", *extra)) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sample.py: error: "), err
    assert re.search(message, err[0]), err[0]
