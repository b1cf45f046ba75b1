"""The CNNs' checkpoints: PyTorch state dicts <-> Flax variables, strictly, with masks.

Generic over the models' specs: each `ModelSpec` with `converter='torch'` declares its
`TorchLayout` (the PyTorch module name of every Flax module, the classifier's names and shape, how
to recognise its checkpoints), and this module maps every conv, dense and batch-norm module through
it. Linen and NNX models alike: variables are plain nested dicts `{'params', 'batch_stats'}`.

What the registered CNNs import: torchvision ResNet-18/34/50 state dicts, the lottery-jackpots
reference code's CIFAR checkpoints (VGG-19, ResNet-32 of width 2, and its ImageNet ResNet-50: a
dict with a `state_dict` entry, keys maybe prefixed `module.`, the classifier a 1x1 conv, and per
masked layer the scores `<layer>.mask` and the binary mask `<layer>.b_mask`), and the common CIFAR
code's checkpoints (a plain `Linear` classifier, named `linear` in the usual CIFAR ResNet code;
conv biases in front of a batch norm, as in the usual CIFAR VGG code, are folded exactly into the
running mean).

Export: a searched jackpot as a PyTorch-style state dict with torchvision / reference key names.
The scheme, read back by the import:

- `<layer>.weight`: the masked weights `W * M` (conv OIHW, linear `[out, in]`, or the classifier as
  a `[out, in, 1, 1]` conv as in the reference code);
- `<layer>.b_mask`: the binary mask `M` as float32 0/1, same shape as the weight (the reference
  code's name); only for layers that are masked;
- `<layer>.mask`: the scores, when given (the reference code's name for them);
- batch norm: `weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`.

Every mismatch between a checkpoint and the model (a missing key, an unexpected key, a wrong
shape) raises `CheckpointMismatchError` naming the keys: a partial load is never silent.

`import_for_model` and `export_for_model` are this family's entry in `io.weights`' table of
converters (files through `io.formats`).

Example:
  >>> variables, scores, masks = to_flax(load_state_dict("vgg19_c10.pth", allow_pickle=True),
  ...                                    "vgg19")
  >>> state = to_torch_state_dict(variables, masks, "vgg19")
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jackpots_jax import models
from jackpots_jax.io.errors import CheckpointMismatchError, FileContentError
from jackpots_jax.io.formats import StateDict, load_state_dict, save_state_dict, to_numpy

PyTree = Any
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
    state = {k: to_numpy(v) for k, v in state_dict.items()}
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


def import_for_model(
    path: str | os.PathLike,
    model_name: str,
    num_classes: int | None = None,
    *,
    allow_pickle: bool = False,
    **options,
) -> tuple[PyTree, PyTree | None, PyTree | None]:
    """A torchvision / reference-code CNN checkpoint file (`io.weights.import_checkpoint`'s CNN
    case): `to_flax(load_state_dict(path), ...)`."""
    state = load_state_dict(path, allow_pickle=allow_pickle)
    return to_flax(state, model_name, num_classes, **options)


def export_for_model(
    variables: PyTree,
    masks: PyTree | None,
    model_name: str,
    path: str | os.PathLike,
    *,
    scores: PyTree | None = None,
    classifier: str | None = None,
    **options,
) -> StateDict:
    """Writes `to_torch_state_dict(...)` to `path` (`io.weights.export_state_dict`'s CNN case)."""
    state = to_torch_state_dict(
        variables, masks, model_name, scores=scores, classifier=classifier, **options
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
