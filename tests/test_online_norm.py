"""Online Normalization (Chiley et al. 2019) against its equations written out independently in
float64, one sample and one channel at a time, as the authors' numpy reference streams them:
forward, the control-process backward, the error compensation (layer scaling, clamping), the
streams' state over several steps, eval, and the device semantics (each device its own stream:
K virtual devices = K accumulation micro-steps)."""
import pytest
import torch

from norms import build_norm, configure_devices

DT = torch.float64
C = 3
OPTS = dict(alpha_fwd=0.8, alpha_bkw=0.7, eps=1e-3)  # fast decays: every term shows


class OnlineReference:
    """One device: scalar streams per channel, plain loops over samples and channels."""

    def __init__(self, gamma, beta, alpha_fwd, alpha_bkw, eps, ecm, clamp):
        self.gamma, self.beta, self.af, self.ab, self.eps = gamma, beta, alpha_fwd, alpha_bkw, eps
        self.ecm, self.clamp = ecm, clamp
        self.mu, self.var = [0.0] * C, [1.0] * C
        self.u, self.v = [0.0] * C, [0.0] * C

    def compensate(self, z, up):
        """ecm forward on one sample z [C, H, W], and the gradient through it of `up`."""
        if self.ecm == "ls":
            s = ((z * z).mean() + self.eps).sqrt()
            out = z / s
            return out, (up - (up * out).mean() * out) / s
        if self.ecm == "ac":
            out = z.clamp(-self.clamp, self.clamp)
            return out, up * (z.abs() < self.clamp)
        return z, up

    def step(self, x, up):
        """(out, dL/dx, dL/dgamma, dL/dbeta) of sum(out * up) for one device's batch."""
        out, gx = torch.empty_like(x), torch.empty_like(x)
        dgamma, dbeta = torch.zeros(C, dtype=DT), torch.zeros(C, dtype=DT)
        ys, scales, gys = [], [], []
        for t in range(x.shape[0]):  # forward, sample by sample
            y = torch.empty_like(x[t])
            scale = []
            for c in range(C):
                a = float(x[t, c].mean())
                s2 = float(((x[t, c] - a) ** 2).mean())
                scale.append((self.var[c] + self.eps) ** 0.5)
                y[c] = (x[t, c] - self.mu[c]) / scale[c]
                self.var[c] = (self.af * self.var[c] + (1 - self.af) * s2
                               + self.af * (1 - self.af) * (a - self.mu[c]) ** 2)
                self.mu[c] = self.af * self.mu[c] + (1 - self.af) * a
            z = self.gamma.view(C, 1, 1) * y + self.beta.view(C, 1, 1)
            out[t], gz = self.compensate(z, up[t])
            dgamma += (gz * y).sum((1, 2))
            dbeta += gz.sum((1, 2))
            ys.append(y), scales.append(scale), gys.append(gz * self.gamma.view(C, 1, 1))
        for t in range(x.shape[0]):  # backward, in the same order
            for c in range(C):
                g = gys[t][c] - (1 - self.ab) * self.v[c] * ys[t][c]
                self.v[c] += float((g * ys[t][c]).mean())
                gx[t, c] = g / scales[t][c] - (1 - self.ab) * self.u[c]
                self.u[c] += float(gx[t, c].mean())
        return out, gx, dgamma, dbeta


def batches(gen, steps, n, hw=(3, 2)):
    """Drifting inputs, so the streams lag and every term of the updates matters."""
    return [(torch.randn(n, C, *hw, generator=gen, dtype=DT) * (1 + 0.4 * t) + 0.6 * t,
             torch.randn(n, C, *hw, generator=gen, dtype=DT)) for t in range(steps)]


def step(layer, x, up):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    return (y.detach(), *torch.autograd.grad((y * up).sum(), [x, layer.weight, layer.bias]))


def make(gen, ecm, devices=1, accumulate=1, clamp=1.0):
    layer = build_norm("online", C, ecm=ecm, clamp=clamp, **OPTS).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(C, generator=gen, dtype=DT) * 0.5 + 1)
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=DT) * 0.5)
    configure_devices(layer, virtual_devices=devices, accumulate=accumulate)
    return layer


@pytest.mark.parametrize("ecm,devices,b", [("ls", 1, 2), ("ac", 1, 2), ("none", 1, 2),
                                           ("ls", 3, 2), ("ls", 2, 5), ("none", 1, 8),
                                           ("ls", 2, 1)])
def test_online_steps_match_the_equations(ecm, devices, b):
    """4 steps of b samples per device (b = 5 and 8: several rounds of v's scan, one of them
    partial): outputs, every gradient and each device's mu, var, u, v; then eval with the
    devices' streams pooled (mixture mean and variance). Clamping at 1.0, so some outputs are
    clamped."""
    gen = torch.Generator().manual_seed(24)
    layer = make(gen, ecm, devices)
    refs = [OnlineReference(layer.weight.detach(), layer.bias.detach(), 0.8, 0.7, 1e-3, ecm,
                            1.0) for _ in range(devices)]
    data = batches(gen, 4, b * devices)
    clamped = 0
    for x, up in data:
        got = step(layer, x, up)
        want = [r.step(xs, us) for r, xs, us in zip(refs, x.chunk(devices), up.chunk(devices))]
        torch.testing.assert_close(got[0], torch.cat([w[0] for w in want]))
        torch.testing.assert_close(got[1], torch.cat([w[1] for w in want]))
        torch.testing.assert_close(got[2], sum(w[2] for w in want))
        torch.testing.assert_close(got[3], sum(w[3] for w in want))
        clamped += int((got[0].abs() == 1.0).sum())
    assert (clamped > 0) == (ecm == "ac")
    for d, r in enumerate(refs):
        for name in ("mu", "var", "u", "v"):
            torch.testing.assert_close(getattr(layer, name)[d],
                                       torch.tensor(getattr(r, name), dtype=DT), msg=name)
    layer.eval()
    x = data[0][0]
    mu = sum(torch.tensor(r.mu, dtype=DT) for r in refs) / devices
    var = sum(torch.tensor(r.var, dtype=DT) + (torch.tensor(r.mu, dtype=DT) - mu) ** 2
              for r in refs) / devices
    y = (x - mu.view(C, 1, 1)) / (var.view(C, 1, 1) + 1e-3).sqrt()
    z = layer.weight.detach().view(C, 1, 1) * y + layer.bias.detach().view(C, 1, 1)
    want = torch.stack([refs[0].compensate(zt, zt)[0] for zt in z])
    torch.testing.assert_close(layer(x), want)


def test_online_eval_leaves_the_streams_alone():
    gen = torch.Generator().manual_seed(25)
    layer = make(gen, "ls", devices=2)
    for x, up in batches(gen, 2, 4):
        step(layer, x, up)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    layer(batches(gen, 1, 4)[0][0])
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_online_accumulation_micro_steps_are_devices():
    """Device d = micro-step d with one virtual device, or virtual device d in one forward: the
    same streams, outputs and gradients."""
    gen = torch.Generator().manual_seed(26)
    virtual = make(gen, "ls", devices=2)
    accum = make(gen, "ls", accumulate=2)
    accum.load_state_dict(virtual.state_dict())
    for x, up in batches(gen, 3, 4):
        y, gx, gw, gb = step(virtual, x, up)
        parts = [step(accum, xs, us) for xs, us in zip(x.chunk(2), up.chunk(2))]
        torch.testing.assert_close(y, torch.cat([p[0] for p in parts]))
        torch.testing.assert_close(gx, torch.cat([p[1] for p in parts]))
        torch.testing.assert_close(gw, parts[0][2] + parts[1][2])
    for name, buf in virtual.named_buffers():
        torch.testing.assert_close(buf, accum.get_buffer(name), msg=name)


def test_online_clamp_has_no_gradient_at_its_bound():
    """The authors' numpy reference zeroes the gradient where the output equals +-clamp."""
    layer = build_norm("online", 1, ecm="none").to(DT).eval()
    x = torch.tensor([[[[2.0, -2.0, 1.0]]]], dtype=DT, requires_grad=True)
    layer.ecm, layer.clamp = "ac", float(layer(x)[0, 0, 0, 0].detach())  # 0, 1 at the bounds
    layer(x).sum().backward()
    want = torch.tensor([[[[0.0, 0.0, (1 + 1e-5) ** -0.5]]]], dtype=DT)
    torch.testing.assert_close(x.grad, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("options,message", [
    ({"ecm": "clip"}, "online: ecm='clip' is invalid; allowed: ls | ac | none"),
    ({"alpha_fwd": 1.5}, r"online: alpha_fwd=1.5 is invalid; allowed: a number in \[0, 1\]"),
    ({"alpha_bkw": -0.1}, r"online: alpha_bkw=-0.1 is invalid; allowed: a number in \[0, 1\]"),
    ({"clamp": 0}, r"online: clamp=0 is invalid; allowed: a number > 0")])
def test_online_bad_options_are_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        build_norm("online", 4, **options)


@pytest.mark.parametrize("shape", [(2, C), (2, C, 1, 1)])
def test_online_without_spatial_extent_streams_the_values(shape):
    """[N, C] input and 1x1 maps: a_t is the value itself and s2_t = 0; b = 1 per device."""
    gen = torch.Generator().manual_seed(27)
    layer = make(gen, "none", devices=2)
    ref = [OnlineReference(layer.weight.detach(), layer.bias.detach(), 0.8, 0.7, 1e-3, "none",
                           1.0) for _ in range(2)]
    for x, up in batches(gen, 3, 2, hw=(1, 1)):
        got = step(layer, x.view(shape), up.view(shape))
        want = [r.step(xs, us) for r, xs, us in zip(ref, x.chunk(2), up.chunk(2))]
        torch.testing.assert_close(got[0], torch.cat([w[0] for w in want]).view(shape))
        torch.testing.assert_close(got[1], torch.cat([w[1] for w in want]).view(shape))


def test_online_double_backward_is_a_clear_error():
    layer = build_norm("online", 3)
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        g.sum().backward()


@pytest.mark.parametrize("ls", [True, False])
def test_online_affine_and_layer_scaling_gradients_are_exact(ls):
    """gamma and beta enter only through z = gamma y + beta and layer scaling, so their
    gradients are the true ones (x's is the paper's, not autograd's): finite differences, each
    evaluation from the same stream state."""
    from norms.online import OnlineNormFunction
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, C, 2, 2, generator=gen, dtype=DT)            # K = 2, b = 3
    state = [torch.randn(2, C, generator=gen, dtype=DT) for _ in range(4)]
    state[1] = state[1].abs() + 0.5                                      # var > 0

    def f(w, b):
        return OnlineNormFunction.apply(x, *(t.clone() for t in state), w, b, 0.8, 0.7, 1e-3, ls)
    w, b = (torch.randn(C, generator=gen, dtype=DT, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(f, (w, b))


@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
def test_online_then_an_in_place_relu(ecm):
    """Models put nn.ReLU(inplace=True) after a norm: the gradients equal an out-of-place one's."""
    gen = torch.Generator().manual_seed(28)
    layers = [make(gen, ecm) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x, up = batches(gen, 1, 4)[0]
    grads = []
    for layer, relu in zip(layers, (torch.relu, torch.relu_)):
        xr = x.clone().requires_grad_(True)
        (relu(layer(xr)) * up).sum().backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("ecm", ["ls", "ac"])
def test_online_computes_in_float32_under_autocast(ecm):
    """trainer.precision=bf16 runs the forward under autocast, which would lower the streams'
    batched matmul to bf16: given the same float32 input the layer is the same with autocast
    on or off (output, gradients, streams), in training and in eval."""
    layers = [make(torch.Generator().manual_seed(4), ecm, devices=2).float() for _ in range(2)]
    for x, up in batches(torch.Generator().manual_seed(5), 4, 8):
        outs = []
        for layer, amp in zip(layers, (False, True)):
            x_ = x.float().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = layer(x_)  # the backward outside autocast, as the engine's
            outs.append((y, *torch.autograd.grad((y * up.float()).sum(),
                                                 [x_, layer.weight, layer.bias])))
        for got, want in zip(outs[1], outs[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(layers[0].buffers(), layers[1].buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    x = batches(torch.Generator().manual_seed(6), 1, 4)[0][0].float()
    layers[0].eval(), layers[1].eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layers[1](x)
    torch.testing.assert_close(got, layers[0](x), rtol=0, atol=0)
