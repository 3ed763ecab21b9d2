"""Weight Standardization (Qiao et al. 2019, arXiv 1903.10520) and Scaled WS (Brock et al. 2021,
the normalizer-free ResNets): one standardisation, two scales."""
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

    def standardize(self, weight: torch.Tensor) -> torch.Tensor:
        """WS of any weight of this conv's filter shape (cbn's derivatives chain through it)."""
        return Standardize.apply(weight, self.eps)

    def standardized_weight(self) -> torch.Tensor:
        return self.standardize(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


RELU_GAMMA = 1.7139588594436646
"""ReLU's gain gamma = 1 / std(relu(z)), z ~ N(0, 1), as the NFNet authors' code (and timm) have
it; the closed form sqrt(2 / (1 - 1/pi)) is 1.71286: their constant is an empirical estimate."""


class ScaledWSConv2d(WSConv2d):
    """`nn.Conv2d` with Scaled Weight Standardization (Brock et al. 2021a, Eq. 5):

        W^[o] = gain[o] gamma (W[o] - mean(W[o])) / sqrt(max(N var(W[o]), eps)),  N = fan-in

    var biased, so N var = |W[o] - mean|^2. gain is learned per output filter (init 1); gamma
    is the gain of the activation feeding this conv (RELU_GAMMA after a ReLU, 1 for the image):
    folding it into the weight is the authors' relu(x) gamma, one multiply per step instead of
    one per activation. eps 1e-4 and the max as in the authors' code (deepmind-research nfnets
    base.WSConv2D); timm's ScaledStdConv2d adds N x 1e-6 inside the root instead.
    """

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-4, **kwargs):
        super().__init__(*args, eps=eps, **kwargs)
        self.gamma = gamma
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def standardized_weight(self) -> torch.Tensor:
        return Standardize.apply(self.weight, self.eps, True) * (self.gain * self.gamma)


class Standardize(torch.autograd.Function):
    """Each filter w[o] to (w[o] - mean) / (std + eps), with the gradient written out; with
    `scaled`, to (w[o] - mean) / sqrt(max(|w[o] - mean|^2, eps)) (Scaled WS before its gains).

    The cost is per step, not per image: autograd's graph of the same maths is a dozen tiny
    kernels plus their bookkeeping, which at 1-2 images per device rivals the convolution.
    With c = w - mean(w), s = std(c) = |c| / sqrt(n - 1), d = s + eps and g = dL/dW_hat:

        dL/dc = g / d - c (g . c) / (d^2 s (n - 1))     (d s / d c = c / (s (n - 1)))
        dL/dw = dL/dc - mean(dL/dc) = (g - mean(g) - c (g . c) / (d s (n - 1))) / d

    since mean(c) = 0. Scaled: d = sqrt(max(|c|^2, eps)), so d d / d c = c / d where |c|^2 > eps
    and 0 where the floor holds: the same line with (d s (n - 1)) replaced by d^2 (or the term
    dropped). tests/test_norms.py and tests/test_nf.py check both against autograd in float64.

    Double backward (create_graph=True, e.g. a Hessian-vector product): the backward then
    recomputes c, s and d from the weight with differentiable ops, so the formula above is
    differentiated through them too (tests/test_micro_norms.py checks it against autograd).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, eps: float, scaled: bool = False) -> torch.Tensor:
        centred, std, denom = _moments(weight, eps, scaled)
        ctx.eps, ctx.scaled = eps, scaled
        ctx.save_for_backward(weight, centred, std, denom)
        return (centred / denom).view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, centred, std, denom = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: keep the path through the weight
            centred, std, denom = _moments(weight, ctx.eps, ctx.scaled)
        g = grad.reshape(centred.shape)
        gc = torch.linalg.vecdot(g, centred, dim=1).unsqueeze(1)
        if ctx.scaled:  # std is |c| here; where the eps floor holds d is constant
            k = torch.where(std * std > ctx.eps, gc / (denom * denom), 0.0)
        else:
            k = gc / (denom * std * (g.shape[1] - 1))
        dw = torch.addcmul(g - g.mean(1, keepdim=True), centred, k, value=-1) / denom
        return dw.view_as(grad), None, None


def _moments(weight: torch.Tensor, eps: float, scaled: bool = False):
    """Per filter: the centred weights c, their unbiased std s, and d = s + eps; scaled:
    c, |c| = sqrt(N var) and d = sqrt(max(|c|^2, eps))."""
    w = weight.flatten(1)
    centred = w - w.mean(1, keepdim=True)
    # The std as a norm: CPU's std_mean kernel is several times slower.
    norm = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
    if scaled:
        return centred, norm, torch.sqrt(torch.clamp_min(norm * norm, eps))
    std = norm / math.sqrt(w.shape[1] - 1)
    return centred, std, std + eps
