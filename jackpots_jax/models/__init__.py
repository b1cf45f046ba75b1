"""Flax Linen models and a registry: `create(name, num_classes, **kwargs)`, `names()`.

Every model is called as `model.apply(variables, x, train=False)` (or `train=True` with
`mutable=["batch_stats"]`) on NHWC float images and returns float32 logits `[batch, classes]`. Its
classifier is the top-level `nn.Dense` named `head`; conv and dense kernels are the leaves named
`kernel`; batch norm follows PyTorch's numerics so that imported checkpoints give the same outputs.
"""

from jackpots_jax.models.registry import create, input_shape, names
from jackpots_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from jackpots_jax.models.resnet_cifar import CifarBasicBlock, CifarResNet
from jackpots_jax.models.small import FashionCNN
from jackpots_jax.models.vgg import VGG, VGG19

__all__ = [
    "VGG",
    "VGG19",
    "BasicBlock",
    "Bottleneck",
    "CifarBasicBlock",
    "CifarResNet",
    "FashionCNN",
    "ResNet",
    "create",
    "input_shape",
    "names",
]
