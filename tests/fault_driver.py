"""Runs the command line with one fault injected at a chosen, deterministic point.

Usage: python tests/fault_driver.py FAULT ARG [jackpots_jax.main flags ...]

Faults (each wraps one function the command line merely uses, never a test hook in its own code):

* `sigint K`: the process sends itself SIGINT (what Ctrl-C sends) while its training iterator
  serves the batch of step K, so step K is under way when the signal arrives.
* `sigint2 K`: the same, twice in a row (a user who presses Ctrl-C again rather than wait for
  the step to be saved).
* `enospc K`: writing the checkpoint of step K fails the way a full disk makes it fail: orbax has
  created the step's temporary folder and written part of a file into it when the write raises
  `OSError(ENOSPC)`. (A real size-limited file system behaves the same; it cannot be mounted
  everywhere the tests run.)
* `pause FILE`: before serving the first training batch, the process creates `FILE.ready` and
  waits until `FILE` exists (at most two minutes): a run held at a known point, for a second run
  to meet.
* `eacces PREFIX`: opening any path under `PREFIX` fails with `PermissionError(EACCES)`, what the
  kernel answers a user who may not read or write there (the tests run as root, whom permission
  bits do not stop).
"""

from __future__ import annotations

import builtins
import errno
import os
import signal
import sys
import time

from jackpots_jax.data import pipeline


def _on_batch(k: int, action) -> None:
    """Calls `action` while the training iterator serves the batch of step `k`."""
    served = 0
    original = pipeline.TrainIterator.__next__

    def next_batch(self):
        nonlocal served
        served += 1
        if served == k:
            action()
        return original(self)

    pipeline.TrainIterator.__next__ = next_batch


def _sigint(k: int) -> None:
    _on_batch(k, lambda: os.kill(os.getpid(), signal.SIGINT))


def _sigint_twice(k: int) -> None:
    def press_twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    _on_batch(k, press_twice)


def _enospc(k: int) -> None:
    import orbax.checkpoint as ocp

    handler = ocp.handlers.JsonCheckpointHandler
    original = handler._save_fn

    async def save_or_fill_the_disk(self, x, directory):
        if f"{os.sep}{k}.orbax-checkpoint-tmp" in os.fspath(directory):
            path = directory / self._filename
            path.write_text('{"partial')  # the bytes that still fitted
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return await original(self, x, directory)

    handler._save_fn = save_or_fill_the_disk


def _pause(flag: str) -> None:
    def wait():
        open(flag + ".ready", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)

    _on_batch(1, wait)


def _eacces(prefix: str) -> None:
    prefix = os.path.abspath(prefix)

    def refused(path) -> bool:
        if not isinstance(path, (str, os.PathLike)):
            return False  # a file descriptor
        path = os.path.abspath(path)
        return path == prefix or path.startswith(prefix + os.sep)

    def deny(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    original_open, original_os_open = builtins.open, os.open

    def open_(file, *args, **kwargs):
        if refused(file):
            deny(file)
        return original_open(file, *args, **kwargs)

    def os_open(path, *args, **kwargs):
        if refused(path):
            deny(path)
        return original_os_open(path, *args, **kwargs)

    builtins.open, os.open = open_, os_open


FAULTS = {"sigint": lambda a: _sigint(int(a)), "enospc": lambda a: _enospc(int(a))}
FAULTS.update(sigint2=lambda a: _sigint_twice(int(a)), pause=_pause, eacces=_eacces)


def main() -> None:
    fault, arg = sys.argv[1], sys.argv[2]
    # A command started from a terminal: Ctrl-C is not ignored there. A shell's background job
    # (`cmd &`, `nohup`) or a test runner's worker may hand SIGINT down ignored, and Python then
    # leaves it ignored, so the run would not hear the signal this driver sends.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    FAULTS[fault](arg)
    from jackpots_jax import main as cli

    cli.run([sys.argv[0], *sys.argv[3:]])


if __name__ == "__main__":
    main()
