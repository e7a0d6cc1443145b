"""Job-array shards of one translation run: a fixed shard count, completion, one merge.

``sbatch --array=0-K scripts/slurm/sample_array.sbatch CONFIG`` runs shard k of K+1 in array
task k (docs/cluster.md). The count is stored at the first start (a rerun of some tasks, whose
array is smaller, keeps it); the shard that finds every shard done writes the run's manifest and
grid as one process would (``python -m ilvr_toolkit.sampling.merge OUT``: by hand). A shard's
record is its per-process parts in ``OUT/.manifest/``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from ..cli import UsageError
from ..fileio import lock_folder
from .config import SampleConfig
from .writer import create_json_once, read_json

__all__ = [
    "COUNT_FILE",
    "MERGE_LOCK",
    "fixed_shard_count",
    "missing_shards",
    "read_shard_record",
    "run_summary",
]

COUNT_FILE = ".shards.json"
DONE_DIR = ".shards"
MERGE_LOCK = "merge.lock"  # in DONE_DIR

log = logging.getLogger("ilvr_toolkit.sampling")


def fixed_shard_count(config: SampleConfig) -> int:
    """The run's shard count: ``config.num_shards`` at the first submission, stored with the
    outputs, then the stored count for every later task (array reruns included).

    Raises UsageError when a shard outside the stored count is asked for, or when a run outside
    a job array names another count for a sharded output folder.
    """
    out_dir = Path(config.output.dir)
    path = out_dir / COUNT_FILE
    if config.num_shards > 1:
        create_json_once(path, {"num_shards": config.num_shards, "config": _absolute(config).to_dict()})
    elif "SLURM_ARRAY_TASK_ID" not in os.environ or not path.is_file():
        return config.num_shards  # one process: the whole run
    stored = read_shard_record(path)[0]
    if stored != config.num_shards and "SLURM_ARRAY_TASK_ID" not in os.environ:
        raise UsageError(
            f"--num_shards {config.num_shards}: {out_dir} holds a run of {stored} shards ({path}); "
            f"pass --num_shards {stored}, or another --output.dir"
        )
    if not 0 <= config.shard_index < stored:
        raise UsageError(
            f"--shard_index {config.shard_index}: the run in {out_dir} has shards 0..{stored - 1}"
        )
    if stored != config.num_shards:
        log.info("shard %d of the run's %d shards (fixed in %s)", config.shard_index, stored, path)
    return stored


def read_shard_record(path: Path) -> tuple[int, dict]:
    """``(num_shards, config dict)`` stored in ``OUT/.shards.json``; a ValueError naming the file
    and what is wrong when it is damaged (exit status 1)."""
    record = read_json(path)
    count = record.get("num_shards") if isinstance(record, dict) else None
    config = record.get("config") if isinstance(record, dict) else None
    if not (isinstance(count, int) and count >= 1 and isinstance(config, dict)):
        raise ValueError(
            f"{path}: damaged (num_shards {count!r}, config {type(config).__name__}); expected what sample.py "
            "writes, {num_shards: N >= 1, config: {...}}: delete it to start the sharded run anew"
        )
    return count, config


def _absolute(config: SampleConfig) -> SampleConfig:
    """``config`` with its file paths absolute: the merge reads it from any working directory."""
    keys = ("references", "mask", "evaluate_against", "inception_weights", "stats_cache_dir")
    paths = {key: str(Path(getattr(config, key)).resolve()) for key in keys if getattr(config, key)}
    checkpoint = config.model.checkpoint and str(Path(config.model.checkpoint).resolve())
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, checkpoint=checkpoint), **paths
    )


def missing_shards(out_dir: Path, num_shards: int) -> list[int]:
    """Shards that have not finished their range yet."""
    return [k for k in range(num_shards) if not (out_dir / DONE_DIR / f"{k}.done").exists()]


def run_summary(config: SampleConfig) -> SampleConfig | None:
    """The config to write the run's manifest, grid and metrics under, or None (not this
    process's turn). Unsharded: ``config``. Shard k of K (finished): marks k done; when every
    shard is done and no live process holds ``OUT/.shards/merge.lock`` (a POSIX lock recording
    its pid and host, kept until this process ends), the whole run's config (one shard)."""
    if config.num_shards <= 1:
        return config
    out_dir = Path(config.output.dir)
    (out_dir / DONE_DIR).mkdir(exist_ok=True)
    (out_dir / DONE_DIR / f"{config.shard_index}.done").touch()
    missing = missing_shards(out_dir, config.num_shards)
    if missing:
        log.info("shard %d done; waiting for shards %s before the merge", config.shard_index, missing)
        return None
    if holder := lock_folder(out_dir / DONE_DIR, MERGE_LOCK):
        log.info("%s is merging the run (%s)", holder, out_dir / DONE_DIR / MERGE_LOCK)
        return None
    return dataclasses.replace(config, shard_index=0, num_shards=1)
