"""EvoNorm-B0 and EvoNorm-S0 (Liu et al. 2020, arXiv 2004.02967): normalization and activation
as one layer, replacing "norm then ReLU".

    B0: y = x / max(sqrt(s2_B + eps), v x + sqrt(s2_I + eps)) * gamma + beta
    S0: y = x sigmoid(v x) / sqrt(s2_G + eps) * gamma + beta

s2_B: the device batch's variance over (N, H, W) per channel, as bn's (per device-slice with
virtual devices); in eval a running s2_B. s2_I: each sample's variance over (H, W); s2_G: each
sample's variance over its group (C/G channels, H, W). Variances are biased; v per channel,
init 1. With the nonlinearity off (act=False: the end of a residual branch, a projection
shortcut) both are the affine map alone, with no normalization and no running update, as in the
official code (tensorflow/tpu, models/official/resnet/resnet_model.py `evonorm`).

Official constants: eps 1e-5, running variance decay 0.9 (our momentum 0.1, the update rate),
biased. timm (layers/evo_norm.py) differs: B0's eps is 1e-3 and its running variance is scaled
by n/(n-1); S0 requires groups to divide C, as here, where the official code lowers 32 groups
until they divide.

B0's running variance follows bn's rule: each device's update from its own batch, the copies
averaged; here once per optimizer step over all its devices (so accumulation gives the same
running variance as virtual devices); DDP processes average before evaluating and saving.

In training both layers are one autograd Function each with the gradient written out:
autograd's graph of the same maths makes ~30 full passes over the activation (and CPU's var and
maximum kernels are slow). tests/test_micro_norms.py checks them against autograd of the
equations in float64.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .devices import DeviceAware, StepAverage


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * weight.view(shape) + bias.view(shape)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 under reduced precision (statistics and the normalised values)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over the last dim, two passes of plain ops (CPU's var kernel
    over these shapes is ~20x slower than a mean)."""
    mean = x.mean(-1)
    return mean, (x - mean.unsqueeze(-1)).square().mean(-1)


class EvoNormB0(DeviceAware, nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1,
                 act: bool = True):
        super().__init__()
        self.num_channels, self.eps, self.momentum, self.act = num_channels, eps, momentum, act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        if act:
            self.v = nn.Parameter(torch.ones(num_channels))
            self.register_buffer("running_var", torch.ones(num_channels))
        self.step_average = StepAverage()

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, act={self.act}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"EvoNormB0 expects [N, C, H, ...] input, got {tuple(x.shape)}")
        if not self.act:
            return _affine(x, self.weight, self.bias)
        if not self.training:
            n, c = x.shape[:2]
            xf = _wide(x).reshape(n, c, -1)
            _, var_i = _moments(xf)
            right = xf * self.v.view(1, c, 1) + (var_i + self.eps).sqrt().unsqueeze(-1)
            left = (self.running_var + self.eps).sqrt().view(1, c, 1)
            return _affine((xf / torch.maximum(left, right)).view(x.shape), self.weight,
                           self.bias)
        y, var_b = EvoNormB0Function.apply(x, self.v, self.weight, self.bias,
                                           self.virtual_devices, self.eps)
        mean = self.step_average.add(self, var_b.to(self.running_var.dtype),
                                     self.next_micro_step(), sync=False)
        if mean is not None:
            with torch.no_grad():
                self.running_var.lerp_(mean, self.momentum)
        return y


class EvoNormB0Function(torch.autograd.Function):
    """B0 in training for K devices; returns y and the devices' s2_B [K, C] (no gradient).

    With m = max(l, r), l = sqrt(s2_B + eps), r = v x + sqrt(s2_I + eps), o = x / m and
    dL/do = gamma dL/dy:  dL/dm = -dL/do o / m, going to r where r > l, else to l;
    dL/dx = dL/do / m + v dL/dr + d(s2_B, s2_I)/dx terms, each linear in x per (device or
    sample, channel): 2 (x - mean) / count times the variance's gradient."""

    @staticmethod
    def forward(ctx, x, v, weight, bias, devices: int, eps: float):
        n, c = x.shape[:2]
        xf = _wide(x).reshape(devices, n // devices, c, -1)                 # [K, b, C, L]
        mu_i, var_i = _moments(xf)                                          # [K, b, C]
        mu_b = mu_i.mean(1)                                                 # [K, C]
        var_b = var_i.mean(1) + (mu_i - mu_b.unsqueeze(1)).square().mean(1)  # Chan et al.
        sd_i, left = (var_i + eps).sqrt(), (var_b + eps).sqrt()
        m = (xf * v.view(c, 1) + sd_i.unsqueeze(-1)).clamp_min_(left.view(devices, 1, c, 1))
        y = xf / m * weight.view(c, 1) + bias.view(c, 1)
        ctx.save_for_backward(xf, m, mu_i, sd_i, mu_b, left, v, weight)
        ctx.shape = x.shape
        ctx.mark_non_differentiable(var_b)
        return y.view(x.shape), var_b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _):
        xf, m, mu_i, sd_i, mu_b, left, v, weight = ctx.saved_tensors
        k, b, c, length = xf.shape
        g = grad.reshape(xf.shape).to(xf.dtype)
        o = xf / m
        grad_weight = (g * o).sum(-1).sum((0, 1))
        grad_bias = g.sum(-1).sum((0, 1))
        go = g * weight.view(c, 1)
        gm = -go * o / m
        g_right = torch.ops.aten.threshold_backward(gm, m - left.view(k, 1, c, 1), 0.0)
        g_left = (gm - g_right).sum(-1).sum(1)                              # [K, C]
        a_b = g_left / (left * b * length)                                  # d s2_B terms
        a_i = g_right.sum(-1) / (sd_i * length)                             # d s2_I terms
        coef = a_b.unsqueeze(1) + a_i
        const = -(a_b * mu_b).unsqueeze(1) - a_i * mu_i
        gx = go / m + g_right * v.view(c, 1) + xf * coef.unsqueeze(-1) + const.unsqueeze(-1)
        grad_v = (g_right * xf).sum(-1).sum((0, 1))
        return gx.view(ctx.shape), grad_v, grad_weight, grad_bias, None, None


class EvoNormS0(nn.Module):
    def __init__(self, num_channels: int, groups: int = 32, eps: float = 1e-5, act: bool = True):
        super().__init__()
        self.num_channels, self.groups, self.eps, self.act = num_channels, groups, eps, act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.v = nn.Parameter(torch.ones(num_channels)) if act else None

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.groups}, eps={self.eps}, act={self.act}"

    def check_input(self, shape) -> str | None:
        values = self.num_channels // self.groups * math.prod(shape[2:])
        if self.act and values < 2:
            return (f"each of its {self.groups} groups holds one value per sample (input "
                    f"{tuple(shape)}), so s2_G = 0; use fewer groups")
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act:
            return _affine(x, self.weight, self.bias)
        return EvoNormS0Function.apply(x, self.v, self.weight, self.bias, self.groups, self.eps)


class EvoNormS0Function(torch.autograd.Function):
    """S0 with its gradient written out. h = x sigmoid(v x), inv = (s2_G + eps)^-1/2 per
    (sample, group), y = gamma inv h + beta:

        dL/dh = gamma inv dL/dy;   dh/dx = s + v x s (1 - s);   dh/dv = x^2 s (1 - s)
        dL/dinv = sum over the group of gamma h dL/dy;  d s2_G / dx = 2 (x - mean_G) / count
    """

    @staticmethod
    def forward(ctx, x, v, weight, bias, groups: int, eps: float):
        n, c = x.shape[:2]
        xf = _wide(x).reshape(n, c, -1)
        mu, var = _moments(xf.reshape(n, groups, -1))  # [N, G]; a copy if x is channels_last
        inv = torch.rsqrt(var + eps)
        s = torch.sigmoid(xf * v.view(c, 1))
        scale = weight * inv.repeat_interleave(c // groups, 1)              # [N, C]
        y = xf * s * scale.unsqueeze(-1) + bias.view(c, 1)
        ctx.save_for_backward(xf, s, mu, inv, v, weight)
        ctx.groups, ctx.shape = groups, x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xf, s, mu, inv, v, weight = ctx.saved_tensors
        n, c, length = xf.shape
        groups, per_group = ctx.groups, c // ctx.groups
        g = grad.reshape(xf.shape).to(xf.dtype)
        inv_c = inv.repeat_interleave(per_group, 1)                         # [N, C]
        h = xf * s
        t = (g * h).sum(-1)                                                 # [N, C]
        grad_weight, grad_bias = (t * inv_c).sum(0), g.sum(-1).sum(0)
        gh = g * (weight * inv_c).unsqueeze(-1)
        g_inv = (t * weight).view(n, groups, per_group).sum(-1)             # [N, G]
        a = (-g_inv * inv.pow(3) / (per_group * length)).repeat_interleave(per_group, 1)
        p = gh * (s - s * s) * xf                                           # dL/dh x s(1-s)
        grad_v = (p * xf).sum(-1).sum(0)
        gx = gh * s + p * v.view(c, 1) + xf * a.unsqueeze(-1) \
            - (a * mu.repeat_interleave(per_group, 1)).unsqueeze(-1)
        return gx.view(ctx.shape), grad_v, grad_weight, grad_bias, None, None
