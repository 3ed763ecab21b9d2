"""The seam between batch-dependent layers and the engine's device layout.

A model never knows how many devices share its batch. The engine tells the layers whose
statistics depend on the batch (bn, syncbn, bcn) with `configure_devices`:

- `virtual_devices` K: the process's batch holds K device-slices of equal size, stacked along
  dim 0 (slice r = rows [r*b, (r+1)*b)). Per-device statistics are taken per slice.
- `process_group`: the torch.distributed group holding the other processes' devices, over which
  synchronised statistics (syncbn, bcn) are reduced. None means this process only.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn


class DeviceAware:
    """Mixin for layers whose statistics depend on how the batch splits into devices."""

    virtual_devices: int = 1
    process_group: object | None = None

    def world_size(self) -> int:
        """Number of processes whose devices share synchronised statistics."""
        if self.process_group is None or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def rank(self) -> int:
        return dist.get_rank(self.process_group) if self.world_size() > 1 else 0

    def devices_changed(self) -> None:
        """Called by configure_devices; layers with per-device state resize it here."""


def configure_devices(model: nn.Module, virtual_devices: int = 1, process_group=None) -> int:
    """Tell every batch-dependent layer in `model` the device layout; returns how many there are."""
    if not isinstance(virtual_devices, int) or virtual_devices < 1:
        raise ValueError(f"virtual_devices={virtual_devices!r}: expected an integer >= 1")
    layers = [m for m in model.modules() if isinstance(m, DeviceAware)]
    for m in layers:
        m.virtual_devices = virtual_devices
        m.process_group = process_group
        m.devices_changed()
    return len(layers)
