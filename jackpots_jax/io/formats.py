"""Files of state dicts: safetensors, npz and PyTorch pickles, as `{key: numpy array}`.

The one home of the file formats every converter (`io.weights` for the CNNs, `io.vit_weights`
for the ViTs) reads and writes. `.safetensors` and `.npz` need only numpy; `.pth` / `.pt` /
`.tar` / `.bin` / `.ckpt` need PyTorch, imported only when such a file is read or written.

Example:
  >>> state = load_state_dict("resnet50.safetensors")
  >>> save_state_dict(state, "copy.npz")
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from jackpots_jax.io.errors import FileContentError, MissingDependencyError
from jackpots_jax.io.files import atomic_path

StateDict = dict[str, np.ndarray]

_TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")
_FORMATS = (".safetensors", ".npz") + _TORCH_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Files


def load_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> StateDict:
    """Reads a flat state dict from `.safetensors`, `.npz` or a PyTorch file.

    A PyTorch checkpoint that is a dict with a `state_dict` entry (the reference code's and most
    training scripts') is unwrapped; its other entries (optimizer, epoch, accuracy) are ignored.

    Args:
      path: the file; its suffix picks the format (`.safetensors`, `.npz`, or `.pth` / `.pt` /
        `.tar` / `.bin` / `.ckpt` for PyTorch).
      allow_pickle: PyTorch files only: load with `torch.load(weights_only=False)`, which runs
        arbitrary pickled code. Only for files you trust that hold more than tensors and plain
        Python values.

    Returns:
      `{key: numpy array}` with the file's key names (a `module.` prefix is kept; `to_flax` strips
      it). Half-precision tensors are converted to float32.

    Raises:
      FileNotFoundError: no file at `path`.
      PermissionError: the file may not be read.
      FileContentError: the file is empty, truncated or not in the format its suffix names.
      ValueError: an unknown suffix, or a PyTorch file that holds no state dict.
      ImportError: a PyTorch file while PyTorch is not installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    suffix = _suffix(path)
    # Opened here first: the readers below report an unreadable file as a missing one, or not at
    # all (safetensors says "No such file or directory" for a file it may not open).
    with open(path, "rb"):
        pass
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return {k: to_numpy(v) for k, v in load_file(path).items()}
        except SafetensorError as err:
            raise _unreadable(path, "safetensors", err) from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise _unreadable(path, "npz", err) from None
    torch = _import_torch(f"reading {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise _unreadable(path, "PyTorch", err) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(
            f"{path!r} holds a {type(obj).__name__}, not a state dict (a dict of tensors, or a "
            "dict with a 'state_dict' entry)"
        )
    return {k: to_numpy(v) for k, v in obj.items()}


def _unreadable(path: str, fmt: str, err: BaseException) -> FileContentError:
    size = os.path.getsize(path)
    what = "it is empty" if size == 0 else f"{size} bytes: truncated, or another format"
    reason = " ".join(str(err).split())
    return FileContentError(
        f"{path!r} is not a readable {fmt} file ({what}; the reader says: "
        f"{reason if len(reason) <= 200 else reason[:197] + '...'}); write it again, or use "
        "another file"
    )


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes a flat state dict as `.safetensors`, `.npz`, or (with PyTorch) `.pth` / `.pt`.

    The file is written under a temporary name next to `path` and renamed into place, so a reader
    never sees a half-written one.

    Args:
      state_dict: `{key: array}`.
      path: the file to write; its suffix picks the format.

    Raises:
      ValueError: an unknown suffix.
      ImportError: a PyTorch suffix while PyTorch is not installed.
    """
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}
    suffix = _suffix(path)
    torch = _import_torch(f"writing {path!r}") if suffix in _TORCH_SUFFIXES else None
    with atomic_path(path) as tmp:  # the temporary name keeps the suffix the writers go by
        if suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, tmp)
        elif suffix == ".npz":
            np.savez(tmp, **arrays)
        else:
            torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp)


def _suffix(path: str) -> str:
    lower = path.lower()
    for suffix in _FORMATS:
        if lower.endswith(suffix):
            return suffix
    raise FileContentError(
        f"unknown format of {path!r} (its suffix names none this program reads); allowed "
        f"suffixes: {', '.join(_FORMATS)}; convert the file to .safetensors or .npz"
    )


def _import_torch(purpose: str):
    try:
        import torch
    except ImportError as err:
        raise MissingDependencyError(
            f"{purpose} needs PyTorch, which is not installed: `pip install torch`, or convert the "
            "file to .safetensors (no PyTorch needed)"
        ) from err
    return torch


def to_numpy(value: Any) -> np.ndarray:
    """A tensor or array as a numpy array; half-precision floats (which numpy lacks) as float32."""
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()
        return value.numpy()
    array = np.asarray(value)
    if str(array.dtype) == "bfloat16" or (array.dtype.kind == "f" and array.dtype.itemsize < 4):
        array = array.astype(np.float32)
    return array
