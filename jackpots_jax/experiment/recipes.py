"""The config read once into plain values: what every mode, study and report runs.

`train_recipe(config)`, `search_recipe(config)` and `weights_recipe(config, workdir)` turn the
config's groups into frozen dataclasses; the phases, the studies and the reports take these and
never see the config. `SearchRecipe.budget(params, spec)` is the one budget of a model: the same
in a search, in one-shot pruning, in every study cell and in a report (the model's default dense
leaves and the input axes of its kernels come from its `ModelSpec`). `parse_policy` reads a
restriction policy of the studies (`'constant:0.5'`, `'cosine'`, `'first_order'`).

Example:
  >>> recipe = search_recipe(config)
  >>> budget = recipe.budget(params, models.spec(config.model.name))
  >>> tx = recipe.optimizer(budget, total_steps=1000)
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from jackpots_jax._tree import named_leaves
from jackpots_jax.experiment.config import ConfigError, pattern_sparsity
from jackpots_jax.experiment.context import PRETRAINED
from jackpots_jax.models.spec import ModelSpec
from jackpots_jax.patterns import Pattern
from jackpots_jax.restriction import schedules, search_optimizer
from jackpots_jax.sparsity import layer_budgets, prunable_leaves

PyTree = Any
Config = ml_collections.ConfigDict
POLICIES = ("constant", "cosine", "polynomial", "first_order")


# ---------------------------------------------------------------------------------------------
# Dense pre-training.


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Dense training from scratch: SGD with momentum (or AdamW, `momentum` its b1), cosine
    learning rate to 0 after an optional linear warm-up."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    augment: bool
    optimizer: str = "sgd"
    warmup_epochs: int = 0
    clip_norm: float = 0.0

    def transform(self, total_steps: int, steps_per_epoch: int):
        """`(tx, learning_rate schedule)`: SGD (the CNNs' recipe) or AdamW (the ViTs'), linear
        warm-up over `warmup_epochs`, cosine to 0, gradients clipped to `clip_norm` (0: not)."""
        warmup = min(self.warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))
        if warmup:
            lr = optax.warmup_cosine_decay_schedule(
                0.0, self.learning_rate, warmup, max(total_steps, warmup + 1)
            )
        else:
            lr = optax.cosine_decay_schedule(self.learning_rate, max(total_steps, 1))
        if self.optimizer == "adamw":
            # Weight decay on the kernels only, as the ViT recipes do (not on norms, biases,
            # position embeddings or class tokens).
            kernels = lambda params: jax.tree_util.tree_map_with_path(
                lambda p, x: np.ndim(x) >= 2 and "pos_embedding" not in str(p), params
            )
            tx = optax.adamw(lr, b1=self.momentum, weight_decay=self.weight_decay, mask=kernels)
        else:
            tx = optax.chain(
                optax.add_decayed_weights(self.weight_decay),
                optax.sgd(lr, momentum=self.momentum or None, nesterov=self.nesterov),
            )
        if self.clip_norm:
            tx = optax.chain(optax.clip_by_global_norm(self.clip_norm), tx)
        return tx, lr


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
    allow_empty_layers: bool = False
    pattern: str = "unstructured"
    indivisible: str = "error"
    loss: str = "cross_entropy"
    optimizer_kind: str = "sgd"  # the config's `search.optimizer` (`optimizer()` builds it)

    def check_dense(self, params: PyTree) -> None:
        """Every pattern of `dense` must name a kernel of `params`: a typo would prune it."""
        kernels = [n for n, k in named_leaves(prunable_leaves(params, dense=())) if k]
        unmatched = [p for p in self.dense or () if not any(re.search(p, n) for n in kernels)]
        if unmatched:
            raise ConfigError(
                f"config field `search.dense` is {tuple(self.dense)!r}, but "
                f"{', '.join(map(repr, unmatched))} matches none of the model's kernels, so it "
                "holds nothing dense (a typo?); the patterns are regular expressions searched in "
                f"these kernel paths: {', '.join(kernels)}"
            )

    def budget(self, params: PyTree, spec: ModelSpec) -> PyTree:
        """The pruned count per leaf under the pattern: the one budget of every search, one-shot
        pruning, study cell and report of a model.

        `spec` gives the model's default dense leaves and the input axes of its kernels that are
        not `HWIO`/`[in, out]` (`ModelSpec.input_axes`); only the axes that match a masked leaf
        are passed on (a user may hold the attention dense), and only under a structured
        pattern, where they matter. `ConfigError` for a `dense` pattern that matches no kernel,
        and (unless `allow_empty_layers`) for a sparsity at which a masked layer keeps nothing.
        """
        self.check_dense(params)
        dense = tuple(spec.dense if self.dense is None else self.dense)
        input_axes = dict(spec.input_axes)
        pattern = Pattern.parse(self.pattern)
        if not pattern.structured:
            budget = layer_budgets(params, self.sparsity, self.rule, dense=dense)
        else:
            names = [n for n, flag in named_leaves(prunable_leaves(params, dense)) if flag]
            axes = {k: v for k, v in input_axes.items() if any(re.search(k, n) for n in names)}
            budget = layer_budgets(
                params,
                self.sparsity,
                self.rule,
                dense=dense,
                pattern=pattern,
                input_axes=axes or None,
                indivisible=self.indivisible,
            )
        sizes = dict(named_leaves(params))
        empty = [
            (name, int(np.size(sizes[name])))
            for name, pruned in named_leaves(budget)
            if pruned is not None and int(pruned) >= np.size(sizes[name])
        ]
        if empty and not self.allow_empty_layers:
            listed = ", ".join(f"{name} (0 of {size} kept)" for name, size in empty[:10])
            more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
            raise ConfigError(
                f"config field `search.sparsity` is {self.sparsity!r}: with the {self.rule!r} "
                f"rule, {len(empty)} masked layer(s) would keep no weight at all: {listed}{more}. "
                "Nothing would pass through them. Lower `search.sparsity`, hold those layers "
                "dense (`search.dense`), or set `--config.search.allow_empty_layers=True` if this "
                "is what you want"
            )
        return budget

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
            optimizer=self.optimizer_kind,
        )


def parse_policy(spec: str) -> tuple[RateRecipe, str]:
    """`'constant:0.5'` -> `(RateRecipe, policy)`; `'first_order'` is rate 1 plus the check."""
    name, _, arg = str(spec).partition(":")
    if name not in POLICIES:
        raise ValueError(spec)
    if name == "first_order":
        return RateRecipe("constant", 1.0, 1.0), "first_order"
    value = float(arg) if arg else 1.0
    if name == "constant" and not 0 <= value <= 1 or name == "polynomial" and not value > 0:
        raise ValueError(spec)
    return RateRecipe(name, value if name == "constant" else 1.0, value), "rate"


@dataclasses.dataclass(frozen=True)
class WeightsRecipe:
    """Which pre-trained weights a run starts from.

    `path`: the weights file (the config's `weights.path`, else the work directory's own
    pre-trained weights); `named`: whether the config named it (a missing named file is an
    error, a missing own file means pre-training first); `random`: random weights on purpose,
    drawn from `seed + 1`; `masks`, `batch_stats`: files to evaluate with (`''`: none).
    """

    path: str
    named: bool
    random: bool
    masks: str
    batch_stats: str
    seed: int

    def missing(self) -> bool:
        """No weights file where the run reads one (a named file is then an error to report; the
        work directory's own means pre-training first)."""
        return not self.random and not os.path.exists(self.path)


# ---------------------------------------------------------------------------------------------
# From the config.


def train_recipe(config: Config) -> TrainRecipe:
    """The config's `pretrain` group."""
    p = config.pretrain
    return TrainRecipe(**{f.name: p[f.name] for f in dataclasses.fields(TrainRecipe)})


def search_recipe(config: Config) -> SearchRecipe:
    """The config's `search` group."""
    s = config.search
    rate = RateRecipe(s.rate.schedule, s.rate.value, s.rate.power)
    named = {"optimizer_kind": "optimizer"}
    fields = {
        f.name: s[named.get(f.name, f.name)]
        for f in dataclasses.fields(SearchRecipe)
        if f.name != "rate"
    }
    # An N:M pattern's sparsity as printed (0.666667 for 1:3) means the pattern's exact 1 - N/M.
    fields["sparsity"] = pattern_sparsity(s.pattern, s.sparsity)
    return SearchRecipe(**fields, rate=rate)


def weights_recipe(config: Config, workdir: str) -> WeightsRecipe:
    """The config's `weights` group, the default path resolved against `workdir`."""
    w = config.weights
    return WeightsRecipe(
        path=w.path or os.path.join(workdir, PRETRAINED),
        named=bool(w.path),
        random=bool(w.random),
        masks=w.masks,
        batch_stats=w.batch_stats,
        seed=config.seed,
    )


def backend(config: Config) -> str:
    """The runner backend: `parallel.backend`, where `'auto'` is `'jit'` when the state is
    sharded (`parallel.fsdp` > 1) and `'shard_map'` otherwise."""
    chosen = config.parallel.backend
    if chosen == "auto":
        return "jit" if config.parallel.fsdp > 1 else "shard_map"
    return chosen
