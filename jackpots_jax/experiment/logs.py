"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files, and a progress bar.

`MetricsLog.write(record)` appends the record as one JSON line to `<workdir>/metrics.jsonl` and its
numbers as TensorBoard scalars to `<workdir>/tensorboard/<phase>/`, tagged `<kind>/<key>`
(`train/loss`, `eval/accuracy`, `churn/churn_per_layer/conv1/kernel`) at the record's step. Each
phase is its own TensorBoard run (`tensorboard --logdir <workdir>/tensorboard` shows `pretrain` and
`search` side by side), so when a resumed phase tells TensorBoard to forget the events past the
step it resumed from, the other phases keep theirs.

The events are encoded by tensorboardX (protocol buffers, TFRecord framing) and written
synchronously: a record is on disk (in the OS's hands) when `write` returns, so a run killed at any
moment never loses what it already logged. (tensorboardX's `SummaryWriter` queues events to a
background thread whose `flush` does not wait for that queue.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import tqdm
from absl import logging
from tensorboardX import summary as tbx_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2

from jackpots_jax.experiment.report import read_metrics
from jackpots_jax.io.files import atomic_path, jsonable

_NOT_TAGS = ("phase", "kind", "step", "epoch")


def _scalars(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a (nested) record, flattened to `prefix/key/...` tags."""
    out = {}
    for key, value in record.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_scalars(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


class _PhaseEvents:
    """One TensorBoard run: an event file of this process in `<logdir>/<phase>/`."""

    def __init__(self, directory: str, purge_from: int | None):
        os.makedirs(directory, exist_ok=True)
        # tensorboardX names the file by the second and the host; the nanoseconds make the name
        # unique (a restart within the same second would truncate the file) and keep the files in
        # the order they were written, the order TensorBoard reads them in (its purges rely on it).
        suffix = f".{time.time_ns():020d}.{os.getpid()}"
        self._writer = EventsWriter(os.path.join(directory, "events"), suffix)
        if purge_from is not None:
            # TensorBoard drops this run's events at steps >= purge_from written before it.
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._event(event_pb2.Event(step=purge_from, session_log=start))

    def _event(self, event) -> None:
        event.wall_time = time.time()
        self._writer.write_event(event)
        self._writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        summary = summary_pb2.Summary()
        for tag, value in values.items():
            summary.value.extend(tbx_summary.scalar(tag, value).value)
        self._event(event_pb2.Event(step=int(step), summary=summary))

    def close(self) -> None:
        self._writer.close()


class MetricsLog:
    """Appends metric records to `<workdir>/metrics.jsonl` and to TensorBoard (process 0 only).

    Args:
      workdir: the run's folder.
      enabled: whether this process writes (only process 0 of a multi-host run does).
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self.enabled = enabled
        self._events: dict[str, _PhaseEvents] = {}
        self._purge: dict[str, int] = {}
        self._tail_checked = False

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends `record` (a dict with `phase`, `kind`, `step`, ...) to both logs."""
        if not self.enabled:
            return
        record = jsonable(record, "record")
        if not self._tail_checked:
            self._drop_cut_tail()
            self._tail_checked = True
        # The JSON line goes first: the events of a run killed in between are a subset of it.
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        phase = record.get("phase", "run")
        scalars = _scalars({k: v for k, v in record.items() if k not in _NOT_TAGS}, "")
        if scalars:
            kind = record.get("kind", "metrics")
            tags = {f"{kind}/{tag}": value for tag, value in scalars.items()}
            self._phase(phase).scalars(record.get("step", 0), tags)

    def _drop_cut_tail(self) -> None:
        """Removes a last line without its newline (a writer killed mid-line, a full disk).

        Appending after it would join the next record to it, making one unreadable line.
        """
        try:
            with open(self.path, "rb+") as f:
                data = f.read()
                if not data or data.endswith(b"\n"):
                    return
                cut = data.rfind(b"\n") + 1
                logging.warning(
                    "%s ends with a line cut short (%d bytes, no newline): it is dropped",
                    self.path,
                    len(data) - cut,
                )
                f.truncate(cut)
        except FileNotFoundError:
            pass

    def _phase(self, phase: str) -> _PhaseEvents:
        if phase not in self._events:
            directory = os.path.join(self.tensorboard_dir, phase)
            self._events[phase] = _PhaseEvents(directory, self._purge.pop(phase, None))
        return self._events[phase]

    def drop_after(self, phase: str, step: int) -> None:
        """Forgets the records of `phase` past `step` (a run killed after its last checkpoint).

        The JSON lines of `phase` past `step` are removed (and a last line cut short by a kill);
        the phase's TensorBoard run is told to drop its events past `step` when it next writes.
        """
        if not self.enabled:
            return
        if os.path.isdir(os.path.join(self.tensorboard_dir, phase)):
            self._purge[phase] = step + 1
        if not os.path.exists(self.path):
            return
        records = read_metrics(self.path)
        keep = [r for r in records if not (r.get("phase") == phase and r.get("step", 0) > step)]
        with open(self.path, "rb") as f:
            whole = f.read().endswith(b"\n") or os.path.getsize(self.path) == 0
        if len(keep) == len(records) and whole:
            return
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def close(self) -> None:
        for events in self._events.values():
            events.close()
        self._events.clear()


class Progress:
    """A progress bar of a phase's steps on stderr (tqdm), with the loss, accuracy and speed.

    Args:
      phase: the name shown in front of the bar.
      total: the phase's number of steps.
      start: the step it starts from (after a resume).
      enabled: whether this process shows it (process 0 only).
    """

    def __init__(self, phase: str, total: int, start: int = 0, enabled: bool = True):
        self._bar = tqdm.tqdm(
            total=total,
            initial=start,
            desc=f"{phase:>8}",
            unit="step",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def update(
        self, step: int, loss: float, accuracy: float, per_second: float, unit: str = "img/s"
    ) -> None:
        """Moves the bar to `step` and shows the window's loss, accuracy and speed (`unit`)."""
        self._bar.set_postfix_str(
            f"loss {loss:.4f} acc {100 * accuracy:.2f}% {per_second:,.0f} {unit}", refresh=False
        )
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
