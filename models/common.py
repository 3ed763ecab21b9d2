"""What every builder shares: the conv/norm factories and He initialisation."""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn

from norms import NORMS, WSConv2d, build_norm

NormFactory = Callable[[int], nn.Module]


def make_layers(norm: str, ws: bool, norm_options: dict) -> tuple[type[nn.Conv2d], NormFactory]:
    """The conv class and the `num_channels -> norm layer` factory a builder asks for layers."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is unknown; allowed: {', '.join(NORMS)}")
    return (WSConv2d if ws else nn.Conv2d), functools.partial(build_norm, norm, **norm_options)


class _Slot(nn.Identity):
    """Stands in for a norm while locating the layer a norm option fails on."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels


def first_failing_norm(build: Callable[[NormFactory], nn.Module], norm_layer: NormFactory) -> str:
    """Name of the first norm slot of `build(factory)` that `norm_layer` refuses, or ''."""
    for name, m in build(_Slot).named_modules():
        if isinstance(m, _Slot):
            try:
                norm_layer(m.num_channels)
            except ValueError:
                return name
    return ""


def he_init(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) for convolutions, as torchvision's ResNets do."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
