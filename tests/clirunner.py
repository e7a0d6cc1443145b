"""Run the real command-line entry points in their own processes, fast.

Starting ``python train.py ...`` costs about 7 s of imports on a loaded 2-core box, so a matrix
of 60 faults would spend minutes importing torch. :class:`CLIRunner` starts ONE fresh
interpreter (a "zygote") that imports the heavy libraries once, then forks a child per command:
the child is a separate process with its own stdout, stderr, working directory, environment
and exit status, and runs the entry point exactly as ``python SCRIPT`` or ``python -m MODULE``
would (``runpy``, ``__name__ == "__main__"``). A child that dies by a signal is reported as
such (``signal``), a hang is ended by SIGALRM after ``timeout`` seconds.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ZYGOTE = r"""
import json, os, resource, runpy, signal, sys, traceback
import torch, pytorch_lightning, jsonargparse, PIL.Image, lmdb  # noqa: F401  the heavy imports, once
import ilvr_toolkit.training.cli, ilvr_toolkit.sampling.cli  # noqa: F401
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            for fd, path in ((1, job["out"]), (2, job["err"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            signal.alarm(job["timeout"])
            if job["fsize"]:  # a full disk: writes past this many bytes fail with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            sys.argv = list(job["argv"])
            if job["module"]:
                sys.modules.pop(job["module"], None)
                sys.modules.pop(job["module"] + ".__main__", None)
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(job["argv"][0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps([os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                      os.WTERMSIG(status) if os.WIFSIGNALED(status) else None]), flush=True)
"""


@dataclass
class Done:
    """A finished command: exit status (None when killed), the signal that killed it, output."""

    returncode: int | None
    signal: int | None
    stdout: str
    stderr: str


class CLIRunner:
    """``runner("train.py", "fit", ...)`` or ``runner("-m", "ilvr_toolkit.data.prepare", ...)``."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ILVR_DEBUG"}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.folder = Path(tempfile.mkdtemp(prefix="clirunner-"))

    def __call__(
        self,
        *argv: str,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
        timeout: int = 120,
        fsize: int = 0,
    ) -> Done:
        module = argv[1] if argv[0] == "-m" else None
        args = [module, *argv[2:]] if module else [str(REPO / argv[0]), *argv[1:]]
        out, err = self.folder / "out", self.folder / "err"
        job = {
            "argv": args,
            "module": module,
            "cwd": str(cwd),
            "env": env or {},
            "timeout": timeout,
            "fsize": fsize,
        }
        self.proc.stdin.write(json.dumps({**job, "out": str(out), "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        code, signum = json.loads(self.proc.stdout.readline())
        return Done(code, signum, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_SHARED: list[CLIRunner] = []


def shared() -> CLIRunner:
    """The one runner of this test session, started on first use and closed at exit: every
    fault test forks its commands from it instead of importing torch again."""
    if not _SHARED:
        _SHARED.append(CLIRunner())
        atexit.register(_SHARED[0].close)
    return _SHARED[0]
