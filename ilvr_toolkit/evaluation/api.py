"""``evaluate_translation`` (what sample.py and the CLI call), its metrics file and its table."""

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..batchjob import progress_bar
from ..fileio import atomic_write_bytes
from ..images import to_uint8
from ..runtime import resolve_device
from .faithfulness import FaithfulnessMetrics
from .fid import inception_scores
from .inception import InceptionFeatureExtractor
from .stats import (
    EvalSettings,
    ImageSet,
    Source,
    cached_reference_stats,
    counted,
    image_set_stats,
    rank_world,
)

PairSource = tuple[str | os.PathLike | torch.Tensor, torch.Tensor]  # (output, reference (3, H, W))


def pair_by_name(
    output_names: Sequence[str], reference_names: Sequence[str], recorded: Mapping[str, str] | None = None
) -> list[tuple[int, int]]:
    """(output index, reference index): the reference ``recorded`` for an output (sample.py's manifest,
    :func:`recorded_references`), else output ``<stem>``, ``<stem>_s<k>`` or ``<stem>_N<N>_s<k>``
    (sample.py's names) pairs with reference ``<stem>``; ValueError names the outputs that have no
    reference, or that could pair with several (references ``x`` and ``x_s0``, output ``x_s0``)."""
    index, recorded = {name: j for j, name in enumerate(reference_names)}, recorded or {}
    found, ambiguous = [], []
    for name in output_names:
        stems = dict.fromkeys([name, re.sub(r"_s\d+$", "", name), re.sub(r"(_N\d+)?_s\d+$", "", name)])
        candidates = [index[stem] for stem in stems if stem in index]
        if recorded.get(name) in index:
            candidates = [index[recorded[name]]]
        ambiguous += [name] if len(candidates) > 1 else []
        found.append(candidates[0] if candidates else None)
    if missing := [name for name, j in zip(output_names, found, strict=True) if j is None]:
        raise ValueError(f"no reference found for {len(missing)} outputs: {', '.join(missing[:5])}")
    if ambiguous:
        raise ValueError(f"{len(ambiguous)} outputs match several references: {', '.join(ambiguous[:5])}")
    return list(enumerate(found))


def recorded_references(folder: str | os.PathLike) -> dict[str, str]:
    """Output stem -> the name of the reference it was made from, as ``folder/manifest.json`` (a
    sample.py run's) records it; empty when there is no readable manifest."""
    try:
        images = json.loads((Path(folder) / "manifest.json").read_text())["images"]
        return {Path(name).stem: entry["reference"] for name, entry in images.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def evaluate_translation(
    outputs: Source | None = None,
    references: str | os.PathLike | None = None,
    target: str | os.PathLike | None = None,
    *,
    pairs: Sequence[PairSource] | None = None,
    extractor: InceptionFeatureExtractor | None = None,
    settings: EvalSettings | None = None,
    operator: torch.nn.Module | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Metrics of the ``outputs`` (folder or image files): ``fid``, ``kid_mean``, ``kid_std`` against
    ``target`` (folder or LMDB); ``ssim``, ``psnr``, ``l2`` (``*_lowpass`` with ``factor``) against
    ``references`` (output ``<stem>_s<k>`` pairs with ``<stem>``) or ``pairs`` (output path or image,
    reference image), ``ssim_kept``, ``psnr_kept`` after an ``operator`` P (a task's); counts. ``options``
    override fields of ``settings``. Under torch.distributed every process calls it and gets the result."""
    s = replace(settings or EvalSettings(), **options)
    if outputs is None and (pairs is None or target is not None or references is not None):
        raise ValueError("give outputs (a folder or a list of files), or pairs alone")
    if target is None and references is None and pairs is None:
        raise ValueError("give a target (FID/KID) and/or references or pairs (SSIM/PSNR/L2)")
    if pairs is not None and not len(pairs):
        raise ValueError("pairs: expected at least one (output, reference) pair, got none")
    if not (isinstance(s.batch_size, int) and s.batch_size >= 1):
        raise ValueError(f"batch_size: expected an int >= 1, got {s.batch_size!r}")
    out_set = ImageSet(outputs, s.image_size) if outputs is not None else None
    size = out_set.image_size if out_set is not None else s.image_size or _image(pairs[0][0], None).shape[-1]
    s = replace(s, image_size=int(size), device=str(resolve_device(s.device)))
    result = {"image_size": s.image_size, "num_outputs": len(out_set or [])}
    if target is not None:
        extractor = extractor or InceptionFeatureExtractor(s.inception_weights).to(s.device)
        result.update(_inception_metrics(out_set, target, extractor, s))
    if references is not None or pairs is not None:
        result.update(_faithfulness(out_set, references, pairs, s, operator))
    return result


def _image(image: str | os.PathLike | torch.Tensor, image_size: int | None) -> torch.Tensor:
    return image if isinstance(image, torch.Tensor) else ImageSet([image], image_size)[0]


def _faithfulness(
    outputs: ImageSet | None, references: str | None, pairs: list | None, s: EvalSettings, operator: Any
) -> dict:
    if pairs is None:
        reference_set = ImageSet(references, s.image_size)
        pairs = pair_by_name(outputs.names, reference_set.names, recorded_references(outputs.source))
        load = lambda pair: (outputs[pair[0]], reference_set[pair[1]])  # noqa: E731
        result = {"num_pairs": len(pairs), "references": os.fspath(references)}
    else:
        load, result = (lambda pair: (_image(pair[0], s.image_size), pair[1])), {"num_pairs": len(pairs)}
    metrics, (rank, world) = FaithfulnessMetrics(s.image_size, s.factor, s.device, operator), rank_world()
    mine = pairs[rank::world]
    chunks = (mine[k : k + s.batch_size] for k in range(0, len(mine), s.batch_size))
    with contextlib.closing(progress_bar(len(mine), "SSIM/PSNR pairs", s.progress and rank == 0)) as bar:
        for chunk in counted(chunks, bar):
            images = [load(pair) for pair in chunk]  # uint8 at the edges: floats rounded
            metrics.update(*(torch.stack([to_uint8(pair[i]) for pair in images]) for i in (0, 1)))
    return {**result, **metrics.compute()}


def _inception_metrics(
    outputs: ImageSet, target: str, extractor: InceptionFeatureExtractor, s: EvalSettings
) -> dict[str, Any]:
    real, info = cached_reference_stats(target, extractor, s)  # on rank 0 (else None)
    fake = image_set_stats(outputs, extractor, s, "FID features of the outputs")  # on every rank
    kid = {"subsets": s.kid_subsets, "subset_size": s.kid_subset_size, "seed": s.seed}
    scores = [inception_scores(real, fake, **kid) if real is not None else None]
    if rank_world()[1] > 1:
        dist.broadcast_object_list(scores, src=0)
    result = {"target": os.fspath(target), "target_stats": info.path, "target_stats_cache_hit": info.hit}
    result.update({} if info.hit else {"target_stats_reason": info.reason})
    result.update(num_target=info.meta["count"], **scores[0])
    result.update({"kid_subsets": s.kid_subsets} if s.kid else {})
    return {**result, "inception_sha256": extractor.sha256, "inception_official": extractor.official}


def write_metrics(path: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Write ``metrics`` as JSON atomically (temp file + rename); non-finite numbers become null."""
    finite = json.loads(json.dumps(metrics, default=os.fspath), parse_constant=lambda _: None)
    atomic_write_bytes(path, (json.dumps(finite, indent=2) + "\n").encode())
    return Path(path)


_ROWS = dict(fid="FID", kid_mean="KID x 1e3", ssim="SSIM", psnr="PSNR (dB)", l2="L2")
_ROWS.update(ssim_lowpass="SSIM low-pass", psnr_lowpass="PSNR low-pass (dB)")  # in this order
_ROWS.update(ssim_kept="SSIM of P(x_0), P(y)", psnr_kept="PSNR of P(x_0), P(y) (dB)")  # a task's P


def format_table(metrics: dict[str, Any], published: dict[str, Any] | None = None) -> str:
    """A Markdown table of the metrics present (with a 'published' column if given), then notes."""
    extra = (" published |", "---|") if published else ("", "")
    lines = ["| metric | value |" + extra[0], "|---|---|" + extra[1]]
    for key, label in _ROWS.items():
        if metrics.get(key) is not None:
            value = f"{metrics[key]:.4f}" if key.startswith("ssim") else f"{metrics[key]:.2f}"
            if key == "kid_mean":
                value = f"{1e3 * metrics['kid_mean']:.2f} ± {1e3 * metrics.get('kid_std', 0.0):.2f}"
            if key.endswith("_lowpass"):
                label += f", N={metrics.get('lowpass_factor')}"
            ref = (published or {}).get("kid" if key == "kid_mean" else key, "-")
            lines.append(f"| {label} | {value} |" + (f" {ref} |" if published else ""))
    notes = [f"{metrics[k]} {k[4:]}" for k in ("num_outputs", "num_target", "num_pairs") if metrics.get(k)]
    if metrics.get("kid_subset_size"):
        notes.append(f"KID {metrics.get('kid_subsets')} subsets of {metrics['kid_subset_size']}")
    if metrics.get("inception_official") is False:
        notes.append("NOT the reference Inception weights: FID/KID not comparable with papers")
    return "\n".join(lines + (["", "; ".join(notes)] if notes else []))
