"""Weight Standardization (Qiao et al. 2019, arXiv 1903.10520)."""
from __future__ import annotations

import math

import torch
from torch import nn


class WSConv2d(nn.Conv2d):
    """`nn.Conv2d` whose every output filter is standardised before the convolution.

        W_hat[o] = (W[o] - mean(W[o])) / (std(W[o]) + eps),   mean/std over (in, kh, kw)

    As in the authors' code: the unbiased std, with eps added outside the square root.
    Gradients flow through the standardisation (it is part of the forward).
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        fan_in = self.weight[0].numel()
        if fan_in < 2:
            raise ValueError(f"WSConv2d: each filter has {fan_in} weight; standardising needs >= 2 "
                             "(in_channels/groups x kernel area)")
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        return Standardize.apply(self.weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class Standardize(torch.autograd.Function):
    """Each filter w[o] to (w[o] - mean) / (std + eps), with the gradient written out.

    The cost is per step, not per image: autograd's graph of the same maths is a dozen tiny
    kernels plus their bookkeeping, which at 1-2 images per device rivals the convolution.
    With c = w - mean(w), s = std(c) = |c| / sqrt(n - 1), d = s + eps and g = dL/dW_hat:

        dL/dc = g / d - c (g . c) / (d^2 s (n - 1))     (d s / d c = c / (s (n - 1)))
        dL/dw = dL/dc - mean(dL/dc) = (g - mean(g) - c (g . c) / (d s (n - 1))) / d

    since mean(c) = 0. tests/test_norms.py checks it against autograd in float64.

    Double backward (create_graph=True, e.g. a Hessian-vector product): the backward then
    recomputes c, s and d from the weight with differentiable ops, so the formula above is
    differentiated through them too (tests/test_micro_norms.py checks it against autograd).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, eps: float) -> torch.Tensor:
        centred, std, denom = _moments(weight, eps)
        ctx.eps = eps
        ctx.save_for_backward(weight, centred, std, denom)
        return (centred / denom).view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, centred, std, denom = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: keep the path through the weight
            centred, std, denom = _moments(weight, ctx.eps)
        g = grad.reshape(centred.shape)
        k = torch.linalg.vecdot(g, centred, dim=1).unsqueeze(1) / (denom * std * (g.shape[1] - 1))
        dw = torch.addcmul(g - g.mean(1, keepdim=True), centred, k, value=-1) / denom
        return dw.view_as(grad), None


def _moments(weight: torch.Tensor, eps: float):
    """Per filter: the centred weights c, their unbiased std s, and d = s + eps."""
    w = weight.flatten(1)
    centred = w - w.mean(1, keepdim=True)
    # The unbiased std as a norm: CPU's std_mean kernel is several times slower.
    std = torch.linalg.vector_norm(centred, dim=1, keepdim=True) / math.sqrt(w.shape[1] - 1)
    return centred, std, std + eps
