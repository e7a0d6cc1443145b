"""Command line of ``sample.py``: a YAML config (``--config``) plus dotted overrides."""

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from ..batchjob import leave_note
from ..cli import UsageError, check_paths, check_range, make_parser, parse_options, run_command, setup_logging
from ..models.winograd import BuildStopped
from ..runtime import tune_process
from .config import SampleConfig
from .runner import STOP, RunResult, run

__all__ = ["build_parser", "parse_config", "main"]

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sample_demo.yaml"


#: old spellings kept working
ALIASES = {"--io_workers": "--workers"}
#: the metrics step of a finished run: ``evaluate(config, result)`` (see :func:`main`)
Evaluate = Callable[[SampleConfig, RunResult], Any]


def build_parser() -> ArgumentParser:
    parser = make_parser(
        "sample.py",
        "Translate reference images into the domain of a trained DDPM with ILVR, or inpaint, "
        "colourise, super-resolve or edit them (--task; docs/conditioning.md). "
        "With no arguments, runs the bundled demo (configs/sample_demo.yaml).",
    )
    parser.add_class_arguments(SampleConfig, nested_key=None, as_group=False)
    parser.set_defaults(cpu_malloc="tuned")  # the command line tunes the process; library callers opt in
    threads = "torch intra-op threads, >= 1 (null: SLURM_CPUS_PER_TASK under SLURM, else torch's default); "
    threads += "not recorded in the manifest: it does not change the images"
    parser.add_argument("--threads", type=int | None, default=None, help=threads)
    return parser


def parse_config(argv: list[str] | None = None) -> SampleConfig:
    """The run's settings from ``argv`` (default ``sys.argv[1:]``); none -> the demo config."""
    return SampleConfig.from_dict(_parse(argv).as_dict())


def _parse(argv: list[str] | None) -> Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and DEMO_CONFIG.exists():
        argv = ["--config", str(DEMO_CONFIG)]
    return parse_options(build_parser(), argv, ALIASES)


def main(
    argv: list[str] | None = None,
    evaluate: Evaluate | None = None,
    check: Callable[[SampleConfig], None] | None = None,
) -> int:
    """Entry point of ``sample.py`` (user errors end in one line). ``evaluate(config, result)``: the
    ``--evaluate_against`` step, run by the process that wrote the manifest; ``sample.py`` passes
    ``evaluation.runs.evaluate_run`` (sampling does not import evaluation, which builds on it);
    ``check(config)``, its checks before any sampling (``evaluation.runs.check_evaluation``)."""
    memory = {"setting": ""}  # what an out-of-memory error names: the run's --batch_size
    run_main = lambda args: _main(args, evaluate, check, memory)  # noqa: E731
    return run_command("sample.py", run_main, argv, memory=lambda: memory["setting"])


def _main(
    argv: list[str],
    evaluate: Evaluate | None,
    check: Callable[[SampleConfig], None] | None = None,
    memory: dict[str, str] | None = None,
) -> int:
    setup_logging()
    namespace = _parse(argv)
    config = SampleConfig.from_dict(namespace.as_dict())
    if memory is not None:
        memory["setting"] = f"--batch_size {config.batch_size}"
    if namespace.threads is not None:
        check_range("threads", namespace.threads, 1)
    tune_process(namespace.threads, cpu_malloc=config.cpu_malloc == "tuned")  # one log line
    checkpoint = config.model.checkpoint
    if checkpoint and not Path(checkpoint).exists():
        raise UsageError(
            f"--model.checkpoint {checkpoint}: no such file (nothing is downloaded: checkpoints/README.md "
            "says where each released model comes from and where it goes)"
        )
    named = {"model.checkpoint": checkpoint, "evaluate_against": config.evaluate_against}
    named.update(references=None if config.unconditional else config.references, mask=config.mask)
    check_paths({**named, "inception_weights": config.inception_weights})  # before any work
    if check is not None:  # the evaluation's own checks (its target, weights), before hours of sampling
        check(config)
    if config.evaluate_against and evaluate is None:
        raise UsageError("--evaluate_against: this entry point samples only; run sample.py to evaluate")
    try:
        result = run(config)
    except BuildStopped as stopped:  # the Winograd kernel's compiler was stopped with the process
        if (signum := stopped.signum or STOP.signum) is None:
            raise
        print(
            f"sample.py: stopped by signal {signum} while the Winograd kernel was built; rerun",
            file=sys.stderr,
        )
        leave_note("stopped while the Winograd kernel was built")
        return 0 if os.environ.get("ILVR_REQUEUE_NOTE") else 128 + signum
    _report(result)
    if STOP.signum is not None and not os.environ.get("ILVR_REQUEUE_NOTE"):
        print(f"sample.py: stopped by signal {STOP.signum} after a batch; rerun to resume", file=sys.stderr)
        return 128 + STOP.signum  # no batch script to requeue: the run is not complete
    if config.evaluate_against and result.manifest is not None:
        previous = {signum: signal.signal(signum, _stopped) for signum in STOP.signals}
        try:
            evaluate(config, result)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return 0


def _stopped(signum: int, _frame: Any) -> None:
    """A stop signal during the evaluation: it ends now, in one line (no metrics.json is left)."""
    print(f"sample.py: stopped by signal {signum} during the evaluation; rerun to evaluate", file=sys.stderr)
    leave_note("stopped during the evaluation")  # a batch script requeues the job
    raise SystemExit(128 + signum)


def _report(result: RunResult) -> None:
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
