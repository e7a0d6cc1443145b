"""``python -m ilvr_toolkit.evaluation --outputs OUT --target TARGET --references REFS --factor 32``:
FID/KID against the target domain, SSIM/PSNR/L2 against the references (docs/evaluation.md)."""

from dataclasses import fields

from jsonargparse import ArgumentParser

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
from .api import EvalSettings, evaluate_translation, format_table, write_metrics

PROG = "python -m ilvr_toolkit.evaluation"


def build_parser() -> ArgumentParser:
    parser = make_parser(PROG, "FID/KID (reference TF-FID settings, offline) and SSIM/PSNR/L2 of image sets.")
    path = {"type": str | None, "default": None}
    parser.add_argument("--outputs", **path, help="the translated images: a folder")
    parser.add_argument("--target", **path, help="FID/KID against: a folder or an LMDB")
    parser.add_argument("--references", **path, help="SSIM/PSNR/L2 against: a folder (<stem>_s<k> to <stem>)")
    parser.add_argument("--metrics_json", **path, help="where to write the metrics (JSON)")
    parser.add_class_arguments(EvalSettings, nested_key=None, as_group=False)
    return parser


def _main(argv: list[str]) -> int:
    setup_logging()
    config = parse_options(build_parser(), argv, aliases={"--json": "--metrics_json"})  # the 0.1 name
    if config.outputs is None or (config.target is None and config.references is None):
        raise UsageError("give --outputs, and --target (FID/KID) and/or --references (SSIM/PSNR/L2)")
    check_paths({name: config[name] for name in ("outputs", "target", "references", "inception_weights")})
    check_output_file("metrics_json", config.metrics_json)
    for name in ("outputs", "target", "references"):
        config[name] is None or open_image_source(name, config[name])
    for name, low in dict(
        batch_size=1, kid_subsets=1, kid_subset_size=1, workers=0, factor=1, image_size=1
    ).items():
        if config[name] is not None:
            check_range(name, config[name], low)
    settings = EvalSettings(**{f.name: config[f.name] for f in fields(EvalSettings)})
    metrics = evaluate_translation(config.outputs, config.references, config.target, settings=settings)
    print(format_table(metrics))
    if config.metrics_json:
        print(f"wrote {write_metrics(config.metrics_json, metrics)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors end in one line (``ilvr_toolkit.cli``)."""
    return run_command(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
