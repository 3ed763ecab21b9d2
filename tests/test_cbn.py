"""Cross-Iteration BN (cbn) against the paper's equations written out independently in float64:
the per-device window with its Taylor compensation (derivatives by autograd, as the authors'
code takes them, against the layer's closed forms), the floor max(nu, mu^2), burn-in, forward,
backward (written out), state and eval; K virtual devices = K accumulation micro-steps = K gloo
processes; the conv-norm link and its one-line errors."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import gloo_rank
from norms import WSConv2d, build_norm, configure_devices, conv_factory
from norms.ws import Standardize

DT = torch.float64
CIN, C, HW = 3, 4, (4, 4)
OPTS = dict(window=3, burnin=2, eps=1e-3, momentum=0.3)


def pair(ws=False, factored=False, **opts):
    """conv then cbn through the factory's link, as a model builds them; `factored`: the window
    keeps the conv's activations instead of the statistics' gradients."""
    conv_cls, link = conv_factory("cbn", ws)
    conv = conv_cls(CIN, C, 3, padding=1, bias=False)
    norm = build_norm("cbn", C, conv=link.take(), **{**OPTS, **opts})
    if factored:
        norm.dense_bytes = 0
        norm.devices_changed()
    assert norm.dense != factored or not norm.compensate  # the naive window keeps neither
    with torch.no_grad():
        conv.weight.copy_(torch.linspace(-1, 1, conv.weight.numel()).view(conv.weight.shape))
        norm.weight.copy_(torch.linspace(0.5, 1.5, C))
        norm.bias.copy_(torch.linspace(-0.2, 0.2, C))
    return nn.Sequential(conv, norm).to(DT)


class CBNReference:
    """One device, histories in lists: the paper's estimate over the last k iterations."""

    def __init__(self, gamma, beta, k, burnin, eps, ws, compensate=True):
        self.gamma, self.beta, self.k, self.burnin, self.eps, self.ws = gamma, beta, k, burnin, \
            eps, ws
        self.compensate = compensate  # False: the paper's naive baseline
        self.history, self.t = [], 0  # (mu, nu, dmu/dtheta, dnu/dtheta, theta)

    def weight(self, theta):
        return Standardize.apply(theta, 1e-5) if self.ws else theta

    def step(self, u, theta, up):
        """(y, dL/dx, dL/dgamma, dL/dbeta, mu_bar, sigma2) for conv input u, weights theta."""
        self.t += 1
        th = theta.detach().clone().requires_grad_(True)
        x = F.conv2d(u, self.weight(th), padding=1)
        mu, nu = x.mean((0, 2, 3)), (x * x).mean((0, 2, 3))
        dmu = torch.autograd.grad(mu.sum(), th, retain_graph=True)[0]  # filter c: d mu_c
        dnu = torch.autograd.grad(nu.sum(), th)[0]
        x, mu, nu = x.detach(), mu.detach(), nu.detach()
        old = []
        if self.t > self.burnin:
            for (m0, n0, dm, dn, th0, s) in self.history:
                if s >= self.t - (self.k - 1):
                    d = (theta - th0) * self.compensate
                    mc, nc = m0 + (dm * d).sum((1, 2, 3)), n0 + (dn * d).sum((1, 2, 3))
                    old.append((mc, torch.maximum(nc, mc * mc)))
        if self.t > self.burnin - (self.k - 1):
            self.history.append((mu, nu, dmu, dnu, theta.detach().clone(), self.t))
        n = 1 + len(old)
        a = sum((o[0] for o in old), torch.zeros(C, dtype=DT))
        b = sum((o[1] for o in old), torch.zeros(C, dtype=DT))
        mu_bar, nu_bar = (mu + a) / n, (nu + b) / n
        sigma2 = nu_bar - mu_bar ** 2
        s = torch.sqrt(sigma2 + self.eps)
        pc = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
        xhat = (x - pc(mu_bar)) / pc(s)
        y = pc(self.gamma) * xhat + pc(self.beta)
        m = x.numel() // C
        g = up * pc(self.gamma)
        d_sigma2 = (g * (x - pc(mu_bar))).sum((0, 2, 3)) * -0.5 * s ** -3
        d_mu_bar = -g.sum((0, 2, 3)) / s - 2 * mu_bar * d_sigma2
        dx = g / pc(s) + pc(d_mu_bar) / (n * m) + pc(d_sigma2) * 2 * x / (n * m)
        return y, dx, (up * xhat).sum((0, 2, 3)), up.sum((0, 2, 3)), mu_bar, sigma2


def run(net, u, up):
    x = net[0](u)
    x.retain_grad()
    y = net[1](x)
    (y * up).sum().backward()
    return y.detach(), x.grad


def data(steps, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, CIN, *HW, generator=gen, dtype=DT) * (1 + 0.2 * t) + 0.3 * t,
             torch.randn(n, C, *HW, generator=gen, dtype=DT),
             torch.randn(C, CIN, 3, 3, generator=gen, dtype=DT) * 0.05) for t in range(steps)]


def move(net, step):
    with torch.no_grad():
        net[0].weight.add_(step)
    for p in net.parameters():
        p.grad = None


@pytest.mark.parametrize("devices,ws,factored", [(1, False, False), (2, False, False),
                                                 (2, True, False), (2, False, True),
                                                 (2, True, True)])
def test_cbn_steps_match_the_paper(devices, ws, factored):
    """8 steps, k = 3, burn-in 2, weights moving every step: plain BN, then the compensated
    window (entries from the last k-1 burn-in steps on); buffers, running statistics, eval.
    Both forms of the window: the gradients, or the activations they come from."""
    net = pair(ws, factored)
    configure_devices(net, virtual_devices=devices)
    norm = net[1]
    refs = [CBNReference(norm.weight.detach().clone(), norm.bias.detach().clone(), 3, 2, 1e-3,
                         ws) for _ in range(devices)]
    running = [torch.zeros(C, dtype=DT), torch.ones(C, dtype=DT)]
    for u, up, dtheta in data(8, 2 * devices):
        theta = net[0].weight.detach().clone()
        y, dx = run(net, u, up)
        want = [r.step(us, theta, ups) for r, us, ups in zip(refs, u.chunk(devices),
                                                            up.chunk(devices))]
        torch.testing.assert_close(y, torch.cat([w[0] for w in want]))
        torch.testing.assert_close(dx, torch.cat([w[1] for w in want]))
        torch.testing.assert_close(norm.weight.grad, sum(w[2] for w in want))
        torch.testing.assert_close(norm.bias.grad, sum(w[3] for w in want))
        for i in range(2):
            running[i] = running[i].lerp(sum(w[4 + i] for w in want) / devices, 0.3)
        move(net, dtheta)
    torch.testing.assert_close(norm.running_mean, running[0])
    torch.testing.assert_close(norm.running_var, running[1])
    assert int(norm.steps) == 8
    for d, ref in enumerate(refs):  # the window holds the last k-1 = 2 entries
        for mu, _, dmu, dnu, theta, t in ref.history[-2:]:
            torch.testing.assert_close(norm.window_mu[d, t % 2], mu)
            if not factored:  # d / d W^, through WS by its vjp at that entry's theta
                g_mu = norm.window_gmu[d, t % 2].view(1, *theta.shape[1:]).expand_as(theta)
                g_nu = norm.window_gnu[d, t % 2].view_as(theta)
                if ws:
                    th = theta.clone().requires_grad_(True)
                    g_mu, g_nu = (torch.autograd.grad(Standardize.apply(th, 1e-5), th, g)[0]
                                  for g in (g_mu, g_nu))
                torch.testing.assert_close(g_mu, dmu)
                torch.testing.assert_close(g_nu, dnu)
    net.eval()
    u = data(1, 2)[0][0]
    want = F.batch_norm(net[0](u), running[0], running[1], norm.weight, norm.bias, False, 0,
                        1e-3)
    torch.testing.assert_close(net(u), want)


def test_cbn_without_compensation_is_the_naive_window():
    """compensate=False, the paper's naive baseline: the old entries' statistics as recorded,
    with the floor; no derivatives or activations kept. Weights moving every step, so the
    compensated layer differs."""
    net, comp = pair(compensate=False), pair()
    configure_devices(net, virtual_devices=2), configure_devices(comp, virtual_devices=2)
    norm = net[1]
    refs = [CBNReference(norm.weight.detach().clone(), norm.bias.detach().clone(), 3, 2, 1e-3,
                         False, compensate=False) for _ in range(2)]
    differs = False
    for u, up, dtheta in data(8, 4):
        theta = net[0].weight.detach().clone()
        y, dx = run(net, u, up)
        want = [r.step(us, theta, ups) for r, us, ups in zip(refs, u.chunk(2), up.chunk(2))]
        torch.testing.assert_close(y, torch.cat([w[0] for w in want]))
        torch.testing.assert_close(dx, torch.cat([w[1] for w in want]))
        torch.testing.assert_close(norm.weight.grad, sum(w[2] for w in want))
        differs |= not torch.allclose(y, run(comp, u, up)[0])
        move(net, dtheta), move(comp, dtheta)
    assert differs
    assert all(getattr(norm, b).numel() == 0 for b in ("window_gmu", "window_gnu", "window_x"))
    assert "compensate=False" in repr(norm)


@pytest.mark.parametrize("factored", [False, True])
def test_cbn_floor_holds_where_the_compensation_overshoots(factored):
    """A large weight step makes a compensated nu < mu^2: the floor max(nu, mu^2) keeps sigma2
    the paper's (the reference above would disagree without it). No burn-in: the first step
    has an empty window."""
    net, ref = pair(window=2, burnin=0, factored=factored), None
    norm = net[1]
    ref = CBNReference(norm.weight.detach().clone(), norm.bias.detach().clone(), 2, 0, 1e-3,
                       False)
    floored = False
    for u, up, dtheta in data(4, 2, seed=3):
        theta = net[0].weight.detach().clone()
        y, dx = run(net, u, up)
        want = ref.step(u, theta, up)
        torch.testing.assert_close(y, want[0])
        torch.testing.assert_close(dx, want[1])
        if len(ref.history) > 1:
            m0, n0, dm, dn, th0, _ = ref.history[-2]
            d = theta - th0
            mc, nc = m0 + (dm * d).sum((1, 2, 3)), n0 + (dn * d).sum((1, 2, 3))
            floored |= bool((nc < mc * mc).any())
        move(net, dtheta * 40)
    assert floored


@pytest.mark.parametrize("factored", [False, True])
def test_cbn_accumulation_micro_steps_are_devices(factored):
    virtual, accum = pair(factored=factored), pair(factored=factored)
    configure_devices(virtual, virtual_devices=2)
    configure_devices(accum, accumulate=2)
    for u, up, dtheta in data(7, 4):
        y, dx = run(virtual, u, up)
        parts = [run(accum, us, ups) for us, ups in zip(u.chunk(2), up.chunk(2))]
        torch.testing.assert_close(y, torch.cat([p[0] for p in parts]))
        torch.testing.assert_close(dx, torch.cat([p[1] for p in parts]))
        move(virtual, dtheta), move(accum, dtheta)
    for name, buf in virtual.named_buffers():
        torch.testing.assert_close(buf, accum.get_buffer(name), msg=name)


def _processes(rank, init_file):
    with gloo_rank(rank, init_file):
        _compare_across_processes(rank)


def _compare_across_processes(rank):
    from engine.loop import Process, sync_buffers
    ref, net = pair(), pair(factored=True)  # the two forms agree, across processes too
    configure_devices(ref, virtual_devices=4)
    configure_devices(net, virtual_devices=2, process_group=dist.group.WORLD)
    mine = slice(rank * 4, rank * 4 + 4)
    for u, up, dtheta in data(6, 8):
        y_ref, dx_ref = run(ref, u, up)
        y, dx = run(net, u[mine], up[mine])
        torch.testing.assert_close(y, y_ref[mine])
        torch.testing.assert_close(dx, dx_ref[mine])
        move(ref, dtheta), move(net, dtheta)
    sync_buffers(net, Process(rank, 2, torch.device("cpu"), dist.group.WORLD))
    for (name, b), c in zip(net.named_buffers(), ref.buffers()):
        if "window_" not in name or (b.numel() and c.numel()):  # a form's own: one side
            torch.testing.assert_close(b, c, msg=name)
    assert net[1].window_x.abs().sum(tuple(range(1, 6))).all()  # every device's rows


def test_cbn_processes_are_virtual_devices(tmp_path):
    """2 gloo processes x 2 virtual devices = one process with 4: outputs, gradients, and the
    per-device windows gathered by the engine."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_processes, args=(str(tmp_path / "init"),), nprocs=2)


def test_cbn_closed_form_derivatives_are_autograd_per_device():
    from norms.cbn import statistic_gradients
    gen = torch.Generator().manual_seed(5)
    for conv in (nn.Conv2d(CIN, C, 3, stride=2, padding=1, bias=False),
                 nn.Conv2d(2 * CIN, C, 3, padding=1, groups=2),
                 WSConv2d(CIN, C, 3, padding=1, bias=False),
                 nn.Conv2d(CIN, C, 1, stride=2, bias=False),  # a ResNet shortcut
                 nn.Conv2d(CIN, C, (3, 2), stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
                 nn.Conv2d(CIN, C, 3, padding="same", dilation=2),
                 nn.Conv2d(CIN, C, 2, stride=3, padding="valid")):
        conv = conv.to(DT)
        u = torch.randn(6, conv.in_channels, 5, 5, generator=gen, dtype=DT)
        g_mu, g_nu = statistic_gradients(conv, u, conv(u).detach(), 3)
        w_hat = conv.standardize(conv.weight) if isinstance(conv, WSConv2d) else conv.weight
        w_hat = w_hat.detach().requires_grad_(True)  # the weight the conv applies
        for d, ud in enumerate(u.chunk(3)):
            x = F.conv2d(ud, w_hat, conv.bias, conv.stride, conv.padding, conv.dilation,
                         conv.groups)
            want = torch.autograd.grad(x.mean((0, 2, 3)).sum(), w_hat)[0]
            # one filter per group: every filter of the group has it
            torch.testing.assert_close(g_mu[d].repeat_interleave(C // conv.groups, 0),
                                       want.flatten(1))
            x = F.conv2d(ud, w_hat, conv.bias, conv.stride, conv.padding, conv.dilation,
                         conv.groups)
            want = torch.autograd.grad((x * x).mean((0, 2, 3)).sum(), w_hat)[0]
            torch.testing.assert_close(g_nu[d], want)


@pytest.mark.parametrize("ws,factored", [(False, False), (True, False), (False, True)])
def test_cbn_computes_in_float32_under_autocast(ws, factored):
    """trainer.precision=bf16 runs the forward under autocast: the conv before cbn in bf16,
    but cbn itself (statistics, window, derivatives, compensation) in its float32 buffers, so
    given the same input it is the same layer with autocast on or off."""
    nets = [pair(ws, factored).float() for _ in range(2)]
    for u, up, dtheta in data(7, 4):
        ys = []
        for net, amp in zip(nets, (False, True)):
            x = net[0](u.float())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                ys.append(net[1](x))
            move(net, dtheta.float())
        assert ys[1].dtype == torch.float32
        torch.testing.assert_close(ys[1], ys[0], rtol=0, atol=0)
    assert nets[1][1].step_count() > OPTS["burnin"] + OPTS["window"]  # the window was used


def test_cbn_models_link_each_norm_to_the_conv_before_it():
    from models import build_model
    for arch, depth in (("resnet", 20), ("resnet", 18), ("vgg", 11)):
        net = build_model(arch, depth, norm="cbn")
        mods = list(net.modules())
        norms = [m for m in mods if type(m).__name__ == "CrossIterationBatchNorm"]
        assert norms and len({id(n.conv) for n in norms}) == len(norms)
        for n in norms:  # the conv registered just before the norm
            i = next(j for j, m in enumerate(mods) if m is n)
            assert max(j for j, m in enumerate(mods[:i]) if isinstance(m, nn.Conv2d)) == \
                next(j for j, m in enumerate(mods) if m is n.conv)
    assert all(type(n.conv) is WSConv2d for n in build_model("resnet", 20, norm="cbn", ws=True)
               .modules() if hasattr(n, "window_gnu"))


def test_cbn_impossible_set_ups_are_one_line():
    with pytest.raises(ValueError, match="cbn: no convolution before this norm"):
        build_norm("cbn", 4)
    with pytest.raises(ValueError, match="out_channels=5, the norm num_channels=4"):
        build_norm("cbn", 4, conv=nn.Conv2d(3, 5, 3))
    with pytest.raises(ValueError, match="padding_mode='reflect'; allowed: zeros, the same"):
        build_norm("cbn", 4, conv=nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding='same', padding_mode='zeros'; allowed"):
        build_norm("cbn", 4, conv=nn.Conv2d(3, 4, 2, padding="same"))
    with pytest.raises(ValueError, match="cbn: window=0 is invalid; allowed: an integer >= 1"):
        build_norm("cbn", 4, conv=nn.Conv2d(3, 4, 3), window=0)
    norm = build_norm("cbn", 4, conv=nn.Conv2d(3, 4, 3), window=2, burnin=0)
    with pytest.raises(ValueError, match="did not run on this batch just before it"):
        norm(torch.randn(2, 4, 3, 3))


def test_cbn_window_form_follows_its_size_and_survives_a_checkpoint():
    """Dense where D (k-1) (|theta| + fan-in) fits 256 MiB (every ResNet-20 layer at 64 devices),
    the activations where it would not (VGG-11's wide convs: 0.5 GiB each); a factored window saved
    mid-run loads into a fresh layer, which then continues exactly."""
    from models import build_model
    for arch, depth, factored in (("resnet", 20, set()), ("vgg", 11, {256, 512})):
        net = build_model(arch, depth, norm="cbn")
        configure_devices(net, virtual_devices=64)
        norms = [m for m in net.modules() if hasattr(m, "window_gnu")]
        assert {n.num_channels for n in norms if not n.dense} == factored
        assert sum(b.numel() for n in norms for b in n.buffers()) * 4 < 2**30
    a, b = pair(factored=True), pair(factored=True)
    steps = data(6, 2)
    for u, up, dtheta in steps[:3]:
        run(a, u, up), move(a, dtheta)
    run(b, *steps[5][:2])  # b's own step first: the loaded step count must replace it
    b.load_state_dict(a.state_dict())
    assert b[1].window_x.shape == (1, 2, 2, CIN, *HW) and not b[1].dense
    for u, up, dtheta in steps[3:]:
        torch.testing.assert_close(run(b, u, up), run(a, u, up))
        move(a, dtheta), move(b, dtheta)


def test_cbn_both_forms_train_a_model_alike(monkeypatch):
    """A whole net (VGG-11's layers at an eighth of its widths: plain convs, maps from 32x32
    down to 2x2) trained a few SGD steps with every window dense, then every window factored:
    the same logits."""
    from models import build_model, vgg
    monkeypatch.setitem(vgg.CFG, 11, [v if v == "M" else v // 8 for v in vgg.CFG[11]])

    def logits(dense_bytes):
        torch.manual_seed(0)
        net = build_model("vgg", 11, norm="cbn", ws=True, window=3, burnin=1).to(DT)
        for m in net.modules():
            if hasattr(m, "dense_bytes"):
                m.dense_bytes = dense_bytes
        configure_devices(net, virtual_devices=2)
        assert all(m.dense == (dense_bytes > 0) for m in net.modules() if hasattr(m, "dense"))
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(5):
            x = torch.randn(4, 3, 32, 32, generator=gen, dtype=DT)
            y = net(x)
            opt.zero_grad()
            F.cross_entropy(y, torch.arange(4)).backward()
            opt.step()
            out.append(y.detach())
        return torch.stack(out)
    torch.testing.assert_close(logits(0), logits(2**40), rtol=1e-9, atol=1e-9)


def test_cbn_reference_check_refuses_what_is_not_the_authors_layer(tmp_path, capsys):
    """scripts/check_cbn_reference.py needs the authors' CBN.py (not vendored); anything else
    is one line and exit 2."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "check_cbn_reference.py"
    spec = importlib.util.spec_from_file_location("check_cbn_reference", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "other.py").write_text("x = 1\n")
    for given, why in ((tmp_path / "missing.py", "is not a file"),
                       (tmp_path / "other.py", "defines no CBatchNorm2d")):
        assert script.main([str(given)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: reference={given} {why}" in err


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 12 * 8, 2**21])
def test_cbn_rowwise_dot_is_the_sum_of_products_in_any_chunking(chunk_bytes):
    """The dense window's dot products, a few rows at a time through one buffer: one row, two
    rows with a remainder of one, all at once."""
    from norms.cbn import rowwise_dot
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(s, generator=gen, dtype=DT) for s in ((5, 3, 4, 6), (3, 4, 6)))
    torch.testing.assert_close(rowwise_dot(a, b, chunk_bytes), (a * b).sum(-1))
