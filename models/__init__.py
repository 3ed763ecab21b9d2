"""VGG and ResNet builders for CIFAR, built around the norm factory.

    build_model(arch, depth, norm="bn", ws=False, num_classes=10, zero_init_residual=False,
                **norm_options) -> nn.Module
"""
from __future__ import annotations

from torch import nn

from norms import NormSpec

from .common import first_failing_norm, he_init, make_layers
from .resnet import IMAGENET_CFG, ResNet, is_valid_depth
from .vgg import DEPTHS as VGG_DEPTHS
from .vgg import VGG

ARCHS = ("vgg", "resnet")
RESNET_DEPTHS_TEXT = "6n+2 (20, 32, 44, 56, 110, ...) or " + "/".join(map(str, IMAGENET_CFG))


def check_depth(arch: str, depth) -> None:
    """ValueError naming the allowed values if (arch, depth) does not name a network."""
    if arch not in ARCHS:
        raise ValueError(f"model={arch!r} is unknown; allowed: {', '.join(ARCHS)}")
    ok = isinstance(depth, int) and not isinstance(depth, bool) and (
        depth in VGG_DEPTHS if arch == "vgg" else is_valid_depth(depth))
    if not ok:
        allowed = "/".join(map(str, VGG_DEPTHS)) if arch == "vgg" else RESNET_DEPTHS_TEXT
        raise ValueError(f"model.depth={depth!r} is not a valid {arch} depth; allowed: {allowed}")


def build_model(arch: str, depth: int, norm: str | NormSpec = "bn", ws: bool = False,
                num_classes: int = 10, zero_init_residual: bool = False,
                **norm_options) -> nn.Module:
    """A CIFAR network whose every norm comes from `build_norm(norm, C, **norm_options)` and
    every conv is a `WSConv2d` when `ws`; `norm` a built-in name or a user's layer
    (`norms.custom_spec(MyNorm, **options)`). He init; `zero_init_residual` zeroes the scale of
    the last norm in each residual branch so every block starts as the identity."""
    check_depth(arch, depth)
    conv, norm_layers = make_layers(norm, ws, norm_options)
    net_cls = VGG if arch == "vgg" else ResNet
    try:
        net = net_cls(depth, conv, norm_layers, num_classes)
    except ValueError as e:
        layer = first_failing_norm(lambda f: net_cls(depth, conv, f, num_classes), norm_layers)
        raise ValueError(f"{arch}{depth} layer {layer}: {e}" if layer else str(e)) from None
    he_init(net)
    if zero_init_residual:
        if arch != "resnet":
            raise ValueError("zero_init_residual applies to resnet only")
        for m in net.modules():
            weight = getattr(getattr(m, "last_norm", None), "weight", None)
            if weight is not None:
                nn.init.zeros_(weight)
    return net


__all__ = ["ARCHS", "build_model", "check_depth"]
