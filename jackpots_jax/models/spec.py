"""What a model family declares about itself, and a model built from it, ready to run.

A `ModelSpec` is everything the rest of the package knows about one registered model: how to build
it, the images it is built for, whether it is a Flax Linen or NNX module, which of its leaves are
held dense by default, and how its parameters are named in PyTorch checkpoints (`TorchLayout`).
Each family file under `models/` declares the specs of its models in a tuple `SPECS`; the registry
collects them. Nothing outside the family file looks at a model's class.

`Network` is a spec built for a number of classes and a compute dtype: `init(key)` gives its
variables as plain nested dicts `(params, batch_stats)` (the same layout for Linen and NNX models,
so that budgets, checkpoints and the weight importer treat both alike), `apply_fn` is the apply
function every step takes (`adapters.linen_apply` / `adapters.nnx_apply`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jackpots_jax.adapters import linen_apply, nnx_apply

PyTree = Any
KINDS = ("linen", "nnx")
CONVERTERS = ("torch", "vit", "llama")


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _norm_after(path: tuple[str, ...]) -> tuple[str, ...]:
    return (*path[:-1], path[-1].replace("conv", "bn"))


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """How a model's parameters are named and shaped in PyTorch checkpoints.

    The CNNs' importer and exporter (`jackpots_jax.io.torch_weights`) map every Flax module
    holding a `kernel` (conv: HWIO <-> OIHW; dense: `[in, out]` <-> `[out, in]`) or batch-norm
    parameters and statistics to the PyTorch module named by `module_name`.

    Attributes:
      module_name: the PyTorch module name (key prefix) of a Flax module path, e.g.
        `('layer1_0', 'downsample_conv')` -> `'layer1.0.downsample.0'`. Not asked for the
        classifier, whose names are `classifier_names`.
      classifier_names: the names the classifier may have in a checkpoint; the import accepts any
        of them, the export writes the first.
      classifier_as_conv: the export writes the classifier as a `[out, in, 1, 1]` conv (the
        lottery-jackpots reference code's CIFAR models) instead of a `[out, in]` linear layer. The
        import accepts both shapes.
      norm_after: the path of the batch norm that follows a bias-free conv; a conv bias found in a
        checkpoint (the common CIFAR VGG code has them) is folded exactly into its running mean.
      describe: what architecture a checkpoint's `{key: shape}` looks like, for the hint of an
        error message (`"the keys look like a VGG checkpoint with 16 conv layers"`), or `None`
        when the keys are not of this family's kind.
    """

    module_name: Callable[[tuple[str, ...]], str] = _dotted
    classifier_names: tuple[str, ...] = ("head",)
    classifier_as_conv: bool = False
    norm_after: Callable[[tuple[str, ...]], tuple[str, ...]] = _norm_after
    describe: Callable[[Mapping[str, tuple[int, ...]]], str | None] | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
      name: the registry name (`models.create(name, ...)`, `--config.model.name`).
      build: `build(num_classes, dtype, **options)` returns a Linen module; for an NNX model
        `build(num_classes, dtype, *, rngs, **options)` returns the initialised NNX module. Its
        other keyword parameters are the model's options (`width` of a CIFAR ResNet).
      input_shape: the shape of one input: `(height, width, channels)` of the images the model
        is built for, or `(seq_len,)` of a language model's token sequences.
      input_dtype: the dtype of the inputs: `jnp.float32` images, or `jnp.int32` token ids.
      kind: `'linen'` or `'nnx'`.
      fixed_input_shape: the model accepts only `input_shape` (a flatten before a dense layer);
        otherwise any image size works (global pooling).
      classifier: the path of the classifier module in `params` (every model here: `head`).
      dense: regular expressions of the leaves a search keeps dense by default (`prunable_leaves`).
      torch: the PyTorch checkpoint layout, or `None` when weights cannot be imported/exported.
      input_axes: `(regular expression, count)` pairs for kernels whose input axes are not all
        but the last (Flax attention kernels): what a structured pattern (N:M groups, blocks)
        runs along (`jj.layer_budgets(..., input_axes=)`).
      converter: how checkpoints of the model are read and written (`jackpots_jax.io.weights`'
        table `CONVERTERS`): `'torch'` (`io.torch_weights`: the CNNs' PyTorch layout through
        `torch`), `'vit'` (`io.vit_weights`: timm safetensors, vision_transformer and big_vision
        `.npz`) or `'llama'` (`io.llama_weights`: GGUF files, Hugging Face safetensors).
      layer_groups: how reports group per-layer statistics: a leaf path -> `{grouping: group}`
        (e.g. `{"block": "block 3", "kind": "attention"}` for a transformer's query kernel);
        `None`: by kind of kernel only (`conv` or `dense`, see `layer_groups`).
    """

    name: str
    build: Callable[..., Any]
    input_shape: tuple[int, ...]
    input_dtype: Any = jnp.float32
    kind: str = "linen"
    fixed_input_shape: bool = False
    classifier: str = "head"
    dense: tuple[str, ...] = ("head",)
    torch: TorchLayout | None = TorchLayout()
    input_axes: tuple[tuple[str, int], ...] = ()
    converter: str = "torch"
    layer_groups: Callable[[str], Mapping[str, str]] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.converter not in CONVERTERS:
            raise ValueError(
                f"model {self.name!r}: converter must be one of {CONVERTERS}, got "
                f"{self.converter!r}"
            )

    @property
    def options(self) -> tuple[str, ...]:
        """The option names `build` takes besides the number of classes, dtype and rngs."""
        skip = ("num_classes", "dtype", "rngs")
        return tuple(p for p in inspect.signature(self.build).parameters if p not in skip)


def layer_groups(spec: ModelSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict]:
    """Every grouping of the layers `shapes` (path -> kernel shape): `{grouping: {path: group}}`.

    The model's own `layer_groups` when it declares them; `kind` (`conv` for 4-D kernels, `dense`
    for 2-D ones, `other` otherwise) when it does not declare a `kind` grouping itself.
    """
    groups: dict[str, dict[str, str]] = {}
    for path, shape in shapes.items():
        declared = dict(spec.layer_groups(path)) if spec.layer_groups else {}
        declared.setdefault("kind", {4: "conv", 2: "dense"}.get(len(shape), "other"))
        for grouping, group in declared.items():
            groups.setdefault(grouping, {})[path] = str(group)
    return groups


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """A model built for `num_classes` and a compute dtype: initialise it, apply it.

    Attributes:
      spec: the model's spec.
      num_classes: the number of logits.
      dtype: the compute dtype (`jnp.float32` or `jnp.bfloat16`).
      options: the model options it was built with.
      module: the Linen module, or the NNX module's graph definition.
      apply_fn: `apply_fn(params, batch_stats, images, train) -> (logits, new_batch_stats)`.
      init: `init(key, input_shape=None) -> (params, batch_stats)`, plain nested dicts
        (`batch_stats` is `{}` for a model without running statistics).
    """

    spec: ModelSpec
    num_classes: int
    dtype: Any
    options: Mapping[str, Any]
    module: Any
    apply_fn: Callable[..., tuple[jax.Array, PyTree]]
    init: Callable[..., tuple[PyTree, PyTree]]

    def abstract_variables(self, input_shape: tuple[int, ...] | None = None) -> dict[str, PyTree]:
        """`{'params', 'batch_stats'}` as `jax.ShapeDtypeStruct`s; nothing is allocated."""
        params, stats = jax.eval_shape(lambda k: self.init(k, input_shape), jax.random.key(0))
        return {"params": params, "batch_stats": stats}


def linen_network(spec: ModelSpec, num_classes: int, dtype: Any, options: Mapping) -> Network:
    module = spec.build(num_classes, dtype, **options)

    def init(key: jax.Array, input_shape: tuple[int, ...] | None = None):
        x = jnp.zeros((1, *(input_shape or spec.input_shape)), spec.input_dtype)
        variables = module.init(key, x, train=False)
        return variables["params"], variables.get("batch_stats", {})

    return Network(spec, num_classes, dtype, dict(options), module, linen_apply(module), init)


def nnx_network(spec: ModelSpec, num_classes: int, dtype: Any, options: Mapping) -> Network:
    def build(key: jax.Array):
        return spec.build(num_classes, dtype, rngs=nnx.Rngs(key), **options)

    graphdef, _, _ = nnx.split(
        nnx.eval_shape(lambda: build(jax.random.key(0))), nnx.Param, nnx.BatchStat
    )

    def init(key: jax.Array, input_shape: tuple[int, ...] | None = None):
        del input_shape  # an NNX module is built with its shapes
        _, params, stats = nnx.split(build(key), nnx.Param, nnx.BatchStat)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    return Network(spec, num_classes, dtype, dict(options), graphdef, nnx_apply(graphdef), init)
