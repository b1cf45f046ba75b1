"""A small CNN for the offline default (Fashion-MNIST, 28x28x1), cheap to train on a CPU.

Two 3x3 conv layers, each max-pooled *before* its batch norm and ReLU (so the normalisation runs
on a quarter of the positions), then a hidden dense layer and the classifier:

  conv1 1->16 @28x28, pool, bn1, relu | conv2 16->32 @14x14, pool, bn2, relu |
  flatten 7x7x32 -> fc1 (128, no bias), bn3, relu | head -> classes

206,736 kernel weights (200,704 of them in `fc1`, which costs few FLOPs): over-parameterised for
the task, so a 90%-sparse sub-network can hold its accuracy. Measured on two CPU cores: about 12 s
per epoch of dense training (60k images, batch 128); SGD momentum 0.9, lr 0.05 with cosine decay
to 0, weight decay 5e-4, batch 128, 8 epochs, no augmentation reaches 92.5% test accuracy.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jackpots_jax.models import layers
from jackpots_jax.models.spec import ModelSpec


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pool with stride 2 (odd trailing rows / columns dropped, as in PyTorch).

    The forward equals `nn.max_pool(x, (2, 2), strides=(2, 2))`. Written as a max over a reshape
    because the gradient of `nn.max_pool` (XLA's select-and-scatter) is slow on CPU: this halves
    the time of a training step of this model on two cores.
    """
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class FashionCNN(nn.Module):
    """Small conv net for 28x28 grey-scale images.

    Attributes:
      num_classes: number of logits.
      channels: output channels of the two conv layers.
      hidden: width of the hidden dense layer `fc1`.
      dtype: compute dtype of the convs and matmuls (params, BN statistics, logits: float32).

    Example:
      >>> model = FashionCNN(num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    """

    num_classes: int
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Logits `[batch, num_classes]` (float32) of NHWC images `x` (28x28x1)."""
        x = layers.inputs(x)
        for i, features in enumerate(self.channels, start=1):
            x = layers.conv(features, 3, name=f"conv{i}", dtype=self.dtype)(x)
            x = max_pool_2x2(x)
            x = nn.relu(layers.batch_norm(train, f"bn{i}", self.dtype)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            self.hidden, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="fc1"
        )(x)
        x = nn.relu(layers.batch_norm(train, f"bn{len(self.channels) + 1}", self.dtype)(x))
        return layers.logits(layers.head(self.num_classes, self.dtype)(x))


SPECS = (
    ModelSpec(
        name="fmnist_cnn",
        build=lambda num_classes, dtype: FashionCNN(num_classes=num_classes, dtype=dtype),
        input_shape=(28, 28, 1),
        fixed_input_shape=True,  # the flatten before fc1 fixes the image size
    ),
)
