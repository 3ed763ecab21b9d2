"""A normalizer of your own in the harness: Batch-Instance Normalization (Nam & Kim, NeurIPS
2018), per device.

    x_BN = (x - mu_B) / sqrt(var_B + eps)     per channel over (N, H, W) of one device's batch
    x_IN = (x - mu_I) / sqrt(var_I + eps)     per sample and channel over (H, W)
    y    = gamma (rho x_BN + (1 - rho) x_IN) + beta,   rho in [0, 1] learned per channel

rho starts at 1 (BN) and is clipped to [0, 1] (here in the forward, so its gradient is zero
outside). Eval uses running mu_B, var_B (biased), each the average of the devices' statistics.
Its statistics depend on the batch, so it is a norms.DeviceAware layer: the engine tells it the
device layout (K virtual devices stacked along dim 0), and its running statistics move once per
optimizer step (StepAverage), so K virtual devices, K processes and K accumulation steps train
the same run.

    python train.py norm=custom norm.target=examples.my_norm.BatchInstanceNorm
    python train.py norm=custom norm.target=examples/my_norm.py:BatchInstanceNorm \
        '+norm.options={momentum: 0.05}' norm.ws=true
"""
import torch
from torch import nn

from norms import DeviceAware
from norms.devices import StepAverage


class BatchInstanceNorm(DeviceAware, nn.Module):
    batch_dependent = True  # what the engine must know (README: Python API)
    affine = True

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum={momentum!r} must be in (0, 1]")
        self.eps, self.momentum = eps, momentum
        self.rho = nn.Parameter(torch.ones(num_channels))
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.step_stats = StepAverage()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = (-1,) + (1,) * (x.dim() - 2)        # [C, 1, 1] against [N, C, H, W]
        xf = x.to(self.running_mean.dtype)  # statistics in the buffers' (fp32 under autocast)
        var_i, mu_i = torch.var_mean(xf, list(range(2, x.dim())), correction=0, keepdim=True)
        x_in = (xf - mu_i) * torch.rsqrt(var_i + self.eps)
        if self.training:
            k = self.virtual_devices
            xs = xf.unflatten(0, (k, -1))              # [K, b, C, *]: device k's slice
            var_b, mu_b = torch.var_mean(xs, [1, *range(3, xs.dim())], correction=0,
                                         keepdim=True)
            x_bn = ((xs - mu_b) * torch.rsqrt(var_b + self.eps)).flatten(0, 1)
            stats = torch.stack([mu_b.reshape(k, -1), var_b.reshape(k, -1)], 1)  # [K, 2, C]
            # Each process moves its own copy; the engine averages the copies before eval and
            # checkpoints, which equals one update from every device (the update is linear).
            mean = self.step_stats.add(self, stats.detach(), self.next_micro_step(), sync=False)
            if mean is not None:
                self.running_mean.lerp_(mean[0], self.momentum)
                self.running_var.lerp_(mean[1], self.momentum)
        else:
            x_bn = (xf - self.running_mean.view(channel)) * torch.rsqrt(
                self.running_var.view(channel) + self.eps)
        rho = self.rho.clamp(0, 1).view(channel)
        y = (rho * x_bn + (1 - rho) * x_in) * self.weight.view(channel) + self.bias.view(channel)
        return y.to(x.dtype)
