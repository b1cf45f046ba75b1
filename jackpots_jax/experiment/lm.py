"""Language-model jobs of the command line: the text corpus, the weights, the jackpot job.

A config whose `dataset.name` is a text corpus (`data.text.CORPORA`) runs a Llama-family model:
`text_tokens` tokenizes the corpus with the tokenizer the weights carry, `weights_recipe` points
`weights.path` '' at the packaged SmolLM2 GGUF, and `run_jackpot` is the `jackpot` mode (dense
perplexity, then magnitude pruning and a search for each of `search.patterns`). The other modes
(`search`, `evaluate`, `prune`, `export`) are the image modes of `experiment.modes`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jackpots_jax import baselines, data
from jackpots_jax._tree import is_none, named_leaves, path_str
from jackpots_jax.experiment import context, phases, recipes, report
from jackpots_jax.experiment.config import CALIBRATED, ConfigError
from jackpots_jax.experiment.context import Context
from jackpots_jax.io.errors import FileContentError
from jackpots_jax.io.files import write_json
from jackpots_jax.masks import init_scores
from jackpots_jax.models.spec import layer_groups

PyTree = Any
Config = ml_collections.ConfigDict


def weights_path(config: Config) -> str:
    """A language model's `weights.path`; '' means the packaged GGUF for `smollm2_135m`.

    Raises:
      ConfigError: no path for a model that has no packaged weights.
      FileNotFoundError: the packaged GGUF is not installed (says how to install it).
    """
    if config.weights.path:
        return config.weights.path
    if config.model.name == "smollm2_135m":
        from jackpots_jax.io.llama_weights import smollm2_gguf_path

        return smollm2_gguf_path()
    raise ConfigError(
        f"config field `weights.path` is '' for the language model {config.model.name!r}; "
        "allowed: a GGUF file or a Hugging Face folder (config.json, model.safetensors and "
        "tokenizer.json): its tokenizer makes the text data"
    )


def text_tokens(config: Config):
    """The corpus of `dataset.name` tokenized by the tokenizer of the weights file (cached)."""
    from jackpots_jax.data.tokenizer import Tokenizer

    path = weights_path(config)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no language model at {path!r} (`weights.path`): give a GGUF file or a Hugging Face "
            "folder (config.json, model.safetensors, tokenizer.json)"
        )
    try:
        if path.endswith(".gguf"):
            tokenizer = Tokenizer.from_gguf(path)
        else:
            folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
            tokenizer = Tokenizer.from_file(folder)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no tokenizer.json beside the weights {path!r} (`weights.path`): a Hugging Face "
            "checkpoint needs its tokenizer.json (a GGUF file holds its own tokenizer)"
        ) from None
    except (ValueError, KeyError) as e:
        raise FileContentError(f"`weights.path`: the tokenizer of {path!r}: {e}") from None
    c = config.dataset
    try:
        return data.text.prepare_text(
            c.name,
            tokenizer,
            cache_dir=c.data_dir or None,
            corpus_path=c.source_dir or None,
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(f"`dataset.name` {c.name!r} (`dataset.source_dir`): {e}") from None
    except ValueError as e:
        raise ConfigError(
            f"config field `dataset.name` is {c.name!r}, tokenized by the tokenizer of {path!r} "
            f"(`weights.path`): {e}"
        ) from None


def also_on(ctx: Context, config: Config) -> dict[str, Context]:
    """A context per corpus of `eval.also_on`: this run's, reading that corpus's validation
    windows (the first `dataset.num_eval`; the corpus from its default place, tokenized by the
    same tokenizer) to evaluate the same masks on."""
    out = {}
    for corpus in config.eval.also_on:
        other = config.copy_and_resolve_references()
        other.dataset.name, other.dataset.source_dir = corpus, ""
        text = context.text_data(
            text_tokens(other),
            seq_len=ctx.data.seq_len,
            num_train=None,
            num_eval=config.dataset.num_eval or None,
            local_device_count=ctx.data.local_device_count,
        )
        out[corpus] = dataclasses.replace(ctx, data=text)
    return out


def evaluate_also_on(others: Mapping[str, Context], params, masks) -> dict[str, Any]:
    """`<corpus> perplexity`, `<corpus> loss` (mean NLL) and `<corpus> count` of each context."""
    row = {}
    for corpus, other in others.items():
        result = phases.evaluate(other, params, {}, masks)
        for key in ("perplexity", "loss", "count"):
            row[f"{corpus} {key}"] = result[key]
    return row


def weights_recipe(ctx: Context, config: Config) -> recipes.WeightsRecipe:
    """The config's `weights` group; a language model's default is its packaged GGUF."""
    weights = recipes.weights_recipe(config, ctx.workdir)
    if ctx.data.is_text:
        weights = dataclasses.replace(weights, path=weights_path(config), named=True)
    return weights


def _patterns(config: Config) -> tuple[str, ...]:
    return tuple(config.search.patterns) or (config.search.pattern,)


def _tag(pattern: str) -> str:
    """A pattern as a folder name: `2:4` -> `2of4`."""
    return pattern.replace(":", "of")


def calibration_stats(
    ctx: Context,
    params: PyTree,
    budget: PyTree,
    *,
    num_windows: int,
    batch_size: int,
    seed: int,
    gram: bool,
) -> dict[str, baselines.CalibrationStats]:
    """Statistics of every masked kernel's inputs on `num_windows` training windows.

    The windows are drawn without replacement with `seed` from the training stream (in order of
    their position), run through the dense model `batch_size` at a time (`kernel_inputs`, under
    one `jit`), and folded into `baselines.update_stats`: input norms for Wanda and, with
    `gram`, `X^T X` for SparseGPT.

    Raises:
      ConfigError: more windows asked for than the training stream holds.
    """
    from jackpots_jax.models import llama

    text, seq_len = ctx.data.tokens, ctx.data.seq_len
    available = data.text.num_train_windows(len(text.train_tokens), seq_len)
    if num_windows > available:
        raise ConfigError(
            f"config field `prune.calibration_windows` is {num_windows}, but the training text "
            f"holds {available} windows of {seq_len} tokens; allowed: 1 to {available}"
        )
    windows = np.sort(np.random.default_rng(seed).choice(available, num_windows, replace=False))
    dims = {n: int(np.shape(w)[0]) for n, w in named_leaves(params) if n in _masked(budget)}
    graphdef = ctx.network.module

    @jax.jit
    def fold(stats, params, tokens):
        return baselines.update_stats(stats, llama.kernel_inputs(graphdef, params, tokens))

    stats = baselines.init_stats(dims, gram=gram)
    for start in range(0, num_windows, batch_size):
        batch = data.text.train_windows(
            text.train_tokens, windows[start : start + batch_size], seq_len, text.bos_id
        )
        stats = fold(stats, params, jnp.asarray(batch["inputs"]))
    return stats


def _masked(budget: PyTree) -> set[str]:
    return {n for n, b in named_leaves(budget) if b is not None}


def natural_key(text: str) -> list:
    """Sorts `block 2` before `block 10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def block_losses(
    ctx: Context, params: PyTree, masks: Mapping[str, PyTree]
) -> dict[str, dict[str, float]]:
    """The validation loss with one block pruned at a time, for each set of masks.

    For every entry of `masks` (a label -> masks over the frozen `params`) and every group of the
    model's `block` grouping (`layer_groups`), only that block's kernels take their masks and
    every other kernel stays dense; the mean negative log-likelihood over the whole validation
    split is recorded, as `phases.evaluate` computes it. All the masks keep one tree structure
    (the other blocks' masks all ones), so one compiled evaluation serves every block.

    Returns:
      `{label: {block: mean NLL}}`, the blocks in the model's order.
    """
    host = {label: jax.device_get(m) for label, m in masks.items()}
    first = next(iter(host.values()), None)
    if first is None:
        return {}
    shapes = {n: np.shape(m) for n, m in named_leaves(first) if m is not None}
    block_of = layer_groups(ctx.network.spec, shapes).get("block", {})
    blocks = sorted(set(block_of.values()), key=natural_key)
    out = {}
    for label, tree in host.items():
        out[label] = {}
        for block in blocks:
            alone = jax.tree_util.tree_map_with_path(
                lambda path, m, b=block: (
                    None
                    if m is None
                    else (m if block_of.get(path_str(path)) == b else np.ones_like(m))
                ),
                tree,
                is_leaf=is_none,
            )
            out[label][block] = phases.evaluate(ctx, params, {}, alone)["loss"]
        logging.info(
            "%s, one block at a time: highest loss %.4f (%s)",
            label,
            max(out[label].values(), default=float("nan")),
            max(out[label], key=out[label].get, default="-"),
        )
    return out


def run_jackpot(ctx: Context, config: Config) -> dict[str, Any]:
    """Dense perplexity, then for each of `search.patterns` one-shot rows and searches.

    For every pattern: magnitude pruning; the calibrated baselines of `prune.baselines` (Wanda's
    mask; SparseGPT's mask over the frozen weights, and SparseGPT with its updated weights); then
    one search from each init of `search.inits` (or `search.init`), `wanda` and `sparsegpt`
    starting from that baseline's mask. A search checkpoints in `<workdir>/search_<pattern>`
    and exports to `<workdir>/export_<pattern>` (`2:4` written `2of4`; with several inits,
    `_<init>` is appended); `report.md` gathers the rows and the sparsity of every search by
    block and by kind (attention, MLP).

    With `eval.also_on`, every row is also evaluated on those corpora's validation windows
    (`<corpus> perplexity`, `<corpus> loss`, `<corpus> count`): the same masks on texts that
    neither the calibration nor the searches read.

    Every row records `tokens`, the training tokens its method ran through the model
    (calibration windows, search steps; a search from a calibrated prior counts both), and
    `seconds`, the wall time of its own work in this run (pruning or searching, then evaluating;
    a resumed search counts only what this run did). The calibration, shared by the
    rows that use it, is timed apart: `calibration_seconds` on those rows.

    Returns:
      `{"calibration_tokens", "calibration_seconds"}` (0 without calibration).
    """
    others = also_on(ctx, config)  # a corpus that is not there: an error before any compute
    variables, _, weights_fingerprint = context.pretrained(ctx, weights_recipe(ctx, config))
    params = variables["params"]
    base = recipes.search_recipe(config)
    searches = {p: dataclasses.replace(base, pattern=p) for p in _patterns(config)}
    budgets = {p: r.budget(params, ctx.network.spec) for p, r in searches.items()}  # errors first
    inits = tuple(config.search.inits) or (config.search.init,)
    methods = tuple(config.prune.baselines)
    calibrated = set(methods) | (set(inits) & set(CALIBRATED))
    stats, calibration = None, {"calibration_tokens": 0, "calibration_seconds": 0.0}
    if calibrated:
        p = config.prune
        start = time.perf_counter()
        stats = calibration_stats(
            ctx,
            params,
            next(iter(budgets.values())),
            num_windows=p.calibration_windows,
            batch_size=p.calibration_batch,
            seed=config.seed,
            gram="sparsegpt" in calibrated,
        )
        jax.block_until_ready(stats)
        calibration = {
            "calibration_tokens": p.calibration_windows * ctx.data.seq_len,
            "calibration_seconds": time.perf_counter() - start,
        }
        logging.info(
            "calibration: %d training windows of %d tokens", p.calibration_windows, ctx.data.seq_len
        )
    start = time.perf_counter()
    dense = phases.evaluate(ctx, params, {}, None)
    context.record_result(
        ctx,
        {
            "model": "dense",
            "sparsity": 0.0,
            **dense,
            "tokens": 0,
            "seconds": time.perf_counter() - start,
            **evaluate_also_on(others, params, None),
        },
    )
    searched, magnitude, frozen = {}, {}, {}
    for pattern, recipe in searches.items():
        budget = budgets[pattern]
        # Each one-shot method's masks and the seconds they took (SparseGPT's two rows share).
        start = time.perf_counter()
        _, magnitude[pattern] = init_scores(params, budget, "magnitude")
        oneshot = {"magnitude": magnitude[pattern]}
        spent = {"magnitude": time.perf_counter() - start}
        rows = [("magnitude", "magnitude pruning", params, magnitude[pattern])]
        if "wanda" in calibrated:
            start = time.perf_counter()
            oneshot["wanda"] = jax.block_until_ready(baselines.wanda_masks(params, budget, stats))
            spent["wanda"] = time.perf_counter() - start
            rows.append(("wanda", "Wanda", params, oneshot["wanda"]))
        if "sparsegpt" in calibrated:
            start = time.perf_counter()
            masks, weights = baselines.sparsegpt_masks(
                params,
                budget,
                stats,
                blocksize=config.prune.sparsegpt_blocksize,
                percdamp=config.prune.sparsegpt_damp,
            )
            jax.block_until_ready((masks, weights))
            spent["sparsegpt"] = time.perf_counter() - start
            oneshot["sparsegpt"] = masks
            rows.append(("sparsegpt", "SparseGPT mask, weights frozen", params, masks))
            rows.append(("sparsegpt", "SparseGPT, weights changed", weights, masks))
        for method, name, weights, masks in rows:
            if method != "magnitude" and method not in methods:
                continue  # a prior of a search only, not a row asked for
            start = time.perf_counter()
            row = phases.evaluate(ctx, weights, {}, masks)
            cost = _costs(method, spent[method] + time.perf_counter() - start, calibration)
            if config.eval.by_block and weights is params:
                frozen[f"{name} ({pattern})"] = masks
            context.record_result(
                ctx,
                {
                    "model": f"{name} ({pattern})",
                    "sparsity": phases.masks_sparsity(masks, params),
                    **row,
                    **cost,
                    **evaluate_also_on(others, weights, masks),
                },
            )
        for init in inits:
            label = pattern if len(inits) == 1 else f"{pattern}, from {init}"
            tag = _tag(pattern) if len(inits) == 1 else f"{_tag(pattern)}_{init}"
            start = time.perf_counter()
            state, budget = phases.search(
                ctx,
                params,
                {},
                dataclasses.replace(recipe, init=init),
                seed=config.seed,
                fingerprint=weights_fingerprint,
                allow_schedule_change=config.checkpoint.allow_schedule_change,
                phase=f"search_{tag}",
                prior=oneshot.get(init) if init in CALIBRATED else None,
            )
            steps = recipe.steps(ctx.data.steps_per_epoch(recipe.batch_size))[0]
            row = {
                "model": f"jackpot ({label})",
                "sparsity": phases.masks_sparsity(state.masks, params),
                "note": f"{init} init, {recipe.rule} budget, {steps} steps"
                + (", loss: KL to the dense model" if recipe.loss == "kl" else ""),
                **phases.evaluate(ctx, params, {}, state.masks),
            }
            row.update(
                _costs(
                    init,
                    time.perf_counter() - start,
                    calibration,
                    search_tokens=steps * recipe.batch_size * ctx.data.seq_len,
                )
            )
            row.update(evaluate_also_on(others, params, state.masks))
            phases.record_jackpot(
                ctx,
                params,
                state,
                budget,
                row,
                config=config.to_dict(),
                fingerprint=weights_fingerprint,
                directory=f"export_{tag}",
            )
            searched[label] = jax.device_get(state.masks)
            magnitude[label] = magnitude[pattern]
            if config.eval.by_block:
                frozen[row["model"]] = searched[label]
    by_block = None
    if config.eval.by_block:
        by_block = block_losses(ctx, params, frozen)
        if ctx.is_main:
            write_json(
                os.path.join(ctx.workdir, "block_losses.json"),
                {"dense": dense["loss"], "masks": by_block},
                "the losses by block",
            )
    if ctx.is_main:
        path = phases.write_lm_report(
            ctx,
            params,
            searched,
            {p: jax.device_get(m) for p, m in magnitude.items()},
            title=f"Lottery jackpots: {ctx.model_name} on {config.dataset.name}, "
            f"{ctx.data.seq_len}-token windows",
            config=config.to_dict(),
            block_losses=by_block,
        )
        print(report.results_table(context.results(ctx)))
        print(f"\nreport: {path}")
    return calibration


def _costs(
    method: str, seconds: float, calibration: Mapping[str, Any], *, search_tokens: int = 0
) -> dict[str, Any]:
    """A row's `tokens` and `seconds`, and the calibration's seconds where it used one."""
    cost = {"tokens": search_tokens, "seconds": seconds}
    if method in CALIBRATED:
        cost["tokens"] += calibration["calibration_tokens"]
        cost["calibration_seconds"] = calibration["calibration_seconds"]
    return cost
