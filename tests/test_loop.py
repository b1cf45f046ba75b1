"""The training loop: where hooks are called, checkpoints, resumption, a non-finite loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpots_jax.experiment.loop import Hook, NonFiniteLossError, train_loop
from jackpots_jax.io.checkpoints import Checkpointer


class Counter:
    """Batches 0, 1, 2, ... with a saved position."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return np.float32(self.i - 1)

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


class Record(Hook):
    def __init__(self):
        self.calls, self.total = [], 0.0

    def start(self, step):
        self.calls.append(("start", step))

    def log(self, step, sums, num_steps, seconds):
        self.calls.append(("log", step, float(sums["loss"]), num_steps))
        self.total += float(sums["loss"])

    def end_of_epoch(self, step, epoch, state):
        self.calls.append(("epoch", step, epoch, float(state["sum"])))

    def end(self, step):
        self.calls.append(("end", step))

    def get_state(self):
        return self.total

    def set_state(self, state):
        self.total = state


@jax.jit
def step_fn(state, batch):
    new = {"step": state["step"] + 1, "sum": state["sum"] + batch}
    return new, {"loss": batch * 1.0}


def fresh():
    return {"step": jnp.int32(0), "sum": jnp.float32(0)}


def run(ckpt, total_steps=7, hooks=(), batches=None):
    return train_loop(
        fresh(),
        step_fn,
        batches or Counter(),
        total_steps=total_steps,
        steps_per_epoch=3,
        checkpointer=ckpt,
        log_every_steps=2,
        hooks=hooks,
        step_of=lambda s: int(s["step"]),
    )


def test_hooks_see_windows_epochs_and_the_end(tmp_path):
    record = Record()
    with Checkpointer(tmp_path, identity={}, save_every_steps=5) as ckpt:
        state = run(ckpt, hooks=[record])
        assert ckpt.all_steps() == [5, 7]  # the cadence and the last step
    assert int(state["step"]) == 7 and float(state["sum"]) == sum(range(7))
    # Logs every 2 steps, at each epoch end (3, 6, 7) and at each save (5): window sums.
    assert record.calls == [
        ("start", 0),
        ("log", 2, 0 + 1, 2),
        ("log", 3, 2, 1),
        ("epoch", 3, 1, 3),
        ("log", 4, 3, 1),
        ("log", 5, 4, 1),
        ("log", 6, 5, 1),
        ("epoch", 6, 2, 15),
        ("log", 7, 6, 1),
        ("epoch", 7, 3, 21),
        ("end", 7),
    ]


def test_a_resumed_run_continues_the_batches_and_the_hooks_state(tmp_path):
    with Checkpointer(tmp_path / "a", identity={}, save_every_steps=5) as ckpt:
        run(ckpt, total_steps=5, hooks=[Record()])  # stops after its step-5 checkpoint
    resumed = Record()
    with Checkpointer(tmp_path / "a", identity={}, save_every_steps=5) as ckpt:
        state = run(ckpt, total_steps=7, hooks=[resumed])
    straight = Record()
    with Checkpointer(tmp_path / "b", identity={}, save_every_steps=5) as ckpt:
        want = run(ckpt, total_steps=7, hooks=[straight])
    assert resumed.calls[0] == ("start", 5)
    assert float(state["sum"]) == float(want["sum"]) and resumed.total == straight.total


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    class Poisoned(Counter):
        def __next__(self):
            value = super().__next__()
            return np.float32(np.nan) if value == 4 else value

    with Checkpointer(tmp_path, identity={}, save_every_steps=2) as ckpt:
        with pytest.raises(NonFiniteLossError, match="the loss became nan before step 6"):
            run(ckpt, batches=Poisoned())
        assert ckpt.all_steps() == [2, 4]
