"""CIFAR VGG (Simonyan & Zisserman 2015, as in the common CIFAR repos): 3x3 conv-norm-ReLU
stacks (a fused norm-activation layer in place of norm-ReLU), five max-pools down to 1x1, one
linear classifier. Normalizer-free (nf): no norm, Scaled WS convs with biases, each after a
ReLU carrying its gain gamma (the first sees the image: gain 1)."""
from __future__ import annotations

from torch import nn

from norms import RELU_GAMMA

from .common import NormLayers

# Numbers are conv widths, "M" a 2x2 max-pool.
CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}
DEPTHS = tuple(CFG)


class VGG(nn.Module):
    def __init__(self, depth: int, conv: type[nn.Conv2d], norm_layers: NormLayers,
                 num_classes: int = 10):
        super().__init__()
        layers, in_ch, nf, gain = [], 3, norm_layers.nf_alpha is not None, {}
        for v in CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [conv(in_ch, v, 3, padding=1, bias=nf, **gain),
                           *norm_layers.act(v, inplace=True)]
                in_ch, gain = v, ({"gamma": RELU_GAMMA} if nf else {})
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
