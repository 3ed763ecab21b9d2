"""Real devices: DDP processes launched by torchrun or by train.py itself.

- `torchrun --nproc_per_node=N train.py ...` (and multi-node: --nnodes, c10d rendezvous): each
  process runs train.py; `init_process` joins the group torchrun describes in the environment.
- `python train.py trainer.devices=N`: `self_launch` starts N workers with torch's elastic
  launch API and a c10d rendezvous on a free local port (port 0: the OS picks), so it also
  works inside Hydra multirun jobs and parallel jobs never collide.

NCCL on CUDA, gloo on CPU. A worker that dies makes the elastic agent stop the others, so the
job exits non-zero instead of hanging; re-running the command resumes from the checkpoint.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import sys
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous
from omegaconf import OmegaConf

from .config import world_size_from_env
from .loop import Interrupted, Process, pick_device

log = logging.getLogger("microbatch")
_STANDARD_METHODS = ("spawn", "fork", "forkserver")


def init_process(device: str, timeout_s: float) -> Process:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE, ...)."""
    world = world_size_from_env()
    if world == 1:
        return Process(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif not os.environ.get("OMP_NUM_THREADS"):
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    timeout = timedelta(seconds=timeout_s)
    store, rank, world = next(rendezvous("env://", timeout=timeout))
    # torchrun's agent keeps one store across --max-restarts, so the workers of a restarted
    # attempt would read the dead attempt's addresses and hang; give each attempt its own keys.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            store=dist.PrefixStore(f"microbatch/attempt_{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout,
                            device_id=dev if dev.type == "cuda" else None)
    if rank != 0:  # one voice: rank 0 logs, shows progress, writes the record
        logging.getLogger().setLevel(logging.WARNING)
    return Process(rank=rank, world_size=world, device=dev, group=dist.group.WORLD)


def shutdown() -> None:
    """Leave the process group and free it while Python is fully alive.

    Models and DDP keep the group in reference cycles, so without a collection it is freed at
    interpreter exit; a gloo worker thread still releasing its last work's tensors then takes
    the GIL during finalization and the process aborts after a finished run (SIGABRT,
    pytorch/pytorch#190489). Call it after the objects that hold the group are gone."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the group's last owner: its destructor joins the worker threads


def self_launch(cfg, run_dir: str, overrides: list[str]) -> dict:
    """Run `cfg` on trainer.devices local worker processes; returns rank 0's summary."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Inside a joblib sweep job (hydra/launcher=parallel) the process-wide start method is
    # loky's, which a spawned worker cannot re-create; give the workers the standard one.
    if multiprocessing.get_start_method(allow_none=True) not in (None, *_STANDARD_METHODS):
        multiprocessing.set_start_method("spawn", force=True)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.trainer.devices,
                          run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          start_method="spawn")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent's own log lines (closing signals, failure dumps) say what our one line says.
    # Its loggers each set their own level, so each is quietened (and restored after).
    quiet = {name: logger for name, logger in logging.root.manager.loggerDict.items()
             if name.startswith("torch.distributed") and isinstance(logger, logging.Logger)}
    levels = {name: logger.level for name, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, worker)(OmegaConf.to_container(cfg, resolve=True),
                                                 str(run_dir), list(overrides))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise WorkerFailed(f"worker rank {rank} failed ({_describe(failure)}); the job was "
                           f"stopped; re-run the same command to resume from {run_dir}/"
                           "checkpoints/last.pt") from None
    except (SignalException, KeyboardInterrupt) as e:
        why = e.sigval.name if isinstance(e, SignalException) else "SIGINT"
        raise Interrupted(f"interrupted ({why}); the workers were stopped; re-run the same "
                          f"command to resume from {run_dir}/checkpoints/last.pt") from None
    finally:
        for name, logger in quiet.items():
            logger.setLevel(levels[name])
    return results[0]


class WorkerFailed(RuntimeError):
    """A DDP worker died or raised; the others were stopped."""


def _describe(failure) -> str:
    if failure.signal_name() != "<N/A>" and failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else ""
    return f"exit code {failure.exitcode}" + (f": {message.splitlines()[0]}" if message else "")


def worker(cfg_dict: dict, run_dir: str, overrides: list[str]) -> dict:
    """Entry point of a self-launched worker (a fresh interpreter: no Hydra here)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .loop import run

    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    cfg = OmegaConf.create(cfg_dict)
    proc = init_process(cfg.trainer.device, cfg.trainer.timeout_s)
    try:
        return run(cfg, run_dir, overrides, proc)
    except (ConfigError, DataError, CheckpointError) as e:
        return {"error": str(e)}  # the launcher prints it as one line
    finally:
        shutdown()
