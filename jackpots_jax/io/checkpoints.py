"""Checkpoints of a running search or training, to resume it exactly.

`Checkpointer` wraps an orbax `CheckpointManager`. Each checkpoint holds three items:

- `state`: the state pytree (a `SearchState` or `TrainState`, optax states and the masks that the
  short restriction owns included), written by orbax as it is: every dtype is kept (int32 step,
  uint32 or typed PRNG keys, bool masks) and `None` leaves stay `None`;
- `extra`: a JSON dict of the caller's (the data iterator's position, the metrics so far, ...);
- `meta`: JSON that says what the checkpoint belongs to (`identity`, and the `fingerprint` of the
  frozen values the state is used with), the layout of the state
  (path, shape and dtype of every leaf) and a checksum of every leaf's values (`_digest`: computed
  where the shards are, so sharded state is checked without gathering it).

A search state holds no frozen pre-trained weights: they never change, so rewriting them at every
checkpoint would only cost time and disk. Their `fingerprint` goes into the checkpoint's identity
instead, so that resuming with other weights is refused.

`restore` refuses a checkpoint of another run (another model, budget, weights, ...) with a
`CheckpointMismatchError` naming each differing field, and steps back over a newest checkpoint that
cannot be read or whose bytes do not match their checksums (a file truncated or garbled after it was
written): it logs why and restores the previous good one.

A save that fails (the disk is full, the folder became read-only) leaves nothing of itself: orbax's
temporary folder of that step is removed and `CheckpointWriteError` says why and which complete
checkpoint is the newest. Temporary folders of a process killed while saving are removed when the
next `Checkpointer` opens the folder, before it returns.

Example:
  >>> ckpt = Checkpointer(workdir / "checkpoints", identity={"model": "resnet20", ...},
  ...                     save_every_steps=1000, fingerprint=fingerprint(params))
  >>> restored = ckpt.restore(state)
  >>> if restored is not None:
  ...   state, extra, step = restored
  ...   data.set_state(extra["data"])
  >>> ...
  >>> ckpt.save(step, state, {"data": data.get_state()})
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax import lax

from jackpots_jax._tree import is_none, named_leaves
from jackpots_jax.io.errors import ABSENT, CheckpointMismatchError
from jackpots_jax.io.files import json_round_trip

PyTree = Any

# 2: states hold no frozen params; the identity carries their fingerprint.
FORMAT_VERSION = 2
QUARANTINE = "corrupt"  # subfolder that receives checkpoints found unreadable
UNFINISHED = ".orbax-checkpoint-tmp"  # in the name of orbax's folder of a save in progress
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_barriers = itertools.count()  # orbax's barriers must each have a name of their own
_STATE, _EXTRA, _META = "state", "extra", "meta"
FINGERPRINT = "fingerprint"  # the identity field that holds the frozen values' fingerprint
WEIGHTS_DIFFER = (
    "the pre-trained weights differ from those the checkpoint was made from: resume with the same "
    "weights, or use another work directory (or delete it) to start afresh"
)


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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); nothing of it is left on disk.

    An `OSError` with the `errno` of the cause (`ENOSPC` when the disk is full, also when the
    writer reported it only in its message) and the folder as `filename`.
    """

    def __str__(self) -> str:
        return self.strerror


def _errno(err: BaseException) -> int | None:
    """The errno behind `err` or its causes; tensorstore reports one only in its message."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err.errno
        text = str(err)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return errno.ENOSPC
        if "Disk quota exceeded" in text:
            return errno.EDQUOT
        err = err.__cause__ or err.__context__
    return None


def _wait_for_orbax_threads(timeout: float = 120.0) -> None:
    """Waits for orbax's writer threads (its futures; their class lives in orbax) to end.

    Called after a failed save: orbax's threads re-raise their own error from `join`, and the
    save's other items fail the same way (a full disk); that error is the one being reported.
    """
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith(
            "orbax."
        ):
            try:
                thread.join(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - the same failure as the one `save` reports
                pass


def _reason(what: str, err: BaseException) -> str:
    """A one-line reason for a log message (tensorstore errors carry pages of spec)."""
    text = " ".join(str(err).split())
    return f"{what}: {type(err).__name__}: {text if len(text) <= 300 else text[:297] + '...'}"


# ---------------------------------------------------------------------------------------------
# Identity


def fingerprint(tree: PyTree) -> str:
    """A SHA-256 of a pytree's leaves: their paths, dtypes, shapes and bytes, in order.

    Computed on the host, once per run (for the frozen pre-trained params of a search; a hundred
    MB hash in well under a second). Two trees get the same fingerprint exactly when they hold the
    same arrays at the same paths, bit for bit.

    Raises:
      ValueError: a leaf is sharded so that no device of this process holds all of it.
    """
    digest = hashlib.sha256()
    for path, leaf in named_leaves(tree):
        if leaf is None:
            continue
        data = _host_bytes(leaf)
        if data is None:
            raise ValueError(f"{path}: no device of this process holds all of this leaf's values")
        digest.update(f"{path}|{data.dtype.str}|{data.shape}\n".encode())
        digest.update(data.tobytes())
    return digest.hexdigest()


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
        (key, a.get(key, ABSENT), b.get(key, ABSENT))
        for key in sorted(set(a) | set(b))
        if a.get(key, ABSENT) != b.get(key, ABSENT)
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


def _words(leaf: jax.Array) -> jax.Array:
    """The leaf's values as flat uint32 words (bools and narrow types widened, wide ones split)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    x = jnp.ravel(leaf)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size < 4:
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    return jnp.ravel(lax.bitcast_convert_type(x, jnp.uint32))


def _digest(leaf: jax.Array) -> jax.Array:
    """A uint32 checksum of a leaf's values, the same however the leaf is sharded.

    sum_i ((w_i xor (i * golden)) * (2i + 1)) mod 2^32 over its words w_i: any change of one
    word changes the sum (by a nonzero multiple of an odd number), and as array ops over the
    global array it runs where the shards are (partial sums, then an all-reduce), so sharded
    leaves are checked without being gathered on one host.
    """
    words = _words(leaf)
    index = lax.iota(jnp.uint32, words.shape[0])
    mixed = words ^ (index * jnp.uint32(0x9E3779B9))
    return jnp.sum(mixed * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_digests = jax.jit(lambda leaves: [_digest(x) for x in leaves])


def _checksums(tree: PyTree) -> dict[str, int]:
    """`_digest` of every array leaf, by path (one jitted computation over the whole tree)."""
    named = [
        (path, leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf))
        for path, leaf in _leaves(tree)
        if leaf is not None
    ]
    digests = jax.device_get(_digests([leaf for _, leaf in named]))
    return {path: int(d) for (path, _), d in zip(named, digests, strict=True)}


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
    model, classes, budget, the fingerprint of the frozen weights, ...); `restore` refuses a
    checkpoint whose identity differs.

    Args:
      directory: where the checkpoints live (created if missing); one sub-folder per step.
      identity: JSON-able dict describing the run, e.g. `{"kind": "search", "model":
        "fmnist_cnn", "num_classes": 10, "budget": {"conv1/kernel": 123, ...}}`.
      save_every_steps: `should_save(step)` is true every this many steps.
      keep: how many of the newest checkpoints are kept.
      fingerprint: `fingerprint(params)` of the frozen values the state is used with but does
        not hold (the pre-trained weights of a search); stored in the identity, so that a restore
        with other weights fails with a message that says so.

    Example:
      >>> with Checkpointer(path, identity=identity, save_every_steps=100,
      ...                   fingerprint=fingerprint(params)) as ckpt:
      ...   state, extra, step = ckpt.restore(state) or (state, {}, 0)
      ...   for step in range(step + 1, total + 1):
      ...     state, metrics = step_fn(state, params, next(data))
      ...     ckpt.save(step, state, {"data": data.get_state()})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        identity: Mapping[str, Any],
        save_every_steps: int,
        keep: int = 3,
        fingerprint: str | None = None,
    ):
        if not isinstance(identity, Mapping):
            raise TypeError(f"`identity` must be a JSON-able dict, got {type(identity).__name__}")
        if FINGERPRINT in identity:
            raise ValueError(f"`identity` must not hold {FINGERPRINT!r}: pass `fingerprint=`")
        self.save_every_steps = _check_positive_int(save_every_steps, "save_every_steps")
        self.keep = _check_positive_int(keep, "keep")
        identity = dict(identity)
        if fingerprint is not None:
            identity[FINGERPRINT] = str(fingerprint)
        self.identity = json_round_trip(identity, "identity")
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            create=True,
            # `save` returns only once the checkpoint is finalised (written to a temporary folder,
            # then renamed): a process killed at any moment leaves every listed step whole.
            enable_async_checkpointing=False,
            # Done here instead (`_remove_unfinished`): orbax does it in a background thread that a
            # process ending soon after (an error found before any step) leaves printing tracebacks.
            cleanup_tmp_directories=False,
        )
        self._options = options
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._remove_unfinished()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        # An error is already on its way out (a failed save, an interrupted step): closing must
        # not replace it with a second report of the same failure from orbax's threads.
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - logged; the first error is the one reported
            logging.warning("closing the checkpoints in %s after an error: %s", self.directory, err)

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
        extra = json_round_trip(dict(extra), "extra")
        meta = {
            "format": FORMAT_VERSION,
            "identity": self.identity,
            "layout": _layout(state),
            "checksums": _checksums(state),
        }
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _EXTRA: ocp.args.JsonSave(extra),
                _META: ocp.args.JsonSave(meta),
            }
        )
        try:
            saved = self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        except Exception as err:
            # The other items of the step may still be in writing when the first one fails.
            _wait_for_orbax_threads()
            # No barrier: the other processes may not have failed, and would never reach it.
            self._remove_unfinished(sync=False)
            self._reopen()
            code = _errno(err)
            newest = self._manager.latest_step()
            kept = (
                f"the newest complete checkpoint is step {newest}"
                if newest is not None
                else "there is no complete checkpoint"
            )
            what = "no space left on device" if code in _DISK_FULL else _reason("error", err)
            raise CheckpointWriteError(
                code or errno.EIO,
                f"the checkpoint of step {step} could not be written in {self.directory} ({what}); "
                f"nothing of it was left there, {kept}",
                os.fspath(self.directory),
            ) from err
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
        if not isinstance(meta, dict) or not {"identity", "layout", "checksums"} <= set(meta):
            return None, "metadata incomplete (not written by jackpots_jax.io.checkpoints)"
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"checkpoint of step {step} in {self.directory} has format {meta.get('format')}, "
                f"this version reads format {FORMAT_VERSION} (format 1 held the frozen weights in "
                "the state); use another directory, or delete it to start afresh"
            )
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
            for path, digest in meta["checksums"].items()
            if sums.get(path) is not None and sums[path] != digest
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
                hint=WEIGHTS_DIFFER if any(f == FINGERPRINT for f, _, _ in fields) else None,
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

    def _remove_unfinished(self, sync: bool = True) -> None:
        """Removes orbax's temporary folders: saves that failed or whose process was killed."""
        if jax.process_index() == 0 and self.directory.exists():
            for path in self.directory.iterdir():
                if UNFINISHED in path.name:
                    logging.info("removing an unfinished checkpoint: %s", path)
                    try:
                        path.rmtree() if path.is_dir() else path.unlink()
                    except OSError as err:  # the next Checkpointer on the folder tries again
                        logging.warning("could not remove %s: %s", path, err)
        if sync and jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"jackpots_unfinished_{next(_barriers)}")

    def _reopen(self) -> None:
        """A fresh orbax manager on the folder after a failed save.

        Orbax keeps the failed save's error in its writer thread and raises it again from every
        later `wait_until_finished` (and so from `close` and the next `save`), whether or not the
        save itself already raised it; which of the two happens first depends on thread timing.
        The failure is reported once, by `save`; the old manager is dropped.
        """
        old = self._manager
        try:
            old.close()
        except Exception:  # noqa: BLE001 - the same failure, already reported by `save`
            pass
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    def close(self) -> None:
        """Waits for pending work and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
