"""Files written whole or not at all, and the one JSON conversion every file of a run uses.

`atomic_path(path)` hands a writer a temporary file next to `path` and renames it onto `path` once
the writer is done, so a reader (or a run killed half-way) never sees a half-written file. The
temporary file is created by this module with mode `0o666` minus the process umask, as `open`
would create `path` itself, so a file renamed into place gets the permissions its directory's
users expect (`tempfile.mkstemp` would make it `0o600`).

`jsonable(obj)` turns what a run produces (numpy and jax scalars and arrays, tuples, sets,
`ConfigDict`s) into plain JSON values, and names the offending value when it cannot.

Example:
  >>> write_json("results.json", [{"model": "dense", "accuracy": np.float32(0.92)}])
  >>> with atomic_path("weights.safetensors") as tmp:   # same suffix: writers pick the format
  ...   safetensors.numpy.save_file(arrays, tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path next to `path` (same suffix) that is renamed onto `path` on success.

    The temporary file exists (empty) when the block starts, created with mode `0o666 & ~umask`,
    and has that mode when it is renamed (also when the writer replaced it). If the block raises,
    the temporary file is removed and `path` is left as it was.

    Args:
      path: the file to write; its folder is created if missing.

    Yields:
      The temporary path, e.g. `.<name>.<random>.tmp.safetensors` in the same folder.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(name)[1]
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp{suffix}")
    # os.open applies the umask to 0o666 itself, exactly as it does for a plain open(path, "w").
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        yield tmp
        # Some writers replace the file they are given (safetensors writes a new one): the mode
        # is set again on whatever is there now.
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes reach the disk before the name does
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Writes `data` to `path` atomically; returns `path` as a string."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_text(path: str | os.PathLike, text: str) -> str:
    """Writes `text` (UTF-8) to `path` atomically; returns `path` as a string."""
    return write_bytes(path, text.encode("utf-8"))


def jsonable(obj: Any, what: str = "value") -> Any:
    """`obj` as plain JSON values: dicts with string keys, lists, str, numbers, bool, None.

    Numpy and jax scalars become Python numbers, arrays nested lists, tuples lists, sets sorted
    lists, and anything with `to_dict()` (a `ConfigDict`) its dict.

    Args:
      obj: the value to convert.
      what: what to call `obj` in an error message (e.g. `'extra'`).

    Raises:
      TypeError: a value of another type, named with its place in `what`.
    """
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, np.generic) or (hasattr(obj, "__array__") and hasattr(obj, "dtype")):
        array = np.asarray(obj)
        return array.item() if array.ndim == 0 else array.tolist()
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, f"{what}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, f"{what}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted(jsonable(v, what) for v in obj)
    raise TypeError(
        f"`{what}` must be JSON-serialisable (dicts, lists, str, numbers, bool, None; numpy "
        f"scalars and arrays are converted), found {type(obj).__name__}: {obj!r:.100}"
    )


def json_round_trip(obj: Any, what: str = "value") -> Any:
    """`obj` as it comes back from writing and reading JSON (tuples -> lists, keys -> str)."""
    return json.loads(json.dumps(jsonable(obj, what), allow_nan=True))


def write_json(path: str | os.PathLike, obj: Any, what: str = "value") -> str:
    """Writes `jsonable(obj)` to `path` atomically, indented, keys sorted; returns the path."""
    text = json.dumps(jsonable(obj, what), indent=2, sort_keys=True, allow_nan=True)
    return write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in `path`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """The JSON value in `path`, or a `FileContentError` naming the file when it is not JSON.

    The files of a run are written whole (`write_json`), so one that does not parse was cut short
    by a writer outside this program (or a copy onto a full disk), or edited by hand.

    Args:
      path: the file.
      what: what it is, for the message (e.g. `'the results file'`).

    Example:
      >>> rows = read_json_file("workdir/results.json", "the results file")
    """
    from jackpots_jax.io.errors import FileContentError

    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        size = os.path.getsize(path)
        raise FileContentError(
            f"{what} {os.fspath(path)} is not valid JSON ({size} bytes; {e}): it was cut short "
            "(a writer killed outside this program, or a full disk) or edited; restore it, or "
            "move it away to start it afresh"
        ) from None
