"""Normalization layers for micro-batch training: bn, syncbn, gn, ln, in, bcn, none, and WS.

    build_norm(name, num_channels, **options) -> nn.Module
    WSConv2d                                    Weight Standardization conv
    configure_devices(model, virtual_devices, process_group)   set by the engine
    check_statistics(model, input_shape)        impossible set-ups, before training

This package imports only torch.
"""
from .batchnorm import BatchNorm
from .bcn import BatchChannelNorm, EstimatedBatchNorm
from .check import check_statistics
from .devices import DeviceAware, configure_devices
from .factory import NORMS, OPTIONS, build_norm, resolve_groups
from .groupnorm import GroupNorm
from .ws import WSConv2d

__all__ = ["NORMS", "OPTIONS", "BatchNorm", "BatchChannelNorm", "DeviceAware",
           "EstimatedBatchNorm", "GroupNorm", "WSConv2d", "build_norm", "check_statistics",
           "configure_devices", "resolve_groups"]
