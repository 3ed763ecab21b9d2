"""Train one configuration: python train.py norm=bcn_ws model=resnet model.depth=56 ...

A thin Hydra entry point: compose config -> validate -> launch -> engine.loop.run.
Launch: one process; `trainer.devices=N` self-launches N DDP workers; under torchrun every
process arrives here and joins the group torchrun set up.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, check_data_root, register, validate
from engine.data import DataError
from engine.rundir import RunLock, RunLocked

register()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from engine import distributed
    from engine.loop import Interrupted, run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = OmegaConf.to_container(hc.overrides.task)  # as typed, not resolved
    world = distributed.world_size_from_env()
    fresh = not run_dir.exists() or not any(run_dir.iterdir())  # Hydra made it for this job
    try:
        if world > 1:  # torchrun: the launcher decides the number of processes
            if cfg.trainer.devices not in (1, world):
                raise ConfigError(f"trainer.devices={cfg.trainer.devices} but torchrun started "
                                  f"{world} processes; allowed: {world} or leave it unset")
            cfg.trainer.devices = world
        preflight(cfg)
        if world > 1:
            proc = distributed.init_process(cfg.trainer.device, cfg.trainer.timeout_s)
            try:
                return run(cfg, run_dir, overrides, proc)
            finally:
                distributed.shutdown()
        if cfg.trainer.devices > 1:
            with RunLock(run_dir):  # the workers share it (engine/rundir.py)
                summary = distributed.self_launch(cfg, run_dir, overrides)
            if "error" in summary:
                raise ConfigError(summary["error"])
            return summary
        return run(cfg, run_dir, overrides)
    except ConfigError as e:
        if hc.mode == RunMode.MULTIRUN and cfg.skip_invalid_jobs:
            print(f"skipping job {' '.join(overrides)}: {e}", file=sys.stderr)
            remove_if_fresh(run_dir, fresh)
            return None
        fail(e, 2, run_dir, fresh)
    except (DataError, CheckpointError) as e:
        fail(e, 2, run_dir, fresh)
    except (distributed.WorkerFailed, RunLocked) as e:
        fail(e, 1, run_dir, fresh)
    except (Interrupted, KeyboardInterrupt) as e:
        fail(e if isinstance(e, Interrupted) else "interrupted", 130, run_dir, fresh)


def preflight(cfg: DictConfig) -> None:
    """The config (validate), then the data.root it names (check_data_root)."""
    validate(cfg)
    check_data_root(cfg)


def fail(error, status: int, run_dir: Path, fresh: bool) -> None:
    """One line (a traceback is for bugs) and the exit status."""
    print(f"error: {error}" if status != 130 else str(error), file=sys.stderr)
    remove_if_fresh(run_dir, fresh)
    sys.exit(status)


def remove_if_fresh(run_dir: Path, fresh: bool) -> None:
    """A folder Hydra made for a refused job goes again: a refused run leaves nothing behind
    (rank 0 only: under torchrun the other ranks share the folder). Only under the folder's
    lock: another process may hold it, having written nothing yet (a DDP parent while its
    workers start); then the folder is its, and stays."""
    if fresh and os.environ.get("RANK", "0") == "0" and run_dir.is_dir():
        with contextlib.suppress(RunLocked), RunLock(run_dir):
            pass  # release() removes the folder if nothing but the lock was written


if __name__ == "__main__":
    from engine.cli import exit_on_composition_error

    invalid = exit_on_composition_error(Path(__file__).parent / "configs", "config", preflight)
    main()
    if invalid:
        print(f"{len(invalid)} invalid job(s) skipped (skip_invalid_jobs=true):", file=sys.stderr)
        for line in invalid:
            print(f"  {line}", file=sys.stderr)
