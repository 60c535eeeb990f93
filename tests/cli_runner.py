"""`chipscout` run in the test process: the command's own code path from `main` (argument
parsing, the one-line error, the exit status) without starting a new interpreter, which costs
4-5 s of imports per call on two busy cores. Tests that are about the process itself (start-up
imports, signals, a server) still start one."""

from __future__ import annotations

import io
import subprocess
from contextlib import redirect_stderr, redirect_stdout

from chipscout.indexer.cli.commands import main


def run_chipscout(*args) -> subprocess.CompletedProcess:
    """`chipscout ARGS` in this process: its exit status, stdout and stderr, as `subprocess.run`
    with `capture_output=True, text=True` gives them. An error that is not the user's (a bug)
    propagates, where a real process would print its traceback."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit("message"): Python prints it and exits 1
                err.write(f"{exit_.code}\n")
                code = 1
    return subprocess.CompletedProcess(["chipscout", *argv], code, out.getvalue(), err.getvalue())
