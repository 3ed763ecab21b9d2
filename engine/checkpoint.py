"""Checkpoints: written durably (engine/rundir.py), read with weights_only=True, checked for
the structure the run needs, never silently replaced."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from .rundir import NotARegularFile, open_regular, write_durably


class CheckpointError(ValueError):
    """An unreadable or incompatible run state (checkpoint, summary); str() is one line naming
    the file."""


# What engine.loop.run saves and needs to resume. Checkpoints written before the RNG state was
# dropped (nothing in training draws from the global generators) hold an "rng" entry too: it is
# ignored, so they still resume.
KEYS = frozenset({"model", "optimizer", "scheduler", "epoch", "history", "elapsed_s",
                  "identity"})


def save(path: Path, state: dict) -> None:
    """torch.save, durably: a kill or a full disk leaves the old file or the new one. Saved to
    memory first: torch.save writing to the file itself turns a full disk into a RuntimeError
    from its zip writer ('[enforce fail at inline_container.cc ...]'), not an OSError."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_durably(path, lambda f: f.write(buffer.getbuffer()))


def first_line(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, for one-line errors (an empty message too)."""
    text = (str(e).strip().splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


MOVE_AWAY = "move it away to start over, or set hydra.run.dir to another folder"
# key -> the type its value must have
TYPES = {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "history": list,
         "elapsed_s": (int, float), "identity": dict}


# Keys every identity has held since the first run record. A record or checkpoint whose
# identity lacks one cannot show that it is this run: compared key by key over the keys both
# sides know, an empty identity would match every run.
CORE_IDENTITY = ("model.arch", "model.depth", "norm.name", "batch_size_per_device", "seed",
                 "trainer.epochs")


def identity_problem(saved) -> str | None:
    """Why `saved` cannot identify a run (one phrase), or None."""
    if not isinstance(saved, dict):
        return f"its identity is {'missing' if saved is None else 'a ' + type(saved).__name__}"
    missing = [k for k in CORE_IDENTITY if k not in saved]
    return f"its identity lacks {', '.join(missing)}" if missing else None


def load(path: Path) -> dict:
    try:
        f = open_regular(path)  # a FIFO or a folder at its name: one line, never a hang
    except NotARegularFile as e:
        raise CheckpointError(f"checkpoint {e}") from None
    if f is None:
        raise CheckpointError(f"checkpoint {path} does not exist; {MOVE_AWAY}")
    try:
        with f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, corrupt, not a checkpoint, unsafe pickle
        raise CheckpointError(f"checkpoint {path} cannot be read ({first_line(e)}); "
                              f"{MOVE_AWAY}") from None
    missing = sorted(KEYS - set(state)) if isinstance(state, dict) else sorted(KEYS)
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a run checkpoint of this project "
                              f"(missing {', '.join(missing)}); {MOVE_AWAY}")
    wrong = [k for k, t in TYPES.items() if not isinstance(state[k], t)
             or (t is int and isinstance(state[k], bool))]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is not a run checkpoint of this project "
                              f"({', '.join(f'{k} is a {type(state[k]).__name__}' for k in wrong)}"
                              f"); {MOVE_AWAY}")
    if problem := identity_problem(state["identity"]) or progress_problem(state):
        raise CheckpointError(f"checkpoint {path} cannot show that it is this run ({problem}); "
                              f"{MOVE_AWAY}")
    return state


def progress_problem(state: dict) -> str | None:
    """Why a checkpoint's progress is impossible (an edited or forged file), or None: its
    epoch must be one of its run's 1..trainer.epochs, with one history entry per epoch."""
    epoch, epochs, history = state["epoch"], state["identity"]["trainer.epochs"], state["history"]
    if not isinstance(epochs, int) or not 1 <= epoch <= epochs:
        return f"epoch {epoch} is not one of its run's 1..{epochs}"
    if len(history) != epoch or any(not isinstance(m, dict) or m.get("epoch") != i + 1
                                    for i, m in enumerate(history)):
        return f"its history does not hold one entry for each of its {epoch} epochs"
    return None


def same_run(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ. Keys only one side knows (added to the schema later, with a
    default that keeps the old behaviour) do not count: old runs stay resumable."""
    return [k for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]


def describe_difference(saved: dict, current: dict) -> str:
    """`key: A there, B now; ...` for every key in which two identities differ."""
    return "; ".join(f"{k}: {saved[k]!r} there, {current[k]!r} now"
                     for k in same_run(saved, current))


def check_compatible(path: Path, saved: dict, current: dict) -> None:
    """The run being resumed must be the same experiment, key for key."""
    if same_run(saved, current):
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run ({describe_difference(saved, current)})"
            "; set hydra.run.dir to another folder")
