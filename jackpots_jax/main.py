r"""The command line: `python -m jackpots_jax.main --config configs/<name>.py --workdir <dir>`.

Any config field can be overridden (`--config.search.sparsity=0.95`), and a config file may take
an argument after a colon (`--config configs/cifar10_vgg19.py:tiny`). The mode is a config field:
`--config.mode=pretrain|search|evaluate|prune|export|jackpot`.

Errors a user can fix end the program with exit code 2 and one message naming the problem (the
field or the path, and what to do), never a traceback: an unknown field, an impossible value, a
config file that cannot be loaded, a missing dataset, missing or unreadable weights, masks or
checkpoints that do not fit, a work directory that is not writable or is in use by another run
(found before any compute), a disk that fills up, an environment variable of a multi-process run
that cannot be read. A non-finite loss ends it with exit code 3. Ctrl-C stops it after the current
step, once that step is checkpointed, with exit code 130 and the command that resumes it; SIGTERM
(what Slurm, Kubernetes and `timeout` send before SIGKILL) does the same with exit code 143. On
several hosts, `jax.distributed.initialize()` runs first when the environment asks for it.
`--check_only` loads and checks the config (and the model options) and runs nothing: what the
launchers do before they start a job elsewhere. docs/exit_codes.md lists every exit code.
"""

from __future__ import annotations

import ast
import errno
import logging as pylogging
import os
import shlex
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path of a config file (configs/<name>.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_CHECK_ONLY = flags.DEFINE_bool(
    "check_only", False, "Load and check the config, run nothing (exit 0 when it is sound)."
)
flags.mark_flags_as_required(["config", "workdir"])


_ARGV: list[str] = []  # the command line as given, for the command that resumes a run
_KWARGS = "--config.model.kwargs."
_MODEL_OPTIONS: dict[str, str] = {}  # `--config.model.kwargs.<name>=<value>`, set after parsing


class _QuietLibraries(pylogging.Filter):
    """Drops INFO messages of orbax and grain (a few lines per checkpoint otherwise).

    Their warnings and errors are kept, as one line each: the tracebacks they attach (hundreds of
    lines for a failed checkpoint write) are left out, since the error reaches the command line,
    which says what happened and what to do.
    """

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f"{os.sep}{name}{os.sep}" in record.pathname for name in ("orbax", "grain"))
        if noisy and record.levelno >= pylogging.WARNING:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return record.levelno >= pylogging.WARNING or not noisy


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_argument(argv: list[str]) -> str:
    """The value of `--config` as given (the last one wins, as for absl)."""
    value = ""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _config_not_loaded(argv: list[str], error: BaseException) -> None:
    """A config file that is missing or fails to load: where it was looked for, what failed."""
    value = _config_argument(argv)
    path = value.split(":", 1)[0]
    if not os.path.exists(path):
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        there = os.path.join(repo, path)
        found = os.path.isfile(there) and not os.path.isabs(path)
        hint = f"; did you mean {there}?" if found else ""
        _usage_error(
            f"config file {path!r} not found (a relative path is taken from the current "
            f"directory, {os.getcwd()}){hint}"
        )
    cause = error.__cause__ or error
    _usage_error(f"config file {path!r} could not be loaded: {type(cause).__name__}: {cause}")


def _rewritten(argv: list[str]) -> list[str]:
    """`argv` with what absl's parsing of the config cannot take set aside or rewritten.

    * `--config.model.kwargs.<option>=<value>` (one model option; the model's options are known
      only once the config names the model) is kept in `_MODEL_OPTIONS` and applied after parsing.
    * `--config.parallel.rules=a=none,b=0` (rules separated by commas, as the docs write them) is
      not a Python literal, which ml_collections wants for a tuple: it becomes one entry, which
      `config.parse_rules` splits at its commas.
    """
    out = []
    args = iter(argv)
    for arg in args:
        if arg.startswith(_KWARGS):
            name, sep, value = arg[len(_KWARGS) :].partition("=")
            if not sep:  # `--config.model.kwargs.depth 2`
                value = next(args, "")
            _MODEL_OPTIONS[name] = value
            continue
        if arg.startswith("--config.parallel.rules="):
            value = arg.split("=", 1)[1]
            try:
                ast.literal_eval(value)
            except (ValueError, SyntaxError):
                arg = f"--config.parallel.rules={(value,)!r}"
        out.append(arg)
    return out


def _apply_model_options(config) -> None:
    """Sets `_MODEL_OPTIONS` into `config.model.kwargs`: declared options only, values as literals.

    A value that is not a Python literal is taken as a string (`pool=cls`).
    """
    if not _MODEL_OPTIONS:
        return
    from jackpots_jax import models

    try:
        allowed = models.spec(config.model.name).options
    except ValueError as e:
        _usage_error(f"config field `model.name`: {e}")
    unknown = [name for name in _MODEL_OPTIONS if name not in allowed]
    if unknown:
        _usage_error(
            f"unknown model option(s) {', '.join(f'model.kwargs.{n}' for n in unknown)} of model "
            f"{config.model.name!r}; allowed: {', '.join(allowed) or 'none (it takes no options)'}"
        )
    with config.model.kwargs.unlocked():
        for name, text in _MODEL_OPTIONS.items():
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            config.model.kwargs[name] = value


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config error (of a file or an override) as a one-line error.

    The config is locked: `--config.<field>` for a field that does not exist is refused by
    ml_collections (with a suggestion), a value of the wrong type by absl. Model options
    (`--config.model.kwargs.<option>=<value>`) are checked against the options the model declares.
    """
    _ARGV[:] = argv
    _MODEL_OPTIONS.clear()
    # ml_collections reads the overrides from sys.argv itself: it sees the rewritten one.
    saved, sys.argv = sys.argv, _rewritten(argv)
    try:
        return _parse(sys.argv)
    finally:
        sys.argv = saved


def _parse(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
    except OSError as e:
        _config_not_loaded(argv, e)
    except (AttributeError, KeyError) as e:
        # ml_collections wraps a KeyError of the locked config: "'key'\nDid you mean ...?"
        while isinstance(e, BaseException) and e.args:
            e = e.args[0]
        key, _, suggestion = str(e).partition("\n")
        key = key.strip("'\"")
        # Name the whole field as the user wrote it (`search.sparsityy`), not just its last key.
        named = [
            arg.split("=", 1)[0].split(".", 1)[1]
            for arg in argv
            if arg.startswith("--config.") and key in arg.split("=", 1)[0].split(".")
        ]
        _usage_error(
            f"unknown config field(s) {', '.join(named) or key}: {suggestion or 'no such field'} "
            "(every field is listed with its default in jackpots_jax/experiment/config.py)"
        )
    except (flags.Error, ValueError, TypeError) as e:
        text = str(e)
        if "Error whilst parsing config file" in text:
            # ml_collections puts the traceback of the config's own error into the message.
            last = [line for line in text.strip().split("\n") if line.strip()][-1]
            text = f"{text.split(': Error whilst parsing', 1)[0]}: {last.strip()}"
        _usage_error(text)
    except Exception as e:  # noqa: BLE001 -- a config file that raises while it is loaded
        _config_not_loaded(argv, e)
    try:
        _CONFIG.value.to_dict  # noqa: B018 -- ml_collections defers a file's load error to here
    except OSError as e:
        _config_not_loaded(argv, e)
    except AttributeError:
        pass  # not a ConfigDict: `train_and_evaluate` says what is missing
    else:
        _apply_model_options(_CONFIG.value)
    return rest


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from jackpots_jax.experiment.loop import Interrupted, Terminated, raise_terminated

    # SIGTERM stops the run as Ctrl-C does (after the step, once it is saved) instead of killing it.
    signal.signal(signal.SIGTERM, raise_terminated)
    from jackpots_jax import parallel

    try:
        parallel.initialize_distributed()
    except ValueError as e:  # JAX_NUM_PROCESSES=two, or JAX_PROCESS_ID without the others
        return _stop(2, f"error: the environment of a multi-process run: {e}")
    from jackpots_jax.experiment.config import ConfigError
    from jackpots_jax.experiment.loop import NonFiniteLossError
    from jackpots_jax.experiment.modes import check_config, train_and_evaluate
    from jackpots_jax.experiment.workdir import WorkdirError
    from jackpots_jax.io.checkpoints import CheckpointCorruptError
    from jackpots_jax.io.errors import (
        CheckpointMismatchError,
        FileContentError,
        MissingDependencyError,
    )

    usage_errors = (
        ConfigError,
        FileNotFoundError,
        PermissionError,
        CheckpointMismatchError,
        CheckpointCorruptError,
        FileContentError,
        MissingDependencyError,
        WorkdirError,
    )
    try:
        if _CHECK_ONLY.value:
            check_config(_CONFIG.value, None)
            print(f"config {_config_argument(_ARGV)} is sound (nothing was run)")
            return 0
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except Interrupted as e:
        code = 143 if e.signum == signal.SIGTERM else 130
        return _stop(code, f"{e}. To resume from there, run the same command again:", resume=True)
    except Terminated:
        message = "stopped by SIGTERM; the newest checkpoints are kept. To resume, run:"
        return _stop(143, message, resume=True)
    except KeyboardInterrupt:
        message = "stopped by Ctrl-C; the newest checkpoints are kept. To resume, run:"
        return _stop(130, message, resume=True)
    except usage_errors as e:
        return _stop(2, f"error: {e}")
    except NonFiniteLossError as e:
        return _stop(3, f"error: {e}")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" ({e.filename})" if e.filename and e.filename not in str(e) else ""
            return _stop(
                2,
                f"error: the disk is full: {e}{where}. Free some space, or use a --workdir on "
                "another disk, then run the same command again to resume from the newest "
                "checkpoint:",
                resume=True,
            )
        if e.errno in (errno.EROFS, errno.ENOTDIR, errno.EISDIR):
            return _stop(2, f"error: {e}")
        raise
    return 0


def _stop(code: int, message: str, *, resume: bool = False) -> int:
    """Reports why the run stopped (with the command to resume where it can) and returns `code`.

    Nothing more is printed after it: a failed checkpoint write leaves orbax and tensorstore
    coroutines behind, which the interpreter would otherwise report one by one ("Exception ignored
    in ...") as it shuts down.
    """
    if resume:
        message += f"\n  {shlex.join([sys.executable, '-m', 'jackpots_jax.main', *_ARGV[1:]])}"
    print(message, file=sys.stderr, flush=True)
    sys.unraisablehook = lambda unraisable: None
    return code


def run(argv: list[str] | None = None) -> None:
    """Entry point of the `jackpots-jax` console script."""
    app.run(main, argv=sys.argv if argv is None else argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
