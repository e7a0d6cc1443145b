"""``sample.py --evaluate_against``: metrics of a finished run, one block per factor N.

FID/KID against the target domain need the Inception weights; when they are missing the
run's images are kept, the faithfulness metrics (SSIM / PSNR / L2, full and low-pass) are
still computed, and the skipped FID is reported with the file, its hash and where it goes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import SampleConfig

__all__ = ["evaluate_run"]

log = logging.getLogger("ilvr_toolkit.sampling")


def _outputs_by_factor(manifest: dict[str, Any]) -> dict[int | None, list[tuple[str, int]]]:
    groups: dict[int | None, list[tuple[str, int]]] = {}
    for filename, entry in manifest["images"].items():
        groups.setdefault(entry.get("factor"), []).append((filename, entry["reference_index"]))
    return groups


def evaluate_run(config: SampleConfig, out_dir: Path, refs: Any, manifest_path: Path) -> dict[str, Any]:
    """Compute metrics for every factor of the run, write ``metrics.json``, return them."""
    from ..evaluation import InceptionWeightsMissing, evaluate_translation, write_metrics
    from .writer import read_json

    manifest = read_json(manifest_path)
    target: str | None = config.evaluate_against
    metrics: dict[str, Any] = {"evaluate_against": target}
    for factor, outputs in sorted(_outputs_by_factor(manifest).items(), key=lambda kv: kv[0] or 0):
        files = [out_dir / name for name, _ in outputs]
        pairs = None
        if not refs.unconditional:
            pairs = [(path, refs.get(index)) for path, (_, index) in zip(files, outputs, strict=True)]
            pairs = [(path, image) for path, image in pairs if image is not None]
        kwargs = dict(pairs=pairs, factor=factor, inception_weights=config.inception_weights,
                      cache_dir=config.stats_cache_dir, device=config.device if config.device != "auto" else None)
        try:
            block = evaluate_translation(files, target=target, **kwargs)
        except InceptionWeightsMissing as missing:
            if pairs is None:
                raise
            log.warning("FID/KID skipped: %s", missing)
            metrics["fid_skipped"], target = str(missing), None
            block = evaluate_translation(files, target=None, **kwargs)
        metrics[f"N{factor}" if factor is not None else "unconditional"] = block
    metrics["path"] = str(write_metrics(out_dir / "metrics.json", metrics))
    return metrics
