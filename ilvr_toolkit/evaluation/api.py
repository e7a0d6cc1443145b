"""One call to evaluate a translation run: FID/KID against the target domain, faithfulness to the references.

``evaluate_translation`` is what ``sample.py --evaluate-against`` and
``python -m ilvr_toolkit.evaluation`` call. Every process of a torch.distributed job must
call it (the metrics are gathered collectively); each process reads only its shard of the
outputs, rank 0 alone loads the cached target statistics, and all processes return the same
dictionary (write it from rank 0).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_bytes
from .faithfulness import FaithfulnessMetrics
from .fid import KID_SUBSET_SIZE, KID_SUBSETS, InceptionMetrics
from .inception import InceptionFeatureExtractor, as_uint8
from .sources import ImageSet, iterate_images, open_image_set, reference_name_for, shard_indices
from .stats import cached_reference_stats, dist_rank_world, load_stats

__all__ = [
    "PairSource",
    "evaluate_translation",
    "pair_by_name",
    "write_metrics",
    "format_table",
]

PairSource = tuple["str | os.PathLike | torch.Tensor", torch.Tensor]
"""(output image: a path or a uint8/[-1,1] tensor (3, H, W), its reference: uint8/[-1,1] tensor (3, H, W))."""


def _pick_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pair_by_name(output_names: Sequence[str], reference_names: Sequence[str]) -> list[tuple[int, int]]:
    """(output index, reference index) pairs: output ``<stem>_s<k>``, ``<stem>_N<N>_s<k>`` or ``<stem>`` -> ``<stem>``.

    Raises ValueError naming the outputs that have no reference.
    """
    by_name = {name: j for j, name in enumerate(reference_names)}
    pairs, missing = [], []
    for i, name in enumerate(output_names):
        j = by_name.get(name, by_name.get(reference_name_for(name)))
        if j is None:
            missing.append(name)
        else:
            pairs.append((i, j))
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ValueError(f"no reference found for outputs: {shown}")
    return pairs


def evaluate_translation(
    outputs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    references: str | os.PathLike | None = None,
    target: str | os.PathLike | None = None,
    *,
    pairs: Sequence[PairSource] | None = None,
    factor: int | None = None,
    image_size: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    extractor: InceptionFeatureExtractor | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: torch.device | str | None = None,
    kid: bool = True,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Metrics of a translation run.

    Args:
        outputs: the translated images: a folder (recursive), or an explicit list of image files
            (use the list to leave grids and other files of a run folder out).
        references: folder or LMDB of the source images; output ``<stem>_s<k>`` is paired with
            reference ``<stem>``. Gives SSIM / PSNR / L2 (and their low-pass variants with
            ``factor``). Alternatively pass ``pairs``.
        target: the target domain (folder, LMDB, or a statistics ``.npz``) for FID/KID.
            Its statistics are cached (see ``stats.py``). None: no FID/KID.
        pairs: explicit (output, reference) pairs for the faithfulness metrics; takes the
            place of ``references``.
        factor: ILVR's low-pass factor N for the low-pass faithfulness metrics.
        image_size: evaluation size (default: the size of the first output). Every set is
            brought to it with the reference loader (no-op at that size).
        inception_weights: the FID Inception weights file (default: the torch hub cache).
        extractor: an already built extractor (takes the place of ``inception_weights``).
        cache_dir: where reference statistics are cached (default ``~/.cache/ilvr_toolkit/fid_stats``).

    Returns:
        dict: ``fid``, ``kid_mean``, ``kid_std`` (with a target); ``ssim``, ``psnr``, ``l2``,
        ``ssim_lowpass``, ``psnr_lowpass`` (with references or pairs); counts, settings and
        timings. JSON-ready (:func:`write_metrics`).
    """
    if outputs is None and pairs is None:
        raise ValueError("nothing to evaluate: give outputs and/or pairs")
    if target is None and references is None and pairs is None:
        raise ValueError("give a target (FID/KID) and/or references or pairs (SSIM/PSNR/L2)")
    device = _pick_device(device)
    rank, world = dist_rank_world()
    result: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    output_set = open_image_set(outputs, image_size) if outputs is not None else None
    if image_size is None:
        image_size = (
            output_set.image_size if output_set is not None else int(_pair_image(pairs[0][0], None).shape[-1])
        )
    result["image_size"] = image_size
    if output_set is not None:
        result["num_outputs"] = len(output_set)

    if target is not None:
        if output_set is None:
            raise ValueError("FID/KID need the outputs (a folder or a list of files)")
        start = time.perf_counter()
        if extractor is None:
            extractor = InceptionFeatureExtractor(inception_weights).to(device)
        seconds["load_inception"] = time.perf_counter() - start
        result.update(
            _inception_metrics(
                output_set,
                target,
                extractor,
                image_size=image_size,
                cache_dir=cache_dir,
                batch_size=batch_size,
                kid=kid,
                kid_subsets=kid_subsets,
                kid_subset_size=kid_subset_size,
                num_workers=num_workers,
                rank=rank,
                world=world,
                seconds=seconds,
            )
        )

    if references is not None or pairs is not None:
        start = time.perf_counter()
        faithfulness = FaithfulnessMetrics(image_size, factor, device=device)
        if pairs is not None:
            mine = [pairs[i] for i in shard_indices(len(pairs), rank, world)]
            for k in range(0, len(mine), batch_size):
                chunk = mine[k : k + batch_size]
                # uint8 at the edges: float tensors in [-1, 1] are quantised like the saved outputs
                out = torch.stack([as_uint8(_pair_image(o, image_size)) for o, _ in chunk])
                ref = torch.stack([as_uint8(r) for _, r in chunk])
                faithfulness.update(out, ref)
            result["num_pairs"] = len(pairs)
        else:
            if output_set is None:
                raise ValueError("references need the outputs")
            reference_set = open_image_set(references, image_size)
            index_pairs = pair_by_name(output_set.names, reference_set.names)
            mine = [index_pairs[i] for i in shard_indices(len(index_pairs), rank, world)]
            for k in range(0, len(mine), batch_size):
                chunk = mine[k : k + batch_size]
                out = torch.stack([output_set[i] for i, _ in chunk])
                ref = torch.stack([reference_set[j] for _, j in chunk])
                faithfulness.update(out, ref)
            result["num_pairs"] = len(index_pairs)
            result["references"] = os.fspath(references)
        result.update(faithfulness.compute())
        seconds["faithfulness"] = time.perf_counter() - start

    result["seconds"] = seconds
    return result


def _pair_image(image: str | os.PathLike | torch.Tensor, image_size: int | None) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    return open_image_set([image], image_size)[0]


def _inception_metrics(
    output_set: ImageSet,
    target: str | os.PathLike,
    extractor: InceptionFeatureExtractor,
    *,
    image_size: int,
    cache_dir,
    batch_size: int,
    kid: bool,
    kid_subsets: int,
    kid_subset_size: int,
    num_workers: int,
    rank: int,
    world: int,
    seconds: dict[str, float],
) -> dict[str, Any]:
    result: dict[str, Any] = {"target": os.fspath(target)}
    start = time.perf_counter()
    if Path(target).suffix == ".npz":  # precomputed statistics file
        stats, meta = load_stats(target)
        if meta.get("inception_sha256") not in (None, extractor.sha256):
            raise ValueError(
                f"{target} was computed with other Inception weights ({meta['inception_sha256'][:8]})"
            )
        if kid and stats.features is None:
            kid = False
            result["kid_skipped"] = "the statistics file has no features"
        result.update(target_stats=os.fspath(target), target_stats_cache_hit=True)
    else:
        stats, info = cached_reference_stats(
            target,
            extractor,
            image_size=image_size,
            cache_dir=cache_dir,
            batch_size=batch_size,
            keep_features=kid,
            num_workers=num_workers,
        )
        result.update(target_stats=info.path, target_stats_cache_hit=info.hit)
        if not info.hit:
            result["target_stats_reason"] = info.reason
        meta = info.meta
    seconds["target_stats"] = time.perf_counter() - start
    result["num_target"] = int(meta.get("count") or (stats.count if stats is not None else 0)) or None

    metrics = InceptionMetrics(extractor, kid=kid, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    if rank == 0:  # cached real statistics enter the metric once, not once per process
        metrics.load_real(stats)
        result["num_target"] = stats.count
    start = time.perf_counter()
    for batch in iterate_images(
        output_set, batch_size, shard_indices(len(output_set), rank, world), num_workers
    ):
        metrics.update(batch, real=False)
    seconds["output_features"] = time.perf_counter() - start
    start = time.perf_counter()
    result.update(metrics.compute())
    seconds["fid_kid"] = time.perf_counter() - start
    if kid:
        result["kid_subsets"] = kid_subsets
    result.update(inception_sha256=extractor.sha256, inception_official=extractor.official)
    return result


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_ready(value.tolist())
    if isinstance(value, Path):
        return os.fspath(value)
    return value


def write_metrics(path: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Write ``metrics`` as JSON atomically (temp file + rename); non-finite numbers become null."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(_json_ready(metrics), indent=2) + "\n").encode())
    return path


_ROWS = [
    ("fid", "FID", "{:.2f}"),
    ("kid_mean", "KID x 1e3", None),
    ("ssim", "SSIM", "{:.4f}"),
    ("psnr", "PSNR (dB)", "{:.2f}"),
    ("l2", "L2", "{:.2f}"),
    ("ssim_lowpass", "SSIM low-pass", "{:.4f}"),
    ("psnr_lowpass", "PSNR low-pass (dB)", "{:.2f}"),
]


def format_table(metrics: dict[str, Any], published: dict[str, Any] | None = None) -> str:
    """A short Markdown table of the metrics present (with a 'published' column if given)."""
    published = published or {}
    header = ["metric", "value"] + (["published"] if published else [])
    rows = []
    for key, label, fmt in _ROWS:
        if metrics.get(key) is None:
            continue
        if key == "kid_mean":
            value = f"{1e3 * metrics['kid_mean']:.2f} ± {1e3 * metrics.get('kid_std', 0.0):.2f}"
        else:
            value = fmt.format(metrics[key])
        if key.endswith("_lowpass") and metrics.get("lowpass_factor"):
            label = f"{label}, N={metrics['lowpass_factor']}"
        short = {"kid_mean": "kid"}.get(key, key)
        ref = published.get(short)
        row = [label, value] + ([_fmt_published(short, ref)] if published else [])
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    notes = []
    if metrics.get("num_outputs") is not None:
        notes.append(f"{metrics['num_outputs']} outputs")
    if metrics.get("num_target"):
        notes.append(f"{metrics['num_target']} target images")
    if metrics.get("num_pairs") is not None:
        notes.append(f"{metrics['num_pairs']} pairs")
    if metrics.get("kid_subset_size"):
        notes.append(f"KID {metrics.get('kid_subsets')} subsets of {metrics['kid_subset_size']}")
    if metrics.get("inception_official") is False:
        notes.append("NOT the reference Inception weights: FID/KID not comparable with papers")
    if notes:
        out.append("")
        out.append("; ".join(notes))
    return "\n".join(out)


def _fmt_published(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "kid" and isinstance(value, (int, float)):
        return f"{value:g}"
    return f"{value}"
