"""Multi-device training with real processes (gloo on CPU): both launch ways, the same maths
as virtual devices and accumulation, DDP sweep jobs, and a killed worker."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint
from engine.loop import run

from conftest import BATCH_DEPENDENT, ROOT, TINY, assert_ran_at_once, make_cfg, run_cli

SMALL = (*TINY, "batch_size_per_device=8", "trainer.epochs=2")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: list[dict], b: list[dict], train_only=False, rel=1e-4):
    """Equal up to float rounding: summation orders differ between realisations and the
    differences grow with training. Measured after 2 epochs: at most 2.5e-5 (train loss) and
    2e-5 (test loss) relative, against 5e-3 and 1.7e-3 between BN over 2 devices and BN over
    their joint batch (the control below)."""
    assert len(a) == len(b) > 0
    for ma, mb in zip(a, b):
        assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=rel)
        if not train_only:
            assert ma["test_loss"] == pytest.approx(mb["test_loss"], rel=2 * rel)


# Long enough to kill a worker mid-run: 32 steps an epoch of 2 processes x 16 images.
KILL = (*TINY, "batch_size_per_device=16", "data.train_size=1024", "trainer.epochs=3")


def torchrun(*args: str, cwd: Path, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", *args], cwd=cwd, env=env, text=True, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One 2-process DDP job (KILL), launched by train.py (`self`) and by torchrun
    (`torchrun`), never interrupted: the references of the killed jobs below."""
    d = tmp_path_factory.mktemp("uninterrupted")
    res = run_cli(*KILL, "trainer.devices=2", "hydra.run.dir=self", cwd=d)
    assert res.returncode == 0, res.stderr[-3000:]
    tr = torchrun(str(ROOT / "train.py"), *KILL, "hydra.run.dir=torchrun", cwd=d,
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = tr.communicate(timeout=300)
    assert tr.returncode == 0, out[-3000:]
    return d


def assert_same_end(run_dir: Path, ref_dir: Path) -> None:
    """The same weights, buffers and per-epoch metrics (timings aside), bit for bit."""
    a, b = (checkpoint.load(d / "checkpoints" / "last.pt")["model"] for d in (ref_dir, run_dir))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    def strip(ms):
        return [{k: v for k, v in m.items() if k not in ("images_per_sec", "elapsed_s")}
                for m in ms]
    assert strip(metrics(run_dir)) == strip(metrics(ref_dir))


def test_self_launch_and_torchrun_run_the_same_ddp_job(uninterrupted):
    for d in ("self", "torchrun"):
        s = json.loads((uninterrupted / d / "summary.json").read_text())
        assert (s["devices"], s["global_batch"], s["status"]) == (2, 32, "completed")
        assert not list((uninterrupted / d).glob("*rank*")), "one run dir for the whole job"
    assert_same_end(uninterrupted / "torchrun", uninterrupted / "self")  # the same computation


# Per-device norms with state, their schedules inside this 32-step run.
STATEFUL = ["brn norm.schedule_unit=run norm.renorm_from=0.25 norm.r_max_at=0.75 "
            "norm.d_max_at=0.5", "evonorm_b0", "mabn norm.warmup=4 norm.renorm_from=8", "online",
            "custom norm.target=examples.my_norm.BatchInstanceNorm"]  # a user's layer (issue 23)


@pytest.mark.parametrize("norm", ["bn", "syncbn", "bcn_ws", "bcn_ws norm.sync_stats=false",
                                  *STATEFUL, "nf_agc"])
def test_ddp_equals_virtual_devices(tmp_path, norm):
    norm = f"norm={norm}".split()
    res = run_cli(*SMALL, *norm, "trainer.devices=2", "hydra.run.dir=ddp", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run(make_cfg(*SMALL, *norm, "trainer.virtual_devices=2"), tmp_path / "virtual")
    assert_same_run(metrics(tmp_path / "ddp"), metrics(tmp_path / "virtual"))
    if norm == ["norm=bn"]:  # control: BN over the joint batch of 16 is other maths, and it shows
        run(make_cfg(*SMALL, "batch_size_per_device=16"), tmp_path / "joint")
        with pytest.raises(AssertionError):
            assert_same_run(metrics(tmp_path / "ddp"), metrics(tmp_path / "joint"))


@pytest.mark.parametrize("norm", ["bn", "gn", *STATEFUL, "nf_agc"])
def test_accumulation_gives_the_same_training_losses(tmp_path, norm):
    """Per-device statistics only. BN's running statistics (eval) differ, as documented; the
    newer stateful norms count optimizer steps and devices, so they give the same eval too.
    nf_agc: adaptive gradient clipping acts on the whole step's gradient, all chunks summed."""
    norm = f"norm={norm}".split()
    run(make_cfg(*SMALL, *norm, "trainer.virtual_devices=2"), tmp_path / "virtual")
    run(make_cfg(*SMALL, *norm, "trainer.accumulate=2"), tmp_path / "accumulate")
    assert_same_run(metrics(tmp_path / "virtual"), metrics(tmp_path / "accumulate"),
                    train_only=norm == ["norm=bn"])


# The norms whose state a one-process layout wiped (mabn's windows, bcn's private estimates)
# and online (per-device streams the same way) run in the default suite; the other
# batch-dependent ones with `make test-slow` (2 DDP runs each, about 20 s).
WIPED_BEFORE = ("mabn", "bcn_ws norm.sync_stats=false", "online")


@pytest.mark.parametrize("norm", [
    n if n in WIPED_BEFORE else pytest.param(n, marks=pytest.mark.slow) for n in BATCH_DEPENDENT])
def test_probes_on_two_processes_leave_every_batch_dependent_norm_unchanged(tmp_path, norm):
    """Rank 0 probes a copy laid out for its own devices; laying out the trained model for one
    process wiped mabn's windows and running variance (and bcn's private estimates) of both
    processes, and the checkpoint held the wiped state."""
    args = (*SMALL, *f"norm={norm}".split(), "trainer.epochs=1", "trainer.devices=2")
    for probe_every in (0, 1):
        res = run_cli(*args, f"trainer.probe_every={probe_every}",
                      f"hydra.run.dir=probe{probe_every}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "probe1" / "probes.jsonl").exists()
    assert_same_end(tmp_path / "probe1", tmp_path / "probe0")


@pytest.mark.parametrize("launcher", ["basic", "parallel"])
def test_multirun_whose_jobs_are_ddp(tmp_path, launcher):
    # parallel: two DDP jobs at once, each with its own rendezvous on a free port.
    res = run_cli("-m", *SMALL, "trainer.epochs=1", "norm=bn,gn", "trainer.devices=2",
                  f"hydra/launcher={launcher}", "name=ddpsweep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "multirun" / "ddpsweep").glob("*/summary.json"))
    summaries = [json.loads((d / "summary.json").read_text()) for d in jobs]
    assert sorted(s["norm"] for s in summaries) == ["bn", "gn"]
    assert all(s["devices"] == 2 and s["status"] == "completed" for s in summaries)
    if launcher == "parallel":
        assert_ran_at_once(jobs)


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _workers(pid: int, marker: bytes = b"spawn_main") -> list[int]:
    """The job's worker processes (self-launch: multiprocessing-spawned children; torchrun:
    the train.py processes), not its helpers."""
    out = []
    for p in _descendants(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmd:
            out.append(p)
    return sorted(out)


def test_killed_worker_fails_the_job_fast_and_rerun_resumes(tmp_path, uninterrupted):
    args = [*KILL, "trainer.devices=2", "hydra.run.dir=job"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "job" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), "first epoch never finished"
    workers = _workers(job.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    killed_at = time.time()
    try:
        _, err = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the job hung after a worker died")
    assert job.returncode != 0
    assert time.time() - killed_at < 60
    assert err.strip().splitlines()[-1].startswith(
        "error: worker rank 1 failed (killed by SIGKILL)"), err[-2000:]
    assert "elastic" not in err, err[-2000:]  # torch's agent logs nothing of its own
    assert not (tmp_path / "job" / "summary.json").exists()
    resume_from = checkpoint.load(ckpt)["epoch"]
    assert 1 <= resume_from < 3, "killed after the first checkpoint, before the end"

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(epoch {resume_from}/3 done)" in again.stdout + again.stderr
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert_same_end(tmp_path / "job", uninterrupted / "self")


def test_torchrun_max_restarts_resumes_after_a_killed_worker(tmp_path, uninterrupted):
    job = torchrun("--max-restarts=1", "--monitor-interval=0.5", str(ROOT / "train.py"), *KILL,
                   "hydra.run.dir=job", cwd=tmp_path, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT)
    ckpt = tmp_path / "job" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), "first epoch never finished"
    workers = _workers(job.pid, marker=b"train.py")
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    try:
        out, _ = job.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("torchrun did not restart and finish the job")
    assert job.returncode == 0, out[-3000:]
    resumed = re.findall(r"resuming from \S+ \(epoch (\d+)/3 done\)", out)
    assert len(resumed) == 1 and 1 <= int(resumed[0]) < 3, out[-3000:]  # restarted once, mid-run
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert summary["devices"] == 2
    assert_same_end(tmp_path / "job", uninterrupted / "torchrun")
