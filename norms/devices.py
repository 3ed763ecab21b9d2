"""The seam between batch-dependent layers and the engine's device layout.

A model never knows how many devices share its batch. The engine tells the layers whose
statistics depend on the batch (bn, syncbn, bcn, brn, evonorm_b0, mabn, online) with
`configure_devices`:

- `virtual_devices` K: the process's batch holds K device-slices of equal size, stacked along
  dim 0 (slice r = rows [r*b, (r+1)*b)). Per-device statistics are taken per slice.
- `accumulate` A: an optimizer step is A training forwards (accumulation micro-steps), each of
  K devices. Layers with state per optimizer step (a step counter, a moving average) count
  forwards and advance once every A of them.
- `process_group`: the torch.distributed group holding the other processes' devices, over which
  synchronised statistics (syncbn, bcn, brn's running statistics) are reduced. None means this
  process only.

Every device of the job has one index, d = (rank * A + a) * K + k for virtual device k of
micro-step a in process `rank`: the engine's layout of the global batch. Layers whose state is
per device (MABN's moving averages, Online Norm's streams) keep it in `per_device_buffers`,
whose dim 0 is d; each process updates its own rows, and the engine gathers every process's
rows before evaluating or saving a checkpoint (`engine.loop.sync_buffers`), so a checkpoint
holds every device's state.

A measurement on one process (the probes during training) takes `one_process_copy`: a copy
laid out for that process's K devices alone, so the trained model's layout and state are never
touched (a new layout would re-create per-device state).
"""
from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn


def autocast_off(forward):
    """A norm's forward in its buffers' float32 under autocast: autocast lowers a matmul,
    einsum or convolution to bf16 even on float32 tensors, which casting x alone cannot undo."""
    @functools.wraps(forward)
    def wrapped(self, x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return forward(self, x, *args, **kwargs)
    return wrapped


def in_layout_of(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y in x's memory format. The device-slice reshapes ([K*b, C] <-> [b, K*C]) copy into
    the default layout; with trainer.channels_last the next convolution should get NHWC
    activations, not convert them itself."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y


def side_by_side(x: torch.Tensor, devices: int) -> torch.Tensor:
    """[K*b, C, *] -> [b, K*C, *]: device k's channel c becomes channel k*C + c, so per-channel
    kernels (batch_norm and its statistics) compute per device. x itself when K = 1."""
    if devices == 1:
        return x
    return x.unflatten(0, (devices, -1)).transpose(0, 1).flatten(1, 2)


def devices_apart(y: torch.Tensor, devices: int, x: torch.Tensor) -> torch.Tensor:
    """side_by_side's inverse, [b, K*C, *] -> [K*b, C, *], in x's memory format."""
    if devices > 1:
        y = y.unflatten(1, (devices, -1)).transpose(0, 1).flatten(0, 1)
    return in_layout_of(y, x)


class MicroStep(NamedTuple):
    """One training forward's place in its optimizer step."""
    rows: slice     # the device indices of its K devices
    first: bool     # the step's first forward (micro-step 0)
    last: bool      # the step's last forward


class DeviceAware:
    """Mixin for layers whose statistics depend on how the batch splits into devices."""

    virtual_devices: int = 1
    accumulate: int = 1
    process_group: object | None = None
    micro_step: int = 0            # the accumulation micro-step of the next training forward
    per_device_buffers: tuple[str, ...] = ()

    def world_size(self) -> int:
        """Number of processes whose devices share synchronised statistics."""
        if self.process_group is None or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def rank(self) -> int:
        return dist.get_rank(self.process_group) if self.world_size() > 1 else 0

    def num_devices(self) -> int:
        """Every device of the job: K virtual x A micro-steps x processes."""
        return self.virtual_devices * self.accumulate * self.world_size()

    def devices_changed(self) -> None:
        """Called by configure_devices; layers with per-device state resize it here."""

    def next_micro_step(self) -> MicroStep:
        """For layers with state per device or per optimizer step, once per training forward.
        A host-side counter: no device sync, and a step's A forwards always run in order (a
        checkpoint falls between steps, where it is 0; configure_devices resets it)."""
        a = self.micro_step
        self.micro_step = (a + 1) % self.accumulate
        first = (self.rank() * self.accumulate + a) * self.virtual_devices
        return MicroStep(slice(first, first + self.virtual_devices), a == 0,
                         a == self.accumulate - 1)


class StepAverage:
    """The average of per-device statistics over every device of an optimizer step.

    Each training forward adds its K devices' values; the step's last micro-step returns their
    mean over the A x K devices of this process, and with `sync` over every process too (one
    all-reduce), so running statistics move once per optimizer step from all its devices
    whichever way the devices are realised."""

    def __init__(self):
        self.pending: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, layer: DeviceAware, values: torch.Tensor, step: MicroStep,
            sync: bool) -> torch.Tensor | None:
        """values: [K, ...] of this forward's devices; the step's mean at its last forward."""
        total = values.sum(0)
        if layer.accumulate > 1:
            pending = None if step.first else self.pending
            self.pending = total if pending is None else pending + total
            if not step.last:
                return None
            total, self.pending = self.pending, None
        mean = total / (layer.virtual_devices * layer.accumulate)
        world = layer.world_size()
        if sync and world > 1:
            dist.all_reduce(mean, group=layer.process_group)
            mean /= world
        return mean


def configure_devices(model: nn.Module, virtual_devices: int = 1, process_group=None,
                      accumulate: int = 1) -> int:
    """Tell every batch-dependent layer in `model` the device layout; returns how many there are."""
    for key, value in (("virtual_devices", virtual_devices), ("accumulate", accumulate)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}={value!r}: expected an integer >= 1")
    layers = [m for m in model.modules() if isinstance(m, DeviceAware)]
    for m in layers:
        m.virtual_devices, m.accumulate = virtual_devices, accumulate
        m.process_group = process_group
        m.micro_step = 0
        m.devices_changed()
    return len(layers)


def one_process_copy(model: nn.Module, virtual_devices: int = 1) -> nn.Module:
    """A copy of `model` whose batch-dependent layers see `virtual_devices` devices of this
    process only (no accumulation, no process group); its per-device state is the rows of
    devices 0..K-1 (rank 0, micro-step 0). `model` itself is left exactly as it was."""
    layers = [m for m in model.modules() if isinstance(m, DeviceAware)]
    # A process group is not copyable and the copy must not use it: map it to None.
    twin = copy.deepcopy(model, {id(m.process_group): None for m in layers})
    for m in twin.modules():
        if isinstance(m, DeviceAware):
            for name in m.per_device_buffers:
                setattr(m, name, getattr(m, name)[:virtual_devices].clone())
    configure_devices(twin, virtual_devices)
    return twin
