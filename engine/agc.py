"""Adaptive gradient clipping (Brock et al. 2021b, "High-performance large-scale image
recognition without normalization", Sec. 4), unit-wise:

    G_i <- G_i * lambda max(|W_i|, eps) / |G_i|    where |G_i| > lambda max(|W_i|, eps)

for each unit i of each weight: a row over the fan-in dims in PyTorch's (out, in, ...) layout;
a scalar or a vector (a gain, a bias) is one unit. lambda 0.01 and eps 1e-3 are the authors'
defaults; the final classifier is not clipped (the paper's recommendation, and timm's
exclude_head). Every other parameter is, skip gains included. The gradient is clipped as the loss
made it, before the optimizer adds weight decay (timm's and the authors' order), after the fp16
loss scale has been removed. |G_i| is floored at 1e-6 in the division only, as both references.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import nn


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """t's units as rows: over every dim but the first, or the whole tensor when ndim <= 1."""
    return t.reshape(1, -1) if t.ndim <= 1 else t.flatten(1)


CLIPPING, EPS = 0.01, 1e-3  # the authors' lambda and floor


@torch.no_grad()
def adaptive_clip_grad_(params: Iterable[torch.Tensor], clipping: float = CLIPPING,
                        eps: float = EPS) -> None:
    """Clip each parameter's .grad in place, unit-wise (the module docstring's equation). The
    units of all parameters are batched by their length: a few kernels per length instead of
    eight per parameter (NF ResNet-20 clips 71 parameters of 8 lengths)."""
    groups = defaultdict(list)
    for p in params:
        if p.grad is not None:
            units = unit_rows(p)
            groups[(units.shape[1], p.device, p.dtype)].append((p, units))
    for members in groups.values():
        group, units = zip(*members)
        # the weights' and the gradients' rows in one tensor: one norm kernel for both
        rows = torch.cat([*units, *(unit_rows(p.grad) for p in group)])
        weight_norm, grad_norm = torch.linalg.vector_norm(rows, dim=1).chunk(2)
        max_norm = weight_norm.clamp_min_(eps).mul_(clipping)
        # lambda max(|W_i|, eps) / |G_i| where that is below 1, else exactly 1 (unchanged)
        factor = max_norm.div_(grad_norm.clamp_min_(1e-6)).clamp_max_(1.0)
        factors = factor.split([len(u) for u in units])
        torch._foreach_mul_([p.grad for p in group],
                            [f.view(-1, *(1,) * (p.ndim - 1)) if p.ndim > 1 else f.view(())
                             for f, p in zip(factors, group)])


def clipped_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter but the final classifier's (`model.classifier`, as the
    harness's ResNets and VGGs name it)."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no `classifier` module: AGC needs to know "
                         "the final classifier to leave it out")
    skip = {id(p) for p in head.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
