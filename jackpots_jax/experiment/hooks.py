"""What the phases add along the training loop: metric records, progress, churn, evaluation, and
the check that a resumed phase runs the schedule it started with."""

from __future__ import annotations

from typing import Any

import numpy as np
import optax
from absl import logging

from jackpots_jax.experiment.config import ConfigError
from jackpots_jax.experiment.logs import MetricsLog, Progress
from jackpots_jax.experiment.loop import Hook
from jackpots_jax.io.errors import ABSENT
from jackpots_jax.io.files import json_round_trip

PyTree = Any


# What a training example is made of, and how the progress bar abbreviates it per second.
UNITS = {"images": "img/s", "tokens": "tok/s"}


class TrainLog(Hook):
    """A `train` metrics record and a progress update at every logging point of the loop.

    The record's speed is `images_per_s` (an image batch) or `tokens_per_s` (`unit="tokens"`,
    `per_example` the tokens of one window of a language model's batch).

    On start it drops the phase's records past the step the loop starts from (a run resumed from
    its checkpoint, or restarted from scratch, logs those steps again).
    """

    def __init__(
        self,
        log: MetricsLog,
        phase: str,
        *,
        total_steps: int,
        steps_per_epoch: int,
        batch_size: int,
        learning_rate: optax.Schedule,
        show_progress: bool,
        unit: str = "images",
        per_example: int = 1,
    ):
        if unit not in UNITS:
            raise ValueError(f"unknown `unit` {unit!r}; allowed: {', '.join(UNITS)}")
        self.unit, self.per_example = unit, int(per_example)
        self.metrics_log, self.phase = log, phase
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.batch_size, self.learning_rate = batch_size, learning_rate
        self.show_progress = show_progress
        self.progress: Progress | None = None

    def start(self, step: int) -> None:
        self.metrics_log.drop_after(self.phase, step)
        self.progress = Progress(self.phase, self.total_steps, step, self.show_progress)

    def log(self, step, sums, num_steps, seconds) -> None:
        examples = num_steps * self.batch_size
        record = {
            "phase": self.phase,
            "kind": "train",
            "step": step,
            "epoch": step / self.steps_per_epoch,
            "loss": float(sums["loss"]) / num_steps,
            "accuracy": float(sums["accuracy"]) / num_steps,
            "learning_rate": float(self.learning_rate(step - 1)),
            f"{self.unit}_per_s": examples * self.per_example / max(seconds, 1e-9),
        }
        if "churn" in sums:
            record["churn"] = int(sums["churn"])
        for name, value in sums.items():  # the loss function's other metrics, e.g. `nll`
            if name not in record and name != "churn_per_layer" and np.ndim(value) == 0:
                record[name] = float(value) / num_steps
        self.metrics_log.write(record)
        self.progress.update(
            step, record["loss"], record["accuracy"], record[f"{self.unit}_per_s"], UNITS[self.unit]
        )

    def end(self, step: int) -> None:
        if self.progress is not None:
            self.progress.close()


class ChurnPerEpoch(Hook):
    """Mask entries flipped per layer, summed over each search epoch: a `churn` record per epoch.

    Args:
      log: where the records go.
      phase: the phase name of the records.
      kept: the weights the masks keep (the churn table reports churn as a share of it).
    """

    def __init__(self, log: MetricsLog, phase: str, kept: int):
        self.metrics_log, self.phase, self.kept = log, phase, kept
        self.epoch_churn: dict[str, int] = {}

    def log(self, step, sums, num_steps, seconds) -> None:
        for name, n in sums["churn_per_layer"].items():
            self.epoch_churn[name] = self.epoch_churn.get(name, 0) + int(n)

    def end_of_epoch(self, step: int, epoch: int, state: PyTree) -> None:
        if self.epoch_churn:
            self.metrics_log.write(
                {
                    "phase": self.phase,
                    "kind": "churn",
                    "step": step,
                    "epoch": epoch,
                    "churn": sum(self.epoch_churn.values()),
                    "churn_per_layer": self.epoch_churn,
                    "kept": self.kept,
                }
            )
            self.epoch_churn = {}

    def get_state(self) -> dict[str, int]:
        return dict(self.epoch_churn)

    def set_state(self, state: dict[str, int] | None) -> None:
        self.epoch_churn = dict(state or {})


class EvaluateEveryEpochs(Hook):
    """Evaluates the state every `every` epochs and after the last step: an `eval` record.

    With `every_steps`, also after every `every_steps`-th step (a curve within an epoch; once per
    step when both fall on it). Its records are written after that step's checkpoint: a run
    killed between the two lacks that one record after resuming.
    """

    def __init__(
        self,
        log: MetricsLog,
        phase: str,
        every: int,
        total_steps: int,
        evaluate_fn,
        every_steps: int = 0,
    ):
        self.metrics_log, self.phase, self.every = log, phase, every
        self.total_steps, self.evaluate_fn = total_steps, evaluate_fn
        self.every_steps, self.evaluated_at = every_steps, None

    def end_of_epoch(self, step: int, epoch: int, state: PyTree) -> None:
        if not self.every or (epoch % self.every and step != self.total_steps):
            return
        self._evaluate(step, epoch, state)

    def after_step(self, step: int, state: PyTree) -> None:
        if self.every_steps and step % self.every_steps == 0 and self.evaluated_at != step:
            self._evaluate(step, None, state)

    def _evaluate(self, step: int, epoch: int | None, state: PyTree) -> None:
        result = self.evaluate_fn(state)
        record = {"phase": self.phase, "kind": "eval", "step": step}
        if epoch is not None:
            record["epoch"] = epoch
        self.metrics_log.write({**record, **result})
        self.evaluated_at = step
        where = f"epoch {epoch}" if epoch is not None else f"step {step}"
        if "perplexity" in result:
            logging.info("%s %s: perplexity %.4g", self.phase, where, result["perplexity"])
        else:
            logging.info("%s %s: test accuracy %.2f%%", self.phase, where, 100 * result["accuracy"])


class ScheduleGuard(Hook):
    """Refuses to resume a phase under another schedule than the one its checkpoint was made with.

    Its state, saved with every checkpoint, is the phase's schedule: the config fields that decide
    its steps, learning rates and batches (`search.epochs`, `search.learning_rate`,
    `search.batch_size`, `seed`, ...). A resumed run whose fields differ stops before its first
    step with a `ConfigError` naming each one, unless `allow_change`
    (`checkpoint.allow_schedule_change`): then it says which changed and continues under the new
    schedule.

    Args:
      schedule: `{config field: value}`, JSON-able.
      allow_change: continue under a changed schedule instead of refusing.
    """

    def __init__(self, schedule: dict[str, Any], allow_change: bool):
        self.schedule = json_round_trip(schedule, "schedule")
        self.allow_change = allow_change

    def get_state(self) -> dict[str, Any]:
        return dict(self.schedule)

    def set_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        changed = [
            (field, state.get(field, ABSENT), self.schedule.get(field, ABSENT))
            for field in sorted(set(state) | set(self.schedule))
            if state.get(field, ABSENT) != self.schedule.get(field, ABSENT)
        ]
        if not changed:
            return
        listing = "; ".join(f"`{f}` was {old!r}, now {new!r}" for f, old, new in changed)
        if self.allow_change:
            logging.warning("resuming under a changed schedule: %s", listing)
            return
        raise ConfigError(
            f"the checkpoint this run resumes from was made with another schedule: {listing}. "
            "Resume with the same values, set `--config.checkpoint.allow_schedule_change=True` "
            "to continue under the new schedule, or use another --workdir to start afresh"
        )
