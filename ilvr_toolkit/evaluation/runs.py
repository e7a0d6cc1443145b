"""``sample.py --evaluate_against``: metrics of a finished translation run, one block per factor N.
Without the Inception weights the faithfulness metrics are still computed and the skipped FID is
reported with the file, its hash and where it goes. Evaluation builds on sampling, never the
other way round: ``sample.py`` hands :func:`evaluate_run` to ``ilvr_toolkit.sampling.cli.main``."""

import json
import logging
from typing import Any

import torch

from ..cli import UsageError
from ..data.references import open_image_source
from ..runtime import resolve_device
from ..sampling import RunResult, SampleConfig
from ..sampling.tasks import FACTOR_FREE, run_operators
from .api import evaluate_translation, format_table, write_metrics
from .fid import too_few
from .inception import InceptionFeatureExtractor, InceptionWeightsMissing

log = logging.getLogger("ilvr_toolkit.evaluation")


def check_evaluation(config: SampleConfig) -> None:
    """Before sampling: the target holds FID's images (a broken link named) and Inception weights
    that are there load (a missing file only skips FID)."""
    if not config.evaluate_against:
        return
    target = open_image_source("evaluate_against", config.evaluate_against, 1, whole=True)
    if why := too_few(len(target)):
        raise UsageError(f"--evaluate_against {config.evaluate_against}: {why}")
    try:
        InceptionFeatureExtractor(config.inception_weights)
    except InceptionWeightsMissing as missing:
        if config.unconditional:  # FID/KID is all it would compute
            raise UsageError(f"--evaluate_against: {missing}") from None
    except ValueError as error:
        raise UsageError(f"--inception_weights {error}") from None


def _by_factor(images: dict[str, dict[str, Any]], task: str) -> dict[str, dict[str, Any]]:
    """The manifest's ``images`` with the factor each is evaluated under: a task without N has one
    set (None), without outputs named per N (``*_N<N>_s<k>``: earlier versions made one set per N)."""
    if task not in FACTOR_FREE:
        return images
    plain = {k: v for k, v in images.items() if v.get("factor") is None or f"_N{v['factor']}_s" not in k}
    return {k: {**v, "factor": None} for k, v in plain.items()}


def evaluate_run(config: SampleConfig, result: RunResult) -> dict[str, Any]:
    """Metrics of every factor of the run in ``result.out_dir`` (its manifest names the images
    and their references): written to ``metrics.json``, printed as tables (``config.published``
    beside ours), stored in ``result.metrics`` and returned."""
    (result.out_dir / "metrics.json").unlink(missing_ok=True)  # an earlier one is not left as if current
    images = _by_factor(json.loads(result.manifest.read_text())["images"], config.task)
    device, refs = str(resolve_device(config.device)), result.references
    metrics: dict[str, Any] = {"evaluate_against": config.evaluate_against}
    try:  # built once for every factor
        extractor = InceptionFeatureExtractor(config.inception_weights).to(device)
    except InceptionWeightsMissing as missing:
        log.warning("FID/KID skipped: %s", missing)
        if refs.unconditional:  # nothing else to report without references
            raise FileNotFoundError(str(missing)) from None
        extractor, metrics["fid_skipped"] = None, str(missing)
    for factor in sorted({entry.get("factor") for entry in images.values()}, key=lambda n: n or 0):
        names = [name for name, entry in images.items() if entry.get("factor") == factor]
        pairs = None
        if not refs.unconditional:
            found = ((result.out_dir / name, refs.get(images[name]["reference_index"])) for name in names)
            pairs = [(path, image) for path, image in found if image is not None]
        ilvr, operator = config.task == "ilvr", None  # other tasks: P(x_0) vs P(y) for their P, not phi_N
        if pairs and not ilvr:
            operator = run_operators(config, pairs[0][1].shape[-1], torch.device(device), [factor])[factor]
        options = dict(factor=factor if ilvr else None, extractor=extractor, cache_dir=config.stats_cache_dir)
        options.update(progress=config.progress)
        options.update(target=config.evaluate_against if extractor is not None else None, operator=operator)
        label = f"N{factor}" if factor is not None else "unconditional"
        label = label if ilvr else config.task + (f", {label}" if factor is not None else "")
        files = [result.out_dir / name for name in names]
        if options["target"] is not None and (why := too_few(len(files), "outputs")):
            log.warning("FID/KID skipped for %s: %s", label, why)
            options["target"], metrics["fid_skipped"] = None, why
            if pairs is None:  # unconditional: nothing else to compute
                continue
        metrics[label] = evaluate_translation(files, pairs=pairs, device=device, **options)
    metrics["path"] = str(write_metrics(result.out_dir / "metrics.json", metrics))
    for label, block in metrics.items():
        if isinstance(block, dict):
            print(f"\nmetrics, {label}:\n{format_table(block, config.published)}")
    if "fid_skipped" in metrics:
        why = metrics["fid_skipped"].split(". ")[0].rstrip(".")  # its first sentence: the warning has it all
        print(f"\nFID/KID skipped: {why} (see the warning above).")
    print(f"metrics: {metrics['path']}")
    result.metrics = metrics
    return metrics
