"""Batch Normalization (Ioffe & Szegedy 2015), per device or synchronised across devices.

    y = (x - mean_B) / sqrt(var_B + eps) * gamma + beta

mean_B, var_B per channel over (N, H, W) of the batch B. For `bn`, B is one device's batch: a
process holding K virtual devices takes statistics per device-slice. For `syncbn`, B is the
global batch: all slices of all processes in the process group.

Running statistics (used in eval) follow one rule whatever the device layout: each device
updates its copy with its own batch statistics and the copies are averaged. The update is
linear, so averaging every step (virtual devices, here) equals averaging the processes'
buffers once before they are used (the engine does that for DDP).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn import functional as dist_nn

from .devices import DeviceAware, devices_apart, side_by_side


class BatchNorm(DeviceAware, nn.BatchNorm2d):
    """BN over one device's batch (`sync=False`) or the global batch (`sync=True`).

    Accepts [N, C, *] inputs. State dict keys are those of `nn.BatchNorm2d`.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 sync: bool = False):
        super().__init__(num_channels, eps=eps, momentum=momentum)
        self.sync = sync

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expects [N, C, *] input, got {tuple(x.shape)}")

    def check_input(self, shape) -> str | None:
        devices = self.virtual_devices * self.world_size() if self.sync else 1
        values = shape[0] * devices * math.prod(shape[2:])
        if values < 2:
            return (f"batch statistics over {values} value per channel (batch per device "
                    f"{shape[0]}, spatial {tuple(shape[2:])}) are undefined; use a larger "
                    f"batch or a batch-independent norm (gn, ln, in, bcn)")
        return None

    def _factor(self) -> float:
        """The running-statistics update rate (momentum=None: cumulative average, as torch)."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        if self.sync and self.world_size() > 1:
            return self._cross_process(x)
        devices = 1 if self.sync else self.virtual_devices
        return self._per_device(x, devices)

    def _per_device(self, x: torch.Tensor, devices: int) -> torch.Tensor:
        """Native batch_norm with the K device-slices laid side by side as K*C channels."""
        n, c = x.shape[:2]
        if n % devices:
            raise ValueError(f"batch of {n} does not split into {devices} virtual devices")
        factor = self._factor()
        if devices == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                True, factor, self.eps)
        xs = side_by_side(x, devices)
        mean = self.running_mean.repeat(devices)
        var = self.running_var.repeat(devices)
        y = F.batch_norm(xs, mean, var, self.weight.repeat(devices), self.bias.repeat(devices),
                         True, factor, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(devices, c).mean(0))
            self.running_var.copy_(var.view(devices, c).mean(0))
        return devices_apart(y, devices, x)

    def _cross_process(self, x: torch.Tensor) -> torch.Tensor:
        """SyncBN on any backend: gather (count, mean, var) of every process, differentiably.

        torch's SyncBatchNorm runs on CUDA only; this path also runs on CPU/gloo. The gather is
        an all-reduce of a one-hot slot per process, so its backward is an all-reduce too.
        """
        group, world = self.process_group, self.world_size()
        rank = torch.distributed.get_rank(group)
        x = x.to(self.running_mean.dtype)  # statistics in the buffers' precision under autocast
        dims = [0, *range(2, x.dim())]
        var_l, mean_l = torch.var_mean(x, dims, correction=0)
        count_l = torch.full_like(mean_l, x.numel() // x.shape[1])
        slot = F.one_hot(torch.tensor(rank, device=x.device), world).to(x.dtype)
        local = torch.stack([count_l, mean_l, var_l])                 # [3, C]
        stats = dist_nn.all_reduce(slot.view(world, 1, 1) * local, group=group)  # [W, 3, C]
        counts, means, variances = stats.unbind(1)
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total  # Chan et al.
        factor = self._factor()
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), factor)
            self.running_var.lerp_(var.detach() * total / (total - 1), factor)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (x - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)
