"""The phases of a run: pre-training, evaluation, BN re-estimation, the search, the export.

Each phase is a function of a `Context` (`experiment.context`: what every phase of a run shares)
and plain arguments: recipes (`TrainRecipe`, `SearchRecipe`), seeds, weights. The modes
(`experiment.modes`) read the config and call them.

Random streams, all from the run's one seed `s`: dense initialisation and pre-training batches
`s`, random weights on purpose `s + 1`, the search's score init and carried key `s + 2`, its
batches `s + 3`, the batches of BN re-estimation `s + 7`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jackpots_jax._tree import named_leaves
from jackpots_jax.experiment import report
from jackpots_jax.experiment.context import (
    PRETRAINED,
    Context,
    random_variables,
    results,
    save_weights,
)
from jackpots_jax.experiment.hooks import ChurnPerEpoch, EvaluateEveryEpochs, TrainLog
from jackpots_jax.experiment.loop import train_loop
from jackpots_jax.io.export import export_jackpot
from jackpots_jax.masks import init_scores, mask_overlap
from jackpots_jax.restriction import schedules
from jackpots_jax.sparsity import layer_budgets, sparsity_report
from jackpots_jax.step import (
    bn_stats_step,
    create_search_state,
    create_train_state,
    eval_step,
    search_optimizer,
    search_step,
    train_step,
)

PyTree = Any


# ---------------------------------------------------------------------------------------------
# Evaluation and batch-norm re-estimation.


@jax.jit
def _add(total: PyTree, new: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, total, new)


def evaluate(
    ctx: Context, params: PyTree, batch_stats: PyTree, masks: PyTree | None
) -> dict[str, float]:
    """Top-1 and top-5 accuracy and mean loss over the whole evaluation split (each example once).

    The final epoch's figures are the ones reported; no epoch is picked by its test accuracy.
    """
    run = ctx.devices.run(eval_step, apply_fn=ctx.network.apply_fn)
    params, batch_stats = ctx.devices.weights(params), ctx.devices.replicate(batch_stats)
    masks = None if masks is None else ctx.devices.weights(masks)
    total = None
    for batch in ctx.data.eval_batches(ctx.eval_batch_size):
        out = run(params, batch_stats, masks, ctx.devices.shard(batch))
        total = out if total is None else _add(total, out)
    total = jax.device_get(total)
    count = int(total["count"])
    return {
        "accuracy": int(total["correct"]) / count,
        "top5_accuracy": int(total["correct_top5"]) / count,
        "loss": float(total["loss"]) / count,
        "count": count,
    }


def reestimate_batch_stats(
    ctx: Context,
    params: PyTree,
    batch_stats: PyTree,
    masks: PyTree | None,
    *,
    num_batches: int,
    batch_size: int,
    seed: int,
) -> PyTree:
    """Running BN statistics re-estimated in train mode over `num_batches` training batches."""
    run = ctx.devices.run(bn_stats_step, apply_fn=ctx.network.apply_fn)
    params, batch_stats = ctx.devices.weights(params), ctx.devices.replicate(batch_stats)
    masks = None if masks is None else ctx.devices.weights(masks)
    batches = ctx.data.train_batches(batch_size, seed + 7, augment=False)
    for _ in range(num_batches):
        batch_stats = run(params, batch_stats, masks, ctx.devices.shard(next(batches)))
    return batch_stats


# ---------------------------------------------------------------------------------------------
# Dense pre-training.


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Dense training from scratch: SGD with momentum, cosine learning rate to 0."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    augment: bool


def pretrain(ctx: Context, recipe: TrainRecipe, *, seed: int) -> dict[str, PyTree]:
    """Dense training from scratch; returns the variables and saves them as the pre-trained."""
    steps_per_epoch = ctx.data.steps_per_epoch(recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    lr = optax.cosine_decay_schedule(recipe.learning_rate, max(total_steps, 1))
    tx = optax.chain(
        optax.add_decayed_weights(recipe.weight_decay),
        optax.sgd(lr, momentum=recipe.momentum or None, nesterov=recipe.nesterov),
    )
    variables = random_variables(ctx, seed)
    state = ctx.devices.place_state(
        create_train_state(variables["params"], variables["batch_stats"], tx)
    )
    run = ctx.devices.run(
        train_step,
        donate_state=True,
        apply_fn=ctx.network.apply_fn,
        tx=tx,
        label_smoothing=recipe.label_smoothing,
    )
    hooks = [
        TrainLog(
            ctx.log,
            "pretrain",
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batch_size=recipe.batch_size,
            learning_rate=lr,
            show_progress=ctx.is_main,
        ),
        EvaluateEveryEpochs(
            ctx.log,
            "pretrain",
            ctx.eval_every_epochs,
            total_steps,
            lambda s: evaluate(ctx, s.params, s.batch_stats, None),
        ),
    ]
    with ctx.checkpointer("pretrain", {}) as ckpt:
        state = train_loop(
            state,
            lambda state, batch: run(state, ctx.devices.shard(batch)),
            ctx.data.train_batches(recipe.batch_size, seed, recipe.augment),
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            checkpointer=ckpt,
            log_every_steps=ctx.log_every_steps,
            hooks=hooks,
        )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    save_weights(ctx, variables, os.path.join(ctx.workdir, PRETRAINED))
    return variables


# ---------------------------------------------------------------------------------------------
# The search.


@dataclasses.dataclass(frozen=True)
class RateRecipe:
    """The short restriction's rate: `constant` (`value`), `cosine`, or `polynomial` (`power`)."""

    schedule: str
    value: float
    power: float

    def schedule_fn(self, total_steps: int):
        if self.schedule == "constant":
            return schedules.constant(self.value)
        if self.schedule == "cosine":
            return schedules.cosine(total_steps)
        return schedules.polynomial(total_steps, self.power)


@dataclasses.dataclass(frozen=True)
class SearchRecipe:
    """Everything that decides a search (see `experiment.config.base_config` for each field)."""

    sparsity: float
    rule: str
    dense: tuple[str, ...] | None  # None: the model's default
    init: str
    gap: float
    epochs: int
    max_steps: int
    batch_size: int
    learning_rate: float
    momentum: float
    weight_decay: float
    label_smoothing: float
    augment: bool
    rank_by: str
    rate: RateRecipe

    def budget(self, params: PyTree, default_dense: Sequence[str]) -> PyTree:
        dense = default_dense if self.dense is None else self.dense
        return layer_budgets(params, self.sparsity, self.rule, dense=tuple(dense))

    def steps(self, steps_per_epoch: int) -> tuple[int, int]:
        """`(total_steps, steps_per_epoch)`; `max_steps` caps both."""
        total = self.max_steps or self.epochs * steps_per_epoch
        return total, min(steps_per_epoch, total) if self.max_steps else steps_per_epoch

    def optimizer(
        self, budget: PyTree, total_steps: int, *, selection: str = "auto", layout: Any = None
    ) -> optax.GradientTransformation:
        return search_optimizer(
            budget,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            total_steps=total_steps,
            rate=self.rate.schedule_fn(total_steps),
            rank_by=self.rank_by,
            selection=selection,
            layout=layout,
        )


def _budget_identity(budget: PyTree) -> dict[str, Any]:
    return {"budget": {n: int(b) for n, b in named_leaves(budget) if b is not None}}


def search(
    ctx: Context,
    params: PyTree,
    batch_stats: PyTree,
    recipe: SearchRecipe,
    *,
    seed: int,
    fingerprint: str,
) -> tuple[Any, PyTree]:
    """The jackpot search from frozen `params`; returns the final `SearchState` and its budget.

    Resumes from `<workdir>/search/checkpoints` when a checkpoint of the same run is there; one of
    other weights (`fingerprint`), budget or model is refused.
    """
    budget = recipe.budget(params, ctx.network.spec.dense)
    total_steps, steps_per_epoch = recipe.steps(ctx.data.steps_per_epoch(recipe.batch_size))
    key_init, key_state = jax.random.split(jax.random.key(seed + 2))
    scores, _ = init_scores(
        params, budget, recipe.init, key_init, gap=recipe.gap, rank_by=recipe.rank_by
    )
    tx = _optimizer(ctx, recipe, budget, scores, total_steps)
    state = create_search_state(
        scores, tx, batch_stats=batch_stats, rng=jax.random.key_data(key_state)
    )
    state = ctx.devices.place_state(state)
    params = ctx.devices.weights(params)
    run = ctx.devices.run(
        search_step,
        donate_state=True,
        apply_fn=ctx.network.apply_fn,
        tx=tx,
        label_smoothing=recipe.label_smoothing,
    )
    kept = sum(int(np.size(w)) - int(b) for (_, w), (_, b) in _masked(params, budget))
    hooks = [
        TrainLog(
            ctx.log,
            "search",
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batch_size=recipe.batch_size,
            learning_rate=optax.cosine_decay_schedule(recipe.learning_rate, total_steps),
            show_progress=ctx.is_main,
        ),
        ChurnPerEpoch(ctx.log, "search", kept),
        EvaluateEveryEpochs(
            ctx.log,
            "search",
            ctx.eval_every_epochs,
            total_steps,
            lambda s: evaluate(ctx, params, s.batch_stats, s.masks),
        ),
    ]
    with ctx.checkpointer("search", _budget_identity(budget), fingerprint) as ckpt:
        state = train_loop(
            state,
            lambda state, batch: run(state, params, ctx.devices.shard(batch)),
            ctx.data.train_batches(recipe.batch_size, seed + 3, recipe.augment),
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            checkpointer=ckpt,
            log_every_steps=ctx.log_every_steps,
            hooks=hooks,
        )
    return state, budget


def restored_search(
    ctx: Context, params: PyTree, batch_stats: PyTree, recipe: SearchRecipe, *, fingerprint: str
) -> tuple[Any, PyTree]:
    """The newest search checkpoint's state and its budget, without searching.

    Raises:
      FileNotFoundError: there is no search checkpoint.
      CheckpointMismatchError: it belongs to another run (weights, budget, model, ...).
    """
    budget = recipe.budget(params, ctx.network.spec.dense)
    total_steps, _ = recipe.steps(ctx.data.steps_per_epoch(recipe.batch_size))
    scores, _ = init_scores(params, budget, "magnitude", gap=recipe.gap, rank_by=recipe.rank_by)
    tx = _optimizer(ctx, recipe, budget, scores, max(total_steps, 1))
    target = ctx.devices.place_state(
        create_search_state(
            scores, tx, batch_stats=batch_stats, rng=jax.random.key_data(jax.random.key(0))
        )
    )
    with ctx.checkpointer("search", _budget_identity(budget), fingerprint) as ckpt:
        restored = ckpt.restore(target)
    if restored is None:
        raise FileNotFoundError(
            f"no search checkpoint in {os.path.join(ctx.workdir, 'search', 'checkpoints')}: "
            "run `--config.mode=search` first"
        )
    return restored[0], budget


def _optimizer(ctx: Context, recipe: SearchRecipe, budget: PyTree, scores: PyTree, total: int):
    """The search optimiser, its selection laid out over the devices the scores are on."""
    return recipe.optimizer(
        budget,
        total,
        selection=ctx.devices.search_selection,
        layout=ctx.devices.layout(scores),
    )


def _masked(params: PyTree, budget: PyTree):
    by_name = dict(named_leaves(budget))
    for name, w in named_leaves(params):
        if by_name.get(name) is not None:
            yield (name, w), (name, by_name[name])


def export(
    ctx: Context,
    params: PyTree,
    state: Any,
    budget: PyTree,
    *,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    fingerprint: str,
) -> dict[str, str]:
    """The jackpot of a search state to `<workdir>/export` (process 0 only)."""
    if not ctx.is_main:
        return {}
    return export_jackpot(
        os.path.join(ctx.workdir, "export"),
        variables={
            "params": jax.device_get(params),
            "batch_stats": jax.device_get(state.batch_stats),
        },
        masks=jax.device_get(state.masks),
        model_name=ctx.model_name,
        budget=budget,
        config=config,
        metrics=metrics,
        scores=jax.device_get(state.scores),
        fingerprint=fingerprint,
        **ctx.model_options,
    )


def write_report(
    ctx: Context,
    params: PyTree,
    masks: PyTree,
    magnitude_masks: PyTree | None,
    *,
    title: str,
    config: Mapping[str, Any],
) -> str:
    """`<workdir>/report.md` and its plots: results, sparsity, overlap, churn, curves."""
    masks, params = jax.device_get(masks), jax.device_get(params)
    overlap = None if magnitude_masks is None else mask_overlap(masks, magnitude_masks)
    records = report.read_metrics(ctx.log.path) if os.path.exists(ctx.log.path) else []
    return report.write_report(
        ctx.workdir,
        title=title,
        results=results(ctx),
        sparsity=sparsity_report(masks, params),
        overlap=overlap,
        records=records,
        config=config,
        notes=[
            "Overlap: IoU of the kept weights of the jackpot and of magnitude pruning at the same "
            "budget; 'b_in_a' is the share of the magnitude mask's kept weights the jackpot keeps.",
        ],
    )


def masks_sparsity(masks: PyTree, params: PyTree) -> float:
    """The sparsity over the masked layers."""
    return sparsity_report(jax.device_get(masks), jax.device_get(params))["budgeted"]["sparsity"]
