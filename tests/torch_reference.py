"""PyTorch reference modules with the key names and layouts of the checkpoints we import.

Written for the tests from the published architectures, independently of `jackpots_jax`:
torchvision's ResNet-18/34/50, the lottery-jackpots reference code's CIFAR ResNet (option-A
shortcut, classifier as a 1x1 conv named `fc`) and VGG (`features.<i>`, classifier as a 1x1 conv
named `classifier`), its masked conv layer (scores `mask`, binary mask `b_mask`), and the common
CIFAR code's variants (a `Linear` classifier, conv biases in VGG). Importing this module needs
PyTorch; the tests import it only after `pytest.importorskip("torch")`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """The reference code's searched conv: runs with `weight * b_mask`; `mask` holds the scores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask = nn.Parameter(torch.ones_like(self.weight))
        self.b_mask = nn.Parameter(torch.ones_like(self.weight), requires_grad=False)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.b_mask, self.bias, self.stride, self.padding)


def _conv(masked: bool, cin: int, cout: int, k: int, stride: int = 1, bias: bool = False):
    cls = MaskedConv2d if masked else nn.Conv2d
    return cls(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


def _classifier(kind: str, masked: bool, features: int, classes: int) -> nn.Module:
    if kind == "conv":
        return _conv(masked, features, classes, 1, bias=True)
    return nn.Linear(features, classes)


def _classify(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Global average pool, then the classifier (a 1x1 conv on the pooled map, or a Linear)."""
    x = F.adaptive_avg_pool2d(x, 1)
    if isinstance(head, nn.Conv2d):
        return head(x).flatten(1)
    return head(x.flatten(1))


class CifarBlock(nn.Module):
    def __init__(self, masked: bool, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv(masked, inplanes, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(masked, planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - inplanes

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::2, ::2] if self.stride != 1 else x
        if self.extra:
            half = self.extra // 2
            shortcut = F.pad(shortcut, (0, 0, 0, 0, half, self.extra - half))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2), widths 16w/32w/64w; `head` names the classifier (`fc` or `linear`)."""

    def __init__(self, depth, width, classes, classifier="conv", head="fc", masked=False):
        super().__init__()
        n = (depth - 2) // 6
        planes = [16 * width, 32 * width, 64 * width]
        self.conv1 = _conv(masked, 3, planes[0], 3)
        self.bn1 = nn.BatchNorm2d(planes[0])
        inplanes = planes[0]
        for stage, p in enumerate(planes):
            blocks = []
            for i in range(n):
                blocks.append(CifarBlock(masked, inplanes, p, 2 if stage and not i else 1))
                inplanes = p
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.head_name = head
        setattr(self, head, _classifier(classifier, masked, inplanes, classes))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return _classify(getattr(self, self.head_name), x)


VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"]
VGG19 += [512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, classes, classifier="conv", masked=False, conv_bias=False, cfg=VGG19):
        super().__init__()
        modules, cin = [], 3
        for item in cfg:
            if item == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [
                    _conv(masked, cin, item, 3, bias=conv_bias),
                    nn.BatchNorm2d(item),
                    nn.ReLU(inplace=True),
                ]
                cin = item
        modules.append(nn.AvgPool2d(kernel_size=1, stride=1))
        self.features = nn.Sequential(*modules)
        self.classifier = _classifier(classifier, masked, cin, classes)

    def forward(self, x):
        return _classify(self.classifier, self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, masked, inplanes, planes, stride):
        super().__init__()
        self.conv1 = _conv(masked, inplanes, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(masked, planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(masked, inplanes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, masked, inplanes, planes, stride):
        super().__init__()
        self.conv1 = _conv(masked, inplanes, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(masked, planes, planes, 3, stride)  # torchvision: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(masked, planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(masked, inplanes, planes * 4, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _downsample(masked, inplanes, out, stride):
    if stride == 1 and inplanes == out:
        return None
    return nn.Sequential(_conv(masked, inplanes, out, 1, stride), nn.BatchNorm2d(out))


class ResNet(nn.Module):
    """torchvision's ResNet; `classifier="conv"` is the reference code's ImageNet variant."""

    def __init__(self, block, layers, classes, classifier="linear", masked=False):
        super().__init__()
        self.conv1 = _conv(masked, 3, 64, 7, 2)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for stage, blocks in enumerate(layers):
            planes = 64 * 2**stage
            seq = []
            for i in range(blocks):
                seq.append(block(masked, inplanes, planes, 2 if stage and not i else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*seq))
        self.fc = _classifier(classifier, masked, inplanes, classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return _classify(self.fc, x)


def build(name: str, classes: int, **kwargs) -> nn.Module:
    """The reference module for one of our registered model names."""
    cifar = {"resnet20": (20, 1), "resnet32": (32, 1), "resnet56": (56, 1), "resnet32_w2": (32, 2)}
    if name in cifar:
        depth, width = cifar[name]
        return CifarResNet(depth, width, classes, **kwargs)
    if name == "vgg19":
        return VGG(classes, **kwargs)
    imagenet = {
        "resnet18": (BasicBlock, [2, 2, 2, 2]),
        "resnet34": (BasicBlock, [3, 4, 6, 3]),
        "resnet50": (Bottleneck, [3, 4, 6, 3]),
    }
    block, layers = imagenet[name]
    return ResNet(block, layers, classes, **kwargs)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random batch-norm affine parameters and running statistics, random scores and masks.

    Returns the model in eval mode. Weights keep PyTorch's default initialisation.
    """
    gen = torch.Generator().manual_seed(seed)
    uniform = lambda t, lo, hi: t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))
    normal = lambda t, std: t.copy_(std * torch.randn(t.shape, generator=gen))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                uniform(module.weight, 0.5, 1.5)
                normal(module.bias, 0.1)
                normal(module.running_mean, 0.1)
                uniform(module.running_var, 0.5, 1.5)
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=gen)))
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                normal(module.bias, 0.1)
            if isinstance(module, MaskedConv2d):
                normal(module.mask, 1.0)
                module.b_mask.copy_((torch.rand(module.weight.shape, generator=gen) < 0.3).float())
    return model.eval()


def logits(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    """Eval-mode logits of NHWC numpy images."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()
