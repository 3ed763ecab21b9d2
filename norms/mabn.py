"""Moving Average Batch Normalization (Yan et al., ICLR 2020), per device, and its centred conv.

Following the authors' formal implementation (megvii-model/MABN, MABN.py). For one device's
batch at iteration t (t = 1, 2, ...: this device's optimizer steps), per channel:

    x2_t = mean over (N, H, W) of x^2                   no centering: the conv before MABN
    psi  = SMA of x2 over the last m iterations          centres its filters (CenConv2d)
    z    = x / sqrt(psi + eps)
    r    = clip(sqrt(psi + eps) / sqrt(running_var + eps), 1/r_max, r_max),  no gradient
    y    = gamma r z + beta
    running_var <- running_var + alpha (psi - running_var)
    backward:  g = dL/dy gamma r,   gz_t = mean over (N, H, W) of g z,
               dL/dx = (g - z SMA(gz)) / sqrt(psi + eps)

The backward's batch statistic mean(g z) is a moving average over the same m iterations. For
t <= m or t < warmup both averages are the current batch's own statistic (then dL/dx is the
exact gradient); r stays 1 until t > max(renorm_from, warmup) (the authors hard-code 1000).
Eval: y = gamma x / sqrt(running_var + eps) + beta, with the devices' average running_var.

m (`buffer_size`) is real_B / b, the batch the layer simulates over the batch it sees. The
authors' ImageNet code (cls/networks/MABN.py) differs (pairs of samples, another window and
warm-up); this follows MABN.py. Its default decay 0.98 is our momentum 0.02 (the update rate).

State per device (the authors run DDP without buffer broadcast): the two moving-average windows
[devices, m, C] and running_var [devices, C], rows indexed as in norms/devices.py; one step
counter, since every device steps together. Counting optimizer steps, not forwards, makes K
virtual devices, K processes and K accumulation micro-steps the same computation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .devices import DeviceAware


class CenConv2d(nn.Conv2d):
    """`nn.Conv2d` whose every output filter is centred (mean over in, kh, kw removed) before
    the convolution, so its outputs need no centering by the MABN after it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return self._conv_forward(x, w - w.mean((1, 2, 3), keepdim=True), self.bias)


class MovingAverageBatchNorm(DeviceAware, nn.Module):
    per_device_buffers = ("buffer_x2", "buffer_gz", "running_var")

    def __init__(self, num_channels: int, buffer_size: int = 16, eps: float = 1e-5,
                 momentum: float = 0.02, warmup: int = 100, renorm_from: int = 1000,
                 r_max: float = 5.0):
        super().__init__()
        self.num_channels, self.buffer_size, self.eps = num_channels, buffer_size, eps
        self.momentum, self.warmup, self.renorm_from, self.r_max = (momentum, warmup,
                                                                    renorm_from, r_max)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("buffer_x2", torch.zeros(1, buffer_size, num_channels))
        self.register_buffer("buffer_gz", torch.zeros(1, buffer_size, num_channels))
        self.register_buffer("running_var", torch.ones(1, num_channels))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, buffer_size={self.buffer_size}, eps={self.eps}, "
                f"momentum={self.momentum}, warmup={self.warmup}, "
                f"renorm_from={self.renorm_from}, r_max={self.r_max}")

    def devices_changed(self) -> None:
        d = self.num_devices()
        if self.running_var.shape[0] != d:
            self.buffer_x2 = self.buffer_x2.new_zeros(d, self.buffer_size, self.num_channels)
            self.buffer_gz = self.buffer_gz.new_zeros(d, self.buffer_size, self.num_channels)
            self.running_var = self.running_var.new_ones(d, self.num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"MABN expects [N, C, *] input, got {tuple(x.shape)}")
        if not self.training:
            var = self.running_var.mean(0)
            return F.batch_norm(x, torch.zeros_like(var), var, self.weight, self.bias, False,
                                0.0, self.eps)
        step = self.next_micro_step()
        k = self.virtual_devices
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} does not split into {k} virtual devices")
        t = self.steps + 1                                   # the authors' 1-based iteration
        current = (t <= self.buffer_size) | (t < self.warmup)  # no moving average yet
        active = t > max(self.renorm_from, self.warmup)         # r leaves 1
        slot = (t % self.buffer_size).view(1)
        y = MABNFunction.apply(x.unflatten(0, (k, -1)), self.weight, self.bias,
                               self.buffer_x2[step.rows], self.buffer_gz[step.rows],
                               self.running_var[step.rows], slot, current, active, self.eps,
                               self.momentum, self.r_max)
        if step.last:
            with torch.no_grad():
                self.steps.add_(1)
        return y.flatten(0, 1)


class MABNFunction(torch.autograd.Function):
    """The forward and the moving-average backward for K devices at once: x is [K, b, C, *].
    The buffers are [K, ...] views of the layer's rows for these devices, updated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, buffer_x2, buffer_gz, running_var, slot, current,
                active, eps, momentum, r_max):
        k, c = x.shape[0], x.shape[2]
        xf = x.to(running_var.dtype)            # statistics and z in float32 under autocast
        dims = (1, *range(3, x.dim()))
        shape = (k, 1, c) + (1,) * (x.dim() - 3)
        x2 = xf.square().mean(dims)                                         # [K, C]
        buffer_x2.index_copy_(1, slot, x2.unsqueeze(1))
        psi = torch.where(current, x2, buffer_x2.mean(1))
        std = (psi + eps).sqrt()
        r = torch.where(active, (std / (running_var + eps).sqrt()).clamp(1 / r_max, r_max),
                        torch.ones_like(std))
        z = xf / std.view(shape)
        running_var.lerp_(psi, momentum)
        ctx.save_for_backward(z, std, r, weight, slot, current)
        ctx.buffer_gz = buffer_gz  # state the backward writes: not a saved (versioned) tensor
        affine = (1, 1, c) + (1,) * (x.dim() - 3)
        return torch.addcmul(bias.view(affine), z * r.view(shape), weight.view(affine))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z, std, r, weight, slot, current = ctx.saved_tensors
        buffer_gz = ctx.buffer_gz
        k, c = z.shape[0], z.shape[2]
        dims = (1, *range(3, z.dim()))
        shape = (k, 1, c) + (1,) * (z.dim() - 3)
        grad = grad.to(z.dtype)
        g = grad * (weight.view(c, *(1,) * (z.dim() - 3)) * r.view(shape))
        gz = (g * z).mean(dims)                                             # [K, C]
        buffer_gz.index_copy_(1, slot, gz.unsqueeze(1))
        mean_gz = torch.where(current, gz, buffer_gz.mean(1))
        gx = (g - z * mean_gz.view(shape)) / std.view(shape)
        all_dims = (0, *dims)
        grad_weight = (grad * z * r.view(shape)).sum(all_dims)
        return (gx, grad_weight, grad.sum(all_dims), None, None, None, None, None, None, None,
                None, None)
