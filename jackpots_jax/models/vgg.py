"""VGG for CIFAR in the layout of the lottery-jackpots reference code (and the common CIFAR code).

VGG-19: 16 3x3 conv+BN+ReLU layers in five groups (64, 64 | 128, 128 | 256 x4 | 512 x4 | 512 x4),
each group followed by a 2x2 max-pool, then the classifier 512 -> classes with no hidden dense
layers. The reference code ends its feature stack with `AvgPool2d(kernel_size=1)`, an identity:
after five pools a 32x32 input is 1x1, and its classifier is a 1x1 conv on that map. Here the
remaining map is averaged (identical at 32x32, and well defined at other sizes) and the classifier
is a dense layer named `head`.

Module names are `conv1` ... `conv16` and `bn1` ... `bn16`, mapped to the PyTorch
`features.<index>` keys of an `nn.Sequential` laid out by the cfg; the classifier is `classifier`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jackpots_jax.models import layers
from jackpots_jax.models.spec import ModelSpec, TorchLayout

# Channels of each conv; "M" is a 2x2 max-pool.
VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M")
VGG19 += (512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with batch norm for small images.

    Attributes:
      cfg: conv widths in order, `"M"` for a 2x2 max-pool (`VGG19` for VGG-19).
      num_classes: number of logits.
      dtype: compute dtype of the convs and matmuls (params, BN statistics, logits: float32).

    Example:
      >>> model = VGG(VGG19, num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    """

    cfg: tuple[int | str, ...]
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Logits `[batch, num_classes]` (float32) of NHWC images `x`."""
        x = layers.inputs(x)
        index = 0
        for item in self.cfg:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            elif isinstance(item, int) and item > 0:
                index += 1
                x = layers.conv(item, 3, name=f"conv{index}", dtype=self.dtype)(x)
                x = nn.relu(layers.batch_norm(train, f"bn{index}", self.dtype)(x))
            else:
                raise ValueError(f"cfg entries must be positive ints or 'M', got {item!r}")
        x = jnp.mean(x, axis=(1, 2))
        return layers.logits(layers.head(self.num_classes, self.dtype)(x))


# ---------------------------------------------------------------------------------------------
# Registration: names, input shape, PyTorch layout.


def torch_names(cfg: tuple[int | str, ...]) -> dict[tuple[str, ...], str]:
    """Flax module path -> PyTorch `features.<index>` of an `nn.Sequential` laid out by `cfg`.

    Each conv layer takes three indices (conv, batch norm, ReLU), each max-pool one.
    """
    index, conv, names = 0, 0, {}
    for item in cfg:
        if item == "M":
            index += 1
            continue
        conv += 1
        names[(f"conv{conv}",)] = f"features.{index}"
        names[(f"bn{conv}",)] = f"features.{index + 1}"
        index += 3
    return names


def describe_vgg_keys(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What VGG a state dict's `{key: shape}` looks like (its number of conv layers)."""
    convs = [k for k, v in shapes.items() if k.startswith("features.") and len(v) == 4]
    if not convs:
        return None
    return f"the keys look like a VGG checkpoint with {len(convs)} conv layers (vgg19: 16)"


_VGG19_NAMES = torch_names(VGG19)
SPECS = (
    ModelSpec(
        name="vgg19",
        build=lambda num_classes, dtype: VGG(cfg=VGG19, num_classes=num_classes, dtype=dtype),
        input_shape=(32, 32, 3),
        torch=TorchLayout(
            module_name=lambda path: _VGG19_NAMES.get(path, ".".join(path)),
            classifier_names=("classifier",),
            classifier_as_conv=True,
            describe=describe_vgg_keys,
        ),
    ),
)
