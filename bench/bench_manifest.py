"""One save of a sample.py manifest part after a batch, with N images already recorded.

    python bench/bench_manifest.py [--sizes 3000 20000 70000] [--batch 32] [--repeats 3]

"whole": the part as one file rewritten whole (what every save did before files of
``PART_LIMIT`` entries); "bounded": ``ManifestPart`` resumed into a folder whose part holds N
entries (its last file full but one: the most a save rewrites), then one batch added and saved.
Entries are shaped as a run's (~370 bytes each). Prints a table; bench/results/manifest.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.add_repo_to_path()
from ilvr_toolkit.sampling.manifest import PART_LIMIT, PARTS_DIR, ManifestPart  # noqa: E402
from ilvr_toolkit.sampling.writer import write_json  # noqa: E402


def entry(i: int) -> tuple[str, dict]:
    """A run's entry for image ``i`` (64-hex digest, stamp, seed, timing)."""
    value = {"reference": f"{i:05d}", "reference_index": i, "reference_stamp": f"{60000 + i}:1764{i:015d}"}
    value.update(reference_sha256=f"{i:064x}", sample=0, factor=4, seed=10**9 + i, seconds=1.2345)
    value.update(batch_size=32, rank=0)
    return f"{i:05d}_s0.png", value


def one_save(out: Path, count: int, batch: int, bounded: bool) -> tuple[float, int]:
    """Seconds and bytes of one save after ``batch`` more images, ``count`` recorded before."""
    images = dict(entry(i) for i in range(count))
    folder = out / PARTS_DIR
    folder.mkdir(parents=True)
    part = ManifestPart(folder / "shard0-rank0.json")
    if bounded:  # the part's files as a run leaves them, the last one full but one
        names = list(images)
        head, tail = names[: -(PART_LIMIT - 1)], names[-(PART_LIMIT - 1) :]
        chunks = [head[k : k + PART_LIMIT] for k in range(0, len(head), PART_LIMIT)] + [tail]
        for n, chunk in enumerate(chunks):
            path = folder / ("shard0-rank0.json" if n == 0 else f"shard0-rank0.{n}.json")
            write_json(path, {"images": {k: images[k] for k in chunk}, "failed": {}})
        part = ManifestPart.open(out, 0, 0)
    else:
        part.images = images
    part.images.update(entry(i) for i in range(count, count + batch))
    path, tic = part.path, time.perf_counter()
    part.save({})
    return time.perf_counter() - tic, path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 20000, 70000])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for count in args.sizes:
        row = {"images": count}
        for name in ("whole", "bounded"):
            times = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    seconds, size = one_save(Path(tmp), count, args.batch, name == "bounded")
                    times.append(seconds)
            row[f"{name} s"], row[f"{name} MB"] = statistics.median(times), size / 1e6
        row["ratio"] = row["whole s"] / row["bounded s"]
        rows.append(row)
    common.print_table(rows)
    common.write_json("manifest", {"rows": rows, "part_limit": PART_LIMIT, "env": common.environment()})


if __name__ == "__main__":
    main()
