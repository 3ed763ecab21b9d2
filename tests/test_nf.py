"""Normalizer-free nets (norm=nf) and adaptive gradient clipping (optim.agc) against the papers'
equations written out independently in float64 (Brock et al. 2021a, 2021b), and against timm's
ScaledStdConv2d and adaptive_clip_grad where their maths coincide."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.agc import adaptive_clip_grad_, clipped_parameters
from engine.loop import Step, WarmupCosine, train_step
from models import build_model
from models.resnet import NFBlock
from norms import RELU_GAMMA, ScaledWSConv2d, build_norm_act, conv_for
from norms.ws import Standardize

DT = torch.float64


def grads(fn, x, params, upstream):
    """(output, d/dx, d/dparams) of sum(fn(x) * upstream)."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    gs = torch.autograd.grad((y * upstream).sum(), [x, *params])
    return y.detach(), gs[0], gs[1:]


def scaled_ws_reference(w, gain, gamma, eps):
    """Brock et al. 2021a Eq. 5 as the authors' code has it, per output filter i:
    W^_i = gain_i gamma (W_i - mean(W_i)) / sqrt(max(N var(W_i), eps)), N the fan-in, var biased."""
    flat = w.reshape(w.shape[0], -1)
    n = flat.shape[1]
    mean = flat.sum(1, keepdim=True) / n
    var = ((flat - mean) ** 2).sum(1, keepdim=True) / n
    scale = torch.maximum(n * var, torch.full_like(var, eps)).rsqrt()
    return (gain.reshape(-1, 1) * gamma * (flat - mean) * scale).reshape(w.shape)


# ---------------------------------------------------------------- Scaled WS


def test_relu_gamma_normalises_the_relus_output_std():
    """gamma = 1 / std(relu(z)) for z ~ N(0, 1): the authors' 1.7139588594436646, within the
    Monte-Carlo error of the closed form sqrt(2 / (1 - 1/pi)) = 1.71286 they estimated it from."""
    assert RELU_GAMMA == 1.7139588594436646
    assert abs(RELU_GAMMA - math.sqrt(2 / (1 - 1 / math.pi))) < 2e-3


def test_scaled_ws_forward_and_backward_match_the_equation():
    gen = torch.Generator().manual_seed(5)
    conv = ScaledWSConv2d(5, 7, 3, padding=1, bias=True, gamma=RELU_GAMMA).to(DT)
    with torch.no_grad():
        conv.weight.mul_(3).add_(0.7)
        conv.weight[2].mul_(1e-4)   # N var < eps: the floor holds, no gradient through it
        conv.gain.copy_(torch.rand(7, 1, 1, 1, generator=gen, dtype=DT) + 0.5)
        conv.bias.normal_(generator=gen)
    x = torch.randn(2, 5, 6, 6, generator=gen, dtype=DT)
    up = torch.randn(2, 7, 6, 6, generator=gen, dtype=DT)
    params = [conv.weight, conv.gain, conv.bias]
    y, gx, gp = grads(conv, x, params, up)
    y_ref, gx_ref, gp_ref = grads(
        lambda x: F.conv2d(x, scaled_ws_reference(conv.weight, conv.gain, RELU_GAMMA, 1e-4),
                           conv.bias, padding=1), x, params, up)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b)
    w_hat = conv.standardized_weight().flatten(1)
    # each unfloored filter: zero mean, |W^_i| = gain_i gamma (N var(W^_i) = (gain gamma)^2)
    norms = w_hat.norm(dim=1) / (conv.gain.flatten() * RELU_GAMMA)
    torch.testing.assert_close(norms[[0, 1, 3, 4, 5, 6]], torch.ones(6, dtype=DT))
    assert norms[2] < 0.1  # floored: |W_2 - mean|^2 < eps, so |W^_2| < gain gamma


def test_scaled_ws_matches_timm_where_the_maths_coincide():
    """timm's ScaledStdConv2d: gain gamma (W - mean) / sqrt(N (var + eps')); with eps' tiny and
    N var above our floor the two are the same maths."""
    timm_layers = pytest.importorskip("timm.layers")
    gen = torch.Generator().manual_seed(7)
    ours = ScaledWSConv2d(6, 8, 3, stride=2, padding=1, bias=True, gamma=RELU_GAMMA).to(DT)
    ref = timm_layers.ScaledStdConv2d(6, 8, 3, stride=2, padding=1, bias=True,
                                      gamma=RELU_GAMMA, eps=1e-30).to(DT)
    with torch.no_grad():
        ours.gain.copy_(torch.rand(8, 1, 1, 1, generator=gen, dtype=DT) + 0.5)
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
        ref.gain.copy_(ours.gain)
    x = torch.randn(3, 6, 7, 7, generator=gen, dtype=DT)
    up = torch.randn(3, 8, 4, 4, generator=gen, dtype=DT)
    y, gx, gp = grads(ours, x, [ours.weight, ours.gain], up)
    y_ref, gx_ref, gp_ref = grads(ref, x, [ref.weight, ref.gain], up)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b)


def test_scaled_ws_second_derivatives_match_autograd():
    gen = torch.Generator().manual_seed(13)
    w0 = torch.randn(4, 3, 3, 3, generator=gen, dtype=DT)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=DT)
    v = torch.randn(w0.shape, generator=gen, dtype=DT)
    ones = torch.ones(4, dtype=DT)

    def hvp(f):
        w = w0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.conv2d(x, f(w), padding=1).tanh().sum(), w,
                                   create_graph=True)
        return torch.autograd.grad((g * v).sum(), w)[0]
    torch.testing.assert_close(hvp(lambda w: Standardize.apply(w, 1e-4, True)),
                               hvp(lambda w: scaled_ws_reference(w, ones, 1.0, 1e-4)))


# ---------------------------------------------------------------- the NF block and nets


def nf_block_reference(block, x, bottleneck):
    """h + alpha skip_gain f(beta relu(h)), each conv Scaled WS with the ReLU's gamma."""
    def conv(m, h):
        w = scaled_ws_reference(m.weight, m.gain, RELU_GAMMA, 1e-4)
        return F.conv2d(h, w, m.bias, stride=m.stride, padding=m.padding)
    convs = [m for m in block.branch if isinstance(m, ScaledWSConv2d)]
    assert len(convs) == (3 if bottleneck else 2)
    h = torch.clamp_min(x, 0) * block.beta
    shortcut = x if block.shortcut is None else conv(block.shortcut, h)
    out = conv(convs[0], h)
    for m in convs[1:]:
        out = conv(m, torch.clamp_min(out, 0))
    return shortcut + block.alpha * block.skip_gain * out


@pytest.mark.parametrize("in_ch,width,stride,bottleneck", [
    (4, 4, 1, False), (4, 6, 2, False), (8, 2, 1, False), (8, 2, 1, True), (8, 4, 2, True)])
def test_nf_block_matches_the_equation(in_ch, width, stride, bottleneck):
    gen = torch.Generator().manual_seed(in_ch * 10 + width + stride)
    block = NFBlock(in_ch, width, stride, ScaledWSConv2d, alpha=0.3, beta=0.8,
                    bottleneck=bottleneck).to(DT)
    assert block.skip_gain.item() == 0.0  # SkipInit
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * 0.5 + (name.endswith("gain")))
    out_ch = width * (4 if bottleneck else 1)
    x = torch.randn(2, in_ch, 6, 6, generator=gen, dtype=DT)
    up = torch.randn(2, out_ch, 6 // stride, 6 // stride, generator=gen, dtype=DT)
    params = list(block.parameters())
    y, gx, gp = grads(block, x, params, up)
    y_ref, gx_ref, gp_ref = grads(lambda x: nf_block_reference(block, x, bottleneck), x, params,
                                  up)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b)
    assert (block.shortcut is None) == (stride == 1 and in_ch == out_ch)


A2 = 0.2 ** 2


@pytest.mark.parametrize("depth,expected_var", [
    # ResNet-20: the first stage's first block keeps its identity shortcut (16 -> 16), so the
    # variance grows from the stem's 1; each later stage restarts after its projection block.
    (20, [1, 1 + A2, 1 + 2 * A2, 1 + 3 * A2, 1 + A2, 1 + 2 * A2, 1 + 3 * A2, 1 + A2,
          1 + 2 * A2]),
    # ResNet-50: every stage starts with a projection (64 -> 256 in the first): the authors' rule
    # (a stage's first block sees the growth carried over, the next ones restart from 1 + a^2)
    (50, [1, 1 + A2, 1 + 2 * A2,
          1 + 3 * A2, 1 + A2, 1 + 2 * A2, 1 + 3 * A2,
          1 + 4 * A2, 1 + A2, 1 + 2 * A2, 1 + 3 * A2, 1 + 4 * A2, 1 + 5 * A2,
          1 + 6 * A2, 1 + A2, 1 + 2 * A2]),
])
def test_beta_is_one_over_the_expected_std(depth, expected_var):
    net = build_model("resnet", depth, norm="nf")
    blocks = [b for stage in net.stages for b in stage]
    assert all(isinstance(b, NFBlock) and b.alpha == 0.2 for b in blocks)
    assert [b.beta for b in blocks] == pytest.approx([1 / math.sqrt(v) for v in expected_var])


def test_nf_nets_propagate_unit_variance_at_init():
    """What gamma, beta and Scaled WS are for: with every skip gain at 1 (the trained regime),
    the variance of each block's input at init stays near its expected value, and of the last
    block near 1 + 2 alpha^2, where a plain unnormalised ResNet-20 grows it block by block."""
    torch.manual_seed(0)
    net = build_model("resnet", 20, norm="nf")
    with torch.no_grad():
        for stage in net.stages:
            for b in stage:
                b.skip_gain.fill_(1.0)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append((a[0].var().item(), m.beta)))
             for stage in net.stages for b in stage]
    with torch.no_grad():
        net(torch.randn(64, 3, 32, 32))
    for h in hooks:
        h.remove()
    for var, beta in seen:
        assert 0.7 < var * beta ** 2 < 1.3, seen


def test_nf_vgg_carries_the_relu_gain_in_every_conv_after_a_relu():
    net = build_model("vgg", 11, norm="nf")
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(m, ScaledWSConv2d) and m.bias is not None for m in convs)
    assert [m.gamma for m in convs] == [1.0] + [RELU_GAMMA] * 7  # the first sees the image
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    norm, act = build_norm_act("nf", 8)
    assert isinstance(norm, torch.nn.Identity) and isinstance(act, torch.nn.ReLU)


def test_nf_refuses_ws_on_top_and_a_bad_alpha():
    with pytest.raises(ValueError, match=r"^norm.ws=true is invalid with norm='nf': its "
                                         r"convolutions are Scaled WS already"):
        conv_for("nf", True)
    with pytest.raises(ValueError, match=r"^norm.ws=true is invalid with norm='nf'"):
        build_model("vgg", 11, norm="nf", ws=True)
    with pytest.raises(ValueError, match=r"^nf: alpha=-0.1 is invalid; allowed: a number > 0"):
        build_model("resnet", 20, norm="nf", alpha=-0.1)


# ---------------------------------------------------------------- AGC


def agc_reference(w, g, lam, eps):
    """Brock et al. 2021b Eq. 3 per unit i (a row over the fan-in dims; a vector or a scalar is
    one unit): G_i lambda max(|W_i|, eps) / |G_i| where |G_i| > lambda max(|W_i|, eps)."""
    if w.ndim <= 1:
        rows_w, rows_g = w.reshape(1, -1), g.reshape(1, -1)
    else:
        rows_w, rows_g = w.reshape(w.shape[0], -1), g.reshape(g.shape[0], -1)
    out = rows_g.clone()
    for i in range(rows_w.shape[0]):
        wn = math.sqrt(sum(v * v for v in rows_w[i].tolist()))
        gn = math.sqrt(sum(v * v for v in rows_g[i].tolist()))
        limit = lam * max(wn, eps)
        if gn > limit:
            out[i] = rows_g[i] * limit / gn
    return out.reshape(g.shape)


def agc_params(gen):
    """A conv weight, a linear weight, a bias, a scalar skip gain at 0 (the eps floor), a zero
    row; gradients large enough that most units clip and small ones that do not."""
    shapes = [(5, 3, 3, 3), (4, 6), (6,), ()]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=DT)) for s in shapes]
    with torch.no_grad():
        params[3].zero_()
        params[0][1].zero_()
    for p, scale in zip(params, (0.05, 1.0, 1e-4, 1.0)):
        p.grad = torch.randn(p.shape, generator=gen, dtype=DT) * scale
    with torch.no_grad():
        params[0].grad[2] *= 1e-4  # this unit stays under its limit
    return params


def test_agc_matches_the_equation_unit_by_unit():
    params = agc_params(torch.Generator().manual_seed(3))
    expected = [agc_reference(p.detach(), p.grad, 0.01, 1e-3) for p in params]
    adaptive_clip_grad_(params, 0.01, 1e-3)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert not torch.equal(params[0].grad[0], agc_params(torch.Generator().manual_seed(3))[0]
                           .grad[0])  # clipped
    torch.testing.assert_close(params[0].grad[2],
                               agc_params(torch.Generator().manual_seed(3))[0].grad[2])


def test_agc_matches_timm():
    agc = pytest.importorskip("timm.utils.agc")
    ours, ref = agc_params(torch.Generator().manual_seed(4)), agc_params(
        torch.Generator().manual_seed(4))
    adaptive_clip_grad_(ours, 0.02, 1e-3)
    agc.adaptive_clip_grad(ref, clip_factor=0.02, eps=1e-3)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_agc_leaves_out_the_final_classifier():
    for arch, depth in (("resnet", 20), ("vgg", 11)):
        net = build_model(arch, depth, norm="nf")
        kept = {id(p) for p in clipped_parameters(net)}
        assert not kept & {id(p) for p in net.classifier.parameters()}
        assert len(kept) == len(list(net.parameters())) - 2
    with pytest.raises(ValueError, match="no `classifier` module"):
        clipped_parameters(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _one_step(clip: bool, scaler=None, accumulate: int = 1):
    """One engine train_step of NF ResNet-8 on fixed data, AGC (lambda 0.01) on or off."""
    torch.manual_seed(0)
    net = build_model("resnet", 8, norm="nf")
    with torch.no_grad():
        for stage in net.stages:
            for b in stage:
                b.skip_gain.fill_(0.5)  # a branch that learns, so its weights get gradients
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, 10))
    step = Step(accumulate=accumulate, scaler=scaler,
                clip=(lambda: adaptive_clip_grad_(clipped_parameters(net), 0.01)) if clip else None)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    sums = (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net, opt, sched, x, y, sums, step)
    return net, before, (x, y)


def test_the_engine_step_clips_the_gradient_before_the_update():
    """train_step with AGC = the gradient of the loss, clipped by the written-out equation, then
    SGD (weight decay added after clipping); the classifier's gradient is not clipped."""
    net, before, (x, y) = _one_step(clip=True)
    ref = build_model("resnet", 8, norm="nf")
    ref.load_state_dict(before)
    F.cross_entropy(ref(x), y).backward()
    head = {id(p) for p in ref.classifier.parameters()}
    with torch.no_grad():
        for p in ref.parameters():
            g = p.grad if id(p) in head else agc_reference(p.detach(), p.grad, 0.01, 1e-3)
            p.sub_(0.1 * (g + 5e-4 * p))  # the first SGD step: momentum buffer = d_p
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    plain, _, _ = _one_step(clip=False)
    changed = [n for (n, a), b in zip(net.named_parameters(), plain.parameters())
               if not torch.equal(a, b)]
    assert len(changed) > 10 and not any(n.startswith("classifier") for n in changed), changed


def test_agc_under_a_loss_scale_clips_the_unscaled_gradient():
    """fp16's GradScaler multiplies the loss by 2^k: clipping must see the true gradient, so
    the step equals the unscaled one (bit for bit: the scale is a power of two). The CPU
    GradScaler runs the same unscale/step logic as the CUDA one."""
    scaled, _, _ = _one_step(clip=True, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    plain, _, _ = _one_step(clip=True)
    for (name, a), b in zip(scaled.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, msg=name, rtol=0, atol=0)


def test_agc_clips_the_whole_steps_gradient_under_accumulation():
    """K accumulation steps give the update of one pass over their images: the clip sees the
    sum of the chunks' gradients, not each chunk's (which would change the rows' directions)."""
    whole, _, _ = _one_step(clip=True)
    chunks, _, _ = _one_step(clip=True, accumulate=2)
    for (name, a), b in zip(whole.named_parameters(), chunks.parameters()):
        torch.testing.assert_close(a, b, msg=name, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("overrides,match", [
    (["norm=nf", "norm.ws=true"], r"^norm.ws=true is invalid with norm.name='nf': its "
                                  r"convolutions are Scaled WS already"),
    (["norm=nf", "norm.alpha=0"], r"^nf: norm.alpha=0.0 is invalid; allowed: a number > 0$"),
    (["norm=nf_agc", "optim.agc=0"], r"^optim.agc=0.0 is invalid; allowed: a clipping threshold"),
    (["optim.agc=-0.01"], r"^optim.agc=-0.01 is invalid"),
    (["norm=nf_agc", "optim.agc_eps=0"], r"^optim.agc_eps=0.0 is invalid; allowed: a number > 0"),
])
def test_impossible_nf_and_agc_set_ups_are_one_line_before_training(overrides, match):
    from conftest import make_cfg
    from engine.config import ConfigError, validate
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(*overrides))


def test_presets_select_nf_and_agc_and_reports_name_them():
    from conftest import make_cfg
    from engine.config import norm_label, norm_options, validate
    for overrides, label, agc in ((["norm=nf"], "nf", None), (["norm=nf_agc"], "nf_agc", 0.01),
                                  (["norm=nf_agc", "model=vgg", "model.depth=11"], "nf_agc", 0.01),
                                  (["norm=bn", "optim.agc=0.02"], "bn_agc(lambda=0.02)", 0.02)):
        cfg = make_cfg(*overrides)
        validate(cfg)
        assert (norm_label(cfg), cfg.optim.agc, cfg.optim.agc_eps) == (label, agc, 1e-3)
    assert norm_options(make_cfg("norm=nf"))["alpha"] == 0.2


def test_the_cli_refuses_ws_on_nf_in_one_line(tmp_path):
    from conftest import TINY, run_cli
    res = run_cli(*TINY, "norm=nf", "norm.ws=true", cwd=tmp_path)
    assert res.returncode == 2 and not list(tmp_path.iterdir())
    assert res.stderr.strip().splitlines() == [
        "error: norm.ws=true is invalid with norm.name='nf': its convolutions are Scaled WS "
        "already (a second standardisation); allowed: norm.ws=false"]
