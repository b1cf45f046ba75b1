r"""The command line: `python -m jackpots_jax.main --config configs/<name>.py --workdir <dir>`.

Any config field can be overridden (`--config.search.sparsity=0.95`), and a config file may take
an argument after a colon (`--config configs/cifar10_vgg19.py:tiny`). The mode is a config field:
`--config.mode=pretrain|search|evaluate|prune|export|jackpot`.

Errors a user can fix (an unknown field, an impossible value, a missing dataset or missing
weights) end the program with exit code 2 and one message naming the problem, before any compute.
On several hosts, `jax.distributed.initialize()` runs first when the environment asks for it.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
from collections.abc import Mapping

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


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from jackpots_jax import parallel

    parallel.initialize_distributed()
    from jackpots_jax import train
    from jackpots_jax.config_schema import ConfigError
    from jackpots_jax.convert import CheckpointMismatchError

    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, CheckpointMismatchError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def unknown_overrides(argv: list[str]) -> list[str]:
    """The `--config.<field>` overrides in `argv` that name no field of the config schema."""
    from jackpots_jax.config_schema import base_config

    schema = base_config().to_dict()
    unknown = []
    for arg in argv[1:]:
        if arg == "--":
            break
        if not arg.startswith("--config."):
            continue
        field = arg[len("--config.") :].split("=", 1)[0]
        node = schema
        for part in field.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
                if part == "kwargs":
                    break
            else:
                unknown.append(field)
                break
    return unknown


def run(argv: list[str] | None = None) -> None:
    """Entry point of the `jackpots-jax` console script."""
    argv = sys.argv if argv is None else argv
    unknown = unknown_overrides(argv)
    if unknown:
        print(
            f"error: unknown config field(s) {', '.join(unknown)}: no such field in "
            "jackpots_jax.config_schema.base_config() (check the spelling; the README lists them)",
            file=sys.stderr,
        )
        sys.exit(2)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
