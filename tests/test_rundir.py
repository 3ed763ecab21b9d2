"""The run folder: named by the run's identity, one process at a time, durable writes, and a
refused or failed run that says so in one line and leaves nothing half-written behind."""
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint, loop
from engine.config import digest, identity
from engine.rundir import RunLock, RunLocked, write_durably

from conftest import ROOT, TINY, make_cfg, run_cli

ONE = (*TINY, "trainer.epochs=1")


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/*/*/summary.json"))


def test_default_folders_are_named_by_the_identity_and_rerunning_resumes_its_own(tmp_path):
    """Different maths, different folders (the README's examples no longer refuse each other);
    the same command finds its own folder; keys that do not change the maths keep it."""
    for extra in ((), ("trainer.epochs=2",), ("data.train_size=128",), ()):
        res = run_cli(*ONE, *extra, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 3 and all(d.name.startswith("resnet8_bn_b32_s0_") for d in dirs)
    assert "already completed" in res.stdout + res.stderr
    digests = {d.name.rsplit("_", 1)[1] for d in dirs}
    assert digest({**identity(make_cfg(*ONE)), "data.root": None}) in digests
    res = run_cli(*ONE, "trainer.num_threads=2", "trainer.check_every=7",
                  "logger.log_every=10", cwd=tmp_path)
    assert "already completed" in res.stdout + res.stderr and len(run_dirs(tmp_path)) == 3


def test_a_refusal_names_every_key_that_differs_and_writes_nothing(tmp_path):
    assert run_cli(*ONE, "hydra.run.dir=run", cwd=tmp_path).returncode == 0
    files = lambda: {p: p.read_bytes() for p in (tmp_path / "run").rglob("*")  # noqa: E731
                     if p.is_file() and p.name != ".lock"}  # the lock holds its holder's pid
    before = files()
    res = run_cli(*ONE, "trainer.epochs=2", "data.train_size=128", "hydra.run.dir=run",
                  cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "data.train_size: 256 there, 128 now; trainer.epochs: 1 there, 2 now" in res.stderr
    assert files() == before and not (tmp_path / "run" / ".hydra").exists()


def test_bad_config_or_data_is_reported_before_anything_about_the_folder(tmp_path):
    assert run_cli(*ONE, "hydra.run.dir=run", cwd=tmp_path).returncode == 0
    # a missing data set in a folder that holds another run: the data is what is wrong
    res = run_cli(*ONE, "data=cifar10", f"data.root={tmp_path / 'nowhere'}",
                  "data.download=false", "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == 2 and "nowhere" in res.stderr and "another config" not in \
        res.stderr
    # a refused new run leaves no folder: neither a bad config nor missing data
    for args in (("batch_size_per_device=0",), ("data=cifar10", "data.download=false",
                                                f"data.root={tmp_path / 'nowhere'}")):
        res = run_cli(*ONE, *args, "hydra.run.dir=fresh", cwd=tmp_path)
        assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr
        assert not (tmp_path / "fresh").exists()


def test_a_second_process_on_the_same_folder_exits_at_once_naming_the_holder(tmp_path):
    args = [*TINY, "data.train_size=4096", "trainer.epochs=3", "hydra.run.dir=run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.05)
        tic = time.time()
        second = run_cli(*args, cwd=tmp_path)
        assert second.returncode == 1 and time.time() - tic < 60
        assert second.stderr.strip() == (
            f"error: {tmp_path / 'run'} is in use by another run (pid {first.pid}); wait for it "
            "to finish, or set hydra.run.dir to another folder")
        assert first.poll() is None  # the holder goes on
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_completed"] == 3


def test_processes_started_together_and_late_train_one_at_a_time(tmp_path):
    """Five train.py processes on one folder at the same moment, two more once four are
    refused: exactly one trains, the six others are refused in one line naming it, and the
    folder keeps its lock. (A refused process once removed the holder's .lock and folder while
    the holder had written nothing yet, as a DDP parent does while its workers start, so the
    next one found no lock and trained too.)"""
    args = [*TINY, "data.train_size=4096", "trainer.epochs=100", "trainer.devices=2",
            "hydra.run.dir=run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = lambda: subprocess.Popen(  # noqa: E731
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs = [start() for _ in range(5)]
    try:
        deadline = time.time() + 240
        while sum(p.poll() is None for p in procs) > 1 and time.time() < deadline:
            time.sleep(0.05)
        procs += [start() for _ in range(2)]
        while sum(p.poll() is None for p in procs) > 1 and time.time() < deadline:
            time.sleep(0.1)
        running = [p for p in procs if p.poll() is None]
        assert len(running) == 1, "more than one process trains in the folder"
        (holder,) = running
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(holder.pid)
        for p in procs:
            if p is not holder:
                assert p.returncode == 1 and p.stderr.read().strip() == (
                    f"error: {tmp_path / 'run'} is in use by another run (pid {holder.pid}); "
                    "wait for it to finish, or set hydra.run.dir to another folder")
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_lock_taken_on_a_file_removed_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """The holder before us removes its lock file (and folder) as it leaves, after we opened
    it but before we locked it: a lock on that unlinked file would hold nothing, and the next
    process would lock a new file at the path. acquire() must end up holding the file there."""
    import fcntl

    real_flock, calls = fcntl.flock, []

    def holder_leaves_first(fd, op):
        if not calls:  # the previous holder's release(): unlink, rmdir, a new run recreates
            (tmp_path / "run" / ".lock").unlink()
            (tmp_path / "run").rmdir()
            (tmp_path / "run").mkdir()
            (tmp_path / "run" / ".lock").write_text("")
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", holder_leaves_first)
    monkeypatch.delenv("MICROBATCH_RUN_LOCK", raising=False)
    with RunLock(tmp_path / "run") as lock:
        assert len(calls) == 2
        assert os.path.samestat(os.fstat(lock.fd), os.stat(tmp_path / "run" / ".lock"))
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())


ALL_MISSING = ", ".join(checkpoint.CORE_IDENTITY)


def test_identity_problems():
    assert checkpoint.identity_problem(None) == "its identity is missing"
    assert checkpoint.identity_problem({}) == f"its identity lacks {ALL_MISSING}"
    assert checkpoint.identity_problem({"seed": 0}) == \
        f"its identity lacks {ALL_MISSING.replace(', seed', '')}"
    assert checkpoint.identity_problem(identity(make_cfg(*ONE))) is None


@pytest.mark.parametrize("identity,problem", [(None, "its identity is missing"),
                                              (["seed"], "its identity is a list")])
def test_a_finished_record_that_cannot_show_its_identity_is_refused(tmp_path, identity,
                                                                     problem):
    """{"status": "completed"} alone once meant "already completed; nothing to do": an empty
    identity matched every run. Refused in one line, the record kept, nothing trained."""
    (tmp_path / "run").mkdir()
    record = {"status": "completed", **({} if identity is None else {"identity": identity})}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(record))
    res = run_cli(*ONE, "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr == (f"error: {tmp_path / 'run' / 'summary.json'} records a finished run "
                          f"but cannot show that it is this run ({problem}); "
                          f"{checkpoint.MOVE_AWAY}\n")
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == record
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "summary.json"]


@pytest.mark.parametrize("name,status", [(".lock", 1), ("train.log", 2), ("checkpoints", 2)])
def test_a_record_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, name,
                                                                         status):
    """`ln -s ~/victim R/.lock` once truncated the victim and wrote a pid into it; a linked
    train.log appended to its target; a linked checkpoints/ received the checkpoints."""
    victim = tmp_path / "victim"
    if name == "checkpoints":
        victim.mkdir()
    else:
        victim.write_text("precious\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(victim)
    res = run_cli(*ONE, "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == status and res.stderr == (
        f"error: {tmp_path / 'run' / name} is a symbolic link: a run never writes through a "
        "link out of its folder; remove it, or set hydra.run.dir to another folder\n")
    if name == "checkpoints":
        assert list(victim.iterdir()) == []
    else:
        assert victim.read_text() == "precious\n"


KILL_AFTER_CHECKPOINT = """
import os, runpy, signal, sys
root = sys.argv[1]
sys.path.insert(0, root)
from engine import records
write = records.RunRecord.write_metrics
def killed_after_the_checkpoint(self, history, name="metrics.jsonl"):
    if name == "metrics.jsonl" and len(history) == 2:  # epoch 2's checkpoint is renamed in
        (self.dir / ".metrics.jsonl.0123456789ab.tmp").write_text("half")  # a write cut short
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, history, name)
records.RunRecord.write_metrics = killed_after_the_checkpoint
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
"""


def test_a_kill_between_the_checkpoint_and_the_metrics_leaves_a_record_that_agrees(tmp_path):
    """SIGKILL right after the last checkpoint's rename, then the same command: the run was
    "completed" with epochs_completed 2 while metrics.jsonl kept one line, and the killed
    write's temporary stayed. The checkpoint is the record: the metrics follow it."""
    args = [*TINY, "trainer.probe_every=1", "hydra.run.dir=run"]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(ROOT), *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "run"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    probes = (run_dir / "probes.jsonl").read_text().splitlines()
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert [m["epoch"] for m in lines] == [1, 2] and len(probes) == 2
    assert summary["test_acc"] == lines[-1]["test_acc"]
    assert list(run_dir.rglob("*.tmp")) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real small file system (tmpfs) for the run folder, remountable to another size."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}): needs root")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)
    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("size,kept", [
    pytest.param("512k", "no checkpoint was kept", marks=pytest.mark.slow),
    ("1m", "the checkpoint of epoch 1 is kept")])
def test_a_full_disk_is_one_line_saying_what_is_kept_and_the_run_resumes(small_disk, tmp_path,
                                                                          size, kept):
    """A ResNet-8 checkpoint is about 600 kB, written beside the old one before the rename:
    512 kB holds none, 1 MB holds epoch 1's but not epoch 2's beside it. torch.save into the
    file died with its zip writer's RuntimeError (a traceback) instead of the one line."""
    mnt, resize = small_disk
    resize(size)
    args = [*TINY, f"hydra.run.dir={mnt / 'run'}"]
    res = run_cli(*args, cwd=tmp_path)
    epoch = 1 if size == "512k" else 2
    assert res.returncode == 2 and res.stderr == (
        f"error: cannot write the run record in {mnt / 'run'} (No space left on device) after "
        f"epoch {epoch}; {kept}: free space (or raise the file-size limit) and re-run the same "
        "command to resume\n")
    assert list((mnt / "run").rglob("*.tmp")) == []
    resize("8m")
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((mnt / "run" / "summary.json").read_text())
    lines = (mnt / "run" / "metrics.jsonl").read_text().splitlines()
    assert summary["status"] == "completed" and summary["epochs_completed"] == len(lines) == 2


def test_a_failed_summary_or_metrics_write_says_which_checkpoint_is_kept(tmp_path, monkeypatch):
    """The disk fills right after a checkpoint: the line named no checkpoint although epoch 1's
    was on disk; the summary's write had no guard at all."""
    from engine.records import RunRecord

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    cfg = make_cfg(*TINY)
    for method, when, kept in (("write_metrics", "after epoch 1", "epoch 1"),
                               ("write_summary", "at the end", "epoch 2")):
        with monkeypatch.context() as m:
            m.setattr(RunRecord, method, full)
            with pytest.raises(checkpoint.CheckpointError) as e:
                loop.run(cfg, tmp_path / method)
        assert str(e.value).startswith(
            f"cannot write the run record in {tmp_path / method} (No space left on device) "
            f"{when}; the checkpoint of {kept} is kept")
        assert loop.run(cfg, tmp_path / method)["epochs_completed"] == 2  # the same command


def test_the_lock_of_a_dead_process_does_not_block(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(dead + "\n")
    res = run_cli(*ONE, "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_run_lock_in_one_process(tmp_path):
    with RunLock(tmp_path / "a") as lock:
        assert (tmp_path / "a" / ".lock").read_text().strip() == str(os.getpid())
        other = subprocess.run([sys.executable, "-c", (
            "import sys; sys.path.insert(0, sys.argv[1]); from engine.rundir import RunLock\n"
            "try:\n RunLock(sys.argv[2]).acquire()\nexcept Exception as e: print(e)"),
            str(ROOT), str(tmp_path / "a")], capture_output=True, text=True,
            env={k: v for k, v in os.environ.items() if k != "MICROBATCH_RUN_LOCK"})
        assert f"(pid {os.getpid()})" in other.stdout
        assert lock.created
    assert not (tmp_path / "a").exists()  # only the lock was written: a refused run's folder
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep").write_text("x")
    with RunLock(tmp_path / "b"):
        pass
    assert (tmp_path / "b" / "keep").exists()
    with RunLock(tmp_path / "c"), pytest.raises(RunLocked):
        os.environ.pop("MICROBATCH_RUN_LOCK")  # as if another process asked
        RunLock(tmp_path / "c").acquire()


def test_durable_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    write_durably(path, lambda f: f.write(b"old"))

    def fails(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        write_durably(path, fails)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    names, synced = set(), []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (names.add(Path(a).name), real_replace(a, b))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    for _ in range(2):
        write_durably(path, lambda f: f.write(b"new"))
    monkeypatch.undo()
    assert len(names) == 2 and path.read_bytes() == b"new"  # unique temporary names
    # each time: the temporary file before its rename, then the folder after it
    assert [Path(p).parent == tmp_path and Path(p).name.endswith(".tmp") for p in synced[::2]] \
        == [True, True] and synced[1::2] == [str(tmp_path)] * 2


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_record_files_follow_the_umask_as_train_log_does(tmp_path, umask):
    old = os.umask(umask)
    try:
        loop.run(make_cfg(*ONE, "trainer.probe_every=1"), tmp_path)
    finally:
        os.umask(old)
    files = ["config.yaml", "metrics.jsonl", "probes.jsonl", "summary.json", "train.log",
             "checkpoints/last.pt"]
    modes = {f: stat.S_IMODE((tmp_path / f).stat().st_mode) for f in files}
    assert modes == dict.fromkeys(files, 0o666 & ~umask)


@pytest.mark.parametrize("damage", ["empty", "wrong types", "wrong model"])
def test_a_damaged_checkpoint_is_one_line_naming_it_and_is_kept(tmp_path, damage):
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    if damage == "empty":
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    else:  # this run's own checkpoint (its summary gone), edited by hand
        assert run_cli(*ONE, "hydra.run.dir=run", cwd=tmp_path).returncode == 0
        (tmp_path / "run" / "summary.json").unlink()
        state = torch.load(ckpt, weights_only=True)
        if damage == "wrong types":  # model and optimizer fit: only the types are wrong
            state |= {"epoch": "one", "history": {}}
        else:
            state["model"] = {"w": torch.zeros(1)}
        torch.save(state, ckpt)
    data = ckpt.read_bytes()
    res = run_cli(*ONE, "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: checkpoint {ckpt.resolve()}")
    assert ("epoch is a str, history is a dict" in res.stderr) == (damage == "wrong types")
    assert ckpt.read_bytes() == data


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_good_one(tmp_path):
    """A file-size limit between the first and the second epoch's checkpoint (probes make it
    grow each epoch) makes the second write fail: one line, and the first stays whole."""
    args = [*TINY, "trainer.probe_every=1", "trainer.epochs=3"]
    assert run_cli(*args[:-1], "trainer.epochs=1", "hydra.run.dir=probe",
                   cwd=tmp_path).returncode == 0
    size = (tmp_path / "probe" / "checkpoints" / "last.pt").stat().st_size
    limit = size + 100  # each epoch adds ~300 bytes of metrics and probes

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "hydra.run.dir=run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         preexec_fn=set_limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    run = (tmp_path / "run").resolve()
    assert res.stderr.strip().splitlines() == [
        f"error: cannot write the run record in {run} (File too large) after epoch 2; the "
        "checkpoint of epoch 1 is kept: free space (or raise the file-size limit) and re-run "
        "the same command to resume"]
    ckpt = run / "checkpoints" / "last.pt"
    assert checkpoint.load(ckpt)["epoch"] == 1  # whole, and the last good one
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pt"]  # no temporary file left
    resumed = run_cli(*args, "hydra.run.dir=run", cwd=tmp_path)
    assert resumed.returncode == 0 and "(epoch 1/3 done)" in resumed.stdout + resumed.stderr


def sigint_as_at_a_terminal():
    """The child's Ctrl-C as in a terminal: a suite started in the background by a shell
    without job control (`cmd &`) inherits SIGINT ignored, and so would every child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_exit_130_and_the_run_resumes(tmp_path):
    args = [*TINY, "data.train_size=4096", "trainer.epochs=3", "hydra.run.dir=run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=sigint_as_at_a_terminal)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    epoch = checkpoint.load(ckpt)["epoch"]
    assert err.strip() == ("interrupted; re-run the same command to resume from epoch "
                           f"{epoch} ({ckpt.resolve()})"), err
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0 and f"(epoch {epoch}/3 done)" in res.stdout + res.stderr


class PressesCtrlC:
    """An object whose finalizer gets the Ctrl-C: Python prints "Exception ignored in ..." and
    drops the KeyboardInterrupt raised there."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here, inside the finalizer


@pytest.fixture
def terminal_sigint():
    """Python's Ctrl-C handler in this process, whatever started the suite; restored after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_run(tmp_path, monkeypatch,
                                                               terminal_sigint):
    save_epoch, dropped = loop.save_epoch, []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))

    def save_then_drop(record, state, *args):
        save_epoch(record, state, *args)
        if state["epoch"] == 1:
            PressesCtrlC()  # made and finalized at once

    monkeypatch.setattr(loop, "save_epoch", save_then_drop)
    cfg = make_cfg(*TINY, "trainer.epochs=3")
    with pytest.raises(loop.Interrupted, match="resume from epoch 1 "):
        loop.run(cfg, tmp_path)
    assert dropped == [KeyboardInterrupt]  # it did land in the finalizer, and was dropped
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_ddp_parent_is_one_line(tmp_path, signum):
    args = [*TINY, "data.train_size=4096", "trainer.epochs=3", "trainer.devices=2",
            "hydra.run.dir=run"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_at_a_terminal)
    deadline = time.time() + 240
    while not (tmp_path / "run" / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        f"interrupted ({signal.Signals(signum).name}); the workers were stopped; re-run the same "
        f"command to resume from {(tmp_path / 'run').resolve()}/checkpoints/last.pt"], err


def test_an_uncreatable_run_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    res = run_cli(*ONE, "hydra.run.dir=file/run", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: hydra.run.dir=file/run: cannot create it ({tmp_path / 'file'} is not a writable "
        "folder); choose a folder you can write to")


def test_sweeps_validate_every_job_before_launching_any(tmp_path):
    sweep = ("-m", *ONE, "norm=gn,bn", "norm.groups=5", "name=sw")
    res = run_cli(*sweep, cwd=tmp_path)
    assert res.returncode == 2 and not (tmp_path / "multirun").exists()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and "norm=gn norm.groups=5" in lines[0] and \
        "norm.groups=5 does not divide num_channels=16" in lines[0]
    assert lines[1].startswith("error: 1 invalid job(s); nothing was started")
    res = run_cli(*sweep, "skip_invalid_jobs=true", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    done = [p.parent.name for p in (tmp_path / "multirun").rglob("summary.json")]
    assert len(done) == 1 and "norm=bn," in done[0] and "norm.groups=5" in done[0]
    tail = res.stderr.strip().splitlines()[-2:]
    assert tail[0] == "1 invalid job(s) skipped (skip_invalid_jobs=true):" and "norm=gn" in tail[1]


def test_sweep_jobs_over_data_roots_get_their_own_folders_one_level_deep(tmp_path):
    """A '/' in an override is %2F in the job's folder name (issue 22): one folder per job
    directly under multirun/<name>/, whatever the values hold, so globs over jobs work."""
    res = run_cli("-m", *ONE, "data.root=a,../shared/data/x.tar.gz", "name=roots", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    names = [p.parent.name for p in (tmp_path / "multirun" / "roots").glob("*/summary.json")]
    assert sorted(part for n in names for part in n.split(",") if part.startswith("data.root=")) \
        == ["data.root=..%2Fshared%2Fdata%2Fx.tar.gz", "data.root=a"]
    assert len(list((tmp_path / "multirun").rglob("summary.json"))) == 2


def test_job_folder_names_read_back_and_fit_one_path_component():
    from urllib.parse import unquote

    from engine.config import NAME_MAX, job_dirname
    overrides = "data.root=../a%b/c.tar.gz,norm=gn"
    assert job_dirname(overrides) == "data.root=..%2Fa%25b%2Fc.tar.gz,norm=gn"
    assert unquote(job_dirname(overrides)) == overrides
    long = ",".join(f"optim.lr=0.{i:0>40}" for i in range(12))
    cut = job_dirname(long)
    assert len(cut.encode()) == NAME_MAX and "/" not in cut and cut.startswith("optim.lr=0.0")
    assert cut != job_dirname(long[:-1] + "9")  # the digest tells cut names apart


def test_the_data_not_its_path_is_the_runs_identity(tmp_path):
    """The same images under another path resume the run; other images are refused, naming
    the fingerprint."""
    from test_data import make_image_folder

    make_image_folder(tmp_path / "a", n_train=10, n_test=3)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    make_image_folder(tmp_path / "c", n_train=10, n_test=3, seed=99)
    args = ("data=cifar10", "data.download=false", f"data.cache_dir={tmp_path / 'cache'}",
            "model.depth=8", "batch_size_per_device=10", "trainer.epochs=1",
            "logger.mode=disabled", "trainer.num_threads=1", "hydra.run.dir=run")
    first = run_cli(*args, f"data.root={tmp_path / 'a'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    fingerprint = json.loads((tmp_path / "run" / "summary.json").read_text())["identity"][
        "data.fingerprint"]
    moved = run_cli(*args, f"data.root={tmp_path / 'b'}", cwd=tmp_path)
    assert moved.returncode == 0 and "already completed" in moved.stdout + moved.stderr
    other = run_cli(*args, f"data.root={tmp_path / 'c'}", cwd=tmp_path)
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert f"data.fingerprint: '{fingerprint}' there, '" in other.stderr


def test_a_torchrun_job_has_the_folder_of_the_same_self_launched_job(monkeypatch):
    """torchrun sets the number of devices, not the config: the folder follows the job."""
    from engine.config import run_digest
    from omegaconf import OmegaConf

    def folder_digest(*overrides):
        return run_digest(_root_=OmegaConf.create(OmegaConf.to_container(make_cfg(*overrides))))
    self_launched = folder_digest(*ONE, "trainer.devices=2")
    single = folder_digest(*ONE)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert folder_digest(*ONE) == self_launched != single
