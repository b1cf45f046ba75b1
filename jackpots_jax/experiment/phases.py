"""The phases of a run: pre-training, evaluation, BN re-estimation, the search, the export.

Each phase is a function of a `Context` (`experiment.context`: what every phase of a run shares)
and plain arguments: recipes (`experiment.recipes`: the config read once), seeds, weights. The
modes (`experiment.modes`) and the studies call them.

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

from jackpots_jax import losses
from jackpots_jax._tree import named_leaves
from jackpots_jax.data import text as text_data
from jackpots_jax.experiment import report
from jackpots_jax.experiment.context import (
    PRETRAINED,
    Context,
    random_variables,
    record_result,
    results,
    save_weights,
)
from jackpots_jax.experiment.hooks import (
    ChurnPerEpoch,
    EvaluateEveryEpochs,
    ScheduleGuard,
    TrainLog,
)
from jackpots_jax.experiment.loop import train_loop
from jackpots_jax.experiment.recipes import SearchRecipe, TrainRecipe
from jackpots_jax.io.export import export_jackpot
from jackpots_jax.masks import init_scores, mask_overlap, scores_from_masks
from jackpots_jax.models.spec import layer_groups
from jackpots_jax.patterns import is_structured
from jackpots_jax.sparsity import sparsity_report
from jackpots_jax.step import (
    bn_stats_step,
    create_search_state,
    create_train_state,
    eval_step,
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
    """The model's figures over the whole evaluation split, each example (token) once.

    Images: top-1 and top-5 accuracy, mean loss and the example count. Text: the perplexity
    `exp(summed NLL / count)` over every scored validation token, the mean NLL (`loss`),
    next-token accuracy and the token `count`. The final epoch's figures are the ones reported; no
    epoch is picked by its test accuracy.
    """
    run = ctx.compiled(
        "evaluate",
        lambda: ctx.devices.run(
            eval_step,
            apply_fn=ctx.network.apply_fn,
            loss_fn=ctx.data.loss_fn(),
            inputs=ctx.data.inputs,
        ),
    )
    params, batch_stats = ctx.devices.weights(params), ctx.devices.replicate(batch_stats)
    masks = None if masks is None else ctx.devices.weights(masks)
    if ctx.data.is_text:
        return _evaluate_text(ctx, run, params, batch_stats, masks)
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


def _evaluate_text(ctx: Context, run, params, batch_stats, masks) -> dict[str, float]:
    # Every batch's sums come to the host and add up in float64: the token count stays exact
    # and the summed NLL keeps its digits over millions of tokens.
    total = {"loss": 0.0, "count": 0.0, "correct": 0.0}
    for batch in ctx.data.eval_batches(ctx.eval_batch_size):
        out = jax.device_get(run(params, batch_stats, masks, ctx.devices.shard(batch)))
        for name in total:
            total[name] += float(np.float64(out[name]))
    count = int(round(total["count"]))
    return {
        "perplexity": text_data.perplexity(total["loss"], count),
        "loss": total["loss"] / count,
        "accuracy": total["correct"] / count,
        "count": count,
        "sum_nll": total["loss"],
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
    run = ctx.devices.run(bn_stats_step, apply_fn=ctx.network.apply_fn, inputs=ctx.data.inputs)
    params, batch_stats = ctx.devices.weights(params), ctx.devices.replicate(batch_stats)
    masks = None if masks is None else ctx.devices.weights(masks)
    batches = ctx.data.train_batches(batch_size, seed + 7, augment=False)
    for _ in range(num_batches):
        batch_stats = run(params, batch_stats, masks, ctx.devices.shard(next(batches)))
    return batch_stats


# ---------------------------------------------------------------------------------------------
# Dense pre-training.


def pretrain(
    ctx: Context, recipe: TrainRecipe, *, seed: int, allow_schedule_change: bool = False
) -> dict[str, PyTree]:
    """Dense training from scratch; returns the variables and saves them as the pre-trained.

    Resumes from `<workdir>/pretrain/checkpoints`; one made under another schedule (epochs,
    learning rate, ...) is refused unless `allow_schedule_change`.
    """
    steps_per_epoch = ctx.data.steps_per_epoch(recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    tx, lr = recipe.transform(total_steps, steps_per_epoch)
    variables = random_variables(ctx, seed)
    state = ctx.devices.place_state(
        create_train_state(variables["params"], variables["batch_stats"], tx)
    )
    run = ctx.devices.run(
        train_step,
        donate_state=True,
        apply_fn=ctx.network.apply_fn,
        tx=tx,
        loss_fn=ctx.data.loss_fn(recipe.label_smoothing),
        inputs=ctx.data.inputs,
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
            **_throughput(ctx),
        ),
        EvaluateEveryEpochs(
            ctx.log,
            "pretrain",
            ctx.eval_every_epochs,
            total_steps,
            lambda s: evaluate(ctx, s.params, s.batch_stats, None),
        ),
        ScheduleGuard(_schedule(ctx, "pretrain", recipe, seed), allow_schedule_change),
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


# What decides the masks, not the schedule: a change of these is refused by the checkpoint's
# identity (the budget), and allowing one would not make sense.
_NOT_SCHEDULE = ("sparsity", "rule", "dense", "allow_empty_layers", "pattern", "indivisible")


def _schedule(ctx: Context, phase: str, recipe: Any, seed: int) -> dict[str, Any]:
    """The config fields that decide a phase's steps, learning rates and batches."""

    def flat(prefix: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for name, value in fields.items():
            if isinstance(value, Mapping):
                out.update(flat(f"{prefix}.{name}", value))
            elif name not in _NOT_SCHEDULE:
                out[f"{prefix}.{name}"] = value
        return out

    return {
        **flat(phase, dataclasses.asdict(recipe)),
        "seed": seed,
        "dataset.num_train": ctx.data.num_train or 0,
    }


def _budget_identity(budget: PyTree) -> dict[str, Any]:
    """What a checkpoint's budget says: pruned counts, and the pattern when it is structured.

    An unstructured run records no pattern, so checkpoints written before patterns existed still
    resume; a 2:4 checkpoint met by an unstructured run (or another pattern) differs in it.
    """
    entries = [(n, b) for n, b in named_leaves(budget) if b is not None]
    identity: dict[str, Any] = {"budget": {n: int(b) for n, b in entries}}
    patterns = sorted({str(b.pattern) for _, b in entries if is_structured(b)})
    if patterns:
        identity["pattern"] = ",".join(patterns)
    return identity


def search(
    ctx: Context,
    params: PyTree,
    batch_stats: PyTree,
    recipe: SearchRecipe,
    *,
    seed: int,
    fingerprint: str,
    allow_schedule_change: bool = False,
    phase: str = "search",
    prior: PyTree | None = None,
) -> tuple[Any, PyTree]:
    """The jackpot search from frozen `params`; returns the final `SearchState` and its budget.

    The initial scores are `recipe.init`'s, or with `prior` (masks at the recipe's budget, e.g. a
    one-shot baseline's) `scores_from_masks(prior, budget, gap=recipe.gap)`: the search starts
    from that mask as the paper's magnitude init starts from magnitude pruning's.

    Resumes from `<workdir>/search/checkpoints` when a checkpoint of the same run is there; one of
    other weights (`fingerprint`), budget or model is refused, and so is one made under another
    schedule (epochs, learning rate, ...) unless `allow_schedule_change`. `phase` names the
    checkpoint folder `<workdir>/<phase>` and the metrics (two searches of one run, e.g. an
    unstructured and a 2:4 one, take two names).
    """
    budget = recipe.budget(params, ctx.network.spec)
    total_steps, steps_per_epoch = recipe.steps(ctx.data.steps_per_epoch(recipe.batch_size))
    key_init, key_state = jax.random.split(jax.random.key(seed + 2))
    if prior is None:
        scores, _ = init_scores(
            params, budget, recipe.init, key_init, gap=recipe.gap, rank_by=recipe.rank_by
        )
    else:
        scores = scores_from_masks(prior, budget, gap=recipe.gap)

    def compile_step():
        tx = _optimizer(ctx, recipe, budget, scores, total_steps)
        if recipe.loss == "kl":  # to the dense model's outputs, which the step computes
            loss_fn = losses.kl_to_dense()
        else:
            loss_fn = ctx.data.loss_fn(recipe.label_smoothing)
        run = ctx.devices.run(
            search_step,
            donate_state=True,
            apply_fn=ctx.network.apply_fn,
            tx=tx,
            loss_fn=loss_fn,
            inputs=ctx.data.inputs,
        )
        return tx, run

    # Searches of one run that differ only in their initial scores (a language model's searches
    # from magnitude's, Wanda's and SparseGPT's masks) share one optimiser and compiled step.
    tx, run = ctx.compiled(_step_name(recipe, total_steps, budget), compile_step)
    state = create_search_state(
        scores, tx, batch_stats=batch_stats, rng=jax.random.key_data(key_state)
    )
    state = ctx.devices.place_state(state)
    params = ctx.devices.weights(params)
    kept = sum(int(np.size(w)) - int(b) for (_, w), (_, b) in _masked(params, budget))
    hooks = [
        TrainLog(
            ctx.log,
            phase,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batch_size=recipe.batch_size,
            learning_rate=optax.cosine_decay_schedule(recipe.learning_rate, total_steps),
            show_progress=ctx.is_main,
            **_throughput(ctx),
        ),
        ChurnPerEpoch(ctx.log, phase, kept),
        EvaluateEveryEpochs(
            ctx.log,
            phase,
            ctx.eval_every_epochs,
            total_steps,
            lambda s: evaluate(ctx, params, s.batch_stats, s.masks),
            every_steps=ctx.eval_every_steps,
        ),
        ScheduleGuard(_schedule(ctx, phase, recipe, seed), allow_schedule_change),
    ]
    with ctx.checkpointer(phase, _budget_identity(budget), fingerprint) as ckpt:
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


def _step_name(recipe: SearchRecipe, total_steps: int, budget: PyTree) -> str:
    """The search step's name in `Context.compiled`: every recipe field but the initial scores'
    (`init`, `gap`), which the step does not see, and the budget its optimiser holds (a budget
    rule such as `global_magnitude` reads the weights)."""
    fields = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("init", "gap")}
    return f"search_step:{total_steps}:{sorted(fields.items())!r}:{_budget_identity(budget)!r}"


def restored_search(
    ctx: Context, params: PyTree, batch_stats: PyTree, recipe: SearchRecipe, *, fingerprint: str
) -> tuple[Any, PyTree]:
    """The newest search checkpoint's state and its budget, without searching.

    Raises:
      FileNotFoundError: there is no search checkpoint.
      CheckpointMismatchError: it belongs to another run (weights, budget, model, ...).
    """
    budget = recipe.budget(params, ctx.network.spec)
    total_steps, _ = recipe.steps(ctx.data.steps_per_epoch(recipe.batch_size))
    scores, _ = init_scores(params, budget, "magnitude", gap=recipe.gap, rank_by=recipe.rank_by)
    tx = _optimizer(ctx, recipe, budget, scores, max(total_steps, 1))
    target = ctx.devices.place_state(
        create_search_state(
            scores, tx, batch_stats=batch_stats, rng=jax.random.key_data(jax.random.key(0))
        )
    )
    directory = os.path.join(ctx.workdir, "search", "checkpoints")
    restored = None
    if os.path.isdir(directory):  # not created by looking for it
        with ctx.checkpointer("search", _budget_identity(budget), fingerprint) as ckpt:
            restored = ckpt.restore(target)
    if restored is None:
        raise FileNotFoundError(
            f"no search checkpoint in {directory}: run `--config.mode=search` first (with the same "
            "--workdir)"
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


def _throughput(ctx: Context) -> dict[str, Any]:
    """`TrainLog`'s speed unit: images, or the tokens of a language model's windows."""
    if ctx.data.is_text:
        return {"unit": "tokens", "per_example": ctx.data.seq_len}
    return {}


def _masked(params: PyTree, budget: PyTree):
    by_name = dict(named_leaves(budget))
    for name, w in named_leaves(params):
        if by_name.get(name) is not None:
            yield (name, w), (name, by_name[name])


def record_jackpot(
    ctx: Context,
    params: PyTree,
    state: Any,
    budget: PyTree,
    row: Mapping[str, Any],
    *,
    config: Mapping[str, Any],
    fingerprint: str,
    directory: str = "export",
) -> None:
    """A searched jackpot's `row` into `results.json`, and the jackpot with it to `directory`."""
    record_result(ctx, row)
    export(
        ctx,
        params,
        state,
        budget,
        config=config,
        metrics=row,
        fingerprint=fingerprint,
        directory=directory,
    )


def export(
    ctx: Context,
    params: PyTree,
    state: Any,
    budget: PyTree,
    *,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    fingerprint: str,
    directory: str = "export",
) -> dict[str, str]:
    """The jackpot of a search state to `<workdir>/<directory>` (process 0 only)."""
    if not ctx.is_main:
        return {}
    return export_jackpot(
        os.path.join(ctx.workdir, directory),
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
    sparsity = sparsity_report(masks, params)
    groups = None
    if ctx.network.spec.layer_groups is not None:  # models that declare groups (the ViTs)
        groups = _sparsity_groups(ctx, sparsity, params)
    return report.write_report(
        ctx.workdir,
        title=title,
        results=results(ctx),
        sparsity=sparsity,
        sparsity_groups=groups,
        overlap=overlap,
        records=records,
        config=config,
        notes=[
            "Weights unchanged: the jackpot uses the pre-trained conv and dense weights and the "
            "batch-norm scale and bias exactly as they were (only masked); the batch-norm running "
            "statistics (mean, variance) are re-estimated during the search, as in the reference "
            "code. `export/masks.npz` with `export/batch_stats.npz` and the pre-trained weights "
            "reproduce the jackpot's accuracy (`--config.mode=evaluate "
            "--config.weights.masks=<workdir>/export/masks.npz`); so does "
            "`export/jackpot.safetensors` alone.",
            "Overlap: IoU is the intersection over union of the weights kept by the jackpot and "
            "by magnitude pruning at the same budget; 'share of magnitude kept by jackpot' is the "
            "share of the magnitude mask's kept weights that the jackpot keeps too.",
        ],
        baselines=_baselines(results(ctx)),
    )


def write_lm_report(
    ctx: Context,
    params: PyTree,
    searched: Mapping[str, PyTree],
    magnitude: Mapping[str, PyTree],
    *,
    title: str,
    config: Mapping[str, Any],
    block_losses: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """`<workdir>/report.md` of a language model's searches, one per sparsity pattern.

    The results (perplexities and token counts), then for every pattern the sparsity of the found
    masks by block and by kind of kernel (attention, MLP; the model's `layer_groups`), the overlap
    with the magnitude masks of the same budget, the mask churn and the curves. With
    `block_losses` (`lm.block_losses`: `{row: {block: loss}}`), a table of what each block
    pruned alone adds to the dense loss, and a note per row naming the block that loses most.
    """
    params = jax.device_get(params)
    groups, notes = {}, list(_LM_NOTES)
    for pattern, masks in searched.items():
        sparsity = sparsity_report(masks, params)
        for grouping, table in _sparsity_groups(ctx, sparsity, params).items():
            groups[f"{grouping} ({pattern})"] = table
        total = mask_overlap(masks, magnitude[pattern])["total"]
        notes.append(
            f"{pattern}: the jackpot keeps {100 * total['b_in_a']:.2f}% of the weights magnitude "
            f"pruning keeps (IoU {total['iou']:.4f})."
        )
    records = report.read_metrics(ctx.log.path) if os.path.exists(ctx.log.path) else []
    rows = results(ctx)
    notes += gap_closed_notes(rows)
    sections = {}
    if block_losses:
        table, block_notes = block_loss_table(rows, block_losses)
        sections["Loss by block"] = (
            "The mean validation NLL (nats) added to the dense model's when only one block's "
            "kernels take a row's masks (every other kernel dense), and the same with every "
            "block pruned at once (the row of the results).\n\n" + table
        )
        notes += block_notes
    return report.write_report(
        ctx.workdir,
        title=title,
        results=rows,
        sparsity_groups=groups,
        records=records,
        config=config,
        notes=notes,
        sections=sections,
    )


def block_loss_table(
    rows: Sequence[Mapping[str, Any]], losses: Mapping[str, Mapping[str, float]]
) -> tuple[str, list[str]]:
    """Markdown of `lm.block_losses` against the dense row, and one note per masks' row.

    One line per block: each row's loss with that block pruned alone minus the dense loss; then
    the sum of those over the blocks and the loss increase with every block pruned at once (from
    the results' row of the same name). The notes name each row's costliest block and its share
    of the sum.
    """
    by_model = {r["model"]: r for r in rows}
    dense = by_model["dense"]["loss"]
    labels = list(losses)
    blocks = list(dict.fromkeys(b for label in labels for b in losses[label]))
    head = "| block | " + " | ".join(labels) + " |\n|---|" + "---:|" * len(labels)
    lines = [head]
    for block in blocks:
        cells = [f"{losses[label][block] - dense:+.4f}" for label in labels]
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    sums = {label: sum(v - dense for v in losses[label].values()) for label in labels}
    lines.append("| sum of the blocks | " + " | ".join(f"{sums[x]:+.4f}" for x in labels) + " |")
    together = [f"{by_model[x]['loss'] - dense:+.4f}" if x in by_model else "-" for x in labels]
    lines.append("| all blocks at once | " + " | ".join(together) + " |")
    notes = []
    for label in labels:
        if not losses[label]:
            continue
        worst = max(losses[label], key=losses[label].get)
        added = losses[label][worst] - dense
        share = ""
        if sums[label] > 0:
            share = f", {100 * added / sums[label]:.0f}% of the sum of the blocks"
        notes.append(
            f"{label}: pruned alone, {worst} adds the most loss ({added:+.4f} nats{share})."
        )
    return "\n".join(lines), notes


# One-shot rows whose masks are over the frozen weights (SparseGPT with its weights changed is not).
_FROZEN_ONE_SHOT = ("magnitude pruning", "Wanda", "SparseGPT mask, weights frozen")


def gap_closed(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """How much of the gap to dense each jackpot closes, from the best one-shot frozen mask.

    For every `jackpot (<pattern>...)` row: `(best - jackpot) / (best - dense)` of the mean
    negative log-likelihood (`loss`), where `best` is the lowest of the pattern's one-shot rows
    over frozen weights (magnitude, Wanda, SparseGPT's mask), and the same of the perplexity.
    A jackpot without such a row, or whose best one-shot row is not worse than dense, is left out.

    Returns:
      `{jackpot row: {"best": its name, "best_loss", "dense_loss", "loss": the NLL share,
      "perplexity": the perplexity share}}`, in the rows' order.
    """
    by_model = {r["model"]: r for r in rows}
    dense = by_model.get("dense")
    out = {}
    for row in rows:
        name = row["model"]
        if dense is None or not name.startswith("jackpot (") or not name.endswith(")"):
            continue
        pattern = name[len("jackpot (") : -1].split(", from ")[0]
        oneshot = [by_model.get(f"{m} ({pattern})") for m in _FROZEN_ONE_SHOT]
        oneshot = [r for r in oneshot if r is not None]
        if not oneshot:
            continue
        best = min(oneshot, key=lambda r: r["loss"])
        if best["loss"] <= dense["loss"]:
            continue
        out[name] = {
            "best": best["model"],
            "best_loss": best["loss"],
            "dense_loss": dense["loss"],
            "loss": (best["loss"] - row["loss"]) / (best["loss"] - dense["loss"]),
            "perplexity": (best["perplexity"] - row["perplexity"])
            / (best["perplexity"] - dense["perplexity"]),
        }
    return out


def gap_closed_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """`gap_closed` as one sentence per jackpot row."""
    return [
        f"{name}: closes {100 * g['loss']:.1f}% of the mean-NLL gap between the best one-shot "
        f"mask over frozen weights ({g['best']}, {g['best_loss']:.4f}) and dense "
        f"({g['dense_loss']:.4f}); {100 * g['perplexity']:.1f}% of the perplexity gap."
        for name, g in gap_closed(rows).items()
    ]


_LM_NOTES = (
    "Perplexity is exp(summed negative log-likelihood / count) over every scored token of the "
    "validation windows (`count`); `loss` is the mean negative log-likelihood in nats and "
    "`accuracy` the share of tokens whose most likely prediction is the target.",
    "Weights unchanged: a jackpot masks the pre-trained q/k/v/o and MLP kernels; embeddings, "
    "norms and the output head are dense and untouched.",
)


def _baselines(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The final accuracies the curves are drawn against: dense and one-shot pruning."""
    names = ("dense", "magnitude pruning", "magnitude pruning + BN re-estimation")
    return {r["model"]: r for r in rows if r.get("model") in names}


def _sparsity_groups(
    ctx: Context, sparsity: Mapping[str, Any], params: PyTree
) -> dict[str, dict[str, Any]]:
    """The masked layers' sparsity summed in each grouping of the model's `layer_groups`."""
    masked = {n for n, r in sparsity["layers"].items() if r.get("masked", True)}
    shapes = {n: np.shape(w) for n, w in named_leaves(params) if n in masked}
    by = layer_groups(ctx.network.spec, shapes)
    return {g: report.sparsity_by_group(sparsity, of.get) for g, of in by.items()}


def masks_sparsity(masks: PyTree, params: PyTree) -> float:
    """The sparsity over the masked layers."""
    return sparsity_report(jax.device_get(masks), jax.device_get(params))["budgeted"]["sparsity"]
