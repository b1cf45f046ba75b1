"""PyTorch state dicts <-> Flax variables of the registered models, strictly, with masks.

Generic over the models' specs: each `ModelSpec` declares its `TorchLayout` (the PyTorch module
name of every Flax module, the classifier's names and shape, how to recognise its checkpoints), and
this module maps every conv, dense and batch-norm module through it. Linen and NNX models alike:
variables are plain nested dicts `{'params', 'batch_stats'}`.

What the registered models import: torchvision ResNet-18/34/50 state dicts, the lottery-jackpots
reference code's CIFAR checkpoints (VGG-19, ResNet-32 of width 2, and its ImageNet ResNet-50: a
dict with a `state_dict` entry, keys maybe prefixed `module.`, the classifier a 1x1 conv, and per
masked layer the scores `<layer>.mask` and the binary mask `<layer>.b_mask`), and the common CIFAR
code's checkpoints (a plain `Linear` classifier, named `linear` in the usual CIFAR ResNet code;
conv biases in front of a batch norm, as in the usual CIFAR VGG code, are folded exactly into the
running mean).

The ViTs (`ModelSpec.converter == 'vit'`) are not mapped here: `import_checkpoint` and
`export_state_dict` hand them to `jackpots_jax.io.vit_weights` (timm safetensors, the `.npz` of
vision_transformer and big_vision in; the timm layout out), so `weights.path` takes those files.
The Llama-family language models (`converter == 'llama'`) go to `jackpots_jax.io.llama_weights`
(GGUF files, Hugging Face safetensors files and folders in; the Hugging Face layout out).

Export: a searched jackpot as a PyTorch-style state dict with torchvision / reference key names.
The scheme, read back by the import:

- `<layer>.weight`: the masked weights `W * M` (conv OIHW, linear `[out, in]`, or the classifier as
  a `[out, in, 1, 1]` conv as in the reference code);
- `<layer>.b_mask`: the binary mask `M` as float32 0/1, same shape as the weight (the reference
  code's name); only for layers that are masked;
- `<layer>.mask`: the scores, when given (the reference code's name for them);
- batch norm: `weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`.

Every mismatch between a checkpoint and the model (a missing key, an unexpected key, a wrong
shape) raises `CheckpointMismatchError` naming the keys: a partial load is never silent. Files:
`.safetensors` and `.npz` need only numpy; `.pth` / `.pt` / `.tar` need PyTorch, imported only when
such a file is read or written.

Example:
  >>> variables, scores, masks = import_checkpoint("vgg19_c10.pth", "vgg19")
  >>> logits = models.create("vgg19", 10).apply(variables, images, train=False)
  >>> export_state_dict(variables, masks, "vgg19", "jackpot.safetensors")
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jackpots_jax import models
from jackpots_jax._tree import named_leaves, path_str
from jackpots_jax.io.errors import CheckpointMismatchError, FileContentError
from jackpots_jax.io.files import atomic_path

PyTree = Any
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
            return {k: _to_numpy(v) for k, v in load_file(path).items()}
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
    return {k: _to_numpy(v) for k, v in obj.items()}


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
    arrays = {k: np.ascontiguousarray(_to_numpy(v)) for k, v in state_dict.items()}
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
    raise ValueError(f"unknown checkpoint format of {path!r}; allowed suffixes: {_FORMATS}")


def _import_torch(purpose: str):
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs PyTorch, which is not installed: `pip install torch`, or convert the "
            "file to .safetensors (no PyTorch needed)"
        ) from err
    return torch


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()
        return value.numpy()
    array = np.asarray(value)
    if str(array.dtype) == "bfloat16" or (array.dtype.kind == "f" and array.dtype.itemsize < 4):
        array = array.astype(np.float32)
    return array


# ---------------------------------------------------------------------------------------------
# The layer map of a model


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One Flax module with weights and the PyTorch module it corresponds to."""

    kind: str  # "conv", "dense" or "bn"
    path: tuple[str, ...]  # the Flax module path inside `params`
    torch: str  # the PyTorch module name (key prefix); the classifier's first name
    has_bias: bool = False  # conv / dense: the Flax module has a bias
    folds_into: tuple[str, ...] | None = None  # conv: the batch norm right after it


@dataclasses.dataclass(frozen=True)
class _Layout:
    model_name: str
    num_classes: int
    abstract: PyTree  # {'params', 'batch_stats'} as ShapeDtypeStructs
    layers: tuple[_Layer, ...]
    classifier: tuple[str, ...]  # the classifier's Flax module path
    classifier_names: tuple[str, ...]  # its PyTorch names; the export writes the first
    classifier_as_conv: bool


def _torch_layout(model_name: str) -> models.TorchLayout:
    layout = models.spec(model_name).torch
    if layout is None:
        raise ValueError(
            f"model {model_name!r} declares no PyTorch layout (`torch=None` in its ModelSpec): "
            "its weights cannot be imported or exported as a state dict"
        )
    return layout


@functools.lru_cache(maxsize=32)
def _layout(model_name: str, num_classes: int, options: tuple = ()) -> _Layout:
    torch_layout = _torch_layout(model_name)
    network = models.network(model_name, num_classes, **dict(options))
    abstract = network.abstract_variables()
    classifier = (network.spec.classifier,)
    head_name = torch_layout.classifier_names[0]

    def torch_name(path: tuple[str, ...]) -> str:
        return head_name if path == classifier else torch_layout.module_name(path)

    params = abstract["params"]
    stats = abstract.get("batch_stats", {})
    modules = []
    _walk(params, (), modules)
    bn_paths = {p for p, leaves in modules if "scale" in leaves and _get(stats, p) is not None}
    layers = []
    for path, leaves in modules:
        if path in bn_paths and set(leaves) == {"scale", "bias"}:
            layers.append(_Layer("bn", path, torch_name(path)))
            continue
        if "kernel" not in leaves or not set(leaves) <= {"kernel", "bias"}:
            raise ValueError(
                f"model {model_name!r} has a module {'/'.join(path)} with leaves {sorted(leaves)}: "
                "the converter maps convs, dense layers and batch norms only"
            )
        if leaves["kernel"].ndim not in (2, 4):
            raise ValueError(
                f"model {model_name!r} has a module {'/'.join(path)} with a "
                f"{leaves['kernel'].ndim}-D kernel: the converter maps 2-D (dense) and 4-D (conv) "
                "kernels only"
            )
        kind = "conv" if leaves["kernel"].ndim == 4 else "dense"
        bn = torch_layout.norm_after(path)
        folds = bn if kind == "conv" and "bias" not in leaves and bn in bn_paths else None
        layers.append(_Layer(kind, path, torch_name(path), "bias" in leaves, folds))
    return _Layout(
        model_name,
        num_classes,
        abstract,
        tuple(layers),
        classifier,
        torch_layout.classifier_names,
        torch_layout.classifier_as_conv,
    )


def _walk(tree: Mapping, path: tuple[str, ...], out: list) -> None:
    """Collects `(module path, {leaf name: leaf})` for every module holding arrays."""
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        out.append((path, leaves))
    for k, v in tree.items():
        if isinstance(v, Mapping):
            _walk(v, (*path, k), out)


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _torch_shape(layer: _Layer, kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
    if layer.kind == "conv":
        h, w, i, o = kernel_shape
        return (o, i, h, w)
    i, o = kernel_shape
    return (o, i)


# ---------------------------------------------------------------------------------------------
# Import


def to_flax(
    state_dict: Mapping[str, Any], model_name: str, num_classes: int | None = None, **model_kwargs
) -> tuple[PyTree, PyTree | None, PyTree | None]:
    """Converts a PyTorch-style state dict to the Flax variables of a registered model.

    Args:
      state_dict: `{key: array or tensor}` with torchvision / reference-code key names, as from
        `load_state_dict` (a `module.` prefix on every key, from `nn.DataParallel`, is removed).
      model_name: a registered model (`jackpots_jax.models.names()`).
      num_classes: number of classes; by default read from the classifier's weight.
      **model_kwargs: model options passed to `models.create` (e.g. `width` of a CIFAR ResNet).

    Returns:
      `(variables, scores, masks)`: `variables` is `{'params', 'batch_stats'}` of float32 numpy
      arrays in Flax layout (conv kernels HWIO, dense kernels `[in, out]`). `scores` and `masks`
      are `None` when the checkpoint holds none; otherwise trees with the structure of `params`
      whose leaves are `None` except at the kernels of layers that carry `<layer>.mask` (scores,
      float32) or `<layer>.b_mask` (masks, bool) entries, in the kernel's layout. The weights are
      returned as stored (the reference code stores dense weights next to the mask: the network
      it evaluates runs with `W * M`).

    Raises:
      CheckpointMismatchError: missing keys, unexpected keys or wrong shapes, all listed.
      ValueError: an unknown model name or option, or a `b_mask` entry that is not 0/1.
    """
    state = {k: _to_numpy(v) for k, v in state_dict.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    head_names = _torch_layout(model_name).classifier_names
    head = next((n for n in head_names if f"{n}.weight" in state), head_names[0])
    if num_classes is None:
        weight = state.get(f"{head}.weight")
        # A missing classifier is reported with every other mismatch below.
        num_classes = int(weight.shape[0]) if weight is not None and weight.ndim else 1
    layout = _layout(model_name, num_classes, tuple(sorted(model_kwargs.items())))
    _check_keys(layout, state, head, model_kwargs)

    values: dict[tuple[str, ...], np.ndarray] = {}
    scores: dict[tuple[str, ...], np.ndarray] = {}
    masks: dict[tuple[str, ...], np.ndarray] = {}
    folded: dict[tuple[str, ...], np.ndarray] = {}
    for layer in layout.layers:
        name = head if layer.path == layout.classifier else layer.torch
        if layer.kind == "bn":
            continue
        to_kernel = _conv_to_kernel if layer.kind == "conv" else _linear_to_kernel
        values[("params", *layer.path, "kernel")] = to_kernel(state[f"{name}.weight"])
        if layer.has_bias:
            values[("params", *layer.path, "bias")] = _f32(state[f"{name}.bias"])
        elif f"{name}.bias" in state:
            folded[layer.folds_into] = _f32(state[f"{name}.bias"])
        if f"{name}.mask" in state:
            scores[layer.path] = to_kernel(state[f"{name}.mask"])
        if f"{name}.b_mask" in state:
            raw = state[f"{name}.b_mask"]
            if not np.isin(raw, (0, 1)).all():
                raise FileContentError(f"{name}.b_mask must hold only 0 and 1 (a binary mask)")
            masks[layer.path] = to_kernel(raw).astype(bool)
    for layer in layout.layers:
        if layer.kind != "bn":
            continue
        t = layer.torch
        values[("params", *layer.path, "scale")] = _f32(state[f"{t}.weight"])
        values[("params", *layer.path, "bias")] = _f32(state[f"{t}.bias"])
        # A conv bias in front of a batch norm only shifts the mean the norm subtracts.
        mean = _f32(state[f"{t}.running_mean"]) - folded.get(layer.path, 0.0)
        values[("batch_stats", *layer.path, "mean")] = _f32(mean)
        values[("batch_stats", *layer.path, "var")] = _f32(state[f"{t}.running_var"])

    variables = _fill(layout.abstract, lambda path, _: values[path])
    params = layout.abstract["params"]
    kernel_at = lambda found: lambda path, _: found.get(path[:-1]) if path[-1] == "kernel" else None
    return (
        variables,
        _fill(params, kernel_at(scores)) if scores else None,
        _fill(params, kernel_at(masks)) if masks else None,
    )


def import_checkpoint(
    path: str | os.PathLike,
    model_name: str,
    num_classes: int | None = None,
    *,
    allow_pickle: bool = False,
    **model_kwargs,
) -> tuple[PyTree, PyTree | None, PyTree | None]:
    """Reads a checkpoint file and converts it: `to_flax(load_state_dict(path), ...)`.

    Args:
      path: `.safetensors`, `.npz`, or a PyTorch file (`.pth`, `.pt`, ...; needs PyTorch); for
        a Llama-family model (`smollm2_135m`, `llama`) a `.gguf` file, a Hugging Face folder or
        a `.safetensors` file with `config.json` beside it (`io.llama_weights`).
      model_name: a registered model (`jackpots_jax.models.names()`).
      num_classes: number of classes; by default read from the classifier's weight.
      allow_pickle: see `load_state_dict`.
      **model_kwargs: model options passed to `models.create`.

    Returns:
      `(variables, scores, masks)` as from `to_flax`.

    Raises:
      CheckpointMismatchError: the file does not match the model (the keys are listed).
    """
    converter = models.spec(model_name).converter
    if converter == "vit":
        return _vit_import(path, model_name, num_classes, allow_pickle, model_kwargs)
    if converter == "llama":
        from jackpots_jax.io import llama_weights

        return llama_weights.import_for_model(path, model_name, num_classes, **model_kwargs)
    state = load_state_dict(path, allow_pickle=allow_pickle)
    return to_flax(state, model_name, num_classes, **model_kwargs)


def _vit_import(path, model_name, num_classes, allow_pickle, options):
    """A ViT checkpoint (timm safetensors, vision_transformer / big_vision `.npz`, or an export
    of this package) as the plain-dict variables of the registry's ViT (`io.vit_weights`)."""
    from jackpots_jax.io import vit_weights
    from jackpots_jax.models import vit

    config = vit.get_config(model_name, **options)
    state, scores, masks = vit_weights.import_checkpoint(
        path, config, num_classes, allow_pickle=allow_pickle
    )
    params = jax.tree.map(np.asarray, _plain(state))

    def like_params(tree):
        if tree is None:
            return None
        found = {n: np.asarray(v) for n, v in named_leaves(tree) if v is not None}
        return jax.tree_util.tree_map_with_path(lambda p, _: found.get(path_str(p)), params)

    return {"params": params, "batch_stats": {}}, like_params(scores), like_params(masks)


def _plain(state: Any) -> PyTree:
    from flax import nnx

    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def _conv_to_kernel(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(_f32(weight).transpose(2, 3, 1, 0))  # OIHW -> HWIO


def _linear_to_kernel(weight: np.ndarray) -> np.ndarray:
    # A classifier stored as a 1x1 conv is a linear layer with two trailing unit axes.
    return np.ascontiguousarray(_f32(weight).reshape(weight.shape[:2]).T)


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x, np.float32)


def _fill(abstract: PyTree, value_at) -> PyTree:
    """A tree of the structure of `abstract` with `value_at(path tuple, leaf)` at every leaf."""
    names = lambda path: tuple(str(k.key) for k in path)
    return jax.tree_util.tree_map_with_path(lambda p, leaf: value_at(names(p), leaf), abstract)


def _check_keys(
    layout: _Layout, state: Mapping[str, np.ndarray], head: str, model_kwargs: Mapping
) -> None:
    """Raises CheckpointMismatchError unless `state` has exactly the model's keys and shapes."""
    required: dict[str, list[tuple[int, ...]] | None] = {}
    optional: dict[str, list[tuple[int, ...]] | None] = {}
    params = layout.abstract["params"]
    for layer in layout.layers:
        t = head if layer.path == layout.classifier else layer.torch
        if layer.kind == "bn":
            channels = [tuple(_get(params, layer.path)["scale"].shape)]
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                required[f"{t}.{leaf}"] = channels
            optional[f"{t}.num_batches_tracked"] = None
            continue
        module = _get(params, layer.path)
        shape = _torch_shape(layer, tuple(module["kernel"].shape))
        shapes = [shape] if layer.kind == "conv" else [shape, (*shape, 1, 1)]
        required[f"{t}.weight"] = shapes
        bias = [(shape[0],)]
        if layer.has_bias:
            required[f"{t}.bias"] = bias
        elif layer.folds_into is not None:
            optional[f"{t}.bias"] = bias
        stored = state.get(f"{t}.weight")
        if stored is not None and tuple(stored.shape) in shapes:
            shapes = [tuple(stored.shape)]  # scores and masks must match the stored weight
        optional[f"{t}.mask"] = shapes
        optional[f"{t}.b_mask"] = shapes

    missing = [k for k in required if k not in state]
    unexpected = [k for k in state if k not in required and k not in optional]
    mismatched = []
    for key, value in state.items():
        shapes = required.get(key, optional.get(key))
        if shapes is not None and tuple(value.shape) not in shapes:
            mismatched.append((key, tuple(value.shape), shapes[0]))
    if missing or unexpected or mismatched:
        options = "".join(f", {k}={v!r}" for k, v in sorted(model_kwargs.items()))
        subject = (
            f"checkpoint does not match model {layout.model_name!r} "
            f"(num_classes={layout.num_classes}{options})"
        )
        found = models.describe_checkpoint({k: v.shape for k, v in state.items()})
        wanted = models.describe_checkpoint({k: v[0] for k, v in required.items()})
        hint = found if found != wanted else None
        raise CheckpointMismatchError(
            subject, missing=missing, unexpected=unexpected, mismatched=mismatched, hint=hint
        )


# ---------------------------------------------------------------------------------------------
# Export


def to_torch_state_dict(
    variables: PyTree,
    masks: PyTree | None,
    model_name: str,
    *,
    scores: PyTree | None = None,
    classifier: str | None = None,
    **model_kwargs,
) -> StateDict:
    """Converts Flax variables (and a jackpot's masks) to a PyTorch-style state dict.

    Args:
      variables: `{'params', 'batch_stats'}` of the model (numpy or jax arrays).
      masks: `None` (export the weights as they are) or a tree with the structure of `params` (or
        a prefix of it) whose leaves are `None` or 0/1 / bool arrays of a kernel's shape.
      model_name: the registered model the variables belong to.
      scores: optional tree like `masks` with the search scores, written as `<layer>.mask`.
      classifier: `"linear"` writes the classifier as `[classes, features]`, `"conv1x1"` as
        `[classes, features, 1, 1]` (the reference code's CIFAR models). Default: `"conv1x1"` for
        `vgg19` and the CIFAR ResNets, `"linear"` otherwise.
      **model_kwargs: model options passed to `models.create` (e.g. `width`).

    Returns:
      `{key: numpy array}` in the scheme of this module's docstring: masked weights `W * M`,
      masks as float32 `<layer>.b_mask`, scores as `<layer>.mask`, batch-norm buffers.

    Raises:
      CheckpointMismatchError: the variables, masks or scores do not match the model (the
        offending paths are listed).
      ValueError: an unknown `classifier` or a mask that is not 0/1.
    """
    if classifier is None:
        classifier = "conv1x1" if _torch_layout(model_name).classifier_as_conv else "linear"
    if classifier not in ("linear", "conv1x1"):
        raise ValueError(f"classifier must be 'linear' or 'conv1x1', got {classifier!r}")
    head_path = (models.spec(model_name).classifier, "kernel")
    head = _get(variables.get("params", {}), head_path)
    num_classes = int(head.shape[-1]) if head is not None and np.ndim(head) == 2 else 1
    layout = _layout(model_name, num_classes, tuple(sorted(model_kwargs.items())))
    _check_variables(layout, variables, masks, scores)

    params, stats = variables["params"], variables.get("batch_stats", {})
    state: StateDict = {}
    for layer in layout.layers:
        module, t = _get(params, layer.path), layer.torch
        if layer.kind == "bn":
            running = _get(stats, layer.path)
            state[f"{t}.weight"] = _f32(module["scale"])
            state[f"{t}.bias"] = _f32(module["bias"])
            state[f"{t}.running_mean"] = _f32(running["mean"])
            state[f"{t}.running_var"] = _f32(running["var"])
            state[f"{t}.num_batches_tracked"] = np.array(0, np.int64)
            continue
        if layer.kind == "conv":
            to_torch = lambda k: np.ascontiguousarray(_f32(k).transpose(3, 2, 0, 1))
        elif classifier == "conv1x1" and layer.path == layout.classifier:
            to_torch = lambda k: np.ascontiguousarray(_f32(k).T[:, :, None, None])
        else:
            to_torch = lambda k: np.ascontiguousarray(_f32(k).T)
        kernel = _f32(module["kernel"])
        mask = _get(masks, (*layer.path, "kernel")) if masks is not None else None
        if mask is not None:
            mask = np.asarray(mask)
            if not np.isin(mask, (0, 1)).all():
                raise ValueError(f"the mask of params/{'/'.join(layer.path)} is not 0/1")
            kernel = kernel * mask.astype(np.float32)
            state[f"{t}.b_mask"] = to_torch(mask)
        state[f"{t}.weight"] = to_torch(kernel)
        if layer.has_bias:
            state[f"{t}.bias"] = _f32(module["bias"])
        score = _get(scores, (*layer.path, "kernel")) if scores is not None else None
        if score is not None:
            state[f"{t}.mask"] = to_torch(score)
    return state


def export_state_dict(
    variables: PyTree,
    masks: PyTree | None,
    model_name: str,
    path: str | os.PathLike,
    *,
    scores: PyTree | None = None,
    classifier: str | None = None,
    **model_kwargs,
) -> StateDict:
    """Writes a jackpot (`W * M` plus the masks) as a PyTorch-style state dict file.

    Args:
      variables: `{'params', 'batch_stats'}` of the model.
      masks: the jackpot's masks (see `to_torch_state_dict`), or `None` for dense weights.
      model_name: the registered model the variables belong to.
      path: `.safetensors` (recommended; no PyTorch needed), `.npz`, or `.pth` / `.pt`.
      scores: optional scores, written as `<layer>.mask`.
      classifier: `"linear"` or `"conv1x1"` (see `to_torch_state_dict`).
      **model_kwargs: model options passed to `models.create`.

    Returns:
      The state dict that was written. `import_checkpoint(path, model_name)` reads it back,
      masks included; in PyTorch, `model.load_state_dict` takes it once the `.b_mask` / `.mask`
      entries are popped (or into the reference code's masked layers as they are).
    """
    if models.spec(model_name).converter == "vit":
        from jackpots_jax.io import vit_weights
        from jackpots_jax.models import vit

        config = vit.get_config(model_name, **model_kwargs)
        return vit_weights.export_timm(variables["params"], config, path, masks, scores=scores)
    if models.spec(model_name).converter == "llama":
        from jackpots_jax.io import llama_weights
        from jackpots_jax.models import llama

        vocab = np.shape(variables["params"]["embed"]["embedding"])[0]
        config = llama.config_of(model_name, vocab, **model_kwargs)
        return llama_weights.export_hf(variables["params"], config, path, masks, scores=scores)
    state = to_torch_state_dict(
        variables, masks, model_name, scores=scores, classifier=classifier, **model_kwargs
    )
    save_state_dict(state, path)
    return state


def _check_variables(
    layout: _Layout, variables: PyTree, masks: PyTree | None, scores: PyTree | None
) -> None:
    """Raises CheckpointMismatchError unless the trees fit the model, naming the paths."""

    def shapes(tree: PyTree, prefix: str) -> dict[str, tuple[int, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
        return {
            prefix + "/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(v))
            for p, v in flat
            if v is not None
        }

    want = shapes(dict(layout.abstract), "")
    got = shapes(dict(variables), "")
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
    kernels = {k: v for k, v in want.items() if k.startswith("params/") and k.endswith("/kernel")}
    for name, tree in (("masks", masks), ("scores", scores)):
        for key, shape in (shapes(tree, "params/") if tree is not None else {}).items():
            if key not in kernels:
                unexpected.append(f"{name}: {key}")
            elif shape != kernels[key]:
                mismatched.append((f"{name}: {key}", shape, kernels[key]))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"variables do not match model {layout.model_name!r} "
            f"(num_classes={layout.num_classes})",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
