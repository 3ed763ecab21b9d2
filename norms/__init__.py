"""Normalization layers for micro-batch training, and WS.

    build_norm(name, num_channels, **options) -> nn.Module
        bn syncbn gn ln in bcn brn frn evonorm_b0 evonorm_s0 mabn cbn online none nf
        (cbn takes conv=, the convolution before it)
    build_norm_act(name, num_channels, **options) -> (norm, activation)   "norm then ReLU"
    custom_spec(target, **options) -> a user's layer, usable wherever a norm name is
                          (load_target("pkg.mod.Name" | "file.py:Name") imports one)
    conv_for(name, ws) -> the conv class before a norm (WSConv2d, CenConv2d for mabn,
                          ScaledWSConv2d for nf, Conv2d)
    conv_factory(name, ws) -> (conv factory, ConvLink or None): the link hands each conv
                          to the norm built after it where the norm takes it (cbn)
    nf_alpha(name, **options) -> the NF block's alpha for nf, None for every other norm
    WSConv2d, ScaledWSConv2d, RELU_GAMMA        Weight Standardization convs
    configure_devices(model, virtual_devices, process_group, accumulate)   set by the engine
    one_process_copy(model, virtual_devices)    a copy for a measurement on one process
    check_statistics(model, input_shape)        impossible set-ups, before training

This package imports only torch.
"""
from .batchnorm import BatchNorm
from .batchrenorm import BatchRenorm
from .bcn import BatchChannelNorm, EstimatedBatchNorm
from .cbn import CrossIterationBatchNorm
from .check import check_statistics
from .devices import DeviceAware, configure_devices, one_process_copy
from .custom import custom_spec, load_target
from .evonorm import EvoNormB0, EvoNormS0
from .factory import (NORM_SPECS, NORMS, OPTIONS, ConvLink, FusedActivation, NormSpec,
                      build_norm, build_norm_act, conv_factory, conv_for, nf_alpha,
                      resolve_groups, spec_of)
from .frn import FilterResponseNorm
from .groupnorm import GroupNorm
from .mabn import CenConv2d, MovingAverageBatchNorm
from .online import OnlineNorm
from .ws import RELU_GAMMA, ScaledWSConv2d, WSConv2d

__all__ = ["NORMS", "NORM_SPECS", "OPTIONS", "RELU_GAMMA", "BatchNorm", "BatchRenorm",
           "BatchChannelNorm", "CenConv2d", "ConvLink", "CrossIterationBatchNorm", "DeviceAware",
           "EstimatedBatchNorm", "EvoNormB0",
           "EvoNormS0", "FilterResponseNorm", "FusedActivation", "GroupNorm",
           "MovingAverageBatchNorm", "NormSpec", "OnlineNorm", "ScaledWSConv2d", "WSConv2d", "build_norm",
           "build_norm_act", "check_statistics", "configure_devices", "conv_factory", "conv_for",
           "custom_spec", "load_target", "nf_alpha", "one_process_copy", "resolve_groups",
           "spec_of"]
