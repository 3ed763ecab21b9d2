"""Group Normalization (Wu & He 2018, arXiv 1803.08494); LN and IN are its two extremes.

    y = (x - mean_g) / sqrt(var_g + eps) * gamma_c + beta_c

with mean_g, var_g over (C/G channels of group g, H, W) of one sample. LN: G = 1; IN: G = C.
"""
from __future__ import annotations

import math

from torch import nn


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm (per-channel affine) plus the early input check of this package."""

    def check_input(self, shape) -> str | None:
        values = self.num_channels // self.num_groups * math.prod(shape[2:])
        if values < 2:
            return (f"each of its {self.num_groups} groups holds one value per sample "
                    f"(input {tuple(shape)}), so every output would be 0")
        return None
