"""Shared pytest fixtures."""

from __future__ import annotations

import os
import socket
import sys

# One intra-op thread per process (set before torch is imported, inherited by the CLI
# subprocesses the tests start): the tests use small tensors, and on a 2-core CI box several
# processes (DDP, torchrun, converter workers) each spinning 2 OpenMP threads slowed
# convolutions by over 10x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REFERENCE_DIR = Path(__file__).parent / "fixtures" / "reference"


@pytest.fixture(scope="session")
def runner():
    """The session's fork server for the real CLIs (``clirunner.shared``)."""
    from clirunner import shared

    return shared()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The recorded outputs of the official ILVR code (copied from shared/reference)."""
    return REFERENCE_DIR


@pytest.fixture(scope="module")
def tiny32(reference_dir):
    """The official code's tiny32 UNet with its recorded weights, eval mode (one per test module)."""
    from ilvr_toolkit.models import load_model

    return load_model(reference_dir / "tiny32.pt", preset="tiny32").model.eval()


@pytest.fixture(scope="session")
def ref_record(reference_dir: Path) -> dict:
    """tiny32_ilvr_ref.pt: forward check, respacing tables, one full ILVR run, resizer matrices."""
    return torch.load(reference_dir / "tiny32_ilvr_ref.pt", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- data fixtures
# A small image folder for the converter / reader / reference tests: good images in several
# formats, modes and aspect ratios (some in sub-folders), plus exactly three bad files.
DATA_SIZES = (16, 32)  # the converter tests build both; the smallest good image is 32 on its short side
DATA_BAD_FILES = ("bad/truncated.png", "bad/not_an_image.jpg", "bad/too_small.png")


def smooth_rgb(rng, height: int, width: int):
    """A smooth random RGB image (PIL): compressible like a photo, distinct per draw."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def make_data_folder(root: Path, seed: int = 0) -> list[str]:
    """Write the mixed folder under ``root``; return the relative names of the good images."""
    import io

    import numpy as np

    rng = np.random.default_rng(seed)
    good: list[str] = []

    def save(rel: str, img, **kwargs) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kwargs)
        good.append(rel)

    for i in range(8):  # plain RGB PNGs, mixed aspect ratios
        save(f"rgb/{i:02d}.png", smooth_rgb(rng, 32 + 4 * i, 48 - 2 * i))
    save("formats/a.jpg", smooth_rgb(rng, 40, 40), quality=95)
    save("formats/b.JPEG", smooth_rgb(rng, 36, 50), quality=90)
    save("formats/c.webp", smooth_rgb(rng, 33, 35), lossless=True)
    save("formats/d.bmp", smooth_rgb(rng, 32, 32))
    save("modes/gray.png", smooth_rgb(rng, 40, 34).convert("L"))
    save("modes/palette.png", smooth_rgb(rng, 34, 40).convert("P"))
    palette_t = smooth_rgb(rng, 32, 32).convert("P")
    save("modes/palette_transparent.png", palette_t, transparency=0)
    rgba = smooth_rgb(rng, 32, 44).convert("RGBA")
    rgba.putalpha(smooth_rgb(rng, 32, 44).convert("L"))
    save("modes/rgba.png", rgba)
    save("modes/la.png", rgba.convert("LA"))
    from PIL import Image

    wide = (np.asarray(smooth_rgb(rng, 36, 36).convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    save("modes/gray16.png", Image.fromarray(wide))
    save("modes/cmyk.jpg", smooth_rgb(rng, 40, 32).convert("CMYK"), quality=95)
    save("sub/deeper/rgb.png", smooth_rgb(rng, 64, 64))

    (root / "bad").mkdir(exist_ok=True)
    buf = io.BytesIO()
    smooth_rgb(rng, 40, 40).save(buf, format="PNG")
    (root / DATA_BAD_FILES[0]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / DATA_BAD_FILES[1]).write_text("this is not an image\n")
    smooth_rgb(rng, 20, 40).save(root / DATA_BAD_FILES[2])
    (root / ".hidden.png").write_bytes(b"skipped: hidden")
    (root / "notes.txt").write_text("skipped: not an image extension")
    return good


@pytest.fixture(scope="session")
def data_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """(folder, relative names of its good images); see ``make_data_folder``."""
    root = tmp_path_factory.mktemp("data_src")
    return root, make_data_folder(root)


@pytest.fixture(scope="session")
def data_lmdb(data_folder, tmp_path_factory) -> Path:
    """``data_folder`` converted at sizes 16 and 32 (PNG), with 2 worker processes."""
    from ilvr_toolkit.data import build_lmdb

    out = tmp_path_factory.mktemp("data_out") / "mixed.lmdb"
    build_lmdb(data_folder[0], out, list(DATA_SIZES), workers=2, progress=False)
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process-group rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` local processes on a free port."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*head, "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
