"""The `studies` mode: the paper's claims as a grid of searches from one pre-trained model.

    python -m jackpots_jax.main --config configs/studies.py --workdir workdir/studies

The dense model is pre-trained once (`<workdir>/pretrain/model.safetensors`, as the default job
does, unless it or `weights.path` exists); every study starts from those frozen weights. The work
is cut into *cells*, each one result for one seed in its own folder
`<workdir>/studies/cells/<label>-<digest>/`:

* `dense`: the dense model's accuracy (no seed).
* `prune`: one-shot magnitude pruning at a sparsity, evaluated with the pre-trained batch-norm
  statistics and with statistics re-estimated on training batches drawn with the cell's seed.
* `search`: one jackpot search (`phases.search`): its own checkpoints, metrics (a record per
  step), per-epoch test accuracy and churn, the export of its jackpot, and the overlap of the
  jackpot with the magnitude mask per layer.
* `overlap`: the masks of pruning criteria (`experiment.criteria`) at a jackpot's budget and
  their intersection over union with that jackpot, per layer.
* `finetune`: a jackpot's weights trained for a few epochs with its mask frozen.

The digest is a hash of everything that decides the cell's result (its recipe, seed, the
fingerprint of the pre-trained weights, the dataset), so two studies that need the same search
share one cell, and a change of recipe never reuses a stale one. A cell is finished when its
`result.json` exists: a study that is stopped and started again skips the finished cells and
resumes the unfinished search from its newest checkpoint (a finished cell's checkpoints are
deleted unless `studies.keep_checkpoints`). Process 0 then assembles
`<workdir>/studies/results.json` from the cells' results and renders `report.md` and `plots/`
from it (`experiment.study_report`), after every seed and at the end, so a study cut short
still has the report of its finished cells.

Seeds: a cell of seed `s` searches with `phases.search(seed=s)` (score init `s + 2`, batches
`s + 3`), re-estimates batch norm from batches `s + 7`, draws the criteria's batches from
`s + 11`, the random criterion from `s + 13` and the fine-tuning batches from `s + 17`.

The `studies` group of the config (see `configs/studies.py`, which writes every field):

  run: the studies to run, any of `STUDIES`.
  seeds: the seeds of every cell (mean and spread are over them).
  keep_checkpoints: keep a finished search's checkpoints.
  report_only: run nothing; write the report from the cells finished so far (e.g. while a long
    study runs in another process).
  claim1: `sparsities`, `epochs`, `rule`: dense, magnitude pruning with and without batch-norm
    re-estimation, and the jackpot (magnitude init) at each sparsity.
  claim2: `sparsities`, `epochs`, `inits` (`'<init>/<rule>'`, e.g. `'kaiming/uniform'`; kaiming
    ranks by |score| as edge-popup does, the others by the signed score), `target` (the share of
    the best magnitude-init accuracy each init must reach), `eval_every_steps` (its searches are
    also evaluated every this many steps, so the cost to the target is known to that many steps
    instead of to the epoch; 0: at each epoch's end only).
  overlap: `sparsities` (searched as in claim 1), `criteria` (`experiment.criteria.CRITERIA`),
    `batches` (training batches that snip and wanda read).
  claim3: `init` (`'<init>/<rule>'` as in claim2: the magnitude init moves few mask entries per
    step, `kaiming` or `random` many), `sparsity`, `epochs`, `policies` (`'constant:<r>'`,
    `'cosine'`, `'polynomial:<q>'`,
    `'first_order'`: rate 1 and `restriction.first_order_check`), `window` (steps per window of
    the loss-oscillation statistic).
  finetune: `sparsities`, `epochs`, `learning_rate`, `momentum`, `weight_decay` (the reference
    code's "30s10t": SGD, cosine, the mask frozen).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from jackpots_jax._tree import named_leaves
from jackpots_jax.experiment import context, phases, recipes, report, study_report
from jackpots_jax.experiment.config import ConfigError, pattern_sparsity
from jackpots_jax.experiment.context import Context
from jackpots_jax.experiment.criteria import CRITERIA, criterion_masks
from jackpots_jax.experiment.hooks import EvaluateEveryEpochs, TrainLog
from jackpots_jax.experiment.logs import MetricsLog
from jackpots_jax.experiment.loop import train_loop
from jackpots_jax.experiment.recipes import parse_policy
from jackpots_jax.io.export import masks_from_npz
from jackpots_jax.io.files import jsonable, read_json, write_json
from jackpots_jax.masks import INIT_METHODS, apply_masks, init_scores, mask_overlap
from jackpots_jax.models.spec import layer_groups
from jackpots_jax.restriction import first_order_check
from jackpots_jax.sparsity import RULES, sparsity_report
from jackpots_jax.step import create_train_state, train_step

PyTree = Any
Config = ml_collections.ConfigDict
STUDIES = ("claim1", "claim2", "overlap", "claim3", "finetune")


# ---------------------------------------------------------------------------------------------
# The plan: the config's `studies` group, checked, as plain values.


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run (see the module docstring); built from the config by `read_plan`."""

    run: tuple[str, ...]
    seeds: tuple[int, ...]
    keep_checkpoints: bool
    claim1: dict[str, Any]
    claim2: dict[str, Any]
    overlap: dict[str, Any]
    claim3: dict[str, Any]
    finetune: dict[str, Any]
    report_only: bool = False


def _fail(field: str, value: Any, allowed: str):
    raise ConfigError(f"config field `studies.{field}` is {value!r}; allowed: {allowed}")


def _sparsities(field: str, value: Any) -> tuple[float, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    for s in values:
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s < 1:
            _fail(field, value, "sparsities in [0, 1)")
    return tuple(float(s) for s in values)


def _count(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(field, value, "an integer >= 0")
    return value


def _positive(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, value, "an integer >= 1")
    return value


def parse_init(spec: str) -> tuple[str, str, str]:
    """`'kaiming/uniform'` -> `(init, rule, rank_by)`; kaiming ranks by |score| (edge-popup)."""
    init, _, rule = str(spec).partition("/")
    if init not in INIT_METHODS or rule not in RULES or rule == "explicit":
        raise ValueError(spec)
    return init, rule, "abs" if init == "kaiming" else "score"


def read_plan(config: Config) -> Plan:
    """The config's `studies` group as a `Plan`; a `ConfigError` names any impossible field."""
    if "studies" not in config:
        raise ConfigError(
            "config field `mode` is 'studies' but the config has no `studies` group: run "
            "configs/studies.py (or a config that adds its fields)"
        )
    c = config.studies
    run = tuple(c.run)
    if not run or any(s not in STUDIES for s in run):
        _fail("run", c.run, f"a non-empty tuple of {', '.join(STUDIES)}")
    seeds = tuple(c.seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        _fail("seeds", c.seeds, "a non-empty tuple of integers >= 0")
    if len(set(seeds)) != len(seeds):
        _fail("seeds", c.seeds, "distinct seeds")
    if c.claim1.rule not in RULES or c.claim1.rule == "explicit":
        _fail("claim1.rule", c.claim1.rule, ", ".join(r for r in RULES if r != "explicit"))
    claim1 = {
        "sparsities": _sparsities("claim1.sparsities", c.claim1.sparsities),
        "epochs": _positive("claim1.epochs", c.claim1.epochs),
        "rule": c.claim1.rule,
    }
    for spec in c.claim2.inits:
        try:
            parse_init(spec)
        except ValueError:
            _fail("claim2.inits", c.claim2.inits, "'<init>/<rule>' of INIT_METHODS and RULES")
    if not 0 < c.claim2.target <= 1:
        _fail("claim2.target", c.claim2.target, "a share in (0, 1]")
    claim2 = {
        "sparsities": _sparsities("claim2.sparsities", c.claim2.sparsities),
        "epochs": _positive("claim2.epochs", c.claim2.epochs),
        "inits": tuple(c.claim2.inits),
        "target": float(c.claim2.target),
        "eval_every_steps": _count("claim2.eval_every_steps", c.claim2.get("eval_every_steps", 0)),
    }
    if "claim2" in run and "magnitude/global_magnitude" not in claim2["inits"]:
        _fail("claim2.inits", c.claim2.inits, "a tuple holding 'magnitude/global_magnitude'")
    if any(k not in CRITERIA for k in c.overlap.criteria):
        _fail("overlap.criteria", c.overlap.criteria, ", ".join(CRITERIA))
    overlap = {
        "sparsities": _sparsities("overlap.sparsities", c.overlap.sparsities),
        "criteria": tuple(c.overlap.criteria),
        "batches": _positive("overlap.batches", c.overlap.batches),
    }
    for spec in c.claim3.policies:
        try:
            parse_policy(spec)
        except ValueError:
            _fail("claim3.policies", c.claim3.policies, "'constant:<r>', 'cosine', ...")
    claim3_init = c.claim3.get("init", f"magnitude/{c.claim1.rule}")
    try:
        parse_init(claim3_init)
    except ValueError:
        _fail("claim3.init", claim3_init, "'<init>/<rule>' of INIT_METHODS and RULES")
    claim3 = {
        "init": claim3_init,
        "sparsity": _sparsities("claim3.sparsity", c.claim3.sparsity)[0],
        "epochs": _positive("claim3.epochs", c.claim3.epochs),
        "policies": tuple(c.claim3.policies),
        "window": _positive("claim3.window", c.claim3.window),
    }
    f = c.finetune
    for field in ("learning_rate", "weight_decay"):
        if not f[field] >= 0:
            _fail(f"finetune.{field}", f[field], "a number >= 0")
    if not 0 <= f.momentum < 1:
        _fail("finetune.momentum", f.momentum, "a number in [0, 1)")
    finetune = {
        "sparsities": _sparsities("finetune.sparsities", f.sparsities),
        "epochs": _positive("finetune.epochs", f.epochs),
        "learning_rate": float(f.learning_rate),
        "momentum": float(f.momentum),
        "weight_decay": float(f.weight_decay),
    }
    # Every sparsity a study in `run` searches: present, and possible under `search.pattern`.
    studied = {
        "claim1": [("claim1.sparsities", claim1)],
        "claim2": [("claim2.sparsities", claim2)],
        "overlap": [("overlap.sparsities", overlap)],
        "finetune": [("finetune.sparsities", finetune)],
    }
    for name, fields in studied.items():
        for field, group in fields:
            if name in run and not group["sparsities"]:
                _fail(
                    field,
                    group["sparsities"],
                    f"a non-empty tuple of sparsities in [0, 1) ({name} is in `studies.run`)",
                )
            group["sparsities"] = tuple(
                pattern_sparsity(config.search.pattern, s, f"studies.{field}")
                for s in group["sparsities"]
            )
    claim3["sparsity"] = pattern_sparsity(
        config.search.pattern, claim3["sparsity"], "studies.claim3.sparsity"
    )
    return Plan(
        run,
        seeds,
        bool(c.keep_checkpoints),
        claim1,
        claim2,
        overlap,
        claim3,
        finetune,
        report_only=bool(c.get("report_only", False)),
    )


# ---------------------------------------------------------------------------------------------
# A search recipe with a restriction policy, and the fine-tuning step.


@dataclasses.dataclass(frozen=True)
class StudyRecipe(recipes.SearchRecipe):
    """A `SearchRecipe` whose optimiser may add a restriction policy (`'first_order'`)."""

    policy: str = "rate"

    def optimizer(
        self, budget: PyTree, total_steps: int, *, selection: str = "auto", layout: Any = None
    ) -> optax.GradientTransformation:
        tx = super().optimizer(budget, total_steps, selection=selection, layout=layout)
        if self.policy == "first_order":
            return first_order_check(tx, budget, rank_by=self.rank_by)
        return tx


def masked_train_step(state, masks, batch, *, apply_fn, tx, axis_name=None):
    """`train_step` of the weights under frozen masks: the forward runs `W * M`.

    The gradient of a pruned weight is 0 (`d(W*M)/dW = M`), so without weight decay it never
    changes; the masks stay those of the jackpot.
    """

    def masked_apply(params, batch_stats, images, train):
        return apply_fn(apply_masks(params, masks), batch_stats, images, train)

    return train_step(state, batch, apply_fn=masked_apply, tx=tx, axis_name=axis_name)


# ---------------------------------------------------------------------------------------------
# Per-cell statistics of a search's metric records.


def step_statistics(records: Sequence[Mapping], steps_per_epoch: int, window: int) -> dict:
    """Loss oscillation and churn per step, per epoch and over the whole search.

    Oscillation: the standard deviation of the step-to-step change of the training loss
    (`loss_t - loss_{t-1}`) within windows of `window` consecutive changes, averaged over the
    windows (those of an epoch for the per-epoch figure). Churn per step: mask entries flipped
    per step (a swap flips two), averaged.
    """
    train = {r["step"]: r for r in records if r.get("kind") == "train" and "churn" in r}
    steps = sorted(train)
    if len(steps) < 2 or steps != list(range(steps[0], steps[-1] + 1)):
        return {}
    losses = np.array([train[s]["loss"] for s in steps])
    churn = np.array([train[s]["churn"] for s in steps], np.float64)
    change = np.diff(losses)
    change_step = np.array(steps[1:])
    epochs = math.ceil(steps[-1] / steps_per_epoch)

    def oscillation(values):
        # Windows of `window` changes; a last window of one change has no spread: left out.
        stds = [np.std(values[i : i + window]) for i in range(0, len(values), window)]
        stds = [
            s
            for i, s in zip(range(0, len(values), window), stds, strict=True)
            if len(values[i : i + window]) > 1
        ]
        return float(np.mean(stds)) if stds else float("nan")

    per_epoch = []
    for e in range(1, epochs + 1):
        lo, hi = (e - 1) * steps_per_epoch, e * steps_per_epoch
        in_epoch = (change_step > lo) & (change_step <= hi)
        steps_in = (np.array(steps) > lo) & (np.array(steps) <= hi)
        per_epoch.append(
            {
                "epoch": e,
                "oscillation": oscillation(change[in_epoch]),
                "churn_per_step": float(np.mean(churn[steps_in])),
            }
        )
    return {
        "oscillation": oscillation(change),
        "churn_per_step": float(np.mean(churn)),
        "per_epoch": per_epoch,
    }


def _mean_abs(scores: PyTree) -> float:
    leaves = [np.abs(np.asarray(s, np.float64)) for s in jax.tree.leaves(scores)]
    return float(sum(x.sum() for x in leaves) / sum(x.size for x in leaves))


def _last_per(records: Sequence[Mapping], kind: str, key: str) -> list[Mapping]:
    """The records of `kind`, one per `key` (a resumed run logs some again: the last wins)."""
    chosen = {r[key]: r for r in records if r.get("kind") == kind and key in r}
    return [chosen[k] for k in sorted(chosen)]


# ---------------------------------------------------------------------------------------------
# Running the cells.


def digest(identity: Mapping[str, Any]) -> str:
    text = json.dumps(jsonable(identity, "cell identity"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _percent_label(sparsity: float) -> str:
    return f"s{100 * sparsity:g}"


class Studies:
    """The cells of one studies run over one pre-trained model (see the module docstring)."""

    def __init__(self, ctx: Context, config: Config, plan: Plan, variables, fingerprint: str):
        self.ctx, self.plan, self.fingerprint = ctx, plan, fingerprint
        self.config = config
        self.params = variables["params"]
        self.stats = variables["batch_stats"]
        self.base = recipes.search_recipe(config)
        self.root = os.path.join(ctx.workdir, "studies")
        self.bn_batches = config.prune.bn_batches
        self.identity = {
            "weights": fingerprint,
            "model": ctx.model_name,
            "model_kwargs": ctx.model_options,
            "dtype": ctx.model_dtype,
            "dataset": config.dataset.name,
            "num_train": config.dataset.num_train,
            "num_eval": config.dataset.num_eval,
        }
        self.cells: list[dict] = []
        # A dry pass only reads finished cells (a missing one is listed in `missing`).
        self.dry = False
        self.missing: list[str] = []

    # The cell mechanism.

    def cell(self, kind: str, label: str, identity: Mapping, compute: Callable, **ctx_fields):
        identity = jsonable({"kind": kind, **self.identity, **identity}, "cell identity")
        directory = os.path.join(self.root, "cells", f"{label}-{digest(identity)}")
        path = os.path.join(directory, "result.json")
        if os.path.exists(path):
            result = read_json(path)
            if result.get("identity") == identity:
                self.cells.append(result)
                return result
        if self.dry:
            self.missing.append(label)
            return None
        logging.info("studies: cell %s", label)
        os.makedirs(directory, exist_ok=True)
        start, load = time.perf_counter(), os.getloadavg()[0]
        fields = {"eval_every_epochs": 1, **ctx_fields}
        cell_ctx = dataclasses.replace(
            self.ctx, workdir=directory, log=MetricsLog(directory, self.ctx.is_main), **fields
        )
        try:
            out = compute(cell_ctx)
        finally:
            cell_ctx.log.close()
        result = {
            "identity": identity,
            "label": label,
            "seconds": time.perf_counter() - start,
            "load_average": [load, os.getloadavg()[0]],
            **out,
        }
        result = json.loads(json.dumps(jsonable(result, "cell result")))
        if self.ctx.is_main:
            write_json(path, result, "cell result")
        self.cells.append(result)
        return result

    def recipe(self, **fields) -> StudyRecipe:
        base = {f.name: getattr(self.base, f.name) for f in dataclasses.fields(self.base)}
        return StudyRecipe(**{**base, **fields})

    def budget(self, sparsity: float, rule: str) -> PyTree:
        return self.recipe(sparsity=sparsity, rule=rule).budget(self.params, self.ctx.network.spec)

    def check_budgets(self) -> None:
        """Every budget the plan searches or prunes at can be made (before any cell runs).

        The errors name the `studies` field the sparsity comes from, not `search.sparsity`.
        """
        p = self.plan
        wanted = []
        if "claim1" in p.run:
            wanted += [("claim1.sparsities", s, p.claim1["rule"]) for s in p.claim1["sparsities"]]
        if "claim2" in p.run:
            rules = {parse_init(spec)[1] for spec in p.claim2["inits"]}
            wanted += [
                ("claim2.sparsities", s, r) for s in p.claim2["sparsities"] for r in sorted(rules)
            ]
        if "claim3" in p.run:
            wanted.append(
                ("claim3.sparsity", p.claim3["sparsity"], parse_init(p.claim3["init"])[1])
            )
        for name in ("overlap", "finetune"):
            if name in p.run:
                wanted += [
                    (f"{name}.sparsities", s, p.claim1["rule"])
                    for s in getattr(p, name)["sparsities"]
                ]
        for field, sparsity, rule in wanted:
            try:
                self.budget(sparsity, rule)
            except ConfigError as e:
                raise ConfigError(
                    str(e).replace(
                        f"config field `search.sparsity` is {sparsity!r}",
                        f"config field `studies.{field}` holds {sparsity!r}",
                    )
                ) from None

    # The cells.

    def dense(self) -> dict:
        def compute(ctx):
            return {"eval": phases.evaluate(ctx, self.params, self.stats, None)}

        return self.cell("dense", "dense", {}, compute)

    def prune(self, sparsity: float, rule: str, seed: int) -> dict:
        def compute(ctx):
            budget = self.budget(sparsity, rule)
            _, masks = init_scores(self.params, budget, "magnitude")
            plain = phases.evaluate(ctx, self.params, self.stats, masks)
            stats = phases.reestimate_batch_stats(
                ctx,
                self.params,
                self.stats,
                masks,
                num_batches=self.bn_batches,
                batch_size=self.base.batch_size,
                seed=seed,
            )
            reestimated = phases.evaluate(ctx, self.params, stats, masks)
            return {
                "sparsity": phases.masks_sparsity(masks, self.params),
                "eval": plain,
                "eval_bn": reestimated,
            }

        identity = {"sparsity": sparsity, "rule": rule, "seed": seed, "bn": self.bn_batches}
        label = f"prune-{_percent_label(sparsity)}-{rule}-seed{seed}"
        return self.cell("prune", label, identity, compute)

    def search(self, recipe: StudyRecipe, seed: int, eval_every_steps: int = 0) -> dict:
        """A search cell; with `eval_every_steps`, also evaluated every that many steps."""
        window = self.plan.claim3["window"]

        def compute(ctx):
            state, budget = phases.search(
                ctx, self.params, self.stats, recipe, seed=seed, fingerprint=self.fingerprint
            )
            final = phases.evaluate(ctx, self.params, state.batch_stats, state.masks)
            phases.export(
                ctx,
                self.params,
                state,
                budget,
                config=dataclasses.asdict(recipe),
                metrics=final,
                fingerprint=self.fingerprint,
            )
            masks = jax.device_get(state.masks)
            # Fairness checks: the statistics re-estimated once more after the search (are the
            # running ones stale under a churning mask?), and the scale of the scores.
            stats = phases.reestimate_batch_stats(
                ctx,
                self.params,
                state.batch_stats,
                masks,
                num_batches=self.bn_batches,
                batch_size=recipe.batch_size,
                seed=seed,
            )
            bn_after = phases.evaluate(ctx, self.params, stats, masks)
            key_init, _ = jax.random.split(jax.random.key(seed + 2))  # as `phases.search`
            initial, _ = init_scores(
                self.params, budget, recipe.init, key_init, gap=recipe.gap, rank_by=recipe.rank_by
            )
            _, magnitude = init_scores(self.params, budget, "magnitude")
            overlap = mask_overlap(masks, magnitude)
            records = report.read_metrics(ctx.log.path) if ctx.is_main else []
            _, steps_per_epoch = recipe.steps(ctx.data.steps_per_epoch(recipe.batch_size))
            evals = _last_per(records, "eval", "step")
            ends = [r for r in evals if "epoch" in r]  # each epoch's end
            churn = _last_per(records, "churn", "epoch")
            if not self.plan.keep_checkpoints:
                shutil.rmtree(os.path.join(ctx.workdir, "search", "checkpoints"), True)
            return {
                "eval": final,
                "eval_bn_after": bn_after,
                "score_scale": [_mean_abs(initial), _mean_abs(jax.device_get(state.scores))],
                "sparsity": sparsity_report(masks, self.params),
                "overlap_magnitude": overlap,
                "curve": [
                    {
                        "epoch": r["epoch"],
                        "step": r["step"],
                        "accuracy": r["accuracy"],
                        "loss": r["loss"],
                    }
                    for r in ends
                ],
                # Every evaluation, by step (more than `curve` with `eval_every_steps`).
                "curve_steps": [
                    {"step": r["step"], "accuracy": r["accuracy"], "loss": r["loss"]} for r in evals
                ],
                "churn": [{"epoch": r["epoch"], "churn": r["churn"]} for r in churn],
                "steps": step_statistics(records, steps_per_epoch, window),
                "steps_per_epoch": steps_per_epoch,
            }

        identity = {"recipe": dataclasses.asdict(recipe), "seed": seed, "window": window}
        if eval_every_steps:  # (absent when 0: the cells run before it existed stay valid)
            identity["eval_every_steps"] = eval_every_steps
        rate = recipe.rate
        label = "-".join(
            [
                "search",
                _percent_label(recipe.sparsity),
                recipe.init,
                recipe.rule,
                f"e{recipe.epochs}",
                recipe.policy if recipe.policy != "rate" else f"{rate.schedule}",
                f"seed{seed}",
            ]
        )
        return self.cell(
            "search",
            label,
            identity,
            compute,
            log_every_steps=1,
            eval_every_steps=eval_every_steps,
        )

    def jackpot(self, sparsity: float, seed: int) -> tuple[StudyRecipe, dict]:
        """The claim-1 search (magnitude init, the claim-1 rule and epochs) at `sparsity`."""
        c = self.plan.claim1
        recipe = self.recipe(
            sparsity=sparsity,
            rule=c["rule"],
            init="magnitude",
            rank_by="score",
            epochs=c["epochs"],
            max_steps=self.base.max_steps,
        )
        return recipe, self.search(recipe, seed)

    def _cell_dir(self, result: Mapping) -> str:
        return os.path.join(self.root, "cells", f"{result['label']}-{digest(result['identity'])}")

    def overlap(self, sparsity: float, seed: int) -> dict | None:
        recipe, searched = self.jackpot(sparsity, seed)
        if searched is None:  # a dry pass before the jackpot was searched
            self.missing.append(f"overlap-{_percent_label(sparsity)}-seed{seed}")
            return None
        c = self.plan.overlap
        masks_path = os.path.join(self._cell_dir(searched), "export", "masks.npz")

        def compute(ctx):
            budget = recipe.budget(self.params, ctx.network.spec)
            jackpot = masks_from_npz(masks_path, budget)
            batches = ctx.data.train_batches(recipe.batch_size, seed + 11, augment=False)
            taken = [next(batches) for _ in range(c["batches"])]
            out = {}
            for name in c["criteria"]:
                try:
                    masks = criterion_masks(
                        name,
                        self.params,
                        self.stats,
                        budget,
                        apply_fn=ctx.network.apply_fn,
                        module=ctx.network.module,
                        batches=taken,
                        key=jax.random.key(seed + 13),
                        devices=ctx.devices,
                    )
                except ValueError as e:  # wanda on a model it cannot read
                    logging.warning("overlap: criterion %s skipped: %s", name, e)
                    continue
                out[name] = mask_overlap(jackpot, masks)
            # Two random sets of k_l of n_l weights per layer share k_l^2 / n_l on average.
            kept = [
                (int(np.sum(m)), int(np.size(m))) for _, m in named_leaves(jackpot) if m is not None
            ]
            both = sum(k * k / n for k, n in kept)
            chance = both / (2 * sum(k for k, _ in kept) - both)
            return {"sparsity": sparsity, "criteria": out, "chance_iou": chance}

        identity = {
            "sparsity": sparsity,
            "seed": seed,
            "jackpot": searched["identity"],
            "criteria": c["criteria"],
            "batches": c["batches"],
        }
        label = f"overlap-{_percent_label(sparsity)}-seed{seed}"
        return self.cell("overlap", label, identity, compute)

    def finetune(self, sparsity: float, seed: int) -> dict | None:
        recipe, searched = self.jackpot(sparsity, seed)
        if searched is None:  # a dry pass before the jackpot was searched
            self.missing.append(f"finetune-{_percent_label(sparsity)}-seed{seed}")
            return None
        c = self.plan.finetune
        export = os.path.join(self._cell_dir(searched), "export", "jackpot.safetensors")

        def compute(ctx):
            variables, masks = context.load_weights(ctx, export)
            steps_per_epoch = ctx.data.steps_per_epoch(recipe.batch_size)
            total = c["epochs"] * steps_per_epoch
            lr = optax.cosine_decay_schedule(c["learning_rate"], total)
            tx = optax.chain(
                optax.add_decayed_weights(c["weight_decay"]),
                optax.sgd(lr, momentum=c["momentum"] or None),
            )
            state = ctx.devices.place_state(
                create_train_state(variables["params"], variables["batch_stats"], tx)
            )
            placed = ctx.devices.weights(masks)
            run = ctx.devices.run(
                masked_train_step, donate_state=True, apply_fn=ctx.network.apply_fn, tx=tx
            )
            hooks = [
                TrainLog(
                    ctx.log,
                    "finetune",
                    total_steps=total,
                    steps_per_epoch=steps_per_epoch,
                    batch_size=recipe.batch_size,
                    learning_rate=lr,
                    show_progress=ctx.is_main,
                ),
                EvaluateEveryEpochs(
                    ctx.log,
                    "finetune",
                    1,
                    total,
                    lambda s: phases.evaluate(ctx, s.params, s.batch_stats, masks),
                ),
            ]
            with ctx.checkpointer("finetune", {"jackpot": digest(searched["identity"])}) as ckpt:
                state = train_loop(
                    state,
                    lambda state, batch: run(state, placed, ctx.devices.shard(batch)),
                    ctx.data.train_batches(recipe.batch_size, seed + 17, recipe.augment),
                    total_steps=total,
                    steps_per_epoch=steps_per_epoch,
                    checkpointer=ckpt,
                    log_every_steps=ctx.log_every_steps,
                    hooks=hooks,
                )
            final = phases.evaluate(ctx, state.params, state.batch_stats, masks)
            params = jax.device_get(state.params)
            # The pruned weights never moved: the fine-tuned network is still the jackpot's mask.
            unchanged = all(
                bool(np.all(np.asarray(w)[~np.asarray(m)] == 0))
                for (_, w), (_, m) in zip(named_leaves(params), named_leaves(masks), strict=True)
                if m is not None
            )
            if not self.plan.keep_checkpoints:
                shutil.rmtree(os.path.join(ctx.workdir, "finetune", "checkpoints"), True)
            return {
                "sparsity": sparsity,
                "jackpot": searched["eval"],
                "eval": final,
                "pruned_weights_zero": unchanged,
            }

        identity = {"sparsity": sparsity, "seed": seed, "jackpot": searched["identity"], **c}
        label = f"finetune-{_percent_label(sparsity)}-seed{seed}"
        return self.cell("finetune", label, identity, compute)

    # The studies, in the order they run.

    def run(self, after_seed: Callable[[], None] = lambda: None) -> None:
        """Every cell, seed by seed: a study cut short has every study for its first seeds."""
        self.dense()
        for seed in self.plan.seeds:
            self.run_seed(seed)
            after_seed()

    def finished(self) -> tuple[list[dict], list[str]]:
        """The results of the finished cells and the labels of the missing ones (nothing runs)."""
        self.dry, self.cells, self.missing = True, [], []
        try:
            self.run()
        finally:
            self.dry = False
        return self.cells, self.missing

    def run_seed(self, seed: int) -> None:
        p = self.plan
        if "claim1" in p.run:
            for sparsity in p.claim1["sparsities"]:
                self.prune(sparsity, p.claim1["rule"], seed)
                self.jackpot(sparsity, seed)
        if "claim2" in p.run:
            for sparsity in p.claim2["sparsities"]:
                for spec in p.claim2["inits"]:
                    init, rule, rank_by = parse_init(spec)
                    recipe = self.recipe(
                        sparsity=sparsity,
                        rule=rule,
                        init=init,
                        rank_by=rank_by,
                        epochs=p.claim2["epochs"],
                    )
                    self.search(recipe, seed, p.claim2["eval_every_steps"])
        if "claim3" in p.run:
            init, rule, rank_by = parse_init(p.claim3["init"])
            for spec in p.claim3["policies"]:
                rate, policy = parse_policy(spec)
                recipe = self.recipe(
                    sparsity=p.claim3["sparsity"],
                    rule=rule,
                    init=init,
                    rank_by=rank_by,
                    epochs=p.claim3["epochs"],
                    rate=rate,
                    policy=policy,
                )
                self.search(recipe, seed)
        if "overlap" in p.run:
            for sparsity in p.overlap["sparsities"]:
                self.overlap(sparsity, seed)
        if "finetune" in p.run:
            for sparsity in p.finetune["sparsities"]:
                self.finetune(sparsity, seed)


def command(workdir: str, config_file: str = "configs/studies.py") -> str:
    """The command that reruns a study: the command line's own, overrides included (outside
    the command line: `config_file` in `workdir`)."""
    if sys.argv and os.path.basename(sys.argv[0]) == "main.py":
        # Without report_only: the command is the one that runs the cells.
        args = [a for a in sys.argv[1:] if not a.startswith("--config.studies.report_only")]
        return shlex.join(["python", "-m", "jackpots_jax.main", *args])
    return f"python -m jackpots_jax.main --config {config_file} --workdir {workdir}"


def run(ctx: Context, config: Config) -> dict:
    """The `studies` mode: pre-trains if needed, runs every cell, writes results and report."""
    plan = read_plan(config)
    started = time.perf_counter()
    weights = recipes.weights_recipe(config, ctx.workdir)
    if weights.missing():
        if weights.named:
            context.pretrained(ctx, weights)  # raises: the named file is missing
        if plan.report_only:
            raise FileNotFoundError(
                f"`studies.report_only` writes the report of the finished cells, but there are "
                f"none yet: no pre-trained weights at {weights.path}; run the study without "
                "--config.studies.report_only first"
            )
        logging.info("no pre-trained weights in %s: pre-training first", ctx.workdir)
        phases.pretrain(ctx, recipes.train_recipe(config), seed=config.seed)
    variables, _, weights_fingerprint = context.pretrained(ctx, weights)
    studies = Studies(ctx, config, plan, variables, weights_fingerprint)
    studies.check_budgets()

    def report() -> dict:
        """results.json, report.md and plots from every finished cell (process 0)."""
        if not ctx.is_main:
            return {}
        cells, missing = studies.finished()
        if not any(c["identity"]["kind"] == "dense" for c in cells):
            return {}
        budget = studies.budget(0.5, "uniform")
        masked = {name for name, b in named_leaves(budget) if b is not None}
        shapes = {n: tuple(np.shape(w)) for n, w in named_leaves(studies.params) if n in masked}
        meta = {
            "model": ctx.model_name,
            "dataset": config.dataset.name,
            "seeds": list(plan.seeds),
            "search": {
                k: v
                for k, v in dataclasses.asdict(studies.base).items()
                if k in ("batch_size", "learning_rate", "momentum", "weight_decay", "gap")
            },
            "pretrain_epochs": config.pretrain.epochs,
            "bn_batches": config.prune.bn_batches,
            "cpus": os.cpu_count(),
            "wall_seconds": time.perf_counter() - started,
            "missing_cells": missing,
            "command": command(ctx.workdir),
        }
        groups = layer_groups(ctx.network.spec, shapes)
        results = study_report.assemble(dataclasses.asdict(plan), cells, meta, groups)
        path = study_report.write(studies.root, results)
        print(f"\nstudies report: {path}" + (f" ({len(missing)} cells missing)" if missing else ""))
        return results

    if not plan.report_only:
        studies.run(after_seed=report)
    return report()
