"""``python -m ilvr_toolkit.evaluation --outputs OUT --target TARGET --references REFS --factor 32``:
FID/KID against the target domain, SSIM/PSNR/L2 against the references (docs/evaluation.md)."""

import tempfile
from dataclasses import fields
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from ..cli import (
    UsageError,
    check_output_file,
    check_paths,
    check_range,
    make_parser,
    parse_options,
    run_command,
    setup_logging,
)
from ..data.references import open_image_source
from ..fileio import lock_folder
from ..sampling.manifest import PARTS_DIR, recorded_images
from .api import (
    EvalSettings,
    evaluate_translation,
    format_table,
    pair_by_name,
    recorded_references,
    write_metrics,
)
from .fid import too_few
from .stats import default_cache_dir

PROG = "python -m ilvr_toolkit.evaluation"


def build_parser() -> ArgumentParser:
    parser = make_parser(PROG, "FID/KID (reference TF-FID settings, offline) and SSIM/PSNR/L2 of image sets.")
    path = {"type": str | None, "default": None}
    parser.add_argument("--outputs", **path, help="the translated images: a folder")
    parser.add_argument("--target", **path, help="FID/KID against: a folder or an LMDB")
    parser.add_argument("--references", **path, help="SSIM/PSNR/L2 against: a folder (<stem>_s<k> to <stem>)")
    parser.add_argument("--metrics_json", **path, help="where to write the metrics (JSON)")
    parser.add_class_arguments(EvalSettings, nested_key=None, as_group=False)
    parser.set_defaults(progress=True)  # the library's default is quiet
    return parser


def _main(argv: list[str]) -> int:
    setup_logging()
    config = parse_options(build_parser(), argv, aliases={"--json": "--metrics_json"})  # the 0.1 name
    if config.outputs is None or (config.target is None and config.references is None):
        raise UsageError("give --outputs, and --target (FID/KID) and/or --references (SSIM/PSNR/L2)")
    metrics_json = _check_options(config)
    settings = EvalSettings(**{f.name: config[f.name] for f in fields(EvalSettings)})
    metrics = evaluate_translation(config.outputs, config.references, config.target, settings=settings)
    print(format_table(metrics))
    if metrics_json:
        try:
            write_metrics(metrics_json, metrics)
        except OSError as error:  # named as given, never as the temp file
            raise OSError(f"--metrics_json {config.metrics_json}: {error.strerror}") from None
        print(f"wrote {metrics_json}")
    return 0


def _check_options(config: Namespace) -> Path | None:
    """Before any work: every option is usable, else :class:`UsageError` naming it; the
    ``--metrics_json`` file to write (a symlink's target), or None."""
    check_paths({name: config[name] for name in ("outputs", "target", "references", "inception_weights")})
    _check_finished(Path(config.outputs))
    if config.target and Path(config.target).is_file() and Path(config.target).suffix == ".npz":
        raise UsageError(
            f"--target {config.target}: a statistics file; give the target images (folder or LMDB): "
            ".npz statistics are no longer accepted, they are computed and cached by content"
        )
    if config.target and config.inception_weights and Path(config.inception_weights).expanduser().is_dir():
        raise UsageError(
            f"--inception_weights {config.inception_weights}: is a folder, expected the .pth file"
        )
    keys = ("num_outputs", "evaluate_against")  # this command's, sample.py's metrics.json
    metrics_json = check_output_file("metrics_json", config.metrics_json, "metrics file", keys)
    for name, low in dict(
        batch_size=1, kid_subsets=1, kid_subset_size=1, workers=0, factor=1, image_size=1
    ).items():
        if config[name] is not None:
            check_range(name, config[name], low)
    sources = [name for name in ("outputs", "target", "references") if config[name] is not None]
    sets = {
        name: open_image_source(name, config[name], config.image_size, whole=name == "target")
        for name in sources
    }
    size = config.image_size or sets["outputs"].image_size
    if config.factor is not None and size % config.factor:
        raise UsageError(f"--factor {config.factor}: expected a divisor of the image size {size}")
    if config.references is not None:
        try:
            pair_by_name(sets["outputs"].names, sets["references"].names, recorded_references(config.outputs))
        except ValueError as error:
            rule = "an output <stem>_s<k> or <stem>_N<N>_s<k> pairs with the reference <stem>, or as its manifest.json records"
            raise UsageError(f"--references {config.references}: {error}; {rule}") from None
    if config.target is not None:
        for name in ("outputs", "target"):
            if why := too_few(len(sets[name])):
                raise UsageError(f"--{name} {config[name]}: {why}")
        _check_cache_dir(Path(config.cache_dir or default_cache_dir()))
    return metrics_json


def _check_finished(outputs: Path) -> None:
    """A sample.py output folder (it has ``.manifest/``) is evaluated once its run has finished
    (``manifest.json``) and no process of it works there (``.lock``, held shared here: evaluations
    may run side by side, not beside sample.py); a plain folder of images as it is."""
    if not (outputs / PARTS_DIR).is_dir():
        return
    try:
        holder = lock_folder(outputs, shared=True)
    except (OSError, UsageError):  # a read-only folder (lock_folder: not writable): no run writes there
        holder = None
    if holder:
        raise UsageError(
            f"--outputs {outputs}: in use by {holder} ({outputs / '.lock'}); evaluate it once it is done"
        )
    if not (outputs / "manifest.json").is_file():
        done = len(dict(recorded_images(outputs)))
        raise UsageError(
            f"--outputs {outputs}: the sample.py run is not finished (no manifest.json; {done} images so far); "
            "rerun sample.py to finish it"
        )


def _check_cache_dir(cache: Path) -> None:
    """The statistics cache can be written (created if missing), else a :class:`UsageError`."""
    if cache.exists() and not cache.is_dir():
        raise UsageError(f"--cache_dir {cache}: is a file, expected a folder")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cache).close()
    except OSError as error:
        raise UsageError(f"--cache_dir {cache}: cannot write there ({error.strerror or error})") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors end in one line (``ilvr_toolkit.cli``)."""
    return run_command(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
