"""The command line run in the test's own process: for tests that check a message or an exit code.

`python -m jackpots_jax.main` in a subprocess costs seconds of imports (JAX, orbax, grain) before
it does anything; a test that only checks that bad input ends with exit code 2 and one message
does not need its own interpreter. `run_main` runs `jackpots_jax.main` as `app.run` does, with
the absl flags parsed afresh, `SystemExit` caught and the output captured. Tests of what only a
separate process shows (signals, several processes, a kill and a resume, the device count) keep
their subprocess.

Example:
  >>> result = run_main(["--config=configs/default.py:tiny", "--workdir=/tmp/w",
  ...                    "--config.search.sparsity=1.0"])
  >>> result.code, "`search.sparsity` is 1.0" in result.err
  (2, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from unittest import mock


@dataclasses.dataclass(frozen=True)
class Result:
    """What a run of the command line left: its exit code, its stdout and its stderr."""

    code: int
    out: str
    err: str

    # The names of `subprocess.CompletedProcess`, so that one check serves both kinds of run.
    @property
    def returncode(self) -> int:
        return self.code

    @property
    def stdout(self) -> str:
        return self.out

    @property
    def stderr(self) -> str:
        return self.err


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)  # `sys.exit("message")`: printed, exit code 1
    return 1


def _reset_flags(values) -> None:
    """Every flag back to its default, and the `--config.<field>` flags of the last run gone.

    ml_collections defines one flag per override as it parses the config; the next run defines
    its own (maybe the same names, with another config's types).
    """
    for name in list(values):
        if name.startswith("config."):
            delattr(values, name)
    values.unparse_flags()


def run_main(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> Result:
    """Runs `python -m jackpots_jax.main *args` in this process.

    Args:
      args: the command line after the program name (`--config=...`, `--workdir=...`, ...).
      env: environment variables set for the run only (restored afterwards).
      cwd: the working directory for the run (restored afterwards).

    Returns:
      A `Result`: the exit code (0, or what `sys.exit` was given), stdout and stderr.
    """
    from absl import app, flags
    from absl import logging as absl_logging

    from jackpots_jax import main as cli

    argv = ["jackpots_jax.main", *(str(a) for a in args)]
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    absl_handler = absl_logging.get_absl_handler()
    saved_filters = absl_handler.filters[:]
    python_handler = absl_handler.python_handler
    saved_stream = python_handler.stream
    saved_hook = sys.unraisablehook
    saved_cwd = os.getcwd()
    _reset_flags(flags.FLAGS)
    try:
        with (
            mock.patch.object(sys, "argv", argv),  # ml_collections reads the overrides from it
            mock.patch.dict(os.environ, dict(env or {})),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            python_handler.stream = err
            if cwd is not None:
                os.chdir(cwd)
            try:
                app.run(cli.main, argv=argv, flags_parser=cli.parse_flags)
                code = 0
            except SystemExit as e:
                code = _exit_code(e)
    finally:
        os.chdir(saved_cwd)
        _reset_flags(flags.FLAGS)
        python_handler.stream = saved_stream
        absl_handler.filters[:] = saved_filters
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        sys.unraisablehook = saved_hook
    return Result(code, out.getvalue(), err.getvalue())
