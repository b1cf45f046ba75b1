"""N:M (2:4) jackpots for sparse inference: PyTorch-layout safetensors with the masks.

NVIDIA's sparse tensor cores (and PyTorch's `torch.sparse.to_sparse_semi_structured`) take a 2-D
weight `[out, in]` in which every group of 4 consecutive entries of a row holds at most 2
non-zeros. An N:M jackpot's groups run along its kernels' input axis (`jackpots_jax.patterns`),
which is the contiguous axis of that matrix, so the export is a reshape and a transpose:

    matrix = kernel.reshape(fan_in, fan_out).T        # [out, in], groups of M along `in`

* dense kernels `[in, out]`: the `Linear` weight `[out, in]`, the same as `convert`'s export;
* conv kernels `HWIO`: the channels-last GEMM matrix `[O, kh kw I]` (`I` contiguous: the layout in
  which 2:4 along the input channels is row-contiguous, as cuSPARSELt and NVIDIA's ASP use it),
  not PyTorch's `[O, I, kh, kw]` conv weight: `weight.view(O, kh, kw, I).permute(0, 3, 1, 2)`
  gives that one (a conv module would reject the 2-D matrix loudly, by its shape);
* other kernels (e.g. attention `[D, heads, head_dim]`) by their input axes.

File scheme (one `.safetensors`, written with numpy only; the names of `convert`'s export):

* `<name>.weight`: `W * M` as `[out, in]`, contiguous (float32 by default, or float16);
* `<name>.b_mask`: the mask `M` as float32 0/1 of the same shape;
* any `extra` tensors as given (biases, ...);
* metadata `format` (`FORMAT`), `pattern` (e.g. `"2:4"`) and `layers`: JSON of
  `{name: {"path": params path, "shape": kernel shape, "input_axes": k}}`, which `read_nm` uses to
  give the kernels and masks back in the JAX layout.

Example:
  >>> budget = jj.layer_budgets(params, 0.5, pattern="2:4")
  >>> ...  # the search
  >>> kernels, masks, axes = nm_layers(params, jj.current_masks(opt_state), budget)
  >>> write_nm("jackpot_2of4.safetensors", kernels, masks, input_axes=axes)

It depends on no model registry: a flat `{path: kernel}` dict and optional PyTorch names are all
it needs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from jackpots_jax._tree import PyTree, named_leaves
from jackpots_jax.patterns import Pattern, default_input_axes, is_structured, nm_violations

FORMAT = "jackpots_jax.nm/1"
DTYPES = ("float32", "float16")


def torch_name(path: str) -> str:
    """`'layer1/fc/kernel'` -> `'layer1.fc'`: the params path as a PyTorch module name."""
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] == "kernel":
        parts = parts[:-1]
    return ".".join(parts)


def to_matrix(kernel: Any, input_axes: int | None = None) -> np.ndarray:
    """A kernel as the 2-D `[out, in]` matrix (`kernel.reshape(fan_in, fan_out).T`), contiguous."""
    kernel = np.asarray(kernel)
    k = default_input_axes(kernel.shape) if input_axes is None else input_axes
    fan_in = int(np.prod(kernel.shape[:k]))
    return np.ascontiguousarray(kernel.reshape(fan_in, -1).T)


def from_matrix(matrix: Any, shape: tuple[int, ...], input_axes: int) -> np.ndarray:
    """The inverse of `to_matrix`: the kernel of `shape` back from its `[out, in]` matrix."""
    del input_axes  # the transpose undoes the flattening whatever the split
    return np.ascontiguousarray(np.asarray(matrix).T).reshape(shape)


def nm_layers(
    params: PyTree, masks: PyTree, budget: PyTree
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
    """The N:M-masked leaves of a search as flat dicts (on the host), ready for `write_nm`.

    Returns:
      `(kernels, masks, input_axes)`, each `{params path: ...}` over the leaves whose budget
      entry is an N:M `Structured`.
    """
    kernels, flat_masks, axes = {}, {}, {}
    by_path = dict(named_leaves(masks))
    for (path, w), (_, entry) in zip(named_leaves(params), named_leaves(budget), strict=True):
        if is_structured(entry) and entry.kind == "n:m":
            kernels[path] = np.asarray(w)
            flat_masks[path] = np.asarray(by_path[path])
            axes[path] = entry.input_axes
    return kernels, flat_masks, axes


def _atomic_save(arrays: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_nm(
    path: str | os.PathLike,
    kernels: Mapping[str, Any],
    masks: Mapping[str, Any],
    torch_names: Mapping[str, str] | None = None,
    *,
    pattern: str | Pattern = "2:4",
    input_axes: Mapping[str, int] | None = None,
    dtype: str = "float32",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Writes N:M kernels as PyTorch `[out, in]` weights (`W * M`) and their masks (safetensors).

    Every kernel's mask is checked: each group of M consecutive entries of each row of the
    `[out, in]` matrix must keep exactly N (what the search's masks hold; sparse kernels need at
    most N non-zeros, which `W * M` then has).

    Args:
      path: the `.safetensors` file (written atomically).
      kernels: `{path: kernel}` in the JAX layout (e.g. from `nm_layers`).
      masks: `{path: bool or 0/1 mask}` of the same keys and shapes.
      torch_names: `{path: PyTorch module name}`; by default `torch_name(path)`.
      pattern: the N:M pattern of the masks.
      input_axes: `{path: k}` for kernels whose input axes are not all but the last.
      dtype: `'float32'` (exact) or `'float16'` (what 2:4 kernels run in) for the weights.
      extra: more tensors written as they are (e.g. `{'fc.bias': b}`), keys must not collide.

    Returns:
      The arrays written, `{key: numpy array}`.

    Raises:
      ValueError: a mask that breaks the pattern or does not fit its kernel, a kernel whose input
        axis is not a multiple of M, missing or extra keys, colliding names, a bad dtype; each
        names the layer.
    """
    pat = Pattern.parse(pattern)
    if pat.kind != "n:m":
        raise ValueError(f"`pattern` must be N:M (e.g. '2:4') to export N:M weights, got {pat}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown `dtype` {dtype!r}; allowed: {', '.join(DTYPES)}")
    if set(kernels) != set(masks):
        only_k, only_m = sorted(set(kernels) - set(masks)), sorted(set(masks) - set(kernels))
        raise ValueError(
            f"`kernels` and `masks` must have the same keys: only in kernels {only_k}, only in "
            f"masks {only_m}"
        )
    input_axes = dict(input_axes or {})
    names = {p: (torch_names or {}).get(p, torch_name(p)) for p in kernels}
    arrays: dict[str, np.ndarray] = {}
    layers: dict[str, dict[str, Any]] = {}
    for p, kernel in kernels.items():
        kernel = np.asarray(kernel, np.float32)
        mask = np.asarray(masks[p])
        if mask.shape != kernel.shape:
            raise ValueError(f"the mask of {p!r} has shape {mask.shape}, its kernel {kernel.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"the mask of {p!r} is not 0/1")
        k = input_axes.get(p, default_input_axes(kernel.shape))
        if not 1 <= k < kernel.ndim:
            raise ValueError(f"{p!r} (shape {kernel.shape}) cannot have {k} input axes")
        matrix_mask = to_matrix(mask.astype(bool), k)
        if matrix_mask.shape[1] % pat.m:
            raise ValueError(
                f"{p!r}: its [out, in] matrix {matrix_mask.shape} has `in` = {matrix_mask.shape[1]}"
                f", not a multiple of M={pat.m}"
            )
        bad = nm_violations(matrix_mask, 1, pat.n, pat.m)
        if bad:
            raise ValueError(
                f"the mask of {p!r} breaks pattern {pat}: {bad} groups of {pat.m} along `in` do "
                f"not keep exactly {pat.n}"
            )
        name = names[p]
        for key in (f"{name}.weight", f"{name}.b_mask"):
            if key in arrays:
                raise ValueError(f"two layers export to the same key {key!r}")
        arrays[f"{name}.weight"] = to_matrix(kernel * mask.astype(np.float32), k).astype(dtype)
        arrays[f"{name}.b_mask"] = matrix_mask.astype(np.float32)
        layers[name] = {"path": p, "shape": list(kernel.shape), "input_axes": k}
    for key, value in (extra or {}).items():
        if key in arrays:
            raise ValueError(f"`extra` key {key!r} collides with an exported layer")
        arrays[key] = np.ascontiguousarray(np.asarray(value))
    metadata = {"format": FORMAT, "pattern": str(pat), "layers": json.dumps(layers)}
    _atomic_save(arrays, os.fspath(path), metadata)
    return arrays


def read_nm(
    path: str | os.PathLike,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Reads a `write_nm` file back into the JAX layout.

    Returns:
      `(kernels, masks, info)`: `{params path: W * M}` (float32) and `{params path: bool mask}`
      in the kernels' shapes, and `info` with `pattern`, `layers` (the metadata) and `extra`
      (`{key: array}` of every other tensor).

    Raises:
      ValueError: not a file of this format, or a layer whose tensors are missing.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), "np") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{os.fspath(path)!r} is not an N:M export (metadata format "
                f"{metadata.get('format')!r}, expected {FORMAT!r})"
            )
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    layers = json.loads(metadata["layers"])
    kernels, masks = {}, {}
    for name, layer in layers.items():
        missing = [k for k in (f"{name}.weight", f"{name}.b_mask") if k not in tensors]
        if missing:
            raise ValueError(f"{os.fspath(path)!r} lacks {missing} of layer {layer['path']!r}")
        shape, k = tuple(layer["shape"]), layer["input_axes"]
        weight = tensors.pop(f"{name}.weight").astype(np.float32)
        kernels[layer["path"]] = from_matrix(weight, shape, k)
        masks[layer["path"]] = from_matrix(tensors.pop(f"{name}.b_mask"), shape, k) != 0
    info = {"pattern": metadata["pattern"], "layers": layers, "extra": tensors}
    return kernels, masks, info
