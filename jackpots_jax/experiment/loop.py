"""The one training loop: step a state through batches, checkpoint, and call hooks.

Every mode that trains (dense pre-training, the jackpot search) and the resume tests run
`train_loop`. It knows nothing about models, devices or metrics files; what a phase adds (metric
records, the progress bar, mask churn per epoch, evaluation) comes in as hooks.

    restore   the newest checkpoint: the state, the batches' position, every hook's state
    loop      state, metrics = step_fn(state, next(batches)); metrics summed over a window
    log       every `log_every_steps`, at the end of each epoch and at each checkpoint: the
              window's sums go to the hooks (a non-finite loss stops the run first)
    epoch     at the end of each epoch: the hooks (evaluation, per-epoch statistics)
    save      every `checkpointer.save_every_steps`, at the last step, and when Ctrl-C asked to stop
    after     the hooks, once the step is done

Ctrl-C (SIGINT) during the loop asks it to stop after the step it is in: that step is logged and
checkpointed like a last one, and `Interrupted` (a `KeyboardInterrupt`) is raised. The run then
resumes from exactly there, and ends as if it had never stopped. A second Ctrl-C stops at once (the
usual `KeyboardInterrupt`; the run resumes from its newest checkpoint). SIGTERM (what Slurm,
Kubernetes and `timeout` send before SIGKILL) does the same once the command line has installed
`raise_terminated` as its handler: the loop stops after the step, a second one (or one outside the
loop) raises `Terminated`.

Example:
  >>> step_fn = lambda state, batch: run(state, params, shard(batch))
  >>> state = train_loop(state, step_fn, batches, total_steps=1000, steps_per_epoch=100,
  ...                    checkpointer=ckpt, log_every_steps=50, hooks=[TrainLog(log, "search")])
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from absl import logging

from jackpots_jax.io.checkpoints import Checkpointer
from jackpots_jax.io.errors import CheckpointMismatchError

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived outside the loop, or a second time in it: the run stops at once."""


def raise_terminated(signum, frame) -> None:
    """A SIGTERM handler (the command line's) that stops the program as Ctrl-C does."""
    del signum, frame
    raise Terminated()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the loop between two steps; the step it stopped at is saved.

    Attributes:
      step: the last step done.
      total_steps: the step count the loop was to reach.
      directory: the checkpoint folder (`None` for a loop without a checkpointer).
      signum: the signal that asked to stop (`signal.SIGINT` for Ctrl-C, or `signal.SIGTERM`).
    """

    def __init__(
        self, step: int, total_steps: int, directory: str | None, signum: int = signal.SIGINT
    ):
        self.step, self.total_steps, self.directory = step, total_steps, directory
        self.signum = signum
        saved = (
            f"its checkpoint is saved in {directory}"
            if directory is not None
            else "nothing was saved (no checkpointer)"
        )
        super().__init__(f"stopped by {_NAMES[signum]} after step {step} of {total_steps}; {saved}")


_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
# Per signal, the handler that stops at once: only while it is installed does the loop take over.
_AT_ONCE = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: raise_terminated}


class _StopRequests:
    """From creation to `close()`: the first SIGINT or SIGTERM only asks the loop to stop.

    `self()` is then true, and `signum` says which signal asked. A signal is left alone when this
    is not the main thread, or when its handler is not the one that stops at once (SIGINT's
    default; SIGTERM's `raise_terminated`, which the command line installs): then that handler
    decides.
    """

    def __init__(self):
        self.requested, self.signum = False, None
        main_thread = threading.current_thread() is threading.main_thread()
        self.installed = [
            s for s, handler in _AT_ONCE.items() if main_thread and signal.getsignal(s) is handler
        ]
        for s in self.installed:
            signal.signal(s, self._ask_to_stop)

    def _ask_to_stop(self, signum, frame) -> None:
        self.requested, self.signum = True, signum
        signal.signal(signum, _AT_ONCE[signum])  # the next one stops at once
        name = _NAMES[signum]
        print(
            f"\n{name}: stopping after this step, once it is saved ({name} again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __call__(self) -> bool:
        return self.requested

    def close(self) -> None:
        for s in self.installed:
            signal.signal(s, _AT_ONCE[s])


class Batches(Protocol):
    """An iterator of batches whose position can be saved and restored (`data.TrainIterator`)."""

    def __next__(self) -> Any: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class Hook:
    """Something a phase does along the loop; override what it needs.

    `get_state` / `set_state` carry the hook's own JSON state through checkpoints (e.g. counts
    accumulated over an epoch), so a resumed run continues exactly where it stopped.
    """

    def start(self, step: int) -> None:
        """Called once before the first step; `step` is where the run starts (0 or resumed)."""

    def log(self, step: int, sums: dict[str, Any], num_steps: int, seconds: float) -> None:
        """The step metrics summed (on the host) over the `num_steps` steps up to `step`."""

    def end_of_epoch(self, step: int, epoch: int, state: PyTree) -> None:
        """Called after the last step of every epoch (and after the last step of the run)."""

    def after_step(self, step: int, state: PyTree) -> None:
        """Called at the end of every step, after its log, epoch end and checkpoint."""

    def end(self, step: int) -> None:
        """Called once after the loop (also when it ends with an error)."""

    def get_state(self) -> Any:
        return None

    def set_state(self, state: Any) -> None:
        del state


@jax.jit
def _accumulate(total: PyTree, new: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, total, new)


def train_loop(
    state: PyTree,
    step_fn: Callable[[PyTree, Any], tuple[PyTree, dict[str, Any]]],
    batches: Batches | Iterator,
    *,
    total_steps: int,
    steps_per_epoch: int,
    checkpointer: Checkpointer | None = None,
    log_every_steps: int,
    hooks: Sequence[Hook] = (),
    step_of: Callable[[PyTree], int] = lambda state: int(jax.device_get(state.step)),
) -> PyTree:
    """Runs `step_fn` from the state's step (or the newest checkpoint's) up to `total_steps`.

    Args:
      state: the initial state; also the restore target (structure, shapes, dtypes, shardings).
        It may be donated by `step_fn`: use the returned state.
      step_fn: `(state, batch) -> (state, metrics)`; metrics hold at least `loss` (a mean over
        the batch); all of them are summed over the logging window.
      batches: the training batches; with a `checkpointer`, an iterator with `get_state` /
        `set_state` (its position is saved with every checkpoint).
      total_steps: the step count to reach.
      steps_per_epoch: steps per epoch (epochs end at multiples of it, and at `total_steps`).
      checkpointer: saves every `save_every_steps` and at the last step, and restores the newest
        checkpoint on start; `None` runs without.
      log_every_steps: how often the hooks see the metrics (and at each epoch end and save).
      hooks: called in order at every point (see `Hook`).
      step_of: the step count held in a state.

    Returns:
      The final state.

    Raises:
      NonFiniteLossError: the mean loss of a logging window is NaN or infinite; the newest
        checkpoint is from before it.
      Interrupted: Ctrl-C asked the loop to stop; the step it stopped after is checkpointed.
    """
    restored = checkpointer.restore(state) if checkpointer is not None else None
    if restored is not None:
        state, extra, saved_step = restored
        hook_states = extra.get("hooks", [None] * len(hooks))
        if len(hook_states) != len(hooks):
            raise CheckpointMismatchError(
                f"checkpoint of step {saved_step} in {checkpointer.directory} holds the state of "
                f"{len(hook_states)} hook(s), this run has {len(hooks)}: it was written by another "
                "version of the program; use another directory, or delete it to start afresh"
            )
        batches.set_state(extra["data"])
        for hook, hook_state in zip(hooks, hook_states, strict=True):
            hook.set_state(hook_state)
    step = step_of(state)
    if restored is not None:
        logging.info("resumed from step %d in %s", step, checkpointer.directory)
    for hook in hooks:
        hook.start(step)
    window, window_steps, window_start = None, 0, time.perf_counter()
    stop_requested = _StopRequests()
    try:
        while step < total_steps:
            state, metrics = step_fn(state, next(batches))
            step += 1
            stopping = stop_requested() and step < total_steps
            window = metrics if window is None else _accumulate(window, metrics)
            window_steps += 1
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            last = step == total_steps or stopping
            save = checkpointer is not None and (checkpointer.should_save(step) or last)
            if step % log_every_steps == 0 or end_of_epoch or save or stopping:
                sums = jax.device_get(window)
                loss = float(sums["loss"]) / window_steps
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"the loss became {loss} before step {step}; stopped"
                        f"{_kept(checkpointer)}. Lower the learning rate?"
                    )
                seconds = time.perf_counter() - window_start
                for hook in hooks:
                    hook.log(step, sums, window_steps, seconds)
                window, window_steps, window_start = None, 0, time.perf_counter()
            if end_of_epoch:
                for hook in hooks:
                    hook.end_of_epoch(step, math.ceil(step / steps_per_epoch), state)
            if save:
                extra = {"data": batches.get_state(), "hooks": [h.get_state() for h in hooks]}
                checkpointer.save(step, state, extra, force=last)
            for hook in hooks:
                hook.after_step(step, state)
            if stopping:
                directory = None if checkpointer is None else str(checkpointer.directory)
                raise Interrupted(step, total_steps, directory, stop_requested.signum)
    finally:
        stop_requested.close()
        for hook in hooks:
            hook.end(step)
    return state


def _kept(checkpointer: Checkpointer | None) -> str:
    """What a run stopped by an error leaves to resume from, for its message."""
    if checkpointer is None:
        return ""
    newest = checkpointer.latest_step()
    if newest is None:
        return f" (no checkpoint was written yet in {checkpointer.directory})"
    return f" (the last good checkpoint, step {newest} in {checkpointer.directory}, is intact)"
