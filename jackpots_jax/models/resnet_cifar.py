"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/56 with a width multiplier.

Depth `6n + 2`: a 3x3 stem conv, three stages of `n` basic blocks with widths `16w, 32w, 64w`
(the first block of stages 2 and 3 has stride 2), global average pooling and the classifier.
The shortcut is "option A", as in the common CIFAR ResNet code and the lottery-jackpots reference
code: where the shape changes, the input is subsampled (`x[:, ::2, ::2]`) and zero-padded in the
channel dimension, split evenly on both sides, so shortcuts have no weights.

The reference code's ResNet-32 has widths 32/64/128: `CifarResNet(depth=32, width=2)`, registered
as `resnet32_w2`.

Module names follow the PyTorch code (`conv1`, `bn1`, `layer1_0/conv1`, ..., the classifier
`head`), mapped to `layer1.0.conv1`; the reference code names its classifier `fc` and stores it as
a 1x1 conv, the common CIFAR ResNet code as a `Linear` named `linear`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jackpots_jax.models import layers
from jackpots_jax.models.resnet import describe_resnet_keys, torch_name
from jackpots_jax.models.spec import ModelSpec, TorchLayout


def _shortcut(x: jnp.ndarray, planes: int, stride: int) -> jnp.ndarray:
    """Option-A shortcut: subsample spatially and zero-pad channels evenly on both sides."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = planes - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class CifarBasicBlock(nn.Module):
    """Two 3x3 conv+BN layers around an option-A identity shortcut.

    Attributes:
      planes: output channels of both convs.
      stride: stride of the first conv (and of the shortcut's subsampling).
    """

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = layers.conv(self.planes, 3, self.stride, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(layers.batch_norm(train, "bn1", self.dtype)(y))
        y = layers.conv(self.planes, 3, name="conv2", dtype=self.dtype)(y)
        y = layers.batch_norm(train, "bn2", self.dtype)(y)
        return nn.relu(y + _shortcut(x, self.planes, self.stride))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with widths `16w, 32w, 64w`.

    Attributes:
      depth: total number of weighted layers, `6n + 2` (20, 32, 44, 56, 110, ...).
      num_classes: number of logits.
      width: integer width multiplier (2 gives the reference code's ResNet-32).
      dtype: compute dtype of the convs and matmuls (params, BN statistics, logits: float32).

    Example:
      >>> model = CifarResNet(depth=20, num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> logits = model.apply(variables, jnp.zeros((8, 32, 32, 3)), train=False)  # [8, 10]
    """

    depth: int
    num_classes: int
    width: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Logits `[batch, num_classes]` (float32) of NHWC images `x`."""
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(
                f"depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {self.depth}"
            )
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width must be a positive integer multiplier, got {self.width!r}")
        blocks = (self.depth - 2) // 6
        x = layers.inputs(x)
        x = layers.conv(16 * self.width, 3, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(layers.batch_norm(train, "bn1", self.dtype)(x))
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                block = CifarBasicBlock(
                    planes * self.width, stride, self.dtype, name=f"layer{stage + 1}_{i}"
                )
                x = block(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return layers.logits(layers.head(self.num_classes, self.dtype)(x))


# ---------------------------------------------------------------------------------------------
# Registration: names, input shape, PyTorch layout.


def _builder(depth: int, default_width: int = 1):
    def build(num_classes: int, dtype: Any, width: int = default_width) -> CifarResNet:
        return CifarResNet(depth=depth, num_classes=num_classes, width=width, dtype=dtype)

    return build


_REFERENCE = TorchLayout(
    module_name=torch_name,
    classifier_names=("fc", "linear"),
    classifier_as_conv=True,
    describe=describe_resnet_keys,
)
SPECS = (
    ModelSpec("resnet20", _builder(20), (32, 32, 3), torch=_REFERENCE),
    ModelSpec("resnet32", _builder(32), (32, 32, 3), torch=_REFERENCE),
    ModelSpec("resnet56", _builder(56), (32, 32, 3), torch=_REFERENCE),
    # The lottery-jackpots reference code's CIFAR ResNet-32 (widths 32/64/128).
    ModelSpec("resnet32_w2", _builder(32, default_width=2), (32, 32, 3), torch=_REFERENCE),
)
