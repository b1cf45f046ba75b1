"""The search engine: the state of a search or a training run, its steps, and model adapters.

Every step is a pure, per-device function of pytrees over an apply function
(`apply_fn(params, batch_stats, inputs, train) -> (outputs, new_batch_stats)`, which
`linen_apply(module)` and `nnx_apply(graphdef)` make from Flax models) and a loss function
(`jackpots_jax.losses`; classification by default). Run the steps under
`jax.jit` on one device, or over a mesh with `jackpots_jax.parallel`.

Example:
  >>> from jackpots_jax import engine
  >>> tx = engine.search_optimizer(budget, learning_rate=0.1, total_steps=1000)
  >>> state = engine.create_search_state(scores, tx, batch_stats=batch_stats)
  >>> step = jax.jit(functools.partial(engine.search_step, apply_fn=engine.linen_apply(model),
  ...                                  tx=tx))
  >>> state, metrics = step(state, params, batch)
"""

from jackpots_jax.adapters import linen_apply, nnx_apply
from jackpots_jax.losses import LossTerms
from jackpots_jax.restriction import search_optimizer
from jackpots_jax.step import (
    SearchState,
    TrainState,
    bn_stats_step,
    create_search_state,
    create_train_state,
    eval_step,
    search_step,
    train_step,
)

__all__ = [
    "LossTerms",
    "SearchState",
    "TrainState",
    "bn_stats_step",
    "create_search_state",
    "create_train_state",
    "eval_step",
    "linen_apply",
    "nnx_apply",
    "search_optimizer",
    "search_step",
    "train_step",
]
