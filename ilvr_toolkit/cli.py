"""What every entry point shares: one jsonargparse style (``--config`` YAML + dotted overrides,
``--print_config``, ``--help`` with types and defaults) and one place for user errors
(:func:`run_command`). jsonargparse is imported on first use, so ``UsageError`` costs nothing to
import (the converter's worker processes import it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

__all__ = ["UsageError", "check_config_files", "check_paths", "check_range", "make_parser"]
__all__ += ["normalize_options", "parse_options", "run_command", "setup_logging", "unknown_key"]
__all__ += ["out_of_memory"]


_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off")  # what jsonargparse reads as a bool (any case)


class UsageError(ValueError):
    """A mistake in the command line or config (a flag's value, a missing file the user named):
    reported as one line, exit status 2."""


def check_range(option: str, value: Any, low: float, high: float | None = None) -> None:
    """Raise :class:`UsageError` ``--option VALUE: expected ...`` unless ``low <= value <= high``.

    ``low`` an int: ``value`` must be an int too (a count); a float: any number.
    """
    integer = isinstance(low, int)
    kinds = (int,) if integer else (int, float)
    inside = isinstance(value, kinds) and not isinstance(value, bool) and value >= low
    if not inside or (high is not None and value > high):
        kind = "an integer" if integer else "a number"
        expected = f"{kind} in {low}..{high}" if high is not None else f"{kind} >= {low}"
        raise UsageError(f"--{option} {value}: expected {expected}")


def make_parser(prog: str, description: str) -> ArgumentParser:
    """A parser in the house style: ``--config`` YAML file plus dotted options, ``--debug``.

    Parse errors raise ``argparse.ArgumentError`` (no usage dump); :func:`run_command` turns
    them into one line and exit status 2.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog=prog, description=description, env_prefix="ILVR", default_env=False, exit_on_error=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    debug = "on an error, print the traceback too (or set ILVR_DEBUG=1)"
    # run_command consumes it; listed here so that --help shows it
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return parser


def normalize_options(
    argv: Sequence[str],
    parser: ArgumentParser | None = None,
    aliases: Mapping[str, str] | None = None,
    repeatable: Collection[str] = (),
) -> list[str]:
    """The command line as jsonargparse expects it.

    - ``--batch-size`` -> ``--batch_size``: every option is spelled with underscores;
    - ``aliases`` renames options (``{"--out": "--output.dir"}``), kept for old spellings;
    - with ``parser``: a bool option given bare means true (``--strict``), ``--no_X`` false;
    - an option in ``repeatable`` given again appends (``--size 64 --size 128`` -> [64, 128]).
    """
    aliases, defaults = aliases or {}, parser.get_defaults() if parser is not None else {}
    flags = {f"--{key}" for key, value in defaults.items() if isinstance(value, bool)}
    out: list[str] = []
    seen: set[str] = set()
    for i, token in enumerate(argv):
        if (
            token.startswith("--") and token != "--" and " " not in token.partition("=")[0]
        ):  # "--a 1": a value
            name, sep, value = token.partition("=")
            name = "--" + name[2:].replace("-", "_")
            name = aliases.get(name, name)
            following = argv[i + 1] if i + 1 < len(argv) else None
            if name in flags and not sep and (following or "").lower() not in _BOOL_WORDS:
                sep, value = "=", "true"
            elif name.startswith("--no_") and "--" + name[5:] in flags and not sep:
                name, sep, value = "--" + name[5:], "=", "false"
            if name in repeatable and name in seen:
                name += "+"  # given again: append
            seen.add(name)
            token = name + sep + value
        out.append(token)
    return out


def parse_options(
    parser: ArgumentParser,
    argv: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    repeatable: Collection[str] = (),
) -> Namespace:
    """:func:`normalize_options` then ``parser.parse_args``; every ``--config`` file is read
    first, so a missing file or invalid YAML is a :class:`UsageError` naming the file."""
    args = normalize_options(argv, parser, aliases, repeatable)
    configs = check_config_files(args)
    try:
        return parser.parse_args(args)
    except argparse.ArgumentError as error:
        if (line := unknown_key(error, parser.get_defaults(), configs) or _stray_value(error, args)) is None:
            raise
        raise UsageError(line) from None


def _stray_value(error: Exception, args: Sequence[str]) -> str | None:
    """``--flag VALUE: expected true or false`` when the unrecognized argument of ``error`` is the
    word after a bool flag that :func:`normalize_options` read as given bare (``--flag=true``)."""
    if (found := re.match(r"unrecognized arguments: (\S+)", str(error))) is None:
        return None
    pairs = zip(args, args[1:], strict=False)
    flag = next((a for a, b in pairs if b == found.group(1) and a.endswith("=true")), None)
    return None if flag is None else f"{flag.removesuffix('=true')} {found.group(1)}: expected true or false"


#: sbatch/srun options that a user may put after the batch script, where its command reads them
SBATCH_OPTIONS = set(
    "nodes ntasks ntasks-per-node cpus-per-task gpus gpus-per-node gpus-per-task gres mem mem-per-cpu "
    "mem-per-gpu time partition output error array signal job-name account qos constraint requeue".split()
)


def unknown_key(error: Exception, defaults: Namespace, configs: Sequence[str]) -> str | None:
    """The one line for a parse ``error`` about an unknown key (None for another error): the
    ``configs`` file that holds it, else the flag, and the closest valid key at its level, else
    that level's keys; the valid ones are those of ``defaults`` (the parser's ``get_defaults()``)."""
    import difflib

    import yaml

    flag = re.match(r"unrecognized arguments: --([\w.-]+)", str(error))
    nested = r"(?:Group '(.+?)'|Subcommand '.+?') does not accept (?:option|nested key) '(.+?)'"
    if (found := flag or re.match(rf"{nested}|Option '(.+?)' is not accepted", str(error))) is None:
        return None
    key = ".".join(filter(None, found.groups()))
    parts, known = key.split("."), [k.split(".") for k in defaults.keys()]
    unknown = (i for i in range(len(parts)) if not any(k[: i + 1] == parts[: i + 1] for k in known))
    depth = next(unknown, len(parts) - 1)  # the first part that no valid key has there
    names = sorted({k[depth] for k in known if len(k) > depth and k[:depth] == parts[:depth]})
    hint = f"valid keys{' under ' + '.'.join(parts[:depth]) if depth else ''}: {', '.join(names)}"
    if close := difflib.get_close_matches(parts[depth], names, 1):
        hint = f"did you mean {'--' if flag else ''}{'.'.join([*parts[:depth], close[0]])}?"
    if flag and key in SBATCH_OPTIONS:
        hint = "sbatch options go before the script name (docs/cluster.md)"
    for path in [] if flag else configs:  # the file that holds the key (KeyError: it does not)
        node = yaml.safe_load(Path(path).read_text())
        for part in parts:
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            return f"--config {path}: unknown option {key!r}; {hint}"
    return f"--{key}: unknown option; {hint}"


def check_config_files(args: Sequence[str]) -> list[str]:
    """The ``--config`` files in ``args``; :class:`UsageError` ``--config PATH: ...`` unless readable YAML."""
    import yaml

    configs = [args[i + 1] for i, token in enumerate(args[:-1]) if token in ("--config", "-c")]
    configs += [token.partition("=")[2] for token in args if token.startswith("--config=")]
    for path in configs:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise UsageError(f"--config {path}: cannot read: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            raise UsageError(f"--config {path}: invalid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            got = "nothing" if data is None else f"a {type(data).__name__}"
            raise UsageError(f"--config {path}: expected options (key: value lines), got {got}")
    return configs


def check_paths(named: Mapping[str, Any]) -> None:
    """Before any work: each ``{option: path}`` given exists, else :class:`UsageError` naming it."""
    for option, path in named.items():
        if path and not Path(path).exists():
            raise UsageError(f"--{option} {path}: no such file or folder")


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The first of ``folder`` and its parents that exists as something other than a folder (a
    file that keeps the folder from being made), or None."""
    folder = Path(folder)
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def check_output_file(option: str, path: str | None, what: str, keys: Collection[str]) -> Path | None:
    """Before any work: ``path`` can be written as a JSON file, else :class:`UsageError` naming it.
    What is there is never lost: the write replaces only an empty file or a JSON object with one
    of ``keys`` (one this command wrote: the ``what``); a symlink is followed (the file it points
    to is written). Returns the path to write (None: none)."""
    if not path:
        return None
    real = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    if real.is_dir():
        raise UsageError(f"--{option} {path}: is a folder, expected a file name")
    parent = next(p for p in real.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--{option} {path}: cannot be written here ({parent} is not a writable folder)")
    if real.exists() and not (real.is_file() and (real.stat().st_size == 0 or json_keys(real) & set(keys))):
        raise UsageError(f"--{option} {path}: exists and is not a {what}: choose another path or delete it")
    return real


def json_keys(path: Path) -> set[str]:
    """The top-level keys of the JSON object in ``path`` (empty: not one, or unreadable)."""
    try:
        with open(path, "rb") as f:
            if f.read(64).lstrip()[:1] != b"{":  # not a JSON object: an image is not read whole
                return set()
            data = json.loads(f.seek(0) or f.read())
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def setup_logging() -> None:
    """INFO lines ``LEVEL name: message`` on stderr, once per process."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_command(
    prog: str,
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    user_errors: tuple[type[Exception], ...] = (),
    where: Callable[[], str] = str,
    memory: Callable[[], str] = str,
) -> int:
    """Run ``main(argv)`` (``--debug`` removed) and return its exit status: a user's mistake is one
    line ``prog: error: {where()}...`` on stderr instead of a traceback (``where``: which process of
    several met it, e.g. ``"rank 1: "``), exit 2 for a :class:`UsageError`,
    a parse error (``argparse.ArgumentError``) or one of ``user_errors``, 1 for a missing or unreadable file, a bad value or
    another ``OSError``; Ctrl-C returns 130. Running out of memory (:func:`out_of_memory`) is one line
    ``out of memory at {memory()} (...); lower ...``, exit 1 (``memory``: the setting that decides it,
    e.g. ``"--batch_size 64"``). ``--debug`` / ``ILVR_DEBUG=1`` prints the traceback too.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ILVR_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        return int(main(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # lmdb's errors (a full disk, a damaged file) are about a file too
        if (said := out_of_memory(error)) is not None:
            if debug:
                traceback.print_exc()
            setting = memory()
            said = (
                f" at {setting} ({said}); lower {setting.split()[0]} and rerun" if setting else f" ({said})"
            )
            print(f"{prog}: error: {where()}out of memory{said}", file=sys.stderr)
            return 1
        file_errors = (OSError, getattr(sys.modules.get("lmdb"), "Error", OSError))
        if not isinstance(error, (argparse.ArgumentError, ValueError, *file_errors, *user_errors)):
            raise
        if debug:
            traceback.print_exc()
        chain = [error]  # a UsageError that a library wrapped is the user's mistake
        while chain[-1].__cause__ or chain[-1].__context__:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        error = next((e for e in chain if isinstance(e, UsageError)), error)
        line = f"{prog}: error: {where()}{_one_line(error)}"
        status = 2 if isinstance(error, (UsageError, argparse.ArgumentError, *user_errors)) else 1
        if not _noted_for_the_job(line, status):
            print(line, file=sys.stderr)
        return status


def _noted_for_the_job(line: str, status: int) -> bool:
    """In a task of a SLURM step of ``scripts/slurm/common.sh`` on the job's first node, note
    ``STATUS LINE`` in ``$ILVR_STEP_ERRORS.<rank>``: the job exits with the lowest status noted and
    prints the lines of ranks > 0 that rank 0 did not. True where the line is left to the job."""
    prefix, rank = os.environ.get("ILVR_STEP_ERRORS"), os.environ.get("SLURM_PROCID", "0")
    if not prefix or os.environ.get("SLURM_NODEID", "0") != "0":
        return False
    try:
        Path(f"{prefix}.{rank}").write_text(f"{status} {line}\n")
    except OSError:
        return False
    return rank != "0"


def out_of_memory(error: BaseException) -> str | None:
    """What the allocator said, in short, when ``error`` (or one it was raised from) is running out
    of memory: a ``MemoryError``, torch's ``OutOfMemoryError`` (CUDA), the CPU allocator's
    ``RuntimeError`` (which has no class of its own); else None."""
    while error is not None:
        text = " ".join(str(error).split())
        if (
            isinstance(error, MemoryError)
            or type(error).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text
        ):
            text = re.sub(r"^\[enforce fail at .*?\] (err == 0\. )?", "", text)
            return re.split(r"\. (?:Error code|GPU \d)", text)[0][:200] or type(error).__name__
        error = error.__cause__ or error.__context__
    return None


def _one_line(error: BaseException) -> str:
    """The error as one line; jsonargparse's parse errors as ``--key VALUE: expected ...``."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = re.sub(r"^Unexpected config: ([\w.]+):$", r"key '\1' is empty (null): give its settings", text)
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        return f"{error.filename}: {text}"
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', str(error), re.S)
    if match is None or not isinstance(error, argparse.ArgumentError):
        return text
    key, body = match.groups()
    given = re.search(r"Given value: (.*)", body) or re.search(r"\. Got value: (.*)", body)
    body = re.sub(r"\.? Got value: .*", "", body)
    errors = re.findall(r"^\s*- (.*)", body, re.M) or [" ".join(body.split())]
    expected = " or ".join(dict.fromkeys(_expectation(e) for e in errors)).replace(" or expected ", " or ")
    return f"--{key}{'' if given is None else ' ' + given.group(1).strip()}: {expected}"


def _expectation(complaint: str) -> str:
    if (literal := re.match(r"Expected a typing\.Literal\[(.*)\]", complaint)) is not None:
        return "expected one of " + literal.group(1).replace("'", "")
    complaint = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", complaint)
    complaint = complaint.replace("expected NoneType", "expected null").replace(
        "expected bool", "expected true or false"
    )
    return complaint.replace("does not conform to restriction v", "must be ").replace(" and v", " and ")
