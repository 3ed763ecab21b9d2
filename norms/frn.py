"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2020,
arXiv 1911.09737). Batch-independent: every statistic is one sample's, one channel's.

    nu2 = mean over (H, W) of x^2
    y   = gamma x / sqrt(nu2 + |eps|) + beta
    z   = max(y, tau)                                   TLU, tau learned per channel (init 0)

eps is a constant (1e-6, the paper's value for conv layers), or with `learned_eps` the paper's
learned form eps + |eps_l|, one scalar eps_l per layer initialised to 1e-4 (meant for 1x1 maps,
where nu2 is one value), eps then the floor (the paper's 1e-6 by default). timm's
FilterResponseNormTlu2d is the same maths with eps fixed at 1e-5. FRN+TLU replaces "norm then
ReLU"; with act=False (the end of a residual branch) it is FRN without the TLU, as timm's
apply_act=False.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

class FilterResponseNorm(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6, learned_eps: bool = False,
                 act: bool = True):
        super().__init__()
        self.num_channels, self.eps, self.act = num_channels, eps, act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.tau = nn.Parameter(torch.zeros(num_channels)) if act else None
        self.eps_l = nn.Parameter(torch.tensor(1e-4)) if learned_eps else None

    def extra_repr(self) -> str:
        eps = f"{self.eps:g} + |eps_l|" if self.eps_l is not None else f"{self.eps:g}"
        return f"{self.num_channels}, eps={eps}, tlu={self.act}"

    def check_input(self, shape) -> str | None:
        if math.prod(shape[2:]) < 2 and self.eps_l is None:
            return (f"nu2 over {math.prod(shape[2:])} value per channel (input "
                    f"{tuple(shape)}) makes y = sign(x); the paper learns eps for 1x1 maps: "
                    "set norm.learned_eps=true")
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"FRN expects [N, C, H, ...] input, got {tuple(x.shape)}")
        eps = self.eps + self.eps_l.abs() if self.eps_l is not None else self.eps
        return FRNFunction.apply(x, self.weight, self.bias, self.tau, eps)


class FRNFunction(torch.autograd.Function):
    """FRN (+ TLU when tau is given) with its gradient written out: autograd's graph of the
    same maths is a dozen full passes over the activation, this is half of that. With
    inv = (nu2 + eps)^-1/2, s = sum over (H, W) of dL/dy x, and L = H W:

        dL/dx     = gamma inv (dL/dy - x inv^2 s / L)
        dL/dgamma = sum_n inv s,   dL/deps = -sum_{n,c} gamma inv^3 s / 2
        dL/dy     = dL/dz where y > tau, else 0;   dL/dtau = sum of the rest

    tests/test_micro_norms.py checks it against autograd of the equations in float64."""

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        n, c = x.shape[:2]
        xf = x.reshape(n, c, -1).to(torch.promote_types(x.dtype, torch.float32))
        inv = torch.rsqrt(xf.square().mean(-1) + eps)                        # [N, C]
        y = xf * (inv * weight).unsqueeze(-1) + bias.view(1, c, 1)
        if tau is not None:
            y = y.clamp_min_(tau.view(1, c, 1))                              # max(y, tau)
        ctx.save_for_backward(xf, inv, weight, tau, y if tau is not None else None)
        ctx.eps_grad = isinstance(eps, torch.Tensor) and eps.requires_grad
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xf, inv, weight, tau, z = ctx.saved_tensors
        c, length = xf.shape[1], xf.shape[2]
        g = grad.reshape(xf.shape).to(xf.dtype)
        grad_tau = None
        if tau is not None:
            # TLU: the gradient reaches y where z > tau (at a tie it goes to tau)
            gy = torch.ops.aten.threshold_backward(g, z - tau.view(1, c, 1), 0.0)
            grad_tau = g.sum(-1).sum(0) - gy.sum(-1).sum(0)
        else:
            gy = g
        s = (gy * xf).sum(-1)                                                # [N, C]
        scale = inv * weight
        gx = gy * scale.unsqueeze(-1) - xf * (scale * inv.square() * s / length).unsqueeze(-1)
        grad_eps = (-0.5 * weight * s * inv.pow(3)).sum() if ctx.eps_grad else None
        return (gx.view(ctx.shape), (s * inv).sum(0), gy.sum(-1).sum(0), grad_tau, grad_eps)
