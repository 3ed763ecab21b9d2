"""What every data module shares: the error a user can cause, one in-memory split, and the
image facts (CIFAR images are 32x32 RGB; training crops pad them by 4 pixels)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32
PAD = 4  # RandomCrop(32, padding=4)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """A user-caused data problem; str(e) is one clear line naming the config key (e.g.
    data.root), the bad value and what is allowed/expected."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, 32, 32], contiguous
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def mix_seed(*parts) -> int:
    """Deterministic (Python-version independent) 63-bit seed from a tuple of ints/strings."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")
