"""Cross-process statistics with real processes (gloo on CPU): syncbn and bcn over 2 ranks
must equal the same layer over the whole batch in one process; the per-device norms with state
(private bcn, brn, evonorm_b0, mabn, online) over 2 ranks must equal one process holding every
device as a virtual device, buffers included once the engine has synchronised them."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import gloo_rank
from engine.loop import Process, sync_buffers
from norms import build_norm, configure_devices

WORLD = 2
DT = torch.float64


def _run(rank, init_file, norm, virtual_devices):
    """Each rank holds slices of one batch; `ref` is the same layer over the whole batch in one
    process (private bcn estimates: one process holding every device as a virtual device)."""
    with gloo_rank(rank, init_file, WORLD):
        _compare_with_whole_batch(rank, norm, virtual_devices)


def _compare_with_whole_batch(rank, norm, virtual_devices):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * virtual_devices * 2, 6, 3, 3, generator=gen, dtype=DT) * 2 + 1
    up = torch.randn(x.shape, generator=gen, dtype=DT)
    name, opts = PER_DEVICE.get(norm, (norm, {}))
    ref, layer = (build_norm(name, 6, groups=3, momentum=0.3, **opts).to(DT)
                  for _ in range(2))
    if norm in PER_DEVICE:
        configure_devices(ref, virtual_devices=WORLD * virtual_devices)
    with torch.no_grad():
        for p in [*ref.parameters(), *layer.parameters()]:
            p.copy_(torch.linspace(0.5, 1.5, p.numel(), dtype=DT).view(p.shape))
    configure_devices(layer, virtual_devices=virtual_devices, process_group=dist.group.WORLD)
    mine = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
    for _ in range(STEPS.get(norm, 2)):  # bcn's second step uses updated estimates
        xr = x.clone().requires_grad_(True)
        y_ref = ref(xr)
        (y_ref * up).sum().backward()
        xm = x[mine].clone().requires_grad_(True)
        y = layer(xm)
        (y * up[mine]).sum().backward()
        torch.testing.assert_close(y, y_ref[mine])
        torch.testing.assert_close(xm.grad, xr.grad[mine])
    for p in layer.parameters():
        dist.all_reduce(p.grad)  # DDP sums (then averages) parameter gradients
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=f"{norm} grad {name}")
    sync_buffers(layer, Process(rank, WORLD, torch.device("cpu"), dist.group.WORLD))
    for (name, b), c in zip(layer.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, msg=f"{norm} buffer {name}")
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x[mine]), ref(x)[mine])


# name -> (norm, options) of the norms whose state is per device or per step
PER_DEVICE = {"bcn_private": ("bcn", {"sync_stats": False}),
              "brn": ("brn", {"renorm_from": 0, "r_max_at": 2, "d_max_at": 2, "r_max": 1.5,
                              "d_max": 0.5}),
              "evonorm_b0": ("evonorm_b0", {}),
              "mabn": ("mabn", {"buffer_size": 2, "warmup": 0, "renorm_from": 2, "r_max": 1.1}),
              "online": ("online", {"alpha_fwd": 0.8, "alpha_bkw": 0.7, "ecm": "ac",
                                    "clamp": 1.5})}
# Through the relaxation; past warm-up, the window and r's start; u, v from earlier backwards.
STEPS = {"brn": 4, "mabn": 5, "online": 3}


@pytest.mark.parametrize("norm,virtual_devices", [
    ("syncbn", 1), ("syncbn", 2), ("bcn", 1), ("bcn", 2), ("bcn_private", 2), ("brn", 1),
    ("brn", 2), ("evonorm_b0", 2), ("mabn", 1), ("mabn", 2),
    ("online", 1), ("online", 2)])
def test_cross_process_statistics_equal_whole_batch(tmp_path, norm, virtual_devices):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_run, args=(str(tmp_path / "init"), norm, virtual_devices), nprocs=WORLD)


def _leave(rank, init_file):
    threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    before = threads()
    with gloo_rank(rank, init_file, WORLD):
        _one_ddp_step()
    assert threads() == before, f"{threads() - before} threads of the group outlive shutdown()"


def _one_ddp_step():
    from torch.nn.parallel import DistributedDataParallel

    from models import build_model
    net = build_model("resnet", 8, "cbn")  # its conv links form reference cycles
    configure_devices(net, virtual_devices=1, process_group=dist.group.WORLD)
    DistributedDataParallel(net)(torch.randn(2, 3, 8, 8)).sum().backward()


def test_shutdown_frees_the_group_before_python_exits(tmp_path):
    """The engine's workers and these tests leave through shutdown(): the group's gloo threads
    must be joined there, not at interpreter exit, where freeing their last work aborts."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_leave, args=(str(tmp_path / "init"),), nprocs=WORLD)
