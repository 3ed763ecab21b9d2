"""Batch Renormalization (Ioffe 2017, arXiv 1702.03275), per device.

Training, with mu_B and sigma_B = sqrt(var_B + eps) over one device's batch (biased variance):

    r = sg(clip(sigma_B / sigma, 1/r_max, r_max))        sg: no gradient
    d = sg(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma ((x - mu_B) / sigma_B * r + d) + beta
    mu    <- mu    + alpha (mu_B - mu)
    sigma <- sigma + alpha (sigma_B - sigma)

Eval: y = gamma (x - mu) / sigma + beta. With r_max = 1 and d_max = 0 training is BN's.

The running mu and sigma are the paper's: the moving average of sigma_B itself, eps included,
no Bessel correction (ludvb/batchrenorm keeps the same running std, but takes sigma_B = std + eps).
They are read in training, so all devices share one copy and it moves once per optimizer step,
toward the average of the step's devices' (mu_B, sigma_B): BN's rule (each device updates its
copy, the copies are averaged) applied every step. Virtual devices average in the process, DDP
with one all-reduce of [2, C] per layer and step, accumulation after the step's last micro-step,
so all three give the same step.

The relaxation counts optimizer steps s = 1, 2, ... (the `steps` buffer, saved with the model,
holds the steps done): r_max and d_max are 1 and 0 for the first renorm_from steps, then grow
linearly to reach r_max at step r_max_at and d_max at step d_max_at (the paper: 5k, 40k, 25k):

    r_max(s) = 1 + (r_max - 1) clip((s - renorm_from) / (r_max_at - renorm_from), 0, 1)

(a jump at s = renorm_from + 1 when r_max_at = renorm_from), d_max(s) likewise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .devices import DeviceAware, StepAverage, devices_apart, side_by_side


class BatchRenorm(DeviceAware, nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.01,
                 r_max: float = 3.0, d_max: float = 5.0, renorm_from: int = 5000,
                 r_max_at: int = 40000, d_max_at: int = 25000):
        super().__init__()
        self.num_channels, self.eps, self.momentum = num_channels, eps, momentum
        self.r_max, self.d_max = r_max, d_max
        self.renorm_from, self.r_max_at, self.d_max_at = renorm_from, r_max_at, d_max_at
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_std", torch.ones(num_channels))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.step_average = StepAverage()

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, "
                f"r_max={self.r_max}, d_max={self.d_max}, relax steps {self.renorm_from} -> "
                f"r_max at {self.r_max_at}, d_max at {self.d_max_at}")

    def check_input(self, shape) -> str | None:
        values = shape[0] * math.prod(shape[2:])
        if values < 2:
            return (f"batch statistics over {values} value per channel (batch per device "
                    f"{shape[0]}, spatial {tuple(shape[2:])}) are undefined; use a larger "
                    "batch or a batch-independent norm")
        return None

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at the current step, computed on the device (no host sync)."""
        s = self.steps.to(self.running_std.dtype) + 1        # the step this forward is in

        def ramp(end: int) -> torch.Tensor:  # 0 for s <= renorm_from, 1 from s = `end` on
            if end <= self.renorm_from:
                return (s > self.renorm_from).to(s.dtype)
            return ((s - self.renorm_from) / (end - self.renorm_from)).clamp(0, 1)
        return 1 + (self.r_max - 1) * ramp(self.r_max_at), self.d_max * ramp(self.d_max_at)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"BatchRenorm expects [N, C, *] input, got {tuple(x.shape)}")
        if not self.training:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale = self.weight / self.running_std
            return x * scale.view(shape) + (self.bias - self.running_mean * scale).view(shape)
        step = self.next_micro_step()
        k, c = self.virtual_devices, self.num_channels
        n = x.shape[0]
        if n % k:
            raise ValueError(f"batch of {n} does not split into {k} virtual devices")
        xs = side_by_side(x, k)
        with torch.no_grad():
            # batch_norm's own statistics kernel: CPU's var_mean over (N, H, W) is ~4x slower
            mu_b, var_b = torch.batch_norm_update_stats(xs.to(self.running_std.dtype), None,
                                                        None, 0.0)
            sigma_b = (var_b + self.eps).sqrt()
            mu, sigma = self.running_mean.repeat(k), self.running_std.repeat(k)
            r_max, d_max = self.limits()
            r = torch.minimum(torch.maximum(sigma_b / sigma, 1 / r_max), r_max)
            d = torch.minimum(torch.maximum((mu_b - mu) / sigma, -d_max), d_max)
        # gamma (x_hat r + d) + beta is batch_norm with weight gamma r and bias gamma d + beta:
        # one native kernel, and exactly bn's numbers while r = 1 and d = 0.
        weight, bias = self.weight.repeat(k), self.bias.repeat(k)
        y = F.batch_norm(xs, None, None, weight * r, weight * d + bias, True, 0.0, self.eps)
        stats = torch.stack([mu_b.view(k, c), sigma_b.view(k, c)], 1)       # [K, 2, C]
        mean = self.step_average.add(self, stats, step, sync=True)
        if mean is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean[0], self.momentum)
                self.running_std.lerp_(mean[1], self.momentum)
                self.steps.add_(1)
        return devices_apart(y, k, x)
