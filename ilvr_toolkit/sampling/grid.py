"""The side-by-side grid: per reference, reference | P(reference) | outputs (per factor N), with
P the task's operator (phi_N for ILVR, the mask for inpainting, ...; ``sampling.tasks``)."""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from ..data.imageops import BadImage, load_rgb
from ..images import to_float, to_uint8
from .plan import output_name
from .writer import save_png


def build_grid(
    path: Path,
    out_dir: Path,
    references: Sequence[tuple[str, torch.Tensor]],
    operators: Mapping[int, torch.nn.Module],
    samples_per_reference: int,
) -> bool:
    """Write the grid PNG for ``references`` (name, uint8 (3, H, W)) from the PNGs on disk.

    Columns: reference, then for each factor N of ``operators`` (N -> P on the CPU): P(reference)
    and its samples. Missing outputs are left blank. Returns False when there is nothing to show.
    """
    if not references:
        return False
    size = references[0][1].shape[-1]
    blank, several = torch.zeros(3, size, size, dtype=torch.uint8), len(operators) > 1
    tiles: list[torch.Tensor] = []
    for name, ref in references:
        tiles.append(ref)
        for n, project in operators.items():
            tiles.append(to_uint8(project(to_float(ref)[None]))[0])
            for k in range(samples_per_reference):
                png = out_dir / output_name(name, n if several else None, k)
                tiles.append(_read_output(png) if png.exists() else blank)
    columns = 1 + len(operators) * (1 + samples_per_reference)
    save_png(path, make_grid(torch.stack(tiles), nrow=columns, padding=2, pad_value=255))
    return True


def _read_output(png: Path) -> torch.Tensor:
    """A finished output as uint8 (3, H, W), read with Pillow (``imageops.load_rgb``; torchvision's
    decoder ends the process on a corrupt chunk and needs UTF-8 names); ``BadImage`` if damaged."""
    try:
        return torch.from_numpy(np.array(load_rgb(png.read_bytes()))).permute(2, 0, 1)
    except BadImage as e:
        raise BadImage(f"{png}: damaged ({e}); delete it and rerun to make it again") from None
