"""Loss functions of the steps: per-item losses, weights and metrics of a model's outputs.

A loss function maps the model's outputs and the batch to `LossTerms`, everything per item (an
example of an image batch, a token of a text batch):

    loss_fn(outputs, batch) -> LossTerms(loss, weights, metrics, sums)

The steps reduce them (`step.py`): without weights the training loss is the mean over the items
(and over devices, equal shards); with weights it is `sum(loss * w) / sum(w)` over the global
batch, so that padding tokens (weight 0) count nowhere and devices holding different numbers of
valid tokens are weighted by those numbers. `metrics` are reduced the same way; `sums` are what
`eval_step` adds up over the valid items of the evaluation split, next to the summed `loss` and
the `count` of items, so that accuracies and perplexities (`exp(loss / count)`) are exact.

Example:
  >>> loss_fn = losses.classification(label_smoothing=0.1)   # batch['label'] [b]
  >>> loss_fn = losses.next_token()   # batch['targets'] [b, t], batch['weights'] [b, t]
  >>> loss_fn = losses.kl_to_dense()  # KL from the dense model's outputs (`search_step` adds them)
  >>> state, metrics = search_step(state, params, batch, apply_fn=apply_fn, tx=tx,
  ...                              loss_fn=loss_fn, inputs="inputs")
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

_EMPTY: Mapping[str, jax.Array] = types.MappingProxyType({})


class LossTerms(NamedTuple):
    """Per-item terms of a loss function (a pytree; `None` and empty fields are allowed).

    Attributes:
      loss: the loss of every item, e.g. `[b]` (examples) or `[b, t]` (tokens); the step
        differentiates its (weighted) mean.
      weights: the weight of every item, the shape of `loss` (0: the item counts nowhere), or
        `None` for equal weights (then the plain mean is taken, as for a batch of images).
      metrics: `{name: per-item value}` reported by the training steps as (weighted) means over
        the global batch, e.g. `{'accuracy': argmax == label}`.
      sums: `{name: per-item value}` that `eval_step` sums over the valid items, e.g.
        `{'correct': argmax == label}` (booleans are counted in int32).
    """

    loss: jax.Array
    weights: jax.Array | None = None
    metrics: Mapping[str, jax.Array] = _EMPTY
    sums: Mapping[str, jax.Array] = _EMPTY


LossFn = Callable[[Any, Mapping[str, jax.Array]], LossTerms]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy with integer labels (and optional label smoothing)."""
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Whether each label is among the `k` highest logits (all of them when there are fewer).

    Ties count in the label's favour, as the usual `topk(..).eq(label)` does up to tie order: the
    label is correct when fewer than `k` logits are strictly higher than its own.
    """
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    beaten_by = jnp.sum(logits > label_logit, axis=-1)
    return beaten_by < min(k, logits.shape[-1])


def classification(label_smoothing: float = 0.0) -> LossFn:
    """Softmax cross-entropy of `batch['label']` under the logits, one term per example.

    Args:
      label_smoothing: the share of each target spread evenly over all classes (0: none).

    Returns:
      `loss_fn(logits [b, classes], batch) -> LossTerms` with no weights (every example counts
      the same), metric `accuracy` and, for evaluation, the counts `correct` (top-1) and
      `correct_top5` (the label among the 5 highest logits).

    Example:
      >>> terms = classification()(logits, {"label": labels})
      >>> terms.loss.shape == labels.shape
      True
    """

    def loss_fn(logits, batch):
        labels = batch["label"]
        correct = jnp.argmax(logits, -1) == labels
        return LossTerms(
            loss=cross_entropy(logits, labels, label_smoothing),
            metrics={"accuracy": correct},
            sums={"correct": correct, "correct_top5": top_k_correct(logits, labels, 5)},
        )

    return loss_fn


def next_token() -> LossFn:
    """Negative log-likelihood of `batch['targets']` under the logits, one term per token.

    The targets are the inputs shifted by one (the data pipeline does it); `batch['weights']`
    (1 for a real token, 0 for padding or a prompt not to learn) weighs every term, so the loss
    is the sum over valid tokens divided by their number. Without `'weights'` all tokens count.

    Returns:
      `loss_fn(logits [b, t, vocab], batch) -> LossTerms` with metric `accuracy` (tokens whose
      most likely prediction is the target) and, for evaluation, the count `correct`. The summed
      `loss` and the `count` that `eval_step` returns give the perplexity `exp(loss / count)`.

    Example:
      >>> batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
      >>> terms = next_token()(logits, batch)
      >>> terms.loss.shape == batch["targets"].shape
      True
    """

    def loss_fn(logits, batch):
        targets = batch["targets"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        correct = jnp.argmax(logits, -1) == targets
        weights = batch.get("weights")
        return LossTerms(
            loss=nll,
            weights=None if weights is None else jnp.asarray(weights, jnp.float32),
            metrics={"accuracy": correct},
            sums={"correct": correct},
        )

    return loss_fn


# The batch key under which `search_step` passes the dense model's outputs to a loss function
# that asks for them (`needs_dense_outputs`).
DENSE_OUTPUTS = "dense_outputs"


def kl_to_dense(temperature: float = 1.0) -> LossFn:
    """KL divergence from the dense model's next-item distribution to the masked model's.

    The per-item loss is `KL(p || q) = sum_v p_v (log p_v - log q_v)` with `p = softmax(dense / T)`
    and `q = softmax(masked / T)` over the last axis, scaled by `T**2` (so that its gradient keeps
    its size as `T` changes); with `T = 1` it is the cross-entropy to the dense model's
    distribution less that distribution's entropy. The dense outputs come from the batch under
    `DENSE_OUTPUTS`: the returned function has `needs_dense_outputs = True`, and `search_step`
    then runs the model on the unmasked frozen weights (no gradient, `train=False`, the state's
    batch statistics) and adds its outputs to the batch before calling it. A search thus learns
    the mask that keeps the dense model's predictions, not the corpus's next tokens.

    `batch['weights']` weighs the items as in `next_token` (padding counts nowhere); with
    `batch['targets']` the metric `accuracy` and the count `correct` are reported as there, and
    the metric `nll` is the masked model's negative log-likelihood of the targets (so a log
    shows both what is optimised and the perplexity it buys).

    Args:
      temperature: `T > 0` (1: the models' own distributions).

    Returns:
      `loss_fn(outputs [..., classes], batch) -> LossTerms`, with `needs_dense_outputs = True`.

    Raises:
      ValueError: `temperature` is not a positive number.

    Example:
      >>> loss_fn = kl_to_dense()
      >>> terms = loss_fn(logits, {"targets": targets, DENSE_OUTPUTS: dense_logits})
    """
    if not temperature > 0:
        raise ValueError(f"kl_to_dense: temperature must be > 0, got {temperature!r}")

    def loss_fn(outputs, batch):
        if DENSE_OUTPUTS not in batch:
            raise KeyError(
                f"kl_to_dense needs the dense model's outputs in batch[{DENSE_OUTPUTS!r}] "
                "(`search_step` adds them; elsewhere add them yourself)"
            )
        logits = outputs.astype(jnp.float32)
        dense = jax.lax.stop_gradient(batch[DENSE_OUTPUTS]).astype(jnp.float32)
        log_p = jax.nn.log_softmax(dense / temperature, axis=-1)
        log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * temperature**2
        weights = batch.get("weights")
        metrics, sums = {}, {}
        if "targets" in batch:
            targets = batch["targets"]
            correct = jnp.argmax(logits, -1) == targets
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            metrics, sums = {"accuracy": correct, "nll": nll}, {"correct": correct}
        return LossTerms(
            loss=kl,
            weights=None if weights is None else jnp.asarray(weights, jnp.float32),
            metrics=metrics,
            sums=sums,
        )

    loss_fn.needs_dense_outputs = True
    return loss_fn
