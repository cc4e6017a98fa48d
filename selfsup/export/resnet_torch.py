"""PyTorch ResNet for exported selfsup ResNets that torchvision cannot express: width multipliers
above 1 (SimCLR), SimCLRv2's selective kernels with ResNet-D shortcuts and the deep stem, the
CIFAR stem, and reduced blocks or channels.

Imports torch: only PyTorch users load this module. The network equals
`selfsup.backbones.resnet.Model` (see its docstring for the architecture and its deviations from
the official TF code); parameter names are torchvision's where the structure is the same.

    model = ResNet(depth=50, width=2, sk_ratio=0.0625)
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    pooled = model(images)                       # [B, C] global average of the last map
    maps = model.forward_intermediates(images)   # 4 stage maps, strides 4, 8, 16, 32

A CIFAR-stem ResNet of width 1 without SK or overrides has torchvision's names and shapes, so its
weights also load, strictly, into torchvision's model with solo-learn's two replacements:

    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 2, bias=False)
    model.maxpool, model.fc = torch.nn.Identity(), torch.nn.Identity()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# depth -> (bottleneck?, blocks per stage); the same table as the JAX backbone.
DEPTHS = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
    200: (True, (3, 24, 36, 3)),
}
SK_MIN_DIM = 32


def conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    """k x k conv without bias, symmetric padding (k - 1) / 2."""
    return nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, bias=False)


def bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class ResNetDPool(nn.Module):
    """SimCLRv2's ResNet-D shortcut pool: stride 1 averages each 2x2 window's in-bounds cells
    (TF 'SAME'); stride 2 zero-pads one row/column after and divides every window by 4."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, self.stride, divisor_override=1)
        if self.stride != 1:
            return total / 4
        ones = F.pad(torch.ones_like(x[:, :1]), (0, 1, 0, 1))
        return total / F.avg_pool2d(ones, 2, 1, divisor_override=1)


class SelectiveKernel(nn.Module):
    """SimCLRv2's selective-kernel unit: one 3x3 conv to 2C channels + BN-ReLU, split into two
    branches, mixed by a softmax over branches computed from their spatial mean."""

    def __init__(self, cin: int, channels: int, stride: int, sk_ratio: float):
        super().__init__()
        mid = max(int(channels * sk_ratio), SK_MIN_DIM)
        self.conv = conv(cin, 2 * channels, 3, stride)
        self.bn = bn(2 * channels)
        self.fc1 = conv(channels, mid, 1)
        self.fc_bn = bn(mid)
        self.fc2 = conv(mid, 2 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        branches = torch.stack(y.chunk(2, dim=1))  # [2, B, C, H, W]
        z = branches.sum(0).mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        z = F.relu(self.fc_bn(self.fc1(z)))
        weights = torch.stack(self.fc2(z).chunk(2, dim=1)).softmax(dim=0)
        return (branches * weights).sum(0)


class Block(nn.Module):
    """Basic or v1.5 bottleneck residual block (stride on the 3x3)."""

    def __init__(self, cin: int, planes: int, stride: int, bottleneck: bool, sk_ratio: float):
        super().__init__()
        self.bottleneck = bottleneck
        self.sk = bottleneck and sk_ratio > 0
        cout = 4 * planes if bottleneck else planes
        if bottleneck:
            self.conv1, self.bn1 = conv(cin, planes, 1), bn(planes)
            if self.sk:  # the selective kernel holds its own BN-ReLU
                self.conv2 = SelectiveKernel(planes, planes, stride, sk_ratio)
            else:
                self.conv2, self.bn2 = conv(planes, planes, 3, stride), bn(planes)
            self.conv3, self.bn3 = conv(planes, cout, 1), bn(cout)
        else:
            self.conv1, self.bn1 = conv(cin, planes, 3, stride), bn(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3), bn(planes)
        self.downsample = None
        if stride != 1 or cin != cout:
            if sk_ratio > 0:  # ResNet-D
                layers = [ResNetDPool(stride), conv(cin, cout, 1), bn(cout)]
            else:
                layers = [conv(cin, cout, 1, stride), bn(cout)]
            self.downsample = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            y = self.conv2(y) if self.sk else F.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        else:
            y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet-`depth` with every channel count times `width`; sk_ratio > 0 adds SimCLRv2's
    selective kernels (bottlenecks), ResNet-D shortcuts and the 3-conv deep stem. `cifar_stem`:
    one 3x3/1 conv with padding 2 and no max-pool (solo-learn's CIFAR stem); `blocks` (per
    stage) and `channels` (base channels, 64) override the depth's."""

    def __init__(
        self,
        depth: int = 50,
        width: int = 1,
        sk_ratio: float = 0.0,
        cifar_stem: bool = False,
        blocks: list[int] | None = None,
        channels: int = 64,
    ):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        bottleneck, blocks = DEPTHS[depth][0], blocks or DEPTHS[depth][1]
        c = channels * width
        self.deep_stem = sk_ratio > 0 and not cifar_stem
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, c, 3, 1, padding=2, bias=False)
        elif self.deep_stem:
            self.stem_conv1, self.stem_bn1 = conv(3, c // 2, 3, 2), bn(c // 2)
            self.stem_conv2, self.stem_bn2 = conv(c // 2, c // 2, 3), bn(c // 2)
            self.conv1 = conv(c // 2, c, 3)
        else:
            self.conv1 = conv(3, c, 7, 2)
        self.bn1 = bn(c)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        cin = c
        for stage, n in enumerate(blocks):
            layer = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layer.append(Block(cin, c * 2**stage, stride, bottleneck, sk_ratio))
                cin = 4 * c * 2**stage if bottleneck else c * 2**stage
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.num_features = cin

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] -> the 4 stage outputs [B, C_s, H/s, W/s], s = 4, 8, 16, 32
        (1, 2, 4, 8 of the (H + 2) x (W + 2) stem map with the CIFAR stem)."""
        if self.deep_stem:
            x = F.relu(self.stem_bn1(self.stem_conv1(x)))
            x = F.relu(self.stem_bn2(self.stem_conv2(x)))
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> the last map [B, C, H/32, W/32]."""
        return self.forward_intermediates(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> pooled features [B, C]."""
        return self.forward_features(x).mean(dim=(2, 3))
