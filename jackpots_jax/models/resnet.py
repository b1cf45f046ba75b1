"""ImageNet ResNets in torchvision's layout: ResNet-18/34 (basic blocks) and ResNet-50 (bottleneck).

A 7x7 stride-2 stem conv, a 3x3 stride-2 max-pool, four stages of widths 64/128/256/512 (stride 2
at the start of stages 2-4), global average pooling and the classifier. The bottleneck puts its
stride on the 3x3 conv (torchvision's "ResNet v1.5", also the lottery-jackpots reference code's);
a projection shortcut (1x1 conv + BN) is used where the shape changes.

Module names follow torchvision (`conv1`, `bn1`, `layer1_0/conv1`, `layer1_0/downsample_conv`,
`layer1_0/downsample_bn`, ..., the classifier `head`); `torch_name` maps them to torchvision's keys
(`layer1_0/downsample_conv` -> `layer1.0.downsample.0`; `head` is `fc`). The CIFAR ResNets share
that naming and `describe_resnet_keys`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jackpots_jax.models import layers
from jackpots_jax.models.spec import ModelSpec, TorchLayout


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or projection shortcut (expansion 1).

    Attributes:
      planes: output channels.
      stride: stride of the first conv and of the projection.
    """

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = layers.conv(self.planes, 3, self.stride, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(layers.batch_norm(train, "bn1", self.dtype)(y))
        y = layers.conv(self.planes, 3, name="conv2", dtype=self.dtype)(y)
        y = layers.batch_norm(train, "bn2", self.dtype)(y)
        return nn.relu(y + _projection(x, self.planes, self.stride, train, self.dtype))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 conv+BN layers, output `4 * planes` channels.

    Attributes:
      planes: channels of the inner convs; the block outputs `4 * planes`.
      stride: stride of the 3x3 conv and of the projection.
    """

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        out = self.planes * self.expansion
        y = layers.conv(self.planes, 1, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(layers.batch_norm(train, "bn1", self.dtype)(y))
        y = layers.conv(self.planes, 3, self.stride, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(layers.batch_norm(train, "bn2", self.dtype)(y))
        y = layers.conv(out, 1, name="conv3", dtype=self.dtype)(y)
        y = layers.batch_norm(train, "bn3", self.dtype)(y)
        return nn.relu(y + _projection(x, out, self.stride, train, self.dtype))


def _projection(x: jnp.ndarray, out: int, stride: int, train: bool, dtype: Any) -> jnp.ndarray:
    """The shortcut: identity, or a strided 1x1 conv + BN where the shape changes.

    Called inside a block's compact `__call__`, so the layers belong to that block.
    """
    if stride == 1 and x.shape[-1] == out:
        return x
    x = layers.conv(out, 1, stride, name="downsample_conv", dtype=dtype)(x)
    return layers.batch_norm(train, "downsample_bn", dtype)(x)


class ResNet(nn.Module):
    """ResNet for ImageNet-sized inputs (any size works; 224x224 is the standard).

    Attributes:
      stage_sizes: number of blocks in each of the four stages, e.g. `(3, 4, 6, 3)`.
      block: `BasicBlock` or `Bottleneck`.
      num_classes: number of logits.
      dtype: compute dtype of the convs and matmuls (params, BN statistics, logits: float32).

    Example:
      >>> model = ResNet((3, 4, 6, 3), Bottleneck, num_classes=1000)       # ResNet-50
      >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    """

    stage_sizes: tuple[int, ...]
    block: type[BasicBlock] | type[Bottleneck]
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Logits `[batch, num_classes]` (float32) of NHWC images `x`."""
        x = layers.inputs(x)
        x = layers.conv(64, 7, 2, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(layers.batch_norm(train, "bn1", self.dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                x = self.block(64 * 2**stage, stride, self.dtype, name=f"layer{stage + 1}_{i}")(
                    x, train
                )
        x = jnp.mean(x, axis=(1, 2))
        return layers.logits(layers.head(self.num_classes, self.dtype)(x))


# ---------------------------------------------------------------------------------------------
# Registration: names, input shape, PyTorch layout.

_TORCH_RENAME = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def torch_name(path: tuple[str, ...]) -> str:
    """The PyTorch module name of a ResNet module path: `layer1_0/downsample_conv` ->
    `layer1.0.downsample.0` (torchvision's and the CIFAR ResNet code's naming)."""
    parts = [_TORCH_RENAME.get(p, re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", p)) for p in path]
    return ".".join(parts)


def describe_resnet_keys(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What ResNet a state dict's `{key: shape}` looks like (depth, stages, CIFAR width)."""
    blocks: dict[int, set[int]] = {}
    for key in shapes:
        match = re.match(r"layer(\d+)\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not blocks:
        return None
    counts = [len(blocks[s]) for s in sorted(blocks)]
    if len(blocks) == 4:
        per_block = 3 if any(".conv3." in k for k in shapes) else 2
        depth = per_block * sum(counts) + 2
        return f"the keys look like an ImageNet ResNet-{depth} checkpoint (blocks {counts})"
    stem = shapes.get("conv1.weight", ())
    width = f" of width {stem[0] // 16}" if len(stem) == 4 else ""
    depth = 2 * sum(counts) + 2
    return f"the keys look like a CIFAR ResNet-{depth}{width} checkpoint (blocks {counts})"


def _build(stage_sizes: tuple[int, ...], block: type[nn.Module], num_classes: int, dtype: Any):
    return ResNet(stage_sizes=stage_sizes, block=block, num_classes=num_classes, dtype=dtype)


_TORCHVISION = TorchLayout(
    module_name=torch_name, classifier_names=("fc",), describe=describe_resnet_keys
)
SPECS = tuple(
    ModelSpec(
        name=name,
        build=functools.partial(_build, stages, block),
        input_shape=(224, 224, 3),
        torch=_TORCHVISION,
    )
    for name, stages, block in (
        ("resnet18", (2, 2, 2, 2), BasicBlock),
        ("resnet34", (3, 4, 6, 3), BasicBlock),
        ("resnet50", (3, 4, 6, 3), Bottleneck),
    )
)
