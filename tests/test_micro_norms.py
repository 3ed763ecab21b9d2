"""The published micro-batch normalizers (brn, frn, evonorm_b0, evonorm_s0, mabn) against the
papers' equations written out independently in float64: forward, backward, buffers over several
training steps, then eval; FRN and EvoNorm also against timm where the maths coincide."""
import math

import pytest
import torch
import torch.nn.functional as F

from norms import (BatchNorm, BatchRenorm, CenConv2d, EvoNormB0, EvoNormS0, FilterResponseNorm,
                   MovingAverageBatchNorm, WSConv2d, build_norm, build_norm_act,
                   configure_devices)
from norms.ws import Standardize

DT = torch.float64
C = 6


def randomize(module, gen):
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name in ("weight", "v") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + base)


def batches(gen, steps, n, c=C, hw=(3, 4)):
    """Inputs whose statistics drift from step to step, so running statistics lag behind."""
    return [(torch.randn(n, c, *hw, generator=gen, dtype=DT) * (1 + 0.3 * t) + 0.5 * t,
             torch.randn(n, c, *hw, generator=gen, dtype=DT)) for t in range(steps)]


def step(fn, x, up, params):
    """Output and the gradients (x, *params) of sum(fn(x) * up)."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    return (y.detach(), *torch.autograd.grad((y * up).sum(), [x, *params]))


def assert_steps_match(layer, reference, data, params, ref_params):
    for t, (x, up) in enumerate(data):
        got = step(layer, x, up, params)
        want = step(lambda z: reference(z, t), x, up, ref_params)
        for name, a, b in zip(("y", "dx", *(f"d{p}" for p in range(len(params)))), got, want):
            torch.testing.assert_close(a, b, msg=f"step {t}: {name}")


def per_channel(v, dims=4):
    return v.view((1, -1) + (1,) * (dims - 2))


# ---------------------------------------------------------------- BRN


class BRNReference:
    """Ioffe 2017, Algorithm 1, per device; the running mu, sigma shared by the devices and
    moved toward the devices' mean (mu_B, sigma_B) once per step."""

    def __init__(self, gamma, beta, eps, momentum, r_max, d_max, start, r_at, d_at, devices):
        self.gamma, self.beta, self.eps, self.alpha = gamma, beta, eps, momentum
        self.r_max, self.d_max, self.start, self.r_at, self.d_at = r_max, d_max, start, r_at, d_at
        self.devices = devices
        self.mu, self.sigma = torch.zeros(C, dtype=DT), torch.ones(C, dtype=DT)

    def limits(self, t):  # t: the 0-based index of the step; s = t + 1 its number
        def ramp(end):
            return min(1.0, max(0.0, (t + 1 - self.start) / (end - self.start)))
        return 1 + (self.r_max - 1) * ramp(self.r_at), self.d_max * ramp(self.d_at)

    def __call__(self, x, t):
        r_max, d_max = self.limits(t)
        ys, mus, sigmas = [], [], []
        for s in x.chunk(self.devices):
            mu_b = s.mean((0, 2, 3))
            sigma_b = torch.sqrt(((s - per_channel(mu_b)) ** 2).mean((0, 2, 3)) + self.eps)
            r = (sigma_b / self.sigma).clamp(1 / r_max, r_max).detach()
            d = ((mu_b - self.mu) / self.sigma).clamp(-d_max, d_max).detach()
            x_hat = (s - per_channel(mu_b)) / per_channel(sigma_b) * per_channel(r) \
                + per_channel(d)
            ys.append(per_channel(self.gamma) * x_hat + per_channel(self.beta))
            mus.append(mu_b.detach())
            sigmas.append(sigma_b.detach())
        self.mu = self.mu + self.alpha * (torch.stack(mus).mean(0) - self.mu)
        self.sigma = self.sigma + self.alpha * (torch.stack(sigmas).mean(0) - self.sigma)
        return torch.cat(ys)

    def eval(self, x):
        return per_channel(self.gamma) * (x - per_channel(self.mu)) / per_channel(self.sigma) \
            + per_channel(self.beta)


@pytest.mark.parametrize("devices", [1, 3])
@pytest.mark.parametrize("seed", range(2))
def test_brn_steps_match_the_paper(devices, seed):
    """Relaxation within the run (r_max 1 -> 2 over steps 1..4, d_max 0 -> 0.5 over 1..3), so
    the steps cover BN, partly and fully clipped r and d."""
    gen = torch.Generator().manual_seed(seed)
    opts = dict(eps=1e-3, momentum=0.3, r_max=2.0, d_max=0.5, renorm_from=1, r_max_at=4,
                d_max_at=3)
    layer = build_norm("brn", C, **opts).to(DT)
    randomize(layer, gen)
    configure_devices(layer, virtual_devices=devices)
    ref = BRNReference(layer.weight, layer.bias, opts["eps"], opts["momentum"], opts["r_max"],
                       opts["d_max"], 1, 4, 3, devices)
    data = batches(gen, 6, devices * 3)
    params = [layer.weight, layer.bias]
    assert_steps_match(layer, ref, data, params, params)
    torch.testing.assert_close(layer.running_mean, ref.mu)
    torch.testing.assert_close(layer.running_std, ref.sigma)
    assert int(layer.steps) == 6
    layer.eval()
    x = data[0][0]
    torch.testing.assert_close(layer(x), ref.eval(x))


def test_brn_schedule_counts_optimizer_steps():
    """renorm_from steps with r = 1, d = 0, as the factory says (and mabn counts), whether the
    limits then ramp or jump; r_max reached at step r_max_at. Keys: step s (1-based)."""
    layer = BatchRenorm(C, r_max=3.0, d_max=5.0, renorm_from=10, r_max_at=50, d_max_at=30)
    expected = {1: (1, 0), 10: (1, 0), 11: (1.05, 0.25), 20: (1.5, 2.5), 30: (2, 5),
                50: (3, 5), 80: (3, 5)}
    jump = BatchRenorm(C, renorm_from=10, r_max_at=10, d_max_at=10)  # end = start: a step
    for brn, steps in ((layer, expected), (jump, {10: (1, 0), 11: (3, 5)})):
        for s, (r, d) in steps.items():
            brn.steps.fill_(s - 1)  # the steps done before step s
            assert [float(v) for v in brn.limits()] == pytest.approx([r, d]), s
    held = [BatchRenorm(C, renorm_from=n, r_max_at=end, d_max_at=end)
            for n, end in ((10, 10), (10, 50), (0, 4))]
    for brn in held:  # count the steps of a run that keep r_max = 1
        ones = 0
        for t in range(60):
            brn.steps.fill_(t)
            ones += float(brn.limits()[0]) == 1.0
        assert ones == brn.renorm_from, brn


def test_brn_without_relaxation_is_bn_exactly():
    """r_max = 1, d_max = 0: the same outputs and gradients as bn, bit for bit, over several
    steps with virtual devices; the running mean up to rounding (bn averages the devices'
    updated copies, brn updates with the devices' average; the running sigma is BRN's own)."""
    gen = torch.Generator().manual_seed(0)
    brn = build_norm("brn", C, momentum=0.1, r_max=1.0, d_max=0.0)
    bn = build_norm("bn", C, momentum=0.1)
    randomize(brn, gen)
    bn.load_state_dict({k: v for k, v in brn.state_dict().items() if k in ("weight", "bias")},
                       strict=False)
    for layer in (brn, bn):
        configure_devices(layer, virtual_devices=2)
    for x, up in batches(gen, 4, 8):
        x, up = x.float(), up.float()
        a = step(brn, x, up, [brn.weight, brn.bias])
        b = step(bn, x, up, [bn.weight, bn.bias])
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-7)


def test_brn_accumulation_and_virtual_devices_are_one_step():
    """K accumulation micro-steps of one device each = K virtual devices: outputs, gradients,
    running statistics, and the step counter (one per optimizer step, not per forward)."""
    gen = torch.Generator().manual_seed(1)
    opts = dict(momentum=0.3, r_max=2.0, d_max=0.5, renorm_from=0, r_max_at=2, d_max_at=2)
    virtual, accum = (build_norm("brn", C, **opts).to(DT) for _ in range(2))
    randomize(virtual, gen)
    accum.load_state_dict(virtual.state_dict())
    configure_devices(virtual, virtual_devices=2)
    configure_devices(accum, accumulate=2)
    for x, up in batches(gen, 3, 4):
        y, gx, gw = step(virtual, x, up, [virtual.weight])
        parts = [step(accum, xs, us, [accum.weight]) for xs, us in zip(x.chunk(2), up.chunk(2))]
        torch.testing.assert_close(y, torch.cat([p[0] for p in parts]))
        torch.testing.assert_close(gx, torch.cat([p[1] for p in parts]))
        torch.testing.assert_close(gw, parts[0][2] + parts[1][2])
    for name, buf in virtual.named_buffers():
        torch.testing.assert_close(buf, accum.get_buffer(name), msg=name)
    assert int(accum.steps) == 3


# ---------------------------------------------------------------- FRN


def frn_reference(x, gamma, beta, tau, eps):
    nu2 = (x ** 2).mean((2, 3), keepdim=True)
    y = per_channel(gamma) * x / torch.sqrt(nu2 + abs(eps)) + per_channel(beta)
    return torch.maximum(y, per_channel(tau)) if tau is not None else y


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("learned_eps", [False, True])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_frn_matches_the_paper(act, learned_eps, eps):
    """eps is the constant, or with learned_eps the floor under |eps_l| (the paper's 1e-6 by
    default; another eps is honoured, not replaced by 1e-6)."""
    gen = torch.Generator().manual_seed(2)
    layer = build_norm("frn", C, eps=eps, learned_eps=learned_eps, act=act).to(DT)
    randomize(layer, gen)
    params = list(layer.parameters())
    x, up = batches(gen, 1, 4)[0]
    x = x * 0.1  # small activations, where eps matters

    def ref(z, t):
        return frn_reference(z, layer.weight, layer.bias, layer.tau,
                             eps + layer.eps_l.abs() if learned_eps else eps)
    assert_steps_match(layer, ref, [(x, up)], params, params)
    layer.eval()
    torch.testing.assert_close(layer(x), ref(x, 0))  # no batch statistics, no state


def test_frn_is_batch_independent_and_timms():
    timm_frn = pytest.importorskip("timm.layers.filter_response_norm")
    gen = torch.Generator().manual_seed(3)
    ours = FilterResponseNorm(C, eps=1e-5)  # timm's eps is fixed at 1e-5
    randomize(ours, gen)
    theirs = timm_frn.FilterResponseNormTlu2d(C, eps=1e-5)  # float32, as timm computes nu2
    theirs.load_state_dict(ours.state_dict())
    x, up = (t.float() for t in batches(gen, 1, 4)[0])
    for a, b in zip(step(ours, x, up, list(ours.parameters())),
                    step(theirs, x, up, list(theirs.parameters()))):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours(x)[1:2], ours(x[1:2]))


# ---------------------------------------------------------------- EvoNorm


def b0_reference(x, gamma, beta, v, eps, devices=1, running_var=None):
    """s2_B per device over (N, H, W); in eval the running variance."""
    s2_i = x.var((2, 3), correction=0, keepdim=True)
    right = per_channel(v) * x + torch.sqrt(s2_i + eps)
    if running_var is None:
        lefts = [torch.sqrt(s.var((0, 2, 3), correction=0) + eps).view(1, -1, 1, 1).expand_as(s)
                 for s in x.chunk(devices)]
        left = torch.cat(lefts)
    else:
        left = per_channel(torch.sqrt(running_var + eps))
    return x / torch.maximum(left, right) * per_channel(gamma) + per_channel(beta)


@pytest.mark.parametrize("devices", [1, 2])
def test_evonorm_b0_steps_match_the_paper(devices):
    gen = torch.Generator().manual_seed(4)
    layer = EvoNormB0(C, momentum=0.3).to(DT)
    randomize(layer, gen)
    configure_devices(layer, virtual_devices=devices)
    params = list(layer.parameters())
    data = batches(gen, 3, devices * 2)
    running = torch.ones(C, dtype=DT)

    def ref(x, t):
        nonlocal running
        s2 = torch.stack([s.var((0, 2, 3), correction=0) for s in x.chunk(devices)]).mean(0)
        running = running + 0.3 * (s2.detach() - running)  # biased, decay 0.7, device average
        return b0_reference(x, layer.weight, layer.bias, layer.v, 1e-5, devices)
    assert_steps_match(layer, ref, data, params, params)
    torch.testing.assert_close(layer.running_var, running)
    layer.eval()
    x = data[0][0]
    torch.testing.assert_close(
        layer(x), b0_reference(x, layer.weight, layer.bias, layer.v, 1e-5, running_var=running))


def test_evonorm_without_nonlinearity_is_the_affine_map():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, C, 3, 3, generator=gen, dtype=DT)
    for layer in (EvoNormB0(C, act=False), EvoNormS0(C, groups=2, act=False)):
        layer = layer.to(DT)
        randomize(layer, gen)
        torch.testing.assert_close(layer(x), x * per_channel(layer.weight)
                                   + per_channel(layer.bias))
        assert not list(layer.buffers())  # no running update either


def s0_reference(x, gamma, beta, v, groups, eps):
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, -1)
    std = torch.sqrt(xg.var(-1, correction=0, keepdim=True) + eps)
    den = std.expand_as(xg).reshape(x.shape)
    return x * torch.sigmoid(per_channel(v) * x) / den * per_channel(gamma) + per_channel(beta)


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_evonorm_s0_matches_the_paper(groups):
    gen = torch.Generator().manual_seed(6)
    layer = EvoNormS0(C, groups=groups).to(DT)
    randomize(layer, gen)
    params = list(layer.parameters())
    data = batches(gen, 2, 3)
    assert_steps_match(layer, lambda z, t: s0_reference(z, layer.weight, layer.bias, layer.v,
                                                        groups, 1e-5), data, params, params)
    torch.testing.assert_close(layer(data[0][0])[:1], layer(data[0][0][:1]))


@pytest.mark.parametrize("name", ["evonorm_b0", "evonorm_s0"])
def test_evonorm_equals_timms_at_the_same_eps(name):
    evo = pytest.importorskip("timm.layers.evo_norm")
    gen = torch.Generator().manual_seed(7)
    ours = build_norm(name, 8, groups=4)
    theirs = (evo.EvoNorm2dB0(8, eps=1e-5) if name == "evonorm_b0"  # timm's B0 default is 1e-3
              else evo.EvoNorm2dS0(8, groups=4))  # float32: timm computes its stds in float32
    randomize(ours, gen)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    x, up = (t.float() for t in batches(gen, 1, 4, c=8)[0])
    for a, b in zip(step(ours, x, up, [ours.weight, ours.bias, ours.v]),
                    step(theirs, x, up, [theirs.weight, theirs.bias, theirs.v])):
        torch.testing.assert_close(a, b)
    if name == "evonorm_b0":  # where they differ: timm scales the running variance by n/(n-1)
        n = x.numel() / 8
        var = x.var((0, 2, 3), correction=0)
        torch.testing.assert_close(ours.running_var, 0.9 + 0.1 * var)
        torch.testing.assert_close(theirs.running_var, 0.9 + 0.1 * var * n / (n - 1))


# ---------------------------------------------------------------- MABN


class MABNReference:
    """Yan et al. 2020 as megvii-model/MABN's MABN.py computes it, one device, with explicit
    histories: forward and the moving-average backward written out."""

    def __init__(self, gamma, beta, m, eps, momentum, warmup, renorm_from, r_max):
        self.gamma, self.beta, self.m, self.eps, self.alpha = gamma, beta, m, eps, momentum
        self.warmup, self.renorm_from, self.r_max = warmup, renorm_from, r_max
        self.x2, self.gz, self.running_var, self.t = [], [], torch.ones(C, dtype=DT), 0

    def step(self, x, up):
        """(y, dL/dx, dL/dgamma, dL/dbeta) for upstream gradient `up`."""
        self.t += 1
        current = self.t <= self.m or self.t < self.warmup
        self.x2.append((x ** 2).mean((0, 2, 3)))
        psi = self.x2[-1] if current else torch.stack(self.x2[-self.m:]).mean(0)
        std = torch.sqrt(psi + self.eps)
        r = torch.ones(C, dtype=DT)
        if self.t > max(self.renorm_from, self.warmup):
            r = (std / torch.sqrt(self.running_var + self.eps)).clamp(1 / self.r_max, self.r_max)
        self.running_var = self.running_var + self.alpha * (psi - self.running_var)
        z = x / per_channel(std)
        y = per_channel(self.gamma * r) * z + per_channel(self.beta)
        g = up * per_channel(self.gamma * r)
        self.gz.append((g * z).mean((0, 2, 3)))
        mean_gz = self.gz[-1] if current else torch.stack(self.gz[-self.m:]).mean(0)
        dx = (g - z * per_channel(mean_gz)) / per_channel(std)
        return y, dx, (up * z * per_channel(r)).sum((0, 2, 3)), up.sum((0, 2, 3))

    def eval(self, x):
        return per_channel(self.gamma) * x / per_channel(torch.sqrt(self.running_var + self.eps)) \
            + per_channel(self.beta)


MABN_OPTS = dict(buffer_size=3, eps=1e-3, momentum=0.2, warmup=2, renorm_from=4, r_max=1.2)


def run_mabn_steps(layer, refs, data, devices):
    for x, up in data:
        got = step(layer, x, up, [layer.weight, layer.bias])
        want = [ref.step(xs, us) for ref, xs, us in zip(refs, x.chunk(devices), up.chunk(devices))]
        torch.testing.assert_close(got[0], torch.cat([w[0] for w in want]))
        torch.testing.assert_close(got[1], torch.cat([w[1] for w in want]))
        torch.testing.assert_close(got[2], sum(w[2] for w in want))
        torch.testing.assert_close(got[3], sum(w[3] for w in want))


@pytest.mark.parametrize("devices", [1, 3])
def test_mabn_steps_match_the_paper(devices):
    """8 steps with m = 3, warm-up 2 and r from step 5: current statistics, then the moving
    averages in forward and backward, then r clipped at 1.2. Each virtual device is an
    independent MABN; eval uses the devices' average running variance."""
    gen = torch.Generator().manual_seed(8)
    layer = build_norm("mabn", C, **MABN_OPTS).to(DT)
    randomize(layer, gen)
    configure_devices(layer, virtual_devices=devices)
    refs = [MABNReference(layer.weight.detach(), layer.bias.detach(), 3, 1e-3, 0.2, 2, 4, 1.2)
            for _ in range(devices)]
    data = batches(gen, 8, devices * 2)
    run_mabn_steps(layer, refs, data, devices)
    assert int(layer.steps) == 8
    for d, ref in enumerate(refs):
        torch.testing.assert_close(layer.running_var[d], ref.running_var)
        torch.testing.assert_close(layer.buffer_x2[d].sum(0), torch.stack(ref.x2[-3:]).sum(0))
        torch.testing.assert_close(layer.buffer_gz[d].sum(0), torch.stack(ref.gz[-3:]).sum(0))
    layer.eval()
    x = data[0][0]
    avg = sum(ref.running_var for ref in refs) / devices
    refs[0].running_var = avg
    torch.testing.assert_close(layer(x), refs[0].eval(x))


def test_mabn_accumulation_micro_steps_are_devices():
    gen = torch.Generator().manual_seed(9)
    virtual, accum = (build_norm("mabn", C, **MABN_OPTS).to(DT) for _ in range(2))
    randomize(virtual, gen)
    accum.load_state_dict(virtual.state_dict(), strict=False)
    configure_devices(virtual, virtual_devices=2)
    configure_devices(accum, accumulate=2)
    for x, up in batches(gen, 6, 4):
        y, gx = step(virtual, x, up, [])
        parts = [step(accum, xs, us, []) for xs, us in zip(x.chunk(2), up.chunk(2))]
        torch.testing.assert_close(y, torch.cat([p[0] for p in parts]))
        torch.testing.assert_close(gx, torch.cat([p[1] for p in parts]))
    for name, buf in virtual.named_buffers():
        torch.testing.assert_close(buf, accum.get_buffer(name), msg=name)


def test_mabn_backward_during_warmup_is_the_exact_gradient():
    """While the statistics are the current batch's and r = 1, the custom backward is the
    gradient of the forward: gradcheck in float64, w.r.t. input, gamma and beta."""
    from norms.mabn import MABNFunction
    gen = torch.Generator().manual_seed(10)
    x, w, b = (torch.randn(shape, generator=gen, dtype=DT, requires_grad=True)
               for shape in ((1, 2, 3, 2, 2), (3,), (3,)))

    def fn(x, w, b):  # step 1 of a fresh layer: K = 1 device, m = 2
        zeros = torch.zeros(1, 2, 3, dtype=DT)
        return MABNFunction.apply(x, w, b, zeros.clone(), zeros.clone(),
                                  torch.ones(1, 3, dtype=DT), torch.tensor([1]),
                                  torch.tensor(True), torch.tensor(False), 1e-5, 0.1, 5.0)
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_mabn_double_backward_is_a_clear_error():
    layer = MovingAverageBatchNorm(3)
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        g.sum().backward()


def test_mabn_builds_centred_convolutions():
    conv = CenConv2d(4, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5)
    w = conv.weight - conv.weight.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(conv(x), F.conv2d(x, w, padding=1))
    from models import build_model
    convs = [m for m in build_model("resnet", 20, norm="mabn").modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, CenConv2d) for m in convs)
    ws = [m for m in build_model("resnet", 20, norm="mabn", ws=True).modules()
          if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(m, WSConv2d) for m in ws)  # WS centres (and scales) already


# ---------------------------------------------------------------- the norm-activation seam


@pytest.mark.parametrize("name", ["frn", "evonorm_b0", "evonorm_s0"])
def test_fused_layers_replace_norm_and_relu(name):
    norm, act = build_norm_act(name, 8, groups=2)
    assert norm.act and type(act).__name__ == "FusedActivation"
    assert not build_norm(name, 8, groups=2, act=False).act
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(act(norm(x)), norm(x))


def test_plain_norms_pair_with_relu():
    norm, act = build_norm_act("bn", 8)
    assert isinstance(norm, BatchNorm) and isinstance(act, torch.nn.ReLU)


# ---------------------------------------------------------------- WS double backward


def test_ws_second_derivatives_match_autograd():
    """A Hessian-vector product through WSConv2d's hand-written backward equals autograd's
    through the same maths written with plain ops (it was off by 6.6 in 25 before)."""
    gen = torch.Generator().manual_seed(11)
    conv = WSConv2d(3, 4, 3, padding=1, bias=False).to(DT)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=DT)
    v = torch.randn(conv.weight.shape, generator=gen, dtype=DT)

    def plain(w):
        flat = w.flatten(1)
        c = flat - flat.mean(1, keepdim=True)
        std = c.norm(dim=1, keepdim=True) / math.sqrt(flat.shape[1] - 1)
        return F.conv2d(x, (c / (std + conv.eps)).view_as(w), padding=1)

    def hvp(f):
        w = conv.weight.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(w).tanh().sum(), w, create_graph=True)
        return torch.autograd.grad((g * v).sum(), w)[0]

    def ours(w):
        return F.conv2d(x, Standardize.apply(w, conv.eps), padding=1)
    torch.testing.assert_close(hvp(ours), hvp(plain))

