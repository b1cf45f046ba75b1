"""`train_and_evaluate(config, workdir)`: the one loop behind the command line.

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

Every run appends metrics to `<workdir>/metrics.jsonl` (one JSON object per line) and the
accuracies it measured to `<workdir>/results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jackpots_jax import checkpoints, convert, data, models, parallel, report, tensorboard_events
from jackpots_jax._tree import named_leaves
from jackpots_jax.config_schema import ConfigError, check_config
from jackpots_jax.masks import apply_masks, init_scores
from jackpots_jax.restriction import schedules
from jackpots_jax.sparsity import layer_budgets, sparsity_report
from jackpots_jax.step import (
    create_search_state,
    create_train_state,
    eval_step,
    search_optimizer,
    search_step,
    train_step,
)

PyTree = Any
PRETRAINED = os.path.join("pretrain", "model.safetensors")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# ---------------------------------------------------------------------------------------------
# Small helpers: metrics file, progress line.


class MetricsLog:
    """Appends metrics as JSON lines to `<workdir>/metrics.jsonl` (process 0 only).

    Their numbers also go to TensorBoard event files in `<workdir>/tensorboard`, tagged
    `<phase>/<kind>/<key>` (`search/train/loss`, `search/eval/accuracy`,
    `search/churn/churn_per_layer/<layer>`) at the record's step.
    """

    def __init__(self, workdir: str, enabled: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self.events = tensorboard_events.EventWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = _jsonable(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        prefix = f"{record.get('phase', 'run')}/{record.get('kind', 'metrics')}"
        skip = {"phase", "kind", "step", "epoch"}
        scalars = _scalars({k: v for k, v in record.items() if k not in skip}, prefix)
        self.events.scalars(record.get("step", 0), scalars)

    def drop_after(self, phase: str, step: int) -> None:
        """Forgets the records of `phase` past `step` (a run killed after its last save).

        The JSON lines past `step` are removed; TensorBoard is told by a restart marker.
        """
        if not self.enabled or not os.path.exists(self.path):
            return
        records = report.read_metrics(self.path)
        keep = [r for r in records if not (r.get("phase") == phase and r.get("step", 0) > step)]
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(-1, os.SEEK_END)
            whole = not size or f.read(1) == b"\n"  # else a line cut short by a kill
        if len(keep) == len(records) and whole:
            return  # nothing past `step`: the event files hold nothing past it either
        # The JSON line is written before its events, so the events past `step` are a subset.
        self.events.restart(step + 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)


class Progress:
    """A one-line progress display on stderr: step, loss, accuracy, images/s."""

    def __init__(self, phase: str, total: int, enabled: bool):
        self.phase, self.total, self.enabled = phase, total, enabled
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, accuracy: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        width = 24
        done = int(width * step / max(self.total, 1))
        line = (
            f"{self.phase:>8} [{'#' * done}{'.' * (width - done)}] {step}/{self.total} "
            f"loss {loss:.4f} acc {100 * accuracy:.2f}% {images_per_s:,.0f} img/s"
        )
        end = "\r" if self.tty and step < self.total else "\n"
        print(line, end=end, file=sys.stderr, flush=True)


def _scalars(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a (nested) record, flattened to `prefix/key/...` tags."""
    out = {}
    for key, value in record.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out.update(_scalars(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        x = np.asarray(x)
        return x.item() if x.ndim == 0 else x.tolist()
    return x


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@jax.jit
def _accumulate(total: PyTree, new: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, total, new)


# ---------------------------------------------------------------------------------------------
# The job: everything a phase needs.


@dataclasses.dataclass
class Job:
    """What every phase of a run shares."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    model: Any
    model_name: str
    model_kwargs: dict
    num_classes: int
    info: data.DatasetInfo
    log: MetricsLog
    is_main: bool

    @property
    def data_kwargs(self) -> dict[str, Any]:
        c = self.config.dataset
        return {
            "data_dir": c.data_dir or None,
            "dtype": c.dtype,
            "local_device_count": self.mesh.devices.size // jax.process_count(),
        }

    def runner(self, step_fn, **static):
        return parallel.data_parallel(
            step_fn, mesh=self.mesh, backend=self.config.parallel.backend, **static
        )

    def shard(self, batch):
        if self.config.parallel.backend == "pmap":
            return batch
        return parallel.shard_batch(batch, self.mesh)

    def train_batches(self, batch_size: int, seed: int, augment: bool) -> data.TrainIterator:
        return data.train_iterator(
            self.config.dataset.name,
            global_batch_size=batch_size,
            seed=seed,
            augment=augment,
            num_examples=self.config.dataset.num_train or None,
            **self.data_kwargs,
        )

    def steps_per_epoch(self, batch_size: int) -> int:
        return data.steps_per_epoch(self.info, batch_size, self.config.dataset.num_train or None)


def _make_job(config: ml_collections.ConfigDict, workdir: str) -> Job:
    workdir = os.path.abspath(os.fspath(workdir))
    num_devices = config.parallel.num_devices or jax.device_count()
    if num_devices > jax.device_count():
        raise ConfigError(
            f"config field `parallel.num_devices` is {num_devices}; allowed: at most the "
            f"{jax.device_count()} device(s) present"
        )
    check_config(config, num_devices)
    c = config.dataset
    info = data.prepare(c.name, c.data_dir or None, source_dir=c.source_dir or None)
    num_classes = config.model.num_classes or info.num_classes
    model_kwargs = dict(config.model.kwargs)
    model = models.create(config.model.name, num_classes, config.model.dtype, **model_kwargs)
    expected = models.input_shape(config.model.name)
    if config.model.name == "fmnist_cnn" and tuple(info.image_shape) != expected:
        raise ConfigError(
            f"config field `model.name` is 'fmnist_cnn', built for {expected} images, but dataset "
            f"{c.name!r} has {tuple(info.image_shape)} images"
        )
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        _write_json(os.path.join(workdir, "config.json"), config.to_dict())
    return Job(
        config=config,
        workdir=workdir,
        mesh=parallel.make_mesh(num_devices),
        model=model,
        model_name=config.model.name,
        model_kwargs=model_kwargs,
        num_classes=num_classes,
        info=info,
        log=MetricsLog(workdir, is_main),
        is_main=is_main,
    )


# ---------------------------------------------------------------------------------------------
# Weights.


def _weights_path(config, workdir: str) -> str:
    return config.weights.path or os.path.join(workdir, PRETRAINED)


def _random_variables(job: Job, seed: int) -> PyTree:
    x = jnp.zeros((1, *job.info.image_shape), jnp.float32)
    variables = jax.jit(lambda k: job.model.init(k, x, train=False))(jax.random.key(seed))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def load_weights(job: Job) -> tuple[PyTree, PyTree | None]:
    """The pre-trained variables (and masks, when the file holds them) the config names.

    Raises:
      FileNotFoundError: no weights file, unless `weights.random` asks for random weights.
    """
    config = job.config
    if config.weights.random:
        logging.warning("searching random weights on purpose (weights.random=True)")
        return _random_variables(job, config.seed + 1), None
    path = _weights_path(config, job.workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no pre-trained weights at {path!r}: set `--config.weights.path` to a checkpoint "
            "(.safetensors, .npz, or .pth with PyTorch installed), run `--config.mode=pretrain` "
            "first, or set `--config.weights.random=True` to search random weights on purpose"
        )
    variables, _, masks = convert.import_checkpoint(
        path, job.model_name, job.num_classes, **job.model_kwargs
    )
    variables = jax.tree.map(jnp.asarray, variables)
    variables.setdefault("batch_stats", {})
    return variables, masks


def _save_weights(job: Job, variables: PyTree, path: str) -> None:
    if not job.is_main:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.safetensors"
    convert.export_state_dict(
        jax.device_get(variables), None, job.model_name, tmp, **job.model_kwargs
    )
    os.replace(tmp, path)


def _load_masks(path: str, params: PyTree) -> PyTree:
    with np.load(path) as f:
        stored = dict(f)
    out = {}
    for name, w in named_leaves(params):
        out[name] = stored.pop(name, None)
        if out[name] is not None and out[name].shape != np.shape(w):
            raise ValueError(
                f"masks file {path!r}: {name} has shape {out[name].shape}, the weights "
                f"{np.shape(w)}"
            )
    if stored:
        raise ValueError(f"masks file {path!r} has entries for unknown layers: {sorted(stored)}")
    leaves = [
        None if out[n] is None else jnp.asarray(out[n], bool) for n, _ in named_leaves(params)
    ]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


# ---------------------------------------------------------------------------------------------
# Evaluation and batch-norm re-estimation.


def evaluate(job: Job, variables: PyTree, masks: PyTree | None) -> dict[str, float]:
    """Top-1 and top-5 accuracy and mean loss over the whole evaluation split (each example once).

    The final epoch's figures are the ones reported; no epoch is picked by its test accuracy.
    """
    c = job.config
    run = job.runner(eval_step, model=job.model)
    total = None
    for batch in data.eval_iterator(
        c.dataset.name,
        global_batch_size=c.eval.batch_size,
        num_examples=c.dataset.num_eval or None,
        **job.data_kwargs,
    ):
        out = run(variables["params"], variables["batch_stats"], masks, job.shard(batch))
        total = out if total is None else _accumulate(total, out)
    total = jax.device_get(total)
    count = int(total["count"])
    return {
        "accuracy": int(total["correct"]) / count,
        "top5_accuracy": int(total["correct_top5"]) / count,
        "loss": float(total["loss"]) / count,
        "count": count,
    }


def _bn_stats_step(params, masks, batch_stats, batch, *, model, axis_name=None):
    weights = params if masks is None else apply_masks(params, masks)
    _, updates = model.apply(
        {"params": weights, "batch_stats": batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    stats = updates["batch_stats"]
    return stats if axis_name is None else jax.lax.pmean(stats, axis_name)


def reestimate_batch_stats(job: Job, variables: PyTree, masks: PyTree | None) -> PyTree:
    """Running BN statistics re-estimated in train mode over `prune.bn_batches` training batches."""
    c = job.config
    run = job.runner(_bn_stats_step, model=job.model)
    batches = job.train_batches(c.search.batch_size, c.seed + 7, augment=False)
    stats = variables["batch_stats"]
    for _ in range(c.prune.bn_batches):
        stats = run(variables["params"], masks, stats, job.shard(next(batches)))
    return stats


# ---------------------------------------------------------------------------------------------
# Training loops.


def _identity(job: Job, kind: str, budget: PyTree | None = None) -> dict[str, Any]:
    identity = {
        "kind": kind,
        "model": job.model_name,
        "model_kwargs": job.model_kwargs,
        "dtype": job.config.model.dtype,
        "num_classes": job.num_classes,
    }
    if budget is not None:
        identity["budget"] = {n: int(b) for n, b in named_leaves(budget) if b is not None}
    return identity


def _loop(
    job: Job,
    phase: str,
    state: Any,
    run,
    *,
    total_steps: int,
    steps_per_epoch: int,
    batches: data.TrainIterator,
    batch_size: int,
    ckpt: checkpoints.Checkpointer,
    learning_rate,
    evaluate_state,
    kept: int = 0,
) -> Any:
    """Runs `run(state, batch)` up to `total_steps`, resuming from `ckpt`, logging, evaluating."""
    c = job.config
    restored = ckpt.restore(state)
    epoch_churn: dict[str, int] = {}
    if restored is not None:
        state, extra, step = restored
        batches.set_state(extra["data"])
        epoch_churn = dict(extra.get("epoch_churn", {}))
        job.log.drop_after(phase, step)
        logging.info("%s: resumed from step %d in %s", phase, step, ckpt.directory)
    else:
        # A run killed before its first checkpoint starts afresh: its records go too.
        job.log.drop_after(phase, 0)
    step = int(jax.device_get(state.step))
    progress = Progress(phase, total_steps, job.is_main)
    window, window_start, window_steps = None, time.perf_counter(), 0
    while step < total_steps:
        state, metrics = run(state, job.shard(next(batches)))
        step += 1
        window = metrics if window is None else _accumulate(window, metrics)
        window_steps += 1
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if step % c.log_every_steps == 0 or end_of_epoch or ckpt.should_save(step):
            sums = jax.device_get(window)
            loss = float(sums["loss"]) / window_steps
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"{phase}: the loss became {loss} before step {step}; stopped (the last good "
                    f"checkpoint in {ckpt.directory} is intact). Lower the learning rate?"
                )
            seconds = time.perf_counter() - window_start
            record = {
                "phase": phase,
                "kind": "train",
                "step": step,
                "epoch": step / steps_per_epoch,
                "loss": loss,
                "accuracy": float(sums["accuracy"]) / window_steps,
                "learning_rate": float(learning_rate(step - 1)),
                "images_per_s": window_steps * batch_size / max(seconds, 1e-9),
            }
            if "churn" in sums:
                record["churn"] = int(sums["churn"])
                for name, n in sums["churn_per_layer"].items():
                    epoch_churn[name] = epoch_churn.get(name, 0) + int(n)
            job.log.write(record)
            progress.update(step, record["loss"], record["accuracy"], record["images_per_s"])
            window, window_start, window_steps = None, time.perf_counter(), 0
        if end_of_epoch:
            epoch = math.ceil(step / steps_per_epoch)
            if epoch_churn:
                job.log.write(
                    {
                        "phase": phase,
                        "kind": "churn",
                        "step": step,
                        "epoch": epoch,
                        "churn": sum(epoch_churn.values()),
                        "churn_per_layer": epoch_churn,
                        "kept": kept,
                    }
                )
                epoch_churn = {}
            every = c.eval.every_epochs
            if every and (epoch % every == 0 or step == total_steps):
                result = evaluate_state(state)
                job.log.write(
                    {"phase": phase, "kind": "eval", "step": step, "epoch": epoch, **result}
                )
                logging.info(
                    "%s epoch %d: test accuracy %.2f%%", phase, epoch, 100 * result["accuracy"]
                )
        if ckpt.should_save(step) or step == total_steps:
            extra = {"data": batches.get_state(), "epoch_churn": epoch_churn}
            ckpt.save(step, state, extra, force=step == total_steps)
    return state


def pretrain(job: Job) -> PyTree:
    """Dense training from scratch; returns the variables and saves them as the pre-trained."""
    c, p = job.config, job.config.pretrain
    steps_per_epoch = job.steps_per_epoch(p.batch_size)
    total_steps = p.epochs * steps_per_epoch
    lr = optax.cosine_decay_schedule(p.learning_rate, max(total_steps, 1))
    tx = optax.chain(
        optax.add_decayed_weights(p.weight_decay),
        optax.sgd(lr, momentum=p.momentum or None, nesterov=p.nesterov),
    )
    variables = _random_variables(job, c.seed)
    state = create_train_state(variables["params"], variables["batch_stats"], tx)
    ckpt = checkpoints.Checkpointer(
        os.path.join(job.workdir, "pretrain", "checkpoints"),
        identity=_identity(job, "pretrain"),
        save_every_steps=c.checkpoint.every_steps,
        keep=c.checkpoint.keep,
    )
    run = job.runner(train_step, model=job.model, tx=tx, label_smoothing=p.label_smoothing)
    try:
        state = _loop(
            job,
            "pretrain",
            state,
            run,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batches=job.train_batches(p.batch_size, c.seed, p.augment),
            batch_size=p.batch_size,
            ckpt=ckpt,
            learning_rate=lr,
            evaluate_state=lambda s: evaluate(
                job, {"params": s.params, "batch_stats": s.batch_stats}, None
            ),
        )
    finally:
        ckpt.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    _save_weights(job, variables, os.path.join(job.workdir, PRETRAINED))
    return variables


def _budget(job: Job, params: PyTree) -> PyTree:
    s = job.config.search
    return layer_budgets(params, s.sparsity, s.rule, dense=tuple(s.dense))


def _rate(config, total_steps: int):
    r = config.search.rate
    if r.schedule == "constant":
        return schedules.constant(r.value)
    if r.schedule == "cosine":
        return schedules.cosine(total_steps)
    return schedules.polynomial(total_steps, r.power)


def search(job: Job, variables: PyTree) -> tuple[Any, PyTree]:
    """The jackpot search; returns the final `SearchState` and its budget."""
    c, s = job.config, job.config.search
    params = variables["params"]
    budget = _budget(job, params)
    steps_per_epoch = job.steps_per_epoch(s.batch_size)
    total_steps = s.max_steps or s.epochs * steps_per_epoch
    if s.max_steps:
        steps_per_epoch = min(steps_per_epoch, total_steps)
    tx = search_optimizer(
        budget,
        learning_rate=s.learning_rate,
        momentum=s.momentum,
        weight_decay=s.weight_decay,
        total_steps=total_steps,
        rate=_rate(c, total_steps),
        rank_by=s.rank_by,
    )
    key_init, key_state = jax.random.split(jax.random.key(c.seed + 2))
    scores, _ = init_scores(params, budget, s.init, key_init, gap=s.gap, rank_by=s.rank_by)
    state = create_search_state(
        params, variables["batch_stats"], scores, tx, jax.random.key_data(key_state)
    )
    ckpt = checkpoints.Checkpointer(
        os.path.join(job.workdir, "search", "checkpoints"),
        identity=_identity(job, "search", budget),
        save_every_steps=c.checkpoint.every_steps,
        keep=c.checkpoint.keep,
    )
    run = job.runner(
        search_step, model=job.model, tx=tx, budget=budget, label_smoothing=s.label_smoothing
    )
    kept = sum(int(np.size(w)) - int(b) for (_, w), (_, b) in _pairs(params, budget))
    try:
        state = _loop(
            job,
            "search",
            state,
            run,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batches=job.train_batches(s.batch_size, c.seed + 3, s.augment),
            batch_size=s.batch_size,
            ckpt=ckpt,
            learning_rate=optax.cosine_decay_schedule(s.learning_rate, total_steps),
            evaluate_state=lambda st: evaluate(
                job, {"params": st.params, "batch_stats": st.batch_stats}, st.masks
            ),
            kept=kept,
        )
    finally:
        ckpt.close()
    return state, budget


def _pairs(params: PyTree, budget: PyTree) -> Iterator[tuple[tuple[str, Any], tuple[str, Any]]]:
    by_name = dict(named_leaves(budget))
    for name, w in named_leaves(params):
        if by_name.get(name) is not None:
            yield (name, w), (name, by_name[name])


# ---------------------------------------------------------------------------------------------
# Results and the entry point.


def _record_result(job: Job, row: Mapping[str, Any]) -> None:
    """Adds (or replaces, by `model`) a row of `<workdir>/results.json`."""
    logging.info("%s: accuracy %.2f%%", row["model"], 100 * row["accuracy"])
    if not job.is_main:
        return
    path = os.path.join(job.workdir, "results.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in json.load(f) if r["model"] != row["model"]]
    _write_json(path, [*rows, dict(row)])


def _results(job: Job) -> list[dict[str, Any]]:
    path = os.path.join(job.workdir, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def _export(job: Job, state, budget, metrics: Mapping[str, Any]) -> dict[str, str]:
    if not job.is_main:
        return {}
    return checkpoints.export_jackpot(
        os.path.join(job.workdir, "export"),
        variables={"params": state.params, "batch_stats": state.batch_stats},
        masks=jax.device_get(state.masks),
        model_name=job.model_name,
        budget=budget,
        config=job.config.to_dict(),
        metrics=metrics,
        scores=jax.device_get(state.scores),
        **job.model_kwargs,
    )


def run_prune(job: Job, variables: PyTree) -> PyTree:
    """Magnitude pruning at the search budget, no search: evaluated with and without BN re-est."""
    budget = _budget(job, variables["params"])
    _, masks = init_scores(variables["params"], budget, "magnitude")
    sparsity = sparsity_report(masks, variables["params"])["budgeted"]["sparsity"]
    result = evaluate(job, variables, masks)
    _record_result(
        job,
        {"model": "magnitude pruning", "sparsity": sparsity, "note": "no search", **result},
    )
    if job.config.prune.reestimate_bn and jax.tree.leaves(variables["batch_stats"]):
        stats = reestimate_batch_stats(job, variables, masks)
        result = evaluate(job, {**variables, "batch_stats": stats}, masks)
        _record_result(
            job,
            {
                "model": "magnitude pruning + BN re-estimation",
                "sparsity": sparsity,
                "note": f"no search; BN statistics from {job.config.prune.bn_batches} batches",
                **result,
            },
        )
    return masks


def run_search(job: Job, variables: PyTree) -> tuple[Any, PyTree, dict[str, Any]]:
    state, budget = search(job, variables)
    masks = state.masks
    result = evaluate(job, {"params": state.params, "batch_stats": state.batch_stats}, masks)
    sparsity = sparsity_report(jax.device_get(masks), state.params)["budgeted"]["sparsity"]
    s = job.config.search
    row = {
        "model": "jackpot (search)",
        "sparsity": sparsity,
        "note": f"{s.init} init, {s.rule} budget, {s.epochs} epochs",
        **result,
    }
    _record_result(job, row)
    _export(job, state, budget, row)
    return state, budget, row


def _write_report(job: Job, variables: PyTree, state, magnitude_masks: PyTree | None) -> str:
    masks = jax.device_get(state.masks)
    params = jax.device_get(variables["params"])
    from jackpots_jax.masks import mask_overlap

    overlap = None if magnitude_masks is None else mask_overlap(masks, magnitude_masks)
    records = report.read_metrics(job.log.path) if os.path.exists(job.log.path) else []
    c = job.config
    return report.write_report(
        job.workdir,
        title=f"Lottery jackpot: {job.model_name} on {c.dataset.name} at "
        f"{100 * c.search.sparsity:g}% sparsity",
        results=_results(job),
        sparsity=sparsity_report(masks, params),
        overlap=overlap,
        records=records,
        config=c.to_dict(),
        notes=[
            "Overlap: IoU of the kept weights of the jackpot and of magnitude pruning at the same "
            "budget; 'b_in_a' is the share of the magnitude mask's kept weights the jackpot keeps.",
        ],
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs `config.mode` in `workdir`; returns the accuracies measured (as in results.json).

    Raises:
      ConfigError: an unknown field or an impossible value (before any compute).
      FileNotFoundError: a missing dataset or missing pre-trained weights (before any compute).
      NonFiniteLossError: the loss became NaN or infinite.
    """
    job = _make_job(config, workdir)
    mode = config.mode
    if mode == "pretrain":
        variables = pretrain(job)
        _record_result(job, {"model": "dense", "sparsity": 0.0, **evaluate(job, variables, None)})
        return {"results": _results(job)}

    if mode == "jackpot" and not config.weights.random:
        if not os.path.exists(_weights_path(config, job.workdir)):
            if config.weights.path:
                load_weights(job)  # raises: the named file is missing
            logging.info("no pre-trained weights in %s: pre-training first", job.workdir)
            pretrain(job)
    variables, file_masks = load_weights(job)

    if mode == "evaluate":
        masks = (
            _load_masks(config.weights.masks, variables["params"])
            if config.weights.masks
            else file_masks
        )
        sparsity = 0.0
        if masks is not None:
            sparsity = sparsity_report(masks, variables["params"])["budgeted"]["sparsity"]
        _record_result(
            job,
            {"model": "evaluated", "sparsity": sparsity, **evaluate(job, variables, masks)},
        )
    elif mode == "prune":
        run_prune(job, variables)
    elif mode == "search":
        run_search(job, variables)
    elif mode == "export":
        state, budget = _restored_search_state(job, variables)
        _export(job, state, budget, {"step": int(state.step)})
    elif mode == "jackpot":
        _record_result(job, {"model": "dense", "sparsity": 0.0, **evaluate(job, variables, None)})
        magnitude = run_prune(job, variables)
        state, _, _ = run_search(job, variables)
        if job.is_main:
            path = _write_report(job, variables, state, jax.device_get(magnitude))
            print(report.results_table(_results(job)))
            print(f"\nreport: {path}")
    return {"results": _results(job)}


def _restored_search_state(job: Job, variables: PyTree):
    c, s = job.config, job.config.search
    budget = _budget(job, variables["params"])
    total = max(s.max_steps or s.epochs * job.steps_per_epoch(s.batch_size), 1)
    tx = search_optimizer(budget, total_steps=total, rate=_rate(c, total), rank_by=s.rank_by)
    scores, _ = init_scores(variables["params"], budget, "magnitude", gap=s.gap, rank_by=s.rank_by)
    target = create_search_state(
        variables["params"],
        variables["batch_stats"],
        scores,
        tx,
        jax.random.key_data(jax.random.key(0)),
    )
    ckpt = checkpoints.Checkpointer(
        os.path.join(job.workdir, "search", "checkpoints"),
        identity=_identity(job, "search", budget),
        save_every_steps=c.checkpoint.every_steps,
        keep=c.checkpoint.keep,
    )
    try:
        restored = ckpt.restore(target)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(
            f"no search checkpoint in {os.path.join(job.workdir, 'search', 'checkpoints')}: "
            "run `--config.mode=search` first"
        )
    return restored[0], budget
