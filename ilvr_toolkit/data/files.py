"""Listing image files in the one traversal order of the converter and the reference sets:
guided-diffusion's ``_list_image_files_recursively`` (each folder's entries sorted by name, plain
string order, depth first). Hidden entries (``.ipynb_checkpoints``, macOS ``._x.jpg``) are skipped;
the official loader would try to open them and fail.
"""

import os
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "has_image_extension", "list_image_files", "unique_names"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def has_image_extension(name: str) -> bool:
    """Whether ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(root: str | Path) -> list[Path]:
    """All image files under ``root`` as ``root / relative`` paths, in the module's order.
    Symlinked folders are followed, once: a link cycle is not walked twice. A broken link with
    an image name is listed, so that its reader reports it as unreadable."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()

    def walk(folder: Path) -> None:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen_dirs:
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        for name in sorted(n for n in os.listdir(folder) if not n.startswith(".")):
            path = folder / name
            if path.is_dir():
                walk(path)
            elif has_image_extension(name) and (path.is_file() or path.is_symlink()):  # broken: unreadable
                found.append(path)

    walk(root)
    return found


def unique_names(relative_paths: list[str | Path]) -> list[str]:
    """One output stem per file, unique even on case-insensitive filesystems.

    A file keeps its stem (``a/b/cat.png`` -> ``cat``) unless another file has the same
    stem (compared case-insensitively); those files are named by their relative path
    joined with ``__`` (``a__b__cat``), then with their extension too (``a__b__cat_png``)
    if that still clashes, and finally a numeric suffix. The order of the input is kept.
    """
    parts = [Path(p).parts for p in relative_paths]

    def candidate(i: int, level: int) -> str:
        path = Path(*parts[i])
        joined = "__".join((*parts[i][:-1], path.stem))
        suffixed = f"{joined}_{path.suffix.lstrip('.')}" if path.suffix else joined
        return (path.stem, joined, suffixed, f"{suffixed}-{i}")[level]

    levels = [0] * len(parts)
    while True:
        names = [candidate(i, lv) for i, lv in enumerate(levels)]
        owners: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            owners.setdefault(name.casefold(), []).append(i)
        clashes = [i for group in owners.values() if len(group) > 1 for i in group if levels[i] < 3]
        if not clashes:
            return names
        for i in clashes:
            levels[i] += 1
