"""ILVR reference images: the official preprocessing, folders and LMDBs, unreadable files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import smooth_rgb
from PIL import Image

from ilvr_toolkit.data import (
    BadImage,
    LMDBImageDataset,
    ReferenceSet,
    build_lmdb,
    collate_references,
    load_reference,
)


def _official(img: Image.Image, res: int) -> torch.Tensor:
    """The ILVR / guided-diffusion steps, written out for a 300x200 image and res=32."""
    assert img.size == (300, 200) and res == 32
    img = img.convert("RGB")
    img = img.resize((150, 100), resample=Image.BOX)  # min 200 >= 64
    img = img.resize((75, 50), resample=Image.BOX)  # min 100 >= 64; then 50 < 64 stops
    img = img.resize((48, 32), resample=Image.BICUBIC)  # scale 32/50: round(75*0.64)=48
    arr = np.asarray(img)[0:32, 8:40]  # crop_y = 0, crop_x = (48-32)//2 = 8
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def test_box_halving_rule_matches_official():
    img = smooth_rgb(np.random.default_rng(0), 200, 300)
    got = load_reference(img, 32)
    assert got.dtype == torch.uint8 and got.shape == (3, 32, 32)
    assert torch.equal(got, _official(img, 32))
    direct = np.asarray(img.resize((48, 32), resample=Image.BICUBIC))[0:32, 8:40]
    assert not np.array_equal(direct, got.permute(1, 2, 0).numpy())  # the halvings matter
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert torch.equal(load_reference(buf.getvalue(), 32), got)


def test_small_image_is_upsampled_and_cropped():
    img = smooth_rgb(np.random.default_rng(1), 20, 10)  # portrait 10x20 -> 32x64 -> crop rows 16..48
    got = load_reference(img, 32)
    expected = np.asarray(img.resize((32, 64), resample=Image.BICUBIC))[16:48, 0:32]
    assert torch.equal(got, torch.from_numpy(expected.copy()).permute(2, 0, 1))


@pytest.fixture()
def reference_folder(tmp_path):
    rng = np.random.default_rng(2)
    smooth_rgb(rng, 40, 60).save(tmp_path / "b.png")
    smooth_rgb(rng, 70, 30).convert("L").save(tmp_path / "a.JPG", quality=95)
    rgba = smooth_rgb(rng, 33, 33).convert("RGBA")
    rgba.putalpha(128)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    rgba.save(tmp_path / "x" / "cat.png")
    smooth_rgb(rng, 100, 50).convert("P").save(tmp_path / "y" / "cat.webp", lossless=True)
    wide = (np.asarray(smooth_rgb(rng, 40, 40).convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "y" / "wide.png")
    (tmp_path / "y" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


@pytest.mark.parametrize("shape", [(100000, 1), (1, 100000), (5000, 40)])
def test_a_very_long_strip_resamples_only_the_crop(shape, monkeypatch):
    """A 100000x1 strip (a few hundred bytes as PNG) at 32 px: upstream resizes it whole to
    3200000x32; here Pillow never makes more than a few crops' worth of pixels, nor does numpy."""
    import tracemalloc

    made, resize = [], Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda im, size, *a, **k: made.append(size) or resize(im, size, *a, **k)
    )
    strip = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8)
    )
    tracemalloc.start()
    out = load_reference(strip, 32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (3, 32, 32) and made and max(w * h for w, h in made) <= 4 * 32 * 32
    assert peak < 2 << 20  # the full resize would be 300 MB


def test_reference_folder(reference_folder):
    refs = ReferenceSet(reference_folder, 16)
    assert refs.names == ["a", "b", "x__cat", "y__cat", "wide", "zz_broken"]  # sorted walk, stems made unique
    for i in range(5):
        item = refs[i]
        assert item["index"] == i and item["name"] == refs.names[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)
    gray = refs[0]["image"]
    assert torch.equal(gray[0], gray[1])
    wide16 = np.asarray(Image.open(reference_folder / "y" / "wide.png"))
    as_8bit = Image.fromarray((wide16 // 257).astype(np.uint8), mode="L")
    assert torch.equal(refs[4]["image"], load_reference(as_8bit, 16))  # 16-bit scaled, not clipped to white
    item, error = refs.try_get(5)
    assert item is None and "zz_broken.png" in error
    assert refs.try_get(1)[1] is None
    with pytest.raises(BadImage, match="zz_broken"):
        refs[5]
    with pytest.raises(IndexError):
        refs.try_get(6)
    batch = collate_references([refs.try_get(i)[0] for i in range(len(refs))])
    assert batch["image"].shape == (5, 3, 16, 16) and batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["name"] == refs.names[:5]


def test_reference_lmdb_and_errors(reference_folder, tmp_path):
    out = tmp_path / "refs.lmdb"
    build_lmdb(reference_folder, out, [16, 32], workers=0, progress=False)
    stored = LMDBImageDataset(out, 32)
    refs = ReferenceSet(out, 24)  # read from the 32 entry, through the same preprocessing
    assert refs.names == [f"{i:05d}" for i in range(len(stored))]
    assert torch.equal(refs[1]["image"], load_reference(bytes(stored.read_bytes(1)), 24))
    same = ReferenceSet(out, 16)
    assert torch.equal(same[0]["image"], LMDBImageDataset(out, 16)[0])  # stored size: unchanged
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ReferenceSet(tmp_path / "empty", 16)
    with pytest.raises(FileNotFoundError):
        ReferenceSet(tmp_path / "missing", 16)


def test_a_sample_runs_grid_is_not_an_image_of_the_folder(tmp_path):
    """A sample.py output folder read as images (evaluation --outputs, references of a next
    translation) lists its outputs, not its grid.png; in any other folder a grid.png is an image."""
    for name in ("a_s0.png", "grid.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    assert ReferenceSet(tmp_path).names == ["a_s0", "grid"]
    (tmp_path / "manifest.json").write_text("{}")
    assert ReferenceSet(tmp_path).names == ["a_s0"]
