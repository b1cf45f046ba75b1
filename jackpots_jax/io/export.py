"""What a finished search leaves behind: its masks, its masked weights and a JSON summary.

`export_jackpot` writes four files into a folder, each under a temporary name renamed into place
(`io.files.atomic_path`), so a reader never sees a half-written one:

- `masks.npz`: one bool array per masked leaf, keyed by its path (`'conv1/kernel'`); read back with
  `masks_from_npz`;
- `batch_stats.npz`: the running batch-norm statistics the jackpot is evaluated with, one float32
  array per leaf of `batch_stats`, keyed by its path (`'bn1/mean'`, `'bn1/var'`); read back with
  `batch_stats_from_npz`. A search changes no weight, but it re-estimates these statistics (in
  train mode, like the reference code): the pre-trained weights with `masks.npz` reproduce the
  jackpot's accuracy only with these statistics, not with the pre-trained ones. (Empty for a
  model without batch norm.)
- `jackpot.safetensors`: `W * M`, the masks and the batch-norm statistics as a PyTorch-style state
  dict (`io.weights.export_state_dict`; `io.weights.import_checkpoint` reads it back);
- `jackpot.json`: model, config, the sparsity `pattern` of the budget (`unstructured`, `2:4`,
  `block:8`, ...), the pruned count per layer (`budget`), the sparsity of the masks
  (`sparsity_report`), the final metrics and the fingerprint of the pre-trained weights;
- under an N:M pattern also `jackpot_<N>of<M>.safetensors`: the N:M layers as PyTorch `[out, in]`
  weights `W * M` with their masks, the layout `torch.sparse.to_sparse_semi_structured` takes
  (`io.nm_export.write_nm`; read back with `read_nm`).

Scores are written into the state dict only where they have their kernel's shape: `block:B` and
`channel` searches keep one score per tile, which no PyTorch layer has a place for (their masks,
which are per weight, are written as always).

Example:
  >>> paths = export_jackpot("workdir/export", variables=variables, masks=state.masks,
  ...                        model_name="fmnist_cnn", budget=budget, config=config,
  ...                        metrics={"accuracy": 0.92})
  >>> masks = masks_from_npz(paths["masks"], budget)
  >>> stats = batch_stats_from_npz(paths["batch_stats"], variables["batch_stats"])
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jackpots_jax._tree import is_none, named_leaves, path_str
from jackpots_jax.io import nm_export, weights
from jackpots_jax.io.errors import CheckpointMismatchError, FileContentError
from jackpots_jax.io.files import atomic_path, json_round_trip, write_json
from jackpots_jax.patterns import is_structured
from jackpots_jax.sparsity import sparsity_report

PyTree = Any

# 2: `batch_stats.npz` next to `masks.npz`.
FORMAT_VERSION = 2
BATCH_STATS = "batch_stats.npz"


def _masked_leaves(tree: PyTree) -> dict[str, Any]:
    return {name: leaf for name, leaf in named_leaves(tree) if leaf is not None}


def export_jackpot(
    directory: str | os.PathLike,
    *,
    variables: PyTree,
    masks: PyTree,
    model_name: str,
    budget: PyTree,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    scores: PyTree | None = None,
    fingerprint: str | None = None,
    **model_kwargs,
) -> dict[str, str]:
    """Writes a searched jackpot: its masks, its masked weights and a JSON summary.

    Args:
      directory: the output folder (created if missing).
      variables: `{'params', 'batch_stats'}` of the model: the frozen pre-trained params and the
        running statistics the jackpot is evaluated with.
      masks: the jackpot's masks (`state.masks`): bool arrays at masked leaves, `None` elsewhere.
      model_name: the registered model name (`jackpots_jax.models.names()`).
      budget: the budget the search ran with (pruned counts per leaf; `None` at unmasked leaves).
      config: the run's config (a dict or `ConfigDict`), JSON-able.
      metrics: final metrics (e.g. `{'accuracy': 0.91}`), JSON-able.
      scores: optional scores, also written into the state dict as `<layer>.mask`.
      fingerprint: the `io.checkpoints.fingerprint` of the pre-trained params, recorded in the
        summary as `weights_fingerprint` (the masks mean nothing without their weights).
      **model_kwargs: model options passed to `models.create` (e.g. `width`).

    Returns:
      `{'masks': path, 'batch_stats': path, 'safetensors': path, 'json': path}`, and `'nm'`
      (the N:M file) when the budget holds N:M entries.

    Raises:
      ValueError: `masks` holds no mask.
      TypeError: `config` or `metrics` is not JSON-able.
    """
    directory = os.fspath(directory)
    flat_masks = {name: np.asarray(m).astype(bool) for name, m in _masked_leaves(masks).items()}
    if not flat_masks:
        raise ValueError("`masks` holds no mask (every leaf is None): nothing to export")
    entries = _masked_leaves(budget)
    patterns = sorted({str(e.pattern) for e in entries.values() if is_structured(e)})
    summary = {
        "format": FORMAT_VERSION,
        "model": model_name,
        "model_kwargs": model_kwargs,
        "config": config,
        "pattern": ",".join(patterns) or "unstructured",
        "budget": {name: int(count) for name, count in _masked_leaves(budget).items()},
        "sparsity": sparsity_report(masks, variables["params"]),
        "metrics": metrics,
    }
    if fingerprint is not None:
        summary["weights_fingerprint"] = fingerprint
    summary = json_round_trip(summary, "config/metrics")
    paths = {
        "masks": os.path.join(directory, "masks.npz"),
        "batch_stats": os.path.join(directory, BATCH_STATS),
        "safetensors": os.path.join(directory, "jackpot.safetensors"),
        "json": os.path.join(directory, "jackpot.json"),
    }
    flat_stats = {
        name: np.asarray(x, np.float32) for name, x in named_leaves(variables["batch_stats"])
    }
    with atomic_path(paths["masks"]) as tmp, open(tmp, "wb") as f:
        np.savez(f, **flat_masks)  # a file object: np.savez appends no suffix
    with atomic_path(paths["batch_stats"]) as tmp, open(tmp, "wb") as f:
        np.savez(f, **flat_stats)
    if scores is not None:
        scores = _kernel_shaped(scores, variables["params"])
    weights.export_state_dict(
        variables, masks, model_name, paths["safetensors"], scores=scores, **model_kwargs
    )
    nm = [e.pattern for e in entries.values() if is_structured(e) and e.kind == "n:m"]
    if nm:
        pattern = nm[0]
        paths["nm"] = os.path.join(directory, f"jackpot_{pattern.n}of{pattern.m}.safetensors")
        kernels, nm_masks, axes = nm_export.nm_layers(variables["params"], masks, budget)
        nm_export.write_nm(paths["nm"], kernels, nm_masks, pattern=pattern, input_axes=axes)
    write_json(paths["json"], summary)
    return paths


def _kernel_shaped(scores: PyTree, params: PyTree) -> PyTree:
    """`scores` with `None` where a leaf is not its weight's shape (one score per tile)."""
    return jax.tree.map(
        lambda s, w: s if s is not None and np.shape(s) == np.shape(w) else None,
        scores,
        params,
        is_leaf=is_none,
    )


def masks_from_npz(path: str | os.PathLike, like: PyTree, *, exact: bool = True) -> PyTree:
    """Reads a `masks.npz` back into the structure of `like`.

    Args:
      path: the file (`export_jackpot`'s `masks.npz`, or any `.npz` of bool arrays keyed by leaf
        path).
      like: a tree whose structure the masks take: a budget or a masks tree (its non-`None` leaves
        are the masked ones), or the params themselves (with `exact=False`).
      exact: the file must hold a mask for every non-`None` leaf of `like`; with `False` it may
        hold masks for only some of them (the others come back `None`).

    Returns:
      `like`'s structure with bool arrays at the masked leaves and `None` elsewhere.

    Raises:
      CheckpointMismatchError: the file's keys or shapes do not fit `like` (all listed).
      FileContentError: the file is not a readable `.npz`, or a mask holds values other than 0
        and 1 (a 0.5 would otherwise be read as True).
    """
    stored = _read_npz(path, "masks")
    not_binary = [
        (k, v[(v != 0) & (v != 1)].flat[0].item())
        for k, v in stored.items()
        if v.dtype != bool and np.any((v != 0) & (v != 1))
    ]
    if not_binary:
        listed = ", ".join(f"{k} (e.g. {v!r})" for k, v in not_binary[:5])
        raise FileContentError(
            f"masks file {os.fspath(path)} holds values other than 0 and 1 at {listed}: a mask "
            "says which weights are kept (1) and which are pruned (0); threshold your values "
            "into a bool array first"
        )
    wanted = _masked_leaves(like)
    missing = [k for k in wanted if k not in stored] if exact else []
    unexpected = [k for k in stored if k not in wanted]
    mismatched = [
        (k, tuple(stored[k].shape), tuple(np.shape(v)))
        for k, v in wanted.items()
        if k in stored and np.ndim(v) and np.shape(v) != stored[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"masks file {os.fspath(path)} does not match the masked leaves",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )

    def leaf(p, x):
        name = path_str(p)
        return None if x is None or name not in stored else stored[name].astype(bool)

    return jax.tree_util.tree_map_with_path(leaf, like, is_leaf=is_none)


def batch_stats_from_npz(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Reads a `batch_stats.npz` (`export_jackpot`'s) back into the structure of `like`.

    Args:
      path: the file: one array per leaf of the model's `batch_stats`, keyed by its path.
      like: the model's `batch_stats` (arrays or `ShapeDtypeStruct`s); the file must hold every
        leaf of it, with its shape, and nothing else.

    Returns:
      `like`'s structure with the file's float32 arrays.

    Raises:
      CheckpointMismatchError: the file's keys or shapes do not fit `like` (all listed).
      FileContentError: the file is not a readable `.npz`, or holds NaN or infinite values.
    """
    stored = _read_npz(path, "batch-norm statistics")
    wanted = dict(named_leaves(like))
    mismatched = [
        (k, tuple(stored[k].shape), tuple(np.shape(v)))
        for k, v in wanted.items()
        if k in stored and np.shape(v) != stored[k].shape
    ]
    missing = [k for k in wanted if k not in stored]
    unexpected = [k for k in stored if k not in wanted]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"batch-norm statistics file {os.fspath(path)} does not match the model's batch_stats",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    bad = [k for k, v in stored.items() if not np.all(np.isfinite(v))]
    if bad:
        raise FileContentError(
            f"batch-norm statistics file {os.fspath(path)} holds NaN or infinite values at "
            f"{', '.join(bad[:5])}"
        )
    return jax.tree_util.tree_map_with_path(
        lambda p, _: stored[path_str(p)].astype(np.float32), like
    )


def _read_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} file at {path!r}") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as err:
        raise FileContentError(
            f"{what} file {path!r} is not a readable .npz ({' '.join(str(err).split())[:200]})"
        ) from None
