"""Images as people have them (issue 13, point 5): a phone JPEG with EXIF orientation 6, CMYK,
16-bit, RGBA and palette-with-transparency images (made here with PIL) give the same documented
RGB pixels through the converter, sample.py's references and the evaluation's image folders
(``imageops.load_rgb``: EXIF applied, alpha over white, 16-bit scaled by 1/257)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from faultkit import TINY32, run
from PIL import Image
from test_faults_loads import sample_args

from ilvr_toolkit.data import LMDBImageDataset, ReferenceSet, read_names
from ilvr_toolkit.evaluation import ImageSet

S = 32  # every image is 32 px on its short side: no resampling anywhere, so pixels compare exactly


def _halves(left: tuple, right: tuple, mode: str, size: tuple[int, int] = (S, S)) -> Image.Image:
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def make_people_images(folder: Path) -> dict[str, np.ndarray]:
    """Write the images; return the RGB (S, S, 3) uint8 each must become (computed independently)."""
    folder.mkdir(parents=True)
    expected = {}
    # a landscape phone photo stored sideways: EXIF 6 = rotate 90 degrees clockwise to display
    rng = np.random.default_rng(0)
    raw = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize((48, S), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw.save(folder / "photo.jpg", quality=95, exif=exif)
    upright = np.asarray(
        Image.open(folder / "photo.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    )
    assert upright.shape == (48, S, 3)
    expected["photo"] = upright[8:40]  # the centred square of the upright 32x48 photo
    cmyk = _halves((255, 0, 0, 0), (0, 0, 0, 128), "CMYK")  # cyan | 50% black
    cmyk.save(folder / "cmyk.jpg", quality=100)
    expected["cmyk"] = np.asarray(Image.open(folder / "cmyk.jpg").convert("RGB"))  # Pillow's conversion
    assert np.abs(expected["cmyk"][0, 0].astype(int) - (0, 255, 255)).max() <= 8
    assert np.abs(expected["cmyk"][0, -1].astype(int) - (127, 127, 127)).max() <= 8
    wide = np.zeros((S, S), np.uint16)
    wide[:, : S // 2], wide[:, S // 2 :] = 65535, 257 * 100 + 100  # 100.4 after /257: rounds to 100
    Image.fromarray(wide).save(folder / "wide.png")
    assert Image.open(folder / "wide.png").mode in ("I;16", "I")
    expected["wide"] = np.repeat(np.where(wide > 60000, 255, 100).astype(np.uint8)[..., None], 3, -1)
    rgba = _halves((10, 20, 30, 255), (200, 0, 0, 0), "RGBA")  # opaque | fully transparent red
    rgba.paste(Image.new("RGBA", (S, 1), (0, 0, 0, 128)), (0, 0))  # a half-transparent black row
    rgba.save(folder / "rgba.png")
    expected["rgba"] = np.array(_halves((10, 20, 30), (255, 255, 255), "RGB"))
    expected["rgba"][0] = 127  # 255 * (1 - 128/255), over white
    palette = _halves(0, 1, "P")
    palette.putpalette([200, 0, 0, 0, 128, 255] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)  # index 0 (red) is transparent
    expected["palette"] = np.asarray(_halves((255, 255, 255), (0, 128, 255), "RGB"))
    _halves(40, 220, "L").save(folder / "gray.png")
    expected["gray"] = np.asarray(_halves((40,) * 3, (220,) * 3, "RGB"))
    return expected


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("people") / "images"
    return folder, make_people_images(folder)


def _close(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.shape == want.shape, (name, got.shape)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, name  # alpha blending may round


def test_converter(people, tmp_path):
    folder, expected = people
    out = tmp_path / "people.lmdb"
    done = run(
        [
            "-m",
            "ilvr_toolkit.data.prepare",
            str(folder),
            "--out",
            str(out),
            "--size",
            str(S),
            "--workers",
            "0",
        ]
    )
    assert done.returncode == 0 and "skipped 0" in done.stdout, done.stderr
    ds = LMDBImageDataset(out, S)
    for i, name in enumerate(read_names(out)):
        _close(ds[i].permute(1, 2, 0).numpy(), expected[Path(name).stem], name)


def test_references_of_sample_py(people, tmp_path):
    """What sample.py loads (``ReferenceSet``) and shows: the first tile of each grid row."""
    folder, expected = people
    refs = ReferenceSet(folder, S)
    for i, name in enumerate(refs.names):
        _close(refs[i]["image"].permute(1, 2, 0).numpy(), expected[name], name)
    out = tmp_path / "out"
    done = run(sample_args(TINY32, folder, out, "--model.preset", "tiny32", "--sampler.respacing", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["failed_references"] in ({}, [])
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    for row, name in enumerate(refs.names):  # make_grid pads every tile by 2 px
        _close(grid[2 + row * (S + 2) : 2 + row * (S + 2) + S, 2 : 2 + S], expected[name], f"grid {name}")


def test_evaluation_folders(people, tmp_path):
    """The evaluation's image sets; its CLI pairs upright PNGs with the originals: L2 exactly 0."""
    folder, expected = people
    images = ImageSet(folder, S)
    for i, name in enumerate(images.names):
        _close(images[i].permute(1, 2, 0).numpy(), expected[name], name)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for name, pixels in expected.items():
        Image.fromarray(pixels).save(outputs / f"{name}_s0.png")
    metrics = tmp_path / "m.json"
    args = ["--outputs", str(outputs), "--references", str(folder), "--metrics_json", str(metrics)]
    done = run(["-m", "ilvr_toolkit.evaluation", *args, "--device", "cpu"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(metrics.read_text())
    assert result["num_pairs"] == len(expected) and result["l2"] < 1e-4, result
