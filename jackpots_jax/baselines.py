"""One-shot pruning baselines: magnitude, Wanda and SparseGPT masks, under any budget or pattern.

The rows a learned mask is compared with (dense, magnitude, Wanda, SparseGPT): each one prunes a
pre-trained network once, from its weights and, for Wanda and SparseGPT, statistics of every
masked kernel's inputs on a few calibration batches. They take the same budgets as the search
(`layer_budgets(params, sparsity, rule=..., pattern=...)`), so a baseline and a jackpot keep
exactly as many weights in every layer (and every N:M group).

Conventions (kernels are Flax's: input axes first, output axes last):

* A kernel's leading `input_axes` axes are its input axes (by default every axis but the last;
  `Structured` budget entries carry their own count, plain `int` entries take `input_axes`, the
  same regex mapping as `layer_budgets`). Its `[fan_in, fan_out]` view flattens them in order, so
  an *output* (a row of PyTorch's `[out, in]` Linear weight) is a column of that view, and input
  channel `j` is row `j`. Calibration inputs `X` are `[n, fan_in]` in that order (a Dense layer's
  inputs as they are; a channels-last conv's im2col patches).
* Statistics (`init_stats`, `update_stats`) are keyed by the masked leaf's path string as
  `jackpots_jax.sparsity_report` prints it (`'layers/0/mlp/up/kernel'`), and hold `X^T X`, the
  per-input squared norms `sum_n x_nj^2` (its diagonal) and the row count, accumulated in float32.
* Ties follow the project's rule: among equal scores the lower flat index is kept (within an
  output, the lower input index), so every mask is the first `keep` of a stable descending sort.

Magnitude ranks `|W|`; Wanda (Sun et al. 2024) ranks `|W_ij| ||X_j||_2`. Both compare weights
within the layer (`comparison='layer'`, magnitude's default) or within each output
(`comparison='output'`, Wanda's default, as the Wanda paper does for unstructured sparsity; the
layer's count is split over its outputs as evenly as it goes, the first `p mod fan_out` outputs
pruning one more). Under an N:M budget every group of M consecutive inputs of one output keeps its
top N (the groups already lie within an output); under `block:B`/`channel` tiles are ranked by
their summed score, within the layer.

SparseGPT (Frantar & Alistarh 2023) prunes the inputs of a kernel one after the other, in the
order of the `[fan_in, fan_out]` view, and moves each pruned weight's error onto the inputs not
yet visited through the inverse Hessian of the layer's reconstruction loss; see `sparsegpt`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jackpots_jax import patterns, select
from jackpots_jax._tree import PyTree, map_budget, map_budget_with_path
from jackpots_jax.masks import _check_count, budget_leaves, rebuild, topk_masks
from jackpots_jax.patterns import Pattern, is_structured, tile_sums
from jackpots_jax.sparsity import _exact_fraction

COMPARISONS = ("layer", "output")
HIGHEST = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Calibration statistics.


class CalibrationStats(NamedTuple):
    """What the baselines need of one kernel's calibration inputs `X [n, fan_in]`.

    Attributes:
      gram: `X^T X`, `[fan_in, fan_in]` (SparseGPT's Hessian up to a factor), or `None` when only
        the norms are tracked (Wanda).
      sq_norms: `sum_n X[n, j]^2` per input channel, `[fan_in]`.
      count: rows seen (int32 scalar).
    """

    gram: jax.Array | None
    sq_norms: jax.Array
    count: jax.Array

    @property
    def norms(self) -> jax.Array:
        """`||X_j||_2` per input channel (Wanda's input norms)."""
        return jnp.sqrt(self.sq_norms)


def init_stats(
    dims: Mapping[str, int], *, gram: bool = True, dtype: Any = jnp.float32
) -> dict[str, CalibrationStats]:
    """Empty calibration statistics for kernels of the given input sizes.

    Args:
      dims: kernel path -> `fan_in` (the size of its input `X`'s last axis).
      gram: also accumulate `X^T X` (SparseGPT needs it, Wanda does not; it costs `fan_in^2`).
      dtype: the accumulation dtype (float32; float64 under `jax_enable_x64`).

    Returns:
      `{path: CalibrationStats}` of zeros.

    Example:
      >>> stats = init_stats({'mlp/up/kernel': 64})
      >>> stats = update_stats(stats, {'mlp/up/kernel': x})   # x: [batch, seq, 64]
    """
    out = {}
    for path, d in dims.items():
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"`dims[{path!r}]` must be a positive int (fan_in), got {d!r}")
        out[path] = CalibrationStats(
            jnp.zeros((d, d), dtype) if gram else None,
            jnp.zeros((d,), dtype),
            jnp.zeros((), jnp.int32),
        )
    return out


def update_stats(
    stats: Mapping[str, CalibrationStats], inputs: Mapping[str, jax.Array], *, chunk: int = 2048
) -> dict[str, CalibrationStats]:
    """Statistics with one more batch of inputs folded in; jit-able (a fold over batches).

    Rows are cast to the statistics' dtype `chunk` at a time, so a batch of bfloat16 activations
    never exists whole in float32; the products run at full float32 precision (no TF32).

    Args:
      stats: from `init_stats` (or a previous `update_stats`).
      inputs: path -> the kernel's inputs `[..., fan_in]` (leading axes are rows: batch, sequence).
        Paths missing here keep their statistics, so layers may be calibrated one at a time.
      chunk: rows per product.

    Returns:
      The updated `{path: CalibrationStats}`.
    """
    unknown = sorted(set(inputs) - set(stats))
    if unknown:
        raise KeyError(f"inputs for {unknown} have no statistics; known paths: {sorted(stats)}")
    out = dict(stats)
    for path, x in inputs.items():
        s = stats[path]
        d = s.sq_norms.shape[0]
        if np.shape(x)[-1:] != (d,):
            raise ValueError(
                f"inputs for {path!r} have shape {np.shape(x)}; their last axis must be the "
                f"kernel's fan_in {d}"
            )
        out[path] = _accumulate(s, jnp.reshape(x, (-1, d)), chunk)
    return out


def _accumulate(s: CalibrationStats, x: jax.Array, chunk: int) -> CalibrationStats:
    n, d = x.shape
    dtype = s.sq_norms.dtype
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    # Zero rows add nothing to either sum.
    blocks = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, d)

    def add(carry, xb):
        g, q = carry
        xb = xb.astype(dtype)
        q = q + jnp.sum(xb * xb, axis=0)
        if g is not None:
            g = g + jnp.dot(xb.T, xb, precision=HIGHEST)
        return (g, q), None

    (g, q), _ = lax.scan(add, (s.gram, s.sq_norms), blocks)
    return CalibrationStats(g, q, s.count + n)


# ---------------------------------------------------------------------------------------------
# Leaves: input axes and per-leaf statistics.


def _input_axes_of(name: str, shape: tuple[int, ...], entry: Any, rules) -> int:
    if is_structured(entry):
        return entry.input_axes
    k = len(shape) - 1
    for regex, value in rules:
        if regex.search(name):
            k = value
            break
    if not 1 <= k < len(shape):
        raise ValueError(
            f"`input_axes` gives {name!r} (shape {shape}) {k} input axes; allowed: "
            f"1..{len(shape) - 1}"
        )
    return k


def _axes_rules(input_axes: Mapping[str, int] | None) -> list[tuple[re.Pattern, int]]:
    rules = []
    for key, value in (input_axes or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"`input_axes[{key!r}]` must be an int, got {value!r}")
        rules.append((re.compile(key), int(value)))
    return rules


def _lookup(name: str, table: Mapping[str, Any], what: str) -> Any:
    if name not in table:
        raise KeyError(
            f"no {what} for masked leaf {name!r}; {what} are keyed by leaf path, known: "
            f"{sorted(table)}"
        )
    return table[name]


def _norms_of(name: str, value: Any, shape: tuple[int, ...], k: int) -> jax.Array:
    norms = value.norms if isinstance(value, CalibrationStats) else jnp.asarray(value)
    fan_in = math.prod(shape[:k])
    if norms.shape not in ((fan_in,), tuple(shape[:k])):
        raise ValueError(
            f"input norms for {name!r} have shape {norms.shape}; the kernel {shape} has fan_in "
            f"{fan_in} (expected ({fan_in},) or {tuple(shape[:k])})"
        )
    return norms.reshape(tuple(shape[:k]) + (1,) * (len(shape) - k))


# ---------------------------------------------------------------------------------------------
# Masks from scores.


def _descending_ranks(keys: jax.Array, axis: int = 0) -> jax.Array:
    """Each entry's place along `axis` in the order: key descending, then the lower index.

    One-shot selections, so a stable sort is fine here (the search's refresh never sorts).
    """
    # A stable ascending sort of the inverted keys puts equal keys in index order.
    order = jnp.argsort(~keys, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis)


def _output_topk(scores: jax.Array, pruned: int, k: int) -> jax.Array:
    """Per output (column of the `[fan_in, fan_out]` view), the exact top of `scores`.

    The layer's `pruned` weights are split over the outputs: `pruned // fan_out` each, one more for
    the first `pruned % fan_out`.
    """
    shape = scores.shape
    fan_in = math.prod(shape[:k])
    fan_out = math.prod(shape) // fan_in
    q, r = divmod(pruned, fan_out)
    keep = fan_in - q - (jnp.arange(fan_out) < r)
    rank = _descending_ranks(select.ordered_keys(scores.reshape(fan_in, fan_out)))
    return (rank < keep).reshape(shape)


def masks_from_scores(
    scores: PyTree,
    budget: PyTree,
    *,
    comparison: str = "layer",
    input_axes: Mapping[str, int] | None = None,
) -> PyTree:
    """Masks that keep the highest `scores` at the budget, within each layer or each output.

    Args:
      scores: one score per weight (the kernels' shapes), with the budget's structure.
      budget: from `layer_budgets` (`int` or `Structured` entries, `None` where not masked).
      comparison: `'layer'` (the exact per-layer top-k; tiles by summed score) or `'output'` (each
        output's inputs among themselves; N:M groups are within an output either way; not for
        `block:B`/`channel`).
      input_axes: regex -> input-axis count for plain-`int` leaves that are not `[in, out]`/HWIO.

    Returns:
      Bool element masks with the budget's structure.
    """
    if comparison not in COMPARISONS:
        raise ValueError(f"unknown `comparison` {comparison!r}; allowed: {', '.join(COMPARISONS)}")
    rules = _axes_rules(input_axes)
    leaves = budget_leaves(budget, scores)
    spec, values = [], []
    for name, entry, s in leaves:
        s = jnp.asarray(s)
        _check_count(name, entry, s.size)
        if is_structured(entry) and entry.unit > 1 and comparison == "output":
            raise ValueError(
                f"comparison='output' ranks single weights within an output; pattern "
                f"{entry.pattern} of {name!r} prunes whole tiles: use comparison='layer'"
            )
        per_output = comparison == "output" and not is_structured(entry)
        spec.append((entry, _input_axes_of(name, s.shape, entry, rules) if per_output else None))
        values.append(s)
    return rebuild(budget, _select_leaves(tuple(values), tuple(spec)))


@functools.partial(jax.jit, static_argnames="spec")
def _select_leaves(scores: tuple[jax.Array, ...], spec: tuple) -> list[jax.Array]:
    """The masks of `masks_from_scores`, compiled once per budget (`spec`: per leaf its entry and
    its input axes when it is compared within outputs)."""
    out: list[Any] = [None] * len(spec)
    layer_entries, layer_scores = [], []
    for slot, (s, (entry, k)) in enumerate(zip(scores, spec, strict=True)):
        if k is not None:
            out[slot] = _output_topk(s, int(entry), k)
            entry = None
        elif is_structured(entry) and entry.unit > 1:
            s = tile_sums(s, entry.tile)
        layer_entries.append(entry)
        layer_scores.append(s)
    layer = topk_masks(layer_scores, layer_entries)
    return [m if o is None else o for o, m in zip(out, layer, strict=True)]


def magnitude_masks(
    params: PyTree,
    budget: PyTree,
    *,
    comparison: str = "layer",
    input_axes: Mapping[str, int] | None = None,
) -> PyTree:
    """One-shot magnitude pruning: keep the largest `|w|` at the budget.

    With `comparison='layer'` these are `init_scores(params, budget, 'magnitude')`'s masks (the
    search's initial mask; under N:M the top-N `|w|` of every group).

    Example:
      >>> masks = magnitude_masks(params, layer_budgets(params, None, pattern="2:4"))
    """
    scores = map_budget(lambda _, w: jnp.abs(jnp.asarray(w, jnp.float32)), budget, params)
    return masks_from_scores(scores, budget, comparison=comparison, input_axes=input_axes)


def wanda_scores(
    params: PyTree,
    budget: PyTree,
    input_norms: Mapping[str, Any],
    *,
    input_axes: Mapping[str, int] | None = None,
) -> PyTree:
    """Wanda's scores `|W_ij| ||X_j||_2` (input channel `j`), with the budget's structure.

    Args:
      params, budget: as for `wanda_masks`.
      input_norms: path -> `||X_j||_2` (`[fan_in]` or the input axes' shape) or the path's
        `CalibrationStats`.
      input_axes: as for `masks_from_scores`.
    """
    rules = _axes_rules(input_axes)

    def score(name, entry, w):
        w = jnp.asarray(w, jnp.float32)
        k = _input_axes_of(name, w.shape, entry, rules)
        norms = _norms_of(name, _lookup(name, input_norms, "input norms"), w.shape, k)
        return jnp.abs(w) * norms.astype(jnp.float32)

    return map_budget_with_path(score, budget, params)


def wanda_masks(
    params: PyTree,
    budget: PyTree,
    input_norms: Mapping[str, Any],
    *,
    comparison: str = "output",
    input_axes: Mapping[str, int] | None = None,
) -> PyTree:
    """Wanda (Sun et al. 2024): keep the largest `|W_ij| ||X_j||_2` at the budget.

    Args:
      params: the pre-trained parameters.
      budget: from `layer_budgets` (any rule; unstructured, N:M, `block:B`, `channel`).
      input_norms: path -> the kernel's input norms `||X_j||_2` (`[fan_in]`), or the path's
        `CalibrationStats` (from `update_stats`).
      comparison: `'output'` (the Wanda paper: weights compete within each output) or `'layer'`.
      input_axes: as for `masks_from_scores`.

    Returns:
      Bool masks with the budget's structure, over the unchanged weights.

    Example:
      >>> stats = update_stats(init_stats(dims, gram=False), calibration_inputs)
      >>> masks = wanda_masks(params, layer_budgets(params, None, pattern="2:4"), stats)
    """
    scores = wanda_scores(params, budget, input_norms, input_axes=input_axes)
    return masks_from_scores(scores, budget, comparison=comparison, input_axes=input_axes)


# ---------------------------------------------------------------------------------------------
# SparseGPT.


def _block_keeps(pruned: int, fan_in: int, fan_out: int, blocksize: int, blocks: int) -> np.ndarray:
    """Weights kept in every block of inputs, the layer's `pruned` split in proportion exactly."""
    ends = np.minimum(np.arange(1, blocks + 1) * blocksize, fan_in)
    starts = np.concatenate([[0], ends[:-1]])
    cut = np.array([pruned * int(e) // fan_in for e in ends])
    pruned_b = cut - np.concatenate([[0], cut[:-1]])
    return ((ends - starts) * fan_out - pruned_b).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("nm", "blocksize"))
def _sparsegpt_2d(w, gram, keeps, percdamp, *, nm, blocksize):
    """SparseGPT on a `[fan_in, fan_out]` kernel; see `sparsegpt`."""
    d, o = w.shape
    dtype = jnp.promote_types(jnp.promote_types(w.dtype, gram.dtype), jnp.float32)
    w = w.astype(dtype)
    h = 2 * gram.astype(dtype)
    diag = jnp.diagonal(h)
    dead = diag == 0
    # A dead input (never nonzero) has a zero row and column in H: unit diagonal decouples it and
    # its weights, which never touch the output, are zeroed (and pruned first: their score is 0).
    h = h + jnp.diag(dead.astype(dtype) + percdamp * jnp.mean(diag))
    w = jnp.where(dead[:, None], 0, w)
    chol = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(d, dtype=dtype))
    # Upper U with U^T U = H^-1: row i of U holds the updates of inputs i.. when input i is fixed.
    u = jnp.linalg.cholesky(hinv).T

    bs = blocksize
    blocks = keeps.shape[0]
    dp = blocks * bs
    # Padded inputs: zero weights, decoupled unit Hessian, never selected; cut off at the end.
    w = jnp.pad(w, ((0, dp - d), (0, 0)))
    u = jnp.pad(u, ((0, dp - d), (0, dp - d))) + jnp.diag((jnp.arange(dp) >= d).astype(dtype))
    real = jnp.arange(dp) < d

    def column(i, hb, carry):
        """Fix input `i` of the block: keep or zero it, push its error onto the later inputs."""
        w1, q1, e1, keep = carry
        wi = w1[i]
        qi = jnp.where(keep[i], wi, 0)
        err = (wi - qi) / hb[i, i]
        # hb[i, j] is 0 for j < i (U is upper), so only inputs i.. change; input i is done.
        w1 = w1 - hb[i][:, None] * err[None, :]
        return w1, q1.at[i].set(qi), e1.at[i].set(err), keep

    def block(carry, xs):
        w, mask = carry
        start, keep_count = xs
        w1 = lax.dynamic_slice(w, (start, 0), (bs, o))
        rows = lax.dynamic_slice(u, (start, 0), (bs, dp))
        hb = lax.dynamic_slice(rows, (0, start), (bs, bs))
        zeros = jnp.zeros_like(w1)
        if nm is None:
            # The block's mask, chosen once from its weights as the earlier blocks left them.
            keys = select.ordered_keys((w1 / jnp.diagonal(hb)[:, None]) ** 2)
            # Padded inputs get the lowest key (below +0.0's): never among the kept.
            keys = jnp.where(lax.dynamic_slice(real, (start,), (bs,))[:, None], keys, 0)
            keep = _descending_ranks(keys.ravel()).reshape(bs, o) < keep_count
            carry = (w1, zeros, zeros, keep)
            w1, q1, e1, keep = lax.fori_loop(0, bs, lambda i, c: column(i, hb, c), carry)
        else:
            n, m = nm

            def group(g, c):
                # Each group's mask is chosen when the sweep reaches it, from the updated weights.
                w1, q1, e1, keep = c
                i0 = g * m
                wg = lax.dynamic_slice(w1, (i0, 0), (m, o))
                dg = lax.dynamic_slice(jnp.diagonal(hb), (i0,), (m,))
                keys = select.ordered_keys((wg / dg[:, None]) ** 2)
                kg = patterns.group_ranks(keys, 0, m) < n
                c = (w1, q1, e1, lax.dynamic_update_slice(keep, kg, (i0, 0)))
                return lax.fori_loop(i0, i0 + m, lambda i, c: column(i, hb, c), c)

            carry = (w1, zeros, zeros, jnp.zeros((bs, o), bool))
            w1, q1, e1, keep = lax.fori_loop(0, bs // m, group, carry)
        # Later blocks absorb this block's errors; `rows` is 0 left of the block.
        w = w - jnp.dot(rows.T, e1, precision=HIGHEST)
        w = lax.dynamic_update_slice(w, q1, (start, 0))
        return (w, lax.dynamic_update_slice(mask, keep, (start, 0))), None

    starts = jnp.arange(blocks) * bs
    (w, mask), _ = lax.scan(block, (w, jnp.zeros((dp, o), bool)), (starts, keeps))
    return mask[:d], w[:d]


def sparsegpt(
    kernel: jax.Array,
    gram: jax.Array | CalibrationStats,
    *,
    sparsity: float | None = None,
    pruned: int | None = None,
    pattern: str | Pattern = "unstructured",
    input_axes: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT (Frantar & Alistarh 2023) on one kernel: its mask and its updated weights.

    The layer's reconstruction loss `||X W - X W'||^2` has Hessian `H = 2 X^T X` over the
    inputs; damped, `H + lambda I` with `lambda = percdamp * mean(diag H)`. Let `U` be the upper
    Cholesky factor of `H^-1` (`U^T U = H^-1`). The inputs are visited in order (rows of the
    `[fan_in, fan_out]` view, i.e. PyTorch's weight columns), `blocksize` at a time:

    * unstructured: on entering a block, its mask keeps the weights with the largest
      `w_ij^2 / U_ii^2` (the OBS saliency), the block's share of the layer's count (the count
      split over blocks in proportion to their inputs, exactly);
    * N:M: on reaching each group of M inputs, every output keeps its N largest saliencies there;
    * input `i` is then fixed: `q_i = w_i * mask_i`, `e_i = (w_i - q_i) / U_ii`, and every later
      input `j > i` moves by `-U_ij e_i` (within the block at once, beyond it after the block).

    Masks are chosen from the weights as the earlier updates left them (the adaptive selection of
    the paper). Ties keep the lower index. Dead inputs (zero diagonal of `X^T X`: never nonzero
    in the calibration data) get their weights zeroed and are pruned first. The result does not
    depend on the scale of `gram` (a sum or a mean of `x x^T` alike). Computation runs in
    float32 (float64 if `gram` or `kernel` is float64); the weights come back in the kernel's
    dtype.

    Args:
      kernel: a Flax kernel (input axes first).
      gram: `X^T X` over its inputs, `[fan_in, fan_in]`, or the kernel's `CalibrationStats`.
      sparsity: the fraction of weights removed (`floor(sparsity * size)`, the decimal as
        written), or
      pruned: the number of weights removed (exact); N:M patterns imply it.
      pattern: `'unstructured'` or `'N:M'` (groups of M consecutive inputs).
      input_axes: how many leading axes are input axes (default: all but the last).
      blocksize: inputs per block (a multiple of M under N:M); the paper uses 128.
      percdamp: the damping as a fraction of the mean Hessian diagonal; the paper uses 0.01.

    Returns:
      `(mask, weights)`: the bool mask (kernel's shape) and the updated kernel, zero where pruned.

    Example:
      >>> mask, w = sparsegpt(kernel, x.T @ x, pattern="2:4")
    """
    kernel = jnp.asarray(kernel)
    shape = kernel.shape
    k = len(shape) - 1 if input_axes is None else input_axes
    if not 1 <= k < len(shape):
        raise ValueError(
            f"`input_axes` must be in [1, {len(shape) - 1}] for shape {shape}, got {k}"
        )
    pat = Pattern.parse(pattern)
    size = math.prod(shape)
    fan_in = math.prod(shape[:k])
    if pat.kind == "n:m":
        problem = patterns.divisibility_problem(pat, shape, k)
        if problem:
            raise ValueError(f"pattern {pat} does not fit a kernel of shape {shape}: {problem}")
        if blocksize % pat.m:
            raise ValueError(f"`blocksize` {blocksize} must be a multiple of M={pat.m} under {pat}")
        want = size // pat.m * (pat.m - pat.n)
        if pruned is not None and pruned != want:
            raise ValueError(f"pattern {pat} prunes exactly {want} weights, got `pruned`={pruned}")
        pruned, nm = want, (pat.n, pat.m)
    elif pat.structured:
        raise ValueError(
            f"sparsegpt prunes single weights or N:M groups; pattern {pat} is not supported "
            "(use magnitude_masks or wanda_masks)"
        )
    else:
        if (sparsity is None) == (pruned is None):
            raise ValueError("pass exactly one of `sparsity` and `pruned` (unstructured pattern)")
        if pruned is None:
            # Read as the decimal it prints as, so the count never depends on binary rounding.
            pruned = math.floor(_exact_fraction(sparsity, "sparsity") * size)
        pruned = _check_count("kernel", pruned, size)
        nm = None
    if isinstance(gram, CalibrationStats):
        if gram.gram is None:
            raise ValueError("these statistics hold no Gram matrix: init_stats(..., gram=True)")
        gram = gram.gram
    if np.shape(gram) != (fan_in, fan_in):
        raise ValueError(
            f"`gram` has shape {np.shape(gram)}; a kernel of shape {shape} with {k} input axes "
            f"needs ({fan_in}, {fan_in})"
        )
    if not blocksize >= 1:
        raise ValueError(f"`blocksize` must be a positive int, got {blocksize!r}")
    if not percdamp >= 0:
        raise ValueError(f"`percdamp` must be >= 0, got {percdamp!r}")
    fan_out = size // fan_in
    bs = min(int(blocksize), fan_in)
    keeps = _block_keeps(int(pruned), fan_in, fan_out, bs, -(-fan_in // bs))
    mask, w = _sparsegpt_2d(
        kernel.reshape(fan_in, fan_out),
        jnp.asarray(gram),
        jnp.asarray(keeps),
        jnp.asarray(percdamp, jnp.float32),
        nm=nm,
        blocksize=bs,
    )
    return mask.reshape(shape), w.reshape(shape).astype(kernel.dtype)


def sparsegpt_masks(
    params: PyTree,
    budget: PyTree,
    grams: Mapping[str, Any],
    *,
    input_axes: Mapping[str, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[PyTree, PyTree]:
    """SparseGPT over every masked leaf: the masks and the weights it reconstructs.

    Two baselines come out of one call: `apply_masks(params, masks)` is SparseGPT's mask over the
    frozen weights (what a jackpot is compared with, weights unchanged); `weights` is SparseGPT as
    published (weights changed). Layers are pruned independently, each from its own statistics
    (the paper prunes them in sequence, feeding each layer the outputs of the pruned ones before
    it; collect the statistics that way to follow it).

    Args:
      params: the pre-trained parameters.
      budget: from `layer_budgets`: unstructured (`int`, any rule) or N:M entries.
      grams: path -> `X^T X` of the kernel's inputs, or the path's `CalibrationStats`.
      input_axes: as for `masks_from_scores`.
      blocksize, percdamp: as for `sparsegpt`.

    Returns:
      `(masks, weights)`: masks with the budget's structure; `params` with every masked kernel
      replaced by its updated weights.
    """
    rules = _axes_rules(input_axes)
    results = []

    def prune(name, entry, w):
        k = _input_axes_of(name, np.shape(w), entry, rules)
        gram = _lookup(name, grams, "Gram matrices")
        if is_structured(entry):
            if entry.kind != "n:m":
                raise ValueError(
                    f"sparsegpt prunes single weights or N:M groups; {name!r} has pattern "
                    f"{entry.pattern}"
                )
            out = sparsegpt(
                w, gram, pattern=entry.pattern, input_axes=k, blocksize=blocksize, percdamp=percdamp
            )
        else:
            out = sparsegpt(
                w, gram, pruned=int(entry), input_axes=k, blocksize=blocksize, percdamp=percdamp
            )
        results.append(out)
        return out[0]

    masks = map_budget_with_path(prune, budget, params)
    it = iter(results)
    updated = map_budget(lambda _, w: next(it)[1], budget, params)
    weights = jax.tree.map(
        lambda u, w: w if u is None else u, updated, params, is_leaf=lambda x: x is None
    )
    return masks, weights
