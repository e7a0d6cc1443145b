"""LMDB converter, reader and DataModule (issue 4). Tiny images; the whole file runs in well under 2 min."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from clirunner import shared
from conftest import DATA_BAD_FILES, DATA_SIZES, smooth_rgb, torchrun
from PIL import Image, JpegImagePlugin
from torch.utils.data import DataLoader

from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.data import (
    BadImage,
    ImageDataModule,
    LMDBImageDataset,
    build_lmdb,
    image_key,
    list_image_files,
    open_lmdb,
    read_info,
    read_names,
    unique_names,
)
from ilvr_toolkit.data.imageops import to_rgb
from ilvr_toolkit.data.lmdb_format import _mappings, check_not_truncated
from ilvr_toolkit.data.prepare import main as prepare_main
from ilvr_toolkit.data.prepare import process_image

REPO = Path(__file__).resolve().parents[1]


def _pil_decode(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


def _write_rosinality_lmdb(path: Path, images: list[Image.Image], sizes: tuple[int, ...]) -> None:
    """The key scheme of rosinality/stylegan2-pytorch prepare_data.py (JPEG, no metadata)."""
    env = lmdb.open(str(path), map_size=1 << 24, readahead=False)
    with env.begin(write=True) as txn:
        for i, img in enumerate(images):
            for size in sizes:
                buf = io.BytesIO()
                img.resize((size, size), Image.Resampling.LANCZOS).save(buf, format="jpeg", quality=100)
                txn.put(f"{size}-{str(i).zfill(5)}".encode("utf-8"), buf.getvalue())  # noqa: UP012 (as theirs)
        txn.put("length".encode("utf-8"), str(len(images)).encode("utf-8"))  # noqa: UP012
    env.close()


# --------------------------------------------------------------------------- files and modes
def test_list_image_files_order_extensions_hidden(data_folder):
    root, good = data_folder
    listed = [p.relative_to(root).as_posix() for p in list_image_files(root)]
    assert sorted(listed) == sorted(good + list(DATA_BAD_FILES))  # .hidden.png and notes.txt skipped
    assert "formats/b.JPEG" in listed  # case-insensitive extension
    assert listed.index("modes/rgba.png") < listed.index("rgb/00.png") < listed.index("sub/deeper/rgb.png")


def test_unique_names():
    rel = [
        "a/cat.png",
        "b/cat.jpg",
        "dog.png",
        "x/Dog.png",
        "y/z/bird.png",
        "y/z/bird.webp",
        "y__z__bird.png",
    ]
    names = unique_names(rel)
    assert names[:2] == ["a__cat", "b__cat"]
    assert names[2:4] == ["dog", "x__Dog"]  # clash only case-insensitively
    assert len({n.casefold() for n in names}) == len(names)
    assert unique_names(["p/q.png", "r.png"]) == ["q", "r"]


def test_to_rgb_modes():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    px = list(to_rgb(rgba).getdata())
    assert px[0] == (255, 255, 255) and px[1] == (10, 20, 30)  # alpha composited over white
    assert all(abs(c - 127) <= 1 for c in px[2])
    wide = Image.fromarray(np.array([[0, 257, 32896, 65535, 128]], dtype=np.uint16))
    assert wide.mode == "I;16"
    assert [p[0] for p in to_rgb(wide).getdata()] == [0, 1, 128, 255, 0]  # scaled by 1/257, not clipped
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1])
    pal.info["transparency"] = 0
    assert list(to_rgb(pal).getdata()) == [(255, 255, 255), (200, 100, 50)]
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 255))).getpixel((0, 0)) == (0, 0, 0)


def test_process_image_crop_resize_exif():
    rng = np.random.default_rng(1)
    img = smooth_rgb(rng, 40, 64)  # w=64, h=40: the centre 40x40 square, from x=12
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = process_image(buf.getvalue(), [16, 40])
    assert set(out) == {16, 40}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out[40]))), np.asarray(img.crop((12, 0, 52, 40))))
    expected16 = img.crop((12, 0, 52, 40)).resize((16, 16), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out[16]))), np.asarray(expected16))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    upright = Image.open(io.BytesIO(process_image(buf.getvalue(), [40])[40]))
    assert np.array_equal(
        np.asarray(upright), np.asarray(img.transpose(Image.Transpose.ROTATE_270).crop((0, 12, 40, 52)))
    )


# --------------------------------------------------------------------------- converter
def test_build_reports_exactly_the_bad_files(data_folder, data_lmdb):
    root, good = data_folder
    info = read_info(data_lmdb)
    assert info.length == len(good) and info.sizes == DATA_SIZES
    meta = info.meta
    assert meta["format"] == "png" and meta["source_kind"] == "folder" and "LANCZOS" in meta["filter"]
    assert sorted(name for name, _ in meta["skipped"]) == sorted(DATA_BAD_FILES)
    assert sorted(read_names(data_lmdb)) == sorted(good)
    assert _leftovers(data_lmdb) == [data_lmdb.name]  # no .partial-* left behind
    with open_lmdb(data_lmdb).begin() as txn:
        assert txn.get(b"length") == str(len(good)).encode()
        keys = [k for k, _ in txn.cursor() if k[:1].isdigit()]
    assert sorted(keys) == sorted(image_key(s, i) for s in DATA_SIZES for i in range(len(good)))
    assert image_key(256, 7) == b"256-00007" and image_key(256, 123456) == b"256-123456"


def test_reader_matches_processing(data_folder, data_lmdb):
    root, _ = data_folder
    names = read_names(data_lmdb)
    for size in DATA_SIZES:
        ds = LMDBImageDataset(data_lmdb, size, return_index=True)
        assert len(ds) == len(names)
        for i, name in enumerate(names):
            image, index = ds[i]
            assert index == i and image.dtype == torch.uint8 and image.shape == (3, size, size)
            expected = _pil_decode(process_image((root / name).read_bytes(), list(DATA_SIZES))[size])
            assert torch.equal(image, expected), name
    gray = names.index("modes/gray.png")
    image = LMDBImageDataset(data_lmdb, 16)[gray]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_reader_flip_and_errors(data_lmdb, tmp_path):
    plain = LMDBImageDataset(data_lmdb, 16)
    flipping = LMDBImageDataset(data_lmdb, 16, flip=True)
    torch.manual_seed(0)
    flipped = [not torch.equal(flipping[i], plain[i]) for i in range(len(plain)) for _ in range(2)]
    assert any(flipped) and not all(flipped)
    for _ in range(4):
        image = flipping[0]
        assert torch.equal(image, plain[0]) or torch.equal(image, plain[0].flip(-1))
    with pytest.raises(ValueError, match="sizes available: 16, 32"):
        LMDBImageDataset(data_lmdb, 64)
    with pytest.raises(IndexError):
        plain[len(plain)]
    # a stored image whose size differs from the key's size
    bad = tmp_path / "wrong.lmdb"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    env = lmdb.open(str(bad), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"32-00000", buf.getvalue())
        txn.put(b"length", b"1")
    env.close()
    with pytest.raises(ValueError, match="is 16x16, expected 32x32"):
        LMDBImageDataset(bad, 32)[0]


def test_rosinality_lmdb_both_ways(data_lmdb, tmp_path):
    rng = np.random.default_rng(3)
    images = [smooth_rgb(rng, 128, 128) for _ in range(3)]
    theirs = tmp_path / "theirs.lmdb"
    _write_rosinality_lmdb(theirs, images, (8, 16, 128))
    info = read_info(theirs)
    assert info.meta is None and info.sizes == (8, 16, 128) and info.length == 3  # sizes found by key scan
    ds = LMDBImageDataset(theirs, 16)
    with open_lmdb(theirs).begin() as txn:
        assert torch.equal(ds[2], _pil_decode(txn.get(b"16-00002")))
    with pytest.raises(ValueError, match="sizes available: 8, 16, 128"):
        LMDBImageDataset(theirs, 32)
    # their LMDB as a converter source: the largest size is re-cropped/resized
    ours = tmp_path / "from_theirs.lmdb"
    report = build_lmdb(theirs, ours, 32, workers=0, progress=False)
    assert report.length == 3 and read_names(ours) == ["00000", "00001", "00002"]
    assert read_info(ours).meta["source_kind"] == "lmdb"
    # ours opened by their reader (a fresh process: lmdb refuses a second open in this one)
    script = textwrap.dedent(
        """
        import io, sys, lmdb
        from PIL import Image
        env = lmdb.open(sys.argv[1], max_readers=32, readonly=True, lock=False, readahead=False, meminit=False)
        with env.begin(write=False) as txn:
            length = int(txn.get("length".encode("utf-8")).decode("utf-8"))
            for index in range(length):
                img = Image.open(io.BytesIO(txn.get(f"32-{str(index).zfill(5)}".encode("utf-8"))))
                assert img.size == (32, 32) and img.mode == "RGB", img
        print(length)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(data_lmdb)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == read_info(data_lmdb).length


def test_strict_fails_and_leaves_nothing(data_folder, tmp_path):
    out = tmp_path / "strict.lmdb"
    with pytest.raises(BadImage, match="--strict"):
        build_lmdb(data_folder[0], out, 16, workers=0, strict=True, progress=False)
    assert _leftovers(out) == []
    code = prepare_main(
        [
            str(data_folder[0]),
            "--out",
            str(out),
            "--size",
            "16",
            "--strict",
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 1 and _leftovers(out) == []


def test_a_broken_link_named_png_is_reported_unreadable(tmp_path):
    """Neither the converter nor the reference set dropped it silently."""
    smooth_rgb(np.random.default_rng(0), 16, 16).save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    report = build_lmdb(tmp_path, tmp_path.parent / f"{tmp_path.name}.lmdb", 8, workers=0, progress=False)
    assert report.length == 1 and [name for name, _ in report.skipped] == ["b.png"]
    from ilvr_toolkit.data import ReferenceSet

    refs = ReferenceSet(tmp_path, 8)
    assert refs.names == ["a", "b"] and "b.png" in refs.try_get(1)[1]


def test_progress_into_a_log_file_is_plain_lines(runner, data_folder, tmp_path):
    """stderr not a terminal (a batch job's log): lines as sample.py writes them, no tqdm ``\\r``."""
    out = tmp_path / "log.lmdb"
    done = runner("-m", "ilvr_toolkit.data.prepare", str(data_folder[0]), "--out", str(out), "--size", "8")
    assert done.returncode == 0 and "\r" not in done.stderr, done.stderr
    total = len(DATA_BAD_FILES) + len(data_folder[1])
    assert f"INFO ilvr_toolkit: prepare log.lmdb {total}/{total} (" in done.stderr, done.stderr


def test_cli_report_path_is_checked_before_the_build(data_folder, tmp_path, capsys):
    """``--output.report`` a folder: refused at once (exit 2), nothing built, so a fixed rerun works."""
    (tmp_path / "repdir").mkdir()
    args = [str(data_folder[0]), "--out", str(tmp_path / "o.lmdb"), "--size", "8", "--workers", "0"]
    assert prepare_main([*args, "--report", str(tmp_path / "repdir")]) == 2
    assert "--output.report" in capsys.readouterr().err and sorted(os.listdir(tmp_path)) == ["repdir"]


@pytest.mark.parametrize(
    ("given", "missing"),
    [(["--out", "x.lmdb"], "--size"), (["--size", "16"], "--output.dir"), ([], "--output.dir and --size")],
)
def test_cli_names_only_the_missing_flags(tmp_path, capsys, given, missing):
    """``--out x.lmdb`` (an alias of --output.dir) without --size was told ``give --output.dir and --size``."""
    assert prepare_main([str(tmp_path / "nonexistent"), *given]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m ilvr_toolkit.data.prepare: error: give {missing} (or --verify to check the LMDB at SOURCE)"
    )


def test_an_lmdb_write_error_names_the_output(data_folder, tmp_path, monkeypatch, capsys):
    """A full disk fails in mdb_txn_commit: the line names the dataset being written."""
    from ilvr_toolkit.data import prepare

    def full(env, items):
        raise lmdb.Error("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(prepare, "_put_all", full)
    out = tmp_path / "full.lmdb"
    assert prepare_main([str(data_folder[0]), "--out", str(out), "--size", "8", "--workers", "0"]) == 1
    assert f"cannot write {out}: mdb_txn_commit: No space left" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_report_existing_out_and_overwrite(data_folder, tmp_path, capsys):
    out, report_file = tmp_path / "cli.lmdb", tmp_path / "report.json"
    args = [str(data_folder[0]), "--out", str(out), "--size", "32", "--workers", "0", "--no-progress"]
    assert prepare_main([*args, "--report", str(report_file)]) == 0
    assert "skipped 3" in capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert sorted(name for name, _ in report["skipped"]) == sorted(DATA_BAD_FILES)
    assert prepare_main(args) == 2 and "--overwrite" in capsys.readouterr().err  # refused, a usage error
    with pytest.raises(UsageError, match="--output.dir .*cli.lmdb: exists"):
        build_lmdb(data_folder[0], out, 16, workers=0, progress=False)
    build_lmdb(data_folder[0], out, [8, 16], workers=0, progress=False, overwrite=True)
    assert read_info(out).sizes == (8, 16) and LMDBImageDataset(out, 8)[0].shape == (3, 8, 8)
    assert _leftovers(out) == [out.name]


@pytest.mark.parametrize("where", ["source", "parent"])
def test_output_that_is_or_holds_the_source_is_refused_even_with_overwrite(data_folder, tmp_path, where):
    """``--overwrite`` replaces the output folder: never when that folder is the source's."""
    source = tmp_path / "photos" / "set"
    shutil.copytree(data_folder[0], source)
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = source if where == "source" else source.parent
    with pytest.raises(UsageError, match=rf"^--output.dir {out}: is the source {source} or holds it"):
        build_lmdb(source, out, 16, workers=0, progress=False, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing


@pytest.mark.parametrize("target", ["datasets folder", "code folder", "file", "dataset and notes"])
def test_overwrite_replaces_only_a_dataset_folder(data_folder, tmp_path, target):
    """``--output.dir datasets --overwrite`` (for datasets/x.lmdb) deleted every dataset in it."""
    out = tmp_path / "out"
    build_lmdb(data_folder[0], tmp_path / "d.lmdb", 8, workers=0, progress=False)
    if target == "datasets folder":
        shutil.copytree(tmp_path / "d.lmdb", out / "a.lmdb")
    elif target == "code folder":
        (out / "src").mkdir(parents=True)
        (out / "src" / "main.py").write_text("print(1)\n")
    elif target == "file":
        out.write_text("notes\n")
    else:
        shutil.copytree(tmp_path / "d.lmdb", out)
        (out / "README.md").write_text("where these images come from\n")
    listing = sorted((p.relative_to(tmp_path), p.is_file() and p.read_bytes()) for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError, match=rf"^--output.dir {out}: is not an LMDB dataset \("):
        build_lmdb(data_folder[0], out, 8, workers=0, progress=False, overwrite=True)
    assert (
        sorted((p.relative_to(tmp_path), p.is_file() and p.read_bytes()) for p in tmp_path.rglob("*"))
        == listing
    )
    under = out / "x.lmdb" if target == "file" else tmp_path / "d.lmdb" / "data.mdb" / "x.lmdb"
    with pytest.raises(UsageError, match=r"is a file, expected a folder$"):
        build_lmdb(data_folder[0], under, 8, workers=0, progress=False)


def test_overwrite_replaces_an_empty_folder_and_a_dataset_with_its_own_report(data_folder, tmp_path, capsys):
    out = tmp_path / "o.lmdb"
    out.mkdir()  # nothing in it to lose
    args = [str(data_folder[0]), "--out", str(out), "--size", "8", "--workers", "0", "--no-progress"]
    args += ["--overwrite", "--report", str(out / "report.json")]
    assert prepare_main(args) == 0 and prepare_main(args) == 0, capsys.readouterr().err  # its report inside
    assert sorted(p.name for p in out.iterdir()) == ["data.mdb", "lock.mdb", "report.json"]
    (tmp_path / "notes.json").write_text('{"mine": 1}\n')  # a JSON file that is no report: kept
    assert prepare_main([*args[:-1], str(tmp_path / "notes.json")]) == 2
    assert "notes.json: exists and is not a report file" in capsys.readouterr().err


def test_empty_and_all_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_lmdb(tmp_path / "empty", tmp_path / "e.lmdb", 16, workers=0, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no usable images"):
        build_lmdb(tmp_path / "bad", tmp_path / "b.lmdb", 16, workers=0, progress=False)
    assert not (tmp_path / "e.lmdb").exists() and _leftovers(tmp_path / "b.lmdb") == []


def test_zip_source_jpeg_format_and_map_growth(data_folder, data_lmdb, tmp_path):
    root, good = data_folder
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in list_image_files(root):
            zf.write(path, path.relative_to(root).as_posix())
    out = tmp_path / "zip.lmdb"
    report = build_lmdb(  # spawn workers (the zip reopens in each), a map that must grow
        archive, out, list(DATA_SIZES), workers=2, start_method="spawn", progress=False, map_size=1 << 14
    )
    assert report.length == len(good) and sorted(n for n, _ in report.skipped) == sorted(DATA_BAD_FILES)
    assert (out / "data.mdb").stat().st_size > 1 << 14
    by_name = dict(zip(read_names(out), range(len(good)), strict=True))
    ref = LMDBImageDataset(data_lmdb, 32)
    zipped = LMDBImageDataset(out, 32)
    for i, name in enumerate(read_names(data_lmdb)):
        assert torch.equal(ref[i], zipped[by_name[name]])
    jpeg = tmp_path / "jpeg.lmdb"
    build_lmdb(root, jpeg, 32, format="jpeg", quality=95, workers=0, progress=False)
    meta = read_info(jpeg).meta
    assert meta["format"] == "jpeg" and meta["quality"] == 95
    stored = Image.open(io.BytesIO(LMDBImageDataset(jpeg, 32).read_bytes(0)))
    assert stored.format == "JPEG" and JpegImagePlugin.get_sampling(stored) == 0  # 4:4:4
    diff = (LMDBImageDataset(jpeg, 32)[0].float() - ref[0].float()).abs().mean()
    assert diff < 3


def _build_midway(data_folder, out: Path, workers: str = "1") -> subprocess.Popen:
    """A build of ``data_folder`` into ``out`` (its own session), a few images in."""
    env = {**os.environ, "ILVR_TOOLKIT_PREPARE_DELAY_S": "0.5", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ilvr_toolkit.data.prepare", str(data_folder[0]), "--out", str(out)]
    cmd += ["--size", "32", "--workers", workers, "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, text=True)
    partial = out.with_name(f"{out.name}.partial-{proc.pid}")
    deadline = time.monotonic() + 60
    while not partial.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # a few images into the build
    assert proc.poll() is None, "the build finished before it could be stopped"
    return proc


def test_interrupted_build_leaves_no_out(data_folder, tmp_path):
    out = tmp_path / "killed.lmdb"
    proc = _build_midway(data_folder, out)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not out.exists() and out.with_name(f"{out.name}.partial-{proc.pid}").exists()
    # a rerun removes the dead build's folder and starts clean
    report = build_lmdb(data_folder[0], out, 32, workers=0, progress=False)
    assert report.length == len(data_folder[1]) and _leftovers(out) == [out.name]


@pytest.mark.parametrize("group, workers", [(False, "1"), (True, "1"), (False, "0")])
def test_sigterm_stops_a_build_like_ctrl_c(data_folder, tmp_path, group, workers):
    """SIGTERM (to the process, or to its group as a scheduler does) cleans up like Ctrl-C: no
    ``OUT.partial-PID`` left, one line, exit 143 (it was 143, silent, the partial folder kept)."""
    out = tmp_path / "term.lmdb"
    proc = _build_midway(data_folder, out, workers)  # workers 0: it was killed, partial kept
    os.killpg(proc.pid, signal.SIGTERM) if group else proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and os.listdir(tmp_path) == [], stderr
    assert stderr.strip().splitlines() == [
        f"python -m ilvr_toolkit.data.prepare: stopped by signal 15; {out} not written"
    ]


def test_sigterm_while_the_pool_forks_a_worker_still_stops_the_build(data_folder, tmp_path):
    """A SIGTERM that arrives during the fork of a worker (sent here by an at-fork hook) ran the
    handler inside CPython's at-fork hooks, which drop its exception ("Exception ignored in
    _releaseLock"): the build went on and exited 0 (or the exit hung joining a worker never
    stopped). SIGTERM now waits until the pool is up."""
    out = tmp_path / "fork.lmdb"
    code = "import os, signal, sys; from ilvr_toolkit.data.prepare import main; "
    code += "os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM)); "
    code += "sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, str(data_folder[0]), "--out", str(out), "--size", "32"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*cmd, "--workers", "1", "--no-progress"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 143 and os.listdir(tmp_path) == [], done.stderr
    assert done.stderr.strip().splitlines() == [
        f"python -m ilvr_toolkit.data.prepare: stopped by signal 15; {out} not written"
    ]


def test_truncated_lmdb_is_refused_before_it_is_mapped(data_lmdb, tmp_path):
    """A data.mdb shorter than its meta page says would be a SIGBUS (exit 135, nothing on
    stderr) at the first read; it is refused with one line naming the file and the fix."""
    damaged = tmp_path / "damaged.lmdb"
    damaged.mkdir()
    data = (data_lmdb / "data.mdb").read_bytes()
    (damaged / "data.mdb").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="data.mdb: truncated .* rebuild it"):
        LMDBImageDataset(damaged, 16)
    (damaged / "data.mdb").write_bytes(data[:100])
    with pytest.raises(ValueError, match="not an LMDB data file"):
        read_info(damaged)
    (damaged / "data.mdb").write_bytes(data[: len(data) // 2])
    done = shared()(
        "-m", "ilvr_toolkit.data.prepare", str(damaged), "--out", str(tmp_path / "o.lmdb"), "--size", "16"
    )
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{damaged / 'data.mdb'}: truncated" in done.stderr and not (tmp_path / "o.lmdb").exists()


def test_a_data_file_one_page_or_one_byte_short_is_refused(data_lmdb):
    """The newest meta page's last page must be inside the file: (last page + 1) * page size bytes."""
    data_file = str(data_lmdb / "data.mdb")
    with pytest.raises(ValueError, match=r"its metadata needs \d+\)") as refused:
        check_not_truncated(data_file, 0)
    needs = int(str(refused.value).split("its metadata needs ")[1].split(")")[0])
    psize = open_lmdb(data_lmdb).stat()["psize"]
    assert needs % psize == 0 and needs <= os.path.getsize(data_file)
    check_not_truncated(data_file, needs)  # complete
    for size in (needs - psize, needs - 1):
        with pytest.raises(
            ValueError, match=rf"data.mdb: truncated or damaged \({size} bytes, its metadata needs {needs}\)"
        ):
            check_not_truncated(data_file, size)


def test_data_file_is_found_in_the_maps_by_device_and_inode(data_lmdb, tmp_path):
    """Where data.mdb is mapped (the check of records past its end needs it): a file with its inode
    number on another device, mapped meanwhile, is not taken for it (that switched the check off)."""
    data = data_lmdb / "data.mdb"
    st = os.stat(data)
    major, minor, ino = os.major(st.st_dev), os.minor(st.st_dev), st.st_ino
    maps = tmp_path / "maps"  # /proc/self/maps lines: address, perms, offset, dev (hex), inode, path
    maps.write_text(
        f"7f0000000000-7f0000100000 r--s 00000000 {major:02x}:{minor:02x} {ino}    {data}\n"
        f"7f0000200000-7f0000201000 r--p 00001000 {major ^ 1:02x}:{minor:02x} {ino}    /mnt/other/lib.so\n"
        f"7f0000300000-7f0000301000 r--p 00000000 {major:02x}:{minor ^ 1:02x} {ino}    /mnt/other/b.so\n"
        f"7f0000400000-7f0000401000 r--p 00000000 {major:02x}:{minor:02x} {ino + 1}    {tmp_path / 'c'}\n"
        f"7f0000500000-7f0000600000 rw-p 00000000 00:00 0\n"
    )
    assert _mappings(str(data), st, str(maps)) == {0x7F0000000000}


# --------------------------------------------------------------------------- workers, DataModule, DDP
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_each_index_once_per_epoch(data_lmdb, context):
    ds = LMDBImageDataset(data_lmdb, 16, return_index=True)
    first = ds[0][0]  # the parent opens the LMDB first: forked workers must not reuse its handle
    loader = DataLoader(
        ds,
        batch_size=3,
        shuffle=True,
        num_workers=2,
        multiprocessing_context=context,
        persistent_workers=True,
    )
    for _ in range(2):
        seen, images = [], {}
        for batch, index in loader:
            assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, 16, 16)
            seen += index.tolist()
            images.update(zip(index.tolist(), batch, strict=True))
        assert sorted(seen) == list(range(len(ds)))
        assert torch.equal(images[0], first)


def test_pickle_holds_no_environment(data_lmdb):
    ds = LMDBImageDataset(data_lmdb, 32)
    before = ds[3]  # opened: an lmdb.Environment in its state would not pickle
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3], before)


def test_datamodule_batches(data_lmdb):
    n = read_info(data_lmdb).length
    dm = ImageDataModule(data_lmdb, 16, batch_size=4, workers=0, flip=True, drop_last=True)
    batches = list(dm.train_dataloader())
    assert len(batches) == n // 4 and all(
        b.dtype == torch.uint8 and b.shape == (4, 3, 16, 16) for b in batches
    )


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pytorch_lightning as pl
    import torch
    import torch.distributed as dist
    from ilvr_toolkit.data import ImageDataModule

    lmdb_path, out_file = sys.argv[1], sys.argv[2]

    class IndexRecorder(pl.LightningModule):
        # Records the dataset indices each rank trains on and gathers them on rank 0.
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            images, index = batch
            self.seen.append(index)
            return self.weight * images.float().mean()

        def on_train_epoch_end(self):
            gathered = self.all_gather(torch.cat(self.seen))
            if self.global_rank == 0:
                with open(out_file, "w") as f:
                    json.dump(gathered.tolist(), f)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = ImageDataModule(lmdb_path, 16, batch_size=2, workers=0, flip=False, drop_last=False,
                         return_index=True)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(IndexRecorder(), datamodule=dm)
    if dist.is_initialized():
        dist.destroy_process_group()  # as train.py does: a clean exit of every rank
    """
)


def test_ddp_two_processes_shard_every_index_once(data_lmdb, tmp_path):
    """Two DDP processes launched by torchrun (the launch of a cluster job) each train on half
    of the dataset, and together on every index exactly once."""
    n = read_info(data_lmdb).length
    assert n % 2 == 0
    script, out_file = tmp_path / "ddp_shards.py", tmp_path / "seen.json"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = torchrun(str(script), str(data_lmdb), str(out_file))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    per_rank = json.loads(out_file.read_text())
    assert len(per_rank) == 2 and len(per_rank[0]) == len(per_rank[1]) == n // 2
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))


def test_reference_set_of_files_at_native_size(tmp_path):
    """A list of files reads like a folder; without image_size, the first image's short side."""
    from ilvr_toolkit.data import ReferenceSet

    rng = np.random.default_rng(0)
    paths = [tmp_path / "b" / "cat.png", tmp_path / "dog.jpg"]
    paths[0].parent.mkdir()
    smooth_rgb(rng, 24, 32).save(paths[0])
    smooth_rgb(rng, 48, 48).save(paths[1])
    refs = ReferenceSet(paths)
    assert refs.image_size == 24 and refs.names == ["cat", "dog"] and refs.source == paths[0].parent
    assert [tuple(refs[i]["image"].shape) for i in range(2)] == [(3, 24, 24)] * 2
    assert torch.equal(refs[1]["image"], ReferenceSet(tmp_path / "dog.jpg", 24)[0]["image"])
    with pytest.raises(ValueError, match="no images"):
        ReferenceSet([])
