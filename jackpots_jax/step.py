"""One step of the search, of dense training, of evaluation and of BN re-estimation, per device.

Every step is a pure function of pytrees over an *apply function* and a *loss function*, so any
model and any batch run through it (images and labels, token ids and targets):

    apply_fn(params, batch_stats, inputs, train) -> (outputs, new_batch_stats)
    loss_fn(outputs, batch) -> LossTerms(loss, weights, metrics, sums)

`inputs` is the part of the batch the model is called on: `batch[inputs]` for a key (default
`'image'`) or `inputs(batch)` for a function. `new_batch_stats` are the re-estimated running
statistics in train mode, the given ones otherwise (and `{}` for a model without any).
`adapters.linen_apply(module)` and `adapters.nnx_apply(graphdef)` make an apply function from a
Flax Linen or NNX module; `losses.classification()` (the default) and `losses.next_token()` are
loss functions; hand-written ones work as well.

The frozen pre-trained `params` are an argument of the search step, not part of its state:
`SearchState` holds only what a step changes (scores, the optimiser state that owns the masks,
batch statistics, the step count and a PRNG key), so checkpoints never rewrite the weights.

With `axis_name=None` a step runs on one device over the whole batch; with an axis name it is the
body of a data-parallel run (`parallel.data_parallel`): each device sees its shard of the batch
and the results are those of the global batch. Without loss weights (a batch of images) the loss
is the per-device mean and gradients, metrics and batch statistics are averaged with `lax.pmean`
(equal shards). With weights (tokens, padding weighted 0) the loss is `sum(loss * w)` over the
global batch divided by the global `sum(w)` (`lax.psum`), and gradients and metrics are summed
accordingly, so a device with fewer valid tokens weighs less. Evaluation returns sums and counts
(`lax.psum`). Replicated arguments come first and the batch last, so that a runner calls
`step(*replicated, batch)`.

A search step:

  forward   apply_fn(W * M) in train mode (batch norm re-estimates its running statistics)
  backward  dL/dS = dL/d(W M) * W: straight through the binarisation, dense (pruned entries get
            gradients too); the params are never differentiated
  update    optax chain: weight decay -> SGD momentum (cosine lr) -> short_restriction, which
            refreshes the masks it owns inside `opt_state`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

# `linen_apply`, `nnx_apply` and `cross_entropy` lived here first; importing them from this module
# keeps working.
from jackpots_jax.adapters import ApplyFn, linen_apply, nnx_apply
from jackpots_jax.losses import DENSE_OUTPUTS, LossFn, classification, cross_entropy
from jackpots_jax.masks import apply_masks, mask_churn, masked_weights
from jackpots_jax.restriction import current_masks, search_optimizer

__all__ = [
    "SearchState",
    "TrainState",
    "bn_stats_step",
    "create_search_state",
    "create_train_state",
    "cross_entropy",
    "eval_step",
    "linen_apply",
    "nnx_apply",
    "search_optimizer",
    "search_step",
    "train_step",
]

PyTree = Any
Inputs = str | Callable[[Mapping[str, jax.Array]], Any]


# ---------------------------------------------------------------------------------------------
# States.


@flax.struct.dataclass
class SearchState:
    """What a search step changes; a pytree (jit/pmap/shard_map friendly, checkpointed whole).

    The frozen pre-trained params are not part of it: they are an argument of `search_step`.

    Attributes:
      step: int32 count of search steps done.
      scores: the scores (budget structure; `None` at unmasked leaves).
      opt_state: the optax state of the search optimiser; its `short_restriction` owns the masks.
      batch_stats: batch-norm running statistics (re-estimated during the search; `{}` if none).
      rng: a PRNG key carried along (split once per step).
    """

    step: jax.Array
    scores: PyTree
    opt_state: PyTree
    batch_stats: PyTree
    rng: jax.Array

    @property
    def masks(self) -> PyTree:
        """The current binary masks (owned by the short restriction in `opt_state`)."""
        return current_masks(self.opt_state)


@flax.struct.dataclass
class TrainState:
    """State of dense (pre-)training: params, batch statistics and the optax state."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree


def create_search_state(
    scores: PyTree,
    tx: optax.GradientTransformation,
    *,
    batch_stats: PyTree | None = None,
    rng: jax.Array | None = None,
) -> SearchState:
    """A fresh `SearchState`: `tx.init(scores)` derives the initial masks from the scores.

    Args:
      scores: the initial scores (from `init_scores`).
      tx: the search optimiser (from `search_optimizer`, or any chain ending in
        `short_restriction`).
      batch_stats: the pre-trained running statistics (`{}`, the default, for a model without).
      rng: a PRNG key carried in the state (default: `jax.random.key(0)`'s data).
    """
    return SearchState(
        step=jnp.zeros((), jnp.int32),
        scores=scores,
        opt_state=tx.init(scores),
        batch_stats={} if batch_stats is None else batch_stats,
        rng=jax.random.key_data(jax.random.key(0)) if rng is None else rng,
    )


def create_train_state(
    params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation
) -> TrainState:
    """A fresh `TrainState` for dense training with `tx`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )


# ---------------------------------------------------------------------------------------------
# Helpers.


def _pmean(tree: PyTree, axis_name: str | None) -> PyTree:
    return tree if axis_name is None else lax.pmean(tree, axis_name)


def _psum(tree: PyTree, axis_name: str | None) -> PyTree:
    return tree if axis_name is None else lax.psum(tree, axis_name)


def _model_inputs(batch: Mapping[str, jax.Array], inputs: Inputs) -> Any:
    """What the model is called on: `batch[inputs]`, or `inputs(batch)` for a function."""
    if callable(inputs):
        return inputs(batch)
    if inputs not in batch:
        raise KeyError(
            f"inputs={inputs!r} is not a key of the batch (keys: {sorted(batch)}); pass the key "
            "of the model's inputs or a function of the batch"
        )
    return batch[inputs]


def _objective(terms, axis_name: str | None):
    """`(loss, metrics, count)`: this device's share of the loss to differentiate, the metrics.

    Without weights: the mean over this device's items; `count` is `None` and the caller averages
    loss and gradients over devices (`pmean`), the arithmetic of a mean over equal shards. With
    weights: `sum(loss * w) / count`, `count` the global `sum(w)`; the caller sums loss and
    gradients over devices (`psum`), which makes them those of the global weighted mean. Metrics
    come out reduced over the global batch either way.
    """
    if terms.weights is None:
        metrics = {
            name: _pmean(jnp.mean(jnp.asarray(value, jnp.float32)), axis_name)
            for name, value in terms.metrics.items()
        }
        return jnp.mean(terms.loss), metrics, None
    weights = lax.stop_gradient(jnp.asarray(terms.weights, jnp.float32))
    count = _psum(jnp.sum(weights), axis_name)
    # No valid item anywhere: loss and metrics 0 rather than 0 / 0.
    count = jnp.where(count > 0, count, 1.0)
    metrics = {
        name: _psum(jnp.sum(jnp.asarray(value, jnp.float32) * weights), axis_name) / count
        for name, value in terms.metrics.items()
    }
    return jnp.sum(terms.loss * weights) / count, metrics, count


def _reduce(tree: PyTree, count: jax.Array | None, axis_name: str | None) -> PyTree:
    """Per-device losses or gradients of `_objective` -> those of the global batch."""
    return _pmean(tree, axis_name) if count is None else _psum(tree, axis_name)


# ---------------------------------------------------------------------------------------------
# Steps.


def search_step(
    state: SearchState,
    params: PyTree,
    batch: Mapping[str, jax.Array],
    *,
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    axis_name: str | None = None,
    loss_fn: LossFn | None = None,
    inputs: Inputs = "image",
) -> tuple[SearchState, dict[str, jax.Array]]:
    """One search step on this device's shard of the batch; only the scores are trained.

    Args:
      state: the `SearchState` (replicated when data-parallel).
      params: the frozen pre-trained params (replicated; never changed).
      batch: this device's shard of the batch, e.g. `{'image': [b, H, W, C], 'label': [b]}` or
        `{'inputs': [b, t], 'targets': [b, t], 'weights': [b, t]}`.
      apply_fn: the model's apply function (`linen_apply`, `nnx_apply`; static).
      tx: the search optimiser (from `search_optimizer`; static).
      axis_name: the data-parallel axis name, or `None` on one device.
      loss_fn: `loss_fn(outputs, batch) -> LossTerms` (static); `None`:
        `losses.classification()`, cross-entropy of `batch['label']`. A loss function with
        `needs_dense_outputs = True` (`losses.kl_to_dense()`) also gets the dense model's
        outputs in `batch[losses.DENSE_OUTPUTS]`: one more forward pass, on the unmasked frozen
        weights, with the state's batch statistics, `train=False`, no gradient.
      inputs: the key of the batch the model is called on, or a function of the batch (static).

    Returns:
      `(new_state, metrics)`; metrics hold `loss` and the loss function's metrics (means over
      the global batch, weighted when the loss has weights; `accuracy` for the losses of
      `losses`), `churn` (mask entries flipped by this step, all layers) and `churn_per_layer`
      (a dict layer path -> entries flipped in that layer).

    Example:
      >>> step = jax.jit(partial(search_step, apply_fn=apply_fn, tx=tx), donate_argnums=0)
      >>> state, metrics = step(state, params, batch)
    """
    loss_fn = classification() if loss_fn is None else loss_fn
    old_masks = current_masks(state.opt_state)
    x = _model_inputs(batch, inputs)
    if getattr(loss_fn, "needs_dense_outputs", False):
        dense, _ = apply_fn(params, state.batch_stats, x, False)
        batch = {**batch, DENSE_OUTPUTS: lax.stop_gradient(dense)}

    def objective(scores):
        weights = masked_weights(params, scores, old_masks)
        outputs, new_stats = apply_fn(weights, state.batch_stats, x, True)
        loss, metrics, count = _objective(loss_fn(outputs, batch), axis_name)
        return loss, (metrics, count, new_stats)

    (loss, (metrics, count, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.scores
    )
    grads = _reduce(grads, count, axis_name)
    new_stats = _pmean(new_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.scores)
    scores = optax.apply_updates(state.scores, updates)
    churn = mask_churn(old_masks, current_masks(opt_state))
    metrics = {
        "loss": _reduce(loss, count, axis_name),
        **metrics,
        "churn": churn.pop("total"),
        "churn_per_layer": churn,
    }
    rng, _ = jax.random.split(state.rng)
    new_state = state.replace(
        step=state.step + 1,
        batch_stats=new_stats,
        scores=scores,
        opt_state=opt_state,
        rng=rng,
    )
    return new_state, metrics


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    axis_name: str | None = None,
    loss_fn: LossFn | None = None,
    inputs: Inputs = "image",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One dense training step (params and batch statistics), for pre-training.

    Takes the arguments of `search_step` (less the frozen params).

    Returns:
      `(new_state, metrics)` with `loss` and the loss function's metrics (means over the global
      batch, weighted when the loss has weights).
    """
    loss_fn = classification() if loss_fn is None else loss_fn
    x = _model_inputs(batch, inputs)

    def objective(params):
        outputs, new_stats = apply_fn(params, state.batch_stats, x, True)
        loss, metrics, count = _objective(loss_fn(outputs, batch), axis_name)
        return loss, (metrics, count, new_stats)

    (loss, (metrics, count, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params
    )
    grads = _reduce(grads, count, axis_name)
    new_stats = _pmean(new_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": _reduce(loss, count, axis_name), **metrics}
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    return new_state, metrics


def _masked_sum(value: jax.Array, valid: jax.Array, weights: jax.Array | None) -> jax.Array:
    """The sum of `value` over the valid items: a count in int32 for booleans without weights."""
    if weights is not None:
        return jnp.sum(jnp.asarray(value, jnp.float32) * weights)
    if value.dtype == jnp.bool_:
        return jnp.sum(value & valid, dtype=jnp.int32)
    return jnp.sum(jnp.where(valid, value, 0.0), dtype=jnp.float32)


def eval_step(
    params: PyTree,
    batch_stats: PyTree,
    masks: PyTree | None,
    batch: Mapping[str, jax.Array],
    *,
    apply_fn: ApplyFn,
    axis_name: str | None = None,
    loss_fn: LossFn | None = None,
    inputs: Inputs = "image",
) -> dict[str, jax.Array]:
    """Summed evaluation counts over the valid items of a (possibly padded) batch.

    Args:
      params: the parameters.
      batch_stats: the running statistics (eval mode uses them).
      masks: masks to apply (`W * M`), or `None` to evaluate the dense params.
      batch: e.g. `{'image', 'label'}`, and optionally `'mask'` (bool `[b]`, True for real
        examples; padded examples count nowhere). Without `'mask'` every example counts.
      apply_fn: the model's apply function (static).
      axis_name: the data-parallel axis name; the sums are `psum`'d over it.
      loss_fn: as in `search_step` (static); `None`: `losses.classification()`.
      inputs: as in `search_step` (static).

    Returns:
      `{'loss': summed loss, 'count': valid items, **sums}` over the global batch, the sums of
      the loss function's `sums`. Without loss weights `count` and boolean sums are int32; with
      weights every item counts with its weight (`count` = summed weights, float32). For
      `classification()`: `{'correct', 'correct_top5', 'loss', 'count'}` (`correct_top5`: the
      label among the 5 highest logits); for `next_token()`: `{'correct', 'loss', 'count'}`,
      the perplexity being `exp(loss / count)`.
    """
    loss_fn = classification() if loss_fn is None else loss_fn
    weights = params if masks is None else apply_masks(params, masks)
    outputs, _ = apply_fn(weights, batch_stats, _model_inputs(batch, inputs), False)
    terms = loss_fn(outputs, batch)
    valid = batch.get("mask")
    if valid is None:
        valid = jnp.ones(terms.loss.shape, bool)
    else:
        # A per-example mask applies to every token of the example.
        valid = jnp.asarray(valid, bool)
        valid = valid.reshape(valid.shape + (1,) * (terms.loss.ndim - valid.ndim))
        valid = jnp.broadcast_to(valid, terms.loss.shape)
    item_weights = None
    if terms.weights is None:
        count = jnp.sum(valid, dtype=jnp.int32)
    else:
        item_weights = jnp.where(valid, jnp.asarray(terms.weights, jnp.float32), 0.0)
        count = jnp.sum(item_weights)
    out = {name: _masked_sum(value, valid, item_weights) for name, value in terms.sums.items()}
    out["loss"] = _masked_sum(terms.loss, valid, item_weights)
    out["count"] = count
    return _psum(out, axis_name)


def bn_stats_step(
    params: PyTree,
    batch_stats: PyTree,
    masks: PyTree | None,
    batch: Mapping[str, jax.Array],
    *,
    apply_fn: ApplyFn,
    axis_name: str | None = None,
    inputs: Inputs = "image",
) -> PyTree:
    """The running statistics after one train-mode forward pass of `W * M` over the batch.

    Re-estimates batch-norm statistics of a pruned model without training it: call it on a
    number of training batches, feeding each call the statistics of the previous one.

    Args:
      params: the parameters.
      batch_stats: the running statistics to update.
      masks: masks to apply (`W * M`), or `None` for the dense params.
      batch: this device's shard of the batch.
      apply_fn: the model's apply function (static).
      axis_name: the data-parallel axis name; the statistics are averaged over it.
      inputs: the key of the batch the model is called on, or a function of it (static).

    Returns:
      The updated running statistics.
    """
    weights = params if masks is None else apply_masks(params, masks)
    _, stats = apply_fn(weights, batch_stats, _model_inputs(batch, inputs), True)
    return _pmean(stats, axis_name)
