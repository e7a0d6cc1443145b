"""``sample.py --evaluate_against``: metrics of a finished run, one block per factor N.

FID/KID against the target domain need the Inception weights; when they are missing the
run's images are kept, the faithfulness metrics (SSIM / PSNR / L2, full and low-pass) are
still computed, and the skipped FID is reported with the file, its hash and where it goes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..runtime import resolve_device
from .config import SampleConfig

__all__ = ["evaluate_run"]

log = logging.getLogger("ilvr_toolkit.sampling")


def _outputs_by_factor(manifest: dict[str, Any]) -> dict[int | None, list[tuple[str, int]]]:
    groups: dict[int | None, list[tuple[str, int]]] = {}
    for filename, entry in manifest["images"].items():
        groups.setdefault(entry.get("factor"), []).append((filename, entry["reference_index"]))
    return groups


def _extractor(config: SampleConfig, target: str | None, device: str) -> tuple[Any, str | None]:
    """The Inception extractor, built once for every factor; (None, why) when unavailable."""
    if target is None:
        return None, None
    from ..evaluation import InceptionFeatureExtractor, InceptionWeightsMissing

    try:
        return InceptionFeatureExtractor(config.inception_weights).to(device), None
    except InceptionWeightsMissing as missing:
        log.warning("FID/KID skipped: %s", missing)
        return None, str(missing)


def evaluate_run(config: SampleConfig, out_dir: Path, refs: Any, manifest_path: Path) -> dict[str, Any]:
    """Compute metrics for every factor of the run, write ``metrics.json``, return them."""
    from ..evaluation import evaluate_translation, write_metrics
    from .writer import read_json

    manifest = read_json(manifest_path)
    device = str(resolve_device(config.device))
    extractor, skipped = _extractor(config, config.evaluate_against, device)
    if skipped and refs.unconditional:
        raise FileNotFoundError(skipped)  # nothing else to report without references
    target = config.evaluate_against if extractor is not None else None
    metrics: dict[str, Any] = {"evaluate_against": config.evaluate_against}
    if skipped:
        metrics["fid_skipped"] = skipped
    for factor, outputs in sorted(_outputs_by_factor(manifest).items(), key=lambda kv: kv[0] or 0):
        files = [out_dir / name for name, _ in outputs]
        pairs = None
        if not refs.unconditional:
            pairs = [(path, refs.get(index)) for path, (_, index) in zip(files, outputs, strict=True)]
            pairs = [(path, image) for path, image in pairs if image is not None]
        block = evaluate_translation(
            files,
            target=target,
            pairs=pairs,
            factor=factor,
            extractor=extractor,
            cache_dir=config.stats_cache_dir,
            device=device,
        )
        metrics[f"N{factor}" if factor is not None else "unconditional"] = block
    metrics["path"] = str(write_metrics(out_dir / "metrics.json", metrics))
    return metrics
