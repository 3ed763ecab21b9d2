"""Checkpoints: written atomically, read with weights_only=True, never silently replaced."""
from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """An unreadable or incompatible run state (checkpoint, summary); str() is one line naming
    the file."""


# What engine.loop.run saves and needs to resume. Checkpoints written before the RNG state was
# dropped (nothing in training draws from the global generators) hold an "rng" entry too: it is
# ignored, so they still resume.
KEYS = frozenset({"model", "optimizer", "scheduler", "epoch", "history", "elapsed_s",
                  "identity"})


def save(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, not a checkpoint, unsafe pickle
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            "; move it away to start over, or set hydra.run.dir to another folder") from None
    missing = sorted(KEYS - set(state)) if isinstance(state, dict) else sorted(KEYS)
    if missing or not state["identity"]:
        raise CheckpointError(f"checkpoint {path} is not a run checkpoint of this project "
                              f"(missing {', '.join(missing) or 'identity'}); move it away to "
                              "start over, or set hydra.run.dir to another folder")
    return state


def same_run(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ. Keys only one side knows (added to the schema later, with a
    default that keeps the old behaviour) do not count: old runs stay resumable."""
    return [k for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]


def check_compatible(path: Path, saved: dict, current: dict) -> None:
    """The run being resumed must be the same experiment, key for key."""
    diff = same_run(saved, current)
    if diff:
        k = diff[0]
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run ({k}: {saved.get(k)!r} there, "
            f"{current.get(k)!r} now); set hydra.run.dir to another folder")
