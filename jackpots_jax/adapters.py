"""Apply functions of Flax Linen and NNX models: the one call signature every step takes.

    apply_fn(params, batch_stats, inputs, train) -> (outputs, new_batch_stats)

`inputs` is what the model is called on (images, token ids); `outputs` what it returns (logits).
`new_batch_stats` are the re-estimated running statistics in train mode, the given ones otherwise
(and `{}` for a model without any). A hand-written function of that signature works as well.

Example:
  >>> apply_fn = linen_apply(models.create("resnet20", 10))
  >>> outputs, stats = apply_fn(variables["params"], variables["batch_stats"], x, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree, Any, bool], tuple[Any, PyTree]]


def _has_stats(batch_stats: PyTree) -> bool:
    return bool(jax.tree.leaves(batch_stats))


def _pure(tree: PyTree) -> PyTree:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def linen_apply(module: Any) -> ApplyFn:
    """The apply function of a Flax Linen module called as `module(x, train=...)`.

    Args:
      module: a Linen module whose `__call__` takes `train`; its variables are `params` and,
        optionally, `batch_stats`.

    Returns:
      `apply_fn(params, batch_stats, inputs, train) -> (outputs, new_batch_stats)`; in train mode
      the `batch_stats` collection is updated (`mutable=["batch_stats"]`).

    Example:
      >>> apply_fn = linen_apply(models.create("resnet20", 10))
      >>> outputs, stats = apply_fn(variables["params"], variables["batch_stats"], x, True)
    """

    def apply_fn(params, batch_stats, inputs, train):
        if not _has_stats(batch_stats):
            return module.apply({"params": params}, inputs, train=train), batch_stats
        variables = {"params": params, "batch_stats": batch_stats}
        if not train:
            return module.apply(variables, inputs, train=False), batch_stats
        outputs, updates = module.apply(variables, inputs, train=True, mutable=["batch_stats"])
        return outputs, updates["batch_stats"]

    return apply_fn


def nnx_apply(graphdef: nnx.GraphDef, *rest: PyTree) -> ApplyFn:
    """The apply function of a Flax NNX module, from its graph definition.

    The module is rebuilt from `graphdef` and the given states at every call (`nnx.merge`), put in
    train or eval mode (`module.train()` / `module.eval()`: batch norm uses and updates the batch
    statistics, dropout is active) and called on the inputs.

    Args:
      graphdef: from `graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)`.
      *rest: any further states of that split (e.g. `nnx.split(model, nnx.Param, nnx.BatchStat,
        ...)`), passed unchanged to every call.

    Returns:
      `apply_fn(params, batch_stats, inputs, train) -> (outputs, new_batch_stats)`. `params` and
      `batch_stats` may be `nnx.State`s or plain nested dicts (`nnx.to_pure_dict`); the new
      statistics come back in the same form.

    Example:
      >>> graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
      >>> apply_fn = nnx_apply(graphdef)
      >>> outputs, batch_stats = apply_fn(params, batch_stats, inputs, True)
    """

    def apply_fn(params, batch_stats, inputs, train):
        # Plain arrays in: merge then makes fresh Variables in this trace, which batch norm may
        # update (Variables of an `nnx.State` given from outside belong to another trace).
        model = nnx.merge(graphdef, _pure(params), _pure(batch_stats), *map(_pure, rest))
        if train:
            model.train()
        else:
            model.eval()
        outputs = model(inputs)
        if not train:
            return outputs, batch_stats
        stats = nnx.state(model, nnx.BatchStat)
        return outputs, stats if isinstance(batch_stats, nnx.State) else nnx.to_pure_dict(stats)

    return apply_fn
