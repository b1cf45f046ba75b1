"""VGG for CIFAR in the layout of the lottery-jackpots reference code (and the common CIFAR code).

VGG-19: 16 3x3 conv+BN+ReLU layers in five groups (64, 64 | 128, 128 | 256 x4 | 512 x4 | 512 x4),
each group followed by a 2x2 max-pool, then the classifier 512 -> classes with no hidden dense
layers. The reference code ends its feature stack with `AvgPool2d(kernel_size=1)`, an identity:
after five pools a 32x32 input is 1x1, and its classifier is a 1x1 conv on that map. Here the
remaining map is averaged (identical at 32x32, and well defined at other sizes) and the classifier
is a dense layer named `head`.

Module names are `conv1` ... `conv16` and `bn1` ... `bn16`; `jackpots_jax.convert` maps them to the
PyTorch `features.<index>` keys from `VGG.cfg`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jackpots_jax.models import layers

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
