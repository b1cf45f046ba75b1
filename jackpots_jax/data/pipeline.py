"""Training and evaluation iterators: grain pipelines over the tfds data sources.

Both iterators are grain `MapDataset` pipelines over batches of example *indices*, so every batch
is a pure function of its position in the stream:

    range(batches per epoch) -> repeat forever -> map_with_index(the example positions of batch
      t: a slice of epoch t // batches' permutation) -> random_map(load + augment, seed)
      -> to_iter_dataset (prefetch threads) -> get_state / set_state

Loading a batch gathers its examples, pre-processes them and normalises them. Small fixed-size
datasets (Fashion-MNIST, MNIST, CIFAR) are read once into memory as decoded uint8 arrays (60k
Fashion-MNIST images are 47 MB) and augmented a whole batch at a time with one numpy gather, so
the training pipeline stays far cheaper than the model step even on a 2-core CPU; ImageNet-like
datasets are read from the array_record files batch by batch and decoded image by image in
`num_threads` prefetch threads (PIL releases the GIL while decoding and resizing).

Sharding: with `P` hosts, training batch `t` is the same global batch whatever `P` is (a slice
of the epoch's permutation of all examples, augmented with draws made for the whole global batch
from one seed), and host `p` loads its rows `[p * B / P, (p + 1) * B / P)` of it; so a search on
several hosts trains on exactly the batches of a one-host run. Evaluation gives host `p` the
examples `[p * n // P, (p + 1) * n // P)` and pads every host to the same number of batches of
the same shape, with a `mask` that is False on padding, so every example is counted exactly once
over all hosts.

Determinism and resumption: the order of epoch `e` and the augmentation of batch `t` depend only
on `(seed, e)` and `(seed, t)` (the last partial batch of every epoch is dropped), so restoring
the iterator's state (`get_state`, a JSON-serialisable dict) resumes with exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_dtypes
import numpy as np

from jackpots_jax.data import augment as augment_lib
from jackpots_jax.data.datasets import (
    IMAGENET_SIZE,
    DatasetInfo,
    check_num_examples,
    check_positive,
    data_source,
    prepare,
    spec,
)

Batch = dict[str, np.ndarray]
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The default prefetch threads of the record-reading (ImageNet-like) pipelines; the in-memory
# ones use one thread, which overlaps loading with the model step without competing for cores.
DEFAULT_STREAMING_THREADS = min(8, os.cpu_count() or 1)
STATE_VERSION = 1


def _dtype(dtype: Any) -> np.dtype:
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.name not in _DTYPES:
        raise ValueError(f"`dtype` must be float32 or bfloat16, got {dtype!r}")
    return _DTYPES[d.name]


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    check_positive(count, "process_count")
    if (
        isinstance(index, bool)
        or not isinstance(index, (int, np.integer))
        or not 0 <= index < count
    ):
        raise ValueError(f"`process_index` must be in [0, {count}) (process_count), got {index!r}")
    return int(index), int(count)


def local_batch_size(
    global_batch_size: int, process_count: int, local_device_count: int | None = None
) -> int:
    """The batch one host yields: `global_batch_size / process_count`, whole per local device.

    Args:
      global_batch_size: the batch over all hosts and devices.
      process_count: the number of hosts.
      local_device_count: devices per host; None for `jax.local_device_count()`.

    Returns:
      The per-host batch size.

    Raises:
      ValueError: a batch that does not split evenly over the hosts and their devices.
    """
    check_positive(global_batch_size, "global_batch_size")
    devices = jax.local_device_count() if local_device_count is None else local_device_count
    check_positive(devices, "local_device_count")
    if global_batch_size % (process_count * devices):
        raise ValueError(
            f"`global_batch_size` {global_batch_size} must be a multiple of the number of devices, "
            f"{process_count} host(s) x {devices} device(s) = {process_count * devices}"
        )
    return global_batch_size // process_count


def eval_layout(n: int, process_index: int, process_count: int, local_batch: int):
    """Where a host's evaluation examples are and how many batches every host yields.

    Args:
      n: the number of examples evaluated.
      process_index, process_count: this host and the number of hosts.
      local_batch: the per-host batch size.

    Returns:
      `(start, stop, num_batches)`: this host's examples are `[start, stop)`; every host yields
      `num_batches` batches, `ceil(ceil(n / process_count) / local_batch)`, padded past `stop`.
    """
    start = process_index * n // process_count
    stop = (process_index + 1) * n // process_count
    largest = -(-n // process_count)
    return start, stop, max(1, -(-largest // local_batch))


class _Split:
    """Random access to the examples `[start, stop)` of one split, by position from `start`.

    Small datasets hold them decoded in memory (uint8 images, int32 labels); the others read and
    decode records from the array_record files on demand.
    """

    def __init__(self, info: DatasetInfo, split: str, start: int, stop: int):
        self.in_memory = spec(info.name)[0].recipe == "small"
        self.start = start
        if self.in_memory:
            self.images, self.labels = _load_in_memory(info, split, start, stop)
        else:
            self.source = data_source(info, split)

    def records(self, positions: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """The decoded images (each uint8 [H, W, C]) and int32 labels of record-read datasets."""
        examples = self.source.__getitems__([self.start + int(p) for p in positions])
        images = [np.asarray(e["image"]) for e in examples]
        labels = np.asarray([e["label"] for e in examples], dtype=np.int32)
        return images, labels


@functools.lru_cache(maxsize=4)
def _load_in_memory(info: DatasetInfo, split: str, start: int, stop: int):
    """Decodes the examples `[start, stop)` of a small dataset's split (read-only, cached)."""
    source = data_source(info, split)
    images = np.empty((stop - start, *info.image_shape), dtype=np.uint8)
    labels = np.empty((stop - start,), dtype=np.int32)
    chunk = 4096
    for lo in range(start, stop, chunk):
        hi = min(stop, lo + chunk)
        examples = source.__getitems__(list(range(lo, hi)))
        images[lo - start : hi - start] = np.stack([e["image"] for e in examples])
        labels[lo - start : hi - start] = [e["label"] for e in examples]
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _train_loader(
    info: DatasetInfo,
    split: _Split,
    augmented: bool,
    dtype: np.dtype,
    rows: tuple[int, int, int] | None = None,
) -> Callable[[np.ndarray, np.random.Generator], Batch]:
    """Loads this host's rows of a global batch; `rows = (first, count, global_batch)`.

    The augmentation's random draws are made for the whole global batch, from one seed shared
    by all hosts, and this host takes its rows of them: a run on P hosts trains on the batches,
    augmentation included, of a run on one host.
    """
    s, _ = spec(info.name)

    def load(indices: np.ndarray, rng: np.random.Generator) -> Batch:
        first, count, total = rows or (0, len(indices), len(indices))
        if split.in_memory:
            images = split.images[indices]
            labels = split.labels[indices]
            if augmented:
                offsets, flips = augment_lib.crop_and_flip_draws(rng, total, s.padding, s.flip)
                part = slice(first, first + count)
                images = augment_lib.crop_and_flip(images, offsets[part], flips[part], s.padding)
        else:
            raw, labels = split.records(indices)
            if augmented:
                # One seed per row of the global batch; this host's rows taken.
                seeds = rng.integers(0, 2**63, size=total)[first : first + count]
                crops = [
                    augment_lib.random_resized_crop(im, np.random.default_rng(k), IMAGENET_SIZE)
                    for im, k in zip(raw, seeds, strict=True)
                ]
            else:
                crops = [augment_lib.resize_and_center_crop(im, 256, IMAGENET_SIZE) for im in raw]
            images = np.stack(crops)
        return {"image": augment_lib.normalize(images, s.mean, s.std, dtype), "label": labels}

    return load


def _eval_loader(
    info: DatasetInfo, split: _Split, count: int, local_batch: int, dtype: np.dtype
) -> Callable[[int], Batch]:
    s, _ = spec(info.name)
    h, w, c = info.image_shape

    def load(batch_index: int) -> Batch:
        positions = batch_index * local_batch + np.arange(local_batch)
        mask = positions < count
        valid = positions[mask]
        images = np.zeros((local_batch, h, w, c), dtype=dtype)
        labels = np.zeros((local_batch,), dtype=np.int32)
        if valid.size:
            if split.in_memory:
                raw, lab = split.images[valid], split.labels[valid]
            else:
                decoded, lab = split.records(valid)
                raw = np.stack(
                    [augment_lib.resize_and_center_crop(im, 256, IMAGENET_SIZE) for im in decoded]
                )
            # Valid examples come first in every batch, padding only at the end.
            images[: valid.size] = augment_lib.normalize(raw, s.mean, s.std, dtype)
            labels[: valid.size] = lab
        return {"image": images, "label": labels, "mask": mask}

    return load


def _seed(seed: int, *tags: int) -> int:
    """A 32-bit seed for one use of the user's seed (grain wants seeds below 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}")
    return int(np.random.SeedSequence([int(seed), *tags]).generate_state(1)[0])


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which one epoch visits the `n` examples of a shard (read-only, cached).

    One vectorised permutation per epoch instead of a shuffled index per example: grain's
    element-wise `shuffle` costs about 20 us of Python per example, two thirds of the whole
    Fashion-MNIST pipeline.

    Args:
      seed: the shuffle seed.
      epoch: the epoch number (from 0).
      n: the number of examples.

    Returns:
      int64 `[n]`, a permutation of `range(n)`, different for every `(seed, epoch)`.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def _read_options(in_memory: bool, num_threads: int | None) -> grain.ReadOptions:
    threads = (
        (1 if in_memory else DEFAULT_STREAMING_THREADS) if num_threads is None else num_threads
    )
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"`num_threads` must be a non-negative integer, got {num_threads!r}")
    # Every element is a whole batch: a deep buffer would hold hundreds of them in memory.
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads))


class TrainIterator(Iterator[Batch]):
    """An endless iterator of training batches whose position can be saved and restored.

    `get_state()` returns a JSON-serialisable dict: grain's iterator state (`next_index`, the
    number of batches taken) and a description of the pipeline, which `set_state` checks so that
    a state is never applied to a different stream (another seed, batch size, host count, ...).

    Attributes:
      steps_per_epoch: batches per epoch (equal on every host).
      local_batch_size: the batch size this host yields.
    """

    def __init__(self, iterator, pipeline: dict[str, Any], steps: int, local_batch: int):
        self._iterator = iterator
        self._pipeline = pipeline
        self.steps_per_epoch = steps
        self.local_batch_size = local_batch

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position: `{"next_index": int, "pipeline": {...}, "version": 1}` (JSON types)."""
        state = self._iterator.get_state()
        return {
            "version": STATE_VERSION,
            "next_index": int(state["next_index"]),
            "pipeline": dict(self._pipeline),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position `get_state` returned (also after a JSON round trip).

        Raises:
          ValueError: a state of another format, or of a pipeline with other settings.
        """
        if not isinstance(state, dict) or not {"next_index", "pipeline"} <= set(state):
            raise ValueError(
                "iterator state must be a dict with keys 'next_index' and 'pipeline' (as "
                f"get_state returns), got {state!r}"
            )
        if state.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(
                f"iterator state version {state.get('version')!r}; this code reads {STATE_VERSION}"
            )
        theirs = dict(state["pipeline"])
        differ = sorted(
            k for k in set(theirs) | set(self._pipeline) if theirs.get(k) != self._pipeline.get(k)
        )
        if differ:
            detail = ", ".join(
                f"{k}: saved {theirs.get(k)!r}, now {self._pipeline.get(k)!r}" for k in differ
            )
            raise ValueError(f"iterator state belongs to another input pipeline ({detail})")
        next_index = state["next_index"]
        if isinstance(next_index, bool) or not isinstance(next_index, int) or next_index < 0:
            raise ValueError(
                f"iterator state 'next_index' must be a non-negative int, got {next_index!r}"
            )
        self._iterator.set_state({"next_index": next_index})


def train_iterator(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    global_batch_size: int,
    seed: int,
    augment: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    num_examples: int | None = None,
    dtype: Any = np.float32,
    local_device_count: int | None = None,
    num_threads: int | None = None,
) -> TrainIterator:
    """Endless training batches: epoch after epoch, reshuffled each epoch, last partial dropped.

    Args:
      name: a dataset name (see `prepare`); Fashion-MNIST is built on first use.
      data_dir: the tfds data directory; None for `default_data_dir()`.
      global_batch_size: the batch over all hosts; each host yields `global_batch_size /
        process_count` examples, a multiple of its device count.
      seed: the seed of the shuffle and the augmentation (a non-negative integer).
      augment: apply the dataset's training augmentation (see `augment`); without it training
        batches are pre-processed as evaluation ones.
      process_index, process_count: this host and the number of hosts; None for
        `jax.process_index()` / `jax.process_count()`.
      num_examples: use only the first N examples of the training split (None: all).
      dtype: float32 or bfloat16 images.
      local_device_count: devices per host for the divisibility check; None for
        `jax.local_device_count()`.
      num_threads: prefetch threads (None: 1 for in-memory datasets,
        `DEFAULT_STREAMING_THREADS` for ImageNet-like ones; 0 loads in the calling thread).

    Returns:
      A `TrainIterator` of `{"image": [local_batch, H, W, C] dtype, "label": int32 [local_batch]}`.

    Example:
      >>> it = train_iterator("fashion_mnist", global_batch_size=256, seed=0)
      >>> batch = next(it); state = it.get_state()
    """
    info = prepare(name, data_dir)
    out_dtype = _dtype(dtype)
    index, count = _hosts(process_index, process_count)
    local_batch = local_batch_size(global_batch_size, count, local_device_count)
    n = check_num_examples(info.num_train, num_examples, info.train_split)
    steps = n // global_batch_size
    if steps == 0:
        raise ValueError(
            f"`global_batch_size` {global_batch_size} exceeds the {n} training examples of "
            f"{name!r}: an epoch has no complete batch"
        )
    split = _Split(info, info.train_split, 0, n)
    first = index * local_batch
    load = _train_loader(
        info, split, augment, out_dtype, rows=(first, local_batch, global_batch_size)
    )
    shuffle_seed = _seed(seed, 0)

    def positions(step: int, batch_in_epoch: int) -> np.ndarray:
        # Global batch `batch_in_epoch` of the epoch's order over all n examples; this host's rows.
        order = epoch_permutation(shuffle_seed, step // steps, n)
        start = batch_in_epoch * global_batch_size + first
        return order[start : start + local_batch]

    # `repeat` passes the global step down as the element index: one order per epoch, a fresh
    # augmentation per step, both pure functions of the step, hence resumable from a step count.
    ds = (
        grain.MapDataset.range(steps)
        .repeat(None)
        .map_with_index(positions)
        .random_map(load, seed=_seed(seed, 1, 0))  # one stream for all hosts: see load
    )
    iterator = ds.to_iter_dataset(_read_options(split.in_memory, num_threads)).__iter__()
    pipeline = {
        "dataset": name,
        "split": info.train_split,
        "num_examples": n,
        "seed": int(seed),
        "global_batch_size": int(global_batch_size),
        "process_count": count,
        "augment": bool(augment),
    }
    return TrainIterator(iterator, pipeline, steps, local_batch)


def eval_iterator(
    name: str,
    split: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_examples: int | None = None,
    dtype: Any = np.float32,
    local_device_count: int | None = None,
    num_threads: int | None = None,
) -> Iterator[Batch]:
    """One pass over a split, in order, every example exactly once over all hosts.

    Every host yields the same number of batches (`eval_steps`) of the same shape; examples past
    the end of a host's share are padding (zero images, label 0) with `mask` False.

    Args:
      name: a dataset name (see `prepare`).
      split: the split (None: the dataset's evaluation split, `test` or `validation`).
      data_dir: the tfds data directory; None for `default_data_dir()`.
      global_batch_size: the batch over all hosts (see `train_iterator`).
      process_index, process_count: this host and the number of hosts (None: from jax).
      num_examples: evaluate only the first N examples of the split (None: all).
      dtype: float32 or bfloat16 images.
      local_device_count: devices per host for the divisibility check (None: from jax).
      num_threads: prefetch threads (as in `train_iterator`).

    Returns:
      An iterator of `{"image": [local_batch, H, W, C], "label": int32 [local_batch],
      "mask": bool [local_batch]}`.

    Example:
      >>> correct = sum(((predict(b["image"]) == b["label"]) & b["mask"]).sum()
      ...               for b in eval_iterator("fashion_mnist", global_batch_size=500))
    """
    info = prepare(name, data_dir)
    out_dtype = _dtype(dtype)
    split = info.eval_split if split is None else split
    if split not in info.split_sizes:
        raise ValueError(
            f"dataset {name!r} has no split {split!r}; splits: {sorted(info.split_sizes)}"
        )
    index, count = _hosts(process_index, process_count)
    local_batch = local_batch_size(global_batch_size, count, local_device_count)
    n = check_num_examples(info.split_sizes[split], num_examples, split)
    start, stop, num_batches = eval_layout(n, index, count, local_batch)
    examples = _Split(info, split, start, stop)
    load = _eval_loader(info, examples, stop - start, local_batch, out_dtype)
    ds = grain.MapDataset.range(num_batches).map(load)
    return ds.to_iter_dataset(_read_options(examples.in_memory, num_threads)).__iter__()


def eval_steps(
    info: DatasetInfo,
    global_batch_size: int,
    split: str | None = None,
    process_count: int | None = None,
    num_examples: int | None = None,
) -> int:
    """The number of batches `eval_iterator` yields on every host.

    Args:
      info: from `prepare`.
      global_batch_size: the batch over all hosts.
      split: the split (None: `info.eval_split`).
      process_count: the number of hosts (None: `jax.process_count()`).
      num_examples: the first N examples only (None: all).

    Returns:
      `ceil(ceil(n / process_count) / (global_batch_size / process_count))`.
    """
    split = info.eval_split if split is None else split
    if split not in info.split_sizes:
        raise ValueError(
            f"dataset {info.name!r} has no split {split!r}; splits: {sorted(info.split_sizes)}"
        )
    _, count = _hosts(0, process_count)
    check_positive(global_batch_size, "global_batch_size")
    if global_batch_size % count:
        raise ValueError(
            f"`global_batch_size` {global_batch_size} must be a multiple of process_count {count}"
        )
    n = check_num_examples(info.split_sizes[split], num_examples, split)
    return eval_layout(n, 0, count, global_batch_size // count)[2]
