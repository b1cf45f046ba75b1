"""Exact top-k masks, score initialisers, masked forward passes and mask statistics.

Masks are pytrees shaped like the budget they were made for: a `bool` array at every masked leaf,
`None` at every other leaf. Every function here maps over the budget (or the masks), so the params
and scores trees may carry arrays at unmasked leaves: they pass through or are ignored.

Top-k never sorts. The k-th largest score of a leaf is found by bisection over the bits of an
order-preserving integer image of the float (up to 32 counting passes, each a fused
compare-and-sum); the ties at that value are then resolved exactly, first in favour of the entries
kept in `current`, then of the lower flat index, so the selected set is the one a stable
descending sort would give. When bounds on the threshold are known (from the `current` masks, or
from a strided sample of a large leaf, verified by counting), the bisection skips the high bits
they share, and when few keys lie between them, the selection runs on those keys alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jackpots_jax._tree import (
    PyTree,
    check_same_structure,
    is_none,
    map_budget,
    map_budget_with_path,
    named_leaves,
)

INIT_METHODS = ("magnitude", "weight_magnitude", "kaiming", "random")
RANK_BY = ("score", "abs")


# ---------------------------------------------------------------------------------------------
# Exact selection without sorting.


def ordered_keys(x: jax.Array) -> jax.Array:
    """Unsigned integers that order like the floats `x` (-0.0 and +0.0 are equal).

    Args:
      x: a float array (float16/bfloat16 are widened to float32; float64 keeps 64 bits).

    Returns:
      `uint32` (or `uint64`) array of the shape of `x`; `a < b` as floats iff keys compare so.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.float64:
        utype, sign = jnp.uint64, np.uint64(1 << 63)
    else:
        x = x.astype(jnp.float32)
        utype, sign = jnp.uint32, np.uint32(1 << 31)
    bits = lax.bitcast_convert_type(x, utype)
    # A stable sort treats -0.0 == +0.0; their bit patterns differ, so fold -0.0 onto +0.0. The
    # test is on the bits: a float compare would also fold subnormals where the CPU flushes them.
    bits = jnp.where(bits == sign, jnp.zeros_like(bits), bits)
    negative = (bits & sign) != 0
    return jnp.where(negative, ~bits, bits | sign)


def _first(candidates: jax.Array, r: jax.Array, from_end: bool) -> jax.Array:
    """The `r` lowest-index (or highest-index) entries of the flat bool array `candidates`."""
    total = jnp.sum(candidates, dtype=jnp.int32)

    def by_position():
        rank = jnp.cumsum(candidates, dtype=jnp.int32)
        if from_end:
            rank = total - rank + candidates.astype(jnp.int32)
        return candidates & (rank <= r)

    # Most refreshes have a single entry at the threshold: skip the scan then.
    return lax.cond(total <= r, lambda: candidates, by_position)


# Float32 sums of 0/1 are exact while every partial sum stays below 2**24, whatever the order of
# the additions; XLA's CPU reductions are faster in float32 than in int32.
_EXACT_F32 = 1 << 24


def _count(mask: jax.Array) -> jax.Array:
    """The number of True entries of a flat bool array, as int32 (one fused pass)."""
    n = mask.shape[0]
    chunks = [mask[i : i + _EXACT_F32] for i in range(0, n, _EXACT_F32)] or [mask]
    counts = [jnp.sum(c, dtype=jnp.float32).astype(jnp.int32) for c in chunks]
    return sum(counts[1:], counts[0])


def compact_indices(mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """The flat indices of the first `capacity` True entries of `mask`, in increasing order.

    No sort and no scan over the entries: the mask is packed into 32-bit words (one pass), the
    words' bit counts are summed up, and each output slot finds its word by binary search and its
    bit by a 5-step search on bit counts.

    Returns:
      `(indices, total)`: int32 indices (`mask.size` in the slots past the last True entry) and
      the number of True entries (which may exceed `capacity`).
    """
    n = mask.shape[0]
    width = 32
    n_words = -(-n // width)
    rows = jnp.pad(mask, (0, n_words * width - n)).reshape(n_words, width)
    shifts = jnp.arange(width, dtype=jnp.uint32)
    words = jnp.sum(rows.astype(jnp.uint32) << shifts, axis=1, dtype=jnp.uint32)
    per_word = lax.population_count(words).astype(jnp.int32)
    through = jnp.cumsum(per_word)
    total = through[-1]
    slot = jnp.arange(capacity, dtype=jnp.int32)
    # The word holding the (slot + 1)-th True entry: the first with `through > slot`.
    w = jnp.minimum(jnp.searchsorted(through, slot, side="right"), n_words - 1).astype(jnp.int32)
    rank = slot - (through[w] - per_word[w])
    word = words[w]
    pos = jnp.zeros_like(slot)
    for half in (16, 8, 4, 2, 1):
        low = lax.population_count(
            (word >> pos.astype(jnp.uint32)) & jnp.uint32((1 << half) - 1)
        ).astype(jnp.int32)
        go = rank >= low
        pos = pos + jnp.where(go, half, 0)
        rank = rank - jnp.where(go, low, 0)
    return jnp.where(slot < total, w * width + pos, n), total


def kth_key(
    keys: jax.Array,
    k: jax.Array | int,
    *,
    eligible: jax.Array | None = None,
    bounds: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """The `k`-th largest eligible key: the largest t with #{eligible & key >= t} >= k.

    A bisection over the bits of the key, one counting pass per bit. With `bounds = (lo, hi)`,
    which the caller guarantees to hold the answer (`lo <= answer <= hi`) whenever `k >= 1`, the
    high bits that `lo` and `hi` share are the answer's too and are not searched: the bisection
    starts from that common prefix and only visits the bits below it. For `k == 0` the answer is
    the largest key value (nothing is at or above the threshold but keys equal to it).
    """
    dtype = keys.dtype
    bits = jnp.iinfo(dtype).bits
    k = jnp.asarray(k, jnp.int32)
    one = jnp.asarray(1, dtype)
    top = jnp.asarray(np.iinfo(dtype).max, dtype)

    def count_at_least(t):
        ge = keys >= t
        if eligible is not None:
            ge = ge & eligible
        return _count(ge)

    if bounds is None:
        free = jnp.asarray(bits, jnp.int32)
        start = jnp.asarray(0, dtype)
    else:
        lo, hi = (jnp.asarray(b, dtype) for b in bounds)
        # Bits below the highest bit where lo and hi differ are free; those above are fixed.
        free = bits - lax.clz(lo ^ hi).astype(jnp.int32)
        low_bits = jnp.where(free >= bits, top, (one << free.astype(dtype)) - one)
        start = lo & ~low_bits

    def step(i, t):
        candidate = t | (one << (free - 1 - i).astype(dtype))
        return jnp.where(count_at_least(candidate) >= k, candidate, t)

    # The largest t with #{key >= t} >= k, i.e. the k-th largest key, one bit at a time.
    threshold = lax.fori_loop(0, free, step, start)
    return threshold if bounds is None else jnp.where(k > 0, threshold, top)


def select_at(
    keys: jax.Array,
    k: jax.Array | int,
    threshold: jax.Array,
    *,
    eligible: jax.Array | None = None,
    prefer: jax.Array | None = None,
    ties_from_end: bool = False,
) -> jax.Array:
    """The `k` entries of `select_top` given its threshold `kth_key(keys, k, eligible=...)`."""
    k = jnp.asarray(k, jnp.int32)
    above = keys > threshold
    ties = keys == threshold
    if eligible is not None:
        above = above & eligible
        ties = ties & eligible
    remaining = k - jnp.sum(above, dtype=jnp.int32)
    if prefer is None:
        return above | _first(ties, remaining, ties_from_end)
    preferred = ties & prefer
    n_preferred = jnp.sum(preferred, dtype=jnp.int32)
    take_preferred = jnp.minimum(remaining, n_preferred)
    others = _first(ties & ~prefer, remaining - take_preferred, ties_from_end)
    return above | _first(preferred, take_preferred, ties_from_end) | others


def kept_bounds(
    keys: jax.Array, kept: jax.Array, k: jax.Array | int
) -> tuple[jax.Array, jax.Array]:
    """Bounds on the `k`-th largest key from a mask `kept` of (about) the top `k` (one fused pass).

    With a the lowest kept key and b the highest key not kept: if `kept` has exactly `k` entries,
    the `k`-th largest key T lies in [a, max(a, b)] (T >= a since the k kept keys are >= a; if some
    kept key is <= b, fewer than k keys exceed b and T <= b; otherwise T = a). With any other count
    the bounds are the whole key range.
    """
    top = jnp.asarray(np.iinfo(keys.dtype).max, keys.dtype)
    zero = jnp.zeros_like(top)
    a = jnp.min(jnp.where(kept, keys, top))
    b = jnp.max(jnp.where(kept, zero, keys))
    valid = jnp.sum(kept, dtype=jnp.int32) == k
    return jnp.where(valid, a, zero), jnp.where(valid, jnp.maximum(a, b), top)


# Leaves of at least this many entries bracket their threshold from a strided sample.
_SAMPLE_MIN = 1 << 18
_SAMPLE_SIZE = 1 << 16
# Entries near the threshold are gathered (and the selection decided among them) when at most
# this share of the leaf lies between the bounds, in leaves where that share is this many or more.
_COMPACT_SHARE = 32
_COMPACT_MIN = 256


def sampled_bounds(keys: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Bounds on the `k`-th largest of flat `keys` (static `k`), from a strided sample, verified.

    The sample's quantiles a few standard deviations either side of rank `k` give (lo, hi); two
    counting passes over all keys check that the k-th largest key lies in [lo, hi]. When it does
    not (an unlucky or adversarial order), the bounds are the whole key range.
    """
    n = keys.shape[0]
    top = jnp.asarray(np.iinfo(keys.dtype).max, keys.dtype)
    zero = jnp.zeros_like(top)
    if not 0 < k < n:
        return zero, top
    stride = max(1, n // _SAMPLE_SIZE)
    sample = keys[::stride]
    m = sample.shape[0]
    p = k / n
    rank, spread = p * m, 4.0 * np.sqrt(m * p * (1.0 - p)) + 2.0
    rank_lo = int(min(m, np.ceil(rank + spread)))
    rank_hi = int(max(1, np.floor(rank - spread)))
    lo = kth_key(sample, rank_lo)
    hi = kth_key(sample, rank_hi)
    ok = (_count(keys >= lo) >= k) & (_count(keys > hi) < k)
    return jnp.where(ok, lo, zero), jnp.where(ok, hi, top)


def decide_in_bracket(
    keys: jax.Array,
    k: jax.Array | int,
    bounds: tuple[jax.Array, jax.Array],
    decide: Callable[..., jax.Array],
) -> jax.Array:
    """Runs a selection of `k` entries on the keys in `bounds` alone when few lie there.

    `bounds = (lo, hi)` must hold the `k`-th largest key T, and `decide` must keep every key above
    `hi` and drop every key below `lo` (as the top-k and the refresh do). Then the k-th largest key
    is the (k - #{key > hi})-th largest of the keys in [lo, hi], and the ties at T are among them.
    When at most 1/32 of the keys lie in [lo, hi] they are gathered in index order (so ties resolve
    alike) and `decide` runs on them alone; otherwise on all keys.

    Args:
      keys: flat unsigned keys from `ordered_keys`.
      k: the number of entries the selection keeps.
      bounds: `(lo, hi)`, keys bracketing the `k`-th largest.
      decide: `decide(keys, k, eligible, take)` returns the flat bool selection over the keys it
        is given, of which only `eligible` (None: all) are real entries; `take(x)` turns a flat
        bool array over all entries into one over the keys given.

    Returns:
      A flat bool array over all entries.
    """
    n = keys.shape[0]
    lo, hi = bounds
    capacity = n // _COMPACT_SHARE

    def whole():
        return decide(keys, k, None, lambda x: x)

    if capacity < _COMPACT_MIN:
        return whole()
    index, total = compact_indices((keys >= lo) & (keys <= hi), capacity)

    def gathered():
        valid = index < n
        at = jnp.minimum(index, n - 1)
        chosen = decide(keys[at], k - _count(keys > hi), valid, lambda x: x[at] & valid)
        return (keys > hi) | jnp.zeros((n,), bool).at[index].set(chosen, mode="drop")

    return lax.cond(total <= capacity, gathered, whole)


def select_top(
    keys: jax.Array,
    k: jax.Array | int,
    *,
    eligible: jax.Array | None = None,
    prefer: jax.Array | None = None,
    ties_from_end: bool = False,
    bounds: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Exactly `k` entries of a flat key array, the largest keys first.

    The order is (key descending, `prefer` first, index ascending), or index descending among
    equal keys when `ties_from_end`. Cost: at most `bits` counting passes plus one scan when ties
    at the threshold must be split; no sort.

    Args:
      keys: flat unsigned keys from `ordered_keys`.
      k: how many to select; may be traced. Must be in `[0, #eligible]`.
      eligible: flat bool array; only these entries may be selected (all by default).
      prefer: flat bool array; among equal keys these entries are selected first.
      ties_from_end: break the remaining ties towards the higher index.
      bounds: optional `(lo, hi)` keys known to bracket the `k`-th largest eligible key (e.g.
        `kept_bounds`); only the bits below their common prefix are searched.

    Returns:
      A flat bool array with exactly `k` True entries.
    """
    threshold = kth_key(keys, k, eligible=eligible, bounds=bounds)
    return select_at(
        keys, k, threshold, eligible=eligible, prefer=prefer, ties_from_end=ties_from_end
    )


def rank_values(scores: jax.Array, rank_by: str = "score") -> jax.Array:
    """What the masks rank: the signed score (the reference code) or its absolute value."""
    if rank_by == "score":
        return scores
    if rank_by == "abs":
        return jnp.abs(scores)
    raise ValueError(f"unknown `rank_by` {rank_by!r}; allowed: {', '.join(RANK_BY)}")


def _check_count(name: str, pruned: Any, size: int) -> int:
    if isinstance(pruned, bool) or not isinstance(pruned, (int, np.integer)):
        raise TypeError(
            f"budget entry for {name!r} must be an int (weights pruned) or None, got {pruned!r}"
        )
    if not 0 <= int(pruned) <= size:
        raise ValueError(
            f"budget entry for {name!r} prunes {pruned} weights, but the leaf has {size}; allowed: "
            f"0..{size}"
        )
    return int(pruned)


def topk_masks(
    scores: PyTree, budget: PyTree, current: PyTree | None = None, *, rank_by: str = "score"
) -> PyTree:
    """Per leaf, the exact top `n_l - p_l` scores as a binary mask.

    Ties at the threshold go first to the entries kept in `current` (when given), then to the lower
    flat index: the result equals the first `n_l - p_l` entries of a stable sort by
    (score descending, kept in `current` first, index ascending). jit-able; the budget is static.

    Args:
      scores: a pytree with the budget's structure (arrays at masked leaves; anything elsewhere).
      budget: pruned counts from `layer_budgets` (Python ints, `None` where not masked).
      current: optional masks (same structure) that win ties.
      rank_by: `'score'` (signed; the reference code) or `'abs'` (edge-popup).

    Returns:
      Masks: bool arrays at the budgeted leaves, `None` elsewhere.

    Example:
      >>> topk_masks({'w': jnp.array([[0.3, -1.0], [0.3, 2.0]])}, {'w': 2})
      {'w': Array([[ True, False], [False,  True]], dtype=bool)}
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown `rank_by` {rank_by!r}; allowed: {', '.join(RANK_BY)}")

    def one(name, pruned, s, c):
        size = int(np.prod(np.shape(s)))
        pruned = _check_count(name, pruned, size)
        keys = ordered_keys(rank_values(jnp.asarray(s), rank_by)).ravel()
        keep = size - pruned
        if c is None:
            prefer = None
            bounds = sampled_bounds(keys, keep) if size >= _SAMPLE_MIN else None
        else:
            prefer = jnp.asarray(c, bool).ravel()
            bounds = kept_bounds(keys, prefer, keep)
        if bounds is None:
            return select_top(keys, keep).reshape(np.shape(s))

        def decide(k_keys, k_keep, eligible, take):
            k_prefer = None if prefer is None else take(prefer)
            return select_top(k_keys, k_keep, eligible=eligible, prefer=k_prefer, bounds=bounds)

        return decide_in_bracket(keys, keep, bounds, decide).reshape(np.shape(s))

    if current is None:
        return map_budget_with_path(lambda n, p, s: one(n, p, s, None), budget, scores)
    return map_budget_with_path(one, budget, scores, current)


# ---------------------------------------------------------------------------------------------
# Initial scores.


def init_scores(
    params: PyTree,
    budget: PyTree,
    method: str = "magnitude",
    key: jax.Array | None = None,
    *,
    gap: float = 0.01,
    rank_by: str = "score",
    dtype: Any = jnp.float32,
) -> tuple[PyTree, PyTree]:
    """Initial scores and the initial masks they select.

    Methods (ALGORITHM.md section 4):

    * `magnitude` (the paper's): the mask is per-layer magnitude pruning at the budget (the `p_l`
      smallest |w| pruned, ties to the lower index); scores are 1.0 where kept and `1 - gap` where
      pruned.
    * `weight_magnitude`: scores = |w| (same initial mask as `magnitude`).
    * `kaiming` (edge-popup): scores ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per leaf (PyTorch's
      `kaiming_uniform_(a=sqrt(5))`); use `rank_by='abs'` as edge-popup does.
    * `random`: scores ~ U(0, 1), a random mask at the budget.

    The masks are always `topk_masks(scores, budget, rank_by=rank_by)`, so `short_restriction`
    derives the same masks from the scores in its `init`.

    Args:
      params: the pre-trained parameter pytree.
      budget: from `layer_budgets(params, ...)`.
      method: one of `INIT_METHODS`.
      key: a PRNG key; needed by `kaiming` and `random`.
      gap: the barrier of the `magnitude` init, > 0 (0.01 in the current reference code).
      rank_by: what the masks rank, `'score'` or `'abs'`.
      dtype: dtype of the scores.

    Returns:
      `(scores, masks)`, both with the budget's structure.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"unknown score init `method` {method!r}; allowed: {INIT_METHODS}")
    if method in ("kaiming", "random") and key is None:
        raise ValueError(f"score init method {method!r} needs a PRNG `key`")
    if method == "magnitude" and not gap > 0:
        raise ValueError(f"`gap` must be > 0 (kept scores must rank above pruned), got {gap!r}")
    check_budget_matches(budget, params)

    if method in ("magnitude", "weight_magnitude"):
        magnitudes = map_budget(lambda p, w: jnp.abs(jnp.asarray(w, dtype)), budget, params)
        masks = topk_masks(magnitudes, budget)
        if method == "weight_magnitude":
            return magnitudes, masks
        scores = map_budget(
            lambda p, m: jnp.where(m, jnp.asarray(1.0, dtype), jnp.asarray(1.0 - gap, dtype)),
            budget,
            masks,
        )
        return scores, masks

    leaves = [name for name, b in named_leaves(budget) if b is not None]
    keys = dict(zip(leaves, jax.random.split(key, max(len(leaves), 1)), strict=False))

    def draw(name, p, w):
        shape = np.shape(w)
        if method == "random":
            return jax.random.uniform(keys[name], shape, dtype)
        fan_in = int(np.prod(shape[:-1]))  # HWIO / (in, out) kernels
        bound = 1.0 / np.sqrt(fan_in)
        return jax.random.uniform(keys[name], shape, dtype, -bound, bound)

    scores = map_budget_with_path(draw, budget, params)
    return scores, topk_masks(scores, budget, rank_by=rank_by)


def check_budget_matches(budget: PyTree, params: PyTree) -> None:
    """Raises a ValueError naming the leaf when a budget was made for another params tree."""

    def check(name, p, w):
        _check_count(name, p, int(np.prod(np.shape(w))))

    map_budget_with_path(check, budget, params)


# ---------------------------------------------------------------------------------------------
# Masked forward passes.


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """`W * M` at every masked leaf; every other leaf of `params` passes through untouched.

    Args:
      params: the parameter pytree.
      masks: bool masks with the budget's structure (`None` where not masked).

    Returns:
      A pytree with the structure of `params`.
    """

    def visit(m, w):
        if m is None:
            return w
        _check_shape(m, w)
        return w * jnp.asarray(m).astype(w.dtype)

    try:
        return jax.tree.map(visit, masks, params, is_leaf=is_none)
    except ValueError as e:
        raise ValueError(f"`masks` does not match the structure of `params`: {e}") from None


def _check_shape(m, w):
    if np.shape(m) != np.shape(w):
        raise ValueError(f"a mask of shape {np.shape(m)} does not fit a weight of {np.shape(w)}")


@jax.custom_vjp
def _straight_through(w, s, m):
    return w * m.astype(w.dtype)


def _straight_through_fwd(w, s, m):
    return _straight_through(w, s, m), (w, m, jnp.zeros((), s.dtype))


def _straight_through_bwd(res, g):
    w, m, s_like = res
    # The binarisation is skipped on the way back: dL/dS = dL/d(W*M) * W, dense.
    return g * m.astype(g.dtype), (g * w).astype(s_like.dtype), None


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def masked_weights(params: PyTree, scores: PyTree, masks: PyTree) -> PyTree:
    """`W * M` in the forward pass; the gradient reaches the scores straight through.

    Backward: `dL/dS = dL/d(W*M) * W` elementwise and dense (pruned entries get gradients too), with
    no abs, normalisation or clipping (ALGORITHM.md section 5). Differentiate with respect to
    `scores` only; the masks are data (they come from the scores by `topk_masks`).

    Args:
      params: the frozen parameter pytree.
      scores: the scores, with the structure of `masks` (or of `params`).
      masks: bool masks, `None` at unmasked leaves.

    Returns:
      The effective weights, a pytree with the structure of `params`.
    """

    def visit(m, w, s):
        if m is None:
            return w
        _check_shape(m, w)
        if np.shape(s) != np.shape(w):
            raise ValueError(f"a score of shape {np.shape(s)} does not fit a weight {np.shape(w)}")
        return _straight_through(w, s, jnp.asarray(m, bool))

    try:
        return jax.tree.map(visit, masks, params, scores, is_leaf=is_none)
    except ValueError as e:
        raise ValueError(f"`scores`/`masks` do not match the structure of `params`: {e}") from None


# ---------------------------------------------------------------------------------------------
# Mask statistics.


def mask_churn(old: PyTree, new: PyTree) -> dict[str, jax.Array]:
    """How many mask entries flipped, per layer and in total. jit-able.

    Returns:
      A flat dict path -> int32 count, plus `'total'`.
    """
    check_same_structure("new", new, old, "old")
    counts = {}
    for (name, a), (_, b) in zip(named_leaves(old), named_leaves(new), strict=True):
        if a is not None:
            counts[name] = jnp.sum(jnp.asarray(a) != jnp.asarray(b), dtype=jnp.int32)
    counts["total"] = sum(counts.values(), jnp.zeros((), jnp.int32))
    return counts


def mask_overlap(a: PyTree, b: PyTree) -> dict[str, Any]:
    """The overlap of two sets of masks, per layer and in total.

    Returns:
      `{'layers': {path: stats}, 'total': stats}` where stats holds `intersection`, `a_kept`,
      `b_kept`, `iou` (intersection over union of the kept sets) and `b_in_a` (the share of b's
      kept weights that a keeps too).
    """
    check_same_structure("b", b, a, "a")

    def stats(inter, union, ka, kb):
        return {
            "intersection": int(inter),
            "a_kept": int(ka),
            "b_kept": int(kb),
            "iou": inter / union if union else 1.0,
            "b_in_a": inter / kb if kb else 1.0,
        }

    layers = {}
    totals = np.zeros(4, np.int64)
    for (name, x), (_, y) in zip(named_leaves(a), named_leaves(b), strict=True):
        if x is None:
            continue
        x, y = np.asarray(x, bool), np.asarray(y, bool)
        row = np.array(
            [np.count_nonzero(x & y), np.count_nonzero(x | y), x.sum(), y.sum()], np.int64
        )
        totals += row
        layers[name] = stats(*row)
    return {"layers": layers, "total": stats(*totals)}
