"""Models by name, collected from the `SPECS` of each family file.

Adding a model family is one file declaring its `SPECS` (see `spec.ModelSpec`) and one entry in
`_FAMILIES` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jackpots_jax.models import layers, llama, resnet, resnet_cifar, small, small_nnx, vgg, vit
from jackpots_jax.models.spec import ModelSpec, Network, linen_network, nnx_network

_FAMILIES = (resnet_cifar, vgg, resnet, small, small_nnx, vit, llama)
_SPECS: dict[str, ModelSpec] = {s.name: s for family in _FAMILIES for s in family.SPECS}


def names() -> tuple[str, ...]:
    """The registered model names, sorted."""
    return tuple(sorted(_SPECS))


def spec(name: str) -> ModelSpec:
    """The `ModelSpec` of a registered model.

    Raises:
      ValueError: an unknown name (the known ones are listed).
    """
    if name not in _SPECS:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(names())}")
    return _SPECS[name]


def _checked(name: str, num_classes: int, dtype: Any, options: Mapping[str, Any]):
    s = spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    dtype = layers.compute_dtype(dtype)
    allowed = list(s.options)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} takes no option(s) {unknown}; allowed options: {allowed or 'none'}"
        )
    return s, dtype


def create(name: str, num_classes: int, dtype: Any = jnp.float32, **options) -> Any:
    """Builds a registered model.

    Args:
      name: one of `names()`.
      num_classes: number of logits (a positive integer).
      dtype: compute dtype of the convolutions and matmuls, `jnp.float32` (default) or
        `jnp.bfloat16` (or their names). Parameters stay float32 and are cast where they are
        used; batch-norm statistics and the logits are float32 either way.
      **options: model options; the CIFAR ResNets take `width` (an integer multiplier). An NNX
        model takes `rngs` (an `nnx.Rngs`, default `nnx.Rngs(0)`), since building it initialises
        its weights.

    Returns:
      A Flax Linen module (`model.apply(variables, x, train=False)` gives float32 logits
      `[batch, num_classes]` for NHWC images `x`; with `train=True` pass
      `mutable=["batch_stats"]`), or an initialised NNX module for an NNX model.

    Raises:
      ValueError: an unknown name, a `num_classes` that is not a positive integer, or an option
        the model does not take.

    Example:
      >>> model = create("resnet20", num_classes=10, width=2)
    """
    rngs = options.pop("rngs", None)
    s, dtype = _checked(name, num_classes, dtype, options)
    if s.kind == "nnx":
        from flax import nnx

        return s.build(num_classes, dtype, rngs=rngs or nnx.Rngs(0), **options)
    if rngs is not None:
        raise ValueError(f"model {name!r} is a Linen module: it takes no `rngs`")
    return s.build(num_classes, dtype, **options)


def network(name: str, num_classes: int, dtype: Any = jnp.float32, **options) -> Network:
    """A registered model built for `num_classes`: `init(key)`, `apply_fn` (see `Network`).

    Linen and NNX models come out alike: variables as plain nested dicts, and an apply function
    `apply_fn(params, batch_stats, images, train) -> (logits, new_batch_stats)`.

    Example:
      >>> net = network("fmnist_cnn", 10)
      >>> params, batch_stats = net.init(jax.random.key(0))
      >>> logits, _ = net.apply_fn(params, batch_stats, images, False)
    """
    s, dtype = _checked(name, num_classes, dtype, options)
    make = nnx_network if s.kind == "nnx" else linen_network
    return make(s, num_classes, dtype, options)


def input_shape(name: str) -> tuple[int, ...]:
    """The shape of one input: `(height, width, channels)` of an image the model is built for, or
    `(seq_len,)` of a language model's token sequence.

    Raises:
      ValueError: an unknown name.
    """
    return spec(name).input_shape


def describe_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What registered architecture a PyTorch state dict's `{key: shape}` looks like, if any."""
    seen = []
    for s in _SPECS.values():
        describe = s.torch.describe if s.torch is not None else None
        if describe is None or describe in seen:
            continue
        seen.append(describe)
        found = describe(shapes)
        if found:
            return found
    return None
