"""Short restriction: an optax transformation that owns the binary masks and rations their swaps.

After every update the masks are refreshed per layer (ALGORITHM.md section 6.3). The exact top-k of
the new scores proposes `c` revivals (pruned entries that now rank inside the layer's top
`n_l - p_l`) and as many removals (kept entries that now rank outside it). Only `ceil(r_t c)` swaps
are made: the highest-scored revivals come in, the lowest-scored removals go out, so every layer
keeps exactly `n_l - p_l` weights. With `r_t = 1` the refresh is exactly
`topk_masks(new_scores, budget, current=old_masks)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jackpots_jax._tree import PyTree, map_budget, map_budget_with_path
from jackpots_jax.masks import (
    RANK_BY,
    _check_count,
    decide_in_bracket,
    kept_bounds,
    kth_key,
    ordered_keys,
    rank_values,
    select_at,
    topk_masks,
)

Schedule = Callable[[jax.Array], jax.Array]


class ShortRestrictionState(NamedTuple):
    """State of `short_restriction`: the step count and the current binary masks."""

    count: jax.Array
    masks: PyTree


# ---------------------------------------------------------------------------------------------
# Rate schedules r_t in [0, 1], functions of the step count before the update.


class schedules:  # noqa: N801 - a namespace, used as `jj.schedules.cosine(...)`
    """Rate schedules for `short_restriction`: callables from the step count to a rate in [0, 1]."""

    @staticmethod
    def constant(rate: float) -> Schedule:
        """`r_t = rate` at every step."""
        rate = _check_rate(rate, "rate")
        return lambda step: jnp.full((), rate, jnp.float32)

    @staticmethod
    def cosine(total_steps: int) -> Schedule:
        """`r_t = 0.5 (1 + cos(pi t / T))`: 1 at the start, 0 at step `T` and after."""
        total = _check_steps(total_steps)

        def schedule(step):
            t = jnp.minimum(jnp.asarray(step, jnp.float32), total) / total
            return 0.5 * (1.0 + jnp.cos(jnp.pi * t))

        return schedule

    @staticmethod
    def polynomial(total_steps: int, power: float = 1.0) -> Schedule:
        """`r_t = (1 - t / T) ** power`: 1 at the start, 0 at step `T` and after."""
        total = _check_steps(total_steps)
        if not (isinstance(power, (int, float)) and power > 0):
            raise ValueError(f"`power` must be a positive number, got {power!r}")

        def schedule(step):
            t = jnp.minimum(jnp.asarray(step, jnp.float32), total) / total
            return (1.0 - t) ** power

        return schedule


def _check_rate(rate: Any, field: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)):
        raise TypeError(f"`{field}` must be a number in [0, 1] or a schedule, got {rate!r}")
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"`{field}` must be in [0, 1] (the share of swaps made), got {rate!r}")
    return float(rate)


def _check_steps(total_steps: Any) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)):
        raise TypeError(f"`total_steps` must be a positive int, got {total_steps!r}")
    if total_steps <= 0:
        raise ValueError(f"`total_steps` must be a positive int, got {total_steps!r}")
    return int(total_steps)


def _as_schedule(rate: float | Schedule) -> tuple[Schedule, bool]:
    """The schedule, and whether it is statically 1 (every proposed swap made)."""
    if callable(rate):
        first = rate(0)
        if not isinstance(first, jax.core.Tracer):
            _check_rate(float(np.asarray(first)), "rate(0)")
        return rate, False
    rate = _check_rate(rate, "rate")
    return schedules.constant(rate), rate == 1.0


def _n_swaps(rate: jax.Array, proposed: jax.Array) -> jax.Array:
    """`ceil(rate * proposed)` in [0, proposed]; exactly `proposed` when rate >= 1.

    The product is taken in float32 and nudged down by one part in a million before the ceiling:
    float32(0.3) * 10 is 3.0000002, and a decimal rate must not round up to a whole extra swap.
    """
    rate = jnp.clip(jnp.asarray(rate, jnp.float32), 0.0, 1.0)
    product = rate * proposed.astype(jnp.float32) * np.float32(1.0 - 2.0**-20)
    n = jnp.ceil(product).astype(jnp.int32)
    return jnp.where(rate >= 1.0, proposed, jnp.clip(n, 0, proposed))


# ---------------------------------------------------------------------------------------------
# The refresh.


def refresh_masks(
    scores: PyTree,
    masks: PyTree,
    budget: PyTree,
    rate: float | jax.Array = 1.0,
    *,
    rank_by: str = "score",
) -> PyTree:
    """New masks from new scores, making only `ceil(rate * c)` of the `c` proposed swaps per layer.

    Args:
      scores: the updated scores (budget structure).
      masks: the current masks; every layer must keep exactly its budget.
      budget: pruned counts from `layer_budgets`.
      rate: the share of proposed swaps to make, in [0, 1] (may be traced).
      rank_by: `'score'` (signed) or `'abs'`.

    Returns:
      The refreshed masks, each layer still keeping exactly `n_l - p_l` weights.
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown `rank_by` {rank_by!r}; allowed: {', '.join(RANK_BY)}")
    static_full = not isinstance(rate, jax.Array) and float(rate) >= 1.0
    if static_full:
        return topk_masks(scores, budget, current=masks, rank_by=rank_by)

    def refresh(keys, old, keep, lo, hi, eligible=None):
        """The refreshed flat mask over `keys` (the entries of `eligible`, when given).

        `[lo, hi]` holds the new threshold T. Every revival (in target, not in old) has a key in
        [T, b] and so in [T, hi]; every removal (in old, not in target) one in [a, T] and so in
        [lo, T] (see `kept_bounds`). The three bisections only search the bits below the common
        prefix of their bounds, which the candidates (scores near T) mostly share.
        """
        threshold = kth_key(keys, keep, eligible=eligible, bounds=(lo, hi))
        target = select_at(keys, keep, threshold, eligible=eligible, prefer=old)
        revive = target & ~old
        remove = old & ~target
        proposed = jnp.sum(revive, dtype=jnp.int32)
        n = _n_swaps(rate, proposed)

        def restricted():
            t_in = kth_key(keys, n, eligible=revive, bounds=(threshold, jnp.maximum(threshold, hi)))
            come_in = select_at(keys, n, t_in, eligible=revive)
            # Inverted keys rank the lowest scores first; among equal scores the higher index
            # ranks lower, so it goes first.
            inv = ~keys
            t_out = kth_key(
                inv, n, eligible=remove, bounds=(~threshold, jnp.maximum(~threshold, ~lo))
            )
            go_out = select_at(inv, n, t_out, eligible=remove, ties_from_end=True)
            return (old & ~go_out) | come_in

        return lax.cond(n == proposed, lambda: target, restricted)

    def one(name, pruned, s, m):
        size = math.prod(np.shape(s))
        keep = size - _check_count(name, pruned, size)
        keys = ordered_keys(rank_values(s, rank_by)).ravel()
        old = jnp.asarray(m, bool).ravel()
        # The new threshold T lies in [lo, hi]: with exactly `keep` entries in `old`, lo is the
        # lowest kept key a and hi = max(a, b), b the highest pruned key (see `kept_bounds`;
        # otherwise the whole key range).
        lo, hi = kept_bounds(keys, old, keep)
        # Usually few keys lie in [lo, hi]: those of the kept entries whose scores fell below
        # the highest pruned score and of the pruned entries that rose above the lowest kept one.
        # Every other entry keeps its state (above hi: kept, below lo: pruned; with a wrong count
        # in `old` every key is in [lo, hi]), so the whole refresh, ties included, can be decided
        # among the entries in [lo, hi] (`decide_in_bracket`).
        new = decide_in_bracket(
            keys,
            keep,
            (lo, hi),
            lambda k_keys, k_keep, eligible, take: refresh(
                k_keys, take(old), k_keep, lo, hi, eligible=eligible
            ),
        )
        return new.reshape(np.shape(s))

    return map_budget_with_path(one, budget, scores, masks)


def short_restriction(
    budget: PyTree, rate: float | Schedule = 1.0, rank_by: str = "score"
) -> optax.GradientTransformation:
    """The last link of an optax chain: owns the masks and lets a scheduled share of swaps through.

    `init(scores)` takes the masks as `topk_masks(scores, budget)` (which is exactly the mask that
    `init_scores` returns). `update(updates, state, scores)` needs the current scores as `params`;
    it passes the updates on unchanged and refreshes the masks from `scores + updates` with rate
    `r_t = rate(count)`, evaluated at the step count before the update.

    Args:
      budget: pruned counts from `layer_budgets`.
      rate: a number in [0, 1] or a schedule (see `schedules`) of the step count.
      rank_by: `'score'` (signed; the reference code) or `'abs'` (edge-popup).

    Returns:
      An `optax.GradientTransformation`; read its masks with `current_masks(opt_state)`.

    Example:
      >>> tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9),
      ...                  short_restriction(budget, rate=schedules.cosine(1000)))
      >>> opt_state = tx.init(scores)
      >>> updates, opt_state = tx.update(grads, opt_state, scores)
      >>> scores = optax.apply_updates(scores, updates)
      >>> masks = current_masks(opt_state)
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown `rank_by` {rank_by!r}; allowed: {', '.join(RANK_BY)}")
    schedule, always_full = _as_schedule(rate)

    def init_fn(params):
        masks = topk_masks(params, budget, rank_by=rank_by)
        return ShortRestrictionState(count=jnp.zeros([], jnp.int32), masks=masks)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "short_restriction needs the current scores: call update(updates, state, scores)"
            )
        new_scores = map_budget(lambda p, s, u: s + u.astype(s.dtype), budget, params, updates)
        r = 1.0 if always_full else schedule(state.count)
        masks = refresh_masks(new_scores, state.masks, budget, r, rank_by=rank_by)
        return updates, ShortRestrictionState(optax.safe_increment(state.count), masks)

    return optax.GradientTransformation(init_fn, update_fn)


def _restriction_states(opt_state: Any) -> list[ShortRestrictionState]:
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ShortRestrictionState))
    return [x for x in leaves if isinstance(x, ShortRestrictionState)]


def current_masks(opt_state: Any) -> PyTree:
    """The masks owned by the `short_restriction` anywhere inside an optax state."""
    found = _restriction_states(opt_state)
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one short_restriction state in the optimiser state, found "
            f"{len(found)}: build the optimiser with short_restriction(...) as its last link"
        )
    return found[0].masks


def replace_masks(opt_state: Any, masks: PyTree) -> Any:
    """A copy of an optax state whose `short_restriction` owns `masks` (e.g. imported masks)."""
    current_masks(opt_state)

    def swap(x):
        if isinstance(x, ShortRestrictionState):
            return x._replace(masks=masks)
        return x

    return jax.tree.map(swap, opt_state, is_leaf=lambda x: isinstance(x, ShortRestrictionState))
