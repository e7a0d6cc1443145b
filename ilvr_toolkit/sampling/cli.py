"""Command line of ``sample.py``: a YAML config (``--config``) plus dotted overrides."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from ..cli import UsageError, check_range, make_parser, parse_options, run_command, setup_logging
from ..runtime import configure_threads
from .config import ILVRSpec, ModelSpec, OutputSpec, SampleConfig, SamplerSpec

__all__ = ["build_parser", "parse_config", "main"]

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sample_demo.yaml"


#: old spellings kept working
ALIASES = {"--io_workers": "--workers"}


def build_parser() -> ArgumentParser:
    parser = make_parser(
        "sample.py",
        "Translate reference images into the domain of a trained DDPM with ILVR. "
        "With no arguments, runs the bundled demo (configs/sample_demo.yaml).",
    )
    parser.add_class_arguments(SampleConfig, nested_key=None, as_group=False)
    parser.add_argument(
        "--threads",
        type=int | None,
        default=None,
        help="torch intra-op threads, >= 1 (null: SLURM_CPUS_PER_TASK under SLURM, else torch's "
        "default); not recorded in the manifest: it does not change the images",
    )
    return parser


def parse_config(argv: list[str] | None = None) -> SampleConfig:
    """The run's settings from ``argv`` (default ``sys.argv[1:]``); none -> the demo config."""
    return _config(_parse(argv))


def _parse(argv: list[str] | None) -> Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and DEMO_CONFIG.exists():
        argv = ["--config", str(DEMO_CONFIG)]
    return parse_options(build_parser(), argv, ALIASES)


def _config(namespace: Namespace) -> SampleConfig:
    known = {f.name for f in fields(SampleConfig)}
    return SampleConfig(**{k: _nested(k, v) for k, v in namespace.as_dict().items() if k in known})


_NESTED = {"model": ModelSpec, "ilvr": ILVRSpec, "sampler": SamplerSpec, "output": OutputSpec}


def _nested(key: str, value: Any) -> Any:
    return _NESTED[key](**value) if key in _NESTED and isinstance(value, dict) else value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sample.py``: user errors end in one line (see ``ilvr_toolkit.cli``)."""
    return run_command("sample.py", _main, argv)


def _main(argv: list[str]) -> int:
    setup_logging()
    namespace = _parse(argv)
    config = _config(namespace)
    if namespace.threads is not None:
        check_range("threads", namespace.threads, 1)
    configure_threads(namespace.threads)
    _check_paths(config)
    from .runner import run

    result = run(config)
    _report(result, config.published)
    return 0


def _check_paths(config: SampleConfig) -> None:
    """Every file or folder named on the command line exists before any work starts."""
    named = {
        "model.checkpoint": config.model.checkpoint,
        "references": None if config.unconditional else config.references,
        "evaluate_against": config.evaluate_against,
        "inception_weights": config.inception_weights,
    }
    for option, path in named.items():
        if path and not Path(path).exists():
            raise UsageError(f"--{option} {path}: no such file or folder")


def _report(result, published: dict | None = None) -> None:
    print(
        f"\nwrote {len(result.written)} images ({result.skipped_existing} already there) "
        f"in {result.seconds:.1f} s to {result.out_dir}"
    )
    if result.failed_references:
        print(f"skipped {len(result.failed_references)} unreadable references:")
        for name, error in result.failed_references.items():
            print(f"  {name}: {error}")
    for label, path in (("grid", result.grid), ("manifest", result.manifest)):
        if path is not None:
            print(f"{label}: {path}")
    if result.metrics:
        from ..evaluation import format_table

        for label, block in result.metrics.items():
            if isinstance(block, dict):
                print(f"\nmetrics, {label}:\n{format_table(block, published)}")
        if "fid_skipped" in result.metrics:
            print("\nFID/KID skipped: the Inception weights are missing (see the warning above).")
        print(f"metrics: {result.metrics['path']}")
