"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021, arXiv 2002.05712), per device.

For one device's batch at iteration t (t = 1, 2, ...: optimizer steps), per channel, with
theta the weights of the convolution before the layer:

    mu_t = mean over (N, H, W) of x,   nu_t = mean of x^2                  (current batch)
    mu_{t-tau}(theta_t) ~ mu_{t-tau} + d mu_{t-tau}/d theta . (theta_t - theta_{t-tau})
    nu_{t-tau}(theta_t) ~ nu_{t-tau} + d nu_{t-tau}/d theta . (theta_t - theta_{t-tau})
    mu_bar = 1/n sum_tau mu_{t-tau}(theta_t)
    nu_bar = 1/n sum_tau max(nu_{t-tau}(theta_t), mu_{t-tau}(theta_t)^2)   (the paper's floor)
    sigma^2 = nu_bar - mu_bar^2
    y = gamma (x - mu_bar) / sqrt(sigma^2 + eps) + beta

tau = 0 .. n-1, n = min(k, entries recorded in the last k iterations); for t <= burnin, n = 1
(plain BN of the device batch). The old entries are constants (no gradient through the
compensation, as in the authors' code); the gradient flows through the current batch's
mu_t, nu_t. sigma^2 is computed as the equal centred sum
    1/n [var_t + sum_{tau>0} max(nu - mu^2, 0) + sum_tau (mu_{t-tau} - mu_bar)^2]
(no cancellation, never negative). The floor is applied to the old entries; the current one
satisfies it by Jensen's inequality.

The derivatives are the paper's closed forms through the one preceding conv (its "efficient
computation": the earlier layers' dependence dropped, as in the paper): with P the input
patches of the conv output's positions of one device (M of them) and W^ the weight the conv
applies, d mu_c / d W^_c = mean_M(P), d nu_c / d W^_c = 2/M sum y_c P: one weight-gradient
convolution each, all devices at once (devices as convolution groups). With WS, W^ = WS(theta):
the chain through the standardisation by its own backward. This is the derivative the authors'
autograd.grad computes, per device instead of summed over the batch.

Departures from the authors' CBN.py, each on purpose: eps inside the square root; the paper's
per-entry floor instead of dropping entries with negative variance; entries recorded from the
last k-1 burn-in iterations so the window is full when it starts; running statistics (for eval)
move toward the window's (mu_bar, sigma^2) that training normalises with, not the current
batch's; history in buffers (checkpointed, per device, gathered like MABN's), not lists.

State per device d (rows as in norms/devices.py): mu, nu [D, k-1, C] and their gradients
[D, k-1, *theta.shape]; theta's history and the step of each slot are shared (every device
steps together with the same weights). Counting optimizer steps makes K virtual devices, K
processes and K accumulation micro-steps the same computation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .devices import DeviceAware, StepAverage, in_layout_of
from .ws import WSConv2d


def statistic_gradients(conv: nn.Conv2d, inp: torch.Tensor, out: torch.Tensor,
                        devices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d mu / d theta and d nu / d theta per device, [K, *theta.shape] each, for the conv's
    input `inp` [K*b, C_in, *] and its output `out` [K*b, C_out, *]."""
    b = inp.shape[0] // devices
    m = b * out[0, 0].numel()
    # [K*b, C, *] -> [b, K*C, *]: the devices side by side as convolution groups
    side = lambda z: z.unflatten(0, (devices, b)).transpose(0, 1).flatten(1, 2)  # noqa: E731
    xi, y = side(inp), side(out)
    w = conv.weight
    size = (devices * w.shape[0], *w.shape[1:])
    grads = [torch.nn.grad.conv2d_weight(xi, size, cot, conv.stride, conv.padding,
                                         conv.dilation, devices * conv.groups)
             for cot in (torch.full_like(y, 1 / m), y * (2 / m))]
    g = torch.cat(grads)                                   # [2K*C_out, C_in/g, kh, kw]
    if isinstance(conv, WSConv2d):  # through W^ = WS(theta), per filter: theta repeated 2K times
        with torch.enable_grad():
            theta = w.detach().to(g.dtype).repeat(2 * devices, 1, 1, 1).requires_grad_(True)
            (g,) = torch.autograd.grad(conv.standardize(theta), theta, g)
    g_mu, g_nu = g.view(2, devices, *w.shape).unbind(0)
    return g_mu, g_nu


class CrossIterationBatchNorm(DeviceAware, nn.Module):
    per_device_buffers = ("window_mu", "window_nu", "window_dmu", "window_dnu")

    def __init__(self, num_channels: int, conv: nn.Conv2d | None = None, window: int = 8,
                 burnin: int = 0, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if conv is None:
            raise ValueError("cbn: no convolution before this norm; cbn compensates its "
                             "statistics through the weights of the conv built just before it "
                             "(build the conv, then the norm, through the factory)")
        if type(conv) not in (nn.Conv2d, WSConv2d):
            raise ValueError(f"cbn: the conv before it is a {type(conv).__name__}; allowed: "
                             "Conv2d, WSConv2d (the derivatives need to know its weight map)")
        if conv.out_channels != num_channels:
            raise ValueError(f"cbn: the conv before it has out_channels={conv.out_channels}, "
                             f"the norm num_channels={num_channels}; allowed: equal")
        self.num_channels, self.window, self.burnin = num_channels, window, burnin
        self.eps, self.momentum = eps, momentum
        # Not a submodule: its parameters belong to the model where it stands.
        object.__setattr__(self, "conv", conv)
        conv.register_forward_pre_hook(self._remember_input)
        self._input = None
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        past, shape = window - 1, conv.weight.shape
        self.register_buffer("window_mu", torch.zeros(1, past, num_channels))
        self.register_buffer("window_nu", torch.zeros(1, past, num_channels))
        self.register_buffer("window_dmu", torch.zeros(1, past, *shape))
        self.register_buffer("window_dnu", torch.zeros(1, past, *shape))
        # flat [k-1, fan-in x C]: a 5-d buffer would break model.to(memory_format=channels_last)
        self.register_buffer("window_theta", torch.zeros(past, shape.numel()))
        self.register_buffer("window_step", torch.zeros(past, dtype=torch.long))  # 0: empty
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._average = StepAverage()

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, window={self.window}, burnin={self.burnin}, "
                f"eps={self.eps}, momentum={self.momentum}")

    def _remember_input(self, conv, args):
        self._input = args[0] if self.training else None

    def devices_changed(self) -> None:
        d = self.num_devices()
        if self.window_mu.shape[0] != d:
            for name in self.per_device_buffers:
                buf = getattr(self, name)
                setattr(self, name, buf.new_zeros(d, *buf.shape[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, self._input = self._input, None  # never kept past this forward (copies, memory)
        if x.dim() < 3:
            raise ValueError(f"cbn expects [N, C, H, W] input, got {tuple(x.shape)}")
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        step = self.next_micro_step()
        k, past = self.virtual_devices, self.window - 1
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} does not split into {k} virtual devices")
        t = int(self.steps) + 1
        record = past > 0 and t > self.burnin - past
        if record and (inp is None or inp.shape[0] != x.shape[0]):
            raise ValueError("cbn: its convolution did not run on this batch just before it")
        xs = x.unflatten(0, (k, -1)).to(self.running_mean.dtype)     # [K, b, C, *]
        dims = (1, *range(3, xs.dim()))
        var_t, mu_t = torch.var_mean(xs, dims, correction=0)          # [K, C]
        with torch.no_grad():  # the old entries, compensated to theta_t: constants
            if past > 0 and t > self.burnin:
                used = ((self.window_step > 0) & (self.window_step >= t - past)).to(xs.dtype)
                used = used.view(1, -1, 1)                                   # [1, k-1, 1]
                # theta_t - theta_{t-tau} per filter: [1, k-1, C, fan-in]
                weight = self.conv.weight.detach().to(xs.dtype)
                delta = (weight.flatten() - self.window_theta).view(past, len(weight), -1)
                rows = step.rows
                mu_old = self.window_mu[rows] + torch.linalg.vecdot(         # [K, k-1, C]
                    self.window_dmu[rows].flatten(3), delta.unsqueeze(0))
                nu_old = self.window_nu[rows] + torch.linalg.vecdot(
                    self.window_dnu[rows].flatten(3), delta.unsqueeze(0))
                var_old = ((nu_old - mu_old.square()).clamp_min(0) * used).sum(1)  # the floor
                n = 1 + used.sum()
            else:
                mu_old, used, var_old = None, None, 0
                n = 1
        mu_bar = (mu_t + ((mu_old * used).sum(1) if used is not None else 0)) / n
        # sum_tau (mu_{t-tau} - mu_bar)^2: its derivative w.r.t. mu_bar is 0, so mu_bar is held
        centre = mu_bar.detach()
        between = (mu_t - centre).square()
        if used is not None:
            between = between + ((mu_old - centre.unsqueeze(1)).square() * used).sum(1)
        sigma2 = (var_t + var_old + between) / n
        shape = (k, 1, -1) + (1,) * (xs.dim() - 3)
        scale = torch.rsqrt(sigma2 + self.eps).view(shape) * self.weight.view(1, 1, -1, *shape[3:])
        y = (xs - mu_bar.view(shape)) * scale + self.bias.view(1, 1, -1, *shape[3:])
        with torch.no_grad():
            if record:
                self._record(step, t, inp, x, mu_t, var_t)
            mean = self._average.add(self, torch.stack([mu_bar, sigma2], 1), step, sync=False)
            if mean is not None:
                self.running_mean.lerp_(mean[0], self.momentum)
                self.running_var.lerp_(mean[1], self.momentum)
            if step.last:
                self.steps.add_(1)
        return in_layout_of(y.flatten(0, 1).to(x.dtype), x)

    def _record(self, step, t, inp, x, mu_t, var_t) -> None:
        """This step's entry into slot t mod (k-1), the oldest one (already read)."""
        slot = t % (self.window - 1)
        dtype = self.window_dmu.dtype
        g_mu, g_nu = statistic_gradients(self.conv, inp.detach().to(dtype),
                                         x.detach().to(dtype), self.virtual_devices)
        rows = torch.arange(step.rows.start, step.rows.stop, device=x.device)
        self.window_mu[rows, slot] = mu_t.detach()
        self.window_nu[rows, slot] = (var_t + mu_t.square()).detach()
        self.window_dmu[rows, slot] = g_mu
        self.window_dnu[rows, slot] = g_nu
        if step.last:  # shared by every device of the step: written once they have all read it
            self.window_theta[slot] = self.conv.weight.detach().flatten()
            self.window_step[slot] = t
