#!/usr/bin/env python
"""Build the bundled demo's data from images that ship inside scikit-image (no download).

Target domain: the 100 face photographs of scikit-image's LFW subset (Labeled Faces in the
Wild, 25x25 greyscale), upscaled to 32x32 with PIL's LANCZOS filter (the converter refuses
images smaller than the target size, so the upscale is explicit here) and turned into
``datasets/demo_faces.lmdb`` by our converter.

References (another domain): crops of scikit-image's colour photographs (a cat, an astronaut,
a cup of coffee, a rocket, the cameraman, a retina) written to ``datasets/demo_references/``
(committed, so ``python sample.py`` does not need scikit-image).

    pip install scikit-image && python scripts/demo/make_demo_data.py [--overwrite]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
FACES_LMDB = ROOT / "datasets" / "demo_faces.lmdb"
REFERENCES = ROOT / "datasets" / "demo_references"

# (skimage.data function, crop box (left, top, right, bottom) around the subject)
REFERENCE_CROPS = {
    "cat": ("chelsea", (120, 10, 380, 270)),
    "astronaut": ("astronaut", (150, 20, 290, 160)),
    "coffee": ("coffee", (60, 0, 460, 400)),
    "rocket": ("rocket", (160, 40, 480, 360)),
    "cameraman": ("camera", (170, 40, 330, 200)),
    "retina": ("retina", (0, 0, 1411, 1411)),
}


def write_faces(folder: Path) -> int:
    """The 100 LFW faces as 32x32 RGB PNGs in ``folder``; returns the count."""
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    for i, face in enumerate(faces):
        grey = Image.fromarray(np.round(face * 255).astype(np.uint8), mode="L")
        grey.resize((32, 32), Image.LANCZOS).convert("RGB").save(folder / f"face{i:03d}.png")
    return len(faces)


def write_references(folder: Path) -> None:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    for name, (loader, box) in REFERENCE_CROPS.items():
        image = Image.fromarray(getattr(skimage.data, loader)()).convert("RGB").crop(box)
        image.resize((128, 128), Image.LANCZOS).save(folder / f"{name}.png")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--overwrite", action="store_true", help="rebuild the LMDB if it exists")
    args = parser.parse_args()
    write_references(REFERENCES)
    with tempfile.TemporaryDirectory() as tmp:
        count = write_faces(Path(tmp))
        cmd = [
            sys.executable,
            "-m",
            "ilvr_toolkit.data.prepare",
            tmp,
            "--out",
            str(FACES_LMDB),
            "--size",
            "32",
        ]
        if args.overwrite:
            cmd.append("--overwrite")
        subprocess.run(cmd, check=True)
    print(f"demo data: {count} faces -> {FACES_LMDB}; references -> {REFERENCES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
