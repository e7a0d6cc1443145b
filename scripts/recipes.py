"""Regenerate the recipe grids of docs/conditioning.md (docs/recipes/*.png) with the bundled demo
model (checkpoints/demo.pt, 32x32 greyscale faces) on the bundled references.

    python scripts/recipes.py              # every grid: about a minute on 2 idle CPU cores
    python scripts/recipes.py sdedit inpaint   # some of them

It first derives the recipe inputs from datasets/demo_references into docs/recipes/inputs/
(grey images, 8x8 low-resolution images, crude paintings, scribbled images) and the two masks,
then runs every recipe's ``sample.py`` command (the ones printed in docs/conditioning.md, each
into outputs/recipes/<name>) and draws one grid per recipe: per reference, the input y, what
the task keeps of it (P(y)) and the samples.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ilvr_toolkit.data.references import load_reference  # noqa: E402
from ilvr_toolkit.images import to_float, to_uint8  # noqa: E402
from ilvr_toolkit.sampling.cli import parse_config  # noqa: E402
from ilvr_toolkit.sampling.runner import run  # noqa: E402
from ilvr_toolkit.sampling.tasks import run_operators  # noqa: E402

DOCS = ROOT / "docs" / "recipes"
INPUTS = DOCS / "inputs"
SIZE, SCALE = 32, 3  # the demo model's side; tiles are drawn 3x (nearest) to be seen
BASE = "python sample.py --model.checkpoint checkpoints/demo.pt --device cpu"

#: name -> (title, sample.py options; every recipe: --output.dir outputs/recipes/<name>)
RECIPES = {
    "inpaint": ("inpainting the centre", "--references datasets/demo_references --task inpaint "
                "--mask docs/recipes/inputs/mask_centre.png"),
    "colorize": ("colourising grey images", "--references docs/recipes/inputs/grey --task colorize"),
    "superres": ("x4 super-resolution of 8x8 inputs", "--references docs/recipes/inputs/lowres "
                 "--task superres --ilvr.factor 4"),
    "local_edit": ("a local edit: scribble, edit region free, rest held by phi_2",
                   "--references docs/recipes/inputs/scribble --task local_edit "
                   "--mask docs/recipes/inputs/mask_edit.png --ilvr.factor 2 --sdedit.strength 0.6"),
    "paint_to_image": ("paint-to-image: ILVR N=8 from a painting, SDEdit start 0.7",
                       "--references docs/recipes/inputs/painting --ilvr.factor 8 --sdedit.strength 0.7"),
    "ilvr_sdedit": ("ILVR N=4 with an SDEdit start at strength 0.5",
                    "--references datasets/demo_references --ilvr.factor 4 --sdedit.strength 0.5"),
}  # fmt: skip
STRENGTHS = ("0.1", "0.25", "0.5")  # SDEdit alone (no projection: --ilvr.fraction 0)
SDEDIT = "--references datasets/demo_references --ilvr.fraction 0 --samples_per_reference 1"


def make_inputs() -> None:
    """The derived recipe inputs (small PNGs, committed so the documented commands run)."""
    for kind in ("grey", "lowres", "painting", "scribble"):
        (INPUTS / kind).mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / "datasets" / "demo_references").glob("*.png")):
        small = Image.fromarray(load_reference(path, SIZE).permute(1, 2, 0).numpy())  # as sample.py reads it
        small.convert("L").convert("RGB").save(INPUTS / "grey" / path.name)
        Image.fromarray(load_reference(path, SIZE // 4).permute(1, 2, 0).numpy()).save(
            INPUTS / "lowres" / path.name
        )
        painting = small.filter(ImageFilter.GaussianBlur(2)).quantize(6).convert("RGB")  # a crude painting
        painting.save(INPUTS / "painting" / path.name)
        scribbled = small.copy()
        ImageDraw.Draw(scribbled).ellipse((10, 18, 22, 26), fill=(240, 240, 240))  # a white blob
        scribbled.save(INPUTS / "scribble" / path.name)
    centre = np.full((SIZE, SIZE), 255, np.uint8)
    centre[10:22, 10:22] = 0  # black = generated
    Image.fromarray(centre).save(INPUTS / "mask_centre.png")
    edit = np.full((SIZE, SIZE), 255, np.uint8)
    edit[16:28, 8:24] = 0  # around the scribble
    Image.fromarray(edit).save(INPUTS / "mask_edit.png")


def command(options: str, name: str) -> str:
    return f"{BASE} {options} --output.dir outputs/recipes/{name}"


def sample(options: str, name: str):
    """Run one recipe's sample.py command in this process; returns (config, RunResult)."""
    argv = command(options, name).split()[2:] + ["--progress", "false", "--output.grid", "false"]
    shutil.rmtree(ROOT / "outputs" / "recipes" / name, ignore_errors=True)  # regenerate, never resume
    config = parse_config(argv)
    return config, run(config)


def tile(image: torch.Tensor) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((SIZE * SCALE,) * 2, Image.Resampling.NEAREST)


def draw_grid(path: Path, title: str, header: list[str], rows: list[list[torch.Tensor]]) -> None:
    """Rows of uint8 (3, H, W) tiles under a title and column labels, white background."""
    cell, top = SIZE * SCALE + 4, 34
    grid = Image.new("RGB", (cell * len(header), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), title, fill="black")
    for c, label in enumerate(header):
        draw.text((c * cell + 2, 18), label, fill="black")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(tile(image), (c * cell + 2, top + r * cell + 2))
    grid.save(path)
    print(f"wrote {path.relative_to(ROOT)}")


def recipe_grid(name: str, title: str, options: str) -> None:
    config, result = sample(options, name)
    factor = config.ilvr.factors[0]
    operator = run_operators(config, SIZE, torch.device("cpu"), [factor])[factor]
    rows = []
    for index, stem in enumerate(result.references.names):
        y = result.references.get(index)
        kept = to_uint8(operator(to_float(y)[None]))[0]
        outputs = [read(result.out_dir / f"{stem}_s{k}.png") for k in range(config.samples_per_reference)]
        rows.append([y, kept, *outputs])
    header = ["input y", "P(y) kept"] + [f"sample {k}" for k in range(config.samples_per_reference)]
    draw_grid(DOCS / f"{name}.png", title, header, rows)


def sdedit_grid() -> None:
    runs = [sample(f"{SDEDIT} --sdedit.strength {s}", f"sdedit_{s}")[1] for s in STRENGTHS]
    rows = []
    for index, stem in enumerate(runs[0].references.names):
        rows.append([runs[0].references.get(index)] + [read(r.out_dir / f"{stem}_s0.png") for r in runs])
    header = ["input y"] + [f"strength {s}" for s in STRENGTHS]
    draw_grid(DOCS / "sdedit.png", "SDEdit alone at three strengths", header, rows)


def read(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def main(names: list[str]) -> None:
    """Regenerate the grids ``names`` (all by default: the RECIPES and ``sdedit``)."""
    os.chdir(ROOT)  # the commands use paths relative to the repository
    make_inputs()
    for name, (title, options) in RECIPES.items():
        if not names or name in names:
            print(f"\n{name}: {command(options, name)}")
            recipe_grid(name, title, options)
    if not names or "sdedit" in names:
        for s in STRENGTHS:
            print(f"\nsdedit {s}: {command(f'{SDEDIT} --sdedit.strength {s}', f'sdedit_{s}')}")
        sdedit_grid()


if __name__ == "__main__":
    main(sys.argv[1:])
