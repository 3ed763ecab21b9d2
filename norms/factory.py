"""One factory for every normalization layer: `build_norm(name, num_channels, **options)`, and
the norm-activation seam `build_norm_act`.

Every layer takes the channel count first, so any of them drops in anywhere (timm's habit).
One options dict configures any norm: options a norm has no use for are ignored (`groups` means
nothing to bn), unknown option names and invalid values of used options are an error naming the
norm, the option, the value and what is allowed.

Norm + activation: a model asks for "norm then ReLU" with `build_norm_act`, which returns the
pair (norm, activation): a plain norm and `nn.ReLU`, or a fused layer (FRN+TLU, EvoNorm) with
its nonlinearity on and `FusedActivation` (an identity that marks where the activation is). A
norm with no activation after it (the end of a residual branch, a projection shortcut) is
`build_norm(name, C, act=False)`: the plain norm, or the fused layer with its nonlinearity off.

Normalizer-free (nf): no norm at all. Its slots are identities; what it changes is the
convolution (Scaled WS) and the residual block (`nf_alpha`: a model builds NF blocks when it is
not None), both declared here so that a model asks instead of knowing the name.

The conv before a norm (cbn): a norm whose spec `takes_conv` is built with `conv=`, the
convolution it normalises the output of. `ConvLink` pairs them without the model knowing: it
is the conv factory a model gets, remembers the conv it built last, and the next norm built
takes it (every model builds conv, then the norm after it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .batchnorm import BatchNorm
from .batchrenorm import BatchRenorm
from .bcn import BatchChannelNorm
from .cbn import CrossIterationBatchNorm
from .evonorm import EvoNormB0, EvoNormS0
from .frn import FilterResponseNorm
from .groupnorm import GroupNorm
from .mabn import CenConv2d, MovingAverageBatchNorm
from .online import ECMS, OnlineNorm
from .ws import ScaledWSConv2d

DEFAULT_GROUPS = 32  # GN paper and the BCN authors' code


class FusedActivation(nn.Identity):
    """Stands where "norm then ReLU" has its ReLU when the norm before it is a fused
    norm-activation layer (FRN+TLU, EvoNorm): the activation already happened there."""


@dataclass(frozen=True)
class NormSpec:
    """What the factory knows about one norm: how to build it from its options, which options
    it uses (with their defaults), and what a model must know without knowing the norm."""
    build: Callable[..., nn.Module]
    defaults: dict = field(default_factory=dict)
    grouped: bool = False          # takes groups / channels_per_group
    fused_act: bool = False        # replaces "norm then ReLU"; takes act
    conv: type[nn.Conv2d] = nn.Conv2d  # the convolution before it (mabn: centred filters)
    normalizer_free: bool = False  # nf: models build NF residual blocks (alpha, beta, skip gain)
    takes_conv: bool = False       # built with conv=, the convolution before it (cbn)
    label: str = ""                # a user's layer (norms/custom.py): its name in messages


def _bn(sync: bool) -> Callable[..., nn.Module]:
    return lambda c, **o: BatchNorm(c, sync=sync, **o)


NORM_SPECS: dict[str, NormSpec] = {
    "bn": NormSpec(_bn(False), {"eps": 1e-5, "momentum": 0.1}),
    "syncbn": NormSpec(_bn(True), {"eps": 1e-5, "momentum": 0.1}),
    "gn": NormSpec(lambda c, groups, eps: GroupNorm(groups, c, eps=eps), {"eps": 1e-5},
                   grouped=True),
    "ln": NormSpec(lambda c, eps: GroupNorm(1, c, eps=eps), {"eps": 1e-5}),
    "in": NormSpec(lambda c, eps: GroupNorm(c, c, eps=eps), {"eps": 1e-5}),
    "bcn": NormSpec(BatchChannelNorm, {"eps": 1e-5, "momentum": 0.1, "sync_stats": True},
                    grouped=True),
    "brn": NormSpec(BatchRenorm, {"eps": 1e-5, "momentum": 0.01, "r_max": 3.0, "d_max": 5.0,
                                  "renorm_from": 5000, "r_max_at": 40000, "d_max_at": 25000}),
    "frn": NormSpec(FilterResponseNorm, {"eps": 1e-6, "learned_eps": False}, fused_act=True),
    "evonorm_b0": NormSpec(EvoNormB0, {"eps": 1e-5, "momentum": 0.1}, fused_act=True),
    "evonorm_s0": NormSpec(EvoNormS0, {"eps": 1e-5}, grouped=True, fused_act=True),
    "mabn": NormSpec(MovingAverageBatchNorm, {
        "eps": 1e-5, "momentum": 0.02, "buffer_size": 16, "warmup": 100, "renorm_from": 1000,
        "r_max": 5.0}, conv=CenConv2d),
    # Yao et al.: k = 4, the authors' released configuration (configs/norm/cbn.yaml); burn-in
    # in optimizer steps (the preset's is a fraction of the run, which a layer does not know)
    "cbn": NormSpec(CrossIterationBatchNorm, {"eps": 1e-5, "momentum": 0.1, "window": 4,
                                              "burnin": 0, "compensate": True}, takes_conv=True),
    # Chiley et al. 2019, the authors' CIFAR-10 command: 1023/1024, 127/128, layer scaling
    "online": NormSpec(OnlineNorm, {"alpha_fwd": 1023 / 1024, "alpha_bkw": 127 / 128,
                                    "eps": 1e-5, "ecm": "ls", "clamp": 5.0}),
    "none": NormSpec(lambda c: nn.Identity()),
    # Brock et al. 2021a: no norm; Scaled WS convs and NF blocks h + alpha * skip_gain * f(beta h)
    "nf": NormSpec(lambda c, alpha: nn.Identity(), {"alpha": 0.2}, conv=ScaledWSConv2d,
                   normalizer_free=True),
}
NORMS = tuple(NORM_SPECS)
OPTIONS = ("groups", "channels_per_group", "eps", "momentum", "sync_stats", "r_max", "d_max",
           "renorm_from", "r_max_at", "d_max_at", "warmup", "buffer_size", "learned_eps", "act",
           "alpha", "window", "burnin", "compensate", "alpha_fwd", "alpha_bkw", "ecm", "clamp")


def _number(low: float, high: float | None = None, low_open: bool = False):
    def ok(v) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool)
                and (v > low if low_open else v >= low) and (high is None or v <= high))
    if high is not None:
        return ok, f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    return ok, f"a number {'>' if low_open else '>='} {low:g}"


def _integer(low: int):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
            f"an integer >= {low}")


_BOOL = (lambda v: isinstance(v, bool), "true or false")
# option -> (check, what is allowed)
CHECKS = {"eps": _number(0, low_open=True), "momentum": _number(0, 1, low_open=True),
          "sync_stats": _BOOL, "learned_eps": _BOOL, "act": _BOOL,
          "r_max": _number(1), "d_max": _number(0), "renorm_from": _integer(0),
          "r_max_at": _integer(0), "d_max_at": _integer(0), "warmup": _integer(0),
          "buffer_size": _integer(1), "alpha": _number(0, low_open=True),
          "window": _integer(1), "burnin": _integer(0), "compensate": _BOOL,
          "alpha_fwd": _number(0, 1), "alpha_bkw": _number(0, 1),
          "ecm": (lambda v: v in ECMS, " | ".join(ECMS)), "clamp": _number(0, low_open=True)}


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


def build_norm(name: str | NormSpec, num_channels: int, conv: nn.Conv2d | None = None,
               **options) -> nn.Module:
    """A normalization layer for `num_channels` channels.

    name: bn, syncbn, gn, ln, in, bcn, brn, frn, evonorm_b0, evonorm_s0, mabn, cbn, online, none
    or nf; or a user's layer, `norms.custom_spec(MyNorm, **its_options)` (which carries its own
    options: those below are not passed to it).
    conv: the convolution before the norm; used by cbn (required there), ignored by the others.
    options (each used by the norms named; defaults in NORM_SPECS):
      groups | channels_per_group  gn, bcn, evonorm_s0 (default 32 groups)
      eps                          every norm (1e-5; frn 1e-6)
      momentum                     running-statistics update rate: bn, syncbn (None: cumulative
                                   average), bcn (the estimate rate r), brn (0.01),
                                   evonorm_b0 (0.1), mabn (0.02)
      sync_stats                   bcn: estimates from the global batch (True) or per device
      r_max, d_max                 brn (3, 5), mabn (r_max 5): r and d clipping
      renorm_from                  brn (5000), mabn (1000): the first renorm_from optimizer
                                   steps have r = 1 (and d = 0); r leaves 1 at the next one
                                   (mabn: after max(renorm_from, warmup) steps)
      r_max_at, d_max_at           brn (40000, 25000): the steps at which r_max, d_max are
                                   reached, linearly from renorm_from
      warmup, buffer_size          mabn (100, 16): steps on the current batch's statistics; m
      learned_eps                  frn: eps + |eps_l|, eps_l learned (eps the floor)
      act                          frn, evonorm_*: the layer's nonlinearity (default True)
      alpha_fwd, alpha_bkw         online (1023/1024, 127/128): the decays of the forward's
                                   streamed statistics and of the backward's control processes
      ecm, clamp                   online: error compensation, ls (layer scaling, default) |
                                   ac (activation clamping to +-clamp, 5) | none
      alpha                        nf (0.2): the NF block's residual scale (used by the model;
                                   the layer itself is an identity)
      window, burnin               cbn (4, 0): k, the iterations whose statistics are used;
                                   the first burnin optimizer steps are plain BN
      compensate                   cbn (True): the Taylor compensation; False is the paper's
                                   naive baseline, the old statistics as recorded
    """
    name, spec = spec_of(name)
    if spec.label and set(options) - {"act"}:  # a user's layer: custom_spec bound its options
        raise ValueError(f"{name}: options {sorted(set(options) - {'act'})} go to custom_spec, "
                         "which binds the layer's own options")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(OPTIONS)}")
    _check_positive_int(name, "num_channels", num_channels)
    kwargs = {}
    for key, default in spec.defaults.items():
        value = options.get(key, default)
        if not (key == "momentum" and value is None and name in ("bn", "syncbn")):
            ok, allowed = CHECKS[key]
            if not ok(value):
                allowed += " or None" if key == "momentum" and name in ("bn", "syncbn") else ""
                raise ValueError(f"{name}: {key}={value!r} is invalid; allowed: {allowed}")
        kwargs[key] = value
    for key in ("r_max_at", "d_max_at"):
        if key in kwargs and kwargs[key] < kwargs["renorm_from"]:
            raise ValueError(f"{name}: {key}={kwargs[key]} is before renorm_from="
                             f"{kwargs['renorm_from']}; allowed: an integer >= renorm_from")
    if spec.grouped:
        kwargs["groups"] = resolve_groups(name, num_channels, options.get("groups"),
                                          options.get("channels_per_group"))
    if spec.fused_act:
        act = options.get("act", True)
        if not CHECKS["act"][0](act):
            raise ValueError(f"{name}: act={act!r} is invalid; allowed: true or false")
        kwargs["act"] = act
    if spec.takes_conv:
        kwargs["conv"] = conv
    return spec.build(num_channels, **kwargs)


def build_norm_act(name: str | NormSpec, num_channels: int, inplace: bool = False,
                   **options) -> tuple[nn.Module, nn.Module]:
    """"norm then ReLU" as the pair (norm, activation): (norm, nn.ReLU) for a plain norm,
    (fused layer, FusedActivation) for one that replaces the pair (frn, evonorm_*)."""
    if spec_of(name)[1].fused_act:
        return build_norm(name, num_channels, **{**options, "act": True}), FusedActivation()
    return build_norm(name, num_channels, **options), nn.ReLU(inplace=inplace)


def conv_for(name: str | NormSpec, ws: bool) -> type[nn.Conv2d]:
    """The convolution class before a norm: WS, or the norm's own (mabn: centred filters; nf:
    Scaled WS, which refuses WS on top)."""
    from .ws import WSConv2d
    name, spec = spec_of(name)
    if ws and spec.conv is ScaledWSConv2d:
        raise ValueError(f"norm.ws=true is invalid with norm={name!r}: its convolutions are "
                         "Scaled WS already (a second standardisation); allowed: norm.ws=false")
    return WSConv2d if ws else spec.conv


class ConvLink:
    """The conv factory for a norm that takes the conv before it: builds `conv_cls` convs and
    hands the last one built to the next norm (`take`), each conv to one norm at most."""

    def __init__(self, conv_cls: type[nn.Conv2d]):
        self.conv_cls, self.last = conv_cls, None

    def __call__(self, *args, **kwargs) -> nn.Conv2d:
        self.last = self.conv_cls(*args, **kwargs)
        return self.last

    def take(self) -> nn.Conv2d | None:
        conv, self.last = self.last, None
        return conv


def conv_factory(name: str | NormSpec,
                 ws: bool) -> tuple[Callable[..., nn.Conv2d], ConvLink | None]:
    """The conv a model builds before norm `name` (conv_for), and the link that hands each one
    to the norm after it where the norm takes its conv (cbn); None for the others."""
    conv = conv_for(name, ws)
    if not spec_of(name)[1].takes_conv:
        return conv, None
    link = ConvLink(conv)
    return link, link


def nf_alpha(name: str | NormSpec, **options) -> float | None:
    """The NF residual block's alpha for a normalizer-free norm (nf), checked; None for the
    others (their models keep their own blocks)."""
    name, spec = spec_of(name)
    if not spec.normalizer_free:
        return None
    alpha = options.get("alpha", spec.defaults["alpha"])
    ok, allowed = CHECKS["alpha"]
    if not ok(alpha):
        raise ValueError(f"{name}: alpha={alpha!r} is invalid; allowed: {allowed}")
    return alpha


def spec_of(norm: str | NormSpec) -> tuple[str, NormSpec]:
    """(name, spec) of a built-in norm's name, or of a user's layer's spec (custom_spec)."""
    if isinstance(norm, NormSpec):
        return norm.label, norm
    if norm not in NORM_SPECS:
        raise ValueError(f"norm={norm!r} is unknown; allowed: {', '.join(NORMS)}")
    return norm, NORM_SPECS[norm]


def _check_positive_int(norm: str, key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{norm}: {key}={value!r} must be an integer >= 1")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
