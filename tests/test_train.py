"""The training app end to end: run records, divergence, resume after SIGKILL, bad input,
wandb offline, and (marked) real CIFAR-10."""
import json
import logging
import math
import os
import random
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from engine import checkpoint
from engine import loop
from engine.config import validate
from engine.data import GlobalBatches, load_dataset
from engine.loop import Process, Step, evaluate, run, train_epoch
from engine.records import RunRecord, code_version
from models import build_model
from norms import NORMS, DeviceAware, build_norm, configure_devices

from conftest import BATCH_DEPENDENT, ROOT, TINY, assert_ran_at_once, make_cfg, run_cli

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
               "images_per_sec", "elapsed_s"}
SUMMARY_KEYS = {"status", "test_acc", "best_test_acc", "test_loss", "train_loss",
                "epochs_completed", "images_per_sec", "wall_time_s", "model", "depth", "norm",
                "ws", "batch_size_per_device", "devices", "virtual_devices", "accumulate",
                "global_batch", "seed", "overrides", "code", "torch"}
# BRN's relaxation as fractions of a short run (the paper's 5k/25k/40k steps are longer).
BRN_IN_RUN = ["norm.schedule_unit=run", "norm.renorm_from=0.25", "norm.r_max_at=0.75",
              "norm.d_max_at=0.5"]


def test_short_run_writes_the_run_record_and_learns(tmp_path):
    cfg = make_cfg(*TINY, "trainer.epochs=3", "data.train_size=512")
    validate(cfg)
    summary = run(cfg, tmp_path, overrides=["x=1"])
    assert SUMMARY_KEYS <= set(summary) and summary["status"] == "completed"
    assert summary["epochs_completed"] == 3 and summary["overrides"] == ["x=1"]
    assert summary["code"] == code_version() and summary["torch"] == torch.__version__
    assert summary["test_acc"] > 30, summary  # 10 classes: chance is 10%
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_acc"] == summary["test_acc"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert all(set(m) == METRIC_KEYS for m in lines)
    assert lines[-1]["test_acc"] == summary["test_acc"]
    assert summary["best_test_acc"] == max(m["test_acc"] for m in lines)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model"]["depth"] == 8 and config["data"]["name"] == "synthetic"
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and "rng" not in state  # nothing draws from the global RNGs
    # Re-running a finished run does nothing and returns the same summary.
    assert run(cfg, tmp_path)["wall_time_s"] == summary["wall_time_s"]


# Schedules scaled to this 384-step run (BRN relaxes, MABN leaves its warm-up and averages).
LEARNS = {"bn": [], "gn": [], "brn": BRN_IN_RUN, "frn": [], "evonorm_b0": [],
          "evonorm_s0": [], "mabn": ["norm.simulated_batch=16", "norm.warmup=8",
                                     "norm.renorm_from=32"], "online": []}


@pytest.mark.parametrize("norm", list(LEARNS))
def test_each_norm_learns_at_two_images_per_device(tmp_path, norm):
    """b = 2 on 4 virtual devices, ResNet-8, 1024 generated images, 3 epochs (384 steps of 8
    images, lr 0.025): far above chance (10%) for the new norms as for bn and gn. Measured
    (test accuracy %, 256 images): bn 74.2, gn 71.5, brn 80.5, frn 62.1, evonorm_b0 86.7,
    evonorm_s0 82.0, mabn 84.8, online 79.3 (ecm=ac: 62.1)."""
    cfg = make_cfg(*TINY, f"norm={norm}", *LEARNS[norm], "batch_size_per_device=2",
                   "trainer.virtual_devices=4", "trainer.epochs=3", "data.train_size=1024",
                   "data.test_size=256", "optim.lr=0.4")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["test_acc"] > 50, summary


def test_code_version_is_the_checkouts_commit_and_flags_edits(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path / "repo"), *args], check=True,
                              capture_output=True, text=True).stdout.strip()
    (tmp_path / "repo" / "sub").mkdir(parents=True)
    (tmp_path / "repo" / "sub" / "f.py").write_text("a = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    sha = git("rev-parse", "HEAD")
    assert code_version(tmp_path / "repo") == sha
    (tmp_path / "repo" / "new.py").write_text("")  # untracked files leave the code as committed
    assert code_version(tmp_path / "repo") == sha
    (tmp_path / "repo" / "sub" / "f.py").write_text("a = 2\n")
    assert code_version(tmp_path / "repo") == sha + "+dirty"
    assert code_version(tmp_path / "repo" / "sub") is None  # not the checkout's top level
    assert code_version(tmp_path / "plain") is None  # no checkout at all


def expected_lrs(peak: float, warmup: int, total: int) -> list[float]:
    """The schedule written out: step i (from 0) of `total` trains at peak (i + 1) / warmup
    during the warm-up, then at peak (1 + cos(pi (i - warmup) / (total - warmup))) / 2."""
    return [peak * (i + 1) / warmup if i < warmup else
            peak * 0.5 * (1 + math.cos(math.pi * (i - warmup) / (total - warmup)))
            for i in range(total)]


@pytest.mark.parametrize("overrides,peak,warmup,total", [
    # global batch 32 -> peak 0.4 x 32 / 128 = 0.1; 8 steps/epoch, 2 epochs, warm-up 1 epoch
    (["optim.warmup_epochs=1"], 0.1, 8, 16),
    # global batch 64 (4 steps/epoch): peak 0.2; warm-up half an epoch = 2 steps
    (["batch_size_per_device=64", "optim.warmup_epochs=0.5"], 0.2, 2, 8),
    # no scaling, no warm-up: the cosine starts at the base lr
    (["batch_size_per_device=64", "optim.scale_lr=false", "optim.warmup_epochs=0"], 0.4, 0, 8),
])
def test_lr_schedule_warmup_then_cosine_with_linear_scaling(tmp_path, monkeypatch, overrides,
                                                            peak, warmup, total):
    """The lr every optimizer step of a run trains at: the whole curve."""
    lrs = []
    real = loop.train_step

    def spy(net, optimizer, *args, **kwargs):
        lrs.append(optimizer.param_groups[0]["lr"])
        return real(net, optimizer, *args, **kwargs)
    monkeypatch.setattr(loop, "train_step", spy)
    run(make_cfg(*TINY, "optim.lr=0.4", *overrides), tmp_path)
    assert lrs == pytest.approx(expected_lrs(peak, warmup, total), rel=1e-12, abs=1e-15)
    if warmup == 8:  # a few points by hand: the warm-up's middle, the top, the cosine's middle
        assert (lrs[3], lrs[7], lrs[8], lrs[12]) == pytest.approx((0.05, 0.1, 0.1, 0.05))
    # metrics.jsonl: the lr after each epoch's last step (the next step's), 0 after the last.
    logged = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    after = [*expected_lrs(peak, warmup, total), 0.0]
    assert logged == pytest.approx([after[total // 2], after[total]], abs=1e-12)


def test_divergence_is_a_result_not_a_crash(tmp_path):
    cfg = make_cfg(*TINY, "norm=none", "optim.lr=1e6", "optim.warmup_epochs=0",
                   "trainer.check_every=1")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "diverged" and summary["epochs_completed"] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_accumulation_and_virtual_devices_change_the_global_batch(tmp_path):
    cfg = make_cfg(*TINY, "batch_size_per_device=4", "trainer.virtual_devices=4",
                   "trainer.accumulate=2", "trainer.epochs=1")
    summary = run(cfg, tmp_path)
    assert summary["global_batch"] == 32 and summary["status"] == "completed"


def _state(path):
    return checkpoint.load(path)["model"]


class FakeLibc:
    """ctypes.CDLL("libc.so.6") stand-in that records mallopt calls."""

    def __init__(self, result: int = 1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


def test_keep_freed_memory_sets_glibcs_thresholds(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(loop.ctypes, "CDLL", lambda name: libc if name == "libc.so.6" else None)
    assert loop.keep_freed_memory() is True
    # <malloc.h>: M_MMAP_THRESHOLD (-3) 32 MiB, M_TRIM_THRESHOLD (-1) 1 GiB
    assert sorted(libc.calls) == [(-3, 32 << 20), (-1, 1 << 30)]
    refused = FakeLibc(result=0)  # mallopt returns 0 when it rejects a value
    monkeypatch.setattr(loop.ctypes, "CDLL", lambda name: refused)
    assert loop.keep_freed_memory() is False and refused.calls

    def not_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(loop.ctypes, "CDLL", not_glibc)
    assert loop.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_runs_on_cpu_keep_freed_memory_unless_told_not_to(tmp_path, monkeypatch):
    """trainer.keep_freed_memory=true (the default) applies glibc's settings once per CPU run,
    and here, on glibc, they take (mallopt accepts both values)."""
    applied = []
    real = loop.keep_freed_memory
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: applied.append(real()))
    run(make_cfg(*TINY, "trainer.epochs=1"), tmp_path / "default")
    assert applied == [True]
    run(make_cfg(*TINY, "trainer.epochs=1", "trainer.keep_freed_memory=false"), tmp_path / "off")
    assert applied == [True]


def test_keeping_freed_memory_changes_no_number(tmp_path):
    """glibc's allocator setting (on by default on CPU) only changes where buffers live."""
    for keep in ("true", "false"):
        res = run_cli(*TINY, "norm=bcn_ws", "trainer.epochs=1", f"trainer.keep_freed_memory={keep}",
                      f"hydra.run.dir=keep_{keep}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    a, b = (_state(tmp_path / f"keep_{keep}/checkpoints/last.pt") for keep in ("true", "false"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["test_loss"] for line in (tmp_path / f"keep_{keep}/metrics.jsonl")
               .read_text().splitlines()] for keep in ("true", "false")]
    assert losses[0] == losses[1] and len(losses[0]) == 1


# The norms with state beyond BN's: BCN's estimates, BRN's step count and relaxation (inside
# this run: schedule relative to its 48 steps), EvoNorm-B0's running variance, MABN's windows,
# Online Norm's streams (u, v written by the backward), and the example of a user's own layer.
STATEFUL = {"bcn_ws": ["norm=bcn_ws"],
            "brn": ["norm=brn", *BRN_IN_RUN],
            "evonorm_b0": ["norm=evonorm_b0"],
            "mabn": ["norm=mabn", "norm.simulated_batch=128", "norm.warmup=8",
                     "norm.renorm_from=40"],
            "online": ["norm=online"],
            # a user's layer (issue 23): running statistics moved once per optimizer step
            "custom": ["norm=custom", "norm.target=examples.my_norm.BatchInstanceNorm"]}


@pytest.mark.parametrize("norm", list(STATEFUL))
def test_sigkill_mid_epoch_then_rerun_ends_bit_exactly(tmp_path, norm):
    """Killed in the middle of epoch 2 (tests/kill_at_step.py: after 16 + 7 of the run's 3 x 16
    steps, epoch 1's checkpoint on disk), re-running the same command resumes from epoch 1 and
    ends with the uninterrupted run's weights and metrics, bit for bit."""
    epochs, steps = 3, 16  # 512 images, global batch 32
    args = [*TINY, "data.train_size=512", f"trainer.epochs={epochs}", *STATEFUL[norm]]
    run(make_cfg(*args), tmp_path / "ref")

    marker = tmp_path / "steps_done"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at_step.py"),
                             str(steps + steps // 2), str(marker), *args, "hydra.run.dir=killed"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Mid-epoch: 7 steps of epoch 2 ran, and the record on disk is epoch 1's.
    assert marker.read_text() == str(steps + steps // 2 - 1)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    assert checkpoint.load(ckpt)["epoch"] == 1
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "killed" / "summary.json").exists()

    resumed = run_cli(*args, "hydra.run.dir=killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {ckpt} (epoch 1/3 done)" in resumed.stdout + resumed.stderr
    a, b = _state(tmp_path / "ref/checkpoints/last.pt"), _state(ckpt)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    metrics = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text()  # noqa
                         .splitlines()]
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("images_per_sec", "elapsed_s")}  # noqa
                        for m in ms]
    assert len(metrics("ref")) == epochs and strip(metrics("ref")) == strip(metrics("killed"))


def _no_decoding(*args):
    raise AssertionError("the real archive was decoded again")


def _global_generators():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def test_training_draws_nothing_from_the_global_generators():
    """Why a checkpoint holds no RNG state: the data order and augmentation come from
    generators seeded by (seed, epoch), and no training step or evaluation of any norm draws
    from torch's, Python's or NumPy's global generators, so a resumed run needs none of their
    states. A norm or step that starts drawing (dropout, stochastic depth) fails here: then
    the checkpoint must save and restore those states again."""
    data = load_dataset("synthetic", None, train_size=32, test_size=8)
    batches = GlobalBatches(data.train, 16, data.mean, data.std, "cpu")
    for name in NORMS:
        model = build_model("resnet", 8, norm=name, groups=4)
        configure_devices(model, virtual_devices=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.WarmupCosine(1, 4))
        before = _global_generators()
        train_epoch(model, opt, sched, batches, 0, Process(), Step(accumulate=2), check_every=1,
                    bar=None)
        evaluate(model, data.test, data.mean, data.std, 8, Process())
        after = _global_generators()
        assert torch.equal(before[0], after[0]) and before[1] == after[1], name
        assert np.array_equal(before[2], after[2]), name


class _Stop(Exception):
    pass


def test_a_checkpoint_with_the_old_rng_entry_still_resumes_bit_exactly(tmp_path, monkeypatch):
    """Checkpoints written before the RNG state was dropped hold an "rng" entry: it is ignored."""
    cfg = make_cfg(*TINY, "norm=bcn_ws")
    run(cfg, tmp_path / "ref")

    def stop(self, *args, **kwargs):  # right after epoch 1's checkpoint: an interrupted run
        raise _Stop
    monkeypatch.setattr(RunRecord, "write_metrics", stop)
    with pytest.raises(_Stop):
        run(cfg, tmp_path / "old")
    monkeypatch.undo()
    ckpt = tmp_path / "old/checkpoints/last.pt"
    state = checkpoint.load(ckpt)
    assert state["epoch"] == 1
    state["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),  # the old entry
                    "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    torch.save(state, ckpt)
    assert run(cfg, tmp_path / "old")["epochs_completed"] == 2
    a, b = _state(tmp_path / "ref/checkpoints/last.pt"), _state(ckpt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["train_loss"] for x in (tmp_path / "ref/metrics.jsonl").read_text()
            .splitlines()] == [json.loads(x)["train_loss"] for x in
                               (tmp_path / "old/metrics.jsonl").read_text().splitlines()]


def test_corrupt_checkpoint_is_one_clear_error_and_kept(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    res = run_cli(*TINY, "hydra.run.dir=run", cwd=tmp_path)
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    # One line: the file, why, and what to do.
    assert errors[0].startswith(f"error: checkpoint {ckpt.resolve()} cannot be read ("), errors
    assert errors[0].endswith("move it away to start over, or set hydra.run.dir to another "
                              "folder"), errors
    assert "Traceback" not in res.stdout + res.stderr
    assert ckpt.read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize("damage", ["checkpoint without scheduler", "empty identity",
                                    "truncated summary"])
def test_damaged_run_state_is_one_clear_error_naming_the_file(tmp_path, damage):
    cfg = make_cfg(*TINY, "trainer.epochs=1")
    run(cfg, tmp_path / "run")
    ckpt, summary = tmp_path / "run/checkpoints/last.pt", tmp_path / "run/summary.json"
    if damage == "truncated summary":
        summary.write_text(summary.read_text()[:40])
        name = summary
    else:
        summary.unlink()  # an interrupted run: the checkpoint is read
        state = checkpoint.load(ckpt)
        if damage == "empty identity":
            state["identity"] = {}
        else:
            del state["scheduler"]
        torch.save(state, ckpt)
        name = ckpt
    before = name.read_bytes()
    res = run_cli(*TINY, "trainer.epochs=1", "hydra.run.dir=run", cwd=tmp_path)
    errors = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert str(name.name) in errors[0] and "Traceback" not in res.stdout, errors[0]
    assert name.read_bytes() == before, "never silently overwritten"


def test_resume_false_refuses_a_run_dir_that_holds_a_run(tmp_path):
    run(make_cfg(*TINY, "trainer.epochs=1"), tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="trainer.resume=false"):
        run(make_cfg(*TINY, "trainer.epochs=1", "trainer.resume=false"), tmp_path)
    assert ckpt.read_bytes() == before
    run(make_cfg(*TINY, "trainer.epochs=1", "trainer.resume=false"), tmp_path / "new")


def test_checkpoint_of_another_config_is_refused(tmp_path):
    run(make_cfg(*TINY, "trainer.epochs=1", "trainer.resume=true"), tmp_path)
    (tmp_path / "summary.json").unlink()  # pretend it was interrupted
    with pytest.raises(checkpoint.CheckpointError, match=r"seed: 0 there, 1 now"):
        run(make_cfg(*TINY, "trainer.epochs=1", "seed=1"), tmp_path)


def train_py(*args: str, cwd, monkeypatch, capsys) -> tuple[int, str, str]:
    """`python train.py ARGS` in this process: train.py run as __main__ (runpy), its
    preflight and its Hydra app as the command line runs them; returns (exit status, stdout,
    stderr). Hydra's logging set-up is undone afterwards."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py"), *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,needle", [
    (["batch_size_per_device=0"], "batch_size_per_device=0 is invalid"),
    (["batch_size_per_device=abc"], "batch_size_per_device: Value 'abc'"),
    (["batch_size_per_device=2.5"], "batch_size_per_device: Value '2.5'"),
    (["trainer.epoch=3"], "trainer.epoch: unknown key 'epoch'; allowed in trainer: epochs,"),
    (["foo=1"], "foo: unknown key 'foo'; allowed at the top level: model, norm,"),
    (["+norm.foo=1", "+trainer.bogus=3"], "norm.foo: unknown key 'foo'; allowed in norm: name, "
                                          "ws, groups,"),
    (["+trainer.bogus=3"], "trainer.bogus: unknown key 'bogus'; allowed in trainer: epochs,"),
    (["+norm._target_=my.Norm"], "norm._target_: unknown key '_target_'; allowed in norm: name,"),
    (["++extra.key=1"], "extra: unknown key 'extra'; allowed at the top level: model, norm,"),
    (["norm=batchnorm"], "norm=batchnorm is unknown; allowed: bcn, bcn_ws, bn,"),
    (["model=densenet"], "model=densenet is unknown; allowed: resnet, vgg"),
    (["-m", "norm=bn,gnn"], "norm=gnn is unknown; allowed:"),
    (["model.depth=19"], "model.depth=19 is not a valid resnet depth"),
    (["norm=gn", "norm.groups=5"], "norm.groups=5 does not divide"),
    (["optim.lr=-1"], "optim.lr=-1.0 is invalid"),
    (["seed=${oc.env:MICROBATCH_UNSET_VARIABLE}"], "seed: "),
    (["data=cifar10", "data.root=/does/not/exist", "data.download=false"], "data.root"),
    (["data=cifar10", "data.root=/does/not/exist", "data.download=true"],
     "data.root=/does/not/exist does not exist (in /: found "),
])
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, monkeypatch, capsys, args,
                                                     needle):
    """Each through train.py's __main__ in this process (the command line's own path: the
    composition preflight, Hydra, validation, data loading); one real subprocess below."""
    code, out, err = train_py(*TINY, *args, cwd=tmp_path, monkeypatch=monkeypatch,
                              capsys=capsys)
    assert code == 2, out[-1000:] + err[-2000:]
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), err[-2000:]
    assert needle in errors[0], errors[0]
    assert "Traceback" not in out + err
    assert not list(tmp_path.rglob("last.pt")), "nothing may be trained"


def test_a_sweep_over_missing_data_roots_starts_nothing(tmp_path, monkeypatch, capsys):
    """train.py's preflight checks every job's data.root before any starts (issue 22)."""
    code, out, err = train_py(*TINY, "-m", "data=cifar10", "data.root=/no/a,/no/b.tar.gz",
                              "name=roots", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 3, err[-2000:]
    assert all(line.startswith("error: ") for line in lines)
    assert ": data.root=/no/a does not exist (in /: found " in lines[0]
    assert ": data.root=/no/b.tar.gz does not exist (in /: found " in lines[1]
    assert lines[2].startswith("error: 2 invalid job(s); nothing was started")
    assert not (tmp_path / "multirun").exists()


def test_bad_input_on_the_command_line_is_one_line_and_exit_status_2(tmp_path):
    """The real interpreter: its exit status and its whole stderr."""
    res = run_cli(*TINY, "batch_size_per_device=0", cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr == "error: batch_size_per_device=0 is invalid; allowed: an integer >= 1\n"
    assert not list(tmp_path.rglob("last.pt"))


@pytest.mark.realdata
def test_resnet20_bn_learns_real_cifar10_in_one_epoch(tmp_path, real_cifar10, monkeypatch):
    """Issue 3's done-criterion, in the default suite: about a minute on 2 CPU cores. The
    archive comes from the session's cache (decoding it again would fail here)."""
    tar, cache = real_cifar10
    monkeypatch.setattr("engine.data._decode_image", _no_decoding)
    cfg = make_cfg(f"data.root={tar}", f"data.cache_dir={cache}",
                   "data.train_subset=10000", "trainer.epochs=1", "logger.mode=disabled",
                   "trainer.device=cpu", "optim.warmup_epochs=0")
    summary = run(cfg, tmp_path / "run")
    assert summary["test_acc"] > 25, summary  # chance: 10%


def test_multirun_sweep_writes_one_record_per_job_and_reruns_skip(tmp_path):
    args = ["-m", *TINY, "trainer.epochs=1", "norm=bn,gn_ws", "batch_size_per_device=16,32",
            "name=sw"]
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summaries = sorted((tmp_path / "multirun" / "sw").glob("*/summary.json"))
    assert len(summaries) == 4
    cells = {(s["norm_label"], s["batch_size_per_device"])
             for s in (json.loads(p.read_text()) for p in summaries)}
    assert cells == {("bn", 16), ("bn", 32), ("gn_ws", 16), ("gn_ws", 32)}
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("nothing to do") == 4


def test_parallel_launcher_runs_sweep_jobs_side_by_side(tmp_path):
    res = run_cli("-m", "hydra/launcher=parallel", *TINY, "norm=bn,gn",
                  "name=par", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = [p.parent for p in (tmp_path / "multirun" / "par").glob("*/summary.json")]
    assert sorted(json.loads((d / "summary.json").read_text())["norm"] for d in jobs) == \
        ["bn", "gn"]
    assert_ran_at_once(jobs)


def test_probes_during_training_leave_the_run_unchanged(tmp_path):
    base = (*TINY, "norm=bcn_ws", "trainer.virtual_devices=2", "batch_size_per_device=16")
    plain = run(make_cfg(*base), tmp_path / "plain")
    probed = run(make_cfg(*base, "trainer.probe_every=1"), tmp_path / "probed")
    assert plain["test_acc"] == probed["test_acc"] and plain["train_loss"] == probed["train_loss"]
    lines = [json.loads(x) for x in (tmp_path / "probed/probes.jsonl").read_text().splitlines()]
    assert [p["epoch"] for p in lines] == [1, 2]
    for p in lines:
        assert {"var_growth", "grad_ratio", "cosine_similarity", "stable_rank"} <= set(p)
        assert len(p["layers"]) == len(p["activation_var"]) == len(p["grad_norm"]) == 3
        assert all(v > 0 for v in p["activation_var"])
    assert_same_state(tmp_path / "plain", tmp_path / "probed")


def assert_same_state(a_dir, b_dir) -> None:
    """The checkpoints of two runs hold the same weights and buffers, bit for bit."""
    a, b = (checkpoint.load(d / "checkpoints/last.pt")["model"] for d in (a_dir, b_dir))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_batch_dependent_covers_every_device_aware_norm():
    conv = torch.nn.Conv2d(3, 32, 3)  # cbn needs the conv before it; the others ignore it
    aware = {n for n in NORMS if any(isinstance(m, DeviceAware)
                                     for m in build_norm(n, 32, conv=conv).modules())}
    assert aware == {n.split()[0].removesuffix("_ws") for n in BATCH_DEPENDENT}


# The stateful norms (per-device windows, streams, estimates) in the default suite; the rest,
# whose state is only running statistics, with `make test-slow`.
PROBED_BY_DEFAULT = ("mabn", "bcn_ws norm.sync_stats=false", "online", "cbn")


@pytest.mark.parametrize("norm", [
    n if n in PROBED_BY_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
    for n in BATCH_DEPENDENT])
def test_probes_with_accumulation_leave_every_batch_dependent_norm_unchanged(tmp_path, norm):
    """A probe measures a copy laid out for one process: re-laying out the trained model
    (accumulate 2 -> 1) re-created mabn's windows and running variance, which the checkpoint
    then held and epoch 2 trained from."""
    base = (*TINY, *f"norm={norm}".split(), "trainer.virtual_devices=2", "trainer.accumulate=2",
            "batch_size_per_device=8")
    plain = run(make_cfg(*base), tmp_path / "plain")
    probed = run(make_cfg(*base, "trainer.probe_every=1"), tmp_path / "probed")
    assert (plain["test_loss"], plain["train_loss"]) == (probed["test_loss"], probed["train_loss"])
    assert_same_state(tmp_path / "plain", tmp_path / "probed")


def test_a_resumed_run_says_from_which_checkpoint_and_epoch(tmp_path, caplog):
    cfg = make_cfg(*TINY)
    run(cfg, tmp_path)
    (tmp_path / "summary.json").unlink()  # as if killed after the last checkpoint
    with caplog.at_level(logging.INFO, logger=loop.log.name):
        run(cfg, tmp_path)
    line = f"resuming from {tmp_path / 'checkpoints' / 'last.pt'} (epoch 2/2 done)"
    assert [r.getMessage() for r in caplog.records].count(line) == 1
    assert (tmp_path / "train.log").read_text().count(line) == 1


class FakeBar:
    """tqdm's part the loop uses, recorded."""
    bars: list = []

    def __init__(self, total=None, desc=None, **kwargs):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False
        self.format_dict = {"elapsed": 1.0}
        FakeBar.bars.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        self.closed = True


def test_the_progress_bar_shows_the_evaluation_too(tmp_path, monkeypatch):
    """On a terminal, every epoch has a bar for its training steps and one for its test images
    (a CPU evaluates for seconds)."""
    monkeypatch.setattr(loop, "tqdm", FakeBar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    FakeBar.bars = []
    run(make_cfg(*TINY), tmp_path)  # 8 steps an epoch, 64 test images
    assert [(b.desc, b.total, b.n, b.closed) for b in FakeBar.bars] == [
        ("epoch 1/2", 8, 8, True), ("epoch 1/2 test", 64, 64, True),
        ("epoch 2/2", 8, 8, True), ("epoch 2/2 test", 64, 64, True)]


@pytest.mark.parametrize("overrides, warned", [
    (["norm=brn"], True),                       # the paper's 5,000 steps > a 384-step run
    (["norm=brn", *BRN_IN_RUN], False),
    (["norm=mabn", "norm.renorm_from=383"], False),
    (["norm=mabn", "norm.renorm_from=384"], True),
    (["norm=bn"], False)])
def test_a_schedule_that_starts_after_the_run_is_announced(caplog, overrides, warned):
    cfg = make_cfg(*TINY, *overrides)
    validate(cfg)
    with caplog.at_level(logging.WARNING, logger=loop.log.name):
        loop.warn_unreached_schedule(cfg, total_steps=384)
    assert ("keeps r = 1" in caplog.text) == warned, caplog.text
