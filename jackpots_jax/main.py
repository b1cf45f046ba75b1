r"""The command line: `python -m jackpots_jax.main --config configs/<name>.py --workdir <dir>`.

Any config field can be overridden (`--config.search.sparsity=0.95`), and a config file may take
an argument after a colon (`--config configs/cifar10_vgg19.py:tiny`). The mode is a config field:
`--config.mode=pretrain|search|evaluate|prune|export|jackpot`.

Errors a user can fix (an unknown field, an impossible value, a missing dataset or missing
weights) end the program with exit code 2 and one message naming the problem, before any compute;
a non-finite loss ends it with exit code 3. On several hosts, `jax.distributed.initialize()` runs
first when the environment asks for it.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path of a config file (configs/<name>.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drops INFO messages of orbax and grain (a few lines per checkpoint otherwise)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f"{os.sep}{name}{os.sep}" in record.pathname for name in ("orbax", "grain"))
        return record.levelno >= pylogging.WARNING or not noisy


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config error (of a file or an override) as a one-line error.

    The config is locked: `--config.<field>` for a field that does not exist is refused by
    ml_collections (with a suggestion), a value of the wrong type by absl.
    """
    try:
        return flags.FLAGS(argv)
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
        _usage_error(str(e))
    return []  # not reached


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from jackpots_jax import parallel

    parallel.initialize_distributed()
    from jackpots_jax.experiment.config import ConfigError
    from jackpots_jax.experiment.loop import NonFiniteLossError
    from jackpots_jax.experiment.modes import train_and_evaluate
    from jackpots_jax.io.errors import CheckpointMismatchError

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, CheckpointMismatchError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def run(argv: list[str] | None = None) -> None:
    """Entry point of the `jackpots-jax` console script."""
    app.run(main, argv=sys.argv if argv is None else argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
