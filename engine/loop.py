"""The training run: one story from config to run record.

    setup -> (resume) -> for each epoch: train steps, evaluate, checkpoint, record -> summary

The global batch of every optimizer step is laid out as
[process r][accumulation step a][virtual device k][b images]: process r takes its contiguous
rows, each accumulation step its contiguous chunk, and the model's batch-dependent norms split
each chunk into k device-slices. So device d always gets the d-th slice of the global batch,
whichever way the devices are realised.
"""
from __future__ import annotations

import ctypes
import logging
import math
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import build_model
from norms import DeviceAware, configure_devices, one_process_copy

from . import checkpoint
from .config import (PRECISIONS, ConfigError, global_batch, identity, model_norm, norm_label,
                     norm_options)
from .agc import adaptive_clip_grad_, clipped_parameters
from .data import GlobalBatches, eval_batches, load_dataset, shard_bounds
from .records import RunRecord, code_version
from .rundir import RunLock
from .tracking import Tracker

log = logging.getLogger("microbatch")

@dataclass
class Process:
    """Where this process sits among the real devices (engine/distributed.py sets it up)."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def keep_freed_memory() -> bool:
    """glibc: serve buffers up to 32 MiB from the heap and keep freed memory there.

    By default glibc mmaps every buffer above 128 KiB afresh and the kernel zeroes it page by
    page on first touch, so each step's activations page-fault again on a CPU. CUDA's caching
    allocator reuses memory the same way. Returns whether it applied (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and \
        bool(libc.mallopt(m_trim_threshold, 1 << 30))


def describe(cfg: DictConfig, overrides: list[str]) -> dict:
    """The identity fields every run record and tracker carries (the report tool's columns)."""
    t = cfg.trainer
    return {"model": cfg.model.arch, "depth": cfg.model.depth, "norm": cfg.norm.name,
            "ws": cfg.norm.ws, "norm_label": norm_label(cfg),
            "batch_size_per_device": cfg.batch_size_per_device, "devices": t.devices,
            "virtual_devices": t.virtual_devices, "accumulate": t.accumulate,
            "global_batch": global_batch(cfg), "epochs": t.epochs, "seed": cfg.seed,
            "data": cfg.data.name, "name": cfg.name, "overrides": list(overrides),
            "code": code_version(), "torch": torch.__version__}


class WarmupCosine:
    """lr factor per optimizer step: linear warm-up from 1/warmup, then cosine to 0."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup, self.total = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    """Seed the global generators before the model is built: its initialisation is all that
    draws from them. The data order and augmentation come from generators seeded by (seed,
    epoch) (engine/data.py), so a resumed run needs no saved RNG state; tests/test_train.py
    checks that training draws nothing from the global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- steps


@dataclass
class Step:
    """How one optimizer step runs: what trainer.* chooses beyond the maths (engine/config.py).

    accumulate: chunks per step. ddp: skip DDP's gradient all-reduce on all chunks but the last.
    autocast: the forward's precision context. scaler: fp16's GradScaler. memory_format: the
    input layout (channels_last with a channels_last model). cuda_graphs: capture the forward
    and backward once, replay them every step (CapturedForwardBackward). clip: called on the
    step's whole gradient (all chunks, all devices, loss scale removed) before the optimizer
    step: optim.agc's adaptive gradient clipping.
    """
    accumulate: int = 1
    ddp: bool = False
    autocast: Callable = nullcontext
    scaler: torch.amp.GradScaler | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    cuda_graphs: bool = False
    captured: "CapturedForwardBackward | None" = None
    clip: Callable[[], None] | None = None

    @classmethod
    def from_config(cls, t, proc: Process) -> "Step":
        dtype_name = PRECISIONS[t.precision]
        dtype = getattr(torch, dtype_name) if dtype_name else None
        return cls(accumulate=t.accumulate, ddp=proc.world_size > 1,
                   # Graph capture needs autocast's weight-cast cache off (its casts are replayed).
                   autocast=(partial(torch.autocast, proc.device.type, dtype=dtype,
                                     cache_enabled=not t.cuda_graphs) if dtype else nullcontext),
                   scaler=torch.amp.GradScaler(proc.device.type) if t.precision == "fp16"
                   else None,
                   memory_format=torch.channels_last if t.channels_last
                   else torch.contiguous_format,
                   cuda_graphs=t.cuda_graphs)


def forward_backward(net, x, y, sums, step: Step) -> None:
    """Forward and backward of one step's images in `step.accumulate` chunks; adds the loss sum
    and the correct count into `sums` on the device (no host sync)."""
    loss_sum, correct = sums
    k = step.accumulate
    for i, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k)), 1):
        # DDP all-reduces gradients on the last accumulation step only.
        with net.no_sync() if i < k and step.ddp else nullcontext():
            with step.autocast():
                out = net(xs)
                loss = F.cross_entropy(out, ys)
            scaled = loss / k
            (step.scaler.scale(scaled) if step.scaler is not None else scaled).backward()
        loss_sum += loss.detach() * len(ys)
        correct += (out.argmax(1) == ys).sum()


def train_step(net, optimizer, scheduler, x, y, sums, step: Step) -> None:
    """One optimizer step over this process's rows (x, y) of a global batch: the engine's
    training step, also what scripts/bench.py times against a hand-written loop."""
    x = x.contiguous(memory_format=step.memory_format)
    if step.cuda_graphs:
        if step.captured is None:
            step.captured = CapturedForwardBackward(net, x, y, step)
        step.captured(x, y, sums)  # overwrites every .grad: no zero_grad
    else:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(net, x, y, sums, step)
    if step.scaler is not None:
        if step.clip is not None:
            step.scaler.unscale_(optimizer)  # clip the true gradient; step() won't unscale again
            step.clip()
        step.scaler.step(optimizer)
        step.scaler.update()
    else:
        if step.clip is not None:
            step.clip()
        optimizer.step()
    scheduler.step()


class CapturedForwardBackward:
    """trainer.cuda_graphs: one step's forward and backward (every accumulation chunk, and the
    metric sums) captured once as a CUDA graph, then replayed from static input buffers.

    A micro-batch step on a GPU is hundreds of tiny kernels whose launch cost does not depend
    on b; a replay launches them all at once. Constraints (engine/config.py checks them): CUDA,
    one process (no DDP hooks), fixed shapes (every step has the same rows: the engine drops
    the epoch's last partial batch), nothing that reads a device value on the host inside the
    forward (BN with momentum=None reads its batch count; fp16's GradScaler checks for inf).
    The optimizer step stays eager (a few foreach kernels), so the lr schedule works unchanged.
    Capture allocates the gradients in the graph's memory pool: every replay overwrites them,
    so nothing may set them to None afterwards.
    """

    def __init__(self, net, x, y, step: Step, warmup: int = 3):
        self.x, self.y = x.clone(), y.clone()
        self.sums = (torch.zeros((), device=x.device, dtype=torch.float64),
                     torch.zeros((), device=x.device, dtype=torch.long))
        params = [p for p in net.parameters() if p.requires_grad]
        buffers = list(net.buffers())
        saved = [b.clone() for b in buffers]
        # Warm-up on a side stream (cuDNN and allocator set-up happen outside the capture); its
        # running-statistics updates are undone below, so the run's maths is unchanged.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                for p in params:
                    p.grad = None
                forward_backward(net, self.x, self.y, self.sums, step)
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None  # the captured backward allocates them: each replay writes, not adds
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for s in self.sums:
                s.zero_()
            forward_backward(net, self.x, self.y, self.sums, step)
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)

    def __call__(self, x, y, sums) -> None:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        sums[0].add_(self.sums[0])
        sums[1].add_(self.sums[1])


def train_epoch(net, optimizer, scheduler, batches: GlobalBatches, epoch: int, proc: Process,
                step: Step, check_every: int, bar: tqdm | None, tracker: Tracker | None = None,
                log_every: int = 0):
    """One epoch of optimizer steps; returns (loss sum, correct, images) tensors of this process.

    `net` is the model, or its DDP / compiled wrapper. Losses are summed on the device and read
    back (and checked, by all processes together) every `check_every` steps and, for the
    tracker's training curves, every `log_every` steps (0: none): the hot loop has no other
    host sync. Every process must get the same `log_every` (the checks are collective), so it
    is the config's, or 0 when no process tracks. The progress bar shows the values read.
    """
    g = batches.global_batch
    rows = g // proc.world_size
    start = proc.rank * rows
    sums = (torch.zeros((), device=proc.device, dtype=torch.float64),
            torch.zeros((), device=proc.device, dtype=torch.long))
    seen = 0
    window = (0.0, 0.0, 0, time.perf_counter())  # loss sum, correct, images, time at last log
    for i, (x, y) in enumerate(batches.epoch(epoch, start, start + rows), 1):
        train_step(net, optimizer, scheduler, x, y, sums, step)
        seen += len(y)
        log_now = bool(log_every) and i % log_every == 0
        if i % check_every == 0 or log_now:
            totals = reduce_sum(torch.stack([sums[0], sums[1].double()]), proc)
            if not torch.isfinite(totals[0]):
                break
            if bar is not None:
                rate = seen * proc.world_size / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix(loss=f"{sums[0].item() / seen:.3f}",
                                acc=f"{100 * sums[1].item() / seen:.1f}", img_s=f"{rate:.0f}")
            if log_now and tracker is not None and tracker.run is not None:
                window = log_window(tracker, window, totals.tolist(), seen * proc.world_size,
                                    epoch, i, len(batches), g, scheduler.get_last_lr()[0])
        if bar is not None:
            bar.update(1)
    return sums[0], sums[1], torch.tensor(seen, device=proc.device)


def log_window(tracker: Tracker, window: tuple, totals: list[float], images: int, epoch: int,
               i: int, steps: int, global_batch: int, lr: float) -> tuple:
    """Training curves between epochs: loss, accuracy and throughput over the steps since the
    last log, against the images seen (and the fractional epoch)."""
    loss0, correct0, images0, t0 = window
    now, n = time.perf_counter(), images - images0
    tracker.log({"step/train_loss": (totals[0] - loss0) / n,
                 "step/train_acc": 100.0 * (totals[1] - correct0) / n,
                 "step/lr": lr, "step/images_per_sec": n / max(now - t0, 1e-9),
                 "images_seen": (epoch * steps + i) * global_batch,
                 "epoch": epoch + i / steps})
    return totals[0], totals[1], images, now


@torch.no_grad()
def evaluate(model, split, mean, std, batch_size: int, proc: Process,
             memory_format: torch.memory_format = torch.contiguous_format,
             desc: str | None = None):
    """Loss and accuracy over the whole test set, each image exactly once across processes.
    desc: show a progress bar of this process's images under that title (None: no bar)."""
    model.eval()
    sums = torch.zeros(3, device=proc.device, dtype=torch.float64)
    lo, hi = shard_bounds(len(split), proc.rank, proc.world_size)
    bar = tqdm(total=hi - lo, desc=desc, unit="img", leave=False, dynamic_ncols=True) \
        if desc is not None else None
    for x, y in eval_batches(split, batch_size, mean, std, proc.device, proc.rank,
                             proc.world_size):
        out = model(x.contiguous(memory_format=memory_format))
        sums[0] += F.cross_entropy(out, y, reduction="sum")
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += len(y)
        if bar is not None:
            bar.update(len(y))
    if bar is not None:
        bar.close()
    model.train()
    reduce_sum(sums, proc)
    loss, correct, n = sums.tolist()
    return loss / n, 100.0 * correct / n


def probe(model, split, mean, std, virtual_devices: int, proc: Process) -> dict:
    """Beyond-BatchNorm probes (engine.diagnostics) at the current weights, on a fixed batch of
    test images. Runs on rank 0 alone, on a copy of the model laid out for this process's
    virtual devices (norms.one_process_copy): re-laying out the trained model would re-create
    per-device state (mabn's windows and running variance), so the model is never touched."""
    from .diagnostics import measure

    n = virtual_devices * max(2, math.ceil(64 / virtual_devices))  # whole device-slices
    x, y = next(eval_batches(split, min(n, len(split)), mean, std, proc.device))
    m = measure(one_process_copy(model, virtual_devices), x, y)
    return {**m.summary(), "layers": [r.layer for r in m.layers],
            "activation_var": [r.activation_var for r in m.layers],
            "grad_norm": [r.grad_norm for r in m.layers]}


def reduce_sum(t: torch.Tensor, proc: Process) -> torch.Tensor:
    if proc.world_size > 1:
        dist.all_reduce(t, group=proc.group)
    return t


@torch.no_grad()
def sync_buffers(model, proc: Process) -> None:
    """Make every process's buffers the same, before evaluating and saving a checkpoint.

    Floating-point buffers (BN running statistics) are averaged: each process updates its copy
    from its own devices' batches, and the update is linear, so one average before use equals
    averaging every step, as virtual devices do (norms/batchnorm.py). Synchronised buffers
    (syncbn, bcn, brn) are equal everywhere and stay so. Per-device buffers (a layer's
    `per_device_buffers`, dim 0 the device index: MABN's moving averages) are gathered: each
    process contributes its own rows. One all-reduce for all of them.
    """
    if proc.world_size == 1:
        return
    per_device = {id(getattr(m, name)): getattr(m, name) for m in model.modules()
                  if isinstance(m, DeviceAware) for name in m.per_device_buffers}
    averaged = [b for b in model.buffers() if b.is_floating_point() and id(b) not in per_device]
    gathered = list(per_device.values())
    parts = [b.flatten() for b in averaged]
    for b in gathered:  # this process's rows, zeros elsewhere: the sum gathers every row
        rows = b.shape[0] // proc.world_size
        mine = torch.zeros_like(b)
        mine[proc.rank * rows:(proc.rank + 1) * rows] = b[proc.rank * rows:(proc.rank + 1) * rows]
        parts.append(mine.flatten())
    if parts:
        flat = reduce_sum(torch.cat(parts), proc)
        values = flat.split([b.numel() for b in averaged + gathered])
        for i, (b, value) in enumerate(zip(averaged + gathered, values)):
            b.copy_((value / proc.world_size if i < len(averaged) else value).view_as(b))


# ---------------------------------------------------------------- the run


class Interrupted(Exception):
    """Ctrl-C (or a signal to a DDP job): str() is one line saying how to resume."""


class CtrlC:
    """SIGINT raises KeyboardInterrupt as usual, and is remembered: Python drops an exception
    raised inside a finalizer ("Exception ignored in ..."), so a Ctrl-C landing in one would let
    the run go on to its end; `check()` at each epoch's end raises it then. Installed only in
    the main thread over Python's default handler (not over a launcher's own)."""

    def __init__(self):
        self.pressed, self.previous = False, None

    def install(self) -> None:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous = signal.signal(signal.SIGINT, self._pressed)

    def _pressed(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] = (),
        proc: Process | None = None) -> dict:
    """Train (or resume, or skip a finished run) and return the summary.

    The order is what a user sees: the data is loaded and checked first; then the run folder
    is taken (one process per folder, engine/rundir.py), and only then does its record decide:
    finished with the same identity, nothing to do; another identity, refused naming the keys
    that differ; a checkpoint, resume."""
    proc = proc or Process(device=pick_device(cfg.trainer.device))
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if proc.device.type == "cpu" and cfg.trainer.keep_freed_memory:
        keep_freed_memory()
    data = load_dataset(cfg.data.name, cfg.data.root, download=cfg.data.download,
                        train_subset=cfg.data.train_subset, train_size=cfg.data.train_size,
                        test_size=cfg.data.test_size, seed=cfg.seed, cache_dir=cfg.data.cache_dir)
    g = global_batch(cfg)
    if g > len(data.train):
        raise ConfigError(f"global batch {g} (batch_size_per_device x devices x virtual_devices "
                          f"x accumulate) exceeds the {len(data.train)} training images; "
                          "lower it or use more data (data.train_subset)")
    ident = {**identity(cfg), **data_identity(data)}
    record = RunRecord(run_dir)
    with RunLock(run_dir) if proc.is_main else nullcontext():
        done = finished_run(record, cfg, ident)
        if done is not None:
            return done
        state = resume_state(record, ident)
        return train(cfg, data, record, ident, describe(cfg, overrides), state, proc)


def data_identity(data) -> dict:
    """The data's part of the identity: a fingerprint of what was loaded, not its path."""
    fingerprint = getattr(data, "fingerprint", None)
    return {"data.fingerprint": fingerprint} if fingerprint else {}


def finished_run(record: RunRecord, cfg: DictConfig, ident: dict) -> dict | None:
    """The summary of a finished run of this identity (nothing to do), or None to train;
    refuses a folder holding another run, or any run with trainer.resume=false."""
    done = record.read_summary()
    if not cfg.trainer.resume and (done or record.checkpoint.exists()):
        found = record.checkpoint if record.checkpoint.exists() else record.dir / "summary.json"
        raise checkpoint.CheckpointError(
            f"{found} exists and trainer.resume=false: starting afresh would overwrite it; "
            "move it away or set hydra.run.dir to another folder")
    if done and done.get("status") in ("completed", "diverged"):
        if problem := checkpoint.identity_problem(done.get("identity")):
            raise checkpoint.CheckpointError(
                f"{record.dir / 'summary.json'} records a finished run but cannot show that it "
                f"is this run ({problem}); {checkpoint.MOVE_AWAY}")
        if checkpoint.same_run(done["identity"], ident):
            raise checkpoint.CheckpointError(
                f"{record.dir / 'summary.json'} records a finished run with another config ("
                f"{checkpoint.describe_difference(done['identity'], ident)}); set "
                "hydra.run.dir to another folder")
        log.info("%s: already %s (test_acc %.2f); nothing to do", record.dir, done["status"],
                 done.get("test_acc") or float("nan"))
        return done
    return None


def resume_state(record: RunRecord, ident: dict) -> dict | None:
    if not record.checkpoint.exists():
        return None
    state = checkpoint.load(record.checkpoint)
    checkpoint.check_compatible(record.checkpoint, state["identity"], ident)
    return state


def restore(state: dict, path: Path, model, optimizer, scheduler, step: Step,
            steps_per_epoch: int) -> None:
    """Load a checkpoint's states; one line naming the file if they do not fit this run (the
    scheduler's step count included: the lr schedule would resume elsewhere)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if step.scaler is not None and "scaler" in state:
            step.scaler.load_state_dict(state["scaler"])
        if scheduler.last_epoch != state["epoch"] * steps_per_epoch:
            raise ValueError(f"its lr schedule is at step {scheduler.last_epoch!r}, not "
                             f"{state['epoch'] * steps_per_epoch} (epoch {state['epoch']})")
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} does not fit this run's model or optimizer "
            f"({checkpoint.first_line(e)}); {checkpoint.MOVE_AWAY}") from None


@contextmanager
def record_write(record: RunRecord, when: str, kept_epoch: int):
    """A failed write of the run record (disk full, a file-size limit) is one line saying
    when, and which checkpoint the folder still holds (epoch `kept_epoch`; 0: none)."""
    try:
        yield
    except OSError as e:
        kept = (f"the checkpoint of epoch {kept_epoch} is kept" if kept_epoch > 0
                else "no checkpoint was kept")
        raise checkpoint.CheckpointError(
            f"cannot write the run record in {record.dir} ({e.strerror or e}) {when}; {kept}: "
            "free space (or raise the file-size limit) and re-run the same command to resume"
        ) from None


def write_history(record: RunRecord, history: list[dict], probe_history: list[dict]) -> None:
    record.write_metrics(history)
    if probe_history:
        record.write_metrics(probe_history, "probes.jsonl")


def save_epoch(record: RunRecord, state: dict, history: list[dict],
               probe_history: list[dict]) -> None:
    """The checkpoint, then the metrics of a finished epoch (a resume rewrites the metrics
    from the checkpoint, so a failure between the two loses nothing)."""
    epoch = state["epoch"]
    with record_write(record, f"after epoch {epoch}", epoch - 1):
        checkpoint.save(record.checkpoint, state)
    with record_write(record, f"after epoch {epoch}", epoch):
        write_history(record, history, probe_history)


def warn_unreached_schedule(cfg: DictConfig, total_steps: int) -> None:
    """A step schedule that starts after the run ends is legal but rarely meant: BRN with the
    paper's 5,000 steps on a 1,248-step run is plain BN throughout. Say so before training."""
    start = norm_options(cfg, total_steps).get("renorm_from")
    if start is not None and start >= total_steps:
        log.warning("norm.renorm_from=%s is at or after this run's last optimizer step (%d): "
                    "%s keeps r = 1 (and d = 0) throughout; norm.schedule_unit=run gives the "
                    "schedule as fractions of the run", cfg.norm.renorm_from, total_steps,
                    cfg.norm.name)


def train(cfg: DictConfig, data, record: RunRecord, ident: dict, info: dict,
          state: dict | None, proc: Process) -> dict:
    """Build the model and optimizer, restore `state` if any, train the remaining epochs
    (evaluate, checkpoint and record each), and write the summary."""
    t = cfg.trainer
    g = global_batch(cfg)
    batches = GlobalBatches(data.train, g, data.mean, data.std, proc.device,
                            augment=cfg.data.augment, seed=cfg.seed)
    steps = len(batches)

    seed_everything(cfg.seed)
    norm, options = model_norm(cfg, total_steps=t.epochs * steps)
    model = build_model(cfg.model.arch, cfg.model.depth, norm=norm, ws=cfg.norm.ws,
                        num_classes=len(data.classes),
                        zero_init_residual=cfg.model.zero_init_residual, **options)
    warn_unreached_schedule(cfg, t.epochs * steps)
    model.to(proc.device, memory_format=torch.channels_last if t.channels_last
             else torch.preserve_format)
    configure_devices(model, t.virtual_devices, proc.group, t.accumulate)
    step = Step.from_config(t, proc)
    if cfg.optim.agc is not None:
        step.clip = partial(adaptive_clip_grad_, clipped_parameters(model), cfg.optim.agc,
                            cfg.optim.agc_eps)
    net = model
    if proc.world_size > 1:
        # Buffers are averaged before use instead of broadcast from rank 0 every step.
        net = DistributedDataParallel(
            model, device_ids=[proc.device] if proc.device.type == "cuda" else None,
            forward_sync_buffers=False)
    if t.compile:
        net = torch.compile(net)  # the training forward; eval and probes stay eager

    lr = cfg.optim.lr * (g / 128 if cfg.optim.scale_lr else 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0,
                                weight_decay=cfg.optim.weight_decay)
    schedule = WarmupCosine(round(cfg.optim.warmup_epochs * steps), t.epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    history, probe_history, first_epoch, elapsed0 = [], [], 0, 0.0
    if state is not None:
        restore(state, record.checkpoint, model, optimizer, scheduler, step, steps)
        history, first_epoch, elapsed0 = state["history"], state["epoch"], state["elapsed_s"]
        probe_history = state.get("probes", [])

    if proc.is_main:
        record.remove_temporaries()
        with record_write(record, "before training", first_epoch):
            record.write_config(OmegaConf.to_container(cfg, resolve=True))
            record.attach_log()
            if state is not None:  # the checkpoint is the record: a kill right after its
                write_history(record, history, probe_history)  # write left these behind
    if state is not None:  # after attach_log: train.log says it too
        log.info("resuming from %s (epoch %d/%d done)", record.checkpoint, first_epoch,
                 t.epochs)
    tracker = Tracker(cfg.logger, record.dir, {**info, **ident}, cfg.logger.group or cfg.name,
                      proc.is_main)
    log.info("%s%d %s | b=%d x %d device(s) x %d virtual x %d accumulate = %d | lr %.4g | "
             "%d steps/epoch | %s", cfg.model.arch, cfg.model.depth, norm_label(cfg),
             cfg.batch_size_per_device, t.devices, t.virtual_devices, t.accumulate, g, lr, steps,
             proc.device)

    # Curves cost a check (a host sync) at each log point: none when no process tracks.
    log_every = cfg.logger.log_every if cfg.logger.mode != "disabled" else 0
    status, started = "completed", time.perf_counter() - elapsed0
    epoch = first_epoch
    ctrl_c = CtrlC()
    try:
        ctrl_c.install()
        for epoch in range(first_epoch, t.epochs):
            show = proc.is_main and t.progress and sys.stderr.isatty()
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False,
                       disable=not show, dynamic_ncols=True) if show else None
            tic = time.perf_counter()
            sums = train_epoch(net, optimizer, scheduler, batches, epoch, proc, step,
                               t.check_every, bar, tracker, log_every)
            train_time = time.perf_counter() - tic
            if bar is not None:
                bar.close()
            loss_sum, correct, seen = (reduce_sum(s.double(), proc) for s in sums)
            train_loss = (loss_sum / seen).item()
            if not math.isfinite(train_loss):
                status = "diverged"
                log.warning("epoch %d: non-finite training loss; stopping (status diverged)",
                            epoch + 1)
                break
            sync_buffers(model, proc)
            test_loss, test_acc = evaluate(model, data.test, data.mean, data.std,
                                           cfg.data.eval_batch_size, proc, step.memory_format,
                                           f"epoch {epoch + 1}/{t.epochs} test" if show else None)
            metrics = {"epoch": epoch + 1, "train_loss": train_loss,
                       "train_acc": 100.0 * (correct / seen).item(), "test_loss": test_loss,
                       "test_acc": test_acc, "lr": scheduler.get_last_lr()[0],
                       "images_per_sec": seen.item() / train_time,
                       "elapsed_s": time.perf_counter() - started}
            history.append(metrics)
            if t.probe_every and (epoch + 1) % t.probe_every == 0 and proc.is_main:
                probes = probe(model, data.test, data.mean, data.std, t.virtual_devices, proc)
                probe_history.append({"epoch": epoch + 1, **probes})
                tracker.log({"epoch": epoch + 1, **{f"probe/{k}": v for k, v in probes.items()
                                                    if isinstance(v, float)}})
            if proc.is_main:
                scaler = {} if step.scaler is None else {"scaler": step.scaler.state_dict()}
                save_epoch(record, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1, "history": history, "probes": probe_history,
                    "elapsed_s": metrics["elapsed_s"], "identity": ident, **scaler},
                    history, probe_history)
            tracker.log({**metrics, "test_error": 100.0 - test_acc,  # what the study plots
                         "images_seen": (epoch + 1) * steps * g})
            log.info("epoch %d/%d  train loss %.4f acc %.2f | test loss %.4f acc %.2f | "
                     "%.0f img/s", epoch + 1, t.epochs, train_loss, metrics["train_acc"],
                     test_loss, test_acc, metrics["images_per_sec"])
            ctrl_c.check()  # a Ctrl-C that a finalizer swallowed
        summary = make_summary(status, history, time.perf_counter() - started, info, ident)
        if proc.is_main:
            with record_write(record, "at the end", len(history)):
                record.write_summary(summary)
        tracker.finish({k: v for k, v in summary.items() if k != "identity"})
    except KeyboardInterrupt:
        tracker.finish(exit_code=130)
        raise Interrupted(f"interrupted; re-run the same command to resume from epoch "
                          f"{len(history)} ({record.checkpoint})" if history else
                          "interrupted before the first checkpoint; re-run the same command to "
                          "start again") from None
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    finally:
        ctrl_c.restore()
        if proc.is_main:
            record.detach_log()
    return summary


def make_summary(status: str, history: list[dict], wall_time: float, info: dict,
                 ident: dict) -> dict:
    last = history[-1] if history else {}
    return {"status": status, "test_acc": last.get("test_acc"),
            "best_test_acc": max((m["test_acc"] for m in history), default=None),
            "test_loss": last.get("test_loss"), "train_loss": last.get("train_loss"),
            "epochs_completed": len(history),
            "images_per_sec": (sum(m["images_per_sec"] for m in history) / len(history)
                               if history else None),
            "wall_time_s": wall_time, **info, "identity": ident}
