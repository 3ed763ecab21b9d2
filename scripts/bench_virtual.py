"""Virtual devices vs gradient accumulation: the same update, measured side by side.

    python scripts/bench_virtual.py [--devices 16] [--batch 2] [--norm bn] [--repeats 5]

K virtual devices x b images run one forward/backward over K*b images with per-device norm
statistics; K accumulation steps x b run K forward/backward passes of b images. Both give the
same optimizer update (tests/test_distributed.py), so the ratio of images/s is what simulating
devices in one process buys. Both sides use the engine's own training step (engine.loop), in the
same process, alternating, median of --repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data import GlobalBatches, load_dataset  # noqa: E402
from engine.loop import Process, WarmupCosine, train_epoch  # noqa: E402
from models import build_model  # noqa: E402
from norms import configure_devices  # noqa: E402


def make_step(arch, depth, norm, virtual, accumulate, batch, steps, seed=0):
    """A closure running `steps` optimizer steps of the engine's loop; returns images done."""
    torch.manual_seed(seed)
    model = build_model(arch, depth, norm=norm, groups=8)
    configure_devices(model, virtual)
    g = batch * virtual * accumulate
    data = load_dataset("synthetic", None, train_size=g * steps, test_size=1, seed=seed)
    batches = GlobalBatches(data.train, g, data.mean, data.std, "cpu", seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, 10**9))
    epoch = iter(range(10**9))

    def step():
        train_epoch(model, opt, sched, batches, next(epoch), Process(), accumulate, 10**9, None)
        return g * steps
    return step


def virtual_vs_accumulate(devices=16, batch=2, norm="bn", arch="resnet", depth=20, steps=8,
                          repeats=5) -> dict:
    sides = {"virtual": make_step(arch, depth, norm, devices, 1, batch, steps),
             "accumulate": make_step(arch, depth, norm, 1, devices, batch, steps)}
    for run in sides.values():  # warm-up
        run()
    rates = {k: [] for k in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            tic = time.perf_counter()
            n = run()
            rates[name].append(n / (time.perf_counter() - tic))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"virtual_images_per_sec": med["virtual"],
            "accumulate_images_per_sec": med["accumulate"],
            "virtual_vs_accumulate": med["virtual"] / med["accumulate"],
            "setting": {"devices": devices, "batch_size_per_device": batch, "norm": norm,
                        "model": f"{arch}{depth}", "steps": steps, "repeats": repeats,
                        "threads": torch.get_num_threads(), "torch": torch.__version__}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--norm", default="bn")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    arch = a.model.rstrip("0123456789")
    res = virtual_vs_accumulate(a.devices, a.batch, a.norm, arch, int(a.model[len(arch):]),
                                a.steps, a.repeats)
    print(f"{a.devices} virtual devices x {a.batch}: {res['virtual_images_per_sec']:8.1f} img/s")
    print(f"{a.devices} accumulation steps x {a.batch}: {res['accumulate_images_per_sec']:8.1f} img/s")
    print(f"virtual_vs_accumulate: {res['virtual_vs_accumulate']:.2f}x")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
