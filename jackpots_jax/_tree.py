"""Small pytree helpers shared by the core modules: leaf paths and budget-driven maps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any


def _key_name(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        # NNX wraps each array in a Variable whose child is `.value`: not part of the layer name.
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: tuple) -> str:
    """`('layer1', 'conv', 'kernel')`-style key path as `'layer1/conv/kernel'`."""
    return "/".join(name for name in map(_key_name, path) if name is not None)


def is_none(x: Any) -> bool:
    return x is None


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """(path string, leaf) for every leaf, `None` leaves included, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
    return [(path_str(p), leaf) for p, leaf in flat]


def map_budget(fn: Callable[..., Any], budget: PyTree, *trees: PyTree) -> PyTree:
    """Maps `fn(budget_leaf, *tree_leaves)` over the leaves a budget masks; `None` elsewhere.

    The budget is the structural prefix: the other trees may hold arrays (or anything) where the
    budget holds `None`, and those leaves are ignored.
    """

    def visit(b, *xs):
        return None if b is None else fn(b, *xs)

    try:
        return jax.tree.map(visit, budget, *trees, is_leaf=is_none)
    except ValueError as e:
        raise ValueError(
            "a tree does not match the budget's structure (a budget has one entry per leaf of the "
            f"params tree it was made from): {e}"
        ) from None


def map_budget_with_path(fn: Callable[..., Any], budget: PyTree, *trees: PyTree) -> PyTree:
    """Like `map_budget`, with the leaf's path string as the first argument of `fn`."""

    def visit(path, b, *xs):
        return None if b is None else fn(path_str(path), b, *xs)

    try:
        return jax.tree_util.tree_map_with_path(visit, budget, *trees, is_leaf=is_none)
    except ValueError as e:
        raise ValueError(f"a tree does not match the budget's structure: {e}") from None


def check_same_structure(name: str, tree: PyTree, reference: PyTree, reference_name: str) -> None:
    """Raises a ValueError naming `name` when `tree` is not shaped like `reference` (None kept)."""
    s1 = jax.tree.structure(tree, is_leaf=is_none)
    s2 = jax.tree.structure(reference, is_leaf=is_none)
    if s1 != s2:
        raise ValueError(
            f"`{name}` does not have the structure of `{reference_name}`:\n  {name}: {s1}\n"
            f"  {reference_name}: {s2}"
        )
