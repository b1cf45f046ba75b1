"""`train_and_evaluate(config, workdir)`: the modes of the command line, as a table.

Each mode reads the config through `experiment.recipes` (the config once into plain values) and
calls the phases (`experiment.phases`) with them; nothing below it sees the config. Adding a mode
is one function `run_<mode>(ctx, config)` and one entry in `MODES`.

Modes (`config.mode`):

* `pretrain`: dense training from scratch; writes `<workdir>/pretrain/model.safetensors`.
* `search`: the jackpot search on frozen pre-trained weights; checkpoints every
  `checkpoint.every_steps` in `<workdir>/search/checkpoints` (resumed on start), evaluates the
  masked model every `eval.every_epochs`, exports the jackpot to `<workdir>/export`.
* `evaluate`: accuracy of weights (and masks: `weights.masks`, or those inside the weights file),
  with the batch-norm statistics of `weights.batch_stats`, by default the `batch_stats.npz` next
  to `weights.masks` (an exported jackpot's: the search re-estimated them); without one, the
  weights file's own, and a warning says so. Masks that are not a whole jackpot of these weights
  are refused (`_masks_to_evaluate`; docs/exit_codes.md).
* `prune`: one-shot magnitude pruning at `search.sparsity`, no search; evaluated with the
  pre-trained batch-norm statistics and, with `prune.reestimate_bn`, with re-estimated ones.
* `export`: the jackpot of the latest search checkpoint to `<workdir>/export`.
* `jackpot` (the default job): pre-train when no pre-trained weights exist, evaluate the dense
  model, magnitude-prune, search, evaluate, and write `<workdir>/report.md` with plots.
* `studies`: the paper's claims as a grid of searches over seeds (`experiment.studies`; the
  `studies` group of `configs/studies.py`); writes `<workdir>/studies/report.md`.

Every run appends metrics to `<workdir>/metrics.jsonl` (and TensorBoard) and the accuracies it
measured to `<workdir>/results.json`. Before anything is computed, the work directory is checked
to be writable and locked for this run (`experiment.workdir`): a second run on it is refused.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jackpots_jax import data, models, parallel
from jackpots_jax._tree import named_leaves
from jackpots_jax.experiment import config as config_lib
from jackpots_jax.experiment import context, lm, phases, recipes, report, studies
from jackpots_jax.experiment import workdir as workdir_lib
from jackpots_jax.experiment.config import ConfigError
from jackpots_jax.experiment.context import Context
from jackpots_jax.experiment.logs import MetricsLog
from jackpots_jax.io.errors import CheckpointMismatchError, FileContentError
from jackpots_jax.io.export import BATCH_STATS, batch_stats_from_npz, masks_from_npz
from jackpots_jax.io.files import read_json_file, write_json
from jackpots_jax.masks import init_scores
from jackpots_jax.patterns import Pattern
from jackpots_jax.sparsity import prunable_leaves

PyTree = Any
Config = ml_collections.ConfigDict


# ---------------------------------------------------------------------------------------------
# From the config to plain arguments.


def _context(config: Config, workdir: str, num_devices: int) -> Context:
    """Prepares the dataset, builds the model and the mesh, opens the logs."""
    workdir = os.path.abspath(os.fspath(workdir))
    c = config.dataset
    mesh = parallel.make_mesh(num_devices, fsdp=config.parallel.fsdp)
    local_devices = mesh.devices.size // jax.process_count()
    if c.name in data.text.CORPORA:
        tokens = lm.text_tokens(config)
        num_classes = config.model.num_classes or tokens.vocab_size
    else:
        info = data.prepare(c.name, c.data_dir or None, source_dir=c.source_dir or None)
        num_classes = config.model.num_classes or info.num_classes
        for field, wanted, size, split in (
            ("num_train", c.num_train, info.num_train, info.train_split),
            ("num_eval", c.num_eval, info.num_eval, info.eval_split),
        ):
            if wanted > size:
                raise ConfigError(
                    f"config field `dataset.{field}` is {wanted}, but split {split!r} of dataset "
                    f"{c.name!r} holds {size} examples; allowed: 0 (all of them) to {size}"
                )
    try:
        network = models.network(
            config.model.name, num_classes, config.model.dtype, **dict(config.model.kwargs)
        )
    except ValueError as e:  # an option the model does not take
        kwargs = dict(config.model.kwargs)
        raise ConfigError(f"config field `model.kwargs` is {kwargs!r}: {e}") from None
    if c.name in data.text.CORPORA:
        if tokens.vocab_size > network.num_classes:
            raise ConfigError(
                f"config field `model.num_classes` is {network.num_classes}, but the tokenizer "
                f"of {lm.weights_path(config)!r} has {tokens.vocab_size} ids; allowed: at least "
                "the tokenizer's vocabulary (0: the tokenizer's)"
            )
        dataset = context.text_data(
            tokens,
            seq_len=c.seq_len or network.spec.input_shape[0],
            num_train=c.num_train or None,
            num_eval=c.num_eval or None,
            local_device_count=local_devices,
        )
    else:
        if network.spec.fixed_input_shape and tuple(info.image_shape) != network.spec.input_shape:
            raise ConfigError(
                f"config field `model.name` is {config.model.name!r}, built for "
                f"{network.spec.input_shape} images, but dataset {c.name!r} has "
                f"{tuple(info.image_shape)} images"
            )
        dataset = context.Data(
            info=info,
            data_dir=c.data_dir or None,
            dtype=c.dtype,
            num_train=c.num_train or None,
            num_eval=c.num_eval or None,
            local_device_count=local_devices,
        )
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    return Context(
        workdir=workdir,
        network=network,
        model_dtype=config.model.dtype,
        data=dataset,
        devices=context.Devices(
            mesh,
            recipes.backend(config),
            config_lib.parse_rules(config.parallel.rules),
            config.search.selection,
        ),
        log=MetricsLog(workdir, is_main),
        is_main=is_main,
        checkpoint_every_steps=config.checkpoint.every_steps,
        checkpoint_keep=config.checkpoint.keep,
        log_every_steps=config.log_every_steps,
        eval_batch_size=config.eval.batch_size,
        eval_every_epochs=config.eval.every_epochs,
        eval_every_steps=config.eval.every_steps,
    )


def _weights(ctx: Context, config: Config) -> tuple[dict[str, PyTree], PyTree | None, str]:
    """The pre-trained variables the config names, their masks (or None), their fingerprint."""
    return context.pretrained(ctx, lm.weights_recipe(ctx, config))


def _pattern_note(config: Config) -> str:
    """`', pattern 2:4'` (and the leaves it leaves dense) for a structured search; else `''`."""
    s = config.search
    if not Pattern.parse(s.pattern).structured:
        return ""
    held = ", leaves it does not fit held dense" if s.indivisible == "dense" else ""
    return f", pattern {s.pattern}{held}"


def _check_search_fits(ctx: Context, config: Config) -> None:
    """The search leaves some leaf masked, and a structured pattern fits every masked leaf.

    Checked before any compute, from the model's abstract params: which leaves are masked, and
    which a pattern fits, depends on their shapes only (a structured pattern is checked with the
    `uniform` rule; the rule changes counts, not which leaves a pattern fits).
    """
    recipe = dataclasses.replace(recipes.search_recipe(config), rule="uniform")
    params = ctx.network.abstract_variables()["params"]
    structured = Pattern.parse(recipe.pattern).structured
    if structured:
        try:
            budget = recipe.budget(params, ctx.network.spec)
        except ValueError as e:
            raise ConfigError(
                f"config field `search.pattern` is {recipe.pattern!r} with `search.indivisible` "
                f"{recipe.indivisible!r}: {e}"
            ) from None
        masked = [name for name, b in named_leaves(budget) if b is not None]
    else:
        recipe.check_dense(params)
        dense = ctx.network.spec.dense if recipe.dense is None else recipe.dense
        masked = [name for name, flag in named_leaves(prunable_leaves(params, dense)) if flag]
    if not masked:
        dense_note = (
            f"`search.indivisible`='dense' holds every leaf the pattern {recipe.pattern!r} does "
            "not fit dense"
            if structured
            else f"`search.dense`={recipe.dense!r} holds every kernel dense"
        )
        raise ConfigError(
            f"config field `search.pattern` is {recipe.pattern!r}, but no layer of "
            f"{ctx.model_name!r} would be masked ({dense_note}): there would be nothing to "
            "search or export; allowed: a pattern that fits at least one kernel (a smaller "
            "block, `unstructured`), or fewer `search.dense` patterns"
        )


def _check_parallel_rules(ctx: Context, config: Config) -> None:
    """`parallel.rules` match leaves of the model and fit them (`config.check_rules`)."""
    params = ctx.network.abstract_variables()["params"]
    config_lib.check_rules(config.parallel.rules, params, config.parallel.fsdp)


# ---------------------------------------------------------------------------------------------
# The modes.


def run_pretrain(ctx: Context, config: Config) -> None:
    variables = _pretrain(ctx, config)
    dense = phases.evaluate(ctx, variables["params"], variables["batch_stats"], None)
    context.record_result(ctx, {"model": "dense", "sparsity": 0.0, **dense})


def _batch_stats_path(config: Config) -> str | None:
    """`weights.batch_stats`, or the `batch_stats.npz` next to `weights.masks` when there is one."""
    if config.weights.batch_stats:
        return config.weights.batch_stats
    if config.weights.masks:
        path = os.path.join(os.path.dirname(os.path.abspath(config.weights.masks)), BATCH_STATS)
        if os.path.exists(path):
            return path
    return None


def _masks_to_evaluate(ctx: Context, config: Config, params: PyTree, weights_fingerprint: str):
    """The masks of `weights.masks`, checked to be a whole jackpot of these very weights.

    Refused (before any compute): a file with no mask, a mask on a leaf that is not a kernel (a
    bias, a batch-norm scale), a layer the search masked (the `budget` of the `jackpot.json` next
    to the file; without one, every kernel `search.dense` does not hold dense) that has no mask (it
    would be evaluated dense), a layer whose mask keeps no weight (unless
    `search.allow_empty_layers`), and masks searched over other weights than `weights.path` (the
    fingerprint in `jackpot.json`; unless `weights.allow_other_weights`, then a warning).
    """
    path = config.weights.masks
    masks = masks_from_npz(path, params, exact=False)
    present = {name: np.asarray(m) for name, m in named_leaves(masks) if m is not None}
    where = f"masks file {path} (`weights.masks`)"
    if not present:
        raise FileContentError(
            f"{where} holds no mask: evaluating it would evaluate the dense model; allowed: the "
            "masks.npz a search exported (`<workdir>/export/masks.npz`)"
        )
    not_kernels = [name for name, m in present.items() if m.ndim < 2]
    if not_kernels:
        raise CheckpointMismatchError(
            f"{where} masks leaves that are not kernels: {', '.join(not_kernels)}; a search "
            "masks only kernels of convolutions and dense layers (a mask on a bias or a "
            "batch-norm scale is not a jackpot); remove those entries"
        )
    summary_path = os.path.join(os.path.dirname(os.path.abspath(path)), "jackpot.json")
    summary = (
        read_json_file(summary_path, "the jackpot summary") if os.path.exists(summary_path) else {}
    )
    if isinstance(summary.get("budget"), dict):
        expected, source = set(summary["budget"]), f"the budget in {summary_path}"
    else:
        dense = ctx.network.spec.dense if config.search.dense is None else config.search.dense
        expected = {n for n, flag in named_leaves(prunable_leaves(params, dense)) if flag}
        source = "`search.dense` (no jackpot.json next to the masks)"
    missing = sorted(expected - set(present))
    if missing:
        raise CheckpointMismatchError(
            f"{where} lacks the masks of layers a search masks (from {source}); they would be "
            "evaluated dense",
            missing=missing,
            hint="use the whole masks.npz of an export; if those layers were held dense in the "
            "search, name them in --config.search.dense",
        )
    empty = sorted(name for name, m in present.items() if not m.any())
    if empty:
        message = (
            f"{where} prunes every weight of {', '.join(empty)}: nothing passes through "
            f"{'it' if len(empty) == 1 else 'them'} (a classifier without weights predicts one "
            "class)"
        )
        if not config.search.allow_empty_layers:
            raise CheckpointMismatchError(
                f"{message}; allowed: masks that keep at least one weight per layer, or "
                "--config.search.allow_empty_layers=True to evaluate such masks anyway"
            )
        logging.warning("%s (search.allow_empty_layers=True)", message)
    saved = summary.get("weights_fingerprint")
    if saved is not None and saved != weights_fingerprint:
        weights_path = lm.weights_recipe(ctx, config).path
        message = (
            f"{where} was searched over other weights than {weights_path} "
            f"(`weights.path`): its {summary_path} records the weights fingerprint {saved}, these "
            f"weights have {weights_fingerprint}; a jackpot means nothing on other weights"
        )
        if not config.weights.allow_other_weights:
            raise CheckpointMismatchError(
                f"{message}; allowed: the weights the search ran over, or "
                "--config.weights.allow_other_weights=True to evaluate them anyway"
            )
        logging.warning("%s (weights.allow_other_weights=True)", message)
    return masks


def run_evaluate(ctx: Context, config: Config) -> None:
    variables, masks, weights_fingerprint = _weights(ctx, config)
    params, stats = variables["params"], variables["batch_stats"]
    row = {"model": "evaluated"}
    if config.weights.masks:
        masks = _masks_to_evaluate(ctx, config, params, weights_fingerprint)
    stats_path = _batch_stats_path(config)
    if stats_path is not None:
        stats = batch_stats_from_npz(stats_path, stats)
        row["note"] = f"batch-norm statistics from {stats_path}"
        logging.info("evaluating with the batch-norm statistics of %s", stats_path)
    elif config.weights.masks and jax.tree.leaves(stats):
        row["note"] = "batch-norm statistics of the weights file (none next to the masks)"
        logging.warning(
            "evaluating the masks of %s with the batch-norm statistics of the weights file %s: "
            "there is no %s next to the masks. A search re-estimates these statistics, so a "
            "jackpot's accuracy is reproduced only with the batch_stats.npz exported with its "
            "masks (set `--config.weights.batch_stats`)",
            config.weights.masks,
            lm.weights_recipe(ctx, config).path,
            BATCH_STATS,
        )
    sparsity = 0.0 if masks is None else phases.masks_sparsity(masks, params)
    result = phases.evaluate(ctx, params, stats, masks)
    context.record_result(ctx, {**row, "sparsity": sparsity, **result})


def _prune(ctx: Context, config: Config, variables: PyTree) -> PyTree:
    """Magnitude pruning at the search budget, no search: evaluated with and without BN re-est."""
    params, stats = variables["params"], variables["batch_stats"]
    budget = recipes.search_recipe(config).budget(params, ctx.network.spec)
    _, masks = init_scores(params, budget, "magnitude")
    sparsity = phases.masks_sparsity(masks, params)
    result = phases.evaluate(ctx, params, stats, masks)
    note = "no search" + _pattern_note(config)
    if config.prune.reestimate_bn and not jax.tree.leaves(stats):
        # LayerNorm (a ViT) normalises with each example's own statistics: nothing to re-estimate.
        note += "; no BN re-estimation: the model has no running statistics"
    context.record_result(
        ctx, {"model": "magnitude pruning", "sparsity": sparsity, "note": note, **result}
    )
    if config.prune.reestimate_bn and jax.tree.leaves(stats):
        num_batches = config.prune.bn_batches
        stats = phases.reestimate_batch_stats(
            ctx,
            params,
            stats,
            masks,
            num_batches=num_batches,
            batch_size=config.search.batch_size,
            seed=config.seed,
        )
        result = phases.evaluate(ctx, params, stats, masks)
        context.record_result(
            ctx,
            {
                "model": "magnitude pruning + BN re-estimation",
                "sparsity": sparsity,
                "note": f"no search; BN statistics from {num_batches} batches"
                + _pattern_note(config),
                **result,
            },
        )
    return masks


def run_prune(ctx: Context, config: Config) -> None:
    variables, _, _ = _weights(ctx, config)
    _prune(ctx, config, variables)


def _search(ctx: Context, config: Config, variables: PyTree, weights_fingerprint: str):
    """The search, its evaluation and its export; returns the final state."""
    recipe = recipes.search_recipe(config)
    params = variables["params"]
    state, budget = phases.search(
        ctx,
        params,
        variables["batch_stats"],
        recipe,
        seed=config.seed,
        fingerprint=weights_fingerprint,
        allow_schedule_change=config.checkpoint.allow_schedule_change,
    )
    result = phases.evaluate(ctx, params, state.batch_stats, state.masks)
    row = {
        "model": "jackpot (search)",
        "sparsity": phases.masks_sparsity(state.masks, params),
        "note": f"{recipe.init} init, {recipe.rule} budget, {recipe.epochs} epochs"
        + _pattern_note(config),
        **result,
    }
    phases.record_jackpot(
        ctx, params, state, budget, row, config=config.to_dict(), fingerprint=weights_fingerprint
    )
    return state


def run_search(ctx: Context, config: Config) -> None:
    variables, _, weights_fingerprint = _weights(ctx, config)
    _search(ctx, config, variables, weights_fingerprint)


def run_export(ctx: Context, config: Config) -> None:
    variables, _, weights_fingerprint = _weights(ctx, config)
    state, budget = phases.restored_search(
        ctx,
        variables["params"],
        variables["batch_stats"],
        recipes.search_recipe(config),
        fingerprint=weights_fingerprint,
    )
    phases.export(
        ctx,
        variables["params"],
        state,
        budget,
        config=config.to_dict(),
        metrics={"step": int(state.step)},
        fingerprint=weights_fingerprint,
    )


def _pretrain(ctx: Context, config: Config) -> dict[str, PyTree]:
    return phases.pretrain(
        ctx,
        recipes.train_recipe(config),
        seed=config.seed,
        allow_schedule_change=config.checkpoint.allow_schedule_change,
    )


def run_jackpot(ctx: Context, config: Config) -> None:
    if ctx.data.is_text:
        return lm.run_jackpot(ctx, config)
    recipe = recipes.search_recipe(config)
    weights = recipes.weights_recipe(config, ctx.workdir)
    if weights.missing():
        if weights.named:
            context.pretrained(ctx, weights)  # raises: the named file is missing
        # What can be checked on the model's shapes alone is checked before pre-training.
        shape = ctx.data.input_shape
        recipe.check_dense(
            jax.eval_shape(lambda k: ctx.network.init(k, shape), jax.random.key(0))[0]
        )
        logging.info("no pre-trained weights in %s: pre-training first", ctx.workdir)
        _pretrain(ctx, config)
    variables, _, weights_fingerprint = context.pretrained(ctx, weights)
    params, stats = variables["params"], variables["batch_stats"]
    recipe.budget(params, ctx.network.spec)  # its errors before any evaluation
    dense = phases.evaluate(ctx, params, stats, None)
    context.record_result(ctx, {"model": "dense", "sparsity": 0.0, **dense})
    magnitude = _prune(ctx, config, variables)
    state = _search(ctx, config, variables, weights_fingerprint)
    if ctx.is_main:
        path = phases.write_report(
            ctx,
            params,
            state.masks,
            jax.device_get(magnitude),
            title=f"Lottery jackpot: {ctx.model_name} on {config.dataset.name} at "
            f"{100 * config.search.sparsity:g}% sparsity" + _pattern_note(config),
            config=config.to_dict(),
        )
        print(report.results_table(context.results(ctx)))
        print(f"\nreport: {path}")


def run_studies(ctx: Context, config: Config) -> None:
    if ctx.data.is_text:
        from jackpots_jax.experiment import lm_studies

        lm_studies.run(ctx, config)
        return
    studies.run(ctx, config)


# The modes that mask: their search must leave some leaf masked.
SEARCHING = ("jackpot", "search", "prune", "export", "studies")

MODES: dict[str, Callable[[Context, Config], None]] = {
    "jackpot": run_jackpot,
    "pretrain": run_pretrain,
    "search": run_search,
    "evaluate": run_evaluate,
    "prune": run_prune,
    "export": run_export,
    "studies": run_studies,
}


def check_config(config: Config, num_devices: int | None) -> None:
    """Every check of the config that needs neither data nor weights; `ConfigError` if one fails.

    Args:
      config: the experiment config.
      num_devices: the devices the job runs on, or `None` where they are not known (a launcher
        checking a config on another machine than the job's): the checks that need them are
        left out.
    """
    config_lib.check(config, num_devices=num_devices, modes=tuple(MODES))
    allowed = models.spec(config.model.name).options
    unknown = sorted(set(config.model.kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            f"config field `model.kwargs` names option(s) {', '.join(unknown)} that model "
            f"{config.model.name!r} does not take; allowed: {', '.join(allowed) or 'none'}"
        )
    if config.mode == "studies":
        from jackpots_jax import data
        from jackpots_jax.experiment import lm_studies, studies

        if config.dataset.name in data.text.CORPORA:
            lm_studies.read_plan(config)
        else:
            studies.read_plan(config)


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
    """Runs `config.mode` in `workdir`; returns the accuracies measured (as in results.json).

    Raises:
      ConfigError: an impossible value (before any compute), or a resumed schedule that changed.
      WorkdirError: a folder the run writes into is not writable, or another run holds the work
        directory (before any compute).
      FileNotFoundError: a missing dataset or missing pre-trained weights (before any compute).
      FileContentError: a weights, masks or statistics file that cannot be read, non-finite
        weights, masks that are not 0/1.
      CheckpointMismatchError: weights, masks or a checkpoint that do not fit the run.
      CheckpointCorruptError: no checkpoint of the phase can be read.
      CheckpointWriteError: a checkpoint could not be written (e.g. the disk is full).
      NonFiniteLossError: the loss became NaN or infinite.
      Interrupted: Ctrl-C stopped a phase; the step it stopped after is checkpointed.
    """
    num_devices = config.parallel.num_devices or jax.device_count()
    if num_devices > jax.device_count():
        raise ConfigError(
            f"config field `parallel.num_devices` is {num_devices}; allowed: at most the "
            f"{jax.device_count()} device(s) present"
        )
    check_config(config, num_devices)
    # A studies report reads finished cells, each written whole (`write_json`), and writes its
    # report whole: it runs beside the study that holds the lock, without taking it.
    report_only = config.mode == "studies" and bool(config.studies.get("report_only", False))
    lock = jax.process_index() == 0 and not report_only
    with workdir_lib.claim(workdir, lock=lock) as workdir:
        ctx = _context(config, workdir, num_devices)
        _check_parallel_rules(ctx, config)
        if config.mode in SEARCHING:
            _check_search_fits(ctx, config)
        if ctx.is_main:
            # The files a run adds to, read once now: one cut outside this program is an error
            # before any compute, not after it.
            context.results(ctx)
            if os.path.exists(ctx.log.path):
                report.read_metrics(ctx.log.path)
        if ctx.is_main and not report_only:
            write_json(os.path.join(ctx.workdir, "config.json"), config.to_dict(), "config")
        try:
            MODES[config.mode](ctx, config)
        finally:
            ctx.log.close()
        return {"results": context.results(ctx)}
