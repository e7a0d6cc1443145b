"""Job-array shards of one translation run: a fixed shard count, completion, one merge.

``sbatch --array=0-K scripts/slurm/sample_array.sbatch CONFIG`` runs shard k of K+1 in array
task k (docs/cluster.md). The count is stored at the first start that passes every check (a rerun of some
tasks, whose array is smaller, keeps it); the shard that finds every shard done (its marker
made by the run's current plan, its outputs there) writes the run's manifest and
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
from .plan import WorkItem, plan_items, shard_range
from .tasks import run_factors
from .writer import create_json_once, read_json, write_json

__all__ = [
    "COUNT_FILE",
    "MERGE_LOCK",
    "describe_missing",
    "fixed_shard_count",
    "missing_shards",
    "planned_files",
    "planned_items",
    "read_shard_record",
    "run_summary",
]

COUNT_FILE = ".shards.json"
DONE_DIR = ".shards"
MERGE_LOCK = "merge.lock"  # in DONE_DIR
#: a run may have more shards than references (the others do nothing), up to SLURM's default MaxArraySize
MAX_EMPTY_SHARDS = 1001
_DONE = {"planned": [str], "made": [str]}  # a done marker's layout: another one is no marker of this run

log = logging.getLogger("ilvr_toolkit.sampling")


def fixed_shard_count(config: SampleConfig, record: bool = False) -> int:
    """The run's shard count: ``config.num_shards`` at the first submission, stored with the
    outputs (``record``: only once the task passed every check, so a refused attempt fixes
    nothing), then the stored count for every later task (array reruns included).

    Raises UsageError when a shard outside the stored count is asked for, or when a run outside
    a job array names another count for a sharded output folder.
    """
    out_dir = Path(config.output.dir)
    path = out_dir / COUNT_FILE
    if record and config.num_shards > 1:
        create_json_once(path, {"num_shards": config.num_shards, "config": _absolute(config).to_dict()})
    if not path.is_file() and config.num_shards > 1:
        _check_first_array(config.num_shards)
    if not path.is_file() or (config.num_shards <= 1 and "SLURM_ARRAY_TASK_ID" not in os.environ):
        return config.num_shards  # one process (the whole run), or the first submission
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


def _check_first_array(num_shards: int) -> None:
    """A first submission as a SLURM job array of ``num_shards`` shards (its highest task id + 1,
    as sample_array.sbatch counts) must run every task id 0..K: UsageError naming ``--array``.
    (A later rerun of some tasks runs fewer: the stored count is kept.)"""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env or env.get("SLURM_ARRAY_TASK_MAX") != str(num_shards - 1):
        return  # not an array, or a count not taken from it
    low, count = env.get("SLURM_ARRAY_TASK_MIN", "0"), env.get("SLURM_ARRAY_TASK_COUNT", str(num_shards))
    if (low, count) != ("0", str(num_shards)):
        step = env.get("SLURM_ARRAY_TASK_STEP", "1")
        top = num_shards - 1
        raise UsageError(
            f"--array: this first submission runs {count} task(s), ids {low}..{top} (step {step}), but a run "
            f"of {num_shards} shards needs every id 0..{top} (the others would never run); submit "
            f"--array=0-{top} (afterwards a smaller array reruns some tasks)"
        )


def read_shard_record(path: Path) -> tuple[int, dict]:
    """``(num_shards, config dict)`` stored in ``OUT/.shards.json``; a ValueError naming the file
    and what is wrong when it is damaged (exit status 1)."""
    try:
        record = read_json(path)
    except ValueError as error:
        raise ValueError(f"{error}: delete it to start the sharded run anew") from None
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


def planned_items(
    config: SampleConfig, names: list[str], unconditional: bool, indices: range
) -> list[WorkItem]:
    """The work items ``config``'s run makes from the references ``names`` at ``indices``: every
    factor of the task (``run_factors``) x every reference x its samples (one when unconditional)."""
    per_reference = 1 if unconditional else config.samples_per_reference
    factors = run_factors(config, unconditional)
    return plan_items(
        names, samples_per_reference=per_reference, factors=factors, run_seed=config.seed, indices=indices
    )


def planned_files(config: SampleConfig, names: list[str], unconditional: bool, shard: int) -> list[str]:
    """The output files shard ``shard`` of ``config``'s run makes from the references ``names``."""
    indices = shard_range(len(names), shard, config.num_shards)
    return [item.filename for item in planned_items(config, names, unconditional, indices)]


def missing_shards(
    out_dir: Path, config: SampleConfig, names: list[str], unconditional: bool
) -> dict[int, str]:
    """Shards not done with the run as it is now, each with why: no ``.shards/<k>.done``, a marker
    of another plan (references added or settings changed since), or an output it made is gone.
    A ValueError names ``OUT/.shards.json`` damaged when its count cannot be the run's."""
    if config.num_shards > max(len(names), MAX_EMPTY_SHARDS):  # e.g. 10**12: a loop for ever
        raise ValueError(
            f"{out_dir / COUNT_FILE}: damaged (num_shards {config.num_shards}: more shards than the run's "
            f"{len(names)} references and than {MAX_EMPTY_SHARDS}); delete it and rerun any shard of the run"
        )
    missing = {}
    for k in range(config.num_shards):
        marker = out_dir / DONE_DIR / f"{k}.done"
        try:  # an older version's marker is empty, a damaged one is no record: made by another plan
            done = read_json(marker, _DONE) if marker.is_file() else None
        except ValueError:
            done = {}
        if done is None:
            missing[k] = "not finished"
        elif done.get("planned") != planned_files(config, names, unconditional, k):
            missing[k] = "finished with other references or settings"
        elif gone := [name for name in done.get("made", []) if not (out_dir / name).exists()]:
            missing[k] = f"{gone[0]} missing" + (f" and {len(gone) - 1} more" if len(gone) > 1 else "")
    return missing


def describe_missing(missing: dict[int, str]) -> str:
    """``shards [1, 2] (why)``: the shards ``missing_shards`` found, grouped by why."""
    reasons: dict[str, list[int]] = {}
    for k, why in missing.items():
        reasons.setdefault(why, []).append(k)
    whys = [why if len(reasons) == 1 else f"{shards}: {why}" for why, shards in reasons.items()]
    return f"shards {list(missing)} ({'; '.join(whys)})"


def run_summary(config: SampleConfig, names: list[str], unconditional: bool) -> SampleConfig | None:
    """The config to write the run's manifest, grid and metrics under, or None (not this
    process's turn). Unsharded: ``config``. Shard k of K (finished): marks k done (what it planned
    and made, from the references ``names``); when every shard is done with the run as it is now
    (``missing_shards``) and no live process holds ``OUT/.shards/merge.lock`` (a POSIX lock
    recording its pid and host, kept until this process ends), the whole run's config (one shard)."""
    if config.num_shards <= 1:
        return config
    out_dir = Path(config.output.dir)
    planned = planned_files(config, names, unconditional, config.shard_index)
    made = [name for name in planned if (out_dir / name).exists()]  # not those of unreadable references
    write_json(out_dir / DONE_DIR / f"{config.shard_index}.done", {"planned": planned, "made": made})
    if missing := missing_shards(out_dir, config, names, unconditional):
        stale = any(why != "not finished" for why in missing.values())
        (log.warning if stale else log.info)(
            "shard %d done; waiting for %s before the merge", config.shard_index, describe_missing(missing)
        )
        return None
    if holder := lock_folder(out_dir / DONE_DIR, MERGE_LOCK, named=f"--output.dir {out_dir}"):
        log.info("%s is merging the run (%s)", holder, out_dir / DONE_DIR / MERGE_LOCK)
        return None
    return dataclasses.replace(config, shard_index=0, num_shards=1)
