"""One factory for every normalization layer: `build_norm(name, num_channels, **options)`.

Every layer takes the channel count first, so any of them drops in anywhere (timm's habit).
One options dict configures any norm: options a norm has no use for are ignored (`groups` means
nothing to bn), unknown option names are an error.
"""
from __future__ import annotations

from torch import nn

from .batchnorm import BatchNorm
from .bcn import BatchChannelNorm
from .groupnorm import GroupNorm

NORMS = ("bn", "syncbn", "gn", "ln", "in", "bcn", "none")
OPTIONS = ("groups", "channels_per_group", "eps", "momentum", "sync_stats")
DEFAULT_GROUPS = 32  # GN paper and the BCN authors' code


def resolve_groups(norm: str, num_channels: int, groups: int | None = None,
                   channels_per_group: int | None = None) -> int:
    """Number of groups from either form, checked against the channel count."""
    if groups is not None and channels_per_group is not None:
        raise ValueError(f"{norm}: give groups or channels_per_group, not both "
                         f"(groups={groups}, channels_per_group={channels_per_group})")
    if channels_per_group is not None:
        _check_positive_int(norm, "channels_per_group", channels_per_group)
        if num_channels % channels_per_group:
            raise ValueError(f"{norm}: channels_per_group={channels_per_group} does not divide "
                             f"num_channels={num_channels}; allowed: {_divisors(num_channels)}")
        return num_channels // channels_per_group
    groups = DEFAULT_GROUPS if groups is None else groups
    _check_positive_int(norm, "groups", groups)
    if num_channels % groups:
        raise ValueError(f"{norm}: groups={groups} does not divide num_channels={num_channels}; "
                         f"allowed: {_divisors(num_channels)}")
    return groups


def build_norm(name: str, num_channels: int, **options) -> nn.Module:
    """A normalization layer for `num_channels` channels.

    name: bn, syncbn, gn, ln, in, bcn or none.
    options: groups | channels_per_group (gn, bcn; default 32 groups), eps (default 1e-5),
    momentum (bn/syncbn running-statistics rate, None = cumulative; bcn: the update rate r;
    default 0.1), sync_stats (bcn: estimates from the global batch, default True, or private
    per-device estimates).
    """
    if name not in NORMS:
        raise ValueError(f"norm={name!r} is unknown; allowed: {', '.join(NORMS)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(OPTIONS)}")
    _check_positive_int(name, "num_channels", num_channels)
    eps = options.get("eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{name}: eps={eps!r} must be a number > 0")
    momentum = options.get("momentum", 0.1)
    if not (momentum is None and name in ("bn", "syncbn")) and not (
            isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
            and 0 < momentum <= 1):
        raise ValueError(f"{name}: momentum={momentum!r} must be in (0, 1]"
                         + (" or None" if name in ("bn", "syncbn") else ""))

    if name == "none":
        return nn.Identity()
    if name in ("bn", "syncbn"):
        return BatchNorm(num_channels, eps=eps, momentum=momentum, sync=name == "syncbn")
    if name == "ln":
        return GroupNorm(1, num_channels, eps=eps)
    if name == "in":
        return GroupNorm(num_channels, num_channels, eps=eps)
    groups = resolve_groups(name, num_channels, options.get("groups"),
                            options.get("channels_per_group"))
    if name == "gn":
        return GroupNorm(groups, num_channels, eps=eps)
    sync_stats = options.get("sync_stats", True)
    if not isinstance(sync_stats, bool):
        raise ValueError(f"{name}: sync_stats={sync_stats!r} must be true or false")
    return BatchChannelNorm(num_channels, groups=groups, momentum=momentum, eps=eps,
                            sync_stats=sync_stats)


def _check_positive_int(norm: str, key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{norm}: {key}={value!r} must be an integer >= 1")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
