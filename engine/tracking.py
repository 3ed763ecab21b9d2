"""Weights & Biases on rank 0: never prompts, falls back to offline without credentials."""
from __future__ import annotations

import hashlib
import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai")
                                            .split("//")[-1])
        return auth is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """auto -> online with credentials, else offline (one warning line)."""
    if mode != "auto":
        return mode
    if has_credentials():
        return "online"
    log.warning("wandb: no credentials (WANDB_API_KEY or ~/.netrc); logging offline "
                "(`wandb sync` uploads later; logger.mode=disabled turns it off)")
    return "offline"


def default_tags(config: dict) -> list[str]:
    """Filters for the wandb dashboard: model, norm and batch per device, e.g. resnet20,
    bcn_ws, b1 (logger.tags adds more)."""
    keys = ("model", "depth", "norm_label", "batch_size_per_device")
    if not all(k in config for k in keys):
        return []
    return [f"{config['model']}{config['depth']}", config["norm_label"],
            f"b{config['batch_size_per_device']}"]


class Tracker:
    """wandb.run wrapper; a no-op when disabled or not on rank 0."""

    def __init__(self, logger_cfg, run_dir: Path, config: dict, group: str, enabled: bool):
        self.run = None
        mode = resolve_mode(logger_cfg.mode) if enabled else "disabled"
        if mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=logger_cfg.project, entity=logger_cfg.entity, group=group,
            tags=[*logger_cfg.tags, *default_tags(config)], config=config, dir=str(run_dir),
            mode=mode,
            id=run_id, resume="allow", name=Path(run_dir).name, reinit="finish_previous",
            settings=wandb.Settings(console="off", quiet=True))
        self.run.define_metric("epoch")
        self.run.define_metric("images_seen")
        self.run.define_metric("step/*", step_metric="images_seen")  # curves within epochs
        self.run.define_metric("*", step_metric="epoch")

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def finish(self, summary: dict | None = None, exit_code: int = 0) -> None:
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish(exit_code=exit_code)
            self.run = None
