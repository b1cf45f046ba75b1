"""What every phase of a run shares: the model, the data, the devices, the logs, the files.

`Context` is built once from the config by `experiment.modes`; it holds no config. With it come
the run's files: the pre-trained weights (`pretrained`, `load_weights`, `save_weights`,
`random_variables`) and `results.json` (`record_result`, `results`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from jackpots_jax import data as data_lib
from jackpots_jax import models, parallel
from jackpots_jax._tree import named_leaves
from jackpots_jax.experiment.logs import MetricsLog
from jackpots_jax.io import weights as weights_io
from jackpots_jax.io.checkpoints import Checkpointer, fingerprint
from jackpots_jax.io.errors import FileContentError
from jackpots_jax.io.files import read_json_file, write_json
from jackpots_jax.losses import LossFn, classification, next_token

PyTree = Any
PRETRAINED = os.path.join("pretrain", "model.safetensors")


@dataclasses.dataclass(frozen=True)
class Data:
    """A prepared dataset and how this run reads it."""

    info: data_lib.DatasetInfo
    data_dir: str | None
    dtype: str
    num_train: int | None  # the first N training examples only (None: all)
    num_eval: int | None
    local_device_count: int

    @property
    def _kwargs(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "dtype": self.dtype,
            "local_device_count": self.local_device_count,
        }

    def train_batches(self, batch_size: int, seed: int, augment: bool) -> data_lib.TrainIterator:
        return data_lib.train_iterator(
            self.info.name,
            global_batch_size=batch_size,
            seed=seed,
            augment=augment,
            num_examples=self.num_train,
            **self._kwargs,
        )

    def eval_batches(self, batch_size: int):
        return data_lib.eval_iterator(
            self.info.name, global_batch_size=batch_size, num_examples=self.num_eval, **self._kwargs
        )

    def steps_per_epoch(self, batch_size: int) -> int:
        return data_lib.steps_per_epoch(self.info, batch_size, self.num_train)

    # What the steps take from a batch of images: the model reads `image`, the loss `label`.
    inputs = "image"
    is_text = False

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.info.image_shape)

    def loss_fn(self, label_smoothing: float = 0.0) -> LossFn:
        return classification(label_smoothing)


@dataclasses.dataclass(frozen=True)
class Text:
    """A tokenized corpus and how this run reads it: windows of `seq_len` tokens (`data.text`).

    `num_train` / `num_eval` keep the first N training / validation windows of the token streams
    (None: all); evaluation scores every target of the validation windows kept, once.
    """

    tokens: data_lib.text.TextData
    seq_len: int
    num_train: int | None
    num_eval: int | None
    local_device_count: int

    inputs = "inputs"
    is_text = True

    @property
    def name(self) -> str:
        return self.tokens.corpus

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    def loss_fn(self, label_smoothing: float = 0.0) -> LossFn:
        del label_smoothing  # refused for language models by the config check
        return next_token()

    def train_batches(self, batch_size: int, seed: int, augment: bool) -> data_lib.TrainIterator:
        del augment  # nothing to augment in a token window
        return data_lib.text.text_train_iterator(
            self.tokens,
            seq_len=self.seq_len,
            global_batch_size=batch_size,
            seed=seed,
            local_device_count=self.local_device_count,
        )

    def eval_batches(self, batch_size: int):
        return data_lib.text.text_eval_iterator(
            self.tokens,
            seq_len=self.seq_len,
            global_batch_size=batch_size,
            local_device_count=self.local_device_count,
        )

    def steps_per_epoch(self, batch_size: int) -> int:
        return data_lib.text.num_train_windows(len(self.tokens.train_tokens), self.seq_len) // (
            batch_size
        )


def text_data(
    tokens: data_lib.text.TextData,
    *,
    seq_len: int,
    num_train: int | None,
    num_eval: int | None,
    local_device_count: int,
) -> Text:
    """`Text` over the first `num_train` training and `num_eval` validation windows (None: all).

    A window of `seq_len` targets spans `seq_len + 1` tokens, and consecutive windows share one:
    the first N windows are the first `N * seq_len + 1` tokens of the stream.
    """
    cut = {}
    for field, n in (("train_tokens", num_train), ("validation_tokens", num_eval)):
        if n:
            cut[field] = getattr(tokens, field)[: n * seq_len + 1]
    return Text(
        dataclasses.replace(tokens, **cut), seq_len, num_train, num_eval, local_device_count
    )


@dataclasses.dataclass(frozen=True)
class Devices:
    """The mesh a run is laid out over, the runner backend, and how state is sharded.

    With the `shard_map` and `pmap` backends the run is data-parallel: every device holds the
    whole state. With `jit` the frozen weights and the state are laid out over the mesh's 'fsdp'
    axis (`parallel.place`; by `rules`), batch statistics replicated, and XLA partitions each
    step (`parallel.sharded`).
    """

    mesh: jax.sharding.Mesh
    backend: str
    rules: tuple = ()
    selection: str = "auto"

    @property
    def fsdp(self) -> int:
        return parallel.axis_size(self.mesh, parallel.FSDP)

    @property
    def search_selection(self) -> str:
        """The exact selection of the search: the batched one where the scores are sharded."""
        return "batched" if self.selection == "auto" and self.fsdp > 1 else self.selection

    def run(self, step_fn, *, donate_state: bool = False, **static):
        """`step_fn` over the mesh (`parallel.sharded` or `data_parallel`); state donated."""
        donate = (0,) if donate_state else ()
        if self.backend == "jit":
            return parallel.sharded(step_fn, mesh=self.mesh, donate_argnums=donate, **static)
        return parallel.data_parallel(
            step_fn, mesh=self.mesh, backend=self.backend, donate_argnums=donate, **static
        )

    def shard(self, batch: PyTree) -> PyTree:
        return batch if self.backend == "pmap" else parallel.shard_batch(batch, self.mesh)

    def replicate(self, tree: PyTree) -> PyTree:
        """`tree` whole on every device of the mesh, placed once (not moved per step)."""
        if self.backend == "pmap":
            return tree
        return parallel.replicate(tree, self.mesh)

    def weights(self, tree: PyTree) -> PyTree:
        """Params (or masks) laid out for the steps: sharded over 'fsdp' under `jit`."""
        if self.backend != "jit":
            return self.replicate(tree)
        return parallel.place(tree, self.mesh, self.rules)

    def place_state(self, state: Any) -> Any:
        """A `SearchState` / `TrainState` laid out for the steps (sharded over 'fsdp' under jit).

        Batch statistics, the step count and the PRNG key stay whole on every device. Placed
        where the step's outputs are, so that its first call compiles the same program as every
        later one (a state left uncommitted made the first step compile twice).
        """
        if self.backend != "jit":
            return self.replicate(state)
        return parallel.place_state(state, self.mesh, self.rules)

    def layout(self, scores: PyTree):
        """Where the batched selection processes the scores' shards (`None`: not sharded)."""
        if self.backend != "jit":
            return None
        return parallel.selection_layout(scores, self.mesh, self.rules)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every phase of a run shares; built once from the config by `experiment.modes`."""

    workdir: str
    network: models.Network
    model_dtype: str  # the name, as in the config and the checkpoint identity
    data: Data | Text
    devices: Devices
    log: MetricsLog
    is_main: bool
    checkpoint_every_steps: int
    checkpoint_keep: int
    log_every_steps: int
    eval_batch_size: int
    eval_every_epochs: int
    eval_every_steps: int = 0  # a search also evaluated every this many steps (0: never)
    # Compiled steps the phases reuse within the run (`Context.compiled`), by name.
    _compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def compiled(self, name: str, make):
        """`make()` (a compiled step) the first time `name` is asked for, the same one after.

        A step compiled once serves every evaluation of a run (dense, each pruned model, every
        epoch), instead of one compilation each.
        """
        if name not in self._compiled:
            self._compiled[name] = make()
        return self._compiled[name]

    @property
    def model_name(self) -> str:
        return self.network.spec.name

    @property
    def model_options(self) -> dict[str, Any]:
        return dict(self.network.options)

    def checkpointer(
        self, phase: str, identity: Mapping[str, Any], fingerprint: str | None = None
    ) -> Checkpointer:
        """The checkpoints of `phase` in `<workdir>/<phase>/checkpoints`."""
        identity = {
            "kind": phase,
            "model": self.model_name,
            "model_kwargs": self.model_options,
            "dtype": self.model_dtype,
            "num_classes": self.network.num_classes,
            **identity,
        }
        return Checkpointer(
            os.path.join(self.workdir, phase, "checkpoints"),
            identity=identity,
            save_every_steps=self.checkpoint_every_steps,
            keep=self.checkpoint_keep,
            fingerprint=fingerprint,
        )


# ---------------------------------------------------------------------------------------------
# Weights and results.


def random_variables(ctx: Context, seed: int) -> dict[str, PyTree]:
    """Freshly initialised variables of the model, for the dataset's input shape."""
    shape = ctx.data.input_shape
    params, stats = jax.jit(lambda k: ctx.network.init(k, shape))(jax.random.key(seed))
    return {"params": params, "batch_stats": stats}


def load_weights(ctx: Context, path: str) -> tuple[dict[str, PyTree], PyTree | None]:
    """The variables (host numpy arrays) and masks (or `None`) of a weights file.

    Raises:
      FileNotFoundError: no file at `path`, with what to do about it.
      PermissionError: the file may not be read.
      FileContentError: the file is empty, truncated or not in the format its suffix names, or a
        weight or statistic is NaN or infinite (the leaf is named).
      CheckpointMismatchError: the file does not fit the model (every key listed).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no pre-trained weights at {path!r}: set `--config.weights.path` to a checkpoint "
            "(.safetensors, .npz, or .pth with PyTorch installed), run `--config.mode=pretrain` "
            "first, or set `--config.weights.random=True` to search random weights on purpose"
        )
    try:
        variables, _, masks = weights_io.import_checkpoint(
            path, ctx.model_name, ctx.network.num_classes, **ctx.model_options
        )
    except PermissionError as e:
        raise PermissionError(
            f"the weights file {path!r} (`weights.path`) may not be read ({e.strerror}): make it "
            "readable, or copy it somewhere you may read"
        ) from None
    except FileContentError as e:
        raise FileContentError(f"`weights.path`: {e}") from None
    variables.setdefault("batch_stats", {})
    # A NaN in the weights would only show as a NaN loss, blamed on the learning rate.
    bad = []
    for name, leaf in named_leaves(variables):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
            nan, inf = int(np.isnan(leaf).sum()), int(np.isinf(leaf).sum())
            bad.append(f"{name} ({nan} NaN, {inf} infinite of {leaf.size})")
    if bad:
        raise FileContentError(
            f"the weights in {path!r} (`weights.path`) are not all finite: {', '.join(bad[:10])}"
            f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}; nothing computed from "
            "them would mean anything: use another file (or the checkpoint before the one that "
            "diverged)"
        )
    return variables, masks


def pretrained(ctx: Context, weights: Any) -> tuple[dict[str, PyTree], PyTree | None, str]:
    """The pre-trained variables a `recipes.WeightsRecipe` names, their masks (or None) and their
    fingerprint; random variables from `weights.seed + 1` when `weights.random` asks for them."""
    if weights.random:
        logging.warning("searching random weights on purpose (weights.random=True)")
        variables, masks = random_variables(ctx, weights.seed + 1), None
    else:
        variables, masks = load_weights(ctx, weights.path)
    variables = jax.device_get(variables)
    return variables, masks, fingerprint(variables["params"])


def save_weights(ctx: Context, variables: PyTree, path: str) -> None:
    """Writes dense variables as a PyTorch-style state dict (process 0 only)."""
    if ctx.is_main:
        weights_io.export_state_dict(
            jax.device_get(variables), None, ctx.model_name, path, **ctx.model_options
        )


def record_result(ctx: Context, row: Mapping[str, Any]) -> None:
    """Adds (or replaces, by `model`) a row of `<workdir>/results.json`."""
    if "perplexity" in row:
        logging.info("%s: perplexity %.4f", row["model"], row["perplexity"])
    else:
        logging.info("%s: accuracy %.2f%%", row["model"], 100 * row["accuracy"])
    if not ctx.is_main:
        return
    rows = [r for r in results(ctx) if r["model"] != row["model"]]
    write_json(os.path.join(ctx.workdir, "results.json"), [*rows, dict(row)], "results")


def results(ctx: Context) -> list[dict[str, Any]]:
    """The rows of `<workdir>/results.json` (none yet: `[]`)."""
    path = os.path.join(ctx.workdir, "results.json")
    if not os.path.exists(path):
        return []
    rows = read_json_file(path, "the results file")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r for r in rows):
        raise FileContentError(
            f"the results file {path} is not a list of result rows (each a JSON object with a "
            "`model`): restore it, or move it away to start it afresh"
        )
    return rows
