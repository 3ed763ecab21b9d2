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
bounds (their library's later default); "none". Both give their exact gradients (layer
scaling's written out in `LayerScaling`, clamping by autograd).

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

from .devices import DeviceAware

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"online norm expects [N, C, *] input, got {tuple(x.shape)}")
        if self.training:
            step = self.next_micro_step()
            k = self.virtual_devices
            if x.shape[0] % k:
                raise ValueError(f"batch of {x.shape[0]} does not split into {k} virtual devices")
            rows = step.rows
            y = OnlineNormFunction.apply(x.unflatten(0, (k, -1)), self.mu[rows], self.var[rows],
                                         self.u[rows], self.v[rows], self.alpha_fwd,
                                         self.alpha_bkw, self.eps).flatten(0, 1)
        else:
            mu = self.mu.mean(0)
            var = (self.var + (self.mu - mu).square()).mean(0)
            y = F.batch_norm(x, mu, var, None, None, False, 0.0, self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        z = torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))
        if self.ecm == "ls":
            return LayerScaling.apply(z, self.eps)
        if self.ecm == "ac":  # no gradient at the bounds either, as in the authors' numpy
            return z.clamp(-self.clamp, self.clamp)
        return z


class LayerScaling(torch.autograd.Function):
    """out = z r per sample, r = 1 / sqrt(mean_CHW(z^2) + eps), and its gradient written out
    (autograd's takes twice the passes): dL/dz = (g - mean_CHW(g out) out) r
    = (g - r^2 mean_CHW(g z) z) r. It keeps z, not out: the ReLU after it may work in place."""

    @staticmethod
    def forward(ctx, z, eps):
        dims = tuple(range(1, z.dim()))
        r = (z.square().mean(dims, keepdim=True) + eps).rsqrt()
        ctx.save_for_backward(z, r)
        return z * r

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        z, r = ctx.saved_tensors
        proj = (g * z).mean(tuple(range(1, g.dim())), keepdim=True) * r.square()
        return torch.addcmul(g, z, proj, value=-1).mul_(r), None


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


class OnlineNormFunction(torch.autograd.Function):
    """The streamed forward and the control-process backward for K devices at once: x is
    [K, b, C, *]; mu, var, u, v are [K, C] views of the layer's rows, updated in place.

    The recursions run on per-sample statistics, so each full-size tensor is touched a few
    times, not once per sample: mean(g~_t y_t) = mean(g_t y_t) - (1 - alpha_b) v_{t-1}
    mean(y_t^2), mean(y_t) and mean(y_t^2) follow from a_t, s2_t and the stream, and the mean
    and variance streams and u are linear with a constant decay (`decayed`); only v, whose
    decay 1 - (1 - alpha_b) mean(y_t^2) varies, is a loop over [K, C]. The same maths as the
    docstring's sample loop (tests/test_online_norm.py), up to float rounding."""

    @staticmethod
    def forward(ctx, x, mu, var, u, v, alpha_fwd, alpha_bkw, eps):
        xs = x.to(mu.dtype).flatten(3) if x.dim() > 3 else x.to(mu.dtype).unsqueeze(-1)
        a = xs.mean(-1)                                                     # [K, b, C]
        s2 = (xs - a.unsqueeze(-1)).square().mean(-1)  # var(): 4x slower here on CPU
        mu_before, mu_last = decayed(mu, (1 - alpha_fwd) * a, alpha_fwd)
        delta = a - mu_before
        var_before, var_last = decayed(
            var, (1 - alpha_fwd) * s2 + alpha_fwd * (1 - alpha_fwd) * delta.square(), alpha_fwd)
        scale = (var_before + eps).sqrt()
        y = (xs - mu_before.unsqueeze(-1)) / scale.unsqueeze(-1)
        mu.copy_(mu_last), var.copy_(var_last)
        # mean_HW(y_t), mean_HW(y_t^2), from the statistics
        ctx.save_for_backward(y, scale, delta / scale, (s2 + delta.square()) / scale.square())
        ctx.u, ctx.v, ctx.alpha_bkw = u, v, alpha_bkw  # state the backward writes: not saved
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, scale, y_mean, y2_mean = ctx.saved_tensors
        u, v, alpha_bkw = ctx.u, ctx.v, ctx.alpha_bkw
        beta = 1 - alpha_bkw
        g = grad.to(y.dtype).reshape(y.shape)
        gy_mean = (g * y).mean(-1)                                           # [K, b, C]
        v_before = torch.empty_like(gy_mean)
        for t in range(g.shape[1]):             # v_t = v_{t-1} + mean(g~_t y_t), in order
            v_before[:, t] = v
            v.addcmul_(v, y2_mean[:, t], value=-beta).add_(gy_mean[:, t])
        # h_t = g~_t / scale_t;  dL/dx_t = h_t - beta u_{t-1};  u_t = alpha_b u_{t-1} + mean(h_t)
        h_mean = (g.mean(-1) - beta * v_before * y_mean) / scale
        u_before, u_last = decayed(u, h_mean, alpha_bkw)
        u.copy_(u_last)
        gx = torch.addcmul(g, y, (beta * v_before).unsqueeze(-1), value=-1)  # g~, then in place
        gx.div_(scale.unsqueeze(-1)).sub_((beta * u_before).unsqueeze(-1))
        return gx.view(ctx.shape), None, None, None, None, None, None, None
