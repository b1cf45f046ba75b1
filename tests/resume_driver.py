"""A tiny search through the runner's training loop, checkpointing as it goes; resumes on start.

Run by `tests/test_checkpoints.py`, which kills it with SIGKILL, restarts it, and compares its final
state with that of a run that was never stopped. Batch `i` is derived from the seed and `i` alone,
so a resumed run sees the same batches as an uninterrupted one. The loop is the one every mode of
the command line runs (`experiment.loop.train_loop`), with its checkpointer.

Usage:
  python tests/resume_driver.py WORKDIR OUT.npz [--steps 12] [--save-every 2] [--delay 0.05]

Prints `resumed <step>` after a restore, `step <k> done` once step `k` and its checkpoint (when
due) are done, and `finished` once `OUT.npz` (every state leaf by its path, and the loss history)
is written.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from test_step import TinyNet

import jackpots_jax as jj
from jackpots_jax._tree import named_leaves
from jackpots_jax.experiment.loop import Hook, train_loop
from jackpots_jax.io.checkpoints import Checkpointer, fingerprint
from jackpots_jax.restriction import search_optimizer
from jackpots_jax.step import create_search_state, linen_apply, search_step


def build_search(steps: int, seed: int = 0):
    """A TinyNet search (70% uniform budget, cosine rate): `(apply_fn, params, budget, tx, state)`.

    The numbers come from numpy: compiling Flax's random initialisers takes seconds on a busy CPU.
    The state's PRNG key is a typed key, to check that one survives a checkpoint too.
    """
    model = TinyNet(bn=True)
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct((1, 8, 8, 2), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    params = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(a.dtype), abstract["params"])
    stats = jax.tree.map(
        lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), abstract["batch_stats"]
    )
    budget = jj.layer_budgets(params, 0.7, "uniform")
    scores = jax.tree.map(
        lambda b, p: None if b is None else rng.normal(0, 1, p.shape).astype(np.float32),
        budget,
        params,
        is_leaf=lambda x: x is None,
    )
    tx = search_optimizer(
        budget, learning_rate=0.1, total_steps=steps, rate=jj.schedules.cosine(steps)
    )
    create = jax.jit(
        lambda s, sc: create_search_state(sc, tx, batch_stats=s, rng=jax.random.key(seed))
    )
    return linen_apply(model), params, budget, tx, create(stats, scores)


def batch(seed: int, i: int, size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, i])
    return {
        "image": rng.standard_normal((size, 8, 8, 2)).astype(np.float32),
        "label": rng.integers(0, 5, size).astype(np.int32),
    }


class Batches:
    """Batch `i` from the seed and `i` alone; its position is saved with every checkpoint."""

    def __init__(self, seed: int):
        self.seed, self.next_index = seed, 0

    def __next__(self):
        self.next_index += 1
        return batch(self.seed, self.next_index - 1)

    def get_state(self) -> dict:
        return {"next_index": self.next_index}

    def set_state(self, state: dict) -> None:
        self.next_index = state["next_index"]


class Losses(Hook):
    """Every step's loss (logged at every step), carried through checkpoints; progress lines."""

    def __init__(self, batches: Batches, delay: float):
        self.batches, self.delay, self.losses = batches, delay, []

    def start(self, step: int) -> None:
        assert self.batches.next_index == step == len(self.losses), (step, self.losses)
        if step:
            print(f"resumed {step}", flush=True)

    def log(self, step, sums, num_steps, seconds) -> None:
        assert num_steps == 1
        self.losses.append(float(sums["loss"]))

    def after_step(self, step, state) -> None:
        print(f"step {step} done", flush=True)  # its checkpoint, when due, is written
        time.sleep(self.delay)

    def get_state(self):
        return list(self.losses)

    def set_state(self, state) -> None:
        self.losses = list(state)


def leaves_by_path(state) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    apply_fn, params, budget, tx, state = build_search(args.steps, args.seed)
    identity = {
        "kind": "search",
        "model": "TinyNet",
        "budget": {name: int(b) for name, b in named_leaves(budget) if b is not None},
        "steps": args.steps,
    }
    step = jax.jit(partial(search_step, apply_fn=apply_fn, tx=tx), donate_argnums=0)
    batches = Batches(args.seed)
    losses = Losses(batches, args.delay)
    with Checkpointer(
        args.workdir,
        identity=identity,
        save_every_steps=args.save_every,
        keep=2,
        fingerprint=fingerprint(params),
    ) as ckpt:
        state = train_loop(
            state,
            lambda state, batch: step(state, params, batch),
            batches,
            total_steps=args.steps,
            steps_per_epoch=args.steps,
            checkpointer=ckpt,
            log_every_steps=1,
            hooks=[losses],
        )

    arrays = leaves_by_path(state)
    arrays["losses"] = np.asarray(losses.losses, np.float64)
    with open(args.out + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(args.out + ".tmp", args.out)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
