"""Online Normalization (Chiley et al., NeurIPS 2019), per device, with its error compensation.

Following the authors' reference (Cerebras/online-normalization, online-norm/numpy_on and the
CPU kernel, which agree). Each device streams its b samples in order, t = 1, 2, ...; per
channel, with a_t, s2_t the spatial mean and (biased) variance of sample x_t:

    y_t   = (x_t - mu_{t-1}) / sqrt(var_{t-1} + eps)
    var_t = alpha_f var_{t-1} + (1 - alpha_f) s2_t + alpha_f (1 - alpha_f) (a_t - mu_{t-1})^2
    mu_t  = alpha_f mu_{t-1} + (1 - alpha_f) a_t

(var_t is the exponential variance of the stream: the cross term takes the mean before its
update.) The backward is not the gradient of this forward but the paper's: two control
processes u, v (zero-initialised) remove the gradient's component along y and along its mean,
sample by sample in the same order, with g_t = dL/dy_t:

    g~_t    = g_t - (1 - alpha_b) v_{t-1} y_t;       v_t = v_{t-1} + mean_HW(g~_t y_t)
    dL/dx_t = g~_t / sqrt(var_{t-1} + eps) - (1 - alpha_b) u_{t-1};
                                                     u_t = u_{t-1} + mean_HW(dL/dx_t)

Then the per-channel affine z = gamma y + beta and the error compensation (`ecm`), in training
and eval alike: "ls", layer scaling, z / sqrt(mean_CHW(z^2) + eps) per sample (the authors'
CIFAR scripts); "ac", activation clamping to [-clamp, clamp] with no gradient at or beyond the
bounds (their library's later default); "none". Both give their exact gradients (the affine
map's and layer scaling's written out in `OnlineNormFunction`, clamping by autograd).

Eval: (x - mu) / sqrt(var + eps) with the devices' streams pooled as one mixture:
mu = mean_d mu_d, var = mean_d (var_d + (mu_d - mu)^2); with one device, the authors' eval.

A device: one stream. Device d (norms/devices.py's index: virtual device k of micro-step a in
process `rank`) keeps its own mu, var, u, v, rows d of `per_device_buffers` [devices, C], and
streams its own samples in order, forward and backward. Nothing is shared between devices, so
K virtual devices, K processes and K accumulation micro-steps are the same computation (the
engine gathers the rows before eval and checkpoints, as for MABN). The state u, v changes in
the backward: a forward without its backward (activation recomputation) or DDP's buffer
broadcast would corrupt it; the engine does neither. The control processes run on in every
backward, never reset (as the authors'); the backward has no second derivative (double
backward is an error, `once_differentiable`).

Defaults are the authors' CIFAR-10 ResNet command: alpha_f = 1023/1024, alpha_b = 127/128,
layer scaling, eps 1e-5 (their ls_eps is the same 1e-5: one eps serves both here).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .devices import DeviceAware, autocast_off

ECMS = ("ls", "ac", "none")


class OnlineNorm(DeviceAware, nn.Module):
    per_device_buffers = ("mu", "var", "u", "v")

    def __init__(self, num_channels: int, alpha_fwd: float = 1023 / 1024,
                 alpha_bkw: float = 127 / 128, eps: float = 1e-5, ecm: str = "ls",
                 clamp: float = 5.0):
        super().__init__()
        if ecm not in ECMS:
            raise ValueError(f"online: ecm={ecm!r} is invalid; allowed: {' | '.join(ECMS)}")
        self.num_channels, self.alpha_fwd, self.alpha_bkw = num_channels, alpha_fwd, alpha_bkw
        self.eps, self.ecm, self.clamp = eps, ecm, clamp
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        for name, init in (("mu", 0.0), ("var", 1.0), ("u", 0.0), ("v", 0.0)):
            self.register_buffer(name, torch.full((1, num_channels), init))

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"eps={self.eps}, ecm={self.ecm}" + (f", clamp={self.clamp}"
                                                     if self.ecm == "ac" else ""))

    def devices_changed(self) -> None:
        d = self.num_devices()
        if self.mu.shape[0] != d:
            for name in self.per_device_buffers:
                setattr(self, name, getattr(self, name)[:1].new_full(
                    (d, self.num_channels), 1.0 if name == "var" else 0.0))

    @autocast_off  # the streams' batched matmul (`decayed`) in float32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"online norm expects [N, C, *] input, got {tuple(x.shape)}")
        if self.training:
            step = self.next_micro_step()
            k = self.virtual_devices
            if x.shape[0] % k:
                raise ValueError(f"batch of {x.shape[0]} does not split into {k} virtual devices")
            rows = step.rows
            z = OnlineNormFunction.apply(x.unflatten(0, (k, -1)), self.mu[rows], self.var[rows],
                                         self.u[rows], self.v[rows], self.weight, self.bias,
                                         self.alpha_fwd, self.alpha_bkw, self.eps,
                                         self.ecm == "ls").flatten(0, 1)
        else:
            mu = self.mu.mean(0)
            var = (self.var + (self.mu - mu).square()).mean(0)
            z = F.batch_norm(x, mu, var, self.weight, self.bias, False, 0.0, self.eps)
            if self.ecm == "ls":
                z = z * (z.square().mean(tuple(range(1, z.dim())), keepdim=True)
                         + self.eps).rsqrt()
        if self.ecm == "ac":  # no gradient at the bounds either, as in the authors' numpy
            return z.clamp(-self.clamp, self.clamp)
        return z


@functools.lru_cache(maxsize=64)
def decay_weights(b: int, alpha: float, dtype: torch.dtype, device: torch.device):
    """alpha^t [b+1, 1] and the lower-triangular alpha^(t-1-j) [b+1, b] of `decayed`: the same
    few for a whole run (one per layer's alpha and b), so made once, not in every forward."""
    t = torch.arange(b + 1, dtype=torch.float64)
    lag = t.view(-1, 1) - 1 - t[:b]                                   # [b+1, b]: (t - 1) - j
    w = torch.where(lag >= 0, alpha ** lag.clamp(min=0), 0.0)
    return (alpha ** t).view(-1, 1).to(dtype=dtype, device=device), w.to(dtype=dtype,
                                                                         device=device)


def decayed(s0: torch.Tensor, c: torch.Tensor, alpha: float):
    """The stream s_t = alpha s_{t-1} + c_t over the b inputs c [K, b, C] from s0 [K, C], all at
    once: s_t = alpha^t s0 + sum_{j<=t} alpha^(t-j) c_j. Returns the states before each input
    [K, b, C] and the last state [K, C]."""
    powers, w = decay_weights(c.shape[1], alpha, c.dtype, c.device)
    s = torch.baddbmm(powers * s0.unsqueeze(1), w.expand(len(c), -1, -1), c)
    return s[:, :-1], s[:, -1]


def recurrence(s0: torch.Tensor, c: torch.Tensor, d: torch.Tensor):
    """The stream s_t = c_t s_{t-1} + d_t over the b inputs c, d [K, b, C] from s0 [K, C], by a
    log-depth scan: each of ceil(log2 b) rounds composes every span (c2, d2) with the one
    before it (c1, d1) into (c2 c1, c2 d1 + d2), four ops a round instead of a loop of b steps.
    Returns the states before each input [K, b, C] and the last state [K, C]."""
    span = 1
    while span < c.shape[1]:
        c, d = (torch.cat([c[:, :span], c[:, span:] * c[:, :-span]], 1),
                torch.cat([d[:, :span], torch.addcmul(d[:, span:], c[:, span:], d[:, :-span])], 1))
        span *= 2
    s = torch.addcmul(d, c, s0.unsqueeze(1))                                # s_1 .. s_b
    return torch.cat([s0.unsqueeze(1), s[:, :-1]], 1), s[:, -1]


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """[K, b, C, *] -> [K, b, C, HW] (HW = 1 without spatial dims)."""
    return x.flatten(3) if x.dim() > 3 else x.unsqueeze(-1)


def spatial(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[K, b, C] -> [K, b, C, 1, ...] to broadcast over `like`'s spatial dims."""
    return t.view(*t.shape, *(1,) * (like.dim() - 3))


class OnlineNormFunction(torch.autograd.Function):
    """The streamed forward and the control-process backward for K devices at once, with the
    affine map and layer scaling folded in: x is [K, b, C, *]; mu, var, u, v are [K, C] views
    of the layer's rows, updated in place; returns out = z r, z = gamma y + beta, r = 1 /
    sqrt(mean_CHW(z^2) + eps) per sample with `ls`, else 1.

    z = A x + B per sample and channel (A = gamma / scale, B = beta - A mu_{t-1}), and
    mean_CHW(z^2) = mean_C(A^2 s2 + (A a + B)^2) from the sample's statistics, so the forward
    is the statistics and one pass writing out = (A r) x + B r. The backward takes two
    reductions of g (mean(g), mean(g x)) and writes dL/dx as one affine map of g and x: every
    other quantity is per sample and channel. The recursions: mean(g~_t y_t) = mean(g_t y_t) -
    (1 - alpha_b) v_{t-1} mean(y_t^2), mean(y_t) and mean(y_t^2) follow from a_t, s2_t and the
    stream, and the mean and variance streams and u are linear with a constant decay
    (`decayed`); v, whose decay 1 - (1 - alpha_b) mean(y_t^2) varies, is a log-depth scan
    over [K, C] (`recurrence`). The same maths as the docstring's sample loop
    (tests/test_online_norm.py), up to float rounding. Layer scaling's part of the backward is
    its exact gradient: dL/dz = (g - r^2 mean_CHW(g z) z) r."""

    @staticmethod
    def forward(ctx, x, mu, var, u, v, weight, bias, alpha_fwd, alpha_bkw, eps, ls):
        xf = x.to(mu.dtype)
        xs = per_sample(xf)                                                 # [K, b, C, HW]
        a = xs.mean(-1)                                                     # [K, b, C]
        s2 = (xs - a.unsqueeze(-1)).square().mean(-1)  # var(): 4x slower here on CPU
        mu_before, mu_last = decayed(mu, (1 - alpha_fwd) * a, alpha_fwd)
        delta = a - mu_before
        var_before, var_last = decayed(
            var, (1 - alpha_fwd) * s2 + alpha_fwd * (1 - alpha_fwd) * delta.square(), alpha_fwd)
        mu.copy_(mu_last), var.copy_(var_last)
        scale = (var_before + eps).sqrt()
        gamma, beta = weight.to(mu.dtype), bias.to(mu.dtype)
        y_mean, y2_mean = delta / scale, (s2 + delta.square()) / scale.square()
        if ls:  # mean_CHW(z^2) per sample, from mean_HW(y) and mean_HW(y^2)
            z2 = gamma.square() * y2_mean + 2 * gamma * beta * y_mean + beta.square()
            r = (z2.mean(-1, keepdim=True) + eps).rsqrt()                   # [K, b, 1]
        else:
            r = torch.ones_like(scale[..., :1])
        slope = gamma * r / scale                                           # A r
        # in x's own shape: a view of a new tensor as the output would block in-place ReLUs
        out = torch.addcmul(spatial((beta - gamma * mu_before / scale) * r, x), xf,
                            spatial(slope, x))
        ctx.save_for_backward(xf, mu_before, scale, y_mean, y2_mean, r, gamma, beta)
        ctx.u, ctx.v, ctx.alpha_bkw, ctx.ls = u, v, alpha_bkw, ls  # state the backward writes
        ctx.dtypes = x.dtype, weight.dtype
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xf, mu_before, scale, y_mean, y2_mean, r, gamma, beta = ctx.saved_tensors
        u, v, alpha_bkw = ctx.u, ctx.v, ctx.alpha_bkw
        beta_b = 1 - alpha_bkw
        g = grad.to(xf.dtype)
        gs, xs = per_sample(g), per_sample(xf)
        length = xs.shape[-1]
        g_mean = gs.mean(-1)                                                # [K, b, C]
        gy_mean = (torch.linalg.vecdot(gs, xs) / length - mu_before * g_mean) / scale
        # dL/dy = p g + q y + s per sample and channel: gamma dL/dz, through layer scaling
        # mean_CHW(g z), layer scaling's projection (none without it: r = 1, m = 0)
        m = ((gamma * gy_mean + beta * g_mean).mean(-1, keepdim=True) if ctx.ls
             else torch.zeros_like(r))
        p, rho = gamma * r, r.square() * m
        q, s = -gamma.square() * r * rho, -gamma * beta * r * rho
        # dL/dgamma = sum dL/dz y, dL/dbeta = sum dL/dz, dL/dz = (dL/dy) / gamma
        z_y = gamma * y2_mean + beta * y_mean                                # mean(z y)
        z_mean = gamma * y_mean + beta
        d_gamma = (length * r * (gy_mean - rho * z_y)).sum((0, 1))
        d_beta = (length * r * (g_mean - rho * z_mean)).sum((0, 1))
        # the online backward on dL/dy, from its means
        gy_mean, g_mean = p * gy_mean + q * y2_mean + s * y_mean, p * g_mean + q * y_mean + s
        # v_t = v_{t-1} + mean(g~_t y_t) = (1 - beta_b mean(y_t^2)) v_{t-1} + mean(g_t y_t)
        v_before, v_last = recurrence(v, 1 - beta_b * y2_mean, gy_mean)
        v.copy_(v_last)
        # h_t = g~_t / scale_t;  dL/dx_t = h_t - beta_b u_{t-1};  u_t = alpha_b u_{t-1} + mean(h_t)
        h_mean = (g_mean - beta_b * v_before * y_mean) / scale
        u_before, u_last = decayed(u, h_mean, alpha_bkw)
        u.copy_(u_last)
        # dL/dx = (p g + (q - beta_b v) y + s) / scale - beta_b u, y = (x - mu) / scale
        on_x = (q - beta_b * v_before) / scale.square()
        rest = s / scale - beta_b * u_before - on_x * mu_before
        gx = torch.addcmul(spatial(rest, g), g, spatial(p / scale, g))
        gx.addcmul_(xf, spatial(on_x, g))
        x_dtype, w_dtype = ctx.dtypes
        return (gx.to(x_dtype), None, None, None, None, d_gamma.to(w_dtype),
                d_beta.to(w_dtype), None, None, None, None)
