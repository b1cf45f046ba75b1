"""Short restriction: an optax transformation that owns the binary masks and rations their swaps.

After every update the masks are refreshed per layer, as the paper does after every step. The
exact top-k of the new scores proposes `c` revivals (pruned entries that now rank inside the
layer's top `n_l - p_l`) and as many removals (kept entries that now rank outside it). Only
`ceil(r_t c)` swaps are made: the highest-scored revivals come in, the lowest-scored removals go
out, so every layer keeps exactly `n_l - p_l` weights. With `r_t = 1` the refresh is exactly
`topk_masks(new_scores, budget, current=old_masks)`.

Structured patterns (see `refresh_masks`) keep their structure at every step: tiles swap whole,
N:M swaps stay inside their groups. The masks the restriction owns are element masks (the
kernels' shapes) for every pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jackpots_jax import patterns, select
from jackpots_jax._tree import PyTree, map_budget, named_leaves
from jackpots_jax.masks import (
    RANK_BY,
    _check_count,
    _element_mask,
    _to_elements,
    budget_leaves,
    check_scores,
    rank_values,
    rebuild,
    slot_layout,
    topk_masks,
)
from jackpots_jax.patterns import is_structured, unit_view

Schedule = Callable[[jax.Array], jax.Array]


class ShortRestrictionState(NamedTuple):
    """State of `short_restriction`: the step count and the current binary masks."""

    count: jax.Array
    masks: PyTree


# ---------------------------------------------------------------------------------------------
# Rate schedules r_t in [0, 1], functions of the step count before the update.


class schedules:  # noqa: N801 - a namespace, used as `jj.schedules.cosine(...)`
    """Rate schedules for `short_restriction`: optax schedules of the step count, in [0, 1].

    Any optax schedule (or callable of the step count) with values in [0, 1] works as a rate;
    these three are the ones the paper's recipes name, with their arguments checked.
    """

    @staticmethod
    def constant(rate: float) -> Schedule:
        """`r_t = rate` at every step."""
        return optax.constant_schedule(np.float32(_check_rate(rate, "rate")))

    @staticmethod
    def cosine(total_steps: int) -> Schedule:
        """`r_t = 0.5 (1 + cos(pi t / T))`: 1 at the start, 0 at step `T` and after."""
        return optax.cosine_decay_schedule(1.0, _check_steps(total_steps))

    @staticmethod
    def polynomial(total_steps: int, power: float = 1.0) -> Schedule:
        """`r_t = (1 - t / T) ** power`: 1 at the start, 0 at step `T` and after."""
        total = _check_steps(total_steps)
        if not (isinstance(power, (int, float)) and power > 0):
            raise ValueError(f"`power` must be a positive number, got {power!r}")
        return optax.polynomial_schedule(1.0, 0.0, power, total)


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


# ---------------------------------------------------------------------------------------------
# The refresh.


def refresh_masks(
    scores: PyTree,
    masks: PyTree,
    budget: PyTree,
    rate: float | jax.Array = 1.0,
    *,
    rank_by: str = "score",
    selection: str = "auto",
    layout: select.Layout | None = None,
) -> PyTree:
    """New masks from new scores, making only `ceil(rate * c)` of the `c` proposed swaps per layer.

    Under structured patterns: a `block:B`/`channel` leaf refreshes its tiles exactly like an
    unstructured leaf refreshes its weights (one score per tile; `c` counts tiles). An N:M leaf
    counts `c` over all its groups and makes `ceil(rate * c)` swaps, each inside one group: the
    layer's highest-scored revivals come in and every group sends out as many of its
    lowest-scored removals, so every group keeps exactly N (`patterns.nm_refresh`, which says why
    the count is per layer and not per group).

    Args:
      scores: the updated scores (budget structure).
      masks: the current (element) masks; every layer must keep exactly its budget (and every
        N:M group N).
      budget: pruned counts from `layer_budgets`.
      rate: the share of proposed swaps to make, in [0, 1] (may be traced).
      rank_by: `'score'` (signed) or `'abs'`.
      selection: `'auto'`, `'batched'` or `'bracketed'` (see `topk_masks`; same masks).
      layout: where the batched selection processes each leaf of sharded scores (see
        `topk_masks`); same masks.

    Returns:
      The refreshed masks, each layer still keeping exactly `n_l - p_l` weights.
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown `rank_by` {rank_by!r}; allowed: {', '.join(RANK_BY)}")
    select.resolve(selection)
    static_full = not isinstance(rate, jax.Array) and float(rate) >= 1.0
    if static_full:
        return topk_masks(
            scores, budget, current=masks, rank_by=rank_by, selection=selection, layout=layout
        )
    leaves = budget_leaves(budget, scores, masks)
    out: list[Any] = [None] * len(leaves)
    slots, values, old, keep, shapes = [], [], [], [], []
    nm_slots, nm_values, nm_old, nm_entries = [], [], [], []
    for slot, (name, pruned, s, m) in enumerate(leaves):
        s = rank_values(jnp.asarray(s), rank_by)
        if is_structured(pruned):
            check_scores(name, pruned, s.shape)
            if pruned.kind == "n:m":
                nm_slots.append(slot)
                nm_values.append(s)
                nm_old.append(_element_mask(name, pruned, m))
                nm_entries.append(pruned)
                continue
            # Tiled leaves: the same refresh on one score per tile, counted in tiles.
            keep.append(pruned.keep_units)
            old.append(unit_view(m, pruned))
        else:
            size = int(np.prod(np.shape(s)))
            keep.append(size - _check_count(name, pruned, size))
            old.append(m)
        slots.append(slot)
        values.append(s)
        shapes.append(np.shape(s))
    new = select.refresh(
        values,
        old,
        keep,
        rate,
        selection=selection,
        layout=slot_layout(layout, budget, slots, shapes),
    )
    for slot, m, shape in zip(slots, new, shapes, strict=True):
        out[slot] = _to_elements(leaves[slot][1], m.reshape(shape))
    refreshed = patterns.nm_refresh(nm_values, nm_old, nm_entries, rate, selection=selection)
    for slot, m in zip(nm_slots, refreshed, strict=True):
        out[slot] = m
    return rebuild(budget, out)


def abs_rank_gradients() -> optax.GradientTransformation:
    """The first link of a chain that ranks `|scores|`: the chain rule through the absolute value.

    With `rank_by='abs'` (edge-popup) the masks are a function of `|S|`, so the straight-through
    gradient `dL/d(W*M) * W` is the gradient with respect to `|S|`; the gradient with respect to
    `S` is that times `sign(S)` (what edge-popup's code computes through `scores.abs()`). It must
    be applied before weight decay and momentum see the gradient, hence first in the chain;
    without it a negative score moves the wrong way. `short_restriction(rank_by='abs')` refuses
    to be built unless the caller says the chain starts with it (`sign_corrected=True`).

    Returns:
      An `optax.GradientTransformation`; call `update(grads, state, scores)`.

    Example:
      >>> tx = optax.chain(abs_rank_gradients(), optax.sgd(0.1, momentum=0.9),
      ...                  short_restriction(budget, rank_by="abs", sign_corrected=True))
    """

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "ranking by |score| needs the scores: call update(grads, state, scores)"
            )
        signed = jax.tree.map(lambda g, s: g * jnp.sign(s).astype(g.dtype), updates, params)
        return signed, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def short_restriction(
    budget: PyTree,
    rate: float | Schedule = 1.0,
    rank_by: str = "score",
    *,
    sign_corrected: bool = False,
    selection: str = "auto",
    layout: select.Layout | None = None,
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
      sign_corrected: with `rank_by='abs'`, must be True: the caller's chain starts with
        `abs_rank_gradients()` (as `search_optimizer` does). Ranking `|S|` without that
        correction descends the wrong way on every negative score, so it is refused.
      selection: `'auto'`, `'batched'` or `'bracketed'` (see `topk_masks`; same masks).
      layout: where the batched selection processes each leaf of sharded scores (see
        `topk_masks`; `parallel` makes it from the scores' shardings); same masks.

    Returns:
      An `optax.GradientTransformation`; read its masks with `current_masks(opt_state)`.

    Raises:
      ValueError: `rank_by='abs'` without `sign_corrected=True`.

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
    if rank_by == "abs" and not sign_corrected:
        raise ValueError(
            "short_restriction(rank_by='abs') ranks |scores|, so the gradient of the scores must "
            "be multiplied by sign(scores) before the optimizer sees it: start the chain with "
            "abs_rank_gradients() and pass sign_corrected=True, or use "
            "search_optimizer(..., rank_by='abs'), which does both"
        )
    schedule, always_full = _as_schedule(rate)
    select.resolve(selection)

    def init_fn(params):
        masks = topk_masks(params, budget, rank_by=rank_by, selection=selection, layout=layout)
        return ShortRestrictionState(count=jnp.zeros([], jnp.int32), masks=masks)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "short_restriction needs the current scores: call update(updates, state, scores)"
            )
        new_scores = map_budget(lambda p, s, u: s + u.astype(s.dtype), budget, params, updates)
        r = 1.0 if always_full else schedule(state.count)
        masks = refresh_masks(
            new_scores, state.masks, budget, r, rank_by=rank_by, selection=selection, layout=layout
        )
        return updates, ShortRestrictionState(optax.safe_increment(state.count), masks)

    return optax.GradientTransformation(init_fn, update_fn)


def _restriction_state(opt_state: Any) -> ShortRestrictionState:
    try:
        found = optax.tree_utils.tree_get(opt_state, ShortRestrictionState.__name__)
    except KeyError:
        found = "several"
    if not isinstance(found, ShortRestrictionState):
        raise ValueError(
            f"expected exactly one short_restriction state in the optimiser state, found "
            f"{'none' if found is None else found}: build the optimiser with "
            "short_restriction(...) as its last link"
        )
    return found


def current_masks(opt_state: Any) -> PyTree:
    """The masks owned by the `short_restriction` anywhere inside an optax state."""
    return _restriction_state(opt_state).masks


def replace_masks(opt_state: Any, masks: PyTree) -> Any:
    """A copy of an optax state whose `short_restriction` owns `masks` (e.g. imported masks)."""
    _restriction_state(opt_state)

    def ours(path, value):
        del value
        key = path[-1] if path else None
        return getattr(key, "tuple_name", None) == ShortRestrictionState.__name__

    return optax.tree_utils.tree_set(opt_state, ours, masks=masks)


# ---------------------------------------------------------------------------------------------
# A restriction policy beyond the rate: a first-order check of every swap.


def first_order_pairs(
    values: jax.Array,
    old: jax.Array,
    proposed: jax.Array,
    grads: jax.Array,
    *,
    capacity: int | None = None,
) -> jax.Array:
    """Of the swaps from `old` to `proposed` (one flat leaf), those predicted to lower the loss.

    The swaps are paired as the restriction orders them: the k-th revival (key descending, then
    index ascending) with the k-th removal (key ascending, then index descending). Pair
    `(i, j)` is made iff `grads[i] - grads[j] < 0`; every other pair is left as it was, so the
    result keeps as many entries as `old`.

    Only the swaps are sorted: their indices are compacted (`select.compact_indices`) into
    `capacity` slots and ordered there; when more swaps than that are proposed, every entry of
    the leaf is sorted instead (the same result, one full sort per side).

    Args:
      values: the ranked values of the new scores (flat floats).
      old: the masks before the update (flat bools).
      proposed: the masks the restriction made (flat bools, as many entries as `old`).
      grads: the straight-through gradient of the scores, `g * w` (flat floats).
      capacity: slots for the swaps of each side (static); default `max(1024, n // 32)`, at
        most `n`.

    Returns:
      The flat bool mask.
    """
    n = values.shape[0]
    keys = select.ordered_keys(values)
    revive = proposed & ~old
    remove = old & ~proposed
    cap = min(n, max(1024, n // 32) if capacity is None else capacity)
    # Slots past the last swap hold index n; the totals count every swap, past the slots too.
    i_in, count = select.compact_indices(revive, cap)
    i_out, count_out = select.compact_indices(remove, cap)

    def pair(come_in, go_out, slots):
        # g_i w_i - g_j w_j < 0, compared without the subtraction (which could round to 0).
        made = (jnp.arange(slots) < count) & (
            grads.at[come_in].get(mode="fill", fill_value=0)
            < grads.at[go_out].get(mode="fill", fill_value=0)
        )
        turned_on = jnp.zeros(n, bool).at[come_in].set(made, mode="drop")
        turned_off = jnp.zeros(n, bool).at[go_out].set(made, mode="drop")
        return (old & ~turned_off) | turned_on

    def compacted():
        # The empty slots (index n) sort last by the flag and are never made.
        k_in = keys.at[i_in].get(mode="fill", fill_value=0)
        k_out = keys.at[i_out].get(mode="fill", fill_value=0)
        # jnp.lexsort sorts by its last key first: the swaps lead, in the restriction's order.
        come_in = i_in[jnp.lexsort((i_in, ~k_in, i_in == n))]
        go_out = i_out[jnp.lexsort((-i_out, k_out, i_out == n))]
        return pair(come_in, go_out, cap)

    def whole():
        index = jnp.arange(n, dtype=jnp.int32)
        come_in = jnp.lexsort((index, ~keys, ~revive))
        go_out = jnp.lexsort((-index, keys, ~remove))
        return pair(come_in, go_out, n)

    if cap >= n:
        return compacted()
    return lax.cond((count <= cap) & (count_out <= cap), compacted, whole)


def first_order_check(
    tx: optax.GradientTransformation, budget: PyTree, rank_by: str = "score"
) -> optax.GradientTransformation:
    """A search optimiser whose swaps are made only where a first-order expansion says they help.

    Wraps `tx`, a chain ending in `short_restriction` (e.g. `search_optimizer`). The restriction
    proposes its swaps as usual (a scheduled share of those the top-k proposes); they come in
    pairs, its k-th highest-scored revival `i` with its k-th lowest-scored removal `j` (ties as
    in `refresh_masks`). With `g = dL/d(W*M)` on the step's batch, turning `m_i` on and `m_j` off
    changes the loss by about

        g_i w_i - g_j w_j,

    and `g * w` is exactly the straight-through gradient of the scores that `update` receives
    (before weight decay). A pair is made iff that prediction is negative; the other pairs are not
    made, so every layer still keeps exactly its budget. The scores are updated as `tx` says.

    The pairing sorts each leaf's proposed swaps (two stable sorts of the compacted swaps per
    leaf and step, of the whole leaf when more than `first_order_pairs`'s capacity are
    proposed): a policy to study, not the accelerator-tuned refresh of `short_restriction`.

    Args:
      tx: the search optimiser, ending in `short_restriction` (its state owns the masks).
      budget: pruned counts from `layer_budgets`.
      rank_by: what the restriction ranks, `'score'` or `'abs'` (as given to it).

    Returns:
      An `optax.GradientTransformation` with the state of `tx` (`current_masks` reads it); call
      `update(grads, state, scores)` with the gradients of the loss.

    Example:
      >>> tx = first_order_check(search_optimizer(budget, total_steps=1000), budget)
      >>> state = create_search_state(scores, tx, batch_stats=batch_stats)
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown `rank_by` {rank_by!r}; allowed: {', '.join(RANK_BY)}")
    # Its pairs are single weights of one leaf: a tile or an N:M group would need pairs of units
    # (or inside groups), which this policy does not form.
    for name, pruned in named_leaves(budget):
        if is_structured(pruned):
            raise ValueError(
                f"first_order_check: the budget of {name!r} has pattern '{pruned.pattern}'; "
                "allowed: unstructured budgets only (`layer_budgets(..., pattern='unstructured')`)"
            )

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError(
                "first_order_check needs the current scores: call update(grads, state, scores)"
            )
        old = current_masks(state)
        updates, state = tx.update(grads, state, params)

        def check(p, s, u, m_old, m_new, g):
            shape = jnp.shape(s)
            values = rank_values(jnp.asarray(s + u.astype(s.dtype)), rank_by).ravel()
            flat = first_order_pairs(
                values, m_old.ravel(), m_new.ravel(), jnp.asarray(g, jnp.float32).ravel()
            )
            return flat.reshape(shape)

        masks = map_budget(check, budget, params, updates, old, current_masks(state), grads)
        return updates, replace_masks(state, masks)

    return optax.GradientTransformation(tx.init, update_fn)


# ---------------------------------------------------------------------------------------------
# The paper's search optimiser.


def search_optimizer(
    budget: PyTree,
    *,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    total_steps: int,
    rate: float | Schedule | None = None,
    rank_by: str = "score",
    selection: str = "auto",
    layout: Any = None,
    optimizer: str = "sgd",
) -> optax.GradientTransformation:
    """The paper's search optimiser of the scores, ending in the short restriction.

    `add_decayed_weights(weight_decay)` -> `sgd(cosine_decay(learning_rate, total_steps),
    momentum, nesterov=False)` -> `short_restriction(budget, rate)`: weight decay coupled to the
    gradient as in PyTorch's SGD, no warm-up, the learning rate decayed to 0 over the search.
    With `rank_by='abs'` (edge-popup) the chain starts with `abs_rank_gradients()`.

    Args:
      budget: pruned counts from `layer_budgets`.
      learning_rate: peak learning rate; decays to 0 with a cosine over `total_steps`.
      momentum: SGD momentum (no Nesterov).
      weight_decay: decay added to the score gradients (coupled, as in PyTorch SGD).
      total_steps: the number of search steps.
      rate: the short-restriction rate, a number in [0, 1] or a schedule; `None` means 1 (every
        proposed swap is made, i.e. exact per-layer top-k after each step).
      rank_by: `'score'` (signed) or `'abs'`.
      selection, layout: how the restriction selects (see `short_restriction`); the same masks
        whatever they are.
      optimizer: `'sgd'` (the paper's) or `'adam'` (`optax.adam` with `b1=momentum`, the same
        schedule and coupled decay): each score moves by about the learning rate per step
        whatever its gradient's scale, faster where the gradient's sign holds from step to step.

    Returns:
      An `optax.GradientTransformation`; call `update(grads, state, scores)`.

    Example:
      >>> tx = search_optimizer(budget, learning_rate=0.1, total_steps=1000)
      >>> opt_state = tx.init(scores)
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer is {optimizer!r}; allowed: 'sgd', 'adam'")
    links = [abs_rank_gradients()] if rank_by == "abs" else []
    lr = optax.cosine_decay_schedule(learning_rate, total_steps)
    if optimizer == "adam":
        step = optax.adam(lr, b1=momentum)
    else:
        step = optax.sgd(lr, momentum=momentum, nesterov=False)
    return optax.chain(
        *links,
        optax.add_decayed_weights(weight_decay),
        step,
        short_restriction(
            budget,
            rate=1.0 if rate is None else rate,
            rank_by=rank_by,
            sign_corrected=True,
            selection=selection,
            layout=layout,
        ),
    )
