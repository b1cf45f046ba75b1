"""The work directory of a run: writable before any compute, and used by one run at a time.

`claim(workdir)` is entered by `experiment.modes.train_and_evaluate` before the dataset is prepared
or anything is computed. It

1. makes sure the work directory is a folder this process may write (creating it if missing), and
   so is every folder of it a run writes into that already exists (`FOLDERS`): a read-only
   `export/` is found before the search, not after it;
2. takes an exclusive lock on `<workdir>/.lock` (`fcntl.flock`) for as long as the run lasts, and
   writes into that file who holds it (process id, host, start time, command). A second run on the
   same work directory is refused with a message naming the first. The kernel releases the lock
   when the process ends in any way, SIGKILL included, so a killed run never leaves a stale lock
   behind (the file stays, with the last holder's details; it means nothing while unlocked).

On several hosts only process 0 takes the lock (the others are part of the same run). `flock` on
NFS is emulated with byte-range locks by Linux (2.6.12+), so it holds across machines there too.

Example:
  >>> with claim("/tmp/run"):
  ...   train_and_evaluate_inside(...)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator

LOCK = ".lock"
# The folders of a work directory a run writes into (relative paths; the work directory itself
# too): each that exists must be a writable folder before a run starts.
FOLDERS = (
    "plots",
    "tensorboard",
    "tensorboard/pretrain",
    "tensorboard/search",
    "pretrain",
    "pretrain/checkpoints",
    "search",
    "search/checkpoints",
    "export",
)
APPENDED = ("metrics.jsonl",)  # files a run appends to (the others are replaced whole)


class WorkdirError(RuntimeError):
    """The work directory cannot be used: a folder is not writable, or another run holds it."""


def check_writable(directory: str, what: str) -> None:
    """Raises `WorkdirError` unless `directory` is a folder this process can create files in.

    The test is a real one (a file created and removed): permission bits say nothing to root, and
    nothing about a read-only file system.
    """
    if not os.path.isdir(directory):
        kind = (
            "a file is in its place"
            if os.path.exists(directory)
            else "a broken link is in its place"
        )
        raise WorkdirError(
            f"{what} ({directory}) is not a folder ({kind}): move what is there away, or use "
            "another --workdir"
        )
    # Named by host and process: the hosts of one run may share the folder.
    probe = os.path.join(directory, f".write-test.{socket.gethostname()}.{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"{what} ({directory}) is not writable ({e.strerror}): make it writable, or use "
            "another --workdir"
        ) from None


def _create(workdir: str) -> None:
    if os.path.lexists(workdir):
        return  # what is there is checked next
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f"the work directory {workdir} cannot be created ({e.strerror}): choose another "
            "--workdir"
        ) from None


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        info = json.loads(text)
        return (
            f"process {info['pid']} on host {info['host']}, started {info['started']}: "
            f"{info['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


def _lock(workdir: str) -> int:
    path = os.path.join(workdir, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise WorkdirError(f"cannot open the lock file {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirError(
            f"the work directory {workdir} is in use by another run ({holder}); two runs in one "
            "work directory would mix their checkpoints and metrics: wait for it to end, stop "
            "it, or use another --workdir"
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


@contextlib.contextmanager
def claim(workdir: str, *, lock: bool = True) -> Iterator[str]:
    """Checks that the run can write where it will, and holds the work directory's lock.

    Args:
      workdir: the run's folder (created if missing).
      lock: take the lock (process 0 of a run does; the other hosts of it do not).

    Yields:
      `workdir` as an absolute path.

    Raises:
      WorkdirError: `workdir` is empty, a folder (or `metrics.jsonl`) is not writable, or another
        run holds the lock.
    """
    if not os.fspath(workdir).strip():
        # abspath('') is the current folder: the run would scatter its files there.
        raise WorkdirError(
            f"--workdir is {os.fspath(workdir)!r}; allowed: the path of a folder for this run's "
            "files (created if missing), e.g. --workdir workdir/run1"
        )
    workdir = os.path.abspath(os.fspath(workdir))
    _create(workdir)
    check_writable(workdir, "the work directory")
    fd = _lock(workdir) if lock else None
    try:
        for folder in FOLDERS:
            path = os.path.join(workdir, folder)
            if os.path.lexists(path):
                check_writable(path, f"the folder `{folder}` of the work directory")
        for name in APPENDED:
            path = os.path.join(workdir, name)
            if os.path.lexists(path):
                try:
                    open(path, "a").close()
                except OSError as e:
                    raise WorkdirError(
                        f"{path} cannot be appended to ({e.strerror}): make it writable, or use "
                        "another --workdir"
                    ) from None
        yield workdir
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
