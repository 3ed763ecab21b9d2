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
all-reduce of per-channel statistics (every process holds the same number of images).

With `sync_stats=False` (the ablation) every device keeps private estimates, updated from its
own batch and used to normalise it: buffers of shape [devices, C], identical in every process
(the updated rows are all-gathered each step, so checkpoints and eval need nothing more). Eval
normalises with the devices' average estimates.

Channel normalization is GN without per-channel affine, with a per-GROUP scale and shift:

    z = (y - mean_g) / sqrt(var_g + eps) * gamma_g + beta_g
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .devices import DeviceAware, devices_apart, side_by_side


class EstimatedBatchNorm(DeviceAware, nn.Module):
    """The estimated-BN half of BCN. `momentum` is the paper's update rate r; `sync_stats`
    chooses estimates of the global batch (default) or private per-device estimates."""

    def __init__(self, num_channels: int, momentum: float = 0.1, eps: float = 1e-5,
                 sync_stats: bool = True):
        super().__init__()
        self.num_channels, self.momentum, self.eps = num_channels, momentum, eps
        self.sync_stats = sync_stats
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("mu_hat", torch.zeros(num_channels))
        self.register_buffer("var_hat", torch.ones(num_channels))

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, momentum={self.momentum}, eps={self.eps}, "
                f"sync_stats={self.sync_stats}")

    @property
    def per_device_buffers(self) -> tuple[str, ...]:
        """Private estimates have one row per device (rank-major, as norms/devices.py)."""
        return () if self.sync_stats else ("mu_hat", "var_hat")

    def devices_changed(self) -> None:
        if not self.sync_stats:  # one row of estimates per device, all devices everywhere
            shape = (self.virtual_devices * self.world_size(), self.num_channels)
            if self.mu_hat.shape != shape:
                self.mu_hat = self.mu_hat.new_zeros(shape)
                self.var_hat = self.var_hat.new_ones(shape)

    def _rows(self, buf: torch.Tensor) -> torch.Tensor:
        """[S, C] view of the estimates this process's S slices use (S = 1 when synced)."""
        if self.sync_stats:
            return buf.view(1, -1)
        k = self.virtual_devices
        return buf.view(-1, self.num_channels)[self.rank() * k:(self.rank() + 1) * k]

    @torch.no_grad()
    def update_estimates(self, xt: torch.Tensor) -> None:
        """xt: [n, S*C, *], the S slices' channels side by side, each slice with its own row."""
        mu, var = self._rows(self.mu_hat), self._rows(self.var_hat)
        xt = xt.to(mu.dtype)  # statistics in the buffers' precision (fp32 under autocast)
        dims = [0, *range(2, xt.dim())]
        mean = xt.mean(dims).view_as(mu)
        # around the estimate before this update
        sq = (xt - mu.view(1, -1, *(1,) * (xt.dim() - 2))).square_().mean(dims).view_as(mu)
        world = self.world_size()
        if self.sync_stats and world > 1:
            # Every process holds the same number of images: the global batch's values are the
            # mean of the processes' values.
            stats = torch.stack([mean, sq])
            dist.all_reduce(stats, group=self.process_group)
            mean, sq = stats / world
        mu.lerp_(mean, self.momentum)
        var.lerp_(sq, self.momentum)
        if not self.sync_stats and world > 1:
            for buf, mine in ((self.mu_hat, mu), (self.var_hat, var)):
                rows = list(buf.view(world, -1))
                dist.all_gather(rows, mine.reshape(-1).clone(), group=self.process_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slices = self.virtual_devices if self.training and not self.sync_stats else 1
        c = self.num_channels
        # Private estimates: slice s's channel c becomes channel s*C + c (as norms/batchnorm.py),
        # so per-device estimates are per-channel ones.
        xt = side_by_side(x, slices)
        if self.training:
            self.update_estimates(xt)
            mu, var = self._rows(self.mu_hat), self._rows(self.var_hat)
        else:  # eval: the devices' average estimates
            mu, var = (b.view(-1, c).mean(0) for b in (self.mu_hat, self.var_hat))
        # Constant estimates make this BN's eval-mode map: one native batch_norm, no gradient
        # through the estimates, and a backward that is one fused kernel.
        weight, bias = (self.weight, self.bias) if slices == 1 else (
            self.weight.repeat(slices), self.bias.repeat(slices))
        y = F.batch_norm(xt, mu.flatten(), var.flatten(), weight, bias, False, 0.0, self.eps)
        return devices_apart(y, slices, x)


class BatchChannelNorm(nn.Module):
    """BCN: `EstimatedBatchNorm` then channel normalization with per-group scale and shift."""

    def __init__(self, num_channels: int, groups: int = 32, momentum: float = 0.1,
                 eps: float = 1e-5, sync_stats: bool = True):
        super().__init__()
        self.num_channels, self.groups, self.eps = num_channels, groups, eps
        self.estimated_bn = EstimatedBatchNorm(num_channels, momentum, eps, sync_stats)
        self.weight = nn.Parameter(torch.ones(groups))   # gamma_g
        self.bias = nn.Parameter(torch.zeros(groups))    # beta_g
        # channel -> its group: expands the group affine per channel with one gather
        self.register_buffer("group_of_channel", torch.arange(groups).repeat_interleave(
            num_channels // groups), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.groups}, eps={self.eps}"

    def check_input(self, shape) -> str | None:
        values = self.num_channels // self.groups * math.prod(shape[2:])
        if values < 2:
            return (f"channel normalization over {values} value per group (input "
                    f"{tuple(shape)}) makes every output 0; use fewer groups")
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The per-group affine, expanded per channel, lets one native group_norm do it all.
        g = self.group_of_channel
        return F.group_norm(self.estimated_bn(x), self.groups, self.weight.index_select(0, g),
                            self.bias.index_select(0, g), self.eps)
