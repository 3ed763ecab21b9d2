"""Train one configuration: python train.py norm=bcn_ws model=resnet model.depth=56 ...

A thin Hydra entry point: compose config -> validate -> launch -> engine.loop.run.
Launch: one process; `trainer.devices=N` self-launches N DDP workers; under torchrun every
process arrives here and joins the group torchrun set up.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, register, validate
from engine.data import DataError

register()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from engine import distributed
    from engine.loop import run

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    overrides = OmegaConf.to_container(hc.overrides.task)  # as typed, not resolved
    world = distributed.world_size_from_env()
    try:
        if world > 1:  # torchrun: the launcher decides the number of processes
            if cfg.trainer.devices not in (1, world):
                raise ConfigError(f"trainer.devices={cfg.trainer.devices} but torchrun started "
                                  f"{world} processes; allowed: {world} or leave it unset")
            cfg.trainer.devices = world
        validate(cfg)
        if world > 1:
            proc = distributed.init_process(cfg.trainer.device, cfg.trainer.timeout_s)
            try:
                return run(cfg, run_dir, overrides, proc)
            finally:
                distributed.shutdown()
        if cfg.trainer.devices > 1:
            summary = distributed.self_launch(cfg, run_dir, overrides)
            if "error" in summary:
                raise ConfigError(summary["error"])
            return summary
        return run(cfg, run_dir, overrides)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line; a traceback is for bugs
        sys.exit(2)
    except distributed.WorkerFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from engine.cli import exit_on_composition_error

    exit_on_composition_error(Path(__file__).parent / "configs", "config")
    main()
