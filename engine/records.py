"""The local run record: config.yaml, metrics.jsonl, summary.json in the run directory.

Needs no service; the report tool and resumed sweeps read it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from pathlib import Path

import yaml

from .checkpoint import CheckpointError
from .rundir import NotARegularFile, not_followed, open_regular, write_durably

MAX_RECORD_BYTES = 64 << 20  # summary.json, metrics.jsonl: kilobytes; a larger one is not ours


def _write_atomic(path: Path, text: str) -> None:
    write_durably(path, lambda f: f.write(text.encode()))


def code_version(root: str | os.PathLike = Path(__file__).resolve().parents[1]) -> str | None:
    """The git commit the code runs from, "+dirty" if tracked files differ from it; None
    when root is not a checkout's top level (an archive, an installed copy) or without git."""
    def git(*args: str) -> str:
        return subprocess.run(("git", "-C", str(root), *args), capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
            return None  # root lies inside some other repository
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


class RunRecord:
    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.checkpoint = self.dir / "checkpoints" / "last.pt"
        self._log_handler: logging.Handler | None = None

    def attach_log(self) -> None:
        """Append this process's log lines to train.log in the run folder (once it is ours).
        Never through a symbolic link: train.log would append to the link's target, a linked
        checkpoints/ would receive every checkpoint (the other record files are renamed over,
        which replaces a link instead of following it)."""
        path = self.dir / "train.log"
        if self.checkpoint.parent.is_symlink():
            raise CheckpointError(not_followed(self.checkpoint.parent))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise CheckpointError(not_followed(path)) from None
        handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
        handler.setFormatter(logging.Formatter(
            "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        self._log_handler = handler

    def detach_log(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler.stream.close()  # a StreamHandler leaves its stream open
            self._log_handler = None

    def write_config(self, config: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def write_metrics(self, history: list[dict], name: str = "metrics.jsonl") -> None:
        """The whole history each epoch, so the file always matches the checkpoint
        (metrics.jsonl; probes.jsonl for the Beyond-BatchNorm probes)."""
        _write_atomic(self.dir / name, "".join(json.dumps(m) + "\n" for m in history))

    def remove_temporaries(self) -> None:
        """Remove what a killed write left (write_durably's `.<name>.<hex>.tmp`): called by the
        folder's holder, so no live writer owns one."""
        for folder in (self.dir, self.checkpoint.parent):
            for tmp in folder.glob(".*.*.tmp"):
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)

    def write_summary(self, summary: dict) -> None:
        _write_atomic(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict | None:
        path = self.dir / "summary.json"
        try:
            summary = _read_json(path, json.loads)
        except NotARegularFile as e:
            raise CheckpointError(str(e)) from None
        if summary is None:
            return None
        if not isinstance(summary, dict):
            raise CheckpointError(f"{path} is not a run summary (a truncated or edited file?); "
                                  "move it away to resume from the checkpoint, or set "
                                  "hydra.run.dir to another folder")
        return summary

    def read_metrics(self) -> list[dict]:
        """Each epoch's metrics; [] if absent. NotARegularFile for a folder, FIFO, ..."""
        lines = _read_json(self.dir / "metrics.jsonl",
                           lambda text: [json.loads(x) for x in text.splitlines() if x.strip()])
        if isinstance(lines, Exception):
            raise lines
        return lines or []


def _read_json(path: Path, parse):
    """parse(text of path), None if absent; an unreadable or nested-without-end text is the
    exception itself (a summary: "not a run summary"); NotARegularFile for a folder, FIFO, ..."""
    f = open_regular(path, MAX_RECORD_BYTES)
    if f is None:
        return None
    with f:
        data = f.read()
    try:
        return parse(data.decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return e
