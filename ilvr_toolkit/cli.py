"""What every entry point shares: one jsonargparse style and one place for user errors.

Every command (``train.py``, ``sample.py``, ``python -m ilvr_toolkit.data.prepare``,
``train.py export``, ``python -m ilvr_toolkit.evaluation``) parses with jsonargparse
(``--config`` YAML + dotted overrides, ``--print_config``, ``--help`` with types and
defaults) and runs under :func:`run_command`, which turns a user's mistake into one line on
stderr and a non-zero exit (2 for usage errors) instead of a traceback. ``--debug`` or
``ILVR_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

__all__ = ["UsageError", "make_parser", "normalize_options", "run_command", "setup_logging"]

#: exit status of a usage error (bad flag or value), as argparse uses.
EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake in the command line or config (a flag's value, a missing file the user named):
    reported as one line, exit status 2."""


def make_parser(prog: str, description: str) -> ArgumentParser:
    """A parser in the house style: ``--config`` YAML file plus dotted options."""
    parser = ArgumentParser(prog=prog, description=description, env_prefix="ILVR", default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    return parser


def normalize_options(argv: Sequence[str]) -> list[str]:
    """Accept ``--batch-size`` for ``--batch_size``: every option is spelled with underscores."""
    out = []
    for token in argv:
        if token.startswith("--") and "-" in token[2:].split("=", 1)[0]:
            name, sep, value = token[2:].partition("=")
            token = "--" + name.replace("-", "_") + sep + value
        out.append(token)
    return out


def setup_logging() -> None:
    """INFO lines ``LEVEL name: message`` on stderr, once per process."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _wants_debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("ILVR_DEBUG", "") not in ("", "0")


def run_command(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` (``--debug`` removed) and return its exit status.

    A :class:`UsageError` prints ``prog: error: ...`` and returns 2; a missing or unreadable
    file, a bad value or another ``OSError`` prints ``prog: error: ...`` and returns 1;
    Ctrl-C returns 130. With ``--debug`` / ``ILVR_DEBUG=1`` the traceback is printed too.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _wants_debug(args)
    args = [a for a in args if a != "--debug"]
    try:
        return int(main(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as error:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, UsageError) else 1


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text
