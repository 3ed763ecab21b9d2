"""ResNets for CIFAR.

- depth 6n+2 (20, 32, 44, 56, 110, ...): He et al. 2016, Sec. 4.2. Three stages of n basic
  blocks, 16/32/64 channels at 32/16/8 pixels; option-A shortcuts (identity, zero-padded
  channels, stride-2 subsampling), so the parameter counts are the paper's.
- depth 18/34/50/101/152: the ImageNet ResNets adapted to 32x32 as in the common CIFAR repos
  (3x3 stem, no max-pool, 64..512 channels, projection shortcuts).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .common import NormLayers

# depth -> (block, blocks per stage)
IMAGENET_CFG = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]),
                50: ("bottleneck", [3, 4, 6, 3]), 101: ("bottleneck", [3, 4, 23, 3]),
                152: ("bottleneck", [3, 8, 36, 3])}


def is_valid_depth(depth: int) -> bool:
    return depth in IMAGENET_CFG or (depth >= 8 and (depth - 2) % 6 == 0)


class ShortcutA(nn.Module):
    """He et al.'s option A: subsample, then zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def projection(conv, norm_layers, in_ch, out_ch, stride) -> nn.Module:
    return nn.Sequential(conv(in_ch, out_ch, 1, stride=stride, bias=False), norm_layers(out_ch))


class BasicBlock(nn.Module):
    """conv-norm-act, conv-norm, + shortcut, ReLU. The branch's last norm has no activation
    of its own (a fused layer is built with its nonlinearity off): the ReLU after the sum is
    the block's, for every norm, as in He et al. and the official EvoNorm ResNets."""
    expansion = 1

    def __init__(self, in_ch, width, stride, conv, norm_layers, shortcut):
        super().__init__()
        self.conv1 = conv(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.norm1, self.act1 = norm_layers.act(width)
        self.conv2 = conv(width, width, 3, padding=1, bias=False)
        self.norm2 = norm_layers(width)
        self.shortcut = shortcut

    def forward(self, x):
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    @property
    def last_norm(self) -> nn.Module:
        """The residual branch's last norm (zero-init target)."""
        return self.norm2


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch, width, stride, conv, norm_layers, shortcut):
        super().__init__()
        self.conv1 = conv(in_ch, width, 1, bias=False)
        self.norm1, self.act1 = norm_layers.act(width)
        self.conv2 = conv(width, width, 3, stride=stride, padding=1, bias=False)
        self.norm2, self.act2 = norm_layers.act(width)
        self.conv3 = conv(width, width * 4, 1, bias=False)
        self.norm3 = norm_layers(width * 4)
        self.shortcut = shortcut

    def forward(self, x):
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.act2(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return F.relu(out + self.shortcut(x))

    @property
    def last_norm(self) -> nn.Module:
        return self.norm3


class ResNet(nn.Module):
    def __init__(self, depth: int, conv: type[nn.Conv2d], norm_layers: NormLayers,
                 num_classes: int = 10):
        super().__init__()
        if depth in IMAGENET_CFG:
            kind, blocks = IMAGENET_CFG[depth]
            block = BasicBlock if kind == "basic" else Bottleneck
            widths, stem, option_a = [64, 128, 256, 512], 64, False
        else:
            block, blocks = BasicBlock, [(depth - 2) // 6] * 3
            widths, stem, option_a = [16, 32, 64], 16, True
        self.stem = nn.Sequential(conv(3, stem, 3, padding=1, bias=False),
                                  *norm_layers.act(stem, inplace=True))
        stages, in_ch = [], stem
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                out_ch = width * block.expansion
                if stride == 1 and in_ch == out_ch:
                    shortcut = nn.Identity()
                elif option_a:
                    shortcut = ShortcutA(stride, out_ch - in_ch)
                else:
                    shortcut = projection(conv, norm_layers, in_ch, out_ch, stride)
                layers.append(block(in_ch, width, stride, conv, norm_layers, shortcut))
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))
