"""Which leaves are prunable, how many weights each one loses, and reports of the result.

A *budget* is a pytree with the structure of the params tree it was made from: an `int` (the number
of weights pruned, `p_l`) at every masked leaf and `None` at every other leaf. Budgets are plain
Python integers, computed once on the host before the search: they are static for `jit` and never
change during a search (swaps happen inside a layer).

Under a structured pattern (`pattern='2:4'`, `'block:4'`, `'channel'`; see
`jackpots_jax.patterns`) a masked leaf's entry is a `Structured` (frozen, static, a pytree leaf)
that carries the pattern, the kernel's shape and its input axes next to the pruned count;
`int(entry)` is that count.

Sparsity is the fraction of weights *removed*; density the fraction kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jackpots_jax._tree import PyTree, is_none, map_budget_with_path, named_leaves, path_str
from jackpots_jax.patterns import (
    INDIVISIBLE,
    Pattern,
    Structured,
    default_input_axes,
    divisibility_problem,
    is_structured,
    pattern_tile,
)

DEFAULT_DENSE = ("head",)
RULES = ("global_magnitude", "uniform", "erk", "explicit")


def _exact_fraction(value: float, field: str) -> Fraction:
    """A sparsity as the decimal the user wrote: 0.9 means 9/10, not the nearest binary float.

    `int(100 * (1 - 0.9))` is 9 in float arithmetic; counts must not depend on that rounding.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"`{field}` must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(
            f"`{field}` must be in [0, 1) (the fraction of weights removed), got {value!r}"
        )
    return Fraction(repr(value))


def _compile_patterns(dense: str | Sequence[str] | None) -> list[re.Pattern]:
    if dense is None:
        return []
    if isinstance(dense, str):
        dense = (dense,)
    try:
        return [re.compile(p) for p in dense]
    except re.error as e:
        raise ValueError(
            f"`dense` holds an invalid regular expression {e.pattern!r}: {e}"
        ) from None


def prunable_leaves(params: PyTree, dense: str | Sequence[str] | None = DEFAULT_DENSE) -> PyTree:
    """Marks the leaves a search may mask.

    A leaf is prunable when it is a floating-point array with at least two dimensions (the kernels
    of convolutions and dense layers) and its path matches none of the `dense` patterns. Biases and
    normalisation parameters (one dimension) are never prunable.

    Args:
      params: any parameter pytree (Linen `variables['params']`, an NNX `State`, nested dicts).
      dense: regular expressions searched (`re.search`) in each leaf's path, written with `/`
        between keys (e.g. `'layer1_0/conv1/kernel'`); matching leaves are kept dense. The default
        `('head',)` keeps every model's classifier dense. `None` or `()` keeps nothing dense.

    Returns:
      A pytree of Python bools with the structure of `params`.

    Example:
      >>> conv, head = jnp.ones((3, 3, 1, 4)), jnp.ones((4, 2))
      >>> prunable_leaves({'conv': {'kernel': conv}, 'head': {'kernel': head}})
      {'conv': {'kernel': True}, 'head': {'kernel': False}}
    """
    patterns = _compile_patterns(dense)

    def visit(path, leaf):
        name = path_str(path)
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or len(shape) < 2 or not jnp.issubdtype(dtype, jnp.floating):
            return False
        return not any(p.search(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(visit, params)


def _resolve_prunable(params: PyTree, prunable: PyTree | None, dense) -> PyTree:
    if prunable is None:
        return prunable_leaves(params, dense=dense)
    try:
        jax.tree.map(lambda p, x: None, prunable, params)
    except ValueError as e:
        raise ValueError(
            f"`prunable` does not have the structure of `params` (make it with "
            f"prunable_leaves(params)): {e}"
        ) from None
    return prunable


def _prunable_named(params: PyTree, prunable: PyTree) -> list[tuple[str, Any]]:
    flags = jax.tree.leaves(prunable)
    leaves = named_leaves(params)
    return [(name, leaf) for (name, leaf), flag in zip(leaves, flags, strict=True) if flag]


def _magnitudes(leaf) -> np.ndarray:
    return np.abs(np.asarray(leaf, dtype=np.float32)).ravel()


def _global_magnitude(named: list[tuple[str, Any]], sparsity: Fraction) -> dict[str, int]:
    mags = [_magnitudes(leaf) for _, leaf in named]
    pooled = np.concatenate(mags) if mags else np.zeros((0,), np.float32)
    n = pooled.size
    keep = math.floor(n * (1 - sparsity))
    if keep == 0:
        return {name: m.size for (name, _), m in zip(named, mags, strict=True)}
    # The keep-th largest pooled magnitude; everything strictly below it is pruned.
    threshold = np.partition(pooled, n - keep)[n - keep]
    return {
        name: int(np.count_nonzero(m < threshold)) for (name, _), m in zip(named, mags, strict=True)
    }


def _uniform(named: list[tuple[str, Any]], sparsity: Fraction) -> dict[str, int]:
    return {name: math.floor(sparsity * int(np.prod(leaf.shape))) for name, leaf in named}


def _erk_raw(shape: tuple[int, ...]) -> Fraction:
    # Erdos-Renyi-Kernel: density proportional to (sum of dimensions) / (product of dimensions).
    return Fraction(sum(shape), int(np.prod(shape)))


def _erk(named: list[tuple[str, Any]], sparsity: Fraction) -> dict[str, int]:
    sizes = {name: int(np.prod(leaf.shape)) for name, leaf in named}
    if not sizes:
        return {}
    raws = {name: _erk_raw(tuple(leaf.shape)) for name, leaf in named}
    total = sum(sizes.values())
    target_pruned = math.floor(sparsity * total)
    target_kept = total - target_pruned
    dense: set[str] = set()
    eps = Fraction(0)
    while True:
        free = [n for n in sizes if n not in dense]
        budget_kept = target_kept - sum(sizes[n] for n in dense)
        denom = sum(raws[n] * sizes[n] for n in free)
        if not free or denom == 0:
            break
        eps = Fraction(budget_kept) / denom
        grown = {n for n in free if eps * raws[n] > 1}
        if not grown:
            break
        dense |= grown
    kept_exact = {n: Fraction(sizes[n]) for n in dense}
    for n in sizes:
        if n not in dense:
            kept_exact[n] = eps * raws[n] * sizes[n]
    # Largest-remainder rounding so that the kept counts add up exactly to the target.
    kept = {n: math.floor(v) for n, v in kept_exact.items()}
    short = target_kept - sum(kept.values())
    order = sorted(
        (n for n in sizes if kept[n] < sizes[n]),
        key=lambda n: (-(kept_exact[n] - kept[n]), n),
    )
    for n in order[:short]:
        kept[n] += 1
    return {n: sizes[n] - kept[n] for n in sizes}


def _explicit(named: list[tuple[str, Any]], sparsities: Mapping[str, float]) -> dict[str, int]:
    names = [n for n, _ in named]
    unknown = sorted(set(sparsities) - set(names))
    missing = [n for n in names if n not in sparsities]
    if unknown or missing:
        raise ValueError(
            "an explicit sparsity map must name every prunable layer exactly: "
            f"unknown paths {unknown}, prunable paths missing {missing}; the prunable paths are "
            f"{names}"
        )
    return {
        name: math.floor(
            _exact_fraction(sparsities[name], f"sparsity[{name!r}]") * int(np.prod(leaf.shape))
        )
        for name, leaf in named
    }


def layer_budgets(
    params: PyTree,
    sparsity: float | Mapping[str, float] | None,
    rule: str = "global_magnitude",
    *,
    prunable: PyTree | None = None,
    dense: str | Sequence[str] | None = DEFAULT_DENSE,
    pattern: str | Pattern = "unstructured",
    input_axes: Mapping[str, int] | None = None,
    indivisible: str = "error",
) -> PyTree:
    """The number of weights each prunable leaf loses.

    Rules (the reference code's default `global_magnitude`, and the usual alternatives):

    * `global_magnitude`: pool |w| of all prunable leaves (N values); `t` is the
      `floor(N (1 - s))`-th largest; leaf `l` prunes `#{i : |w_i| < t}`.
    * `uniform`: every prunable leaf prunes `floor(s n_l)`.
    * `erk`: Erdos-Renyi-Kernel densities; leaves whose density would exceed 1 stay dense and the
      rest are rescaled so that exactly `floor(s N)` weights are pruned in total.
    * `explicit`: `sparsity` maps every prunable path to its own sparsity; leaf `l` prunes
      `floor(s_l n_l)`. A mapping passed as `sparsity` implies this rule.

    Sparsities are read as the decimals they print as (0.9 is 9/10), so counts never depend on
    binary rounding.

    Patterns (`jackpots_jax.patterns`):

    * `'unstructured'` (default): plain `int` entries, as above.
    * `'N:M'` (e.g. `'2:4'`): every masked leaf prunes exactly `n_l (M - N) / M` (N of every
      group of M kept), whatever the rule; `sparsity` may be `None` or must equal `1 - N/M`.
    * `'block:B'`, `'channel'`: the rule's count `p_l` rounded down to whole tiles
      (`floor(p_l / b) b` for tiles of b weights; for `uniform` that is `floor(s n_l / b)` tiles).
      Which tiles are pruned is for `init_scores`/`topk_masks` to decide.

    Structured entries are `Structured(pruned, pattern, shape, input_axes)` with `int(entry)` the
    pruned count. A leaf the pattern does not fit (an input axis that is not a multiple of M, or
    of B) is an error naming it, or held dense with `indivisible='dense'` (then it is left out of
    the rule too, like a leaf held dense by `dense`).

    Args:
      params: the pre-trained parameter pytree (concrete arrays: budgets are computed on the host).
      sparsity: the fraction of weights removed, in [0, 1); or a mapping path -> sparsity; `None`
        only with an N:M pattern (which implies it).
      rule: one of `RULES`.
      prunable: a pytree of bools from `prunable_leaves`; by default computed with `dense`.
      dense: patterns of leaves held dense when `prunable` is not given.
      pattern: `'unstructured'`, `'N:M'`, `'block:B'` or `'channel'` (or a `Pattern`).
      input_axes: regular expression (searched in the leaf's path) -> how many leading axes of the
        kernel are its input axes, for kernels that are not `HWIO`/`[in, out]` (whose default is
        every axis but the last): e.g. `{'attn/(query|key|value)': 1, 'attn/out': 2}` for Flax
        attention kernels `[D, heads, head_dim]` / `[heads, head_dim, D]`. The first pattern that
        matches wins; each must match a masked leaf.
      indivisible: `'error'` or `'dense'`: what to do with a leaf the pattern does not fit.

    Returns:
      A pytree with the structure of `params`: `int` pruned counts (or `Structured` entries) at the
      masked leaves, `None` at every other leaf.

    Example:
      >>> budget = layer_budgets(params, sparsity=0.9, rule="uniform")
      >>> budget_24 = layer_budgets(params, 0.5, pattern="2:4")
    """
    pat = Pattern.parse(pattern)
    if isinstance(sparsity, Mapping):
        if rule not in ("explicit", "global_magnitude"):
            raise ValueError(f"a sparsity mapping needs rule='explicit', got rule={rule!r}")
        rule = "explicit"
    if rule not in RULES:
        raise ValueError(f"unknown budget `rule` {rule!r}; allowed: {', '.join(RULES)}")
    if rule == "explicit" and not isinstance(sparsity, Mapping):
        raise ValueError(
            f"rule='explicit' needs `sparsity` to map each prunable path to a sparsity, got "
            f"{sparsity!r}"
        )
    if pat.kind == "n:m":
        _check_nm_sparsity(sparsity, pat)
    elif sparsity is None and pat.structured:
        raise ValueError(
            f"`sparsity` is None: only an N:M pattern implies the sparsity; pattern {pat} needs a "
            "number in [0, 1)"
        )
    if indivisible not in INDIVISIBLE:
        raise ValueError(
            f"unknown `indivisible` {indivisible!r}; allowed: {', '.join(INDIVISIBLE)}"
        )
    if input_axes is not None and not pat.structured:
        raise ValueError(
            "`input_axes` only matters for a structured `pattern` (N:M, block:B, channel); "
            "pattern is 'unstructured'"
        )
    prunable = _resolve_prunable(params, prunable, dense)
    axes: dict[str, int] = {}
    if pat.structured:
        prunable, axes = _fit_pattern(params, prunable, pat, input_axes, indivisible)
    named = _prunable_named(params, prunable)
    if pat.kind == "n:m":
        counts = {name: int(np.prod(leaf.shape)) // pat.m * (pat.m - pat.n) for name, leaf in named}
    elif rule == "explicit":
        counts = _explicit(named, sparsity)
    else:
        s = _exact_fraction(sparsity, "sparsity")
        counts = {"global_magnitude": _global_magnitude, "uniform": _uniform, "erk": _erk}[rule](
            named, s
        )

    def visit(path, leaf, flag):
        if not flag:
            return None
        name = path_str(path)
        if not pat.structured:
            return counts[name]
        shape = tuple(int(d) for d in leaf.shape)
        unit = int(np.prod(pattern_tile(pat, shape, axes[name])))
        return Structured(counts[name] // unit * unit, pat, shape, axes[name])

    return jax.tree_util.tree_map_with_path(visit, params, prunable)


def _check_nm_sparsity(sparsity: Any, pat: Pattern) -> None:
    """An N:M pattern implies sparsity (M - N) / M; a `sparsity` that says otherwise is an error."""
    implied = Fraction(pat.m - pat.n, pat.m)
    if sparsity is None:
        return
    if isinstance(sparsity, Mapping):
        raise ValueError(
            f"pattern {pat} prunes {float(implied):g} of every masked leaf; a per-layer "
            "`sparsity` mapping cannot apply (hold layers dense with `dense` instead)"
        )
    s = _exact_fraction(sparsity, "sparsity")
    if abs(s - implied) > Fraction(1, 10**9):
        raise ValueError(
            f"`sparsity`={sparsity!r} disagrees with pattern {pat}, which keeps {pat.n} of every "
            f"{pat.m} weights (sparsity {float(implied):g}); pass sparsity={float(implied):g} or "
            "None"
        )


def _fit_pattern(
    params: PyTree,
    prunable: PyTree,
    pat: Pattern,
    input_axes: Mapping[str, int] | None,
    indivisible: str,
) -> tuple[PyTree, dict[str, int]]:
    """The prunable leaves the pattern fits (others held dense or an error) and their input axes."""
    rules = []
    for key, value in (input_axes or {}).items():
        try:
            regex = re.compile(key)
        except re.error as e:
            raise ValueError(
                f"`input_axes` holds an invalid regular expression {key!r}: {e}"
            ) from None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"`input_axes[{key!r}]` must be an int, got {value!r}")
        rules.append((key, regex, int(value)))
    used: set[str] = set()
    axes: dict[str, int] = {}

    def visit(path, leaf, flag):
        if not flag:
            return False
        name = path_str(path)
        shape = tuple(int(d) for d in leaf.shape)
        k = default_input_axes(shape)
        for key, regex, value in rules:
            if regex.search(name):
                k = value
                used.add(key)
                break
        if not 1 <= k < len(shape):
            raise ValueError(
                f"`input_axes` gives {name!r} (shape {shape}) {k} input axes; allowed: "
                f"1..{len(shape) - 1}"
            )
        problem = divisibility_problem(pat, shape, k)
        if problem:
            if indivisible == "dense":
                return False
            raise ValueError(
                f"pattern {pat} does not fit {name!r} (shape {shape}, {k} input axes): {problem}; "
                "hold it dense with indivisible='dense' (or a `dense` pattern), or set its input "
                "axes with `input_axes`"
            )
        axes[name] = k
        return True

    fitted = jax.tree_util.tree_map_with_path(visit, params, prunable)
    unused = [key for key, _, _ in rules if key not in used]
    if unused:
        raise ValueError(f"`input_axes` patterns {unused} match no masked leaf")
    return fitted, axes


def budget_sizes(budget: PyTree, params: PyTree) -> PyTree:
    """The number of weights of every budgeted leaf (same structure as the budget)."""
    return map_budget_with_path(lambda name, p, w: int(np.prod(np.shape(w))), budget, params)


def _summary(size: int, kept: int) -> dict[str, float]:
    return {
        "size": int(size),
        "kept": int(kept),
        "pruned": int(size - kept),
        "sparsity": (size - kept) / size if size else 0.0,
        "density": kept / size if size else 1.0,
    }


def sparsity_report(masks: PyTree, params: PyTree) -> dict[str, Any]:
    """Per-layer and total sparsity of a set of masks (or of a budget).

    Args:
      masks: a masks pytree (bool arrays at masked leaves, `None` elsewhere) or a budget (ints or
        `Structured` entries).
      params: the parameter pytree the masks belong to.

    Returns:
      A dict with `layers` (path -> size/kept/pruned/sparsity/density; held-dense kernels too,
      flagged `masked: False`), `budgeted` (over the masked leaves), `prunable` (over every kernel,
      held-dense ones included: the figure to compare with papers that prune the classifier) and
      `all` (over every parameter).
    """
    all_kernels = prunable_leaves(params, dense=None)
    layers: dict[str, dict[str, Any]] = {}
    budgeted = [0, 0]
    kernels = [0, 0]
    everything = [0, 0]
    flat_params = named_leaves(params)
    flat_masks = jax.tree.leaves(
        jax.tree.map(lambda m, p: m, masks, params, is_leaf=is_none), is_leaf=is_none
    )
    flat_kernel = jax.tree.leaves(all_kernels)
    for (name, w), m, is_kernel in zip(flat_params, flat_masks, flat_kernel, strict=True):
        size = int(np.prod(np.shape(w)))
        if m is None:
            kept = size
        elif isinstance(m, (int, np.integer)) or is_structured(m):
            kept = size - int(m)
        else:
            kept = int(np.count_nonzero(np.asarray(m)))
        everything[0] += size
        everything[1] += kept
        if m is not None:
            budgeted[0] += size
            budgeted[1] += kept
        if is_kernel or m is not None:
            kernels[0] += size
            kernels[1] += kept
            layers[name] = {**_summary(size, kept), "masked": m is not None}
    return {
        "layers": layers,
        "budgeted": _summary(*budgeted),
        "prunable": _summary(*kernels),
        "all": _summary(*everything),
    }


def format_sparsity_table(report: dict[str, Any]) -> str:
    """A Markdown table of a `sparsity_report`, one row per layer and the three totals."""
    rows = ["| layer | weights | kept | sparsity |", "|---|---:|---:|---:|"]
    for name, r in report["layers"].items():
        note = "" if r["masked"] else " (dense)"
        rows.append(f"| {name}{note} | {r['size']} | {r['kept']} | {r['sparsity']:.2%} |")
    for key, label in (
        ("budgeted", "total over masked layers"),
        ("prunable", "total over all conv/dense kernels"),
        ("all", "total over all parameters"),
    ):
        r = report[key]
        rows.append(f"| **{label}** | {r['size']} | {r['kept']} | {r['sparsity']:.2%} |")
    return "\n".join(rows)
