"""What every builder shares: the conv and norm factories and He initialisation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from norms import NormSpec, build_norm, build_norm_act, conv_factory, nf_alpha, spec_of


@dataclass(frozen=True)
class NormLayers:
    """The norm slots of a builder; the model never knows which norm it has.

        norm_layers(C)          a norm with no activation after it (a residual branch's end,
                                a projection shortcut)
        norm_layers.act(C)      "norm then ReLU" as the pair (norm, activation): a plain norm
                                and ReLU, or a fused layer (FRN+TLU, EvoNorm) and a marker
    """
    name: str | NormSpec  # a built-in norm's name, or a user's layer (norms.custom_spec)
    options: dict = field(default_factory=dict)
    link: object = None  # norms.ConvLink where the norm takes the conv before it (cbn)

    def _conv(self) -> dict:
        return {} if self.link is None else {"conv": self.link.take()}

    def __call__(self, num_channels: int) -> nn.Module:
        return build_norm(self.name, num_channels, **self._conv(),
                          **{**self.options, "act": False})

    def act(self, num_channels: int, inplace: bool = False) -> tuple[nn.Module, nn.Module]:
        return build_norm_act(self.name, num_channels, inplace=inplace, **self._conv(),
                              **self.options)

    @property
    def nf_alpha(self) -> float | None:
        """A normalizer-free norm (nf) asks for NF residual blocks with this alpha (and convs
        that carry the gain of the ReLU before them); None for every other norm."""
        return nf_alpha(self.name, **self.options)


def make_layers(norm: str | NormSpec, ws: bool,
                norm_options: dict) -> tuple[type[nn.Conv2d], NormLayers]:
    """The conv class (or factory) and the norm slots a builder asks for layers; a norm that
    takes the conv before it (cbn) gets each conv the builder made just before it."""
    spec_of(norm)  # an unknown name: refused here, naming the allowed ones
    nf_alpha(norm, **norm_options)  # a whole-network option: refused here, not at a layer
    conv, link = conv_factory(norm, ws)
    return conv, NormLayers(norm, dict(norm_options), link)


class _Slot(nn.Identity):
    """Stands in for a norm while locating the layer a norm option fails on."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels


class _Slots(NormLayers):
    def __call__(self, num_channels: int) -> nn.Module:
        return _Slot(num_channels)

    def act(self, num_channels: int, inplace: bool = False) -> tuple[nn.Module, nn.Module]:
        return _Slot(num_channels), nn.ReLU(inplace)


def first_failing_norm(build: Callable[[NormLayers], nn.Module], norm_layers: NormLayers) -> str:
    """Name of the first norm slot of `build(norm_layers)` that `norm_layers` refuses, or ''."""
    for name, m in build(_Slots("none")).named_modules():
        if isinstance(m, _Slot):
            try:
                norm_layers.act(m.num_channels)
                norm_layers(m.num_channels)
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
