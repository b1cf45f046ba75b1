"""jackpots_jax: lottery jackpots (sparse masks over frozen pre-trained weights) in JAX.

The library: pure functions of pytrees (`sparsity`, `masks`, `restriction`), the search engine
over any model's apply function and any loss (`step`, `adapters`, `losses`, `parallel`), models
(`models`), input pipelines (`data`) and file formats (`io`). The command line
(`jackpots_jax.experiment`) is one user of it.

Example:
  >>> import jackpots_jax as jj
  >>> budget = jj.layer_budgets(params, sparsity=0.9, rule="global_magnitude")
  >>> scores, masks = jj.init_scores(params, budget, method="magnitude")
  >>> tx = jj.search_optimizer(budget, learning_rate=0.1, total_steps=total_steps)
  >>> state = jj.create_search_state(scores, tx, batch_stats=batch_stats)
  >>> state, metrics = jj.search_step(state, params, batch, apply_fn=jj.linen_apply(model), tx=tx)

A language model: its loss per token, weighted (padding counts nowhere), called on the tokens:
  >>> state, metrics = jj.search_step(state, params, batch, apply_fn=apply_fn, tx=tx,
  ...                                 loss_fn=jj.losses.next_token(), inputs="inputs")

Structured sparsity (N:M, blocks, channels; see `jackpots_jax.patterns`): make the budget with a
pattern and use the same calls:
  >>> budget = jj.layer_budgets(params, 0.5, pattern="2:4")
"""

from jackpots_jax import losses
from jackpots_jax.adapters import linen_apply, nnx_apply
from jackpots_jax.losses import LossTerms
from jackpots_jax.masks import (
    INIT_METHODS,
    apply_masks,
    init_scores,
    mask_churn,
    mask_overlap,
    masked_weights,
    topk_masks,
)
from jackpots_jax.parallel import data_parallel, make_mesh, replicate, shard_batch
from jackpots_jax.patterns import PATTERNS, Pattern, Structured
from jackpots_jax.restriction import (
    ShortRestrictionState,
    current_masks,
    first_order_check,
    refresh_masks,
    replace_masks,
    schedules,
    short_restriction,
)
from jackpots_jax.sparsity import (
    RULES,
    budget_sizes,
    format_sparsity_table,
    layer_budgets,
    prunable_leaves,
    sparsity_report,
)
from jackpots_jax.step import (
    SearchState,
    TrainState,
    bn_stats_step,
    create_search_state,
    create_train_state,
    eval_step,
    search_optimizer,
    search_step,
    train_step,
)

__version__ = "0.1.0"

__all__ = [
    "INIT_METHODS",
    "LossTerms",
    "PATTERNS",
    "Pattern",
    "RULES",
    "SearchState",
    "ShortRestrictionState",
    "TrainState",
    "Structured",
    "apply_masks",
    "bn_stats_step",
    "budget_sizes",
    "create_search_state",
    "create_train_state",
    "current_masks",
    "data_parallel",
    "eval_step",
    "first_order_check",
    "format_sparsity_table",
    "init_scores",
    "layer_budgets",
    "linen_apply",
    "losses",
    "make_mesh",
    "mask_churn",
    "mask_overlap",
    "masked_weights",
    "nnx_apply",
    "prunable_leaves",
    "refresh_masks",
    "replace_masks",
    "replicate",
    "schedules",
    "search_optimizer",
    "search_step",
    "shard_batch",
    "short_restriction",
    "sparsity_report",
    "topk_masks",
    "train_step",
]
