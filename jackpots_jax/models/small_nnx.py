"""The offline default's small CNN written in Flax NNX: `fmnist_cnn_nnx`.

The same network as `small.FashionCNN` (`fmnist_cnn`), layer for layer and name for name (`conv1`,
`bn1`, `conv2`, `bn2`, `fc1`, `bn3`, `head`), so weights trained with either one load into the
other and a search through either gives the same jackpot. It shows a model searched through the
engine and the command line that is not a Linen module: the steps see only its apply function
(`adapters.nnx_apply`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jackpots_jax.models import layers
from jackpots_jax.models.small import max_pool_2x2
from jackpots_jax.models.spec import ModelSpec


def _batch_norm(features: int, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # PyTorch's BatchNorm2d numerics, as `layers.batch_norm` (Flax momentum 0.9 = PyTorch 0.1).
    return nnx.BatchNorm(
        features, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )


class FashionCNNNNX(nnx.Module):
    """Small conv net for 28x28 grey-scale images, as an NNX module.

    Call `model.train()` or `model.eval()` to choose how batch norm runs (`adapters.nnx_apply`
    does).

    Example:
      >>> model = FashionCNNNNX(num_classes=10, rngs=nnx.Rngs(0))
      >>> logits = model(jnp.zeros((2, 28, 28, 1)))
    """

    def __init__(
        self,
        num_classes: int,
        *,
        channels: tuple[int, ...] = (16, 32),
        hidden: int = 128,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        common = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        cin, side = 1, 28
        for i, features in enumerate(channels, start=1):
            conv = nnx.Conv(
                cin,
                features,
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                kernel_init=layers.conv_init,
                **common,
            )
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", _batch_norm(features, dtype, rngs))
            cin, side = features, side // 2
        self.num_convs = len(channels)
        self.fc1 = nnx.Linear(side * side * cin, hidden, use_bias=False, **common)
        setattr(self, f"bn{len(channels) + 1}", _batch_norm(hidden, dtype, rngs))
        self.head = nnx.Linear(hidden, num_classes, **common)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Logits `[batch, num_classes]` (float32) of NHWC images `x` (28x28x1)."""
        x = layers.inputs(x)
        for i in range(1, self.num_convs + 1):
            x = max_pool_2x2(getattr(self, f"conv{i}")(x))
            x = nnx.relu(getattr(self, f"bn{i}")(x))
        x = self.fc1(x.reshape(x.shape[0], -1))
        x = nnx.relu(getattr(self, f"bn{self.num_convs + 1}")(x))
        return layers.logits(self.head(x))


def _build(num_classes: int, dtype: Any, *, rngs: nnx.Rngs) -> FashionCNNNNX:
    return FashionCNNNNX(num_classes, dtype=dtype, rngs=rngs)


SPECS = (
    ModelSpec(
        name="fmnist_cnn_nnx",
        build=_build,
        input_shape=(28, 28, 1),
        kind="nnx",
        fixed_input_shape=True,
    ),
)
