"""norms/cbn.py against the authors' Cross-Iteration BN layer, run side by side in float64.

    python scripts/check_cbn_reference.py PATH/TO/CBN.py

PATH is `mmdet/models/utils/CBN.py` of the authors' repository (github.com/Howal/
Cross-iterationBatchNorm; not vendored here). Both layers sit after their own copy of one conv
and see the same inputs and the same conv weights at every iteration, the weights following a
fixed random walk (an optimizer would let a first difference change every later step). The
authors' layer with `out_p=True` (eps inside the square root, as here) and `burnin`, our layer
with window k = buffer_num + 1 and the same burn-in, its window dense or (--factored) factored.

The two differ on purpose where their windows fill: the authors' starts recording after the
burn-in, ours records its last k - 1 iterations so the window is full when it starts. So from
iteration burnin + k on, both hold the same k - 1 earlier iterations, and every output and
gradient must agree to float64 rounding (the running statistics are a documented departure
and are not compared). Before that, the script checks that they do differ (the departure is
real). A variance entry below zero would be dropped by theirs and floored by ours: the script
reports any, and the weight walk is small enough that none occurs.

Prints one line per iteration and exits non-zero if any compared iteration differs by more
than --tol (relative to the largest value).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from norms import build_norm, conv_factory  # noqa: E402


@contextlib.contextmanager
def cuda_is_cpu():
    """The authors' __init__ puts a constant on the GPU (`.cuda()`); here it stays on the CPU."""
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def load_reference(path: Path):
    spec = importlib.util.spec_from_file_location("authors_cbn", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "CBatchNorm2d", None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", type=Path, help="the authors' CBN.py")
    p.add_argument("--window", type=int, default=4, help="k (theirs: buffer_num = k - 1)")
    p.add_argument("--burnin", type=int, default=3)
    p.add_argument("--iterations", type=int, default=14)
    p.add_argument("--step", type=float, default=1e-2, help="size of the weights' walk")
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--factored", action="store_true",
                   help="our window in its factored form (the conv's inputs and outputs)")
    a = p.parse_args(argv)
    if not a.reference.is_file():
        print(f"error: reference={a.reference} is not a file; allowed: the path of the "
              "authors' mmdet/models/utils/CBN.py", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dt, c_in, c, n = torch.float64, 3, 5, 4
    reference = load_reference(a.reference)
    if reference is None:
        print(f"error: reference={a.reference} defines no CBatchNorm2d; allowed: the path of "
              "the authors' mmdet/models/utils/CBN.py", file=sys.stderr)
        return 2

    conv_ref = nn.Conv2d(c_in, c, 3, padding=1, bias=False).to(dt)
    with cuda_is_cpu():
        theirs = reference(c, eps=1e-5, buffer_num=a.window - 1, burnin=a.burnin,
                           out_p=True).to(dt)
    conv_cls, link = conv_factory("cbn", False)
    conv_ours = conv_cls(c_in, c, 3, padding=1, bias=False).to(dt)
    ours = build_norm("cbn", c, conv=link.take(), window=a.window, burnin=a.burnin,
                      eps=1e-5).to(dt)
    ours.dense_bytes = 0 if a.factored else 2**40
    ours.devices_changed()  # re-sizes the window in the form asked for
    assert ours.dense != a.factored
    with torch.no_grad():
        conv_ours.weight.copy_(conv_ref.weight)
        ours.weight.copy_(theirs.weight)   # theirs starts gamma uniform in [0, 1)
        ours.bias.copy_(torch.randn(c, dtype=dt))
        theirs.bias.copy_(ours.bias)

    first_equal, worst, failed = a.burnin + a.window, 0.0, False
    for t in range(1, a.iterations + 1):
        x = torch.randn(n, c_in, 6, 6, dtype=dt) * 2 + 0.5
        up = torch.randn(n, c, 6, 6, dtype=dt)
        grads, outs = [], []
        for conv, norm, call in ((conv_ref, theirs, lambda h, w: theirs(h, w)),
                                 (conv_ours, ours, lambda h, w: ours(h))):
            xi = x.clone().requires_grad_()
            for q in (conv.weight, norm.weight, norm.bias):
                q.grad = None
            y = call(conv(xi), conv.weight)
            y.backward(up)
            outs.append(y.detach())
            grads.append([xi.grad, conv.weight.grad, norm.weight.grad, norm.bias.grad])
        diff = max([rel(outs[1], outs[0])] + [rel(g1, g0) for g0, g1 in zip(*grads)])
        compared = t >= first_equal
        if compared:
            worst = max(worst, diff)
            failed |= diff > a.tol
        phase = ("burn-in" if t <= a.burnin else "compared" if compared
                 else "windows differ (by design)")
        print(f"iteration {t:2d}  {phase:27s}  max relative difference {diff:.2e}")
        with torch.no_grad():  # the same small change of the conv weights for both
            step = a.step * torch.randn_like(conv_ref.weight) * conv_ref.weight.abs().mean()
            conv_ref.weight.add_(step)
            conv_ours.weight.add_(step)
    if a.iterations < first_equal:
        print(f"error: iterations={a.iterations} compares nothing; allowed: >= "
              f"{first_equal} (burnin + window)", file=sys.stderr)
        return 2
    print(f"iterations {first_equal}-{a.iterations}: worst relative difference {worst:.2e} "
          f"(tolerance {a.tol:g}): {'FAILED' if failed else 'the same'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
