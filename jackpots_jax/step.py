"""One step of the search, of dense training and of evaluation, written per device.

Every step is a pure function `(state, batch) -> (state, metrics)` (or `-> counts` for
evaluation). With `axis_name=None` it runs on one device over the whole batch; with an axis name it
is the body of a data-parallel run (`parallel.data_parallel`): each device sees its shard of the
batch, gradients and batch statistics are averaged with `lax.pmean` and evaluation counts summed
with `lax.psum` over that axis.

A search step (ALGORITHM.md section 6, DESIGN.md "Data flow of one search step"):

  forward   model.apply(W * M) in train mode (batch norm re-estimates its running statistics)
  backward  dL/dS = dL/d(W M) * W  (straight-through; params are never differentiated)
  update    optax chain: weight decay -> SGD momentum (cosine lr) -> short_restriction, which
            refreshes the masks it owns inside `opt_state`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from jackpots_jax.masks import apply_masks, mask_churn, masked_weights
from jackpots_jax.restriction import Schedule, current_masks, short_restriction

PyTree = Any


# ---------------------------------------------------------------------------------------------
# States.


@flax.struct.dataclass
class SearchState:
    """Everything a search step reads and writes; a pytree (jit/pmap/shard_map friendly).

    Attributes:
      step: int32 count of search steps done.
      params: the frozen pre-trained parameters (never changed by `search_step`).
      batch_stats: batch-norm running statistics (re-estimated during the search).
      scores: the scores (budget structure; `None` at unmasked leaves).
      opt_state: the optax state of the search optimiser; its `short_restriction` owns the masks.
      rng: a PRNG key carried along (split once per step).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    scores: PyTree
    opt_state: PyTree
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


def search_optimizer(
    budget: PyTree,
    *,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    total_steps: int,
    rate: float | Schedule | None = None,
    rank_by: str = "score",
) -> optax.GradientTransformation:
    """The search optimiser of ALGORITHM.md section 6.2, ending in the short restriction.

    `add_decayed_weights(weight_decay)` -> `sgd(cosine_decay(learning_rate, total_steps),
    momentum, nesterov=False)` -> `short_restriction(budget, rate)`.

    Args:
      budget: pruned counts from `layer_budgets`.
      learning_rate: peak learning rate; decays to 0 with a cosine over `total_steps`.
      momentum: SGD momentum (no Nesterov).
      weight_decay: decay added to the score gradients (coupled, as in PyTorch SGD).
      total_steps: the number of search steps.
      rate: the short-restriction rate, a number in [0, 1] or a schedule; `None` means 1 (every
        proposed swap is made, i.e. exact per-layer top-k after each step).
      rank_by: `'score'` (signed) or `'abs'`.

    Returns:
      An `optax.GradientTransformation`; call `update(grads, state, scores)`.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(
            optax.cosine_decay_schedule(learning_rate, total_steps),
            momentum=momentum,
            nesterov=False,
        ),
        short_restriction(budget, rate=1.0 if rate is None else rate, rank_by=rank_by),
    )


def create_search_state(
    params: PyTree,
    batch_stats: PyTree,
    scores: PyTree,
    tx: optax.GradientTransformation,
    rng: jax.Array,
) -> SearchState:
    """A fresh `SearchState`: `tx.init(scores)` derives the initial masks from the scores."""
    return SearchState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        scores=scores,
        opt_state=tx.init(scores),
        rng=rng,
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


def _variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
    if batch_stats is None or (isinstance(batch_stats, dict) and not batch_stats):
        return {"params": params}
    return {"params": params, "batch_stats": batch_stats}


def _forward_train(model: nn.Module, params, batch_stats, images):
    """Train-mode logits and the new batch statistics (unchanged when the model has none)."""
    variables = _variables(params, batch_stats)
    if "batch_stats" not in variables:
        return model.apply(variables, images, train=True), batch_stats
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return logits, updates["batch_stats"]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy with integer labels (and optional label smoothing)."""
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _pmean(tree: PyTree, axis_name: str | None) -> PyTree:
    return tree if axis_name is None else lax.pmean(tree, axis_name)


# ---------------------------------------------------------------------------------------------
# Steps.


def search_step(
    state: SearchState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    budget: PyTree,
    axis_name: str | None = None,
    label_smoothing: float = 0.0,
) -> tuple[SearchState, dict[str, jax.Array]]:
    """One search step on this device's shard of the batch; only the scores are trained.

    Args:
      state: the `SearchState` (replicated when data-parallel).
      batch: `{'image': [b, H, W, C], 'label': [b]}` (this device's shard).
      model: the Flax Linen model (static).
      tx: the search optimiser (from `search_optimizer`; static).
      budget: the budget the optimiser was built with (static; used to keep `scores` structure).
      axis_name: the data-parallel axis name, or `None` on one device.
      label_smoothing: label smoothing of the cross-entropy (0 in the reference code).

    Returns:
      `(new_state, metrics)`; metrics hold `loss`, `accuracy` (means over the global batch) and
      `churn` (mask entries flipped by this step, all layers) and `churn_per_layer` (a dict
      layer path -> entries flipped in that layer).
    """
    old_masks = current_masks(state.opt_state)

    def loss_fn(scores):
        weights = masked_weights(state.params, scores, old_masks)
        logits, new_stats = _forward_train(model, weights, state.batch_stats, batch["image"])
        loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
        return loss, (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.scores)
    # Per-device gradients of the per-device mean loss; their mean is the gradient of the mean
    # loss over the global batch (equal shards).
    grads = _pmean(grads, axis_name)
    new_stats = _pmean(new_stats, axis_name)
    # Keep exactly the budget's structure (None at unmasked leaves) for the optimiser.
    updates, opt_state = tx.update(grads, state.opt_state, state.scores)
    scores = optax.apply_updates(state.scores, updates)
    new_masks = current_masks(opt_state)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    churn = mask_churn(old_masks, new_masks)
    metrics = {
        "loss": _pmean(loss, axis_name),
        "accuracy": _pmean(accuracy, axis_name),
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
    del budget  # static; part of the signature so that runners can pass it uniformly
    return new_state, metrics


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    axis_name: str | None = None,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One dense training step (params and batch statistics), for pre-training.

    Returns:
      `(new_state, metrics)` with `loss` and `accuracy` (means over the global batch).
    """

    def loss_fn(params):
        logits, new_stats = _forward_train(model, params, state.batch_stats, batch["image"])
        loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
        return loss, (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = _pmean(grads, axis_name)
    new_stats = _pmean(new_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    metrics = {"loss": _pmean(loss, axis_name), "accuracy": _pmean(accuracy, axis_name)}
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    return new_state, metrics


def eval_step(
    params: PyTree,
    batch_stats: PyTree,
    masks: PyTree | None,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    axis_name: str | None = None,
) -> dict[str, jax.Array]:
    """Summed evaluation counts over the valid examples of a (possibly padded) batch.

    Args:
      params: the parameters.
      batch_stats: the running statistics (eval mode uses them).
      masks: masks to apply (`W * M`), or `None` to evaluate the dense params.
      batch: `{'image', 'label'}` and optionally `'mask'` (bool, True for real examples; padded
        examples count nowhere). Without `'mask'` every example counts.
      model: the Flax Linen model (static).
      axis_name: the data-parallel axis name; counts are `psum`'d over it.

    Returns:
      `{'correct': int32, 'correct_top5': int32, 'loss': float32 summed loss, 'count': int32
      valid examples}` (`correct_top5`: the label among the 5 highest logits).
    """
    weights = params if masks is None else apply_masks(params, masks)
    logits = model.apply(_variables(weights, batch_stats), batch["image"], train=False)
    labels = batch["label"]
    valid = batch.get("mask")
    valid = jnp.ones(labels.shape, bool) if valid is None else jnp.asarray(valid, bool)
    correct = (jnp.argmax(logits, -1) == labels) & valid
    # Top-5 (top-k for fewer classes): the label's logit is beaten by fewer than 5 others. Ties
    # count in the label's favour, as in the usual `topk(..).eq(label)` up to tie order.
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    beaten_by = jnp.sum(logits > label_logit, axis=-1)
    correct_top5 = (beaten_by < min(5, logits.shape[-1])) & valid
    losses = jnp.where(valid, cross_entropy(logits, labels), 0.0)
    out = {
        "correct": jnp.sum(correct, dtype=jnp.int32),
        "correct_top5": jnp.sum(correct_top5, dtype=jnp.int32),
        "loss": jnp.sum(losses, dtype=jnp.float32),
        "count": jnp.sum(valid, dtype=jnp.int32),
    }
    return out if axis_name is None else lax.psum(out, axis_name)
