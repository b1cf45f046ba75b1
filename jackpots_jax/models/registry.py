"""Models by name: `create("resnet32_w2", num_classes=10)`, `names()`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jackpots_jax.models import layers
from jackpots_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from jackpots_jax.models.resnet_cifar import CifarResNet
from jackpots_jax.models.small import FashionCNN
from jackpots_jax.models.vgg import VGG, VGG19


def _cifar_resnet(depth: int, default_width: int = 1) -> Callable[..., nn.Module]:
    def build(num_classes: int, dtype: Any, width: int = default_width) -> nn.Module:
        return CifarResNet(depth=depth, num_classes=num_classes, width=width, dtype=dtype)

    return build


def _resnet(stage_sizes: tuple[int, ...], block: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int, dtype: Any) -> nn.Module:
        return ResNet(stage_sizes=stage_sizes, block=block, num_classes=num_classes, dtype=dtype)

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet20": _cifar_resnet(20),
    "resnet32": _cifar_resnet(32),
    "resnet56": _cifar_resnet(56),
    # The lottery-jackpots reference code's CIFAR ResNet-32 (widths 32/64/128).
    "resnet32_w2": _cifar_resnet(32, default_width=2),
    "vgg19": lambda num_classes, dtype: VGG(cfg=VGG19, num_classes=num_classes, dtype=dtype),
    "resnet18": _resnet((2, 2, 2, 2), BasicBlock),
    "resnet34": _resnet((3, 4, 6, 3), BasicBlock),
    "resnet50": _resnet((3, 4, 6, 3), Bottleneck),
    "fmnist_cnn": lambda num_classes, dtype: FashionCNN(num_classes=num_classes, dtype=dtype),
}


_CIFAR, _IMAGENET, _FMNIST = (32, 32, 3), (224, 224, 3), (28, 28, 1)
_INPUT_SHAPES = {
    name: _CIFAR for name in ("resnet20", "resnet32", "resnet56", "resnet32_w2", "vgg19")
}
_INPUT_SHAPES |= {"resnet18": _IMAGENET, "resnet34": _IMAGENET, "resnet50": _IMAGENET}
_INPUT_SHAPES |= {"fmnist_cnn": _FMNIST}


def names() -> tuple[str, ...]:
    """The registered model names, sorted."""
    return tuple(sorted(_REGISTRY))


def create(name: str, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> nn.Module:
    """Builds a registered model.

    Args:
      name: one of `names()`.
      num_classes: number of logits (a positive integer).
      dtype: compute dtype of the convolutions and matmuls, `jnp.float32` (default) or
        `jnp.bfloat16` (or their names). Parameters stay float32 and are cast where they are
        used; batch-norm statistics and the logits are float32 either way.
      **kwargs: model options; the CIFAR ResNets take `width` (an integer multiplier), the other
        models take none.

    Returns:
      A Flax Linen module: `model.apply(variables, x, train=False)` gives float32 logits
      `[batch, num_classes]` for NHWC images `x`; with `train=True` pass `mutable=["batch_stats"]`.

    Raises:
      ValueError: an unknown name, a `num_classes` that is not a positive integer, or an option
        the model does not take.

    Example:
      >>> model = create("resnet20", num_classes=10, width=2)
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(names())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    dtype = layers.compute_dtype(dtype)
    build = _REGISTRY[name]
    allowed = [p for p in inspect.signature(build).parameters if p not in ("num_classes", "dtype")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} takes no option(s) {unknown}; allowed options: {allowed or 'none'}"
        )
    return build(num_classes, dtype, **kwargs)


def input_shape(name: str) -> tuple[int, int, int]:
    """The `(height, width, channels)` of one input image the model is built for.

    Args:
      name: one of `names()`.

    Returns:
      `(32, 32, 3)` for the CIFAR models, `(224, 224, 3)` for the ImageNet ResNets (any size of at
      least 32 works), `(28, 28, 1)` for `fmnist_cnn` (which needs exactly that).

    Raises:
      ValueError: an unknown name.
    """
    if name not in _INPUT_SHAPES:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(names())}")
    return _INPUT_SHAPES[name]
