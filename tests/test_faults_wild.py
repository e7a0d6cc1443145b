"""Image files as they come from the wild (audit "wildimages"): damaged outputs on a rerun, Latin-1
file names, zips with a bad CRC, single-image FID, ambiguous output names, zero-byte and 16-bit
transparent images, broken symlinks. Each is one clean line or a documented result."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from faultkit import TINY32, error_line, make_images, run
from PIL import Image
from test_faults_loads import sample_args

from ilvr_toolkit.data import ReferenceSet, read_names
from ilvr_toolkit.data.imageops import load_rgb
from ilvr_toolkit.evaluation.api import pair_by_name

S = 32
PROG = "python -m ilvr_toolkit.evaluation"


def _refs(folder: Path) -> Path:
    """x.png (black) and x_s0.png (white): stems that look like sample.py's output names."""
    folder.mkdir(parents=True)
    Image.new("RGB", (S, S), 0).save(folder / "x.png")
    Image.new("RGB", (S, S), (255, 255, 255)).save(folder / "x_s0.png")
    return folder


def _sample(refs: Path, out: Path, *extra: str):
    args = sample_args(TINY32, refs, out, "--model.preset", "tiny32", "--sampler.respacing", "2", *extra)
    return run([*args, "--samples_per_reference", "1"])


def test_rerun_names_a_damaged_output(tmp_path):
    refs, out = _refs(tmp_path / "refs"), tmp_path / "out"
    assert _sample(refs, out).returncode == 0
    data = bytearray((out / "x_s0.png").read_bytes())
    data[data.find(b"IDAT") + 20] ^= 255
    (out / "x_s0.png").write_bytes(data)
    done = _sample(refs, out)
    line = error_line(done, "sample.py")
    assert done.returncode == 1 and f"{out / 'x_s0.png'}: damaged" in line and "delete it and rerun" in line


def test_latin1_reference_name(tmp_path):
    refs, out = tmp_path / "refs", tmp_path / "out"
    refs.mkdir()
    Image.new("RGB", (S, S), (200, 10, 10)).save(os.fsencode(refs) + b"/caf\xe9.png")
    done = _sample(refs, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "grid.png").is_file() and (out / os.fsdecode(b"caf\xe9_s0.png")).is_file()


def _png(size: int = 16, value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _prepare(src: Path, out: Path, workers: str = "0"):
    args = ["-m", "ilvr_toolkit.data.prepare", str(src), "--out", str(out), "--size", "16"]
    return run([*args, "--workers", workers])


def test_prepare_skips_a_zip_member_with_a_bad_crc(tmp_path):
    src = tmp_path / "crc.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as zf:
        for k in range(3):
            zf.writestr(f"m{k}.png", _png(value=40 * k))
    data = bytearray(src.read_bytes())
    start = data.find(b"m1.png") + len("m1.png")  # the local header's name, then the member's data
    data[start + 40] ^= 255
    src.write_bytes(data)
    for workers in ("0", "2"):
        done = _prepare(src, tmp_path / f"crc{workers}.lmdb", workers)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "skipped 1" in done.stdout and "m1.png" in done.stdout, done.stdout


def test_prepare_keeps_dot_slash_zip_members(tmp_path):
    src = tmp_path / "dot.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("./imgs/a.png", _png())
        zf.writestr("imgs/.hidden.png", _png())
    done = _prepare(src, tmp_path / "dot.lmdb")
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_names(tmp_path / "dot.lmdb") == ["./imgs/a.png"]


def test_fid_of_one_image(tmp_path):
    """The evaluation refuses FID of one image up front; sample.py writes the other metrics."""
    from random_inception import write_random_inception_weights

    weights = str(write_random_inception_weights(tmp_path / "fake_inception.pth"))
    one, target = tmp_path / "one", make_images(tmp_path / "target", count=3)
    make_images(one, count=1)
    args = ["--outputs", str(one), "--target", str(target), "--inception_weights", weights, "--device", "cpu"]
    done = run(["-m", "ilvr_toolkit.evaluation", *args])
    assert done.returncode == 2 and error_line(done, PROG).endswith(
        f"--outputs {one}: FID needs at least 2 images, got 1"
    )
    args = ["--outputs", str(target), "--target", str(one), "--inception_weights", weights, "--device", "cpu"]
    assert f"--target {one}: FID needs" in error_line(run(["-m", "ilvr_toolkit.evaluation", *args]), PROG)
    out = tmp_path / "out"
    done = _sample(one / "00.png", out, "--evaluate_against", str(target), "--inception_weights", weights)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len([line for line in done.stderr.splitlines() if "FID/KID skipped" in line]) == 1, done.stderr
    assert "FID/KID skipped: FID needs at least 2 outputs, got 1 (see the warning above)." in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert "FID needs at least 2" in metrics["fid_skipped"] and metrics["N4"]["num_pairs"] == 1, metrics


def test_evaluation_pairs_as_the_manifest_records(tmp_path):
    """References x (black) and x_s0 (white): the CLI pairs output x_s0 with x as sample.py did (the
    same numbers as the same files renamed p, q), and refuses those names without a manifest."""
    refs, out = _refs(tmp_path / "refs"), tmp_path / "out"
    assert _sample(refs, out, "--evaluate_against", "null").returncode == 0
    plain_refs, plain_out = tmp_path / "plain_refs", tmp_path / "plain_out"
    plain_refs.mkdir(), plain_out.mkdir()
    for new, ref in (("p", "x"), ("q", "x_s0")):
        (plain_refs / f"{new}.png").write_bytes((refs / f"{ref}.png").read_bytes())
        (plain_out / f"{new}_s0.png").write_bytes((out / f"{ref}_s0.png").read_bytes())
    metrics = []
    for outputs, references in ((out, refs), (plain_out, plain_refs)):
        args = ["--outputs", str(outputs), "--references", str(references), "--device", "cpu"]
        done = run(["-m", "ilvr_toolkit.evaluation", *args, "--metrics_json", str(outputs / "m.json")])
        assert done.returncode == 0, done.stderr[-3000:]
        metrics.append(json.loads((outputs / "m.json").read_text()))
    assert [m["psnr"] for m in metrics] == [metrics[1]["psnr"]] * 2 and metrics[0]["l2"] == metrics[1]["l2"]
    (out / "manifest.json").unlink()  # the images alone (a run's folder without them is unfinished)
    shutil.rmtree(out / ".manifest"), (out / "grid.png").unlink()
    line = error_line(
        run(["-m", "ilvr_toolkit.evaluation", "--outputs", str(out), "--references", str(refs)]), PROG
    )
    assert "match several references: x_s0" in line, line
    with pytest.raises(ValueError, match="several references: b_N4_s0"):
        pair_by_name(["b_N4_s0"], ["b", "b_N4"])
    assert pair_by_name(["b_N4_s0", "b_s0"], ["b", "b_N4"], {"b_N4_s0": "b", "b_s0": "b"}) == [(0, 0), (1, 0)]


def test_evaluation_skips_an_unused_damaged_first_reference(tmp_path):
    refs, out = tmp_path / "refs", tmp_path / "out"
    refs.mkdir(), out.mkdir()
    (refs / "0bad.png").write_bytes(b"")
    Image.new("RGB", (S, S), (9, 9, 9)).save(refs / "a.png")
    Image.new("RGB", (S, S), (9, 9, 9)).save(out / "a_s0.png")
    for size in ([], ["--image_size", str(S)]):
        args = ["--outputs", str(out), "--references", str(refs), "--device", "cpu", *size]
        done = run(["-m", "ilvr_toolkit.evaluation", *args])
        assert done.returncode == 0 and "| L2 | 0.00 |" in done.stdout, done.stderr[-3000:]


def test_16bit_gray_with_a_transparent_colour(tmp_path):
    """The pixels equal to the 16-bit transparent value become white, as with 8-bit grayscale."""
    wide = np.full((S, S), 50 * 257, np.uint16)
    wide[:, : S // 2] = 100 * 257
    wide[0, 0] = 100 * 257 + 1  # not the key: kept (100 after scaling)
    Image.fromarray(wide).save(tmp_path / "g16.png", transparency=100 * 257)
    want = np.where(wide == 100 * 257, 255, np.rint(wide / 257)).astype(np.uint8)
    got = ReferenceSet(tmp_path / "g16.png", S)[0]["image"]
    assert (got.numpy() == want[None]).all()


def test_broken_link_in_the_target_is_named(tmp_path):
    target = make_images(tmp_path / "target", count=2)
    (target / "link.png").symlink_to(tmp_path / "nonexist.png")
    args = ["--outputs", str(target), "--target", str(target), "--device", "cpu"]
    line = error_line(run(["-m", "ilvr_toolkit.evaluation", *args]), PROG)
    assert f"--target {target}: {target / 'link.png'}: a broken link" in line, line


def test_no_decompression_bomb_warning(tmp_path, monkeypatch):
    """An image over Pillow's pixel limit decodes (or is skipped with its own line) without the warning."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    buf = io.BytesIO()
    Image.new("RGB", (12, 12)).save(buf, format="PNG")  # 144 pixels: Pillow warns (over 200: it refuses)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_rgb(buf.getvalue()).size == (12, 12)


def test_prepare_skips_a_zip_bomb_by_its_declared_size_unread(tmp_path):
    """A member of 2 GiB (deflated zeros: a 9 MB zip) was read whole (4 GB of memory) before being
    skipped as no image: its declared size is checked first (here a real PNG that declares 2 GiB,
    which zipfile would read as the PNG it is)."""
    src = tmp_path / "bomb.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.png", _png())
        zf.writestr("bomb.png", _png(value=99))
    data = bytearray(src.read_bytes())
    for header, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        start = data.rfind(header)
        data[start + at : start + at + 4] = struct.pack("<I", 1 << 31)
    src.write_bytes(data)
    done = _prepare(src, tmp_path / "bomb.lmdb")
    assert done.returncode == 0 and read_names(tmp_path / "bomb.lmdb") == ["a.png"], done.stderr[-3000:]
    assert "skipped bomb.png: too large: 2147483648 bytes, more than any image Pillow decodes" in done.stdout


def test_a_link_to_a_device_or_fifo_is_skipped_not_read_for_ever(tmp_path):
    """zero.png -> /dev/zero was read until MemoryError by prepare, and sample.py's references hung
    (a FIFO blocks on open): only regular files are read, the others skipped, saying why."""
    import signal

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (S, S), 0).save(src / "a.png")
    os.mkfifo(tmp_path / "fifo")
    (src / "fifo.png").symlink_to(tmp_path / "fifo")
    (src / "zero.png").symlink_to("/dev/zero")
    done = _prepare(src, tmp_path / "out.lmdb")
    assert done.returncode == 0 and read_names(tmp_path / "out.lmdb") == ["a.png"], done.stderr[-3000:]
    assert f"skipped fifo.png: not a regular file ({tmp_path / 'fifo'})" in done.stdout
    assert "skipped zero.png: not a regular file (/dev/zero)" in done.stdout
    refs = ReferenceSet(src, S)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("hung")))
    signal.alarm(20)  # without the check: blocked on opening the FIFO, or reading /dev/zero
    try:
        said = [refs.try_get(i)[1] for i in range(len(refs))]
    finally:
        signal.alarm(0)
    assert said == [None, f"{src / 'fifo.png'}: not a regular file ({tmp_path / 'fifo'})", said[2]]
    assert said[2] == f"{src / 'zero.png'}: not a regular file (/dev/zero)" and refs.digest(2) is None
