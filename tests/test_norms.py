"""Every norm against an independent reference: the papers' equations written out in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from norms import (BatchChannelNorm, BatchNorm, GroupNorm, WSConv2d, build_norm,
                   check_statistics, configure_devices)
from norms.factory import NORM_SPECS

DT = torch.float64


def rand_shape(gen, channels=12):
    n = int(torch.randint(2, 6, (1,), generator=gen))
    h, w = (int(v) for v in torch.randint(1, 6, (2,), generator=gen))
    return (n, channels, h, w)


def randomize_affine(module, gen):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5
                    + (1.0 if "weight" in name else 0.0))


def grads(fn, x, params, upstream):
    """(output, d/dx, d/dparams) of sum(fn(x) * upstream)."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    gs = torch.autograd.grad((y * upstream).sum(), [x, *params])
    return y.detach(), gs[0], gs[1:]


def bn_reference(x, weight, bias, eps):
    """Per channel over (N, H, W): (x - mean) / sqrt(var + eps) * gamma + beta, biased var."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape)


def gn_reference(x, groups, weight, bias, eps):
    """Per sample over (C/G channels, H, W); per-channel affine."""
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return y * weight.view(shape) + bias.view(shape)


# ---------------------------------------------------------------- BN


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("devices", [1, 3])
def test_bn_train_matches_reference_per_device(seed, devices):
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = rand_shape(gen)
    x = torch.randn(devices * b, c, h, w, generator=gen, dtype=DT) * 3 + 1
    up = torch.randn(x.shape, generator=gen, dtype=DT)
    bn = BatchNorm(c, momentum=0.3).to(DT)
    randomize_affine(bn, gen)
    configure_devices(bn, virtual_devices=devices)
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    y, gx, (gw, gb) = grads(bn, x, [bn.weight, bn.bias], up)

    def ref(x):
        slices = x.chunk(devices)
        return torch.cat([bn_reference(s, bn.weight, bn.bias, bn.eps) for s in slices])
    y_ref, gx_ref, (gw_ref, gb_ref) = grads(ref, x, [bn.weight, bn.bias], up)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(gb, gb_ref)
    # Running statistics: the average of each device's update (unbiased batch variance).
    slices = x.chunk(devices)
    means = torch.stack([s.mean((0, 2, 3)) for s in slices])
    vars_ = torch.stack([s.transpose(0, 1).reshape(c, -1).var(1) for s in slices])
    torch.testing.assert_close(bn.running_mean, (0.7 * rm0 + 0.3 * means).mean(0))
    torch.testing.assert_close(bn.running_var, (0.7 * rv0 + 0.3 * vars_).mean(0))
    assert int(bn.num_batches_tracked) == 1


def test_bn_eval_uses_running_statistics():
    gen = torch.Generator().manual_seed(0)
    bn = BatchNorm(5).to(DT)
    randomize_affine(bn, gen)
    bn.running_mean.copy_(torch.randn(5, generator=gen, dtype=DT))
    bn.running_var.copy_(torch.rand(5, generator=gen, dtype=DT) + 0.5)
    bn.eval()
    x = torch.randn(1, 5, 3, 3, generator=gen, dtype=DT)
    up = torch.randn(x.shape, generator=gen, dtype=DT)
    shape = (1, -1, 1, 1)

    def ref(x):
        return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
                * bn.weight.view(shape) + bn.bias.view(shape))
    before = bn.running_mean.clone()
    y, gx, gp = grads(bn, x, [bn.weight, bn.bias], up)
    y_ref, gx_ref, gp_ref = grads(ref, x, [bn.weight, bn.bias], up)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gp, gp_ref)
    assert torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("devices", [1, 2])
def test_bn_cumulative_momentum_none(devices):
    """momentum=None: the running statistics are the plain average of every batch statistic
    seen (torch's cumulative average: the initial 0 and 1 drop out at the first step), the
    variance's the unbiased one; each device's, averaged over devices."""
    gen = torch.Generator().manual_seed(2)
    bn = BatchNorm(3, momentum=None).to(DT)
    configure_devices(bn, virtual_devices=devices)
    xs = [torch.randn(4, 3, 2, 2, generator=gen, dtype=DT) * (i + 1) + i for i in range(3)]
    for x in xs:
        bn(x)
    slices = [s for x in xs for s in x.chunk(devices)]
    torch.testing.assert_close(bn.running_mean,
                               torch.stack([s.mean((0, 2, 3)) for s in slices]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack(
        [s.transpose(0, 1).reshape(3, -1).var(1) for s in slices]).mean(0))
    assert int(bn.num_batches_tracked) == len(xs)


@pytest.mark.parametrize("devices", [1, 4])
def test_syncbn_in_one_process_is_bn_over_every_slice(devices):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(devices * 2, 6, 3, 3, generator=gen, dtype=DT)
    up = torch.randn(x.shape, generator=gen, dtype=DT)
    bn = build_norm("syncbn", 6).to(DT)
    randomize_affine(bn, gen)
    configure_devices(bn, virtual_devices=devices)
    y, gx, gp = grads(bn, x, [bn.weight, bn.bias], up)
    y_ref, gx_ref, gp_ref = grads(lambda x: bn_reference(x, bn.weight, bn.bias, bn.eps), x,
                                  [bn.weight, bn.bias], up)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gp, gp_ref)


def test_bn_any_trailing_dims():
    x = torch.randn(4, 3, dtype=DT)
    bn = BatchNorm(3).to(DT)
    torch.testing.assert_close(bn(x), bn_reference(x, bn.weight, bn.bias, bn.eps))


def test_bn_batch_must_split_into_devices():
    bn = BatchNorm(3)
    configure_devices(bn, virtual_devices=3)
    with pytest.raises(ValueError, match="virtual devices"):
        bn(torch.randn(4, 3, 2, 2))


# ---------------------------------------------------------------- GN, LN, IN


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name,groups", [("gn", 4), ("gn", 3), ("ln", 1), ("in", 12)])
@pytest.mark.parametrize("training", [True, False])
def test_group_norms_match_reference(seed, name, groups, training):
    gen = torch.Generator().manual_seed(seed)
    shape = rand_shape(gen)
    if shape[2] * shape[3] == 1 and name == "in":
        shape = (shape[0], shape[1], 2, 3)
    x = torch.randn(shape, generator=gen, dtype=DT) * 2 - 1
    up = torch.randn(x.shape, generator=gen, dtype=DT)
    layer = build_norm(name, 12, groups=groups).to(DT)
    layer.train(training)
    randomize_affine(layer, gen)
    y, gx, gp = grads(layer, x, [layer.weight, layer.bias], up)
    ref = lambda x: gn_reference(x, groups, layer.weight, layer.bias, layer.eps)  # noqa: E731
    y_ref, gx_ref, gp_ref = grads(ref, x, [layer.weight, layer.bias], up)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gp, gp_ref)


def test_gn_does_not_depend_on_other_samples():
    gn = build_norm("gn", 8, groups=2)
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(gn(x)[:1], gn(x[:1]))


# ---------------------------------------------------------------- BCN


def bcn_reference_steps(xs, layer, r, eps, training_flags):
    """Run the paper's equations step by step; returns outputs and final estimates."""
    c, g = layer.num_channels, layer.groups
    mu_hat, var_hat = torch.zeros(c, dtype=DT), torch.ones(c, dtype=DT)
    ebn = layer.estimated_bn
    outs = []
    for x, training in zip(xs, training_flags):
        flat = x.transpose(0, 1).reshape(c, -1)
        if training:
            new_mu = (1 - r) * mu_hat + r * flat.mean(1)
            var_hat = (1 - r) * var_hat + r * ((flat - mu_hat[:, None]) ** 2).mean(1)
            mu_hat = new_mu
        y = ((x - mu_hat.view(1, -1, 1, 1)) / torch.sqrt(var_hat.view(1, -1, 1, 1) + eps)
             * ebn.weight.view(1, -1, 1, 1) + ebn.bias.view(1, -1, 1, 1))
        n = x.shape[0]
        yg = y.reshape(n, g, -1)
        z = (yg - yg.mean(-1, keepdim=True)) / torch.sqrt(yg.var(-1, unbiased=False, keepdim=True)
                                                           + eps)
        z = z * layer.weight.view(1, g, 1) + layer.bias.view(1, g, 1)
        outs.append(z.reshape(x.shape))
    return outs, mu_hat, var_hat


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("groups", [1, 3, 6])
def test_bcn_several_steps_match_equations(seed, groups):
    gen = torch.Generator().manual_seed(seed)
    r = 0.25
    layer = build_norm("bcn", 6, groups=groups, momentum=r).to(DT)
    randomize_affine(layer, gen)
    xs = [torch.randn(int(torch.randint(1, 4, (1,), generator=gen)), 6, 3, 2, generator=gen,
                      dtype=DT) * 2 + 0.5 for _ in range(5)]
    flags = [True, True, False, True, False]
    outs = []
    for x, training in zip(xs, flags):
        layer.train(training)
        outs.append(layer(x))
    ref_outs, mu_hat, var_hat = bcn_reference_steps(xs, layer, r, layer.eps, flags)
    for o, ro in zip(outs, ref_outs):
        torch.testing.assert_close(o, ro)
    torch.testing.assert_close(layer.estimated_bn.mu_hat, mu_hat)
    torch.testing.assert_close(layer.estimated_bn.var_hat, var_hat)


def test_bcn_gradients_do_not_flow_through_estimates():
    gen = torch.Generator().manual_seed(7)
    layer = build_norm("bcn", 4, groups=2, momentum=0.5).to(DT)
    randomize_affine(layer, gen)
    layer(torch.randn(3, 4, 2, 2, generator=gen, dtype=DT))  # move the estimates off 0/1
    x = torch.randn(2, 4, 3, 3, generator=gen, dtype=DT)
    up = torch.randn(x.shape, generator=gen, dtype=DT)
    params = list(layer.parameters())
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    y, gx, gp = grads(layer, x, params, up)
    # Reference: estimates after this step's update, as constants.
    mu_prev, var_prev = state["estimated_bn.mu_hat"], state["estimated_bn.var_hat"]
    flat = x.transpose(0, 1).reshape(4, -1)
    mu = 0.5 * mu_prev + 0.5 * flat.mean(1)
    var = 0.5 * var_prev + 0.5 * ((flat - mu_prev[:, None]) ** 2).mean(1)
    ebn = layer.estimated_bn

    def ref(x):
        y = (x - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
        y = y * ebn.weight.view(1, -1, 1, 1) + ebn.bias.view(1, -1, 1, 1)
        z = gn_reference(y, 2, torch.ones(4, dtype=DT), torch.zeros(4, dtype=DT), 1e-5)
        return (z * layer.weight.repeat_interleave(2).view(1, -1, 1, 1)
                + layer.bias.repeat_interleave(2).view(1, -1, 1, 1))
    y_ref, gx_ref, gp_ref = grads(ref, x, params, up)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b)
    assert layer.weight.shape == (2,) and ebn.weight.shape == (4,)


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_bcn_virtual_devices_update_from_the_global_batch(devices):
    """Synchronised BCN on K virtual devices is the paper's equations over the global batch,
    written out here without any notion of devices: outputs, input and parameter gradients (in
    training and in eval) and mu_hat, var_hat after every step. The slices differ in mean, so
    estimates from one slice, or per-slice normalization, would show."""
    gen = torch.Generator().manual_seed(11)
    r, c, g = 0.3, 6, 2
    layer = build_norm("bcn", c, groups=g, momentum=r).to(DT)
    randomize_affine(layer, gen)
    configure_devices(layer, virtual_devices=devices)
    ebn, params = layer.estimated_bn, list(layer.parameters())
    shift = torch.arange(devices, dtype=DT).repeat_interleave(2).view(-1, 1, 1, 1)
    mu_hat, var_hat = torch.zeros(c, dtype=DT), torch.ones(c, dtype=DT)
    for training in (True, True, False, True, False):
        x = torch.randn(devices * 2, c, 3, 2, generator=gen, dtype=DT) * 2 + 3 * shift
        up = torch.randn(x.shape, generator=gen, dtype=DT)
        if training:  # the global batch's statistics, the variance around the old estimate
            flat = x.transpose(0, 1).reshape(c, -1)
            mu_new = (1 - r) * mu_hat + r * flat.mean(1)
            var_hat = (1 - r) * var_hat + r * ((flat - mu_hat[:, None]) ** 2).mean(1)
            mu_hat = mu_new

        def ref(x, mu=mu_hat.view(1, -1, 1, 1), var=var_hat.view(1, -1, 1, 1)):
            y = ((x - mu) / torch.sqrt(var + layer.eps) * ebn.weight.view(1, -1, 1, 1)
                 + ebn.bias.view(1, -1, 1, 1))
            z = gn_reference(y, g, torch.ones(c, dtype=DT), torch.zeros(c, dtype=DT), layer.eps)
            return (z * layer.weight.repeat_interleave(c // g).view(1, -1, 1, 1)
                    + layer.bias.repeat_interleave(c // g).view(1, -1, 1, 1))
        layer.train(training)
        y, gx, gp = grads(layer, x, params, up)
        y_ref, gx_ref, gp_ref = grads(ref, x, params, up)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(gx, gx_ref)
        for a, b in zip(gp, gp_ref):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(ebn.mu_hat, mu_hat)
        torch.testing.assert_close(ebn.var_hat, var_hat)


# ---------------------------------------------------------------- WS


def test_ws_standardizes_each_filter_and_gradients_flow():
    gen = torch.Generator().manual_seed(3)
    conv = WSConv2d(5, 7, 3, padding=1, bias=True).to(DT)
    with torch.no_grad():
        conv.weight.mul_(3).add_(0.7)
    x = torch.randn(2, 5, 6, 6, generator=gen, dtype=DT)
    up = torch.randn(2, 7, 6, 6, generator=gen, dtype=DT)
    w_hat = conv.standardized_weight().flatten(1)
    torch.testing.assert_close(w_hat.mean(1), torch.zeros(7, dtype=DT))
    fan_in = 5 * 9
    std = w_hat.std(1)  # unbiased, as the authors' code; eps makes it slightly below 1
    assert torch.all((std < 1) & (std > 1 - 1e-4))

    def ref_weight(w):
        flat = w.reshape(7, -1)
        mean = flat.sum(1, keepdim=True) / fan_in
        std = torch.sqrt(((flat - mean) ** 2).sum(1, keepdim=True) / (fan_in - 1))
        return ((flat - mean) / (std + 1e-5)).reshape(w.shape)
    params = [conv.weight, conv.bias]
    y, gx, gp = grads(conv, x, params, up)
    y_ref, gx_ref, gp_ref = grads(
        lambda x: F.conv2d(x, ref_weight(conv.weight), conv.bias, padding=1), x, params, up)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gp, gp_ref)
    assert isinstance(conv, torch.nn.Conv2d)


def test_ws_rejects_single_weight_filters():
    with pytest.raises(ValueError, match="standardising"):
        WSConv2d(1, 4, 1)


# ---------------------------------------------------------------- factory


def test_factory_builds_each_norm():
    assert isinstance(build_norm("bn", 8), BatchNorm) and not build_norm("bn", 8).sync
    assert build_norm("syncbn", 8).sync
    assert build_norm("ln", 8).num_groups == 1
    assert build_norm("in", 8).num_groups == 8
    assert build_norm("gn", 64).num_groups == 32
    assert build_norm("gn", 8, channels_per_group=2).num_groups == 4
    assert isinstance(build_norm("bcn", 16, groups=4), BatchChannelNorm)
    assert isinstance(build_norm("none", 8), torch.nn.Identity)
    assert isinstance(build_norm("gn", 8, groups=8), GroupNorm)
    assert build_norm("bn", 8, groups=3).num_features == 8  # options a norm has no use for


@pytest.mark.parametrize("name,channels,options,match", [
    ("batchnorm", 8, {}, r"norm='batchnorm' is unknown; allowed: bn, syncbn"),
    ("gn", 16, {"groups": 32}, r"gn: groups=32 does not divide num_channels=16; allowed: \[1, 2, 4"),
    ("bcn", 12, {"groups": 5}, r"bcn: groups=5 does not divide"),
    ("gn", 12, {"channels_per_group": 5}, r"channels_per_group=5 does not divide"),
    ("gn", 12, {"groups": 3, "channels_per_group": 4}, "not both"),
    ("gn", 12, {"groups": 0}, r"groups=0 must be an integer >= 1"),
    ("gn", 12, {"groups": 2.5}, r"groups=2.5 must be an integer"),
    ("bn", 0, {}, r"num_channels=0"),
    ("bn", 8, {"eps": -1}, r"bn: eps=-1 is invalid; allowed: a number > 0"),
    ("bn", 8, {"momentum": 1.5}, r"momentum=1.5 is invalid; allowed: a number in \(0, 1\] or None"),
    ("bcn", 8, {"momentum": None, "groups": 2}, r"momentum=None is invalid; allowed: a number in "
                                                r"\(0, 1\]$"),
    ("brn", 8, {"r_max": 0.5}, r"brn: r_max=0.5 is invalid; allowed: a number >= 1"),
    ("mabn", 8, {"r_max": 0.9}, r"mabn: r_max=0.9 is invalid; allowed: a number >= 1"),
    ("brn", 8, {"d_max": -1}, r"brn: d_max=-1 is invalid; allowed: a number >= 0"),
    ("brn", 8, {"renorm_from": 100, "d_max_at": 50}, r"brn: d_max_at=50 is before renorm_from=100"),
    ("brn", 8, {"renorm_from": 2.5}, r"brn: renorm_from=2.5 is invalid; allowed: an integer >= 0"),
    ("frn", 8, {"eps": 0.0}, r"frn: eps=0.0 is invalid; allowed: a number > 0"),
    ("frn", 8, {"learned_eps": "yes"}, r"frn: learned_eps='yes' is invalid; allowed: true or false"),
    ("evonorm_b0", 8, {"eps": -1e-5}, r"evonorm_b0: eps=-1e-05 is invalid"),
    ("evonorm_s0", 12, {"groups": 5}, r"evonorm_s0: groups=5 does not divide num_channels=12"),
    ("mabn", 8, {"buffer_size": 0}, r"mabn: buffer_size=0 is invalid; allowed: an integer >= 1"),
    ("mabn", 8, {"warmup": -1}, r"mabn: warmup=-1 is invalid; allowed: an integer >= 0"),
    ("gn", 8, {"group": 2}, r"unknown option\(s\) group; allowed: groups"),
])
def test_factory_rejects_bad_options(name, channels, options, match):
    with pytest.raises(ValueError, match=match):
        build_norm(name, channels, **options)


# ---------------------------------------------------------------- early checks


class Tiny(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=32)
        self.head = torch.nn.Sequential(build_norm(norm, 4, groups=4))

    def forward(self, x):
        return self.head(self.conv(x))


@pytest.mark.parametrize("norm,ok_batch", [("bn", 2), ("in", None), ("bcn", None)])
def test_check_statistics_names_the_layer(norm, ok_batch):
    model = Tiny(norm)  # the norm sees 1x1 spatial
    with pytest.raises(ValueError, match=r"^head\.0 \(") as err:
        check_statistics(model, (1, 3, 32, 32))
    assert "output" in str(err.value) or "undefined" in str(err.value)
    if ok_batch:
        check_statistics(model, (ok_batch, 3, 32, 32))


def test_check_statistics_syncbn_counts_every_device():
    model = Tiny("syncbn")
    with pytest.raises(ValueError):
        check_statistics(model, (1, 3, 32, 32))
    configure_devices(model, virtual_devices=2)
    check_statistics(model, (1, 3, 32, 32))
    assert model.training and math.isclose(float(model.head[0].running_mean.sum()), 0.0)


def test_bcn_private_estimates_per_virtual_device():
    """sync_stats=False: device k normalises with its own estimates, updated from its slice
    only, exactly like an independent layer per device; eval uses their average."""
    gen = torch.Generator().manual_seed(5)
    k = 3
    layer = build_norm("bcn", 6, groups=2, momentum=0.3, sync_stats=False).to(DT)
    randomize_affine(layer, gen)
    configure_devices(layer, virtual_devices=k)
    assert layer.estimated_bn.mu_hat.shape == (k, 6)
    singles = [build_norm("bcn", 6, groups=2, momentum=0.3).to(DT) for _ in range(k)]
    for s in singles:
        s.load_state_dict({n: v for n, v in layer.state_dict().items() if "_hat" not in n},
                          strict=False)
    for _ in range(3):
        x = torch.randn(k * 2, 6, 3, 3, generator=gen, dtype=DT) * 2 + 1
        y = layer(x)
        torch.testing.assert_close(y, torch.cat([s(c) for s, c in zip(singles, x.chunk(k))]))
    ebn = layer.estimated_bn
    for i, s in enumerate(singles):
        torch.testing.assert_close(ebn.mu_hat[i], s.estimated_bn.mu_hat)
    layer.eval()
    x = torch.randn(4, 6, 3, 3, generator=gen, dtype=DT)
    avg = build_norm("bcn", 6, groups=2).to(DT).eval()
    avg.load_state_dict({**layer.state_dict(), "estimated_bn.mu_hat": ebn.mu_hat.mean(0),
                         "estimated_bn.var_hat": ebn.var_hat.mean(0)})
    torch.testing.assert_close(layer(x), avg(x))
    with pytest.raises(ValueError, match="bcn: sync_stats='no' is invalid; allowed: true or false"):
        build_norm("bcn", 6, groups=2, sync_stats="no")


@pytest.mark.parametrize("name", [n for n, s in NORM_SPECS.items()
                                  if not s.takes_conv and n not in ("none", "nf", "syncbn")])
def test_every_norm_computes_in_float32_under_bf16_autocast(name):
    """trainer.precision=bf16 runs the forward under autocast: convolutions in bf16, norms in
    their float32 (autocast lowers any matmul a norm's statistics would use). Given the same
    float32 input, each layer is the same with autocast on or off: outputs, gradients (the
    backward outside autocast, as the engine's), and in eval. cbn: tests/test_cbn.py."""
    grouped = {"groups": 4} if NORM_SPECS[name].grouped else {}
    layers = [build_norm(name, 8, **grouped) for _ in range(2)]
    for layer in layers:
        configure_devices(layer, virtual_devices=2)
    layers[1].load_state_dict(layers[0].state_dict())
    gen = torch.Generator().manual_seed(0)
    for t in range(6):  # past MABN's and BRN's first steps: windows and running statistics
        x, up = torch.randn(4, 8, 5, 5, generator=gen) * (1 + t) + t, torch.randn(4, 8, 5, 5)
        outs = []
        for layer, amp in zip(layers, (False, True)):
            xg = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = layer(xg)
            outs.append((y, *torch.autograd.grad((y * up).sum(), [xg, *layer.parameters()])))
        for got, want in zip(*outs[::-1]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for layer in layers:
        layer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layers[1](x)
    torch.testing.assert_close(got, layers[0](x), rtol=0, atol=0)
