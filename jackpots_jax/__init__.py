"""jackpots_jax: lottery jackpots (sparse masks over frozen pre-trained weights) in JAX.

In tiers, as optax is: the top level holds what a search needs, pure functions of pytrees
(budgets, scores and masks, the short restriction and the paper's optimiser, reports);
`jj.engine` holds the state of a search, its steps over any loss and the Linen / NNX adapters;
`jj.losses` the loss functions the steps take; `jj.parallel` the meshes and the placement of
(sharded) state for a loop of your own; `jj.schedules` the restriction's rate schedules;
`jj.baselines` the one-shot masks (magnitude, Wanda, SparseGPT). Models
(`jackpots_jax.models`), input pipelines (`.data`) and files (`.io`) are imported by name. The
command line (`jackpots_jax.experiment`) is one user of the library.

Example:
  >>> import jackpots_jax as jj
  >>> budget = jj.layer_budgets(params, sparsity=0.9, rule="global_magnitude")
  >>> scores, masks = jj.init_scores(params, budget, method="magnitude")
  >>> tx = jj.search_optimizer(budget, learning_rate=0.1, total_steps=total_steps)
  >>> state = jj.engine.create_search_state(scores, tx, batch_stats=batch_stats)
  >>> step = jj.parallel.fsdp_step(jj.engine.search_step, mesh=jj.parallel.make_mesh(fsdp=2),
  ...                              apply_fn=jj.engine.linen_apply(model), tx=tx)
  >>> state, metrics = step(state, params, batch)

A language model: its loss per token, weighted (padding counts nowhere), called on the tokens:
  >>> state, metrics = jj.engine.search_step(state, params, batch, apply_fn=apply_fn, tx=tx,
  ...                                        loss_fn=jj.losses.next_token(), inputs="inputs")

Structured sparsity (N:M, blocks, channels; see `jackpots_jax.patterns`): make the budget with a
pattern and use the same calls:
  >>> budget = jj.layer_budgets(params, 0.5, pattern="2:4")

One-shot baselines at the same budgets (`jj.baselines`): magnitude, Wanda, SparseGPT:
  >>> stats = jj.baselines.update_stats(jj.baselines.init_stats({path: fan_in}), {path: inputs})
  >>> masks, weights = jj.baselines.sparsegpt_masks(params, budget, stats)
"""

from jackpots_jax import baselines, engine, losses, parallel
from jackpots_jax.masks import (
    INIT_METHODS,
    apply_masks,
    init_scores,
    mask_churn,
    mask_overlap,
    masked_weights,
    scores_from_masks,
    topk_masks,
)
from jackpots_jax.patterns import PATTERNS, Pattern, Structured
from jackpots_jax.restriction import (
    ShortRestrictionState,
    abs_rank_gradients,
    current_masks,
    first_order_check,
    refresh_masks,
    replace_masks,
    schedules,
    search_optimizer,
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

__version__ = "0.1.0"

__all__ = [
    "INIT_METHODS",
    "PATTERNS",
    "Pattern",
    "RULES",
    "ShortRestrictionState",
    "Structured",
    "abs_rank_gradients",
    "apply_masks",
    "baselines",
    "budget_sizes",
    "current_masks",
    "engine",
    "first_order_check",
    "format_sparsity_table",
    "init_scores",
    "layer_budgets",
    "losses",
    "mask_churn",
    "mask_overlap",
    "masked_weights",
    "parallel",
    "prunable_leaves",
    "refresh_masks",
    "replace_masks",
    "schedules",
    "scores_from_masks",
    "search_optimizer",
    "short_restriction",
    "sparsity_report",
    "topk_masks",
]
