"""The side-by-side grid: per reference, reference | P(reference) | outputs (per factor N), with
P the task's operator (phi_N for ILVR, the mask for inpainting, ...; ``sampling.tasks``)."""

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, read_image
from torchvision.utils import make_grid

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
                tiles.append(read_image(str(png), ImageReadMode.RGB) if png.exists() else blank)
    columns = 1 + len(operators) * (1 + samples_per_reference)
    save_png(path, make_grid(torch.stack(tiles), nrow=columns, padding=2, pad_value=255))
    return True
