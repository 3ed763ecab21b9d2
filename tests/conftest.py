import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from engine.config import register

ROOT = Path(__file__).resolve().parents[1]
SHARED_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

register()

if os.environ.get("PYTEST_XDIST_WORKER"):  # make test: a worker per core; torch's own threads
    import torch                            # would then contend for the same cores
    torch.set_num_threads(1)


def make_cfg(*overrides: str):
    """Compose configs/ with Hydra's compose API, as train.py would."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@contextmanager
def gloo_rank(rank: int, init_file: str, world: int = 2):
    """One rank of a gloo group over a file store, for tests' spawned processes. It leaves
    through the engine's shutdown(), which frees the group before Python exits (a group freed
    at exit can abort the process): create what holds the group in a function called inside
    the block, so that it is gone when the block ends."""
    import torch
    import torch.distributed as dist

    from engine.distributed import shutdown
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    try:
        yield
        dist.barrier()  # neither leaves while the other's gloo threads still talk to it
    finally:
        shutdown()


# Small and fast: a learnable generated data set, ResNet-8, one CPU thread.
TINY = ("data=synthetic", "data.train_size=256", "data.test_size=64", "model.depth=8",
        "batch_size_per_device=32", "trainer.epochs=2", "logger.mode=disabled",
        "trainer.num_threads=1", "trainer.device=cpu")

# Every norm whose statistics depend on the batch (a DeviceAware layer), as `norm=` overrides
# (tests/test_train.py checks that the list is complete).
BATCH_DEPENDENT = ("bn", "syncbn", "bcn_ws", "bcn_ws norm.sync_stats=false", "brn", "evonorm_b0",
                   "mabn", "online", "cbn")


def run_cli(*args: str, cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """python train.py ARGS in `cwd` (outputs land there), one thread, captured output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "WANDB_MODE": ""}
    env.pop("WANDB_MODE")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_ran_at_once(run_dirs) -> None:
    """The sweep jobs' lifetimes overlap: each job starts (takes its folder's lock, the first
    thing a job writes) before every other one ends (summary.json written). Jobs run one after
    another fail. (The start of training, config.yaml, was too late a mark: a tiny job's
    training can be shorter than the skew of two DDP jobs' start-ups.)"""
    spans = [((d / ".lock").stat().st_mtime, (d / "summary.json").stat().st_mtime)
             for d in run_dirs]
    assert len(spans) >= 2 and max(s for s, _ in spans) < min(e for _, e in spans), spans


@pytest.fixture(scope="session")
def real_cifar10(tmp_path_factory) -> tuple[Path, Path]:
    """(archive, cache dir): the real CIFAR-10 archive decoded once per test session into a
    cache the real-data tests share (decoding its 60,000 JPEGs is most of their time)."""
    if not SHARED_TAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_TAR}")
    from engine.data import load_dataset

    cache = tmp_path_factory.mktemp("cifar10-cache")
    load_dataset("cifar10", str(SHARED_TAR), cache_dir=str(cache))
    return SHARED_TAR, cache
