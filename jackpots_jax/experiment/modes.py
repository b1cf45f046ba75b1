"""`train_and_evaluate(config, workdir)`: the modes of the command line, as a table.

The config is read here, once: each mode turns the fields it needs into plain arguments of the
phases (`experiment.phases`) and nothing below it sees the config. Adding a mode is one function
`run_<mode>(ctx, config)` and one entry in `MODES`.

Modes (`config.mode`):

* `pretrain`: dense training from scratch; writes `<workdir>/pretrain/model.safetensors`.
* `search`: the jackpot search on frozen pre-trained weights; checkpoints every
  `checkpoint.every_steps` in `<workdir>/search/checkpoints` (resumed on start), evaluates the
  masked model every `eval.every_epochs`, exports the jackpot to `<workdir>/export`.
* `evaluate`: accuracy of weights (and masks: `weights.masks`, or those inside the weights file).
* `prune`: one-shot magnitude pruning at `search.sparsity`, no search; evaluated with the
  pre-trained batch-norm statistics and, with `prune.reestimate_bn`, with re-estimated ones.
* `export`: the jackpot of the latest search checkpoint to `<workdir>/export`.
* `jackpot` (the default job): pre-train when no pre-trained weights exist, evaluate the dense
  model, magnitude-prune, search, evaluate, and write `<workdir>/report.md` with plots.
* `studies`: the paper's claims as a grid of searches over seeds (`experiment.studies`; the
  `studies` group of `configs/studies.py`); writes `<workdir>/studies/report.md`.

Every run appends metrics to `<workdir>/metrics.jsonl` (and TensorBoard) and the accuracies it
measured to `<workdir>/results.json`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from jackpots_jax import data, models, parallel
from jackpots_jax.experiment import config as config_lib
from jackpots_jax.experiment import context, phases, report
from jackpots_jax.experiment.config import ConfigError
from jackpots_jax.experiment.context import Context
from jackpots_jax.experiment.logs import MetricsLog
from jackpots_jax.io.checkpoints import fingerprint
from jackpots_jax.io.export import masks_from_npz
from jackpots_jax.io.files import write_json
from jackpots_jax.masks import init_scores

PyTree = Any
Config = ml_collections.ConfigDict


# ---------------------------------------------------------------------------------------------
# From the config to plain arguments.


def _train_recipe(config: Config) -> phases.TrainRecipe:
    p = config.pretrain
    return phases.TrainRecipe(**{f.name: p[f.name] for f in dataclasses.fields(phases.TrainRecipe)})


def _search_recipe(config: Config) -> phases.SearchRecipe:
    s = config.search
    rate = phases.RateRecipe(s.rate.schedule, s.rate.value, s.rate.power)
    fields = {
        f.name: s[f.name] for f in dataclasses.fields(phases.SearchRecipe) if f.name != "rate"
    }
    return phases.SearchRecipe(**fields, rate=rate)


def _context(config: Config, workdir: str, num_devices: int) -> Context:
    """Prepares the dataset, builds the model and the mesh, opens the logs."""
    workdir = os.path.abspath(os.fspath(workdir))
    c = config.dataset
    info = data.prepare(c.name, c.data_dir or None, source_dir=c.source_dir or None)
    try:
        network = models.network(
            config.model.name,
            config.model.num_classes or info.num_classes,
            config.model.dtype,
            **dict(config.model.kwargs),
        )
    except ValueError as e:  # an option the model does not take
        kwargs = dict(config.model.kwargs)
        raise ConfigError(f"config field `model.kwargs` is {kwargs!r}: {e}") from None
    if network.spec.fixed_input_shape and tuple(info.image_shape) != network.spec.input_shape:
        raise ConfigError(
            f"config field `model.name` is {config.model.name!r}, built for "
            f"{network.spec.input_shape} images, but dataset {c.name!r} has "
            f"{tuple(info.image_shape)} images"
        )
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = parallel.make_mesh(num_devices, fsdp=config.parallel.fsdp)
    return Context(
        workdir=workdir,
        network=network,
        model_dtype=config.model.dtype,
        data=context.Data(
            info=info,
            data_dir=c.data_dir or None,
            dtype=c.dtype,
            num_train=c.num_train or None,
            num_eval=c.num_eval or None,
            local_device_count=mesh.devices.size // jax.process_count(),
        ),
        devices=context.Devices(
            mesh,
            config.parallel.backend,
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
    )


def _weights_path(ctx: Context, config: Config) -> str:
    return config.weights.path or os.path.join(ctx.workdir, context.PRETRAINED)


def _weights(ctx: Context, config: Config) -> tuple[dict[str, PyTree], PyTree | None, str]:
    """The pre-trained variables the config names, their masks (or None), their fingerprint."""
    if config.weights.random:
        logging.warning("searching random weights on purpose (weights.random=True)")
        variables, masks = context.random_variables(ctx, config.seed + 1), None
    else:
        variables, masks = context.load_weights(ctx, _weights_path(ctx, config))
    variables = jax.device_get(variables)
    return variables, masks, fingerprint(variables["params"])


# ---------------------------------------------------------------------------------------------
# The modes.


def run_pretrain(ctx: Context, config: Config) -> None:
    variables = phases.pretrain(ctx, _train_recipe(config), seed=config.seed)
    dense = phases.evaluate(ctx, variables["params"], variables["batch_stats"], None)
    context.record_result(ctx, {"model": "dense", "sparsity": 0.0, **dense})


def run_evaluate(ctx: Context, config: Config) -> None:
    variables, masks, _ = _weights(ctx, config)
    params = variables["params"]
    if config.weights.masks:
        masks = masks_from_npz(config.weights.masks, params, exact=False)
    sparsity = 0.0 if masks is None else phases.masks_sparsity(masks, params)
    result = phases.evaluate(ctx, params, variables["batch_stats"], masks)
    context.record_result(ctx, {"model": "evaluated", "sparsity": sparsity, **result})


def _prune(ctx: Context, config: Config, variables: PyTree) -> PyTree:
    """Magnitude pruning at the search budget, no search: evaluated with and without BN re-est."""
    params, stats = variables["params"], variables["batch_stats"]
    budget = _search_recipe(config).budget(params, ctx.network.spec.dense)
    _, masks = init_scores(params, budget, "magnitude")
    sparsity = phases.masks_sparsity(masks, params)
    result = phases.evaluate(ctx, params, stats, masks)
    context.record_result(
        ctx, {"model": "magnitude pruning", "sparsity": sparsity, "note": "no search", **result}
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
                "note": f"no search; BN statistics from {num_batches} batches",
                **result,
            },
        )
    return masks


def run_prune(ctx: Context, config: Config) -> None:
    variables, _, _ = _weights(ctx, config)
    _prune(ctx, config, variables)


def _search(ctx: Context, config: Config, variables: PyTree, weights_fingerprint: str):
    """The search, its evaluation and its export; returns the final state."""
    recipe = _search_recipe(config)
    params = variables["params"]
    state, budget = phases.search(
        ctx,
        params,
        variables["batch_stats"],
        recipe,
        seed=config.seed,
        fingerprint=weights_fingerprint,
    )
    result = phases.evaluate(ctx, params, state.batch_stats, state.masks)
    row = {
        "model": "jackpot (search)",
        "sparsity": phases.masks_sparsity(state.masks, params),
        "note": f"{recipe.init} init, {recipe.rule} budget, {recipe.epochs} epochs",
        **result,
    }
    context.record_result(ctx, row)
    phases.export(
        ctx,
        params,
        state,
        budget,
        config=config.to_dict(),
        metrics=row,
        fingerprint=weights_fingerprint,
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
        _search_recipe(config),
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


def run_jackpot(ctx: Context, config: Config) -> None:
    if not config.weights.random and not os.path.exists(_weights_path(ctx, config)):
        if config.weights.path:
            _weights(ctx, config)  # raises: the named file is missing
        logging.info("no pre-trained weights in %s: pre-training first", ctx.workdir)
        phases.pretrain(ctx, _train_recipe(config), seed=config.seed)
    variables, _, weights_fingerprint = _weights(ctx, config)
    params, stats = variables["params"], variables["batch_stats"]
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
            f"{100 * config.search.sparsity:g}% sparsity",
            config=config.to_dict(),
        )
        print(report.results_table(context.results(ctx)))
        print(f"\nreport: {path}")


def run_studies(ctx: Context, config: Config) -> None:
    from jackpots_jax.experiment import studies  # it builds on this module's readers

    studies.run(ctx, config)


MODES: dict[str, Callable[[Context, Config], None]] = {
    "jackpot": run_jackpot,
    "pretrain": run_pretrain,
    "search": run_search,
    "evaluate": run_evaluate,
    "prune": run_prune,
    "export": run_export,
    "studies": run_studies,
}


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
    """Runs `config.mode` in `workdir`; returns the accuracies measured (as in results.json).

    Raises:
      ConfigError: an impossible value (before any compute).
      FileNotFoundError: a missing dataset or missing pre-trained weights (before any compute).
      CheckpointMismatchError: weights, masks or a checkpoint that do not fit the run.
      NonFiniteLossError: the loss became NaN or infinite.
    """
    num_devices = config.parallel.num_devices or jax.device_count()
    if num_devices > jax.device_count():
        raise ConfigError(
            f"config field `parallel.num_devices` is {num_devices}; allowed: at most the "
            f"{jax.device_count()} device(s) present"
        )
    config_lib.check(config, num_devices=num_devices, modes=tuple(MODES))
    ctx = _context(config, workdir, num_devices)
    if ctx.is_main:
        write_json(os.path.join(ctx.workdir, "config.json"), config.to_dict(), "config")
    try:
        MODES[config.mode](ctx, config)
    finally:
        ctx.log.close()
    return {"results": context.results(ctx)}
