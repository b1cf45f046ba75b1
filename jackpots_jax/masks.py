"""Exact top-k masks, score initialisers, masked forward passes and mask statistics.

Masks are pytrees shaped like the budget they were made for: a `bool` array at every masked leaf,
`None` at every other leaf. Every function here maps over the budget (or the masks), so the params
and scores trees may carry arrays at unmasked leaves: they pass through or are ignored.

Top-k never sorts: `jackpots_jax.select` finds every leaf's threshold for all leaves at once
(accelerators) or per leaf by bisection (CPU), and resolves ties exactly, first in favour of the
entries kept in `current`, then of the lower flat index, so the selected set is the one a stable
descending sort would give.

Structured patterns (`jackpots_jax.patterns`; budget entries that are `Structured`): N:M leaves
keep the exact top-N of every group (pairwise ranks inside each group, the same tie rule);
`block:B` and `channel` leaves have one score per tile, are selected by the same exact top-k on
those scores, and their masks are broadcast back over the tiles. Masks are element masks (the
kernel's shape) for every pattern.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jackpots_jax import patterns, select
from jackpots_jax._tree import (
    PyTree,
    check_same_structure,
    is_none,
    map_budget,
    map_budget_with_path,
    named_leaves,
)
from jackpots_jax.patterns import (
    Structured,
    expand_tiles,
    is_structured,
    tile_of_shapes,
    tile_sums,
    unit_view,
)

# Re-exported for code that imported the selection from here (it moved to `select`).
from jackpots_jax.select import compact_indices, ordered_keys, select_top  # noqa: F401

INIT_METHODS = ("magnitude", "weight_magnitude", "kaiming", "random")
RANK_BY = ("score", "abs")


# ---------------------------------------------------------------------------------------------
# Top-k masks.


def rank_values(scores: jax.Array, rank_by: str = "score") -> jax.Array:
    """What the masks rank: the signed score (the reference code) or its absolute value."""
    if rank_by == "score":
        return scores
    if rank_by == "abs":
        return jnp.abs(scores)
    raise ValueError(f"unknown `rank_by` {rank_by!r}; allowed: {', '.join(RANK_BY)}")


def _check_count(name: str, pruned: Any, size: int) -> int:
    if is_structured(pruned):
        if pruned.size != size:
            raise ValueError(
                f"budget entry for {name!r} was made for a kernel of {pruned.size} weights "
                f"(shape {pruned.shape}), but the leaf has {size}"
            )
        return int(pruned)
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


def budget_leaves(budget: PyTree, *trees: PyTree) -> list[tuple]:
    """`(path, pruned count, leaf of each tree)` for every masked leaf, in flattening order.

    Raises:
      ValueError: a tree does not have the budget's structure.
    """
    out: list[tuple] = []
    map_budget_with_path(lambda name, p, *xs: out.append((name, p, *xs)), budget, *trees)
    return out


def rebuild(budget: PyTree, values: list[Any]) -> PyTree:
    """A tree of the budget's structure with `values` at the masked leaves (in flattening order)."""
    it = iter(values)
    return map_budget(lambda p: next(it), budget)


def leaf_layout(layout: select.Layout | None, budget: PyTree) -> select.Layout | None:
    """A `select.Layout` whose `dims` is a pytree (the budget's structure) made per leaf."""
    if layout is None or layout.dims is None or isinstance(layout.dims, tuple):
        return layout
    dims = tuple(d for _, _, d in budget_leaves(budget, layout.dims))
    return dataclasses.replace(layout, dims=dims)


def slot_layout(
    layout: select.Layout | None,
    budget: PyTree,
    slots: list[int],
    shapes: list[tuple[int, ...]],
) -> select.Layout | None:
    """The layout of the leaves `slots` (of the budget's masked leaves) a selection is given.

    A leaf whose selection runs on one score per tile keeps its dimension where the tiles split
    evenly over the groups, else its entries are split flat.
    """
    layout = leaf_layout(layout, budget)
    if layout is None or layout.dims is None:
        return layout
    dims = []
    for slot, shape in zip(slots, shapes, strict=True):
        d = layout.dims[slot]
        dims.append(d if d is None or shape[d] % layout.groups == 0 else None)
    return dataclasses.replace(layout, dims=tuple(dims))


def topk_masks(
    scores: PyTree,
    budget: PyTree,
    current: PyTree | None = None,
    *,
    rank_by: str = "score",
    selection: str = "auto",
    layout: select.Layout | None = None,
) -> PyTree:
    """Per leaf, the exact top `n_l - p_l` scores as a binary mask.

    Ties at the threshold go first to the entries kept in `current` (when given), then to the lower
    flat index: the result equals the first `n_l - p_l` entries of a stable sort by
    (score descending, kept in `current` first, index ascending). jit-able; the budget is static.

    Under a structured pattern (`Structured` budget entries): an N:M leaf keeps the first N of
    every group of M by that order (M consecutive entries along the input axis); a `block:B` or
    `channel` leaf has one score per tile (`entry.score_shape`), keeps the top `entry.keep_units`
    tiles by that order (tiles indexed in the flat order of the score array) and its mask is
    broadcast over the tiles.

    Args:
      scores: a pytree with the budget's structure (arrays at masked leaves; anything elsewhere).
      budget: pruned counts from `layer_budgets` (Python ints or `Structured`, `None` where not
        masked).
      current: optional masks (same structure) that win ties (element masks; for tiled leaves
        unit masks of the score shape are accepted too).
      rank_by: `'score'` (signed; the reference code) or `'abs'` (edge-popup).
      selection: `'auto'` (by backend), `'batched'` (all leaves at once in a fixed number of
        passes; the accelerator path) or `'bracketed'` (per-leaf bisection; the CPU path). All
        give the same masks.
      layout: for sharded scores, where the batched selection processes each leaf: a
        `select.Layout` whose `dims` (a pytree like the budget: per leaf the dimension its
        shards are cut along, or `None`) and `groups` (the shard count) follow the scores'
        sharding, so that no leaf is gathered on one device (see `parallel`). Same masks.

    Returns:
      Masks: bool arrays at the budgeted leaves, `None` elsewhere.

    Example:
      >>> topk_masks({'w': jnp.array([[0.3, -1.0], [0.3, 2.0]])}, {'w': 2})
      {'w': Array([[ True, False], [False,  True]], dtype=bool)}
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown `rank_by` {rank_by!r}; allowed: {', '.join(RANK_BY)}")
    select.resolve(selection)
    masked = map_budget(lambda _, s: s, budget, scores)
    kept = None if current is None else map_budget(lambda _, c: c, budget, current)
    arrays = jax.tree.leaves((masked, kept))
    if arrays and not any(isinstance(x, jax.core.Tracer) for x in arrays):
        # Called eagerly: one compiled program. Op by op, the selection of every leaf would be
        # compiled on its own (a language model's 200 kernels: tens of thousands of small
        # programs, enough to exhaust the process's memory mappings on CPU).
        return jax.jit(
            lambda s, c: topk_masks(
                s, budget, c, rank_by=rank_by, selection=selection, layout=layout
            )
        )(masked, kept)
    trees = (scores,) if current is None else (scores, current)
    leaves = budget_leaves(budget, *trees)
    out: list[Any] = [None] * len(leaves)
    # Unstructured and tiled leaves share one exact selection (on one score per tile); N:M
    # leaves rank inside their groups.
    slots, values, keep, shapes, prefer = [], [], [], [], []
    for slot, (name, pruned, s, *c) in enumerate(leaves):
        s = rank_values(jnp.asarray(s), rank_by)
        if is_structured(pruned):
            check_scores(name, pruned, s.shape)
            if pruned.kind == "n:m":
                cur = _element_mask(name, pruned, c[0]) if c else None
                out[slot] = patterns.nm_topk(s, pruned, cur)
                continue
            keep.append(pruned.keep_units)
            if c:
                prefer.append(unit_view(c[0], pruned))
        else:
            size = int(np.prod(np.shape(s)))
            keep.append(size - _check_count(name, pruned, size))
            if c:
                prefer.append(c[0])
        slots.append(slot)
        values.append(s)
        shapes.append(np.shape(s))
    chosen = select.topk(
        values,
        keep,
        prefer if current is not None else None,
        selection=selection,
        layout=slot_layout(layout, budget, slots, shapes),
    )
    for slot, m, shape in zip(slots, chosen, shapes, strict=True):
        out[slot] = _to_elements(leaves[slot][1], m.reshape(shape))
    return rebuild(budget, out)


def check_scores(name: str, entry: Structured, shape: tuple[int, ...]) -> None:
    """Raises a ValueError naming the leaf when its scores do not have `entry.score_shape`."""
    if tuple(shape) != entry.score_shape:
        what = "one per weight" if entry.unit == 1 else f"one per tile of {entry.tile}"
        raise ValueError(
            f"scores for {name!r} have shape {tuple(shape)}; pattern {entry.pattern} on a kernel "
            f"of shape {entry.shape} scores {what}: expected shape {entry.score_shape}"
        )


def _element_mask(name: str, entry: Structured, mask: Any) -> jax.Array:
    if np.shape(mask) != entry.shape:
        raise ValueError(
            f"the mask for {name!r} has shape {np.shape(mask)}; the kernel has {entry.shape}"
        )
    return jnp.asarray(mask, bool)


def _to_elements(entry: Any, units: jax.Array) -> jax.Array:
    """A unit-level mask of a tiled leaf broadcast over its tiles; other masks pass through."""
    if is_structured(entry) and entry.unit > 1:
        return expand_tiles(units, entry.tile)
    return units


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

    Methods (the paper's, and the baselines it compares with):

    * `magnitude` (the paper's): the mask is per-layer magnitude pruning at the budget (the `p_l`
      smallest |w| pruned, ties to the lower index); scores are 1.0 where kept and `1 - gap` where
      pruned.
    * `weight_magnitude`: scores = |w| (same initial mask as `magnitude`).
    * `kaiming` (edge-popup): scores ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per leaf (PyTorch's
      `kaiming_uniform_(a=sqrt(5))`); use `rank_by='abs'` as edge-popup does.
    * `random`: scores ~ U(0, 1), a random mask at the budget.

    The masks are always `topk_masks(scores, budget, rank_by=rank_by)`, so `short_restriction`
    derives the same masks from the scores in its `init`.

    Under a structured pattern the same methods apply per unit: for N:M leaves `magnitude` is
    one-shot magnitude N:M pruning (the top-N |w| of every group, ties to the lower index: the
    usual N:M baseline); `block:B`/`channel` leaves get one score per tile (`entry.score_shape`)
    and `magnitude`/`weight_magnitude` rank the tiles by their summed |w|; `kaiming` draws with
    the kernel's fan-in.

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

        def magnitude(p, w):
            a = jnp.abs(jnp.asarray(w, dtype))
            # Tiles are ranked by their summed |w|.
            return tile_sums(a, p.tile) if _tiled(p) else a

        magnitudes = map_budget(magnitude, budget, params)
        masks = topk_masks(magnitudes, budget)
        if method == "weight_magnitude":
            return magnitudes, masks
        return _barrier_scores(masks, budget, gap, dtype, check=False), masks

    leaves = [name for name, b in named_leaves(budget) if b is not None]
    keys = dict(zip(leaves, jax.random.split(key, max(len(leaves), 1)), strict=False))

    def draw(name, p, w):
        shape = np.shape(w)
        if is_structured(p):
            fan_in = int(np.prod(p.shape[: p.input_axes]))
            shape = p.score_shape
        else:
            fan_in = int(np.prod(shape[:-1]))  # HWIO / (in, out) kernels
        if method == "random":
            return jax.random.uniform(keys[name], shape, dtype)
        bound = 1.0 / np.sqrt(fan_in)
        return jax.random.uniform(keys[name], shape, dtype, -bound, bound)

    scores = map_budget_with_path(draw, budget, params)
    return scores, topk_masks(scores, budget, rank_by=rank_by)


def scores_from_masks(
    masks: PyTree, budget: PyTree, *, gap: float = 0.01, dtype: Any = jnp.float32
) -> PyTree:
    """Scores whose masks are `masks`: 1.0 where kept, `1 - gap` where pruned.

    The paper's magnitude init for any initial mask: a search can start from a one-shot
    baseline's mask (Wanda's, SparseGPT's; a "prior", as MaskLLM calls it) exactly as it starts
    from magnitude pruning's, with the same barrier `gap` between kept and pruned weights.
    `init_scores(params, budget, 'magnitude')` is
    `scores_from_masks(magnitude_masks, budget)`.

    Args:
      masks: bool masks with the budget's structure, keeping exactly the budget's count in
        every leaf (under N:M, N of every group; tiled patterns: element or unit masks).
      budget: from `layer_budgets`.
      gap: in (0, 1), the barrier between kept and pruned scores.
      dtype: dtype of the scores.

    Returns:
      Scores with the budget's structure; `topk_masks(scores, budget)` gives back `masks`.

    Raises:
      ValueError: `gap` is not in (0, 1), or a leaf's mask keeps another number of weights than
        its budget (checked on concrete masks; under `jit` the count is the caller's to keep).
    """
    if not 0 < gap < 1:
        raise ValueError(
            f"`gap` must be in (0, 1) (kept scores must rank above pruned), got {gap!r}"
        )

    return _barrier_scores(masks, budget, gap, dtype, check=True)


def _barrier_scores(masks: PyTree, budget: PyTree, gap: float, dtype: Any, *, check: bool):
    """`scores_from_masks`; `check=False` for masks `topk_masks` made (no host round trip)."""
    problems = []

    def score(name, p, m):
        m = unit_view(m, p) if _tiled(p) else jnp.asarray(m, bool)
        if check and not isinstance(m, jax.core.Tracer):
            size = int(np.prod(p.score_shape)) if is_structured(p) else int(np.size(m))
            pruned = int(p) // p.unit if is_structured(p) else int(p)
            kept = int(np.count_nonzero(np.asarray(m)))
            if np.size(m) != size or kept != size - pruned:
                what = f"tiles of {p.unit} weights" if _tiled(p) else "entries"
                problems.append(
                    f"the mask of {name!r} keeps {kept} of {np.size(m)} {what}; its budget "
                    f"keeps {size - pruned} of {size}"
                )
        return jnp.where(m, jnp.asarray(1.0, dtype), jnp.asarray(1.0 - gap, dtype))

    scores = map_budget_with_path(score, budget, masks)
    if problems:
        raise ValueError("; ".join(problems))
    return scores


def _tiled(entry: Any) -> bool:
    return is_structured(entry) and entry.unit > 1


def check_budget_matches(budget: PyTree, params: PyTree) -> None:
    """Raises a ValueError naming the leaf when a budget was made for another params tree."""

    def check(name, p, w):
        _check_count(name, p, int(np.prod(np.shape(w))))
        if is_structured(p) and tuple(np.shape(w)) != p.shape:
            raise ValueError(
                f"budget entry for {name!r} was made for a kernel of shape {p.shape} (pattern "
                f"{p.pattern}), but the leaf has shape {tuple(np.shape(w))}"
            )

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _straight_through_tiles(w, s, m, tile):
    return w * m.astype(w.dtype)


def _straight_through_tiles_fwd(w, s, m, tile):
    return _straight_through_tiles(w, s, m, tile), (w, m, jnp.zeros((), s.dtype))


def _straight_through_tiles_bwd(tile, res, g):
    w, m, s_like = res
    # One score per tile: dL/dS_tile = sum over the tile of dL/d(W*M) * W.
    return g * m.astype(g.dtype), tile_sums(g * w, tile).astype(s_like.dtype), None


_straight_through_tiles.defvjp(_straight_through_tiles_fwd, _straight_through_tiles_bwd)


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

    Backward: `dL/dS = dL/d(W*M) * W` elementwise and dense (pruned entries get gradients too),
    with no abs, normalisation or clipping, as in the paper's reference code. Differentiate with
    respect to `scores` only; the masks are data (they come from the scores by `topk_masks`).

    Scores with one entry per tile (`block:B` and `channel` patterns: a score leaf of the kernel's
    rank whose every axis divides the kernel's) get the sum over their tile:
    `dL/dS_tile = sum_{i in tile} dL/d(W*M)_i W_i`. The tile is read from the shapes.

    Args:
      params: the frozen parameter pytree.
      scores: the scores, with the structure of `masks` (or of `params`).
      masks: bool element masks (the kernels' shapes), `None` at unmasked leaves.

    Returns:
      The effective weights, a pytree with the structure of `params`.
    """

    def visit(m, w, s):
        if m is None:
            return w
        _check_shape(m, w)
        if np.shape(s) == np.shape(w):
            return _straight_through(w, s, jnp.asarray(m, bool))
        tile = tile_of_shapes(np.shape(w), np.shape(s))
        return _straight_through_tiles(w, s, jnp.asarray(m, bool), tile)

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
