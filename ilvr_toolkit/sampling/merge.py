"""Merge the shards of a job-array run by hand: the run's manifest.json and grid.

    python -m ilvr_toolkit.sampling.merge OUT            # every shard must have finished
    python -m ilvr_toolkit.sampling.merge OUT --force    # merge what is there, even while another merges

The last shard to finish does this by itself (``sampling/shards.py``), and computes the metrics
(``--evaluate_against``); this command does not. The config is ``OUT/.shards.json``'s.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..cli import UsageError, make_parser, parse_options, run_command, setup_logging
from ..fileio import lock_folder
from .config import SampleConfig
from .manifest import PARTS_DIR
from .runner import (
    References,
    RunResult,
    check_model_options,
    check_settings,
    diffusion_for,
    load,
    resolve_device,
    summarize,
)
from .shards import COUNT_FILE, DONE_DIR, MERGE_LOCK, describe_missing, missing_shards, read_shard_record

__all__ = ["merge", "main"]

log = logging.getLogger("ilvr_toolkit.sampling")


def merge(out_dir: str | Path, force: bool = False) -> RunResult:
    """Write ``OUT/manifest.json`` (+ grid) of the sharded run in ``out_dir`` (no metrics)."""
    out_dir = Path(out_dir)
    count_file = out_dir / COUNT_FILE
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir}: no such folder")
    if not count_file.is_file():
        raise UsageError(f"{out_dir}: no {COUNT_FILE}; not the output folder of a sharded run")
    count, stored = read_shard_record(count_file)
    try:  # a config that is not sample.py's: the file's fault, not a flag of this command
        config, error = SampleConfig.from_dict({**stored, "num_shards": count}), None
        check_model_options(config)
    except (TypeError, ValueError) as raised:
        error = raised
    if error is not None:  # raised here, not in the handler: the one-line error names the file
        raise ValueError(
            f"{count_file}: its config is not sample.py's ({error}): delete it and rerun any shard of "
            "the run (it stores the run's config again), then merge"
        )
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, dir=str(out_dir)))
    loaded, _ = load(config, resolve_device(config.device))
    refs = References(config, loaded.unet_config.image_size)
    if (out_dir / PARTS_DIR / "settings.json").is_file():  # an older version stored a refused attempt's
        try:
            check_settings(config, loaded, refs.unconditional)
        except UsageError as raised:
            error = raised
        if error is not None:  # raised here, not in the handler: the one-line error names the file
            raise ValueError(
                f"{count_file}: its config is not the one the images were made with ({error}): delete it "
                "and rerun any shard of the run (it stores the run's config again), then merge"
            )
    missing = missing_shards(out_dir, config, refs.names, refs.unconditional)
    if missing and not force:
        raise UsageError(
            f"{out_dir}: {describe_missing(missing)} of {config.num_shards} are incomplete; rerun them "
            "(sbatch --array=<those> with the same command) or pass --force to merge what is there"
        )
    lock = out_dir / DONE_DIR / MERGE_LOCK  # a live holder's; a killed merge's lock is free
    if (holder := lock_folder(lock.parent, MERGE_LOCK, named=str(out_dir))) and not force:
        raise UsageError(f"{out_dir}: {holder} is merging this run ({lock}); wait for it, or pass --force")
    if holder:
        log.warning("%s: %s holds it; merging anyway (--force)", lock, holder)
    result = RunResult(out_dir)
    whole = dataclasses.replace(config, shard_index=0, num_shards=1)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # it would describe the manifest written before
    summarize(whole, loaded, diffusion_for(loaded, whole), refs, result)
    if config.evaluate_against:
        log.warning("no metrics.json: for it, rerun any task of the run (docs/cluster.md)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m ilvr_toolkit.sampling.merge", __doc__.splitlines()[0])
    parser.add_argument("out_dir", type=str, help="the run's output.dir")
    parser.add_argument(
        "--force",
        type=bool,
        default=False,
        help="merge even if some shards have not finished or another process is merging",
    )

    def _main(args: list[str]) -> int:
        setup_logging()
        options = parse_options(parser, args)  # --force given bare means true
        result = merge(options.out_dir, options.force)
        print(f"manifest: {result.manifest}" + (f"\ngrid: {result.grid}" if result.grid else ""))
        return 0

    return run_command("python -m ilvr_toolkit.sampling.merge", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
