"""Exact top-k selection over every masked leaf, without sorting: the kernel of the mask refresh.

Every selection here picks, per leaf, exactly `k` entries in one total order: key descending
(keys from `ordered_keys`, integers that order like the floats), then a tie rule (entries kept in
the current masks first, then the lower flat index), so the set is the one a stable descending
sort gives. Two implementations compute the same sets bit for bit:

* `batched` (accelerators): all leaves are packed into one `[rows, chunk]` array (each row holds
  entries of one leaf) and the `k`-th key of every leaf is found by a radix select: a fixed
  number of passes (32 bits in digits of `DIGIT_BITS`), each one histogram per leaf over all
  entries at once (per-row bin counts packed four to a 32-bit word, so each pass reads every key
  once, then a running sum over the rows read at the leaves' boundaries). Ties at the threshold
  are split in one more pass: the ties of each class (preferred or not) are packed into 32-bit
  words, and an exclusive sum of the words' bit counts ranks every tie within its leaf, so the
  selected set is exact. (Where a sharded layout splits a leaf along a later dimension, its
  packed order is not its index order, and a second radix select over a tie key that encodes
  the rule does it instead.) The packed result is materialised once before the leaves are
  sliced out of it. The passes are unrolled: no loop, no per-leaf kernel, and every reduction
  is an array op that XLA can partition.
* On one device the batched top-k (and the restricted refresh's target) first tries about three
  passes over memory (`_topk_sampled`): a strided sample brackets every leaf's threshold, one
  pass codes every entry in a byte by where it falls (below, one of 253 bins of the bracket,
  above), two small radix passes over the codes find the bin that holds each threshold, and the
  few entries of that bin are compacted and ranked among themselves. When a threshold falls
  outside its bracket or those entries overflow their slots, one `lax.cond` takes the radix
  passes above over every entry instead. Same sets either way.
* `bracketed` (CPU): per leaf, a bisection over the key bits (one counting pass per bit), started
  from bounds that bracket the threshold (from the current masks during a search, or from a
  strided sample of a large leaf, checked by counting); when few keys lie between the bounds the
  selection runs on those alone. On a CPU the passes it skips are worth more than the per-leaf
  loops and conditionals it needs, which on an accelerator would be thousands of small kernels.

`topk` and `refresh` choose by `jax.default_backend()` (`selection="auto"`), or as asked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SELECTIONS = ("auto", "batched", "bracketed")
# Radix digits of the batched selection: 8 passes over a 32-bit key, 16 bins per histogram.
DIGIT_BITS = 4
# Entries per row of the packed layout (fewer when every leaf is smaller); below 2**16, so that
# a row's bin counts fit the 16-bit fields of `_row_histograms`.
CHUNK = 4096


def ordered_keys(x: jax.Array) -> jax.Array:
    """Unsigned integers that order like the floats `x` (-0.0 and +0.0 are equal; NaN is largest).

    Every NaN, whatever its sign bit and payload, maps to the largest key: NaN scores rank above
    +inf and equal to each other (ties then go by the tie rule). The sign of a NaN differs between
    platforms (x86 makes negative ones, GPUs positive ones), so it must not decide the order.

    Args:
      x: a float array (float16/bfloat16 are widened to float32; float64 keeps 64 bits).

    Returns:
      `uint32` (or `uint64`) array of the shape of `x`; `a < b` as floats iff keys compare so.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.float64:
        utype, sign, inf = jnp.uint64, np.uint64(1 << 63), np.uint64(0x7FF0000000000000)
    else:
        x = x.astype(jnp.float32)
        utype, sign, inf = jnp.uint32, np.uint32(1 << 31), np.uint32(0x7F800000)
    bits = lax.bitcast_convert_type(x, utype)
    # A stable sort treats -0.0 == +0.0; their bit patterns differ, so fold -0.0 onto +0.0. The
    # test is on the bits: a float compare would also fold subnormals where the CPU flushes them.
    bits = jnp.where(bits == sign, jnp.zeros_like(bits), bits)
    # Any NaN (exponent all ones, mantissa not zero) becomes the positive NaN of largest payload.
    bits = jnp.where((bits & ~sign) > inf, ~sign, bits)
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


def compact_indices(
    mask: jax.Array, capacity: int, block: int | None = None
) -> tuple[jax.Array, jax.Array]:
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
    return compact_words(words, n, capacity, block)


# `compact_words` finds a slot's word in two steps: its block of this many words, then the word.
_BLOCK_WORDS = 32


def compact_words(
    words: jax.Array, n: int, capacity: int, block: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """`compact_indices` of a mask of `n` entries given as uint32 words (bit `i` of word `w`:
    entry `32 w + i`; bits past `n` clear).

    The words' bit counts are summed per block of `_BLOCK_WORDS` words (one pass); each slot
    finds its block by binary search over the blocks' running count (a small array), reads that
    block's words (one contiguous read), its word by a count over them, and its bit by a 5-step
    search on bit counts. No pass over the words but the first.
    `block` words per block (default `_BLOCK_WORDS`); 1 where the words are a batch sharded
    across devices (there a block read is gathered across them, a word is not).
    """
    width = 32
    n_words = words.shape[0]
    block = min(_BLOCK_WORDS if block is None else block, max(1, n_words))
    n_blocks = -(-n_words // block)
    blocks = jnp.pad(words, (0, n_blocks * block - n_words)).reshape(n_blocks, block)
    per_block = jnp.sum(lax.population_count(blocks).astype(jnp.int32), axis=1)
    through = jnp.cumsum(per_block)
    total = through[-1]
    slot = jnp.arange(capacity, dtype=jnp.int32)
    # The block holding the (slot + 1)-th True entry: the first with `through > slot`.
    # Unrolled: a straight run of steps (the default is a loop, and every trip of a loop on a GPU
    # waits on the host).
    b = jnp.searchsorted(through, slot, side="right", method="scan_unrolled")
    b = jnp.minimum(b, n_blocks - 1).astype(jnp.int32)
    rank = slot - (through[b] - per_block[b])
    mine = blocks[b]  # [capacity, block]
    counts = lax.population_count(mine).astype(jnp.int32)
    before = jnp.cumsum(counts, axis=1)  # True entries up to and including each word
    # The word: the first whose running count passes the rank.
    w = jnp.minimum(jnp.sum(before <= rank[:, None], axis=1, dtype=jnp.int32), block - 1)
    word = jnp.take_along_axis(mine, w[:, None], axis=1)[:, 0]
    rank = rank - (
        jnp.take_along_axis(before, w[:, None], axis=1)[:, 0]
        - lax.population_count(word).astype(jnp.int32)
    )
    pos = jnp.zeros_like(slot)
    for half in (16, 8, 4, 2, 1):
        low = lax.population_count(
            (word >> pos.astype(jnp.uint32)) & jnp.uint32((1 << half) - 1)
        ).astype(jnp.int32)
        go = rank >= low
        pos = pos + jnp.where(go, half, 0)
        rank = rank - jnp.where(go, low, 0)
    return jnp.where(slot < total, (b * block + w) * width + pos, n), total


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


def n_swaps(rate: jax.Array, proposed: jax.Array) -> jax.Array:
    """`ceil(rate * proposed)` in [0, proposed]; exactly `proposed` when rate >= 1.

    The product is taken in float32 and nudged down by one part in a million before the ceiling:
    float32(0.3) * 10 is 3.0000002, and a decimal rate must not round up to a whole extra swap.
    """
    rate = jnp.clip(jnp.asarray(rate, jnp.float32), 0.0, 1.0)
    product = rate * proposed.astype(jnp.float32) * np.float32(1.0 - 2.0**-20)
    n = jnp.ceil(product).astype(jnp.int32)
    return jnp.where(rate >= 1.0, proposed, jnp.clip(n, 0, proposed))


# ---------------------------------------------------------------------------------------------
# Per-leaf selections with brackets (the CPU path).


def _topk_bracketed(keys: jax.Array, keep: int, prefer: jax.Array | None) -> jax.Array:
    """The exact top `keep` of one flat leaf (ties: `prefer`, then lower index)."""
    size = keys.shape[0]
    if prefer is None:
        bounds = sampled_bounds(keys, keep) if size >= _SAMPLE_MIN else None
    else:
        bounds = kept_bounds(keys, prefer, keep)
    if bounds is None:
        return select_top(keys, keep)

    def decide(k_keys, k_keep, eligible, take):
        k_prefer = None if prefer is None else take(prefer)
        return select_top(k_keys, k_keep, eligible=eligible, prefer=k_prefer, bounds=bounds)

    return decide_in_bracket(keys, keep, bounds, decide)


def _refresh_bracketed(keys: jax.Array, old: jax.Array, keep: int, rate) -> jax.Array:
    """The restricted refresh of one flat leaf (see `refresh`)."""

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
        n = n_swaps(rate, proposed)

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

    # The new threshold T lies in [lo, hi]: with exactly `keep` entries in `old`, lo is the lowest
    # kept key a and hi = max(a, b), b the highest pruned key (see `kept_bounds`; otherwise the
    # whole key range). Usually few keys lie in [lo, hi]: those of the kept entries whose scores
    # fell below the highest pruned score and of the pruned entries that rose above the lowest
    # kept one. Every other entry keeps its state (above hi: kept, below lo: pruned; with a wrong
    # count in `old` every key is in [lo, hi]), so the whole refresh, ties included, can be
    # decided among the entries in [lo, hi] (`decide_in_bracket`).
    lo, hi = kept_bounds(keys, old, keep)
    return decide_in_bracket(
        keys,
        keep,
        (lo, hi),
        lambda k_keys, k_keep, eligible, take: refresh(
            k_keys, take(old), k_keep, lo, hi, eligible=eligible
        ),
    )


# ---------------------------------------------------------------------------------------------
# The batched selection (accelerators): every leaf in one packed array, radix passes.


# `Packing.column_sums` sums rows by a one-hot of their leaves when leaves x rows is at most this.
_ONE_HOT_MAX = 1 << 20


def _sums(xs: Sequence[jax.Array], dims: Sequence[int]) -> tuple[jax.Array, ...]:
    """Each array of `xs` summed over `dims`, in one variadic reduction: a single kernel reads
    every entry once and fills every sum (XLA does not fuse separate sums into one kernel every
    time)."""
    ndim = xs[0].ndim
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    return lax.reduce(
        tuple(xs),
        zeros,
        lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)),
        tuple(d % ndim for d in dims),
    )


@dataclasses.dataclass(frozen=True)
class Packing:
    """How the leaves sit in one `[groups, total_rows, chunk]` array.

    Each leaf is split into `groups` equal parts (along its dimension `dims[l]` when given, so
    that a leaf sharded along that dimension is split where its shards are; else its flat
    entries in `groups` consecutive runs, the last one padded). Part `g` of leaf `l` fills rows
    `starts[l] .. starts[l] + rows[l] - 1` of group `g`; the tail of its last row is padding. With
    one group the layout is each leaf's flat entries in index order. Everything here is static
    (Python ints), so it costs nothing under jit.
    """

    shapes: tuple[tuple[int, ...], ...]
    dims: tuple[int | None, ...]
    groups: int
    chunk: int
    sizes: tuple[int, ...]
    parts: tuple[int, ...]  # entries of a leaf in each group (padding included)
    rows: tuple[int, ...]
    starts: tuple[int, ...]
    total_rows: int
    index_bits: int  # bits that hold every flat index of every leaf

    @classmethod
    def of(
        cls,
        shapes: Sequence[Sequence[int]],
        dims: Sequence[int | None] | None = None,
        groups: int = 1,
        chunk: int | None = None,
    ) -> Packing:
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        dims = (None,) * len(shapes) if dims is None else tuple(dims)
        if len(dims) != len(shapes):
            raise ValueError(f"{len(dims)} split dimensions given for {len(shapes)} leaves")
        sizes = tuple(math.prod(s) for s in shapes)
        for shape, d in zip(shapes, dims, strict=True):
            if d is not None and (not -len(shape) <= d < len(shape) or shape[d] % groups):
                raise ValueError(
                    f"a leaf of shape {shape} cannot be split in {groups} along dimension {d}"
                )
        parts = tuple(-(-n // groups) for n in sizes)
        if chunk is None:
            largest = max(parts, default=1)
            chunk = min(CHUNK, max(32, 1 << max(0, largest - 1).bit_length()))
        if not 1 <= chunk <= CHUNK:
            raise ValueError(f"`chunk` must be in [1, {CHUNK}], got {chunk}")
        rows = tuple(-(-n // chunk) for n in parts)
        starts = tuple(int(s) for s in np.cumsum((0,) + rows)[:-1])
        bits = max(1, max((max(n, 1) - 1).bit_length() for n in sizes) if sizes else 1)
        return cls(shapes, dims, groups, chunk, sizes, parts, rows, starts, sum(rows), bits)

    def _split(self, x: jax.Array, leaf: int, fill) -> jax.Array:
        """`[groups, part]` view of one leaf."""
        d, g, part = self.dims[leaf], self.groups, self.parts[leaf]
        if d is not None:
            return jnp.moveaxis(x, d, 0).reshape(g, part)
        flat = jnp.ravel(x)
        return jnp.pad(flat, (0, g * part - flat.shape[0]), constant_values=fill).reshape(g, part)

    def _merge(self, y: jax.Array, leaf: int) -> jax.Array:
        """The inverse of `_split`: the leaf in its own shape."""
        d, shape = self.dims[leaf], self.shapes[leaf]
        if d is not None:
            moved = (shape[d], *shape[:d], *shape[d + 1 :])
            return jnp.moveaxis(y.reshape(moved), 0, d)
        return y.reshape(-1)[: self.sizes[leaf]].reshape(shape)

    def pack(self, leaves: Sequence[jax.Array], fill=0, sharding=None) -> jax.Array:
        """The leaves as one `[groups, total_rows, chunk]` array, padded with `fill`.

        With `sharding` (a sharding of the packed array, e.g. its groups over a mesh axis) the
        result is constrained to it, so XLA keeps each group where its part of the leaves lives.
        """
        parts = []
        for leaf, (x, r) in enumerate(zip(leaves, self.rows, strict=True)):
            y = self._split(jnp.asarray(x), leaf, fill)
            y = jnp.pad(y, ((0, 0), (0, r * self.chunk - y.shape[1])), constant_values=fill)
            parts.append(y.reshape(self.groups, r, self.chunk))
        packed = jnp.concatenate(parts, axis=1)
        if sharding is not None:
            packed = lax.with_sharding_constraint(packed, sharding)
        return packed

    def unpack(self, packed: jax.Array) -> list[jax.Array]:
        """The leaves of a packed array, in their own shapes (padding dropped).

        The packed array is materialised first (an optimisation barrier), so that XLA does not
        fuse the computation that produces it into the slices of the leaves, where each fused
        kernel would take every input of that computation (compiled for an H200, ResNet-50's
        restricted refresh: 227 kernels and 5.54 GB with the barrier, 235 and 5.54 GB without).
        """
        packed = lax.optimization_barrier(packed)
        out = []
        for leaf, (s, r) in enumerate(zip(self.starts, self.rows, strict=True)):
            y = packed[:, s : s + r].reshape(self.groups, r * self.chunk)[:, : self.parts[leaf]]
            out.append(self._merge(y, leaf))
        return out

    def row_leaf(self) -> jax.Array:
        """int32 `[total_rows]`: the leaf each row belongs to (the same in every group)."""
        row = lax.iota(jnp.int32, self.total_rows)
        ends = jnp.asarray(np.cumsum(self.rows)[:-1], jnp.int32)
        return jnp.sum(row[:, None] >= ends[None, :], axis=1, dtype=jnp.int32)

    def indices(self, row_leaf: jax.Array, sharding=None) -> tuple[jax.Array, jax.Array]:
        """int32 flat index (in its own leaf) of every packed entry, and whether it is real."""
        if self.groups == 1 and not any(d is not None for d in self.dims):
            shape = (1, self.total_rows, self.chunk)
            starts = jnp.asarray(self.starts, jnp.int32)[row_leaf][None, :, None]
            sizes = jnp.asarray(self.sizes, jnp.int32)[row_leaf][None, :, None]
            index = (lax.broadcasted_iota(jnp.int32, shape, 1) - starts) * self.chunk
            index = index + lax.broadcasted_iota(jnp.int32, shape, 2)
            return index, index < sizes
        iotas = [
            lax.iota(jnp.int32, n).reshape(shape)
            for n, shape in zip(self.sizes, self.shapes, strict=True)
        ]
        index = self.pack(iotas, -1, sharding)
        return index, index >= 0

    def leaf_sums(self, per_row: jax.Array) -> jax.Array:
        """`[groups, rows, k]` int32 -> `[leaves, k]`: the sum over each leaf's rows and groups."""
        return self.column_sums([per_row[..., j] for j in range(per_row.shape[-1])])

    def column_sums(self, columns: Sequence[jax.Array]) -> jax.Array:
        """`k` int32 `[groups, rows]` columns -> `[leaves, k]`: each summed over every leaf's
        rows and groups.

        With few rows (leaves x rows at most `_ONE_HOT_MAX`) one reduction over a static one-hot
        of the rows' leaves gives every sum (one kernel, the columns computed inside it). Else a
        leaf's rows being contiguous, a running sum over the rows (a CUB scan on GPUs) is read
        at the leaves' boundaries. Then the groups are summed (an all-reduce where they are
        sharded). Exact in int32. (XLA's GPU backend has no fast integer matmul; a scatter-add
        would contend on a few addresses.)
        """
        if len(self.rows) * self.total_rows <= _ONE_HOT_MAX:
            row = np.arange(self.total_rows)
            starts = np.asarray(self.starts)[:, None]
            inside = jnp.asarray((row >= starts) & (row < starts + np.asarray(self.rows)[:, None]))
            zero = jnp.int32(0)
            picked = [jnp.where(inside[None], c[:, None, :], zero) for c in columns]
            return jnp.stack(_sums(picked, (0, 2)), axis=-1)
        per_row = jnp.stack(columns, axis=-1)
        through = jnp.cumsum(per_row, axis=1)
        through = jnp.concatenate([jnp.zeros_like(through[:, :1]), through], axis=1)
        ends = np.cumsum(self.rows, dtype=np.int64)
        per_group = through[:, ends] - through[:, ends - np.asarray(self.rows, np.int64)]
        return jnp.sum(per_group, axis=0)


def _per_entry(values: jax.Array, row_leaf: jax.Array, sides: jax.Array | None) -> jax.Array:
    """`[leaves, S]` -> a value per packed entry (`[rows, 1]` when S == 1, else `[rows, chunk]`)."""
    per_row = values[row_leaf]
    if sides is None:
        return per_row[:, :1]
    return jnp.where(sides, per_row[:, 1:2], per_row[:, 0:1])


# Bin counts are summed two to a uint32 word, 16 bits each: a row of at most `CHUNK` entries
# cannot carry from one count into the next.
_FIELD_BITS = 16
_PER_WORD = 32 // _FIELD_BITS


def _row_histograms(
    bins: jax.Array | Sequence[jax.Array],
    candidate: jax.Array | None,
    n_bins: int,
    field_bits: int = _FIELD_BITS,
) -> list[jax.Array]:
    """Per bin, int32 `[..., rows]`: per packed row, how many candidates fall in the bin.

    Each entry adds `1 << (16 * (bin % 2))` to the word `bin // 2` of its row, so one pass over
    the row fills two bins per word (a one-hot sum would read every entry once per bin). The
    counts are taken out of the words where they are used (`Packing.column_sums`). `bins` may
    be several arrays (entries that share an element, e.g. the bytes of a word): all count.
    With `field_bits=8` four bins share a word (rows of fewer than 256 entries).
    """
    per_word = 32 // field_bits
    zero = jnp.uint32(0)
    n_words = -(-n_bins // per_word)
    parts = [zero] * n_words
    for x in [bins] if isinstance(bins, jax.Array) else bins:
        # Unsigned shifts and masks: bins are never negative, and signed `//` and `%` would add
        # sign fix-ups to every entry.
        x = x.astype(jnp.uint32)
        word = x >> jnp.uint32(per_word.bit_length() - 1)
        field = (x & jnp.uint32(per_word - 1)) * jnp.uint32(field_bits)
        one = jnp.uint32(1) << field
        if candidate is not None:
            one = jnp.where(candidate, one, zero)
        parts = [p + jnp.where(word == jnp.uint32(j), one, zero) for j, p in enumerate(parts)]
    words = _sums(parts, (-1,))
    low = jnp.uint32((1 << field_bits) - 1)
    return [
        ((words[b // per_word] >> jnp.uint32(field_bits * (b % per_word))) & low).astype(jnp.int32)
        for b in range(n_bins)
    ]


def _radix_select(
    packing: Packing,
    row_leaf: jax.Array,
    keys: jax.Array,
    eligible: jax.Array,
    sides: jax.Array | None,
    k: jax.Array,
    bits: int,
    digit_bits: int,
) -> tuple[jax.Array, jax.Array]:
    """The `k`-th largest eligible key of every (leaf, side), in `ceil(bits / digit_bits)` passes.

    Args:
      keys: packed unsigned keys, all below `2**bits`.
      eligible: packed bool; only these entries count.
      sides: `None` (one selection per leaf) or packed bool: a second, separate selection per
        leaf among the entries where it is True.
      k: int32 `[leaves, S]`, how many to select (clamped to the eligible count).

    Returns:
      `(threshold, rank)`, both `[leaves, S]`: the largest t with #{eligible, key >= t} >= k, and
      `rank = k - #{eligible, key > t}`, how many of the entries whose key equals t to take
      (`rank == 0` only when k is 0: then nothing is selected).
    """
    n_sides = 1 if sides is None else 2
    leaves = len(packing.sizes)
    base = 1 << digit_bits
    passes = -(-bits // digit_bits)
    dtype = keys.dtype
    prefix = jnp.zeros((leaves, n_sides), dtype)
    rank = k
    for i in range(passes):
        shift = (passes - 1 - i) * digit_bits
        candidate = eligible
        if i:  # entries whose higher digits equal the prefix found so far
            high = keys >> jnp.asarray(shift + digit_bits, dtype)
            candidate = candidate & (high == _per_entry(prefix, row_leaf, sides))
        digit = ((keys >> jnp.asarray(shift, dtype)) & jnp.asarray(base - 1, dtype)).astype(
            jnp.int32
        )
        if sides is not None:
            digit = digit + base * sides.astype(jnp.int32)
        columns = _row_histograms(digit, candidate, n_sides * base)
        hist = packing.column_sums(columns).reshape(leaves, n_sides, base)
        # at_least[..., d]: candidates whose digit is >= d.
        at_least = jnp.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
        if i == 0:
            rank = jnp.minimum(rank, at_least[..., 0])
        # The largest digit d with at_least[d] >= rank (at_least falls with d; d = base - 1 when
        # rank is 0).
        d = jnp.sum(at_least >= rank[..., None], axis=-1, dtype=jnp.int32) - 1
        above = jnp.take_along_axis(
            jnp.pad(at_least, ((0, 0), (0, 0), (0, 1))), (d + 1)[..., None], axis=-1
        )[..., 0]
        rank = rank - above
        prefix = (prefix << jnp.asarray(digit_bits, dtype)) | d.astype(dtype)
    return prefix, rank


def _index_ordered(packing: Packing) -> bool:
    """Whether every leaf's entries sit in the packed array in flat index order (group-major).

    True with one group, and when each leaf is split along its first dimension or as flat runs:
    then group `g` holds a contiguous run of the leaf's flat indices, after those of group g-1.
    """
    return packing.groups == 1 or all(
        d is None or (len(s) > 0 and d % len(s) == 0)
        for d, s in zip(packing.dims, packing.shapes, strict=True)
    )


def _take_ties(
    packing: Packing,
    row_leaf: jax.Array,
    ties: jax.Array,
    sides: jax.Array | None,
    prefer: jax.Array | None,
    rank: jax.Array,
    from_end: bool,
) -> jax.Array:
    """Per (leaf, side), the `rank` ties to keep: `prefer` first, then the lowest index.

    On side 1 with `from_end` the highest index goes first instead. One pass over the entries
    packs the ties of each class (side, preferred or not) into 32-bit words; an exclusive sum of
    the words' bit counts gives every tie the number of ties of its class before it (its word's
    prefix plus the bits below it in its word), and the counts at the leaves' static start
    positions turn that into a rank within the leaf. Exact for any number of ties; needs a
    layout in index order (`_index_ordered`).

    Args:
      ties: packed bool `[groups, rows, chunk]`, the entries whose key is the threshold.
      sides: packed bool or None (one side).
      prefer: packed bool or None (no preference).
      rank: int32 `[leaves, sides]`, how many ties to keep (at most all of them).

    Returns:
      Packed bool: the ties kept.
    """
    n_sides = 1 if sides is None else 2
    g, r, c = ties.shape
    width = 32
    # Words per group (a group is one device's part of a sharded layout: every sum below but
    # the small per-leaf ones stays on it), with one word past the end of the group.
    n_words = r * c // width + 1
    cls = jnp.zeros(ties.shape, jnp.int32) if sides is None else sides.astype(jnp.int32)
    n_classes = n_sides
    if prefer is not None:  # per side: class 2s preferred, 2s + 1 not
        cls, n_classes = 2 * cls + (~prefer).astype(jnp.int32), 2 * n_sides

    def in_words(x):
        x = jnp.pad(x.reshape(g, r * c), ((0, 0), (0, n_words * width - r * c)))
        return x.reshape(g, n_words, width)

    shifts = jnp.arange(width, dtype=jnp.uint32)
    zero = jnp.uint32(0)
    bit = jnp.where(in_words(ties), jnp.uint32(1) << shifts, zero)
    word_cls = in_words(cls)
    # One variadic reduction: each entry is read once and fills the word of its class.
    words = lax.reduce(
        tuple(jnp.where(word_cls == j, bit, zero) for j in range(n_classes)),
        (zero,) * n_classes,
        lambda a, b: tuple(x | y for x, y in zip(a, b, strict=True)),
        (2,),
    )
    words = jnp.stack(words)  # [classes, groups, n_words]
    per_word = lax.population_count(words).astype(jnp.int32)
    before_word = jnp.cumsum(per_word, axis=2) - per_word

    def before(position: np.ndarray) -> jax.Array:
        """`[classes, groups, ...]`: ties of each class in the group before a static position."""
        w = position // width
        low = ((np.int64(1) << (position % width)) - 1).astype(np.uint32)
        count = lax.population_count(words[:, :, w] & low).astype(jnp.int32)
        return before_word[:, :, w] + count

    # Each leaf's part in a group runs from a static first position to its end.
    first = np.asarray(packing.starts, np.int64) * c
    at_first = before(first)  # [classes, groups, leaves]
    in_part = before(first + np.asarray(packing.rows, np.int64) * c) - at_first
    # An entry's rank in its leaf: ties before it in its group, less those before its part,
    # plus the leaf's ties in earlier groups.
    offset = jnp.cumsum(in_part, axis=1) - in_part - at_first  # [classes, groups, leaves]
    total = jnp.sum(in_part, axis=1)  # [classes, leaves]
    # How many ties of each class to keep: preferred ones first, up to the rank.
    take = []
    for side in range(n_sides):
        if prefer is None:
            take.append(rank[:, side])
        else:
            preferred = jnp.minimum(rank[:, side], total[2 * side])
            take += [preferred, rank[:, side] - preferred]

    position = lax.broadcasted_iota(jnp.int32, (r, c), 0) * c + lax.broadcasted_iota(
        jnp.int32, (r, c), 1
    )
    w = position // width
    low = (jnp.uint32(1) << (position % width).astype(jnp.uint32)) - jnp.uint32(1)
    leaf = row_leaf[None, :, None]
    kept = jnp.zeros(ties.shape, bool)
    for j in range(n_classes):
        count = lax.population_count(words[j][:, w] & low[None]).astype(jnp.int32)
        rank_j = before_word[j][:, w] + count + offset[j][:, row_leaf][..., None]
        if from_end and sides is not None and j >= n_classes // 2:
            rank_j = total[j][leaf] - 1 - rank_j
        kept = kept | ((cls == j) & (rank_j < take[j][leaf]))
    return ties & kept


def _select_batched(
    packing: Packing,
    row_leaf: jax.Array,
    keys: jax.Array,
    index: jax.Array,
    eligible: jax.Array,
    sides: jax.Array | None,
    k: jax.Array,
    digit_bits: int,
    prefer: jax.Array | None = None,
    from_end: bool = False,
) -> jax.Array:
    """Exactly `k` eligible entries per (leaf, side): key descending, then the tie rule.

    Ties: `prefer` (packed bool) first, then the lower index (the higher on side 1 when
    `from_end`). The threshold key comes from a radix select; the ties at it are split in one
    pass (`_take_ties`) where the layout keeps index order, else by a second radix select over a
    tie key that encodes the rule (preference bit, then the index).
    """
    key_bits = jnp.iinfo(keys.dtype).bits
    threshold, rank = _radix_select(
        packing, row_leaf, keys, eligible, sides, k, key_bits, digit_bits
    )
    at = _per_entry(threshold, row_leaf, sides)
    above = eligible & (keys > at)
    ties = eligible & (keys == at)
    if _index_ordered(packing):
        return above | _take_ties(packing, row_leaf, ties, sides, prefer, rank, from_end)
    bits = packing.index_bits
    low_first = (jnp.asarray((1 << bits) - 1, jnp.int32) - index).astype(jnp.uint32)
    tie_keys = low_first
    if from_end:
        tie_keys = jnp.where(sides, index.astype(jnp.uint32), low_first)
    if prefer is not None:
        tie_keys = tie_keys | (prefer.astype(jnp.uint32) << jnp.uint32(bits))
        bits += 1
    tie_threshold, _ = _radix_select(
        packing, row_leaf, tie_keys, ties, sides, rank, bits, digit_bits
    )
    wanted = _per_entry(rank > 0, row_leaf, sides)
    return above | (ties & wanted & (tie_keys >= _per_entry(tie_threshold, row_leaf, sides)))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the leaves of a batched selection live: split in `groups` along `dims`, sharded so.

    Attributes:
      dims: per leaf, the dimension split into `groups` equal parts (the one its shards are cut
        along), or `None` (its flat entries are split into `groups` runs).
      groups: how many parts (1: no split, the layout of a single device).
      sharding: optional sharding of the packed `[groups, rows, chunk]` arrays (their groups over
        a mesh axis), so that every group is processed where it lives.
    """

    dims: tuple[int | None, ...] | None = None
    groups: int = 1
    sharding: Any = None


def _packing(values: Sequence[jax.Array], layout: Layout | None) -> tuple[Packing, Any]:
    layout = Layout() if layout is None else layout
    shapes = [np.shape(v) for v in values]
    return Packing.of(shapes, layout.dims, layout.groups), layout.sharding


def _sampled_applies(values: Sequence[jax.Array], layout: Layout | None) -> bool:
    """Whether the batched top-k takes `_topk_sampled`: one device, non-empty float32 leaves."""
    return (
        (layout is None or layout.groups == 1)
        and all(jnp.asarray(v).dtype == jnp.float32 for v in values)
        and all(np.size(v) > 0 for v in values)
    )


def _topk_batched(
    values: Sequence[jax.Array],
    keep: Sequence[int],
    prefer: Sequence[jax.Array] | None,
    digit_bits: int,
    layout: Layout | None = None,
    capacity: int | None = None,
) -> list[jax.Array]:
    # One device, float32 leaves: the sampled selection (its fallback is the code below).
    if _sampled_applies(values, layout):
        return _topk_sampled(values, keep, prefer, digit_bits, capacity)
    packing, sharding = _packing(values, layout)
    row_leaf = packing.row_leaf()
    index, real = packing.indices(row_leaf, sharding)
    preferred = None
    if prefer is not None:
        preferred = packing.pack([jnp.asarray(p, bool) for p in prefer], False, sharding)
    k = jnp.asarray(keep, jnp.int32).reshape(-1, 1)
    packed = ordered_keys(packing.pack(values, 0, sharding))
    chosen = _select_batched(
        packing, row_leaf, packed, index, real, None, k, digit_bits, prefer=preferred
    )
    return packing.unpack(chosen)


# The sampled top-k (one device, float32 keys): every leaf's threshold is bracketed from a strided
# sample, one pass over all keys bins the bracket, and the exact selection runs on the few
# entries of the bin that holds each threshold.
_STRIDE = 127  # the sample's step in a leaf of at least `16 * _STRIDE` entries
# Bins of a bracket: codes 1 .. 253 (0 below it, 254 above), so `code > cut` is `code >= cut + 1`
# in bytes for every cut from -1 (keep all) to 254 (keep none).
_SUB_BINS = 253


def _select_in_rows(
    packing: Packing,
    row_leaf: jax.Array,
    parts: Sequence[jax.Array],
    k: jax.Array,
    bits: int,
) -> tuple[jax.Array, jax.Array]:
    """Per leaf and column of `k`, the `k`-th largest value of the leaf's entries and how many
    entries of that value to take (`k` less those above it), by 4-bit digits: `bits / 4`
    passes, each one reduction per column of `k` over the entries (the first shared).

    Every entry counts (padding must be smaller than any real `k`-th value). `parts`: uint32
    `[1, rows, width]` arrays of values below `2**bits`, several entries per element allowed
    (e.g. the four bytes of a word); `k`: int32 `[leaves, S]`, each in `[1, entries]`.

    Shaped for XLA's GPU fusion (compiled for an H200): every histogram counts runs of 128
    entries in 8-bit fields, four bins to a word (with rows of thousands of entries XLA often
    writes every entry's bin words out before the reduction instead of fusing them into it),
    and an entry whose higher digits are not its leaf's so far counts nowhere because
    subtracting the leaf's digits pushes its digit out of the 16 bins (an unsigned wrap below
    them; a select there also makes XLA write the digits out first).
    """
    _, r, width = parts[0].shape
    run = min(128 // len(parts), width)  # both powers of two
    parts = [x.reshape(1, r, width // run, run) for x in parts]

    def histogram(digits):
        columns = _row_histograms(digits, None, 16, field_bits=8)  # per run of 128 entries
        return packing.column_sums(list(_sums(columns, (-1,))))

    value, take = jnp.zeros_like(k), k
    for shift in range(bits - 4, -1, -4):
        digits = [x >> jnp.uint32(shift) for x in parts]
        if shift == bits - 4:
            hists = [histogram(digits)] * k.shape[1]
        else:
            hists = []
            for s in range(k.shape[1]):
                base = (value[:, s].astype(jnp.uint32) << jnp.uint32(4))[row_leaf]
                hists.append(histogram([d - base[None, :, None, None] for d in digits]))
        at_least = jnp.cumsum(jnp.stack(hists, 1)[..., ::-1], axis=-1)[..., ::-1]
        # The largest digit d with at least `take` entries at or above it, and what is left.
        d = jnp.sum(at_least >= take[..., None], axis=-1, dtype=jnp.int32) - 1
        padded = jnp.pad(at_least, ((0, 0), (0, 0), (0, 1)))
        above = jnp.take_along_axis(padded, d[..., None] + 1, axis=-1)[..., 0]
        value, take = value * 16 + jnp.maximum(d, 0), take - above
    return value, take


# Leaves per kernel where a kernel reads them all at once (XLA fuses at most about 96 operands).
_RUN_LEAVES = 80


def _leaf_runs(leaves: int) -> list[tuple[int, int]]:
    """`[first, last)` ranges of at most `_RUN_LEAVES` leaves, in order."""
    return [(i, min(leaves, i + _RUN_LEAVES)) for i in range(0, leaves, _RUN_LEAVES)] or [(0, 0)]


def _take_flat(flat: Sequence[jax.Array], source: jax.Array) -> jax.Array:
    """`jnp.concatenate(flat)[source]` (positions in range), one gather per run of leaves: a
    gather of a fused concatenate reads only the entries it takes (a sector each)."""
    first = np.cumsum([0] + [x.shape[0] for x in flat])
    out = None
    for a, e in _leaf_runs(len(flat)):
        lo, hi = int(first[a]), int(first[e])
        taken = jnp.concatenate(flat[a:e])[jnp.clip(source - lo, 0, max(hi - lo - 1, 0))]
        out = taken if out is None else jnp.where((source >= lo) & (source < hi), taken, out)
    return out


def _sample_bounds(keys: Sequence[jax.Array], keep: Sequence[int]):
    """Per leaf, uint32 `(lo, hi)` that bracket its `keep`-th largest key when the leaf's strided
    sample is representative (checked later by counting).

    Every `_STRIDE`-th entry of a leaf (all of a leaf of fewer than `16 * _STRIDE`) is sampled;
    `lo` and `hi` are the sample's keys at the ranks four standard deviations (plus two) either
    side of the leaf's share, to 16 bits: one radix select of both ranks over the high halves
    of the sampled keys (a whole leaf's bounds are exact to 16 bits).
    """
    spans, ranks = [], []
    for x, k in zip(keys, keep, strict=True):
        n = x.shape[0]
        p = min(max(k / max(n, 1), 0.0), 1.0)
        stride = 1 if n < _STRIDE * 16 else _STRIDE
        m = -(-n // stride)
        spread = 0.0 if stride == 1 else 4.0 * math.sqrt(m * p * (1.0 - p)) + 2.0
        pair = (math.ceil(p * m + spread), math.floor(p * m - spread))
        spans.append((stride, m))
        ranks.append([int(min(max(rank, 1), max(m, 1))) for rank in pair])
    packing = Packing.of([(m,) for _, m in spans], chunk=128)
    # Where every packed sample entry comes from in the leaves laid end to end: static per row.
    first = np.cumsum([0] + [x.shape[0] for x in keys])[:-1]
    base, step, limit = [], [], []
    for start, (stride, m), rows in zip(first, spans, packing.rows, strict=True):
        t = np.arange(rows) * packing.chunk
        base += list(start + stride * t)
        step += [stride] * rows
        limit += list(m - t)
    column = lax.broadcasted_iota(jnp.int32, (packing.total_rows, packing.chunk), 1)
    source = jnp.asarray(base, jnp.int32)[:, None] + jnp.asarray(step, jnp.int32)[:, None] * column
    real = column < jnp.asarray(limit, jnp.int32)[:, None]
    source = jnp.where(real, source, 0)
    # Each run of leaves gathers its own rows (a gather of a fused concatenate reads only the
    # entries it takes, a sector each).
    taken = []
    for a, e in _leaf_runs(len(keys)):
        rows = slice(packing.starts[a], packing.starts[e - 1] + packing.rows[e - 1])
        taken.append(jnp.concatenate(keys[a:e])[source[rows] - int(first[a])])
    # Padding is 0, below every real key's high half (-inf's is 0x007F).
    sample = ordered_keys(jnp.concatenate(taken)) >> jnp.uint32(16)
    sample = jnp.where(real, sample, jnp.uint32(0)).astype(jnp.uint16)
    # Two entries to a uint32 word, as the codes below are four.
    pairs = lax.bitcast_convert_type(sample.reshape(1, packing.total_rows, -1, 2), jnp.uint32)
    parts = [pairs & jnp.uint32(0xFFFF), pairs >> jnp.uint32(16)]
    k = jnp.asarray(ranks, jnp.int32)
    prefix, _ = _select_in_rows(packing, packing.row_leaf(), parts, k, 16)
    prefix = prefix.astype(jnp.uint32) << jnp.uint32(16)
    return prefix[:, 0], prefix[:, 1] | jnp.uint32(0xFFFF)


def _real(packing: Packing, row_leaf: jax.Array) -> jax.Array:
    """bool `[1, rows, chunk]`: the packed entries that are not padding (one group)."""
    r, c = packing.total_rows, packing.chunk
    ends = np.asarray(packing.sizes) + np.asarray(packing.starts) * c
    in_row = jnp.asarray(ends, jnp.int32)[row_leaf] - lax.iota(jnp.int32, r) * c
    return lax.broadcasted_iota(jnp.int32, (1, r, c), 2) < in_row[None, :, None]


class _Plan(NamedTuple):
    """The sampled top-k up to its candidates (`_sampled_plan`)."""

    code: jax.Array  # uint8 [1, rows, chunk]: 0 below the bracket or padding, 1-253 in, 254 above
    cut: jax.Array  # int32 [leaves]: a leaf keeps the entries whose code is above this
    take: jax.Array  # int32 [leaves]: how many of its candidates (code == cut) it keeps
    slots: jax.Array  # int32 [capacity]: the candidates' packed positions, in order
    count: jax.Array  # int32: how many candidates there are (at most `capacity` fit)
    valid: jax.Array  # bool [leaves]: whether the leaf's threshold lies in its bracket


def _sampled_plan(
    packing: Packing,
    row_leaf: jax.Array,
    flat: Sequence[jax.Array],
    keep: Sequence[int],
    capacity: int,
) -> _Plan:
    """Steps 1-3 of `_topk_sampled`: the codes, each leaf's bin, its candidates compacted."""
    lo, hi = _sample_bounds(flat, keep)
    b = _SUB_BINS
    r, c = packing.total_rows, packing.chunk
    # The bracket's bins: equal spans of its keys (a float product: monotone, so every bin is a
    # run of keys, and cheaper than an integer division).
    scale = jnp.float32(b) / ((hi - lo).astype(jnp.float32) + 1.0)
    code = None

    def rows_of(run):
        first, last = run
        return slice(packing.starts[first], packing.starts[last - 1] + packing.rows[last - 1])

    # At most `_RUN_LEAVES` leaves per kernel (XLA fuses at most about 90 operands); each run's
    # codes are written into their rows of one array in place, the run of most rows first (XLA
    # makes that one a pad, which writes zeros in the other rows).
    runs = sorted(_leaf_runs(len(flat)), key=lambda run: -(rows_of(run).stop - rows_of(run).start))
    for first, last in runs:
        rows = rows_of((first, last))
        part = Packing.of(packing.shapes[first:last], chunk=c)
        keys = ordered_keys(part.pack(flat[first:last], 0))
        leaf = row_leaf[rows][None, :, None]
        row_lo, row_hi, row_scale = lo[leaf], hi[leaf], scale[leaf]
        bin_in = jnp.floor((keys - row_lo).astype(jnp.float32) * row_scale).astype(jnp.uint32)
        inside = jnp.uint32(1) + jnp.minimum(bin_in, jnp.uint32(b - 1))
        run = jnp.where(keys > row_hi, jnp.uint32(b + 1), jnp.where(keys < row_lo, 0, inside))
        # Padding (past a leaf's size in its last row) codes 0, as if below: it moves no leaf's
        # k-th largest code but one below its bracket (k-th largest 0 either way).
        run = jnp.where(_real(packing, row_leaf)[:, rows], run, jnp.uint32(0)).astype(jnp.uint8)
        if last - first == len(flat):
            code = run
        else:
            code = jnp.zeros((1, r, c), jnp.uint8) if code is None else code
            code = lax.dynamic_update_slice(code, run, (0, rows.start, 0))
    k = jnp.asarray(keep, jnp.int32)
    # The codes four to a uint32 word (XLA fuses the passes below into reductions over these
    # words, where byte-wide arrays get their digits written out first).
    quads = lax.bitcast_convert_type(code.reshape(1, r, c // 4, 4), jnp.uint32)
    byte = [(quads >> jnp.uint32(8 * j)) & jnp.uint32(255) for j in range(4)]
    # The code of each leaf's k-th largest key, and how many entries of that code to take.
    bin_, take = _select_in_rows(packing, row_leaf, byte, jnp.maximum(k, 1)[:, None], 8)
    bin_, take = bin_[:, 0], take[:, 0]
    special = jnp.asarray([n in (0, size) for n, size in zip(keep, packing.sizes, strict=True)])
    # The threshold lies in the bracket when its code is neither 0 (below) nor b + 1 (above).
    valid = special | ((bin_ >= 1) & (bin_ <= b))
    # A leaf that keeps all or none has no candidates: its mask is `code > -1` or `code > b + 1`.
    cut = jnp.where(special, jnp.where(k == 0, b + 1, -1), bin_)
    pick = jnp.where(special, -1, bin_)
    # The candidates' bits, 32 to a word (eight words of four codes each).
    wanted = pick.astype(jnp.uint32)[row_leaf][None, :, None]
    bits = sum(
        jnp.where(x == wanted, jnp.uint32(1 << j), jnp.uint32(0)) for j, x in enumerate(byte)
    )
    shifts = jnp.uint32(4) * lax.iota(jnp.uint32, 8)
    words = jnp.sum(bits.reshape(r, c // 32, 8) << shifts, axis=2, dtype=jnp.uint32)
    slots, count = compact_words(words.reshape(-1), r * c, capacity)
    return _Plan(code, cut, take, slots, count, valid)


def _topk_sampled(
    values: Sequence[jax.Array],
    keep: Sequence[int],
    prefer: Sequence[jax.Array] | None,
    digit_bits: int,
    capacity: int | None = None,
    packed: bool = False,
    prefer_packed: jax.Array | None = None,
) -> list[jax.Array] | jax.Array:
    """`topk` of float32 leaves on one device in about three passes over memory.

    1. A strided sample of every leaf gives bounds that bracket its threshold (`_sample_bounds`).
    2. One pass over all keys codes every entry by where it falls (below the bracket, one of
       `_SUB_BINS` equal bins of it, above) in one byte, and counts the codes per row.
    3. Per leaf, the counts give the bin that holds the `keep`-th key and how many of the bin's
       entries to take; those entries (the candidates) are compacted into `capacity` slots
       (default `swap_capacity` of the packed entries).
    4. The candidates are ranked among themselves (key descending, `prefer` first, lower index),
       the chosen ones' codes are raised above the bin, and each leaf's mask is `code > bin`.
    When a threshold falls outside its bracket or the candidates overflow the slots, one
    `lax.cond` runs the radix selection over every entry instead: the same masks. With `packed`
    the masks come as one packed bool array (`Packing.of` the leaves' shapes), not per leaf;
    `prefer_packed` is `prefer` packed so, where the caller has it.
    """
    packing = Packing.of([np.shape(v) for v in values])
    row_leaf = packing.row_leaf()
    r, c = packing.total_rows, packing.chunk
    entries = r * c
    capacity = swap_capacity(entries) if capacity is None else capacity
    flat = [jnp.ravel(v) for v in values]
    plan = _sampled_plan(packing, row_leaf, flat, keep, capacity)
    prefs = None if prefer is None else [jnp.ravel(jnp.asarray(p, bool)) for p in prefer]

    def sampled():
        valid = plan.slots < entries
        at = jnp.minimum(plan.slots, entries - 1)
        leaf_of = row_leaf[at // c]
        # The candidates' keys (and preferences), read from the leaves.
        offsets = np.cumsum([0, *packing.sizes])[:-1] - np.asarray(packing.starts) * c
        source = at + jnp.asarray(offsets, jnp.int32)[leaf_of]
        key = ordered_keys(_take_flat(flat, source))
        if prefer_packed is not None:
            pref = prefer_packed.reshape(-1)[at]
        elif prefs is not None:
            pref = _take_flat(prefs, source)
        else:
            pref = jnp.zeros_like(valid)
        leaf = jnp.where(valid, leaf_of, len(keep))
        # Each candidate's rank in its leaf: key descending, preferred first, then slot order
        # (which is index order).
        tie = lax.iota(jnp.int32, capacity) + jnp.where(pref, 0, capacity)
        rank = _rank_among(leaf, ~key, tie)
        quota = jnp.concatenate([plan.take, jnp.zeros((1,), jnp.int32)])[leaf]
        chosen = jnp.where(valid & (rank < quota), plan.slots, entries)
        above = jnp.uint8(_SUB_BINS + 1)
        raised = plan.code.reshape(-1).at[chosen].set(above, mode="drop")
        raised = raised.reshape(plan.code.shape)
        if packed:  # padding is never kept, not even by a leaf that keeps all
            least = (plan.cut + 1).astype(jnp.uint8)[row_leaf][None, :, None]
            return (raised >= least) & _real(packing, row_leaf)
        return _unpack_above(packing, raised, plan.cut)

    def radix():
        index, real = packing.indices(row_leaf)
        preferred = prefer_packed
        if preferred is None and prefs is not None:
            preferred = packing.pack(prefs, False)
        chosen = _select_batched(
            packing,
            row_leaf,
            ordered_keys(packing.pack(flat, 0)),
            index,
            real,
            None,
            jnp.asarray(keep, jnp.int32).reshape(-1, 1),
            digit_bits,
            prefer=preferred,
        )
        return chosen if packed else packing.unpack(chosen)

    return lax.cond(jnp.all(plan.valid) & (plan.count <= capacity), sampled, radix)


def sampled_candidates(
    values: Sequence[jax.Array], keep: Sequence[int], capacity: int | None = None
) -> tuple[jax.Array, int, jax.Array]:
    """What the one-device batched top-k of `values` decides among themselves: a diagnostic.

    Returns `(count, capacity, fast)`: how many entries share their leaf's threshold bin (the
    candidates ranked among themselves), the slots they have (`capacity`, default
    `swap_capacity` of the packed entries), and whether the top-k takes that path (every
    threshold in its sampled bracket and the candidates fit); else it takes the radix passes
    over every entry (same masks, more time). jit-able; float32 leaves.
    """
    flat = [jnp.ravel(jnp.asarray(v, jnp.float32)) for v in values]
    packing = Packing.of([np.shape(v) for v in values])
    capacity = swap_capacity(packing.total_rows * packing.chunk) if capacity is None else capacity
    plan = _sampled_plan(packing, packing.row_leaf(), flat, keep, capacity)
    return plan.count, capacity, jnp.all(plan.valid) & (plan.count <= capacity)


def _unpack_above(packing: Packing, codes: jax.Array, cut: jax.Array) -> list[jax.Array]:
    """Per leaf, `codes > cut[leaf]` in the leaf's shape: each leaf's slice of the packed codes
    compared where it is read (one kernel per leaf, a byte read and a bool written per entry)."""
    # `code > cut` as `code >= cut + 1` in bytes (cut + 1 is in 0 .. 255): a conversion of the
    # codes would sit between them and the slices.
    least = (cut + 1).astype(jnp.uint8)
    out = []
    for leaf, (s, r) in enumerate(zip(packing.starts, packing.rows, strict=True)):
        y = codes[:, s : s + r].reshape(packing.groups, r * packing.chunk)[:, : packing.parts[leaf]]
        out.append(packing._merge(y >= least[leaf], leaf))
    return out


# The restricted refresh's swap selection runs over the compacted proposed swaps when they fit
# in this many slots (all groups together): `clip(entries // _SWAP_SHARE, _SWAP_MIN, _SWAP_MAX)`,
# at most the entries. Its cost grows with the square of the slots (every swap is ranked against
# every other), so the slots are capped; a refresh that proposes more takes the radix passes
# over every entry instead (the same masks).
_SWAP_SHARE = 4096
_SWAP_MIN = 1024
_SWAP_MAX = 16384


def swap_capacity(entries: int) -> int:
    """The default number of compacted slots of a restricted refresh over `entries` scores."""
    return min(entries, max(_SWAP_MIN, min(_SWAP_MAX, entries // _SWAP_SHARE)))


def _rank_among(group: jax.Array, order: jax.Array, tie: jax.Array) -> jax.Array:
    """int32 per entry: how many entries of its group come before it by (`order`, `tie`)
    ascending (distinct ties: a strict total order within every group).

    A count over all pairs. Accelerators fuse the pairwise compare into the sum; XLA's CPU
    backend writes it out first (4 MB for 1,024 entries, 155 MB for 6,227), so there the count
    runs over blocks of 128 entries in turn.
    """
    n = group.shape[0]

    def count(g, o, t):
        before = (group[None, :] == g[:, None]) & (
            (order[None, :] < o[:, None])
            | ((order[None, :] == o[:, None]) & (tie[None, :] < t[:, None]))
        )
        return jnp.sum(before, axis=1, dtype=jnp.int32)

    def blocked(group, order, tie):
        size = -(-n // 128) * 128
        rows = [jnp.pad(x, (0, size - n)).reshape(-1, 128) for x in (group, order, tie)]
        return lax.map(lambda r: count(*r), tuple(rows)).reshape(-1)[:n]

    return lax.platform_dependent(group, order, tie, cpu=blocked, default=lambda *a: count(*a))


def _swaps_compacted(
    packing: Packing,
    row_leaf: jax.Array,
    keys: jax.Array,
    index: jax.Array,
    revive: jax.Array,
    remove: jax.Array,
    n: jax.Array,
    all_made: jax.Array,
    slots: jax.Array,
    count: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The swap selection of `_refresh_batched` over the compacted proposed swaps.

    Args:
      n: int32 `[leaves, 1]`, the swaps to make per leaf.
      all_made: bool `[leaves]`, the leaves that make every proposed swap (written elsewhere).
      slots: int32 `[groups, capacity]`, each group's flat positions of its proposed swaps
        (revivals and removals) in increasing order, `rows * chunk` past the last.
      count: int32 `[groups]`, how many there are (at most `capacity`).

    Returns:
      `(positions, value)`, both `[groups, capacity]`: where to write in each group's flat
      entries (`rows * chunk`: nowhere) and the new mask there (True for a revival made, False
      for a removal made, the old mask for a swap not made).
    """
    g, r, c = keys.shape
    width = r * c
    capacity = slots.shape[1]
    valid = lax.broadcasted_iota(jnp.int32, slots.shape, 1) < count[:, None]
    at = jnp.minimum(slots, width - 1)

    def take(x):
        return jnp.take_along_axis(x.reshape(g, width), at, axis=1)

    key, side, come_in = take(keys), take(remove), take(revive)
    leaves = len(packing.sizes)
    leaf = jnp.where(valid, row_leaf[at // c], leaves)
    if _index_ordered(packing):
        # The slots hold each leaf's swaps in index order (group by group): their order is it.
        tie = lax.iota(jnp.int32, g * capacity)
    else:
        tie = take(jnp.broadcast_to(index, (g, r, c))).reshape(-1)
    # One order per (leaf, side): revivals by key descending, then the lower index; removals by
    # key ascending, then the higher index. `order` and `tie` ascending give both.
    code = (2 * leaf + side.astype(jnp.int32)).reshape(-1)
    order = jnp.where(side, key, ~key).reshape(-1)
    tie = jnp.where(side.reshape(-1), -tie, tie)
    # Every swap's rank among the swaps of its (leaf, side): a count over all pairs.
    rank = _rank_among(code, order, tie).reshape(g, capacity)
    quota = jnp.concatenate([n[:, 0], jnp.zeros((1,), n.dtype)])[leaf]
    skip = jnp.concatenate([all_made, jnp.ones((1,), bool)])[leaf]
    made = rank < quota
    return jnp.where(skip, width, slots), jnp.where(made, come_in, ~come_in)


def _refresh_batched(
    values: Sequence[jax.Array],
    old: Sequence[jax.Array],
    keep: Sequence[int],
    rate,
    digit_bits: int,
    layout: Layout | None = None,
    capacity: int | None = None,
) -> list[jax.Array]:
    packing, sharding = _packing(values, layout)
    row_leaf = packing.row_leaf()
    index, real = packing.indices(row_leaf, sharding)
    was = packing.pack([jnp.asarray(m, bool) for m in old], False, sharding)
    k = jnp.asarray(keep, jnp.int32).reshape(-1, 1)
    # The packed keys, for the swaps below. (Packed out here, not inside the conditional from the
    # leaves: as a conditional's operands, the leaves got their own layout copies in a search
    # step compiled for an H200, 48 kernels instead of 10 for ResNet-32.)
    packed = ordered_keys(packing.pack(values, 0, sharding))
    # The exact top-k with ties to the entries kept now: the refresh at rate 1 (on one device the
    # sampled top-k).
    if _sampled_applies(values, layout):
        target = _topk_sampled(values, keep, old, digit_bits, packed=True, prefer_packed=was)
    else:
        target = _select_batched(
            packing, row_leaf, packed, index, real, None, k, digit_bits, prefer=was
        )
    revive = target & ~was
    remove = was & ~target
    proposed = packing.leaf_sums(jnp.sum(revive, axis=-1, dtype=jnp.int32)[..., None])
    n = n_swaps(rate, proposed)
    every = _per_entry(n == proposed, row_leaf, None)
    g, r, c = packed.shape
    if capacity is None:
        capacity = swap_capacity(g * r * c)
    per_group = max(1, -(-capacity // g))
    # Each group compacts its own proposed swaps (where it lives, when sharded).
    slots, count = jax.vmap(lambda m: compact_indices(m, per_group, None if g == 1 else 1))(
        (revive | remove).reshape(g, -1)
    )

    def compacted():
        # Only the proposed swaps can change: rank them among themselves and write the swaps
        # made over the old masks (a leaf that makes all of them gets its top-k, as below).
        all_made = n[:, 0] == proposed[:, 0]
        positions, value = _swaps_compacted(
            packing, row_leaf, packed, index, revive, remove, n, all_made, slots, count
        )
        base = jnp.where(every, target, was).reshape(g, -1)
        new = jax.vmap(lambda m, i, v: m.at[i].set(v, mode="drop"))(base, positions, value)
        return new.reshape(g, r, c)

    def whole():
        # Two selections of n per leaf at once, on disjoint entries: the highest-scored
        # revivals (ties: lower index first) and the lowest-scored removals (inverted keys;
        # ties: higher index).
        swap = _select_batched(
            packing,
            row_leaf,
            jnp.where(remove, ~packed, packed),
            index,
            revive | remove,
            remove,
            jnp.concatenate([n, n], axis=1),
            digit_bits,
            from_end=True,
        )
        restricted = (was & ~(swap & remove)) | (swap & revive)
        return jnp.where(every, target, restricted)

    return packing.unpack(lax.cond(jnp.all(count <= per_group), compacted, whole))


# ---------------------------------------------------------------------------------------------
# Entry points.


def resolve(selection: str) -> str:
    """`'batched'` or `'bracketed'`: what `'auto'` means on this backend, or the name given."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown `selection` {selection!r}; allowed: {', '.join(SELECTIONS)}")
    if selection == "auto":
        return "bracketed" if jax.default_backend() == "cpu" else "batched"
    return selection


def _float_values(values: Sequence[jax.Array]) -> list[jax.Array]:
    """The leaves as floats of one dtype: float32, or float64 when any leaf is float64.

    Both conversions are exact and keep the order, so a leaf ranks alike in either dtype.
    """
    leaves = [jnp.asarray(v) for v in values]
    dtype = jnp.float64 if any(x.dtype == jnp.float64 for x in leaves) else jnp.float32
    return [x.astype(dtype) for x in leaves]


def topk(
    values: Sequence[jax.Array],
    keep: Sequence[int],
    prefer: Sequence[jax.Array] | None = None,
    *,
    selection: str = "auto",
    digit_bits: int = DIGIT_BITS,
    layout: Layout | None = None,
    capacity: int | None = None,
) -> list[jax.Array]:
    """Per leaf, the exact top `keep[l]` of `values[l]` as a bool mask of its shape.

    Order: value descending (as `ordered_keys` orders them: -0.0 == +0.0, NaN largest), then
    `prefer[l]` first, then the lower flat index: the first `keep[l]` entries of a stable
    descending sort.

    Args:
      values: float arrays per leaf (the scores, or what is ranked of them).
      keep: static ints in `[0, size]`.
      prefer: optional bool arrays (one per leaf, of its shape) that win ties.
      selection: `'auto'`, `'batched'` or `'bracketed'` (same result).
      digit_bits: radix digit width of the batched selection's passes over every entry (1, 2,
        4 or 8; the sampled one-device selection's passes over its sample and codes use 4).
      layout: how the batched selection splits the leaves over devices (`Layout`); the result
        does not depend on it.
      capacity: the batched selection's slots for the entries it decides among themselves
        (static; default `swap_capacity` of the packed entries): on one device it brackets each
        leaf's threshold from a sample and ranks the entries of the bin that holds it; when
        they do not fit (or a threshold falls outside its bracket) it takes the radix passes
        over every entry instead. Same result.
    """
    if not values:
        return []
    leaves = _float_values(values)
    if resolve(selection) == "bracketed":
        prefs = [None] * len(leaves) if prefer is None else prefer
        return [
            _topk_bracketed(
                ordered_keys(x).ravel(), n, None if p is None else jnp.asarray(p, bool).ravel()
            ).reshape(np.shape(x))
            for x, n, p in zip(leaves, keep, prefs, strict=True)
        ]
    return _topk_batched(leaves, keep, prefer, digit_bits, layout, capacity)


def refresh(
    values: Sequence[jax.Array],
    old: Sequence[jax.Array],
    keep: Sequence[int],
    rate,
    *,
    selection: str = "auto",
    digit_bits: int = DIGIT_BITS,
    layout: Layout | None = None,
    capacity: int | None = None,
) -> list[jax.Array]:
    """Per leaf, new masks that make `n_swaps(rate, c)` of the `c` swaps the exact top-k proposes.

    The exact top-k of the new values (ties: kept in `old` first, then the lower index) proposes
    `c` revivals and `c` removals; the `n` highest revivals come in (ties: lower index first) and
    the `n` lowest removals go out (ties: higher index first). With `n == c` the result is that
    top-k.

    Args:
      values: float arrays per leaf (the new scores, or what is ranked of them).
      old: bool masks per leaf (of its shape), each with exactly `keep[l]` entries.
      keep: static ints.
      rate: the share of swaps to make, in [0, 1]; may be traced.
      selection, digit_bits, layout: as in `topk`.
      capacity: the batched selection's slots for the proposed swaps (static; default
        `swap_capacity` of the packed entries). The swaps are selected among themselves when
        they fit, else by radix passes over every entry; both give the same masks.

    Returns:
      Bool masks per leaf, in the leaves' shapes.
    """
    if not values:
        return []
    leaves = _float_values(values)
    if resolve(selection) == "bracketed":
        return [
            _refresh_bracketed(
                ordered_keys(x).ravel(), jnp.asarray(m, bool).ravel(), n, rate
            ).reshape(np.shape(x))
            for x, m, n in zip(leaves, old, keep, strict=True)
        ]
    return _refresh_batched(leaves, old, keep, rate, digit_bits, layout, capacity)


def top_eligible(
    values: Sequence[jax.Array],
    eligible: Sequence[jax.Array],
    count: Sequence[jax.Array | int],
    *,
    selection: str = "auto",
    digit_bits: int = DIGIT_BITS,
) -> list[jax.Array]:
    """Per leaf, the `count[l]` highest-valued entries among `eligible[l]` (ties: lower index).

    The come-in half of a restricted refresh with a count known only at run time (the N:M
    refresh, which pairs the removals group by group itself). `count[l]` may be traced; it is
    clamped to the number of eligible entries.

    Args:
      values: float arrays per leaf.
      eligible: bool arrays per leaf (of the leaf's shape).
      count: int32 scalars per leaf.
      selection, digit_bits: as in `topk` (same result).

    Returns:
      Flat bool masks per leaf, each within `eligible[l]`.
    """
    if not values:
        return []
    leaves = [x.ravel() for x in _float_values(values)]
    elig = [jnp.ravel(jnp.asarray(e, bool)) for e in eligible]
    counts = [jnp.asarray(c, jnp.int32) for c in count]
    if resolve(selection) == "bracketed":
        return [
            _top_eligible_bracketed(ordered_keys(x), e, c)
            for x, e, c in zip(leaves, elig, counts, strict=True)
        ]
    packing, _ = _packing(leaves, None)
    row_leaf = packing.row_leaf()
    index, real = packing.indices(row_leaf)
    chosen = _select_batched(
        packing,
        row_leaf,
        ordered_keys(packing.pack(leaves)),
        index,
        real & packing.pack(elig, False),
        None,
        jnp.stack(counts).reshape(-1, 1),
        digit_bits,
    )
    return packing.unpack(chosen)


def _top_eligible_bracketed(keys: jax.Array, eligible: jax.Array, count: jax.Array) -> jax.Array:
    """`top_eligible` of one flat leaf: a bisection, skipped when every candidate is taken."""

    def some():
        threshold = kth_key(keys, count, eligible=eligible)
        return select_at(keys, count, threshold, eligible=eligible)

    return lax.cond(count >= _count(eligible), lambda: eligible, some)
