"""ResNets for CIFAR.

- depth 6n+2 (20, 32, 44, 56, 110, ...): He et al. 2016, Sec. 4.2. Three stages of n basic
  blocks, 16/32/64 channels at 32/16/8 pixels; option-A shortcuts (identity, zero-padded
  channels, stride-2 subsampling), so the parameter counts are the paper's.
- depth 18/34/50/101/152: the ImageNet ResNets adapted to 32x32 as in the common CIFAR repos
  (3x3 stem, no max-pool, 64..512 channels, projection shortcuts).
- normalizer-free (a norm with `nf_alpha`, i.e. nf): the same depths and widths built from
  NFBlock (Brock et al. 2021a), pre-activation, with Scaled WS projection shortcuts wherever
  the shape changes (option A would pass ReLU outputs and zero channels down the skip path).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from norms import RELU_GAMMA

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


class NFBlock(nn.Module):
    """Normalizer-free pre-activation residual block (Brock et al. 2021a; SkipInit):

        h_next = shortcut + alpha * skip_gain * f(beta * relu(h))

    f: conv3x3-ReLU-conv3x3 (basic) or conv1x1-ReLU-conv3x3-ReLU-conv1x1 (bottleneck), every
    conv Scaled WS with bias, carrying the gain gamma of the ReLU before it. beta = 1 / the
    expected std of h (so f sees unit variance at init), skip_gain a scalar initialised to 0.
    The shortcut is h, or a 1x1 Scaled WS conv of beta * relu(h) where the shape changes: its
    output has unit variance again, so the expected std restarts after such a block.
    """

    def __init__(self, in_ch, width, stride, conv, alpha: float, beta: float,
                 bottleneck: bool = False):
        super().__init__()
        relu_conv = partial(conv, bias=True, gamma=RELU_GAMMA)
        if bottleneck:
            out_ch = width * Bottleneck.expansion
            layers = [relu_conv(in_ch, width, 1), nn.ReLU(),
                      relu_conv(width, width, 3, stride=stride, padding=1), nn.ReLU(),
                      relu_conv(width, out_ch, 1)]
        else:
            out_ch = width
            layers = [relu_conv(in_ch, width, 3, stride=stride, padding=1), nn.ReLU(),
                      relu_conv(width, width, 3, padding=1)]
        self.branch = nn.Sequential(*layers)
        self.shortcut = (relu_conv(in_ch, out_ch, 1, stride=stride)
                         if stride != 1 or in_ch != out_ch else None)
        self.alpha, self.beta = alpha, beta
        self.skip_gain = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        out = F.relu(x) * self.beta
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return self.branch(out) * (self.skip_gain * self.alpha) + shortcut


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
        alpha = norm_layers.nf_alpha
        if alpha is not None:  # pre-activation: the first block's ReLU follows the stem
            self.stem = nn.Sequential(conv(3, stem, 3, padding=1, bias=False))
        else:
            self.stem = nn.Sequential(conv(3, stem, 3, padding=1, bias=False),
                                      *norm_layers.act(stem, inplace=True))
        stages, in_ch, var = [], stem, 1.0  # var: nf's expected variance of the block input
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                out_ch = width * block.expansion
                if alpha is not None:
                    layers.append(NFBlock(in_ch, width, stride, conv, alpha, 1 / math.sqrt(var),
                                          bottleneck=block is Bottleneck))
                    # alpha^2 more per block; 1 again after a projection shortcut
                    var = (1.0 if stride != 1 or in_ch != out_ch else var) + alpha ** 2
                else:
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
        # A pre-activation net ends with the activation its last block left out.
        self.final_act = nn.ReLU() if alpha is not None else nn.Identity()
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.final_act(self.stages(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))
