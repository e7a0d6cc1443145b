"""Damaged data never kills the process (issue 13, point 2): records corrupted inside data.mdb,
truncated and empty data files, a folder without data.mdb, a source with nothing usable; through
train.py, sample.py and the converter (its ``--verify`` too), on tiny datasets made here."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
from faultkit import REPO, TINY32, damage_record, damage_size, error_line, make_images, put, run, tiny_lmdb
from PIL import Image, PngImagePlugin
from test_faults_loads import sample_args, train_args
from test_training import train_subprocess
from torch.utils.data import DataLoader, DistributedSampler

from ilvr_toolkit.cli import UsageError
from ilvr_toolkit.data import LMDBImageDataset, image_key
from ilvr_toolkit.data.lmdb_dataset import DatasetReplaced
from ilvr_toolkit.data.prepare import _publish
from ilvr_toolkit.data.prepare import main as prepare_main

PREPARE = ["-m", "ilvr_toolkit.data.prepare"]
PREPARE_PROG = "python -m ilvr_toolkit.data.prepare"


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lmdb(tmp_path_factory.mktemp("data_faults"), sizes=(16, 32))


@pytest.fixture(scope="module")
def corrupt(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``clean`` with record 3 (both sizes) unrecognisable and record 5 failing its PNG checksum."""
    path = shutil.copytree(clean, tmp_path_factory.mktemp("corrupt") / "corrupt.lmdb")
    for size in (16, 32):
        damage_record(path, 3, "header", size)
        damage_record(path, 5, "middle", size)
    return path


@pytest.fixture(scope="module")
def past_end(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``clean`` with the stored sizes of 16-00006 (made a value on overflow pages) and 32-00003
    pointing past the end of data.mdb (SIGBUS, once), and of 16-00002 (inline) past its page."""
    path = shutil.copytree(clean, tmp_path_factory.mktemp("past_end") / "past_end.lmdb")
    big, text = io.BytesIO(), PngImagePlugin.PngInfo()
    text.add_text("padding", "x" * 5000)
    Image.new("RGB", (16, 16), "red").save(big, "PNG", pnginfo=text)
    put(path, image_key(16, 6), big.getvalue())
    for size, index in ((16, 6), (32, 3), (16, 2)):
        damage_size(path, image_key(size, index))
    return path


def test_records_damaged_in_data_mdb_are_bad_records_naming_file_and_key(past_end):
    code = (
        "from ilvr_toolkit.data import LMDBImageDataset as D\nfor size, i in ((16, 6), (32, 3), (16, 2)):\n"
    )
    code += f"    try:\n        D({str(past_end)!r}, size)[i]\n    except ValueError as e:\n        print(e)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])  # -7: SIGBUS
    said = [line.split("; --data")[0] for line in done.stdout.splitlines()]
    data = past_end / "data.mdb"
    assert said[:2] == [
        f"{data}: record {k} is damaged (points past the end of the file)" for k in ("16-00006", "32-00003")
    ]
    assert (
        said[2] == f"{data}: record 16-00002 is damaged (mdb_get: MDB_CORRUPTED: Located page was wrong type)"
    )


def test_records_past_the_end_are_skipped_by_train_listed_by_verify_and_convert(past_end, tmp_path):
    done = run(train_args(past_end, tmp_path / "run", "--data.loader.on_bad_record", "skip"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "record 16-00006 is damaged (points past the end of the file)" in done.stderr
    assert "record 16-00002 is damaged (mdb_get: MDB_CORRUPTED" in done.stderr and "(2 so far)" in done.stderr
    line = error_line(run([*PREPARE, str(past_end), "--verify"]), PREPARE_PROG)
    assert line.startswith(
        f"{PREPARE_PROG}: error: {past_end}: 3 bad records ({past_end / 'data.mdb'}: record 16-00002"
    )
    assert (
        "record 16-00006 is damaged (points past" in line
        and "record 32-00003 is damaged (points past" in line
    )
    out, report = tmp_path / "o.lmdb", tmp_path / "report.json"
    done = run([*PREPARE, str(past_end), "--out", str(out), "--size", "16", "--report", str(report)])
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = dict(json.loads(report.read_text())["skipped"])  # read at 32 px, the largest size
    assert skipped == {
        "03.png": f"{past_end / 'data.mdb'}: record 32-00003 is damaged (points past the end of the file)"
    }
    assert len(LMDBImageDataset(out, 16)) == 7


def test_node_pointer_past_the_end_gives_missing_records_not_sigbus(tmp_path, caplog):
    """The audit's case: one byte of the demo dataset sends a leaf node pointer past the end of
    data.mdb, where LMDB's own search read (SIGBUS, exit 135); it reads zero pages there now."""
    bad, at = tmp_path / "bus.lmdb", 421935
    data = bytearray((REPO / "datasets" / "demo_faces.lmdb" / "data.mdb").read_bytes())
    page = at // 4096 * 4096
    flags, lower = struct.unpack_from("<HH", data, page + 10)  # mp_flags, mp_lower
    assert (
        struct.unpack_from("<I", data, 40)[0] == 4096 and flags & 2 and 16 <= at - page < lower
    )  # a leaf's pointers
    data[at] = 0x50
    assert page + struct.unpack_from("<H", data, at - 1)[0] > len(data)  # the node now lies past the end
    bad.mkdir()
    (bad / "data.mdb").write_bytes(data)
    line = error_line(run([*PREPARE, str(bad), "--verify"]), PREPARE_PROG)
    assert f"{bad}: 3 bad records (32-00065: missing; 32-00066: missing; 32-00067: missing)" in line
    ds = LMDBImageDataset(bad, 32, on_bad_record="skip")
    with caplog.at_level(logging.WARNING, "ilvr_toolkit.data.lmdb_dataset"):
        assert all(ds[i].shape == (3, 32, 32) for i in range(len(ds))) and ds.skipped == {65, 66, 67}


def test_corrupt_records_error_names_key_and_index_or_are_skipped(corrupt, caplog):
    with pytest.raises(ValueError, match=r"record b'16-00003' \(index 3\) not an image") as info:
        LMDBImageDataset(corrupt, 16)[3]
    assert str(info.value).count("\n") == 0 and "on_bad_record skip" in str(info.value)
    with pytest.raises(ValueError, match=r"record b'16-00005' \(index 5\) cannot decode"):
        LMDBImageDataset(corrupt, 16)[5]  # a PNG whose IDAT fails its checksum (torchvision.io: SIGSEGV)
    ds = LMDBImageDataset(corrupt, 16, return_index=True, on_bad_record="skip")
    with caplog.at_level(logging.WARNING, "ilvr_toolkit.data.lmdb_dataset"):
        got = [ds[i][1] for i in range(len(ds))] + [ds[i][1] for i in range(len(ds))]
    assert got == [0, 1, 2, 4, 4, 6, 6, 7] * 2  # the next good index, the same every epoch
    assert ds.skipped == {3, 5}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and warnings[-1].endswith("skipped (2 so far)"), warnings
    assert "b'16-00003' (index 3)" in warnings[0]


def test_train_py_on_a_corrupt_record_one_line_or_skip(corrupt, tmp_path):
    workers = ["--data.batch_size", "8", "--data.workers", "1"]  # raised in a DataLoader worker
    line = error_line(run(train_args(corrupt, tmp_path / "a", *workers)), "train.py")
    assert line.startswith(f"train.py: error: {corrupt}: record b'16-0000") and "(index " in line
    assert "on_bad_record skip" in line and "Original Traceback" not in line
    skip = [*workers, "--data.loader.on_bad_record", "skip"]
    done = run(train_args(corrupt, tmp_path / "b", *skip))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "b'16-00003' (index 3) not an image" in done.stderr and "so far)" in done.stderr
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("rank", [1, 0])
def test_ddp_bad_record_is_one_line_from_the_rank_that_met_it(clean, tmp_path, rank):
    """2-process DDP (gloo): the rank whose shard holds the damaged record says so in one line naming
    file and key; the other stops without gloo's traceback (rank 0: one line pointing to it), no hang."""
    shard = list(DistributedSampler(range(8), num_replicas=2, rank=rank, seed=0))  # Lightning's (seed 0)
    bad = shutil.copytree(clean, tmp_path / "bad.lmdb")
    key = damage_record(bad, shard[0], "header").decode()
    args = train_args(bad, tmp_path / "run", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    proc = train_subprocess(args[2:], start_new_session=True)
    try:
        out = proc.communicate(timeout=300)[0]  # every rank has ended: none holds the pipe
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank
        raise
    errors = [line for line in out.splitlines() if line.startswith("train.py: error: ")]
    said = f"train.py: error: rank {rank}: {bad}: record b'{key}' (index {shard[0]}) not an image"
    assert proc.returncode != 0 and "Traceback" not in out and errors[0].startswith(said), out[-3000:]
    peer = ["train.py: error: rank 0: another process of the run stopped (its error, if any, is above)"]
    assert errors[1:] == (peer if rank else []) and out.rstrip().endswith(errors[-1]), out[-3000:]


def test_verify_lists_every_bad_record(clean, corrupt):
    done = run([*PREPARE, str(clean), "--verify"])
    assert done.returncode == 0 and "8 images at sizes [16, 32], every record decodes" in done.stdout
    line = error_line(run([*PREPARE, str(corrupt), "--verify"]), PREPARE_PROG)
    assert f"{corrupt}: 4 bad records" in line
    for key in ("16-00003", "16-00005", "32-00003", "32-00005"):
        assert key in line


def test_converter_skips_corrupt_records_of_an_lmdb_source_saying_why(corrupt, tmp_path):
    out, report = tmp_path / "o.lmdb", tmp_path / "report.json"
    done = run([*PREPARE, str(corrupt), "--out", str(out), "--size", "16", "--report", str(report)])
    assert done.returncode == 0, done.stderr
    skipped = dict(json.loads(report.read_text())["skipped"])
    assert sorted(skipped) == ["03.png", "05.png"]
    assert skipped["03.png"] == "not an image (no known format)" and "cannot decode" in skipped["05.png"]
    assert "skipped 03.png: not an image" in done.stdout and len(LMDBImageDataset(out, 16)) == 6


@pytest.mark.parametrize("damage", ["truncated", "empty", "no data.mdb", "meta page"])
def test_damaged_lmdb_files_are_one_line_everywhere(clean, tmp_path, damage):
    """No SIGBUS (exit 135, empty stderr) from mapping past the end of a short file."""
    bad = tmp_path / "bad.lmdb"
    bad.mkdir()
    data = (clean / "data.mdb").read_bytes()
    if damage == "meta page":  # the second meta page overwritten: not read as a huge last page
        (bad / "data.mdb").write_bytes(data[:4096] + b"\xff" * 4096 + data[8192:])
    elif damage != "no data.mdb":
        (bad / "data.mdb").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    said = {
        "truncated": f"{bad / 'data.mdb'}: truncated",
        "empty": f"{bad / 'data.mdb'}: not an LMDB data file (0 bytes",
        "no data.mdb": f"no LMDB at {bad}",
        "meta page": f"{bad}: MDB_INVALID: File is not an LMDB file",
    }[damage]
    assert said in error_line(run(train_args(bad, tmp_path / "run")), "train.py")
    if damage == "truncated":  # names the fix
        assert "--verify" in error_line(run([*PREPARE, str(bad), "--verify"]), PREPARE_PROG)
    if damage != "no data.mdb":  # (an empty folder is a folder of no reference images)
        sampled = run(sample_args(TINY32, bad, tmp_path / "out", "--model.preset", "tiny32"))
        assert said in error_line(sampled, "sample.py") and sampled.returncode == 1  # damaged, not a mistake
        convert = run([*PREPARE, str(bad), "--out", str(tmp_path / "o.lmdb"), "--size", "16"])
        assert said in error_line(convert, PREPARE_PROG)
    assert not list(tmp_path.glob("o.lmdb*"))  # the converter wrote nothing, not even a partial build


def test_converter_with_nothing_usable_says_so_and_writes_nothing(tmp_path):
    src = make_images(tmp_path / "src", count=3, size=12)  # every image smaller than --size
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    line = error_line(
        run([*PREPARE, str(src), "--out", str(tmp_path / "o.lmdb"), "--size", "16"]), PREPARE_PROG
    )
    assert "no usable images" in line and "nothing written: 4 rejected" in line
    assert "00.png: too small: 12x12 < 16" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no LMDB, no partial build


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc/PID/task/*/children), in start order."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # a thread ended meanwhile
            found += [int(child) for child in children.read_text().split()]
    return sorted(found)


@pytest.mark.parametrize(
    "workers, wait, signum",
    [(1, 1.0, signal.SIGKILL), (3, 0.0, signal.SIGKILL), (2, 1.0, signal.SIGXCPU)],
    ids=["midway", "at its start", "over its CPU time limit"],
)
def test_converter_says_so_when_an_encoding_worker_dies(tmp_path, workers, wait, signum):
    """Killed (OOM killer, kill -9, ulimit -t) while it encodes or as it starts: one line naming its
    signal, not the SIGTERM the pool then sends to the others; nothing at OUT; no endless wait."""
    src, out = make_images(tmp_path / "src", count=30, size=64).resolve(), tmp_path / "o.lmdb"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ILVR_TOOLKIT_PREPARE_DELAY_S": "0.3"}
    cmd = [sys.executable, *PREPARE, str(src), "--out", str(out), "--size", "32", "--workers", str(workers)]
    proc = subprocess.Popen(
        [*cmd, "--no-progress"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (started := _children(proc.pid)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(wait)  # a few images into the build, or none
        assert started and proc.poll() is None, (started, proc.poll())
        os.kill(started[0], signum)
        stderr = proc.communicate(timeout=30)[1]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        proc.wait()
    said = f"an encoding worker died (killed by signal {int(signum)}) while encoding {src}"
    expected = f"{PREPARE_PROG}: error: {said}; nothing was written at {out}"
    assert (proc.returncode, stderr.splitlines()[-1]) == (1, expected), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no LMDB, no partial build


def test_a_length_of_more_records_than_there_are_is_damaged(clean, tmp_path):
    """``length`` b"1000000000000" made train.py grow memory for ever, b"-5" was Python's
    ``__len__() should return >= 0``; a length other than the metadata's, or past the last
    record (a foreign LMDB, no metadata), is the same damaged entry."""
    import lmdb

    from ilvr_toolkit.data import read_info
    from ilvr_toolkit.data.lmdb_format import META_KEY

    said = "damaged b'length' or b'__ilvr_toolkit_meta__' entry; rebuild the dataset"
    for name, length in (("huge", b"1000000000000"), ("negative", b"-5"), ("short", b"7")):
        bad = shutil.copytree(clean, tmp_path / f"{name}.lmdb")
        put(bad, b"length", length)
        with pytest.raises(ValueError, match=f"^{bad}: {said}$"):
            read_info(bad)
    foreign = shutil.copytree(clean, tmp_path / "foreign.lmdb")
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.delete(META_KEY)
        txn.put(b"length", b"9")  # 8 records
    env.close()
    with pytest.raises(ValueError, match=f"^{foreign}: {said}$"):
        read_info(foreign)
    assert read_info(clean).length == 8
    done = run(train_args(tmp_path / "negative.lmdb", tmp_path / "run"))
    assert done.returncode == 1 and f"{tmp_path / 'negative.lmdb'}: {said}" in error_line(done, "train.py")


def test_worker_error_without_persistent_workers_exits_at_once(clean, tmp_path):
    """The workers inherit the pre-emption's blocked SIGTERM; after a worker's error the non-persistent
    ones are ended at exit by multiprocessing's terminate() (SIGTERM): it must reach them, or train.py
    waits for them forever (a real process: the shared runner's children skip the exit handlers)."""
    holed = shutil.copytree(clean, tmp_path / "holed.lmdb")
    with lmdb.open(str(holed)) as env, env.begin(write=True) as txn:
        txn.delete(image_key(16, 6))
    args = train_args(holed, tmp_path / "run", "--data.workers", "1", "--trainer.max_steps", "4")
    proc = train_subprocess([*args[2:], "--data.loader.persistent_workers", "false"], start_new_session=True)
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 1 and "record b'16-00006' (index 6) is missing" in out, out[-3000:]


def test_a_dataset_replaced_while_in_use_is_one_line_not_a_missing_record(clean, tmp_path):
    """prepare --overwrite swaps the folder of a dataset in use: a worker of the next epoch opens the
    new (smaller) LMDB while the length is the old one; it must say so, not blame a record (skip)."""
    live = shutil.copytree(clean, tmp_path / "live.lmdb")
    ds = LMDBImageDataset(live, 16)
    assert len(list(DataLoader(ds, batch_size=4, num_workers=1))) == 2  # an epoch, in a worker
    smaller = tiny_lmdb(tmp_path / "new", count=4)
    os.replace(live, tmp_path / "old.lmdb")  # as prepare's _publish
    os.replace(smaller, live)
    with pytest.raises(DatasetReplaced) as info:
        list(DataLoader(ds, batch_size=4, num_workers=1))  # the next epoch's worker
    assert str(info.value) == (
        f"{live}: the dataset was replaced while in use (python -m ilvr_toolkit.data.prepare "
        "--overwrite?); restart the run"
    )


READER = """import sys
from torch.utils.data import DataLoader
from ilvr_toolkit.data import LMDBImageDataset
from ilvr_toolkit.data.lmdb_format import close_lmdb
ds, fork = LMDBImageDataset(sys.argv[1], 16), dict(batch_size=4, num_workers=2, multiprocessing_context="fork")
print(ds[0].shape, flush=True)
sys.stdin.readline()
list(DataLoader(ds, **fork))  # forked workers close their inherited copies and exit
print("after workers", flush=True)
sys.stdin.readline()
loader = iter(DataLoader(ds, persistent_workers=True, **fork))
next(loader)
close_lmdb(sys.argv[1])  # now only the two workers read it
print("workers", flush=True)
sys.stdin.readline()
"""


def test_prepare_refuses_to_replace_a_dataset_that_a_running_process_reads(clean, tmp_path):
    """prepare --overwrite replaced a dataset under a running train.py, which stopped with
    DatasetReplaced: it is refused while any process (or a DataLoader worker) reads it."""
    live, data = shutil.copytree(clean, tmp_path / "live.lmdb"), tmp_path / "live.lmdb" / "data.mdb"
    args = [*PREPARE, str(make_images(tmp_path / "new", 4)), "--out", str(live), "--size", "16"]
    args += ["--overwrite", "--workers", "0", "--no-progress"]
    before = (data.stat().st_ino, data.read_bytes(), sorted(os.listdir(tmp_path)))
    said = f"{PREPARE_PROG}: error: --output.dir {live}: in use by a running process (train.py?); stop it, "
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reader = subprocess.Popen([sys.executable, "-c", READER, str(live)], env=env, **pipes)
    try:
        for stage in ("torch.Size([3, 16, 16])", "after workers", "workers"):
            assert reader.stdout.readline().strip() == stage
            done = run(args)
            assert error_line(done, PREPARE_PROG) == said + "or write the new dataset elsewhere"
            assert done.returncode == 2
            assert (data.stat().st_ino, data.read_bytes(), sorted(os.listdir(tmp_path))) == before
            if stage == "workers":  # a reader that starts during the build: refused at the swap
                with pytest.raises(UsageError, match="in use by a running process"):
                    _publish(tmp_path / "new", live, True)
            reader.stdin.write("\n")
            reader.stdin.flush()
        assert reader.wait(60) == 0
    finally:
        reader.kill()
    assert LMDBImageDataset(live, 16)[0].shape == (3, 16, 16)  # this process's reads do not count
    assert prepare_main(args[2:]) == 0
    assert run(args).returncode == 0  # nor does the lock of the build it verified
    assert len(LMDBImageDataset(live, 16)) == 4
