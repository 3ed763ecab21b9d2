"""Batch-Channel Normalization (Qiao et al. 2019, arXiv 1903.10520 / 1911.09738).

BCN = estimated batch normalization, then channel normalization.

Estimated BN keeps estimates mu_hat, var_hat (init 0, 1) and, in training, updates them with
rate r from the current batch (all devices' images when synchronised), the variance taken
around the estimate before the update:

    mu_hat  <- (1 - r) mu_hat  + r mean(x)
    var_hat <- (1 - r) var_hat + r mean((x - mu_hat)^2)

then, in training as in eval, with no gradient through the estimates:

    y = (x - mu_hat) / sqrt(var_hat + eps) * gamma_c + beta_c

Because mean((x - mu_hat)^2) is taken around a constant, the update is linear in the data:
averaging per-device updates equals the update from the global batch, so synchronising costs one
all-reduce of per-channel sums.

Channel normalization is GN without per-channel affine, with a per-GROUP scale and shift:

    z = (y - mean_g) / sqrt(var_g + eps) * gamma_g + beta_g
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .devices import DeviceAware


class EstimatedBatchNorm(DeviceAware, nn.Module):
    """The estimated-BN half of BCN. `momentum` is the paper's update rate r."""

    def __init__(self, num_channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.num_channels, self.momentum, self.eps = num_channels, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("mu_hat", torch.zeros(num_channels))
        self.register_buffer("var_hat", torch.ones(num_channels))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, momentum={self.momentum}, eps={self.eps}"

    @torch.no_grad()
    def update_estimates(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        sums = torch.stack([x.sum(dims), (x - self.mu_hat.view(shape)).square().sum(dims)])
        count = x.numel() // x.shape[1]
        world = self.world_size()
        if world > 1:
            dist.all_reduce(sums, group=self.process_group)
            count *= world  # every process holds the same number of images
        mean, sq = (sums / count).to(self.mu_hat.dtype)
        self.mu_hat.lerp_(mean, self.momentum)
        self.var_hat.lerp_(sq, self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_estimates(x)
        # Constant estimates make this a per-channel affine map: one fused multiply-add.
        scale = self.weight * torch.rsqrt(self.var_hat + self.eps)
        shift = self.bias - self.mu_hat * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))


class BatchChannelNorm(nn.Module):
    """BCN: `EstimatedBatchNorm` then channel normalization with per-group scale and shift."""

    def __init__(self, num_channels: int, groups: int = 32, momentum: float = 0.1,
                 eps: float = 1e-5):
        super().__init__()
        self.num_channels, self.groups, self.eps = num_channels, groups, eps
        self.estimated_bn = EstimatedBatchNorm(num_channels, momentum, eps)
        self.weight = nn.Parameter(torch.ones(groups))   # gamma_g
        self.bias = nn.Parameter(torch.zeros(groups))    # beta_g

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.groups}, eps={self.eps}"

    def check_input(self, shape) -> str | None:
        values = self.num_channels // self.groups * math.prod(shape[2:])
        if values < 2:
            return (f"channel normalization over {values} value per group (input "
                    f"{tuple(shape)}) makes every output 0; use fewer groups")
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_group = self.num_channels // self.groups
        # The per-group affine, expanded per channel, lets one native group_norm do it all.
        return F.group_norm(self.estimated_bn(x), self.groups,
                            self.weight.repeat_interleave(per_group),
                            self.bias.repeat_interleave(per_group), self.eps)
