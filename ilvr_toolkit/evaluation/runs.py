"""``sample.py --evaluate_against``: metrics of a finished translation run, one block per factor N.

FID/KID against the target domain need the Inception weights; when they are missing the
run's images are kept, the faithfulness metrics (SSIM / PSNR / L2, full and low-pass) are
still computed, and the skipped FID is reported with the file, its hash and where it goes.
``sample.py`` hands :func:`evaluate_run` to ``ilvr_toolkit.sampling.cli.main``: evaluation builds
on sampling, never the other way round.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..runtime import resolve_device
from ..sampling import RunResult, SampleConfig
from .api import evaluate_translation, format_table, write_metrics
from .inception import InceptionFeatureExtractor, InceptionWeightsMissing

__all__ = ["evaluate_run"]

log = logging.getLogger("ilvr_toolkit.evaluation")


def evaluate_run(config: SampleConfig, result: RunResult) -> dict[str, Any]:
    """Metrics of every factor of the run in ``result.out_dir`` (its manifest names the images
    and their references): written to ``metrics.json``, printed as tables (``config.published``
    beside ours), stored in ``result.metrics`` and returned."""
    images = json.loads(result.manifest.read_text())["images"]
    device = str(resolve_device(config.device))
    refs = result.references
    extractor, skipped = None, None
    try:  # built once for every factor
        extractor = InceptionFeatureExtractor(config.inception_weights).to(device)
    except InceptionWeightsMissing as missing:
        log.warning("FID/KID skipped: %s", missing)
        skipped = str(missing)
        if refs.unconditional:
            raise FileNotFoundError(skipped) from None  # nothing else to report without references
    metrics: dict[str, Any] = {"evaluate_against": config.evaluate_against}
    if skipped:
        metrics["fid_skipped"] = skipped
    by_factor: dict[int | None, list[tuple[str, int]]] = {}
    for filename, entry in images.items():
        by_factor.setdefault(entry.get("factor"), []).append((filename, entry["reference_index"]))
    for factor, outputs in sorted(by_factor.items(), key=lambda kv: kv[0] or 0):
        files = [result.out_dir / name for name, _ in outputs]
        pairs = None
        if not refs.unconditional:
            pairs = [(path, refs.get(index)) for path, (_, index) in zip(files, outputs, strict=True)]
            pairs = [(path, image) for path, image in pairs if image is not None]
        block = evaluate_translation(
            files,
            target=config.evaluate_against if extractor is not None else None,
            pairs=pairs,
            factor=factor,
            extractor=extractor,
            cache_dir=config.stats_cache_dir,
            device=device,
        )
        metrics[f"N{factor}" if factor is not None else "unconditional"] = block
    metrics["path"] = str(write_metrics(result.out_dir / "metrics.json", metrics))
    for label, block in metrics.items():
        if isinstance(block, dict):
            print(f"\nmetrics, {label}:\n{format_table(block, config.published)}")
    if "fid_skipped" in metrics:
        print("\nFID/KID skipped: the Inception weights are missing (see the warning above).")
    print(f"metrics: {metrics['path']}")
    result.metrics = metrics
    return metrics
