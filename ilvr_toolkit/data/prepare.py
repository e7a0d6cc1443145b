"""Build an LMDB image dataset from a folder, a zip archive or another LMDB.

    python -m ilvr_toolkit.data.prepare SRC --output.dir datasets/NAME.lmdb --size 256  # --help: all
    python -m ilvr_toolkit.data.prepare DATASET.lmdb --verify     # every record decodes?

Each image: EXIF orientation applied, converted to RGB (``imageops.load_rgb``: alpha over
white, 16-bit scaled), centre-cropped to a square, resized with PIL's LANCZOS (antialiased)
to every ``--size`` from the crop, encoded as PNG (default) or JPEG 4:4:4, stored under the
rosinality keys (``lmdb_format``). Worker processes decode/resize/encode; the main process
is the only writer, in source order, so index i is the i-th usable file.

The build goes to ``OUT.partial-<pid>`` next to ``OUT``, is verified (length, every key,
a few decodes) and only then renamed to ``OUT``: a build that is killed leaves no ``OUT``.
A rerun deletes stale ``OUT.partial-*`` folders of dead processes and starts over.
"""

import contextlib
import functools
import glob
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lmdb
from PIL import Image

from .. import __version__, cli
from ..batchjob import progress_bar
from ..cli import UsageError, check_range, make_parser, parse_options, run_command
from ..fileio import atomic_write_bytes, pid_alive
from . import lmdb_format
from .files import IMAGE_EXTENSIONS, has_image_extension, list_image_files
from .imageops import BadImage, center_crop_square, check_file_size, load_rgb, read_image_file
from .lmdb_format import LENGTH_KEY, META_KEY, NAMES_KEY, BadRecord, image_key, read_info, read_names, reading

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

    from .lmdb_format import LMDBInfo

__all__ = ["BuildReport", "BuildSettings", "build_lmdb", "encode_image", "main", "process_image"]

FORMATS = ("png", "jpeg")
#: smallest output side accepted by ``--size``
MIN_SIZE = 8
RESAMPLE = Image.Resampling.LANCZOS
# Test hook: seconds each worker sleeps per image, so a test can kill a build midway.
_DELAY_ENV = "ILVR_TOOLKIT_PREPARE_DELAY_S"
_Result = tuple[int, "dict[int, bytes] | None", "str | None"]


@dataclass
class BuildSettings:
    """How :func:`build_lmdb` encodes and runs; the values are checked when it is made.

    Attributes:
        format: png (lossless) or jpeg (stored with 4:4:4 chroma).
        quality: JPEG quality, 1-100.
        compress_level: PNG zlib level 0-9: 0 is fastest to decode (:func:`encode_image`), 9 smallest.
        workers: encoding processes (null: one per CPU; 0: none, encode in the main process).
        strict: stop at the first bad input instead of skipping it.
        overwrite: replace an existing output folder (the new one is built and verified first).
        progress: show a progress bar (--no_progress to hide it).
        start_method: how worker processes start (null: the platform's default; spawn-safe).
        map_size: initial LMDB map size in bytes (doubled whenever it is full).
        commit_bytes: image bytes written per LMDB transaction.
    """

    format: Literal["png", "jpeg"] = "png"
    quality: int = 95
    compress_level: int = 0
    workers: int | None = None
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    start_method: Literal["fork", "spawn", "forkserver"] | None = None
    map_size: int = 1 << 30
    commit_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format}: expected one of {', '.join(FORMATS)}")
        check_range("quality", self.quality, 1, 100)
        check_range("compress_level", self.compress_level, 0, 9)
        if self.workers is not None:
            check_range("workers", self.workers, 0)
        check_range("map_size", self.map_size, 1)
        check_range("commit_bytes", self.commit_bytes, 1)


@dataclass
class _Source:
    """Ordered, picklable list of named inputs; :meth:`read` opens handles lazily per process.
    ``location``: the resolved path; ``size``: the stored size read from an LMDB source (its largest)."""

    kind: Literal["folder", "zip", "lmdb"]
    location: str
    names: list[str]
    size: int = 0

    def read(self, index: int) -> bytes:
        if self.kind == "folder":
            return read_image_file(Path(self.location, self.names[index]))
        if self.kind == "zip":  # its declared size first: a zip bomb is not inflated
            archive = _open_zip(self.location, os.getpid())
            check_file_size(archive.getinfo(self.names[index]).file_size)
            return archive.read(self.names[index])
        with reading(self.location) as get:
            if (data := get(image_key(self.size, index))) is None:
                raise OSError(f"key {image_key(self.size, index)!r} missing")
            return data


@functools.lru_cache(maxsize=1)
def _open_zip(path: str, pid: int) -> zipfile.ZipFile:
    """One handle per archive and process: a forked worker must not share its parent's file offset."""
    return zipfile.ZipFile(path)


def _open_source(src: str | Path) -> _Source:
    src = Path(src)
    location = str(src.resolve())
    if src.is_dir() and (src / "data.mdb").is_file():
        info = read_info(src)
        if not info.sizes:
            raise ValueError(f"{src}: LMDB holds no '{{size}}-{{index}}' images")
        names = read_names(src) or [f"{i:05d}" for i in range(info.length)]
        return _Source("lmdb", location, names, max(info.sizes))
    if src.is_dir():
        return _Source("folder", location, [p.relative_to(src).as_posix() for p in list_image_files(src)])
    if src.is_file() and zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:  # image members; folders, hidden entries and __MACOSX skipped
            names = [m.filename for m in zf.infolist() if not m.is_dir() and has_image_extension(m.filename)]
        hidden = {n for n in names if any(p[:1] == "." != p or p == "__MACOSX" for p in n.split("/"))}
        return _Source("zip", location, sorted(n for n in names if n not in hidden))
    if not src.exists():
        raise UsageError(f"source {src}: no such file or folder")
    raise UsageError(f"source {src}: not a folder, a zip archive or an LMDB folder")


def encode_image(img: Image.Image, fmt: str, quality: int = 95, compress_level: int = 0) -> bytes:
    """PNG, or JPEG with 4:4:4 chroma (PIL's default 4:2:0 blurs colour even at quality 100).
    PNG ``compress_level=0`` (no zlib compression, still a PNG any reader opens) decodes ~2.5x
    faster than levels 1-9 (inflate dominates the decoding time) for ~1.8x the size."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    buf, jpeg = io.BytesIO(), {"quality": quality, "subsampling": 0}
    img.save(buf, format=fmt.upper(), **(jpeg if fmt == "jpeg" else {"compress_level": compress_level}))
    return buf.getvalue()


def process_image(
    data: bytes, sizes: list[int], fmt: str = "png", quality: int = 95, compress_level: int = 0
) -> dict[int, bytes]:
    """Encoded file bytes -> {size: encoded square RGB image}; ``BadImage`` if unusable."""
    img = load_rgb(data)
    if min(img.size) < max(sizes):
        raise BadImage(f"too small: {img.size[0]}x{img.size[1]} < {max(sizes)}")
    square = center_crop_square(img)
    resized = {s: square if square.size == (s, s) else square.resize((s, s), RESAMPLE) for s in sizes}
    return {size: encode_image(im, fmt, quality, compress_level) for size, im in resized.items()}


_WORKER: dict = {}
_READ_ERRORS = (OSError, zipfile.BadZipFile, zlib.error, EOFError)  # a zip member: bad CRC, damaged data


def _init_worker(source: _Source, sizes: list[int], settings: BuildSettings) -> None:
    if multiprocessing.parent_process() is not None:  # a worker (workers 0: keep the handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker has the main process's handler
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked while the pool started
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    _WORKER.update(source=source, sizes=sizes, settings=settings, delay=delay)


def _work(index: int) -> tuple[int, dict[int, bytes] | None, str | None]:
    if _WORKER["delay"]:
        time.sleep(_WORKER["delay"])
    s = _WORKER["settings"]
    try:
        data = _WORKER["source"].read(index)
        return index, process_image(data, _WORKER["sizes"], s.format, s.quality, s.compress_level), None
    except (*_READ_ERRORS, BadImage, BadRecord) as e:
        return index, None, str(e) if isinstance(e, BadImage | BadRecord) else f"cannot read: {e}"


@dataclass
class BuildReport:
    """What a build wrote and what it skipped (``skipped``: (source name, reason) pairs)."""

    out: str
    length: int
    sizes: list[int]
    format: str
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.length / self.seconds if self.seconds > 0 else float("inf")
        head = f"wrote {self.length} images at sizes {self.sizes} ({self.format}) to {self.out} in "
        head += f"{self.seconds:.1f} s ({rate:.1f} img/s); skipped {len(self.skipped)}"
        return "\n".join([head, *(f"  skipped {name}: {reason}" for name, reason in self.skipped)])


def _put_all(env: lmdb.Environment, items: list[tuple[bytes, bytes]]) -> None:
    """Write ``items`` in one transaction, doubling the map size until they fit."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:  # the transaction was aborted; grow and redo it
            env.set_mapsize(env.info()["map_size"] * 2)


def verify_lmdb(
    path: str | Path, sizes: list[int] | None = None, length: int | None = None, every: bool = False
) -> "LMDBInfo":
    """Raise a ValueError listing bad records unless ``path`` holds ``length`` images at each of
    ``sizes`` (default: what it says it holds) that decode to squares of their size (``every``
    one, else the first, middle and last)."""
    info = read_info(path)
    if sizes is not None and (info.length, list(info.sizes)) != (length, sorted(sizes)):
        raise ValueError(f"verify {path}: length/sizes {info.length}/{info.sizes} != {length}/{sizes}")
    bad, checked = [], range(info.length) if every else {0, info.length // 2, info.length - 1}
    with reading(path) as get:
        for size in info.sizes:
            for index in range(info.length):
                try:
                    if (data := get(image_key(size, index))) is None:
                        raise BadImage("missing")
                    if index in checked and (got := load_rgb(data).size) != (size, size):
                        raise BadImage(f"is {got[0]}x{got[1]}")
                except BadRecord as error:  # names the file and the key
                    bad.append(str(error))
                except BadImage as error:
                    bad.append(f"{image_key(size, index).decode()}: {error}")
    if bad:
        raise ValueError(f"{path}: {len(bad)} bad records ({'; '.join(bad[:5])}); rebuild it with {PROG}")
    return info


LMDB_FILES = ("data.mdb", "lock.mdb")  # what a dataset folder holds
REPORT_KEYS = ("skipped", "sizes")  # what tells a report (--output.report) of this command


def _clean_stale(out: Path) -> None:
    """Delete leftovers of interrupted builds of ``out``; refuse if their builder still runs."""
    leftovers = [sorted(out.parent.glob(f"{glob.escape(out.name)}.{kind}-*")) for kind in ("partial", "old")]
    for leftover in leftovers[0] + leftovers[1]:
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            raise FileExistsError(
                f"{leftover} belongs to a running build (pid {pid}); wait for it, or delete it if stale"
            )
        print(f"removing leftover of an interrupted build: {leftover}", file=sys.stderr)
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


@contextlib.contextmanager
def _unread(out: Path) -> Iterator[None]:
    """Hold the dataset at ``out`` (:func:`not_read_elsewhere`); refused while a running process
    reads it, which would stop at the swap (``DatasetReplaced``, the fallback where flock is not seen)."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(lmdb_format.not_read_elsewhere(out))
        except BlockingIOError:
            raise UsageError(
                f"--output.dir {out}: in use by a running process (train.py?); stop it, or write the "
                "new dataset elsewhere"
            ) from None
        yield


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the verified build to ``out`` (an existing ``out`` is swapped out, then removed)."""
    old = None
    with _unread(out) if overwrite else contextlib.nullcontext():
        if overwrite and (out.exists() or out.is_symlink()):
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)  # put the previous dataset back
            raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        fd = os.open(out.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _check_output(out: Path, overwrite: bool) -> None:
    """``--output.dir``: a new folder whose parent can be made, or (``overwrite``) a folder of an
    LMDB dataset (and its report) or nothing: --overwrite never deletes other files, or a file."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UsageError(f"--output.dir {out}: exists; pass --overwrite to replace it")
        ours = lambda p: p.name in LMDB_FILES or (p.is_file() and cli.json_keys(p) & set(REPORT_KEYS))  # noqa: E731
        other = sorted(p.name for p in out.iterdir() if not ours(p)) if out.is_dir() else None
        if other is None or other:
            what = "a file" if other is None else f"holds {', '.join(other[:3])}"
            raise UsageError(
                f"--output.dir {out}: is not an LMDB dataset ({what}); --overwrite replaces only "
                "a dataset folder (data.mdb, lock.mdb, its report): choose a new folder"
            )
        with _unread(out):
            pass
    if (file := cli.file_in_the_way(out.parent)) is not None:
        raise UsageError(f"--output.dir {out}: {file} is a file, expected a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # no permission, a read-only or special file system
        raise UsageError(f"--output.dir {out}: cannot make {out.parent}: {err.strerror}") from None


def check_sizes(sizes: int | Sequence[int]) -> list[int]:
    """``--size`` as a sorted list without repeats; each side at least :data:`MIN_SIZE`."""
    values = [sizes] if isinstance(sizes, int) else list(sizes)
    for size in values:
        check_range("size", size, MIN_SIZE)
    if not values:
        raise UsageError("--size: give at least one size")
    return sorted(set(values))


def build_lmdb(
    source: str | Path,
    out: str | Path,
    sizes: int | Sequence[int],
    settings: BuildSettings | None = None,
    **options: Any,
) -> BuildReport:
    """Convert ``source`` (folder, zip, LMDB) into an LMDB dataset at ``out``; see module doc.
    ``options`` replace single fields of ``settings``: ``build_lmdb(src, out, [256], workers=8)``.
    Bad inputs are skipped and listed in the report (``strict``: ``BadImage``); in every failure
    nothing is left at ``out``."""
    settings = replace(settings or BuildSettings(), **options)  # re-checks the values
    t0 = time.perf_counter()
    sizes = check_sizes(sizes)
    out = Path(out)
    if out.resolve() in (
        location := Path(source).resolve(),
        *location.parents,
    ):  # --overwrite would delete it
        raise UsageError(f"--output.dir {out}: is the source {source} or holds it; choose another folder")
    _check_output(out, settings.overwrite)
    src = _open_source(source)
    if not src.names:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {source}")
    _clean_stale(out)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        tmp.mkdir()
    except OSError as err:  # no permission, a read-only or special file system
        raise UsageError(f"--output.dir {out}: cannot write in {out.parent}: {err.strerror}") from None
    try:
        kept, skipped = _write_dataset(tmp, src, sizes, settings, f"prepare {out.name}")
        try:
            verify_lmdb(tmp, sizes, len(kept))
        finally:  # its reader lock would refuse another process's --overwrite of it later
            lmdb_format.close_lmdb(tmp)
        _publish(tmp, out, settings.overwrite)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, ChildProcessError):
            raise ChildProcessError(f"{error}; nothing was written at {out}") from None
        if isinstance(error, lmdb.Error):  # writing it (a full disk: mdb_txn_commit: No space left)
            raise OSError(f"cannot write {out}: {error}") from None
        raise
    return BuildReport(str(out), len(kept), sizes, settings.format, time.perf_counter() - t0, skipped)


def _write_dataset(
    path: Path, src: _Source, sizes: list[int], settings: BuildSettings, desc: str
) -> tuple[list[str], list[tuple[str, str]]]:
    """Encode every source image into a new LMDB at ``path``: (kept names, skipped pairs)."""
    fast = dict(readahead=False, meminit=False, sync=False, metasync=False)  # synced once, at the end
    env = lmdb.open(str(path), map_size=settings.map_size, **fast)
    try:
        with _encoded(src, sizes, settings) as results:
            kept, skipped, pending = _store_images(env, results, src.names, settings, desc)
        if not kept:
            why = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
            raise ValueError(
                f"no usable images in {src.location}, nothing written: {len(skipped)} rejected ({why})"
            )
        meta = {"tool": "ilvr_toolkit", "tool_version": __version__, "length": len(kept), "sizes": sizes}
        if settings.format == "jpeg":
            meta.update(format="jpeg", quality=settings.quality, subsampling="4:4:4")
        else:
            meta.update(format="png", compress_level=settings.compress_level)
        meta.update(crop="centre square", filter="PIL LANCZOS (antialiased), each size from the crop")
        meta.update(color="RGB; EXIF orientation applied; alpha over white; 16-bit scaled by 1/257")
        meta.update(source=src.location, source_kind=src.kind, skipped=skipped)
        meta["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        pending += [(LENGTH_KEY, str(len(kept)).encode()), (META_KEY, json.dumps(meta).encode())]
        pending.append((NAMES_KEY, json.dumps(kept).encode()))
        _put_all(env, pending)
        env.sync(True)
    finally:
        env.close()
    return kept, skipped


def _recording_context(start_method: str | None) -> tuple[Any, list[multiprocessing.Process]]:
    """A multiprocessing context of ``start_method`` and every process it starts, dead ones too
    (``active_children`` forgets a worker that died before it is called)."""
    context = type(multiprocessing.get_context(start_method or multiprocessing.get_start_method()))()
    started: list[multiprocessing.Process] = []

    def process(*args: Any, **kwargs: Any) -> multiprocessing.Process:
        started.append(type(context).Process(*args, **kwargs))
        return started[-1]

    context.Process = process
    return context, started


@contextlib.contextmanager
def _encoded(src: _Source, sizes: list[int], settings: BuildSettings) -> Iterator[Iterator[_Result]]:
    """``(index, {size: bytes} or None, reason)`` for every source index, in order."""
    count = len(src.names)
    workers = (os.cpu_count() or 1) if settings.workers is None else settings.workers
    if workers == 0:
        _init_worker(src, sizes, settings)
        try:
            yield map(_work, range(count))
        finally:
            _open_zip.cache_clear()  # closes a zip source's archive
        return
    context, started = _recording_context(settings.start_method)
    pool = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(src, sizes, settings))
    # SIGTERM waits while the pool starts: its handler, run inside a fork's at-fork hooks (which drop
    # the exception: the build went on) or in a worker before _init_worker, must not stop either there.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:  # (Pool.imap would wait forever for the images of a worker that died: OOM killer, kill -9)
        try:
            results = pool.map(_work, range(count), chunksize=max(1, min(16, count // (workers * 8))))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        yield results
    except BrokenProcessPool:
        pool.shutdown(cancel_futures=True)  # its thread reaps the workers: read exit codes after it
        for process in started:
            process.join(5)  # dead, or being stopped by the pool (SIGTERM)
        # a worker's own signal first, then a non-zero exit; the pool's SIGTERM to the others last
        codes = sorted(
            (p.exitcode for p in started if p.exitcode), key=lambda c: (c == -signal.SIGTERM, c > 0)
        )
        how = f"killed by signal {-codes[0]}" if codes and codes[0] < 0 else "it exited"
        raise ChildProcessError(f"an encoding worker died ({how}) while encoding {src.location}") from None
    except BaseException:  # stopped early (--strict, Ctrl-C): the workers stop now
        for process in started:
            process.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def _store_images(
    env: lmdb.Environment, results: Iterator[_Result], names: list[str], settings: BuildSettings, desc: str
) -> tuple[list[str], list[tuple[str, str]], list[tuple[bytes, bytes]]]:
    """Write the encoded images under consecutive indices: (kept, skipped, items not yet written)."""
    kept, skipped, pending, pending_bytes = [], [], [], 0
    bar = progress_bar(len(names), desc, settings.progress)
    with contextlib.closing(bar):
        for index, encoded, error in results:
            bar.update(1)
            if encoded is None:
                if settings.strict:
                    raise BadImage(f"{names[index]}: {error} (--strict)")
                skipped.append((names[index], error))
                continue
            pending += [(image_key(size, len(kept)), data) for size, data in encoded.items()]
            pending_bytes += sum(len(data) for data in encoded.values())
            kept.append(names[index])
            if pending_bytes >= settings.commit_bytes:  # bounded memory, few transactions
                _put_all(env, pending)
                pending, pending_bytes = [], 0
    return kept, skipped, pending


PROG = "python -m ilvr_toolkit.data.prepare"
#: old spellings kept working
ALIASES = {"--out": "--output.dir", "--report": "--output.report"}


def build_parser() -> "ArgumentParser":
    parser = make_parser(
        PROG, "Build an LMDB image dataset (rosinality keys) from a folder, a zip or an LMDB."
    )
    parser.add_argument("source", type=str, help="image folder (recursive), .zip archive, or LMDB folder")
    options = {  # flag: (type, help)
        "--output.dir": (str | None, "the LMDB folder to write, e.g. datasets/ffhq.lmdb (alias: --out)"),
        "--output.report": (str | None, "the report too: skipped files and why, JSON (alias: --report)"),
        "--size": (int | list[int] | None, f"output side(s) >= {MIN_SIZE}: 256, [128,256] or repeated"),
        "--verify": (bool, "only check the LMDB at SOURCE: every record there, at every size, decodes"),
    }
    for flag, (kind, what) in options.items():
        parser.add_argument(flag, type=kind, default=False if kind is bool else None, help=what)
    parser.add_class_arguments(
        BuildSettings, nested_key=None, as_group=False, skip={"start_method", "map_size", "commit_bytes"}
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m ilvr_toolkit.data.prepare``; user errors end in one line (``ilvr_toolkit.cli``)."""
    return run_command(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    args = parse_options(build_parser(), argv, ALIASES, repeatable=("--size",))
    if args.verify:
        info = verify_lmdb(args.source, every=True)
        print(f"{args.source}: {info.length} images at sizes {list(info.sizes)}, every record decodes")
        return 0
    given = {"--output.dir": args.output.dir, "--size": args.size}
    if missing := [flag for flag, value in given.items() if value is None]:
        raise UsageError(f"give {' and '.join(missing)} (or --verify to check the LMDB at SOURCE)")
    settings = BuildSettings(**{f.name: args[f.name] for f in fields(BuildSettings) if f.name in args})
    report_path = cli.check_output_file("output.report", args.output.report, "report file", REPORT_KEYS)
    cli.setup_logging()  # the progress lines of a log file
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:  # SIGTERM is Ctrl-C: the build is cleaned up
        stopped.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        report = build_lmdb(args.source, args.output.dir, args.size, settings)
    except BaseException:
        if not stopped:  # (or its workers died of it first)
            raise
        print(f"{PROG}: stopped by signal {stopped[0]}; {args.output.dir} not written", file=sys.stderr)
        return 128 + stopped[0]
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.summary())
    if report_path:
        atomic_write_bytes(report_path, json.dumps(asdict(report), indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
