"""What every builder shares: the conv/norm factories and He initialisation."""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn

from norms import WSConv2d, build_norm

NormFactory = Callable[[int], nn.Module]


def make_layers(norm: str, ws: bool, norm_options: dict) -> tuple[type[nn.Conv2d], NormFactory]:
    """The conv class and the `num_channels -> norm layer` factory a builder asks for layers."""
    norm_layer = functools.partial(build_norm, norm, **norm_options)
    norm_layer(64)  # fail on a bad name/option now, not inside a half-built network
    return (WSConv2d if ws else nn.Conv2d), norm_layer


def he_init(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) for convolutions, as torchvision's ResNets do."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
