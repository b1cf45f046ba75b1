"""Models and their registry: `create(name, num_classes, **options)`, `network(...)`, `names()`.

One file per family (`resnet_cifar`, `vgg`, `resnet`, `small`, `small_nnx`); each declares the
`ModelSpec`s of its models (input shape, Linen or NNX, default dense leaves, PyTorch key layout)
and the registry collects them. Every model takes NHWC float images and returns float32 logits
`[batch, classes]`; its classifier is named `head`; conv and dense kernels are the leaves named
`kernel`; batch norm follows PyTorch's numerics so that imported checkpoints give the same outputs.
"""

from jackpots_jax.models.registry import (
    create,
    describe_checkpoint,
    input_shape,
    names,
    network,
    spec,
)
from jackpots_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from jackpots_jax.models.resnet_cifar import CifarBasicBlock, CifarResNet
from jackpots_jax.models.small import FashionCNN
from jackpots_jax.models.small_nnx import FashionCNNNNX
from jackpots_jax.models.spec import ModelSpec, Network, TorchLayout
from jackpots_jax.models.vgg import VGG, VGG19

__all__ = [
    "VGG",
    "VGG19",
    "BasicBlock",
    "Bottleneck",
    "CifarBasicBlock",
    "CifarResNet",
    "FashionCNN",
    "FashionCNNNNX",
    "ModelSpec",
    "Network",
    "ResNet",
    "TorchLayout",
    "create",
    "describe_checkpoint",
    "input_shape",
    "names",
    "network",
    "spec",
]
