"""Structured sparsity patterns: N:M groups, square blocks and whole output channels.

A *pattern* says which weights a mask keeps or prunes together:

* `unstructured` (the paper): every weight on its own. Budget entries stay plain `int`s and every
  function behaves exactly as without patterns.
* `N:M` (e.g. `2:4`, `4:8`; NVIDIA sparse tensor cores run 2:4): in every group of M consecutive
  weights along the kernel's *input axis*, exactly N are kept. The sparsity is 1 - N/M in every
  masked leaf. Scores stay one per weight; the mask is the exact top-N of each group.
* `block:B`: B x B tiles of the kernel's `[fan_in, fan_out]` view are kept or pruned whole.
* `channel`: whole output filters: every weight that feeds one output feature.

For `block:B` and `channel` there is one score per tile (the *units* of the pattern); for N:M and
unstructured a unit is one weight.

Axes. A kernel's leading `input_axes` axes are the ones its layer contracts (`fan_in` is their
product); the rest are its output axes (`fan_out`). By default every axis but the last is an input
axis: conv kernels `HWIO` (`fan_in = H W I`), dense kernels `[in, out]`. Flax `DenseGeneral`
kernels need the count: attention q/k/v kernels `[D, heads, head_dim]` have one input axis,
an attention output kernel `[heads, head_dim, D]` has two (`layer_budgets(..., input_axes=...)`).
The *input axis* of a kernel is its last input axis (`I` of a conv, `in` of a dense kernel,
`head_dim` of an attention output kernel): flattening the input axes in order, it is the one that
is contiguous, so N:M groups along it are consecutive in each row of PyTorch's `[out, in]` Linear
weight (and of the `[O, H W I]` GEMM matrix of a channels-last conv, which is how cuSPARSELt and
NVIDIA's ASP group 2:4 convolutions), and exporting them is a reshape and a transpose
(`jackpots_jax.io.nm_export`).

Tiles. A `block:B` tile spans B entries of the input axis and B entries of the last output axis
and one entry of every other axis; both axes must be multiples of B, so in the flat
`[fan_in, fan_out]` view the tile is exactly an aligned B x B square. A `channel` tile spans every
input axis and one entry of every output axis. A tile's score has the kernel's number of
dimensions: the scores of a leaf have shape `kernel.shape // tile` (`score_shape`), which is how
`masked_weights` finds the tiles from the shapes alone.

Masks are always element masks (one bit per weight, the kernel's shape), whatever the pattern:
`topk_masks`, `init_scores`, the short restriction's state (`current_masks`), `apply_masks`,
`mask_churn`, reports and exports all see the masks that multiply the weights. The selection of
`block:B`/`channel` leaves runs on the unit level (one entry per tile, read from an element mask
at the tile's first entry, `unit_view`) and is broadcast back to the tile (`expand_tiles`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jackpots_jax import select

PATTERNS = ("unstructured", "N:M (e.g. '2:4', '4:8')", "block:B (e.g. 'block:4')", "channel")
INDIVISIBLE = ("error", "dense")


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A sparsity pattern; make it with `Pattern.parse('2:4')` (or `'block:4'`, `'channel'`)."""

    kind: str = "unstructured"
    n: int = 0  # N:M: weights kept in every group
    m: int = 0  # N:M: the group size
    block: int = 0  # block:B: the tile side

    @classmethod
    def parse(cls, spec: str | Pattern) -> Pattern:
        """`'unstructured'`, `'N:M'` (0 < N < M), `'block:B'` (B >= 2) or `'channel'`."""
        if isinstance(spec, Pattern):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"`pattern` must be a string such as '2:4', got {spec!r}")
        text = spec.strip().lower()
        if text in ("unstructured", "channel"):
            return cls(text)
        if found := re.fullmatch(r"(\d+):(\d+)", text):
            n, m = int(found[1]), int(found[2])
            if not 0 < n < m:
                raise ValueError(
                    f"`pattern` {spec!r}: an N:M pattern keeps N of every M weights and needs "
                    f"0 < N < M, got N={n}, M={m}"
                )
            return cls("n:m", n=n, m=m)
        if found := re.fullmatch(r"block:(\d+)", text):
            b = int(found[1])
            if b < 2:
                raise ValueError(
                    f"`pattern` {spec!r}: a block side must be at least 2 (block:1 is "
                    "'unstructured')"
                )
            return cls("block", block=b)
        raise ValueError(f"unknown `pattern` {spec!r}; allowed: {', '.join(PATTERNS)}")

    def __repr__(self) -> str:
        return f"Pattern({str(self)!r})"

    def __str__(self) -> str:
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.block}"
        return self.kind

    @property
    def structured(self) -> bool:
        return self.kind != "unstructured"


def default_input_axes(shape: Sequence[int]) -> int:
    """Conv `HWIO` and dense `[in, out]` kernels: every axis but the last is an input axis."""
    return len(shape) - 1


def pattern_tile(pattern: Pattern, shape: Sequence[int], input_axes: int) -> tuple[int, ...]:
    """The per-axis extent of one unit (a tile) of `pattern` in a kernel of `shape`."""
    ndim = len(shape)
    if pattern.kind == "block":
        return tuple(
            pattern.block if axis in (input_axes - 1, ndim - 1) else 1 for axis in range(ndim)
        )
    if pattern.kind == "channel":
        return tuple(shape[:input_axes]) + (1,) * (ndim - input_axes)
    return (1,) * ndim


def divisibility_problem(pattern: Pattern, shape: Sequence[int], input_axes: int) -> str | None:
    """Why a kernel cannot carry `pattern` (None when it can)."""
    ndim = len(shape)
    if not 1 <= input_axes < ndim:
        return f"`input_axes` must be in [1, {ndim - 1}] for a kernel of shape {tuple(shape)}"
    axis = input_axes - 1
    if pattern.kind == "n:m" and shape[axis] % pattern.m:
        return (
            f"its input axis (axis {axis}, size {shape[axis]}) is not a multiple of M={pattern.m}"
        )
    if pattern.kind == "block":
        bad = [a for a in (axis, ndim - 1) if shape[a] % pattern.block]
        if bad:
            sides = " and ".join(f"axis {a} (size {shape[a]})" for a in bad)
            return f"{sides} not a multiple of the block side {pattern.block}"
    return None


@dataclasses.dataclass(frozen=True)
class Structured:
    """The budget entry of a leaf masked under a structured pattern (a pytree leaf, static).

    `layer_budgets(params, sparsity, pattern=...)` makes them; `int(entry)` is the number of
    weights pruned, as for an unstructured (plain `int`) entry, so code that sums or prints budgets
    works unchanged.

    Attributes:
      pruned: weights pruned in the leaf (not units): `size (M - N) / M` for N:M, a multiple of
        the tile size for blocks and channels.
      pattern: the `Pattern`.
      shape: the kernel's shape (element masks have it; block scores have `score_shape`).
      input_axes: how many leading axes of the kernel are its input axes (see the module doc).
    """

    pruned: int
    pattern: Pattern
    shape: tuple[int, ...]
    input_axes: int

    def __post_init__(self):
        if not isinstance(self.pattern, Pattern) or not self.pattern.structured:
            raise ValueError(
                f"a Structured budget entry needs a structured Pattern, got {self.pattern!r}"
            )
        problem = divisibility_problem(self.pattern, self.shape, self.input_axes)
        if problem:
            raise ValueError(
                f"a kernel of shape {self.shape} cannot carry pattern {self.pattern}: {problem}"
            )
        pruned = self.pruned
        if isinstance(pruned, bool) or not isinstance(pruned, (int, np.integer)):
            raise TypeError(f"`pruned` must be an int (weights pruned), got {pruned!r}")
        if not 0 <= pruned <= self.size or pruned % self.unit:
            raise ValueError(
                f"pattern {self.pattern} on a kernel of shape {self.shape} prunes whole tiles of "
                f"{self.unit} weights: `pruned` must be a multiple of {self.unit} in "
                f"[0, {self.size}], got {pruned}"
            )
        if self.pattern.kind == "n:m":
            want = self.size // self.pattern.m * (self.pattern.m - self.pattern.n)
            if pruned != want:
                raise ValueError(
                    f"pattern {self.pattern} on a kernel of shape {self.shape} prunes exactly "
                    f"{want} weights, got `pruned`={pruned}"
                )

    def __int__(self) -> int:
        return int(self.pruned)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def kind(self) -> str:
        return self.pattern.kind

    @property
    def axis(self) -> int:
        """The input axis: N:M groups run along it."""
        return self.input_axes - 1

    @property
    def tile(self) -> tuple[int, ...]:
        """The per-axis extent of one unit (all ones for N:M)."""
        return pattern_tile(self.pattern, self.shape, self.input_axes)

    @property
    def unit(self) -> int:
        """Weights per unit (per score)."""
        return math.prod(self.tile)

    @property
    def score_shape(self) -> tuple[int, ...]:
        """The shape of the leaf's scores: one per unit."""
        return tuple(s // t for s, t in zip(self.shape, self.tile, strict=True))

    @property
    def keep(self) -> int:
        """Weights kept."""
        return self.size - self.pruned

    @property
    def keep_units(self) -> int:
        """Units (scores) kept."""
        return self.keep // self.unit


def is_structured(entry) -> bool:
    return isinstance(entry, Structured)


# ---------------------------------------------------------------------------------------------
# Tiles: one score per tile, element masks broadcast from the tiles.


def tile_of_shapes(weight_shape: Sequence[int], score_shape: Sequence[int]) -> tuple[int, ...]:
    """The tile that scores of `score_shape` cover in a kernel of `weight_shape`.

    Raises:
      ValueError: the shapes do not tile (different rank, or an axis that does not divide).
    """
    weight_shape, score_shape = tuple(weight_shape), tuple(score_shape)
    if len(weight_shape) != len(score_shape) or any(
        s == 0 or w % s for w, s in zip(weight_shape, score_shape, strict=True)
    ):
        raise ValueError(
            f"a score of shape {score_shape} does not fit a weight of {weight_shape}: scores are "
            "one per weight (the same shape) or one per tile (the weight's shape divided by the "
            "tile's, axis by axis)"
        )
    return tuple(w // s for w, s in zip(weight_shape, score_shape, strict=True))


def _split(shape: Sequence[int], tile: Sequence[int]) -> tuple[int, ...]:
    """`(s0 / t0, t0, s1 / t1, t1, ...)`: each axis split into (tile index, position in tile)."""
    out: list[int] = []
    for s, t in zip(shape, tile, strict=True):
        out += [s // t, t]
    return tuple(out)


def tile_sums(x: jax.Array, tile: Sequence[int]) -> jax.Array:
    """The sum over each tile: shape `x.shape // tile`."""
    x = jnp.asarray(x)
    inner = tuple(range(1, 2 * x.ndim, 2))
    return jnp.sum(x.reshape(_split(x.shape, tile)), axis=inner)


def expand_tiles(u: jax.Array, tile: Sequence[int]) -> jax.Array:
    """Every unit of `u` broadcast over its tile: shape `u.shape * tile`."""
    u = jnp.asarray(u)
    shape = tuple(s * t for s, t in zip(u.shape, tile, strict=True))
    wide = jnp.expand_dims(u, tuple(range(1, 2 * u.ndim, 2)))
    return jnp.broadcast_to(wide, _split(shape, tile)).reshape(shape)


def unit_view(mask: jax.Array, entry: Structured) -> jax.Array:
    """The unit-level mask of an element mask (each tile's first entry); unit masks pass through.

    Element masks made under the pattern are constant on each tile, so this is exact for them.
    """
    mask = jnp.asarray(mask, bool)
    if mask.shape == entry.score_shape:
        return mask
    if mask.shape != entry.shape:
        raise ValueError(
            f"a mask of shape {mask.shape} does not fit pattern {entry.pattern} on a kernel of "
            f"shape {entry.shape} (element masks have the kernel's shape, unit masks "
            f"{entry.score_shape})"
        )
    return mask[tuple(slice(None, None, t) for t in entry.tile)]


# ---------------------------------------------------------------------------------------------
# N:M: exact top-N of every group by pairwise comparisons inside the group.


def _grouped(x: jax.Array, axis: int, m: int) -> jax.Array:
    """`x` with its `axis` split into (group, position in group): the members on `axis + 1`."""
    shape = x.shape
    return x.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1 :])


def group_ranks(
    keys: jax.Array,
    axis: int,
    m: int,
    *,
    prefer: jax.Array | None = None,
    eligible: jax.Array | None = None,
    lowest_first: bool = False,
) -> jax.Array:
    """For every entry, how many (eligible) entries of its group come before it in the order.

    Groups are M consecutive entries along `axis`. The order is key descending, then `prefer`
    first, then the lower index; with `lowest_first`, key ascending, then the higher index (the
    order in which the restriction removes weights). An entry's position in its group is its
    order by flat index, so this is the rank in a stable sort of the group. Pairwise: M
    comparisons per entry, no sort, no loop; elementwise over every group of the leaf at once.

    Args:
      keys: unsigned keys from `select.ordered_keys`, the kernel's shape.
      axis: the input axis; its size is a multiple of `m`.
      m: the group size.
      prefer: bool, the kernel's shape: wins ties (descending order only).
      eligible: bool, the kernel's shape: only these entries are counted as coming before.

    Returns:
      int32 ranks, the kernel's shape; keep `rank < N` for the top N of every group.
    """
    shape = keys.shape
    member = axis + 1
    rest = (1,) * (len(shape) - axis - 1)
    i = jnp.arange(m, dtype=jnp.int32).reshape((m, 1) + rest)
    j = jnp.arange(m, dtype=jnp.int32).reshape((1, m) + rest)

    def pair(x):
        """`x` grouped, as `(.., i, 1, ..)` (the entry ranked) and `(.., 1, j, ..)` (the others)."""
        g = _grouped(x, axis, m)
        return jnp.expand_dims(g, member + 1), jnp.expand_dims(g, member)

    ki, kj = pair(keys)
    if lowest_first:
        before = (kj < ki) | ((kj == ki) & (j > i))
    else:
        later = j < i
        if prefer is not None:
            pi, pj = pair(jnp.asarray(prefer, bool))
            later = (pj & ~pi) | ((pj == pi) & later)
        before = (kj > ki) | ((kj == ki) & later)
    if eligible is not None:
        before = before & pair(jnp.asarray(eligible, bool))[1]
    return jnp.sum(before, axis=member + 1, dtype=jnp.int32).reshape(shape)


def group_counts(mask: jax.Array, axis: int, m: int) -> jax.Array:
    """How many True entries each group holds, broadcast back to every entry of the group."""
    g = _grouped(jnp.asarray(mask, bool), axis, m)
    counts = jnp.sum(g, axis=axis + 1, dtype=jnp.int32, keepdims=True)
    return jnp.broadcast_to(counts, g.shape).reshape(mask.shape)


def nm_topk(values: jax.Array, entry: Structured, prefer: jax.Array | None = None) -> jax.Array:
    """The exact top-N of every group (ties: `prefer` first, then the lower index)."""
    keys = select.ordered_keys(values)
    rank = group_ranks(keys, entry.axis, entry.pattern.m, prefer=prefer)
    return rank < entry.pattern.n


def nm_refresh(
    values: Sequence[jax.Array],
    old: Sequence[jax.Array],
    entries: Sequence[Structured],
    rate,
    *,
    selection: str = "auto",
) -> list[jax.Array]:
    """The restricted refresh of N:M leaves, counted per layer over its groups.

    The exact top-N of every group (ties to the entries kept in `old`, then the lower index)
    proposes `c_g` revivals and `c_g` removals in group g, `c = sum_g c_g` in the layer. The
    layer makes `n = ceil(rate c)` swaps: its `n` highest-scored revivals come in (ties: the lower
    flat index first), as in the unstructured refresh, and each group that takes `j_g` of them
    sends out its `j_g` lowest-scored removals (ties: the higher index first). Every group keeps
    exactly N; with `n == c` the result is the exact top-N.

    Why per layer over the groups and not per group: a 2:4 group proposes 0, 1 or 2 swaps, and
    `ceil(rate c_g)` is then `c_g` or 1 for any rate > 0, so a per-group restriction would make
    at least half of the proposed swaps whatever the schedule says; per layer the share is
    `rate` as in the unstructured search, and swaps still stay inside their groups.

    Args:
      values: per leaf, what is ranked (kernel's shape).
      old: per leaf, the current element masks (N per group).
      entries: per leaf, its `Structured` budget entry (N:M).
      rate: the share of swaps to make, in [0, 1]; may be traced.
      selection: how the layer's `n` highest revivals are found (`select.top_eligible`).

    Returns:
      The new element masks, per leaf.
    """
    olds = [jnp.asarray(o, bool) for o in old]
    keys = [select.ordered_keys(v) for v in values]
    targets = [
        group_ranks(k, e.axis, e.pattern.m, prefer=o) < e.pattern.n
        for k, o, e in zip(keys, olds, entries, strict=True)
    ]
    revives = [t & ~o for t, o in zip(targets, olds, strict=True)]
    proposed = [jnp.sum(r, dtype=jnp.int32) for r in revives]
    n = [select.n_swaps(rate, c) for c in proposed]
    come_in = select.top_eligible(values, revives, n, selection=selection)
    out = []
    for o, e, k, target, flat_in, c, n_l in zip(
        olds, entries, keys, targets, come_in, proposed, n, strict=True
    ):
        come = flat_in.reshape(e.shape)
        remove = o & ~target
        rank_out = group_ranks(k, e.axis, e.pattern.m, eligible=remove, lowest_first=True)
        go = remove & (rank_out < group_counts(come, e.axis, e.pattern.m))
        out.append(jnp.where(n_l == c, target, (o & ~go) | come))
    return out


# ---------------------------------------------------------------------------------------------
# Host-side checks (exports, imported masks).


def nm_violations(mask, axis: int, n: int, m: int) -> int:
    """How many groups of M along `axis` do not hold exactly N True entries (numpy, on host)."""
    mask = np.asarray(mask, bool)
    if mask.shape[axis] % m:
        raise ValueError(f"axis {axis} of a mask of shape {mask.shape} is not a multiple of {m}")
    g = mask.reshape(mask.shape[:axis] + (mask.shape[axis] // m, m) + mask.shape[axis + 1 :])
    return int(np.count_nonzero(g.sum(axis=axis + 1) != n))
