"""The run manifest: what was run (checkpoint hash, full config, versions) and, per image,
its seed and timing. Each rank keeps its own part (its last file rewritten atomically after
every batch, so a killed run keeps the timings of what it finished); the main rank merges the
parts."""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cli import UsageError
from ..fileio import lock_folder
from .writer import create_json_once, read_json, write_json

__all__ = ["ManifestPart", "check_same_run", "versions", "merge_manifest"]

PARTS_DIR = ".manifest"
_ENTRY = {"reference": (str, type(None)), "reference_index": int, "seconds": (int, float)}
PART = {"images": {str: _ENTRY}, "failed": {str: str}}  # a part's layout (writer.fits): damaged if not
#: entries (images and failed references) a part file takes before the next file begins: a save
#: rewrites one file, so its cost does not grow with the run (70k entries in one file: 1.7 s a save)
PART_LIMIT = 1024


def versions() -> dict[str, str]:
    import ilvr_toolkit

    found = {"python": platform.python_version(), "torch": torch.__version__}
    found["ilvr_toolkit"] = ilvr_toolkit.__version__
    for module in ("torchvision", "pytorch_lightning", "torchmetrics", "numpy", "PIL"):
        with contextlib.suppress(ImportError, AttributeError):
            found[module] = __import__(module).__version__
    return found


@dataclass
class ManifestPart:
    """One rank's record, stored at ``<out>/.manifest/shard<s>-rank<r>.json`` and, once that holds
    ``PART_LIMIT`` entries, continued in ``shard<s>-rank<r>.1.json``, ``.2.json``...: ``path``,
    ``images`` and ``failed`` are the last file's, the one a save rewrites."""

    path: Path
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    recorded: dict[str, str] = field(default_factory=dict)  # failed references saved by this process

    @classmethod
    def open(cls, out_dir: Path, shard: int, rank: int, alone: bool = True) -> ManifestPart:
        """The part, held until the process ends: ``OUT/.lock`` for a one-process run (``alone``);
        a shard's or rank's process holds it shared (beside the other parts, never beside a
        one-process run) and ``.manifest/shard<s>-rank<r>.lock`` (POSIX locks recording pid and
        host; a killed holder's is free). UsageError naming the live holder of either."""
        path = out_dir / PARTS_DIR / f"shard{shard}-rank{rank}.json"
        for lock in [(out_dir, ".lock")] + ([] if alone else [(path.parent, f"{path.stem}.lock")]):
            shared, named = not alone and lock[1] == ".lock", f"--output.dir {out_dir}"
            if holder := lock_folder(*lock, shared=shared, named=named):
                raise UsageError(f"--output.dir {out_dir}: in use by {holder} ({Path(*lock)})")
        later = [p.stem.partition(".")[2] for p in path.parent.glob(f"{path.stem}.*.json")]
        if numbers := [int(n) for n in later if n.isdigit()]:  # continue the last file
            path = path.with_name(f"{path.stem}.{max(numbers)}.json")
        data = read_json(path, PART) if path.exists() else {}
        return cls(path, data.get("images", {}), data.get("failed", {}))

    def __post_init__(self) -> None:
        self._next_if_full()  # a full last file stays as it is: the next save begins the next one

    def save(self, failed: dict[str, str]) -> None:
        """Add the ``failed`` references not saved before to the last file and rewrite it; a full
        one stays as it is, the next save begins the next file."""
        new = {name: why for name, why in dict(failed).items() if self.recorded.get(name) != why}
        self.failed.update(new)
        self.recorded.update(new)
        write_json(self.path, {"images": self.images, "failed": self.failed})
        self._next_if_full()

    def _next_if_full(self) -> None:
        if len(self.images) + len(self.failed) >= PART_LIMIT:
            stem, _, number = self.path.stem.partition(".")
            self.path = self.path.with_name(f"{stem}.{int(number or 0) + 1}.json")
            self.images, self.failed = {}, {}


#: the settings that make the images: a rerun into the same output folder must keep them
SAME_RUN = ("task", "model", "references", "unconditional", "num_samples", "ilvr", "sampler", "class_labels")
SAME_RUN += ("samples_per_reference", "seed", "precision", "channels_last", "native_groupnorm")
SAME_RUN += ("sdedit", "winograd")  # (in the order a difference is named: the task first)
#: settings added after folders were written: a folder that lacks one was made with this value
_ADDED = {"winograd": False}


def check_same_run(
    out_dir: Path, config: dict[str, Any], digests: dict[str, str | None], unused: tuple[str, ...] = ()
) -> None:
    """Record the settings that make the images (and ``digests`` of the files they come from:
    model, mask) in ``OUT/.manifest/settings.json``; a rerun must match them, but for the
    ``unused`` ones (``ilvr.factor`` of a task without N). Paths compare resolved, the model by
    its digest only."""
    path, now = out_dir / PARTS_DIR / "settings.json", {}
    for key, value in json.loads(json.dumps({k: config[k] for k in SAME_RUN}, default=str)).items():
        now.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    file = {"model.sha256": ("model.checkpoint", now.pop("model.checkpoint", None))}
    file["mask.sha256"] = ("mask", config.get("mask"))
    now = _resolved({**now, **digests})  # the settings first, then the files' digests (model: only that)
    create_json_once(path, now)  # not check-then-write: of two runs started together, one's settings win
    before = _resolved({**_ADDED, **read_json(path, dict)})
    for key in (key for key in now if key in before and now[key] != before[key] and key not in unused):
        if key in file:  # a file of other content than the run's
            flag, given = file[key]
            raise UsageError(
                f"--{flag} {given}: {out_dir} holds a run made with another {flag.split('.')[0]} "
                f"(sha256 {str(before[key])[:12]}..., this one {str(now[key])[:12]}...) ({path})"
            )
        given, made = (json.dumps(v) if isinstance(v, bool) else v for v in (now[key], before.get(key)))
        raise UsageError(
            f"--{key} {given}: {out_dir} holds a run made with {made} ({path})"
        )  # true, as typed


def _resolved(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with their reference path absolute (older folders recorded it as given)."""
    refs = settings.get("references")
    return {**settings, "references": str(Path(refs).resolve()) if isinstance(refs, str) else refs}


def part_files(out_dir: Path) -> list[Path]:
    """The files of every part in ``OUT/.manifest``, those of one part in the order written (an
    image saved again, its PNG not written before a kill, has its later entry last)."""

    def order(path: Path) -> tuple[str, int]:
        stem, _, number = path.stem.partition(".")
        return stem, int(number) if number.isdigit() else 0

    return sorted((p for p in (out_dir / PARTS_DIR).glob("*.json") if p.name != "settings.json"), key=order)


def recorded_images(out_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, entry) of every image in every part of ``OUT/.manifest`` (one file may be in
    several parts after a change of shards or ranks)."""
    for part in part_files(out_dir):
        yield from read_json(part, PART).get("images", {}).items()


def check_references_in_place(out_dir: Path, names: list[str], references: str | None) -> None:
    """Every image recorded in ``OUT/.manifest`` was made from the reference that now has its
    index (its noise is seeded by the index): references added after the last one are fine."""
    for filename, entry in recorded_images(out_dir):
        index, name = entry.get("reference_index"), entry.get("reference")
        made = name is not None and (out_dir / filename).exists()  # a part may list an unwritten PNG
        if made and (index >= len(names) or names[index] != name):
            now = names[index] if index < len(names) else "no image"
            raise UsageError(
                f"--references {references}: reference {index} is now {now!r}, but {out_dir} made "
                f"{filename} from {name!r} there (a file added, removed or renamed before it); "
                "restore the folder or use a new --output.dir"
            )


def check_reference_content(out_dir: Path, source: Any, references: str | None, indices: range) -> None:
    """Every recorded image of references ``indices`` (a shard's) was made from the content its
    reference has now: ``source.stamp(i)`` (size, mtime) as recorded, else ``source.digest(i)``
    (the bytes' SHA-256, read once) among the digests recorded for that file (several parts may
    hold one after a change of shards or ranks)."""
    made: dict[str, list[dict[str, Any]]] = {}
    for filename, entry in recorded_images(out_dir):
        if entry.get("reference_sha256") and entry.get("reference_index") in indices:
            made.setdefault(filename, []).append(entry)
    stamp, digest = functools.cache(source.stamp), functools.cache(source.digest)
    for filename, entries in made.items():
        index, name = entries[0]["reference_index"], entries[0]["reference"]
        same_file = stamp(index) is not None and any(
            e.get("reference_stamp") == stamp(index) for e in entries
        )
        if same_file or not (out_dir / filename).exists():
            continue
        if digest(index) not in {None, *(e["reference_sha256"] for e in entries)}:
            raise UsageError(
                f"--references {references}: {name!r} has changed since {out_dir} made {filename} "
                f"from it; restore it, delete its outputs ({name}_*.png) to make them anew, or use "
                "a new --output.dir"
            )


def merge_manifest(out_dir: Path, header: dict[str, Any], name: str = "manifest.json") -> dict[str, Any]:
    """Merge every rank's part with ``header`` (run description) into ``<out>/<name>``."""
    images, failed = {}, {}
    for part_path in part_files(out_dir):
        data = read_json(part_path, PART)
        images.update(data.get("images", {}))
        failed.update(data.get("failed", {}))
    # Keep only entries whose PNG is really there (a part may predate a deleted output).
    images = {k: v for k, v in sorted(images.items()) if (out_dir / k).exists()}
    made = {entry.get("reference") for entry in images.values()}  # a reference fixed since it failed
    failed = {k: v for k, v in failed.items() if k not in made}
    seconds = [v["seconds"] for v in images.values() if "seconds" in v]
    manifest = {**header, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "num_images": len(images)}
    manifest["mean_seconds_per_image"] = (sum(seconds) / len(seconds)) if seconds else None
    manifest.update(failed_references=failed, images=images)
    write_json(out_dir / name, manifest)
    return manifest
