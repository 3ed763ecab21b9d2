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
applies, d mu_c / d W^_c = mean_M(P), d nu_c / d W^_c = 2/M sum y_c P: nu's is one
weight-gradient convolution, all devices at once (devices as convolution groups); mu's is the
same for every filter, so it is one filter's: the device's mean image's patches averaged over
the positions, two small matmuls with each spatial dim's 0/1 taps. With WS, W^ = WS(theta):
the chain through the standardisation by its own backward. This is the derivative the authors'
autograd.grad computes, per device instead of summed over the batch.

Departures from the authors' CBN.py, each on purpose: eps inside the square root (their
`out_p=True`); the paper's per-entry floor instead of dropping entries with negative variance;
entries recorded from the last k-1 burn-in iterations so the window is full when it starts;
the burn-in's plain BN divides by the biased variance, as BN does (theirs by the unbiased);
running statistics (for eval) move toward the window's (mu_bar, sigma^2) that training
normalises with, not the current batch's; history in buffers (checkpointed, per device,
gathered like MABN's), not lists. Beside their layer, from the iteration both windows hold the
same entries on, outputs and gradients agree to float64 rounding, dense and factored
(scripts/check_cbn_reference.py, given their CBN.py).

Both forms below take the first-order terms in W^'s change, W^_t - W^_{t-tau}: with WS to first
order the standardisation's jvp at theta_{t-tau} applied to theta's change, (J^T g) . delta =
g . (J delta), so the window never holds a derivative through WS.

State per device d (rows as in norms/devices.py): mu, nu [D, k-1, C], and what the
compensation needs, in one of two exact forms, whichever fits:
- dense: the gradients d mu / d W^ (one filter per group, the same for all of a group's) and
  d nu / d W^, [D, k-1, fan-in x groups] and [D, k-1, |theta|]: one dot product a step.
  D (k-1) (|theta| + fan-in) numbers: 0.5 GiB for VGG-11's 512-channel convs at D = 64.
- factored, where the dense form of a layer would pass `dense_bytes` (256 MiB): the conv's input
  and output [D, k-1, b, C, H, W] of each entry; the same first-order terms come from one conv of
  the old inputs with W^'s change, d mu . delta = mean_M(conv(P, delta)) and
  d nu . delta = 2/M sum y conv(P, delta). k-1 forward convs a step instead of one dot
  product, but memory in activations, not weights.
theta's history and the step of each slot are shared (every device steps together with the
same weights). Counting optimizer steps makes K virtual devices, K processes and K
accumulation micro-steps the same computation.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .devices import DeviceAware, StepAverage, autocast_off, devices_apart, side_by_side
from .ws import WSConv2d


@functools.lru_cache(maxsize=64)
def patch_taps(size: int, out: int, kernel: int, stride: int, pad: int, dilation: int,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """T [kernel, size]: T[i, h] = 1 where kernel tap i reads input position h at one of the
    conv's `out` output positions along this dim (0 where it reads zero padding)."""
    at = (torch.arange(out, device=device) * stride - pad)[None] + \
        torch.arange(kernel, device=device)[:, None] * dilation          # [kernel, out]
    taps = torch.zeros(kernel, size + 1, dtype=dtype, device=device)
    at = at.where((at >= 0) & (at < size), size)  # padding: the spare column, dropped below
    return taps.scatter_(1, at, 1.0)[:, :size]  # each output reads a position at most once


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The zeros the conv adds before each spatial dim (PyTorch's 'same' adds the odd one
    after)."""
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return conv.padding


def statistic_gradients(conv: nn.Conv2d, inp: torch.Tensor, out: torch.Tensor,
                        devices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d mu / d W^ and d nu / d W^ per device, W^ the weight the conv applies (WS's output for a
    WSConv2d), for the conv's input `inp` [K*b, C_in, *] and its output `out` [K*b, C_out, *]:
    [K, groups, fan-in] (mu's is the same for every filter of a group) and [K, *W^.shape]."""
    b, positions, pad = inp.shape[0] // devices, out[0, 0].numel(), conv_padding(conv)
    m = b * positions
    # d mu_c / d W^_c = mean_M(P) is linear in the input: the device's mean image's patches
    # summed over the output positions, rows x cols^T with each dim's taps (two small matmuls;
    # a weight-gradient conv of a constant cotangent is 7x slower at 64 devices)
    rows, cols = (patch_taps(*dims, inp.dtype, inp.device) for dims in zip(
        inp.shape[2:], out.shape[2:], conv.kernel_size, conv.stride, pad, conv.dilation))
    x_bar = inp.unflatten(0, (devices, b)).mean(1)                              # [K, C_in, H, W]
    g_mu = (rows @ (x_bar @ cols.T)).div_(positions)                       # [K, C_in, kh, kw]
    # d nu / d W^: one weight-gradient convolution, devices as convolution groups
    w, groups = conv.weight, devices * conv.groups
    g_nu = torch.nn.grad.conv2d_weight(
        side_by_side(inp, devices), (devices * w.shape[0], *w.shape[1:]),
        side_by_side(out, devices) * (2 / m), conv.stride, pad, conv.dilation, groups)
    return g_mu.view(devices, conv.groups, -1), g_nu.view(devices, *w.shape)


def rowwise_dot(a: torch.Tensor, b: torch.Tensor, chunk_bytes: int = 2**21) -> torch.Tensor:
    """(a * b).sum(-1), b broadcast over a's first dim. On CPU a chunk of a's rows at a time
    through one reused buffer, so the product is read back from cache: here 4x faster than
    einsum's batched matrix-vector products (and vecdot's whole-size product) over a window."""
    if a.device.type != "cpu":
        return torch.linalg.vecdot(a, b)
    n = max(1, chunk_bytes // max(1, a[0].numel() * a.element_size()))
    out = a.new_empty(a.shape[:-1])
    product = a.new_empty((min(n, len(a)), *a.shape[1:]))
    for part, o in zip(a.split(n), out.split(n)):
        torch.sum(torch.mul(part, b, out=product[:len(part)]), -1, out=o)
    return out


DENSE_BYTES = 2**28  # a layer whose gradient window would be larger keeps activations instead
FACTORED = ("window_x", "window_y")  # the factored form's buffers: sized at their first entry


def standardize_jvp(conv: WSConv2d, theta: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """J tangent, J the Jacobian of the conv's WS at theta (any number of filters): the
    transpose of WS's own written-out vector-Jacobian product, by differentiating it in its
    cotangent (linear, so the zero cotangent is exact)."""
    with torch.enable_grad():
        theta = theta.detach().requires_grad_(True)
        v = torch.zeros_like(theta, requires_grad=True)
        (vjp,) = torch.autograd.grad(conv.standardize(theta), theta, v, create_graph=True)
        (jvp,) = torch.autograd.grad(vjp, v, tangent)
    return jvp


class Normalize(torch.autograd.Function):
    """y = gamma (x - mu_bar) / sqrt(sigma^2 + eps) + beta per channel of x [N, C, *], with the
    gradient through the current batch's statistics only, each 1/n of the window's:
    d mu_bar / dx = 1 / (n m), d sigma^2 / dx = 2 (x - mu_bar) / (n m) (var_t's 2 (x - mu_t) and
    the between-term's 2 (mu_t - mu_bar); its derivative in mu_bar is 0). So
        dL/dx = gamma s (g - (mean(g) + x^ mean(g x^)) / n),  s = 1 / sqrt(sigma^2 + eps),
    batch norm's backward with its corrections divided by n (n = 1: exactly BN's). Forward:
    batch_norm's eval kernel; backward: its reductions, then one affine map of g and x."""

    @staticmethod
    def forward(ctx, x, mu_bar, sigma2, weight, bias, n, eps):
        invstd = torch.rsqrt(sigma2 + eps)
        ctx.save_for_backward(x, mu_bar, invstd, weight)
        ctx.n, ctx.eps = n, eps
        return F.batch_norm(x, mu_bar, sigma2, weight, bias, False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, mu_bar, invstd, weight = ctx.saved_tensors
        # sum(g x^) and sum(g) per channel: dL/dgamma, dL/dbeta
        _, d_weight, d_bias = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mu_bar, invstd, True, ctx.eps, [False, True, True])
        nm = ctx.n * (x.numel() // x.shape[1])
        a = weight * invstd                                                # on g
        b = -a * invstd * d_weight / nm                                    # on x - mu_bar
        shape = (1, -1) + (1,) * (x.dim() - 2)
        c = -a * d_bias / nm - b * mu_bar
        dx = torch.addcmul(c.view(shape), g, a.view(shape)).addcmul_(x, b.view(shape))
        return dx, None, None, d_weight, d_bias, None, None


class CrossIterationBatchNorm(DeviceAware, nn.Module):
    per_device_buffers = ("window_mu", "window_nu", "window_gmu", "window_gnu") + FACTORED

    def __init__(self, num_channels: int, conv: nn.Conv2d | None = None, window: int = 4,
                 burnin: int = 0, eps: float = 1e-5, momentum: float = 0.1,
                 compensate: bool = True, dense_bytes: int = DENSE_BYTES):
        super().__init__()
        if conv is None:
            raise ValueError("cbn: no convolution before this norm; cbn compensates its "
                             "statistics through the weights of the conv built just before it "
                             "(build the conv, then the norm, through the factory)")
        if type(conv) not in (nn.Conv2d, WSConv2d):
            raise ValueError(f"cbn: the conv before it is a {type(conv).__name__}; allowed: "
                             "Conv2d, WSConv2d (the derivatives need to know its weight map)")
        if conv.padding_mode != "zeros" or (conv.padding == "same" and any(
                d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size))):
            raise ValueError(f"cbn: the conv before it pads with padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}; allowed: zeros, the same "
                             "number on both sides (the derivatives read the zero padding)")
        if conv.out_channels != num_channels:
            raise ValueError(f"cbn: the conv before it has out_channels={conv.out_channels}, "
                             f"the norm num_channels={num_channels}; allowed: equal")
        self.num_channels, self.window, self.burnin = num_channels, window, burnin
        self.eps, self.momentum, self.dense_bytes = eps, momentum, dense_bytes
        self.compensate = compensate  # False: the paper's naive baseline, no Taylor terms
        # Not a submodule: its parameters belong to the model where it stands.
        object.__setattr__(self, "conv", conv)
        conv.register_forward_pre_hook(self._remember_input)
        self._input = None
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        past, shape = window - 1, conv.weight.shape
        self.register_buffer("window_mu", torch.zeros(1, past, num_channels))
        self.register_buffer("window_nu", torch.zeros(1, past, num_channels))
        # every window flat per entry: a 4-d buffer would be permuted by
        # model.to(memory_format=channels_last); sized in devices_changed
        for name in ("window_gmu", "window_gnu") + FACTORED:
            self.register_buffer(name, torch.zeros(1, past, 0))
        self.register_buffer("window_theta", torch.zeros(past, shape.numel()))
        self.register_buffer("window_step", torch.zeros(past, dtype=torch.long))  # 0: empty
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._steps_seen = None  # (buffer, its version, its value): see step_count
        self._average = StepAverage()
        self.devices_changed()

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, window={self.window}, burnin={self.burnin}, "
                f"eps={self.eps}, momentum={self.momentum}"
                + ("" if self.compensate else ", compensate=False"))

    def _remember_input(self, conv, args):
        self._input = args[0] if self.training else None

    @property
    def dense(self) -> bool:
        """Which form the window holds (see the module's docstring): the buffers say."""
        return self.window_gnu.shape[-1] > 0

    def devices_changed(self) -> None:
        """Empty windows for D devices, dense if D (k-1) (|theta| + fan-in) fits `dense_bytes`;
        without compensation, the statistics alone."""
        d, past, shape = self.num_devices(), self.window - 1, self.conv.weight.shape
        mu_size = self.conv.groups * shape[1:].numel()
        size = d * past * (shape.numel() + mu_size) * self.window_mu.element_size()
        dense = size <= self.dense_bytes and self.compensate
        sizes = {"window_mu": (self.num_channels,), "window_nu": (self.num_channels,),
                 "window_gmu": (mu_size if dense else 0,),
                 "window_gnu": (shape.numel() if dense else 0,),
                 "window_x": (0,), "window_y": (0,)}
        for name, size in sizes.items():
            buf = getattr(self, name)
            if buf.shape != (d, past, *size):
                setattr(self, name, buf.new_zeros(d, past, *size))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint's windows keep their form and, factored, the batch's shape
        for name in ("window_gmu", "window_gnu") + FACTORED:
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.shape != getattr(self, name).shape:
                setattr(self, name, getattr(self, name).new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def step_count(self) -> int:
        """`steps` as an int, read from the buffer only when something else wrote it (a load,
        a copy): int() of a CUDA tensor would wait for the GPU at every forward."""
        seen = self._steps_seen
        if seen is None or seen[0] is not self.steps or seen[1] != self.steps._version:
            self._steps_seen = seen = (self.steps, self.steps._version, int(self.steps))
        return seen[2]

    @autocast_off  # the window's einsum and the factored form's convolutions in float32
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
        t = self.step_count() + 1
        record = past > 0 and t > self.burnin - past
        if record and self.compensate and (inp is None or inp.shape[0] != x.shape[0]):
            raise ValueError("cbn: its convolution did not run on this batch just before it")
        xs = side_by_side(x.to(self.running_mean.dtype), k)
        with torch.no_grad():  # the current batch's statistics' gradient: in Normalize
            # batch_norm's own statistics kernel: CPU's var_mean is ~4x slower (as brn)
            mu_t, var_t = (v.view(k, -1) for v in torch.batch_norm_update_stats(xs, None, None,
                                                                               0.0))
            # the old entries, compensated to theta_t: constants
            if past > 0 and t > self.burnin:
                used = ((self.window_step > 0) & (self.window_step >= t - past)).to(xs.dtype)
                used = used.view(1, -1, 1)                                   # [1, k-1, 1]
                mu_old, nu_old = self.window_mu[step.rows], self.window_nu[step.rows]
                if self.compensate:
                    d_mu, d_nu = self._compensation(step.rows, xs.dtype)       # [K, k-1, C]
                    mu_old, nu_old = mu_old + d_mu, nu_old + d_nu
                var_old = ((nu_old - mu_old.square()).clamp_min(0) * used).sum(1)  # the floor
                n = 1 + used.sum()
            else:
                mu_old, used, var_old = None, None, 0
                n = 1
            mu_bar = (mu_t + ((mu_old * used).sum(1) if used is not None else 0)) / n
            between = (mu_t - mu_bar).square()
            if used is not None:
                between = between + ((mu_old - mu_bar.unsqueeze(1)).square() * used).sum(1)
            sigma2 = (var_t + var_old + between) / n
        y = Normalize.apply(xs, mu_bar.flatten(), sigma2.flatten(), self.weight.repeat(k),
                            self.bias.repeat(k), n, self.eps)
        with torch.no_grad():
            if record:
                self._record(step, t, inp, x, mu_t, var_t)
            mean = self._average.add(self, torch.stack([mu_bar, sigma2], 1), step, sync=False)
            if mean is not None:
                self.running_mean.lerp_(mean[0], self.momentum)
                self.running_var.lerp_(mean[1], self.momentum)
            if step.last:
                self.steps.add_(1)
                self._steps_seen = (self.steps, self.steps._version, t)
        return devices_apart(y.to(x.dtype), k, x)

    def _compensation(self, rows: slice, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The first-order terms d mu / d W^ . (W^_t - W^_{t-tau}) and the same for nu, for the
        devices `rows` and every slot: [K, k-1, C] each."""
        conv, past = self.conv, self.window - 1
        weight = conv.weight.detach().to(dtype)
        # an empty slot's theta is the current one: no change, and WS's jvp is taken at a
        # weight it is defined at (at theta = 0 its std is 0: NaN, which masking cannot undo)
        theta = torch.where(self.window_step.view(-1, 1) > 0, self.window_theta.to(dtype),
                            weight.flatten())
        delta = (weight.flatten() - theta).view(past * len(weight), *weight.shape[1:])
        if isinstance(conv, WSConv2d):  # W^'s change: WS's jvp at theta_{t-tau}
            delta = standardize_jvp(conv, theta.view_as(delta), delta)
        if self.dense:  # per slot and filter, mu's gradient shared by a group's filters
            g = conv.groups
            delta = delta.view(past, g, len(weight) // g, -1)                # [k-1, G, C/G, F]
            g_mu = self.window_gmu[rows].unflatten(2, (g, -1))               # [K, k-1, G, F]
            g_nu = self.window_gnu[rows].view(-1, past, *delta.shape[1:])  # [K, k-1, G, C/G, F]
            return (torch.einsum("ksgf,sgcf->ksgc", g_mu, delta).flatten(2),
                    rowwise_dot(g_nu, delta).flatten(2))
        # factored: conv(P, W^ change) over the old inputs, the slots as convolution groups
        x_old, y_old = self.window_x[rows], self.window_y[rows]         # [K, k-1, b, C, H, W]
        if x_old.dim() == 3:  # nothing recorded yet (no burn-in): no old entries to move
            return (torch.zeros_like(self.window_mu[rows]),) * 2
        k, b = x_old.shape[0], x_old.shape[2]
        z = F.conv2d(x_old.transpose(1, 2).flatten(0, 1).flatten(1, 2), delta, None,
                     conv.stride, conv.padding, conv.dilation, past * conv.groups)
        z = z.unflatten(1, (past, -1)).unflatten(0, (k, b)).transpose(1, 2)  # as y_old
        dims = (2, 4, 5)
        return z.mean(dims), 2 * (y_old * z).mean(dims)

    def _record(self, step, t, inp, x, mu_t, var_t) -> None:
        """This step's entry into slot t mod (k-1), the oldest one (already read)."""
        slot, k = t % (self.window - 1), self.virtual_devices
        rows = torch.arange(step.rows.start, step.rows.stop, device=x.device)
        self.window_mu[rows, slot] = mu_t.detach()
        self.window_nu[rows, slot] = (var_t + mu_t.square()).detach()
        if step.last:  # shared by every device of the step: written once they have all read it
            self.window_theta[slot] = self.conv.weight.detach().flatten()
            self.window_step[slot] = t
        if not self.compensate:  # the naive window: the statistics are all it needs
            return
        dtype = self.window_mu.dtype
        inp, x = inp.detach().to(dtype), x.detach().to(dtype)
        if self.dense:
            g_mu, g_nu = statistic_gradients(self.conv, inp, x, k)
            self.window_gmu[rows, slot] = g_mu.flatten(1)
            self.window_gnu[rows, slot] = g_nu.flatten(1)
        else:
            for name, value in zip(FACTORED, (inp, x)):
                value = value.unflatten(0, (k, -1))                              # [K, b, C, H, W]
                buf = getattr(self, name)
                if buf.shape[2:] != value.shape[1:]:
                    if buf.shape[2:] != (0,):
                        raise ValueError(
                            f"cbn: the batch per device changed from {tuple(buf.shape[2:])} to "
                            f"{tuple(value.shape[1:])}; its window keeps the conv's activations")
                    buf = buf.new_zeros(*buf.shape[:2], *value.shape[1:])
                    setattr(self, name, buf)
                buf[rows, slot] = value
