"""Runs the command line and kills it with SIGKILL right after a chosen training step.

Usage: python tests/kill_driver.py STEPS [jackpots_jax.main flags ...]

The process sends itself SIGKILL when the run asks its training iterator for batch `STEPS + 1`:
step `STEPS` is done and logged (and checkpointed, when it falls on the cadence), the next one has
not started. Where the kill lands is thus decided by the test, never by timing. Only the training
iterator is wrapped, a part of the data library that the command line merely consumes.
"""

from __future__ import annotations

import os
import signal
import sys

from jackpots_jax.data import pipeline


def main() -> None:
    steps = int(sys.argv[1])
    served = 0
    original = pipeline.TrainIterator.__next__

    def next_or_die(self):
        nonlocal served
        if served == steps:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        served += 1
        return original(self)

    pipeline.TrainIterator.__next__ = next_or_die
    from jackpots_jax import main as cli

    cli.run([sys.argv[0], *sys.argv[2:]])


if __name__ == "__main__":
    main()
