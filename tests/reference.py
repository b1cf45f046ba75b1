"""Independent numpy references for the core functions (brute force, full stable sorts)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def topk_mask(scores, keep, current=None):
    """The first `keep` entries of a stable sort by (score desc, in `current` first, index asc)."""
    s = np.asarray(scores, np.float64).ravel()
    cur = np.zeros(s.size, bool) if current is None else np.asarray(current, bool).ravel()
    # NaN ranks above everything (all NaNs equal): a first key, and NaN replaced by 0 in the
    # second. np.lexsort sorts by the last key first; -s maps -0.0 and 0.0 to equal keys.
    nan = np.isnan(s)
    order = np.lexsort((np.arange(s.size), (~cur).astype(np.int8), -np.where(nan, 0.0, s), ~nan))
    mask = np.zeros(s.size, bool)
    mask[order[:keep]] = True
    return mask.reshape(np.shape(scores))


def restricted_refresh(scores, old, keep, rate):
    """The restricted refresh by brute force: ceil(rate * c) of the c proposed swaps, extremes
    first."""
    s = np.asarray(scores, np.float64).ravel()
    old = np.asarray(old, bool).ravel()
    target = topk_mask(s, keep, old).ravel()
    revive = np.flatnonzero(target & ~old)
    remove = np.flatnonzero(old & ~target)
    c = revive.size
    n = c if rate >= 1 else math.ceil(Fraction(repr(float(rate))) * c)
    # Highest-scored revivals (ties: lower index); lowest-scored removals (ties: higher index).
    nan = np.isnan(s)
    finite = np.where(nan, 0.0, s)
    come_in = revive[np.lexsort((revive, -finite[revive], ~nan[revive]))][:n]
    go_out = remove[np.lexsort((-remove, finite[remove], nan[remove]))][:n]
    new = old.copy()
    new[go_out] = False
    new[come_in] = True
    return new.reshape(np.shape(scores)), c, n


def first_order_pairs(values, old, proposed, grads):
    """The first-order swap check by brute force: pair the k-th revival (score desc, index asc)
    with the k-th removal (score asc, index desc); make the pair iff grads[i] - grads[j] < 0."""
    s = np.asarray(values, np.float64).ravel()
    old = np.asarray(old, bool).ravel()
    proposed = np.asarray(proposed, bool).ravel()
    g = np.asarray(grads, np.float64).ravel()
    revive = np.flatnonzero(proposed & ~old)
    remove = np.flatnonzero(old & ~proposed)
    come_in = revive[np.lexsort((revive, -s[revive]))]
    go_out = remove[np.lexsort((-remove, s[remove]))]
    new = old.copy()
    for i, j in zip(come_in, go_out, strict=True):
        if g[i] < g[j]:  # g_i w_i - g_j w_j < 0
            new[i], new[j] = True, False
    return new


def _groups(shape, axis, m):
    """Flat indices of a leaf of `shape`, one row per group of `m` consecutive entries along
    `axis`, members in axis order (which is flat-index order)."""
    index = np.moveaxis(np.arange(int(np.prod(shape))).reshape(shape), axis, -1)
    return index.reshape(-1, m)


def nm_topk_mask(scores, n, m, axis, current=None):
    """N:M: the first `n` of every group of `m` along `axis` by a stable sort of the group."""
    s = np.asarray(scores, np.float64)
    cur = np.zeros(s.shape, bool) if current is None else np.asarray(current, bool)
    mask = np.zeros(s.size, bool)
    for idx in _groups(s.shape, axis, m):
        mask[idx] = topk_mask(s.ravel()[idx], n, cur.ravel()[idx])
    return mask.reshape(s.shape)


def nm_restricted_refresh(scores, old, n, m, axis, rate):
    """The N:M restriction, per layer over groups, by brute force (see patterns.nm_refresh).

    The group-wise top-n (ties to `old`) proposes c revivals in the layer; the ceil(rate c)
    highest (ties: lower flat index) come in, and each group sends out as many of its lowest
    removals (ties: higher index) as it took in.
    """
    s = np.asarray(scores, np.float64).ravel()
    old = np.asarray(old, bool)
    shape = old.shape
    old = old.ravel()
    target = nm_topk_mask(s.reshape(shape), n, m, axis, old.reshape(shape)).ravel()
    revive = np.flatnonzero(target & ~old)
    remove = old & ~target
    c = revive.size
    k = c if rate >= 1 else math.ceil(Fraction(repr(float(rate))) * c)
    nan = np.isnan(s)
    finite = np.where(nan, 0.0, s)
    come_in = np.zeros(s.size, bool)
    come_in[revive[np.lexsort((revive, -finite[revive], ~nan[revive]))][:k]] = True
    new = old | come_in
    for idx in _groups(shape, axis, m):
        out = idx[remove[idx]]
        out = out[np.lexsort((-out, finite[out], nan[out]))][: int(come_in[idx].sum())]
        new[out] = False
    return new.reshape(shape), c, k


def tile_sums(x, tile):
    """Sums over tiles (float64)."""
    x = np.asarray(x, np.float64)
    split = [d for s, t in zip(x.shape, tile, strict=True) for d in (s // t, t)]
    return x.reshape(split).sum(axis=tuple(range(1, 2 * x.ndim, 2)))


def expand_tiles(u, tile):
    """Every entry of `u` repeated over its tile."""
    out = np.asarray(u)
    for axis, t in enumerate(tile):
        out = np.repeat(out, t, axis=axis)
    return out
