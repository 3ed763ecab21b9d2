"""Train one configuration: python train.py norm=bcn_ws model=resnet model.depth=56 ...

A thin Hydra entry point: compose config -> validate -> run. Everything else is in engine/.
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, register, validate
from engine.data import DataError

register()
log = logging.getLogger("microbatch")


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    try:
        validate(cfg)
        from engine.loop import run  # after validation: bad input fails fast
        return run(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task))
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line; a traceback is for bugs
        sys.exit(2)


if __name__ == "__main__":
    main()
