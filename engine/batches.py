"""Training and evaluation batches served from memory on the training device.

The whole data set (CIFAR-10/100: 60k images of 3x32x32 bytes, ~180 MB) is held as one uint8
tensor and uploaded to the training device once.  Training batches are then produced with a
handful of batched tensor ops on that device (gather rows, random crop via index arithmetic,
flip via index reversal, float conversion, normalisation).  There is no DataLoader: at 1-2 images
per device per step, a DataLoader's per-sample Python work (``__getitem__``, PIL transforms,
collation, pinning, worker IPC) costs far more than the forward/backward pass itself and would
dominate the measurements this project is about.

Determinism across device counts: every epoch's permutation and *all* augmentation parameters
(crop offsets, flips) are drawn for the GLOBAL batch on the CPU from a generator seeded by
``(seed, epoch)``.  A rank only gathers and augments its own rows ``[start:stop)`` of each global
batch, so the rows it sees are bit-identical to the same rows of the undivided batch: the same run
on 1, 2 or 8 devices consumes exactly the same images with the same augmentation.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .datatypes import IMAGE_SIZE, PAD, DataError, Split, mix_seed

__all__ = ["GlobalBatches", "augmentation_params", "crop_flip", "crop_flip_rows", "normalize",
           "eval_batches", "shard_bounds"]


def _as_stats(v, device) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 ``(x/255 - mean) / std`` (mean/std shaped [1,3,1,1])."""
    return x_uint8.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def augmentation_params(seed: int, epoch: int, n: int, global_batch: int):
    """The epoch's draws for the whole global batch, on the CPU.

    Returns ``(index, dy, dx, flip)``, each shaped ``[steps, global_batch]`` with
    ``steps = n // global_batch``: image indices (a permutation prefix), crop offsets in
    ``0..2*PAD`` into the zero-padded 40x40 image, and horizontal-flip flags.  Drawn in this order
    from ``torch.Generator().manual_seed(mix(seed, epoch))``.
    """
    steps = n // global_batch
    g = torch.Generator().manual_seed(mix_seed("epoch", int(seed), int(epoch)))
    perm = torch.randperm(n, generator=g)[: steps * global_batch].view(steps, global_batch)
    dy = torch.randint(0, 2 * PAD + 1, (steps, global_batch), generator=g)
    dx = torch.randint(0, 2 * PAD + 1, (steps, global_batch), generator=g)
    flip = torch.randint(0, 2, (steps, global_batch), generator=g).bool()
    return perm, dy, dx, flip


def crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = PAD,
    size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding=pad)`` (zero fill) + optional horizontal flip.

    Row i of the result is ``flip_i ? hflip(P_i[:, dy_i:dy_i+size, dx_i:dx_i+size]) : P_i[...]``
    where ``P_i`` is ``x[i]`` zero-padded by ``pad`` on every side.  Works on any dtype/device;
    dy/dx/flip must be on ``x``'s device.
    """
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    return crop_flip_rows(x, torch.arange(len(x), device=x.device), dy, dx, flip, size)


def crop_flip_rows(padded: torch.Tensor, rows: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                   flip: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Rows ``rows`` of the already padded ``padded``, cropped at (dy, dx) and flipped where
    ``flip``: one gather of whole ``size``-pixel lines from a view of every window (3x faster
    on the CPU than indexing pixel by pixel, and one kernel on a GPU), then the flips."""
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # [N, C, H-size+1, W-size+1, s, s]
    x = windows[rows, :, dy, dx]  # [b, C, size, size]
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


class GlobalBatches:
    """Training batches served from memory on `device` with batched augmentation (no DataLoader).
    The epoch's order and augmentation are drawn for the GLOBAL batch from a generator seeded
    by (seed, epoch), so any split of the global batch into devices sees the same images.

    ``epoch(e, start, stop)`` yields, per step, float32 normalised images ``[stop-start,3,32,32]``
    and int64 labels of rows ``[start:stop)`` of each global batch (DDP rank r of W: rows
    ``[r*g//W, (r+1)*g//W)``).  ``augment=False`` keeps the shuffle but skips crop/flip.
    """

    def __init__(self, split: Split, global_batch: int, mean, std, device, augment: bool = True,
                 seed: int = 0):
        n = len(split)
        if not 1 <= int(global_batch) <= n:
            raise DataError(
                f"global batch size {global_batch} must be between 1 and the number of training "
                f"images ({n})"
            )
        self.device = torch.device(device)
        images = split.images.to(self.device).contiguous()  # uploaded once
        # Augmenting: zero-padded once (not every step), each step gathers its crops from it.
        self.images = F.pad(images, (PAD,) * 4) if augment else images
        self.labels = split.labels.to(self.device, torch.int64)
        self.n = n
        self.global_batch = int(global_batch)
        self.mean = _as_stats(mean, self.device)
        self.std = _as_stats(std, self.device)
        self.augment = bool(augment)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.n // self.global_batch

    def epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stop = self.global_batch if stop is None else int(stop)
        start = int(start)
        if not 0 <= start < stop <= self.global_batch:
            raise ValueError(f"need 0 <= start < stop <= global_batch={self.global_batch}, got [{start}:{stop})")
        return self._iter(epoch, start, stop)

    def _iter(self, epoch, start, stop):
        perm, dy, dx, flip = augmentation_params(self.seed, epoch, self.n, self.global_batch)
        dev = self.device
        perm = perm[:, start:stop].to(dev, non_blocking=True)
        dy = dy[:, start:stop].to(dev, non_blocking=True)
        dx = dx[:, start:stop].to(dev, non_blocking=True)
        flip = flip[:, start:stop].to(dev, non_blocking=True)
        for s in range(perm.shape[0]):
            idx = perm[s]
            if self.augment:
                x = crop_flip_rows(self.images, idx, dy[s], dx[s], flip[s])
            else:
                x = self.images[idx]
            yield normalize(x, self.mean, self.std), self.labels[idx]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous shard ``[lo, hi)`` of ``n`` items for ``rank`` of ``world_size``: the first
    ``n % W`` ranks get one item more, so shards differ by at most one, later ranks may be shorter
    (n=10, W=3 -> 4, 3, 3) and together they cover every index exactly once (no padding, no
    duplicates)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    q, rem = divmod(n, world_size)
    lo = rank * q + min(rank, rem)
    return lo, lo + q + (1 if rank < rem else 0)


def eval_batches(split: Split, batch_size: int, mean, std, device, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous shard of ``split`` exactly once, in order, no augmentation; the last
    batch may be short and a rank's shard may be empty when ``world_size > len(split)``
    (reduce metrics as sums over ranks, not means of means)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lo, hi = shard_bounds(len(split), rank, world_size)
    return _eval_iter(split, batch_size, mean, std, torch.device(device), lo, hi)


def _eval_iter(split, batch_size, mean, std, device, lo, hi):
    if hi <= lo:
        return
    m, s = _as_stats(mean, device), _as_stats(std, device)
    images = split.images[lo:hi].to(device)
    labels = split.labels[lo:hi].to(device, torch.int64)
    for i in range(0, hi - lo, batch_size):
        yield normalize(images[i : i + batch_size], m, s), labels[i : i + batch_size]
