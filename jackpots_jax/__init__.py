"""jackpots_jax: lottery jackpots (sparse masks over frozen pre-trained weights) in JAX.

Example:
  >>> import jackpots_jax as jj
  >>> budget = jj.layer_budgets(params, sparsity=0.9, rule="global_magnitude")
  >>> scores, masks = jj.init_scores(params, budget, method="magnitude")
  >>> tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9),
  ...                  jj.short_restriction(budget, rate=jj.schedules.cosine(total_steps)))

Structured sparsity (N:M, blocks, channels; see `jackpots_jax.patterns`): make the budget with a
pattern and use the same calls:
  >>> budget = jj.layer_budgets(params, 0.5, pattern="2:4")
"""

from jackpots_jax.masks import (
    INIT_METHODS,
    apply_masks,
    init_scores,
    mask_churn,
    mask_overlap,
    masked_weights,
    ordered_keys,
    select_top,
    topk_masks,
)
from jackpots_jax.patterns import PATTERNS, Pattern, Structured
from jackpots_jax.restriction import (
    ShortRestrictionState,
    current_masks,
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

__version__ = "0.1.0"

__all__ = [
    "INIT_METHODS",
    "PATTERNS",
    "Pattern",
    "RULES",
    "ShortRestrictionState",
    "Structured",
    "apply_masks",
    "budget_sizes",
    "current_masks",
    "format_sparsity_table",
    "init_scores",
    "layer_budgets",
    "mask_churn",
    "mask_overlap",
    "masked_weights",
    "ordered_keys",
    "prunable_leaves",
    "refresh_masks",
    "replace_masks",
    "schedules",
    "select_top",
    "short_restriction",
    "sparsity_report",
    "topk_masks",
]
