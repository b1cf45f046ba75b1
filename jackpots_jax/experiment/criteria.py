"""Masks of existing pruning criteria at a jackpot's budget, for the overlap study.

The paper observes that the masks of existing pruning criteria overlap with the searched jackpot,
magnitude pruning's the most. Every criterion here scores each prunable weight; its mask is the
exact per-layer top-k of those scores at the jackpot's budget (`topk_masks`), so a criterion keeps
as many weights in every layer as the jackpot it is compared with, and the intersection over union
of the two kept sets measures only *which* weights are kept.

* `magnitude`: `|w|` (one-shot magnitude pruning; the search's own initial mask).
* `random`: uniform random scores (the chance level of the overlap).
* `snip`: `|g * w|` with `g` the gradient of the training loss with respect to the weights,
  summed over a few batches (SNIP, Lee et al. 2019, on the pre-trained weights; batch norm in
  train mode as in the search).
* `wanda`: `|w| * ||x_j||`, where `||x_j||` is the L2 norm of the layer's input channel `j` over
  every image and position of a few batches (Wanda, Sun et al. 2024; batch norm in eval mode).
  Wanda compares weights within each output row; here, as for every criterion, within the layer.
  Linen models only: the inputs are read with `flax.linen.intercept_methods`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jackpots_jax._tree import map_budget, map_budget_with_path
from jackpots_jax.experiment.context import Devices
from jackpots_jax.losses import cross_entropy
from jackpots_jax.masks import topk_masks

PyTree = Any
CRITERIA = ("magnitude", "random", "snip", "wanda")


def loss_grads_step(params, batch_stats, batch, *, apply_fn, axis_name=None):
    """The gradient of the mean training loss over the batch (averaged over `axis_name`)."""

    def loss(p):
        logits, _ = apply_fn(p, batch_stats, batch["image"], True)
        return jnp.mean(cross_entropy(logits, batch["label"]))

    grads = jax.grad(loss)(params)
    return grads if axis_name is None else jax.lax.pmean(grads, axis_name)


def _runner(step_fn, devices, **static):
    """`step_fn(tree, batch_stats, batch)` on one device, or over the run's `Devices`."""
    if devices is None:
        return jax.jit(functools.partial(step_fn, **static))
    run = devices.run(step_fn, **static)
    return lambda tree, stats, batch: run(
        devices.weights(tree), devices.replicate(stats), devices.shard(batch)
    )


def snip_scores(
    params: PyTree,
    batch_stats: PyTree,
    batches: Iterable[dict],
    budget: PyTree,
    *,
    apply_fn,
    devices: Devices | None = None,
) -> PyTree:
    """`|g * w|` at the budgeted leaves, `g` the loss gradient summed over `batches`.

    With `devices` (a run's `Devices`) the gradients are computed over its mesh as the search's
    are; without, on the default device.
    """
    grad_fn = _runner(loss_grads_step, devices, apply_fn=apply_fn)
    total = None
    for batch in batches:
        g = grad_fn(params, batch_stats, {"image": batch["image"], "label": batch["label"]})
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    if total is None:
        raise ValueError("snip_scores needs at least one batch")
    return map_budget(lambda b, g, w: jnp.abs(g * w), budget, total, params)


def input_norms_step(params, batch_stats, batch, *, module, axis_name=None):
    """`input_channel_norms` of the batch (summed over `axis_name`)."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    norms = input_channel_norms(module, variables, batch["image"])
    return norms if axis_name is None else jax.lax.psum(norms, axis_name)


def input_channel_norms(module: nn.Module, variables: PyTree, images: jax.Array) -> dict:
    """Squared L2 norms of every `Conv` / `Dense` input per channel, over batch and positions.

    Returns:
      `{'<module path>/kernel': [in_channels] float32}` (the path of the kernel the input meets).
    """
    norms = {}

    def capture(next_fun, args, kwargs, context):
        layer = context.module
        if context.method_name == "__call__" and isinstance(layer, nn.Conv | nn.Dense):
            x = jnp.asarray(args[0], jnp.float32)
            name = "/".join((*layer.path, "kernel"))
            norms[name] = jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        module.apply(variables, images, train=False)
    return norms


def wanda_scores(
    module: Any,
    params: PyTree,
    batch_stats: PyTree,
    batches: Iterable[dict],
    budget: PyTree,
    *,
    devices: Devices | None = None,
) -> PyTree:
    """`|w| * ||x_in||` at the budgeted leaves (input channels on the kernel's second-to-last axis).

    With `devices` the norms are computed over the run's mesh; without, on the default device.

    Raises:
      ValueError: the model is not a Linen module, or a budgeted kernel's input was not seen.
    """
    if not isinstance(module, nn.Module):
        raise ValueError("the wanda criterion reads layer inputs of Linen models only")
    norm_fn = _runner(input_norms_step, devices, module=module)
    total = None
    for batch in batches:
        n = norm_fn(params, batch_stats, {"image": batch["image"]})
        total = n if total is None else jax.tree.map(jnp.add, total, n)

    def score(name, b, w):
        if total is None or name not in total:
            raise ValueError(f"wanda: no input seen for {name!r} (a Conv or Dense kernel?)")
        norm = jnp.sqrt(total[name])
        if norm.shape[0] != np.shape(w)[-2]:
            raise ValueError(f"wanda: {name!r} has {np.shape(w)} but {norm.shape[0]} inputs")
        shape = [1] * (np.ndim(w) - 2) + [norm.shape[0], 1]
        return jnp.abs(w) * norm.reshape(shape)

    return map_budget_with_path(score, budget, params)


def criterion_masks(
    name: str,
    params: PyTree,
    batch_stats: PyTree,
    budget: PyTree,
    *,
    apply_fn=None,
    module: Any = None,
    batches: Iterable[dict] = (),
    key: jax.Array | None = None,
    devices: Devices | None = None,
) -> PyTree:
    """The mask of criterion `name` at `budget`: per layer the top `n - p` of its scores.

    Args:
      name: one of `CRITERIA`.
      params, batch_stats: the pre-trained variables.
      budget: the pruned count per leaf (the jackpot's).
      apply_fn: the model's apply function (`snip`).
      module: the Linen module (`wanda`).
      batches: training batches `{'image', 'label'}` (`snip`, `wanda`).
      key: a PRNG key (`random`).
      devices: the run's `Devices` (`snip`, `wanda` compute over its mesh), or `None`.
    """
    if name == "magnitude":
        scores = map_budget(lambda b, w: jnp.abs(jnp.asarray(w, jnp.float32)), budget, params)
    elif name == "random":
        leaves = []
        map_budget(lambda b, w: leaves.append(np.shape(w)), budget, params)
        keys = iter(jax.random.split(key, max(len(leaves), 1)))
        scores = map_budget(
            lambda b, w: jax.random.uniform(next(keys), np.shape(w)), budget, params
        )
    elif name == "snip":
        scores = snip_scores(
            params, batch_stats, batches, budget, apply_fn=apply_fn, devices=devices
        )
    elif name == "wanda":
        scores = wanda_scores(module, params, batch_stats, batches, budget, devices=devices)
    else:
        raise ValueError(f"unknown criterion {name!r}; allowed: {', '.join(CRITERIA)}")
    return jax.device_get(topk_masks(scores, budget))
