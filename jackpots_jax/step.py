"""One step of the search, of dense training, of evaluation and of BN re-estimation, per device.

Every step is a pure function of pytrees over an *apply function*, so any model runs through it:

    apply_fn(params, batch_stats, images, train) -> (logits, new_batch_stats)

`new_batch_stats` are the re-estimated running statistics in train mode, the given ones otherwise
(and `{}` for a model without any). `linen_apply(module)` and `nnx_apply(graphdef)` make one from a
Flax Linen module or an NNX module; a hand-written function works as well.

The frozen pre-trained `params` are an argument of the search step, not part of its state:
`SearchState` holds only what a step changes (scores, the optimiser state that owns the masks,
batch statistics, the step count and a PRNG key), so checkpoints never rewrite the weights.

With `axis_name=None` a step runs on one device over the whole batch; with an axis name it is the
body of a data-parallel run (`parallel.data_parallel`): each device sees its shard of the batch,
gradients and batch statistics are averaged with `lax.pmean` and evaluation counts summed with
`lax.psum` over that axis. Replicated arguments come first and the batch last, so that a runner
calls `step(*replicated, batch)`.

A search step:

  forward   apply_fn(W * M) in train mode (batch norm re-estimates its running statistics)
  backward  dL/dS = dL/d(W M) * W: straight through the binarisation, dense (pruned entries get
            gradients too); the params are never differentiated
  update    optax chain: weight decay -> SGD momentum (cosine lr) -> short_restriction, which
            refreshes the masks it owns inside `opt_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from jackpots_jax.masks import apply_masks, mask_churn, masked_weights
from jackpots_jax.restriction import Schedule, current_masks, short_restriction

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree, jax.Array, bool], tuple[jax.Array, PyTree]]


# ---------------------------------------------------------------------------------------------
# Apply functions of Linen and NNX models.


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
      `apply_fn(params, batch_stats, images, train) -> (logits, new_batch_stats)`; in train mode
      the `batch_stats` collection is updated (`mutable=["batch_stats"]`).

    Example:
      >>> apply_fn = linen_apply(models.create("resnet20", 10))
      >>> logits, stats = apply_fn(variables["params"], variables["batch_stats"], x, True)
    """

    def apply_fn(params, batch_stats, images, train):
        if not _has_stats(batch_stats):
            return module.apply({"params": params}, images, train=train), batch_stats
        variables = {"params": params, "batch_stats": batch_stats}
        if not train:
            return module.apply(variables, images, train=False), batch_stats
        logits, updates = module.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    return apply_fn


def nnx_apply(graphdef: nnx.GraphDef, *rest: PyTree) -> ApplyFn:
    """The apply function of a Flax NNX module, from its graph definition.

    The module is rebuilt from `graphdef` and the given states at every call (`nnx.merge`), put in
    train or eval mode (`module.train()` / `module.eval()`: batch norm uses and updates the batch
    statistics, dropout is active) and called on the images.

    Args:
      graphdef: from `graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)`.
      *rest: any further states of that split (e.g. `nnx.split(model, nnx.Param, nnx.BatchStat,
        ...)`), passed unchanged to every call.

    Returns:
      `apply_fn(params, batch_stats, images, train) -> (logits, new_batch_stats)`. `params` and
      `batch_stats` may be `nnx.State`s or plain nested dicts (`nnx.to_pure_dict`); the new
      statistics come back in the same form.

    Example:
      >>> graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
      >>> apply_fn = nnx_apply(graphdef)
      >>> logits, batch_stats = apply_fn(params, batch_stats, images, True)
    """

    def apply_fn(params, batch_stats, images, train):
        # Plain arrays in: merge then makes fresh Variables in this trace, which batch norm may
        # update (Variables of an `nnx.State` given from outside belong to another trace).
        model = nnx.merge(graphdef, _pure(params), _pure(batch_stats), *map(_pure, rest))
        if train:
            model.train()
        else:
            model.eval()
        logits = model(images)
        if not train:
            return logits, batch_stats
        stats = nnx.state(model, nnx.BatchStat)
        return logits, stats if isinstance(batch_stats, nnx.State) else nnx.to_pure_dict(stats)

    return apply_fn


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


def search_optimizer(
    budget: PyTree,
    *,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    total_steps: int,
    rate: float | Schedule | None = None,
    rank_by: str = "score",
    selection: str = "auto",
    layout: Any = None,
) -> optax.GradientTransformation:
    """The paper's search optimiser of the scores, ending in the short restriction.

    `add_decayed_weights(weight_decay)` -> `sgd(cosine_decay(learning_rate, total_steps),
    momentum, nesterov=False)` -> `short_restriction(budget, rate)`: weight decay coupled to the
    gradient as in PyTorch's SGD, no warm-up, the learning rate decayed to 0 over the search.

    With `rank_by='abs'` (edge-popup) the masks are a function of `|S|`, so the straight-through
    gradient `dL/d(W*M) * W` is the gradient with respect to `|S|`, and the chain rule through
    the absolute value makes it `sign(S) * dL/d(W*M) * W` (what edge-popup's code computes):
    the chain starts with that multiplication. Without it a negative score moves the wrong way.

    Args:
      budget: pruned counts from `layer_budgets`.
      learning_rate: peak learning rate; decays to 0 with a cosine over `total_steps`.
      momentum: SGD momentum (no Nesterov).
      weight_decay: decay added to the score gradients (coupled, as in PyTorch SGD).
      total_steps: the number of search steps.
      rate: the short-restriction rate, a number in [0, 1] or a schedule; `None` means 1 (every
        proposed swap is made, i.e. exact per-layer top-k after each step).
      rank_by: `'score'` (signed) or `'abs'`.
      selection, layout: how the restriction selects (see `short_restriction`); the same masks
        whatever they are.

    Returns:
      An `optax.GradientTransformation`; call `update(grads, state, scores)`.
    """
    links = [_through_abs()] if rank_by == "abs" else []
    return optax.chain(
        *links,
        optax.add_decayed_weights(weight_decay),
        optax.sgd(
            optax.cosine_decay_schedule(learning_rate, total_steps),
            momentum=momentum,
            nesterov=False,
        ),
        short_restriction(
            budget,
            rate=1.0 if rate is None else rate,
            rank_by=rank_by,
            selection=selection,
            layout=layout,
        ),
    )


def _through_abs() -> optax.GradientTransformation:
    """Multiplies the gradients by `sign(scores)`: the chain rule through `|S|`."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "ranking by |score| needs the scores: call update(grads, state, scores)"
            )
        signed = jax.tree.map(lambda g, s: g * jnp.sign(s).astype(g.dtype), updates, params)
        return signed, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


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
    params: PyTree,
    batch: dict[str, jax.Array],
    *,
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    axis_name: str | None = None,
    label_smoothing: float = 0.0,
) -> tuple[SearchState, dict[str, jax.Array]]:
    """One search step on this device's shard of the batch; only the scores are trained.

    Args:
      state: the `SearchState` (replicated when data-parallel).
      params: the frozen pre-trained params (replicated; never changed).
      batch: `{'image': [b, H, W, C], 'label': [b]}` (this device's shard).
      apply_fn: the model's apply function (`linen_apply`, `nnx_apply`; static).
      tx: the search optimiser (from `search_optimizer`; static).
      axis_name: the data-parallel axis name, or `None` on one device.
      label_smoothing: label smoothing of the cross-entropy (0 in the reference code).

    Returns:
      `(new_state, metrics)`; metrics hold `loss`, `accuracy` (means over the global batch) and
      `churn` (mask entries flipped by this step, all layers) and `churn_per_layer` (a dict
      layer path -> entries flipped in that layer).

    Example:
      >>> step = jax.jit(partial(search_step, apply_fn=apply_fn, tx=tx), donate_argnums=0)
      >>> state, metrics = step(state, params, batch)
    """
    old_masks = current_masks(state.opt_state)

    def loss_fn(scores):
        weights = masked_weights(params, scores, old_masks)
        logits, new_stats = apply_fn(weights, state.batch_stats, batch["image"], True)
        loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
        return loss, (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.scores)
    # Per-device gradients of the per-device mean loss; their mean is the gradient of the mean
    # loss over the global batch (equal shards).
    grads = _pmean(grads, axis_name)
    new_stats = _pmean(new_stats, axis_name)
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
    return new_state, metrics


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    axis_name: str | None = None,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One dense training step (params and batch statistics), for pre-training.

    Returns:
      `(new_state, metrics)` with `loss` and `accuracy` (means over the global batch).
    """

    def loss_fn(params):
        logits, new_stats = apply_fn(params, state.batch_stats, batch["image"], True)
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
    apply_fn: ApplyFn,
    axis_name: str | None = None,
) -> dict[str, jax.Array]:
    """Summed evaluation counts over the valid examples of a (possibly padded) batch.

    Args:
      params: the parameters.
      batch_stats: the running statistics (eval mode uses them).
      masks: masks to apply (`W * M`), or `None` to evaluate the dense params.
      batch: `{'image', 'label'}` and optionally `'mask'` (bool, True for real examples; padded
        examples count nowhere). Without `'mask'` every example counts.
      apply_fn: the model's apply function (static).
      axis_name: the data-parallel axis name; counts are `psum`'d over it.

    Returns:
      `{'correct': int32, 'correct_top5': int32, 'loss': float32 summed loss, 'count': int32
      valid examples}` (`correct_top5`: the label among the 5 highest logits).
    """
    weights = params if masks is None else apply_masks(params, masks)
    logits, _ = apply_fn(weights, batch_stats, batch["image"], False)
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


def bn_stats_step(
    params: PyTree,
    batch_stats: PyTree,
    masks: PyTree | None,
    batch: dict[str, jax.Array],
    *,
    apply_fn: ApplyFn,
    axis_name: str | None = None,
) -> PyTree:
    """The running statistics after one train-mode forward pass of `W * M` over the batch.

    Re-estimates batch-norm statistics of a pruned model without training it: call it on a
    number of training batches, feeding each call the statistics of the previous one.

    Args:
      params: the parameters.
      batch_stats: the running statistics to update.
      masks: masks to apply (`W * M`), or `None` for the dense params.
      batch: `{'image', ...}` (this device's shard).
      apply_fn: the model's apply function (static).
      axis_name: the data-parallel axis name; the statistics are averaged over it.

    Returns:
      The updated running statistics.
    """
    weights = params if masks is None else apply_masks(params, masks)
    _, stats = apply_fn(weights, batch_stats, batch["image"], True)
    return _pmean(stats, axis_name)
