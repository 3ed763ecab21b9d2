"""Weight Standardization (Qiao et al. 2019, arXiv 1903.10520)."""
from __future__ import annotations

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
        w = self.weight.flatten(1)
        std, mean = torch.std_mean(w, dim=1, keepdim=True)
        return ((w - mean) / (std + self.eps)).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)
