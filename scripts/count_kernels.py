"""Count the operations of one training step: what a micro-batch step costs on a GPU.

    python scripts/count_kernels.py [--depth 20] [--norms bn,gn,...] [--global-batch 64]

On a GPU a step at 1-2 images per device costs its kernel launches, not its arithmetic, and
each non-view aten op is about one kernel. This counts them (on the CPU: the count does not
depend on the device) for one forward+backward of ResNet-<depth> over the study's global batch
at b = global batch (one device) and b = 1 (global-batch virtual devices), per norm, plus the
optimizer step; results/performance/README.md reads the GPU prediction from them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.batches import GlobalBatches  # noqa: E402
from engine.data import load_dataset  # noqa: E402
from engine.loop import Step, WarmupCosine, forward_backward  # noqa: E402
from models import build_model  # noqa: E402
from norms import NORMS, configure_devices  # noqa: E402

# Ops that make no kernel of their own (a new view of the same memory).
VIEWS = {"view", "_unsafe_view", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze",
         "alias", "as_strided", "detach", "slice", "select", "split", "chunk", "unbind",
         "split_with_sizes", "reshape", "_reshape_alias", "unflatten", "flatten", "view_as",
         "expand_as", "narrow"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[1] not in VIEWS:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count(norm: str, ws: bool, b: int, depth: int, global_batch: int) -> tuple[int, int]:
    """(forward+backward ops, optimizer + scheduler ops) of the second step of a run."""
    torch.manual_seed(0)
    model = build_model("resnet", depth, norm=norm, ws=ws, groups=8)
    configure_devices(model, global_batch // b)
    data = load_dataset("synthetic", None, train_size=4 * global_batch, test_size=1)
    batches = iter(GlobalBatches(data.train, global_batch, data.mean, data.std, "cpu").epoch(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, 10**9))
    sums = (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long))
    x, y = next(batches)  # the first step allocates optimizer state: not a typical step
    forward_backward(model, x, y, sums, Step())
    opt.step()
    x, y = next(batches)
    opt.zero_grad(set_to_none=True)
    with Count() as fb:
        forward_backward(model, x, y, sums, Step())
    with Count() as o:
        opt.step()
        sched.step()
    return fb.ops, o.ops


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--norms", default=",".join(n for n in NORMS if n != "syncbn"),
                   help="comma-separated; each also as <norm>_ws")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"| norm | b = {a.global_batch} (1 device) | b = 1 ({a.global_batch} virtual devices) "
          "| optimizer step |")
    print("|---|--:|--:|--:|")
    for label in a.norms.split(","):
        ws = label.endswith("_ws")
        norm = label[:-3] if ws else label
        big, opt = count(norm, ws, a.global_batch, a.depth, a.global_batch)
        small, _ = count(norm, ws, 1, a.depth, a.global_batch)
        print(f"| {label} | {big} | {small} | {opt} |", flush=True)


if __name__ == "__main__":
    main()
