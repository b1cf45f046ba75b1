"""Checkpoints of a running search (resume), and the export of a finished jackpot.

`Checkpointer` wraps an orbax `CheckpointManager`. Each checkpoint holds three items:

- `state`: the state pytree (a `SearchState` or `TrainState`, optax states and the masks that the
  short restriction owns included), written by orbax as it is: every dtype is kept (int32 step,
  uint32 or typed PRNG keys, bool masks) and `None` leaves stay `None`;
- `extra`: a JSON dict of the caller's (the data iterator's position, the metrics so far, ...);
- `meta`: JSON that says what the checkpoint belongs to (`identity`), the layout of the state
  (path, shape and dtype of every leaf) and a CRC-32 of every leaf's bytes.

`restore` refuses a checkpoint of another run (another model, budget, ...) with a
`CheckpointMismatchError` naming each differing field, and steps back over a newest checkpoint that
cannot be read or whose bytes do not match their checksums (a file truncated or garbled after it was
written): it logs why and restores the previous good one.

`export_jackpot` writes what a finished search found: the masks (`masks.npz`), the masked weights as
a PyTorch-style state dict (`jackpot.safetensors`) and a summary (`jackpot.json`).

Example:
  >>> ckpt = Checkpointer(workdir / "checkpoints", identity={"model": "resnet20", ...},
  ...                     save_every_steps=1000)
  >>> restored = ckpt.restore(state)
  >>> if restored is not None:
  ...   state, extra, step = restored
  ...   data.set_state(extra["data"])
  >>> ...
  >>> ckpt.save(step, state, {"data": data.get_state()})
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jackpots_jax import convert
from jackpots_jax._tree import is_none, named_leaves, path_str
from jackpots_jax.sparsity import sparsity_report

PyTree = Any

FORMAT_VERSION = 1
QUARANTINE = "corrupt"  # subfolder that receives checkpoints found unreadable
_STATE, _EXTRA, _META = "state", "extra", "meta"
_ABSENT = "<absent>"
_SHOWN = 25


class CheckpointMismatchError(convert.CheckpointMismatchError):
    """A checkpoint belongs to another run, or its state does not have the target's layout.

    Attributes:
      fields: `(field, in checkpoint, now)` for every differing identity field (dotted paths into
        the identity dict, e.g. `budget.conv1/kernel`).
      missing: state leaves the target has and the checkpoint lacks.
      unexpected: state leaves of the checkpoint the target has no place for.
      mismatched: `(leaf, in checkpoint, in target)` for every shape / dtype disagreement.
    """

    def __init__(
        self,
        subject: str,
        *,
        fields: list[tuple[str, Any, Any]] = (),
        missing: list[str] = (),
        unexpected: list[str] = (),
        mismatched: list[tuple[str, str, str]] = (),
    ):
        self.fields = list(fields)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        lines = [subject]
        for name, saved, now in self.fields[:_SHOWN]:
            lines.append(f"  {name}: checkpoint {_show(saved)}, now {_show(now)}")
        if len(self.fields) > _SHOWN:
            lines.append(f"  ... and {len(self.fields) - _SHOWN} more field(s)")
        lines += convert._listing("missing in checkpoint", self.missing)
        lines += convert._listing("not in target", self.unexpected)
        lines += convert._listing(
            "shape/dtype mismatches (checkpoint vs target)",
            [f"{k}: {saved} vs {want}" for k, saved, want in self.mismatched],
        )
        ValueError.__init__(self, "\n".join(lines))


class CheckpointCorruptError(RuntimeError):
    """Every checkpoint in the directory is unreadable or fails its checksums.

    Attributes:
      failures: `(step, reason)` for every checkpoint tried, newest first.
    """

    def __init__(self, directory: str, failures: list[tuple[int, str]]):
        self.failures = list(failures)
        detail = "\n".join(f"  step {step}: {reason}" for step, reason in self.failures)
        super().__init__(
            f"no readable checkpoint in {directory} (delete the directory to start afresh):\n"
            + detail
        )


def _reason(what: str, err: BaseException) -> str:
    """A one-line reason for a log message (tensorstore errors carry pages of spec)."""
    text = " ".join(str(err).split())
    return f"{what}: {type(err).__name__}: {text if len(text) <= 300 else text[:297] + '...'}"


def _show(value: Any) -> str:
    if value is _ABSENT:
        return value
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------
# JSON


def _json_default(what: str) -> Callable[[Any], Any]:
    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (np.ndarray, jax.Array)):
            return np.asarray(obj).tolist()
        if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
            return obj.to_dict()
        if isinstance(obj, Mapping):
            return dict(obj)
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(
            f"`{what}` must be JSON-serialisable (dicts, lists, str, numbers, bool, None; numpy "
            f"scalars and arrays are converted), found {type(obj).__name__}: {obj!r:.100}"
        )

    return default


def _to_json(obj: Any, what: str) -> Any:
    """`obj` as it comes back from a JSON round trip (tuples -> lists, keys -> str, ...)."""
    return json.loads(json.dumps(obj, default=_json_default(what), allow_nan=True))


def _flatten_json(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `{dotted.path: value}`; lists and scalars are values."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten_json(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def _identity_diff(saved: Any, now: Any) -> list[tuple[str, Any, Any]]:
    a, b = _flatten_json(saved), _flatten_json(now)
    return [
        (key, a.get(key, _ABSENT), b.get(key, _ABSENT))
        for key in sorted(set(a) | set(b))
        if a.get(key, _ABSENT) != b.get(key, _ABSENT)
    ]


# ---------------------------------------------------------------------------------------------
# Leaves: layout, checksums, restore targets


def _leaves(tree: PyTree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def _describe(leaf: Any) -> str | None:
    """`'float32[3,3,2,4]'`, `'key<fry>[]'`; `None` for a `None` leaf."""
    if leaf is None:
        return None
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return f"{dtype}[{','.join(str(d) for d in np.shape(leaf))}]"


def _layout(tree: PyTree) -> dict[str, str | None]:
    return {path: _describe(leaf) for path, leaf in _leaves(tree)}


def _host_bytes(leaf: Any) -> np.ndarray | None:
    """The leaf's values on this host, or `None` when no single device holds all of them."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                return None
            leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(np.asarray(leaf))


def _checksums(tree: PyTree) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for path, leaf in _leaves(tree):
        if leaf is not None:
            data = _host_bytes(leaf)
            out[path] = None if data is None else zlib.crc32(data.view(np.uint8).ravel())
    return out


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """What orbax restores a leaf as: shape, dtype and sharding of the target's leaf."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(leaf, jax.ShapeDtypeStruct | jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    leaf = np.asarray(leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


# ---------------------------------------------------------------------------------------------
# Checkpointer


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return int(value)


class Checkpointer:
    """Saves and restores the state of a search (or dense training) with orbax, to resume it.

    Every checkpoint records `identity`, a JSON dict that says what it belongs to (kind of run,
    model, classes, budget, shapes, ...); `restore` refuses a checkpoint whose identity differs.

    Args:
      directory: where the checkpoints live (created if missing); one sub-folder per step.
      identity: JSON-able dict describing the run, e.g. `{"kind": "search", "model":
        "fmnist_cnn", "num_classes": 10, "budget": {"conv1/kernel": 123, ...}}`.
      save_every_steps: `should_save(step)` is true every this many steps.
      keep: how many of the newest checkpoints are kept.

    Example:
      >>> with Checkpointer(path, identity=identity, save_every_steps=100) as ckpt:
      ...   state, extra, step = ckpt.restore(state) or (state, {}, 0)
      ...   for step in range(step + 1, total + 1):
      ...     state, metrics = search_step(state, next(data))
      ...     ckpt.save(step, state, {"data": data.get_state()})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        identity: Mapping[str, Any],
        save_every_steps: int,
        keep: int = 3,
    ):
        if not isinstance(identity, Mapping):
            raise TypeError(f"`identity` must be a JSON-able dict, got {type(identity).__name__}")
        self.save_every_steps = _check_positive_int(save_every_steps, "save_every_steps")
        self.keep = _check_positive_int(keep, "keep")
        self.identity = _to_json(dict(identity), "identity")
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            create=True,
            # `save` returns only once the checkpoint is finalised (written to a temporary folder,
            # then renamed): a process killed at any moment leaves every listed step whole.
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The newest saved step (whether or not it is readable), or `None`."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `step` is on the saving cadence: `step % save_every_steps == 0`."""
        return int(step) % self.save_every_steps == 0

    def save(
        self, step: int, state: PyTree, extra: Mapping[str, Any], *, force: bool = False
    ) -> bool:
        """Saves `state` and `extra` as step `step` when `should_save(step)` or `force`.

        Returns after the checkpoint is finalised on disk. The oldest checkpoints beyond `keep`
        are deleted.

        Args:
          step: the step number (e.g. the number of steps done).
          state: a pytree of arrays (`SearchState`, `TrainState`, ...); `None` leaves allowed.
          extra: a JSON-able dict; `restore` returns it as JSON gives it back (tuples as lists,
            keys as strings, numpy scalars as Python numbers).
          force: save even off the cadence (e.g. the last step).

        Returns:
          Whether a checkpoint was written; `False` off the cadence, or when step `step` is
          already saved.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {step}")
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        extra = _to_json(dict(extra), "extra")
        meta = {
            "format": FORMAT_VERSION,
            "identity": self.identity,
            "layout": _layout(state),
            "crc32": _checksums(state),
        }
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _EXTRA: ocp.args.JsonSave(extra),
                _META: ocp.args.JsonSave(meta),
            }
        )
        saved = self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return bool(saved)

    def restore(self, target: PyTree) -> tuple[PyTree, dict, int] | None:
        """The newest good checkpoint, restored into the structure of `target`.

        Args:
          target: a state of the same structure, shapes and dtypes as the saved one (e.g. a
            freshly built state, or its `jax.eval_shape`); restored arrays take its shardings.

        Returns:
          `None` when there is no checkpoint, else `(state, extra, step)`.

        Raises:
          CheckpointMismatchError: the newest readable checkpoint belongs to another run (its
            identity differs) or its state has another layout than `target`.
          CheckpointCorruptError: no checkpoint can be read.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        want = _layout(target)
        abstract = jax.tree.map(_abstract, target)
        failures: list[tuple[int, str]] = []
        for step in steps:
            result, reason = self._try_restore(step, want, abstract)
            if result is None:
                logging.warning(
                    "checkpoint of step %d in %s is unusable (%s); trying an older one",
                    step,
                    self.directory,
                    reason,
                )
                failures.append((step, reason))
                continue
            if failures:
                self._quarantine([s for s, _ in failures])
            return result
        raise CheckpointCorruptError(str(self.directory), failures)

    def _try_restore(self, step, want, abstract) -> tuple[tuple | None, str]:
        # Orbax and tensorstore raise many kinds of errors on damaged files (ValueError,
        # OSError, tensorstore errors, JSON errors); any of them means "this step is unusable".
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except Exception as err:  # noqa: BLE001
            return None, _reason("metadata unreadable", err)
        if not isinstance(meta, dict) or not {"identity", "layout", "crc32"} <= set(meta):
            return None, "metadata incomplete (not written by jackpots_jax.checkpoints)"
        self._check_identity(step, meta["identity"])
        self._check_layout(step, meta["layout"], want)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardRestore(abstract), _EXTRA: ocp.args.JsonRestore()}
                ),
            )
        except Exception as err:  # noqa: BLE001
            return None, _reason("state unreadable", err)
        state, extra = restored[_STATE], restored[_EXTRA]
        sums = _checksums(state)
        bad = [
            path
            for path, crc in meta["crc32"].items()
            if crc is not None and sums.get(path) is not None and sums[path] != crc
        ]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            return None, f"checksum mismatch at {', '.join(bad[:5])}{more}"
        return (state, dict(extra or {}), int(step)), ""

    def _check_identity(self, step: int, saved: Any) -> None:
        fields = _identity_diff(saved, self.identity)
        if fields:
            raise CheckpointMismatchError(
                f"checkpoint of step {step} in {self.directory} belongs to another run "
                f"({len(fields)} identity field(s) differ; use another directory, or delete it "
                "to start afresh)",
                fields=fields,
            )

    def _check_layout(self, step: int, saved: dict, want: dict) -> None:
        missing = [k for k in want if k not in saved]
        unexpected = [k for k in saved if k not in want]
        mismatched = [
            (k, str(saved[k]), str(want[k])) for k in want if k in saved and saved[k] != want[k]
        ]
        if missing or unexpected or mismatched:
            raise CheckpointMismatchError(
                f"checkpoint of step {step} in {self.directory} does not have the layout of the "
                "target state",
                missing=missing,
                unexpected=unexpected,
                mismatched=mismatched,
            )

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unusable steps aside, so that they are neither restored nor block a new save."""
        if jax.process_index() == 0:
            folder = self.directory / QUARANTINE
            folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                source = self.directory / str(step)
                if source.exists():
                    dest = folder / f"{step}-{stamp}"
                    source.rename(dest)
                    logging.warning("moved unusable checkpoint of step %d to %s", step, dest)
        # Every process must see the same steps afterwards: `save` skips steps already there, and
        # a save that some processes skip and others make would hang.
        ocp.multihost.sync_global_processes(f"jackpots_quarantine_{'_'.join(map(str, steps))}")
        self._manager.reload()

    def close(self) -> None:
        """Waits for pending work and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


# ---------------------------------------------------------------------------------------------
# Export


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(temporary path)` next to `path`, then renames it to `path` (same folder)."""
    directory, name = os.path.split(path)
    suffix = os.path.splitext(name)[1]  # writers pick the format by suffix
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    **model_kwargs,
) -> dict[str, str]:
    """Writes a searched jackpot: its masks, its masked weights and a JSON summary.

    Files (each written to a temporary name in `directory` and renamed, so a reader never sees a
    half-written one):

    - `masks.npz`: one bool array per masked leaf, keyed by its path (`'conv1/kernel'`);
    - `jackpot.safetensors`: `W * M` and the masks as a PyTorch-style state dict
      (`convert.export_state_dict`; `convert.import_checkpoint` reads it back);
    - `jackpot.json`: model, config, the pruned count per layer (`budget`), the sparsity of the
      masks (`sparsity_report`) and the final metrics.

    Args:
      directory: the output folder (created if missing).
      variables: `{'params', 'batch_stats'}` of the model (the frozen pre-trained weights).
      masks: the jackpot's masks (`state.masks`): bool arrays at masked leaves, `None` elsewhere.
      model_name: the registered model name (`jackpots_jax.models.names()`).
      budget: the budget the search ran with (pruned counts per leaf; `None` at unmasked leaves),
        or a flat dict `{'conv1/kernel': count}`.
      config: the run's config (a dict or `ConfigDict`), JSON-able.
      metrics: final metrics (e.g. `{'test_accuracy': 0.91}`), JSON-able.
      scores: optional scores, also written into the state dict as `<layer>.mask`.
      **model_kwargs: model options passed to `models.create` (e.g. `width`).

    Returns:
      `{'masks': path, 'safetensors': path, 'json': path}`.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    flat_masks = {name: np.asarray(m).astype(bool) for name, m in _masked_leaves(masks).items()}
    if not flat_masks:
        raise ValueError("`masks` holds no mask (every leaf is None): nothing to export")
    summary = {
        "format": FORMAT_VERSION,
        "model": model_name,
        "model_kwargs": model_kwargs,
        "config": config,
        "budget": {name: int(count) for name, count in _masked_leaves(budget).items()},
        "sparsity": sparsity_report(masks, variables["params"]),
        "metrics": metrics,
    }
    summary = _to_json(summary, "config/metrics")
    paths = {
        "masks": os.path.join(directory, "masks.npz"),
        "safetensors": os.path.join(directory, "jackpot.safetensors"),
        "json": os.path.join(directory, "jackpot.json"),
    }

    def write_masks(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez appends no suffix
            np.savez(f, **flat_masks)

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True, allow_nan=True)
            f.write("\n")

    _write_atomically(paths["masks"], write_masks)
    _write_atomically(
        paths["safetensors"],
        lambda tmp: convert.export_state_dict(
            variables, masks, model_name, tmp, scores=scores, **model_kwargs
        ),
    )
    _write_atomically(paths["json"], write_json)
    return paths


def masks_from_npz(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Reads `masks.npz` back into the structure of `like` (a budget or a masks tree).

    Raises:
      CheckpointMismatchError: the file's keys or shapes differ from the masked leaves of `like`.
    """
    with np.load(os.fspath(path)) as data:
        stored = {k: data[k] for k in data.files}
    wanted = {name: leaf for name, leaf in named_leaves(like) if leaf is not None}
    missing = [k for k in wanted if k not in stored]
    unexpected = [k for k in stored if k not in wanted]
    mismatched = [
        (k, _describe(stored[k]), f"bool[{','.join(map(str, np.shape(v)))}]")
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
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: None if leaf is None else stored[path_str(path)].astype(bool),
        like,
        is_leaf=is_none,
    )
