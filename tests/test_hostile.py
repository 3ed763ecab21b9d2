"""Hostile files and environments (issue 21, item 9): each is one line and a non-zero exit,
never a traceback or a hang. Record files that are folders, FIFOs or nested without end; forged
checkpoints with the right structure and impossible values; run folders that cannot be made;
an environment wandb cannot start with; summaries the report cannot average."""
import json
import os
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from omegaconf import OmegaConf

from engine import checkpoint
from engine.cli import unwritable
from engine.config import ConfigError, validate
from engine.loop import run
from engine.rundir import RunLocked

from conftest import ROOT, TINY, make_cfg

ONE = (*TINY, "trainer.epochs=1")


@contextmanager
def no_hang(seconds: int = 30):
    """A FIFO read would block forever: fail the test instead of hanging the suite."""
    def expired(*_):
        raise AssertionError(f"still waiting after {seconds} s (a hang)")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name,kind,error,needle", [
    ("summary.json", "folder", checkpoint.CheckpointError, "summary.json is a folder, not a run"),
    ("summary.json", "fifo", checkpoint.CheckpointError, "summary.json is a FIFO, not a run"),
    ("summary.json", "deep", checkpoint.CheckpointError, "summary.json is not a run summary"),
    ("summary.json", "device", checkpoint.CheckpointError, "summary.json is a character device"),
    ("summary.json", "link", checkpoint.CheckpointError, "summary.json is a symbolic link"),
    ("checkpoints/last.pt", "folder", checkpoint.CheckpointError, "last.pt is a folder"),
    ("checkpoints/last.pt", "fifo", checkpoint.CheckpointError, "last.pt is a FIFO"),
    (".lock", "folder", RunLocked, ".lock is not a lock file"),
    (".lock", "fifo", RunLocked, ".lock is not a lock file"),
])
def test_a_record_file_that_is_not_a_file_is_one_line(tmp_path, name, kind, error, needle):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":  # /dev/zero's own node: a read would never end
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))
    elif kind == "link":
        path.symlink_to("/dev/zero")
    else:  # valid JSON nested deeper than any parser's recursion
        path.write_text("[" * 100_000 + "]" * 100_000)
    with no_hang(), pytest.raises(error) as e:
        run(make_cfg(*ONE), tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "metrics.jsonl").exists(), "nothing may be trained"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run: its checkpoint is the one the forgeries start from."""
    d = tmp_path_factory.mktemp("finished")
    run(make_cfg(*TINY), d)
    return d


@pytest.mark.parametrize("forge,needle", [
    (lambda s: s.update(epoch=-3), "epoch -3 is not one of its run's 1..2"),
    (lambda s: s.update(epoch=10**9), "epoch 1000000000 is not one of its run's 1..2"),
    (lambda s: s.update(history=[]), "its history does not hold one entry"),
    (lambda s: s["history"].__setitem__(0, "x"), "its history does not hold one entry"),
    (lambda s: s["scheduler"].update(last_epoch=3), "its lr schedule is at step 3, not 8"),
])
def test_a_forged_checkpoint_with_impossible_values_is_refused(tmp_path, finished, forge,
                                                              needle):
    """Right structure, impossible values: resuming it would train past the end, or mark a
    run completed that never trained (epoch=10**9), or resume the lr schedule elsewhere."""
    state = torch.load(finished / "checkpoints" / "last.pt", weights_only=True)
    state["epoch"] = 1  # as if killed after epoch 1 of 2
    state["history"] = state["history"][:1]
    state["scheduler"]["last_epoch"] = 8  # 8 steps an epoch
    forge(state)
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(checkpoint.CheckpointError) as e:
        run(make_cfg(*TINY), tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "summary.json").exists()


def test_the_unforged_copy_of_that_checkpoint_resumes(tmp_path, finished):
    """The control: the same edit that keeps the values consistent resumes and completes."""
    state = torch.load(finished / "checkpoints" / "last.pt", weights_only=True)
    state["epoch"], state["history"] = 1, state["history"][:1]
    state["scheduler"]["last_epoch"] = 8
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "last.pt")
    assert run(make_cfg(*TINY), tmp_path)["epochs_completed"] == 2


@pytest.mark.parametrize("run_dir,needle", [
    ("${oc.env:MICROBATCH_UNSET_VARIABLE}", "hydra.run.dir: \"Environment variable "
                                            "'MICROBATCH_UNSET_VARIABLE' not found\""),
    ("", "hydra.run.dir='' is invalid; allowed: a folder"),
    ("a" * 300, "is 300 bytes; allowed: at most 255 bytes per folder name"),
    ("{tmp}/dangling/run", "dangling is a link that leads to no folder (to /nonexistent/x)"),
    ("{tmp}/loop/run", "loop is a link that leads to no folder (to loop)"),
])
def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, run_dir, needle):
    (tmp_path / "dangling").symlink_to("/nonexistent/x")
    (tmp_path / "loop").symlink_to("loop")
    cfg = OmegaConf.create({"hydra": {"run": {"dir": run_dir.replace("{tmp}", str(tmp_path))}}})
    problem = unwritable(cfg)
    assert problem is not None and needle in problem, problem
    assert unwritable(OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "ok")}}})) is None


def test_an_empty_run_folder_through_train_py_writes_nothing(tmp_path):
    """hydra.run.dir='' would have written the run into the current folder (the repository
    root, run from there): refused before anything is written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *ONE, "hydra.run.dir=''"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr == ("error: hydra.run.dir='' is invalid; allowed: a folder (an empty name "
                          "would write the run into the current folder)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_wandb_mode_that_wandb_refuses_is_one_line_before_training(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "banana")
    with pytest.raises(ConfigError, match=r"WANDB_MODE='banana' \(environment\) is invalid; "
                                          r"allowed: online, offline, disabled"):
        validate(make_cfg(*ONE, "logger.mode=offline"))
    validate(make_cfg(*ONE, "logger.mode=disabled"))  # wandb never starts: no matter


def test_the_report_skips_what_it_cannot_average_with_one_line_each(tmp_path, finished):
    """NaN, inf and 1e308 accuracies, a summary nested without end, a folder and a FIFO at
    summary.json: each skipped with one line (a FIFO without a hang), the rest reported."""
    good = json.loads((finished / "summary.json").read_text())
    for name, acc in (("nan", float("nan")), ("inf", float("inf")), ("big", 1e308)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({**good, "test_acc": acc}))
    for name in ("deep", "folder", "fifo"):
        (tmp_path / name).mkdir()
    (tmp_path / "deep" / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "folder" / "summary.json").mkdir()
    os.mkfifo(tmp_path / "fifo" / "summary.json")
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "summary.json").write_text(json.dumps(good))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(tmp_path),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    for needle in ("big/summary.json: test_acc=1e+308 is not a percentage in [0, 100]",
                   "inf/summary.json: test_acc=inf is not a finite number",
                   "nan/summary.json: test_acc=nan is not a finite number",
                   "deep/summary.json is not a run summary",
                   "folder/summary.json is a folder, not a run's record file",
                   "fifo/summary.json is a FIFO, not a run's record file"):
        assert sum(needle in line for line in lines) == 1, (needle, res.stderr)
    assert "1 runs -> " in res.stderr and "| bn |" in res.stdout


# ---------------------------------------------------------------- data (issue 21, items 8-9)

from test_data import cifar10_pickled, image_folder, make_tar, write_pickle  # noqa: E402,F401

from engine.data import load_dataset  # noqa: E402
from engine.datatypes import DataError  # noqa: E402


def one_line(excinfo, needle: str) -> None:
    text = str(excinfo.value)
    assert needle in text and "\n" not in text, text


@pytest.mark.parametrize("labels,needle", [
    (None, "has 4 images but labels of type NoneType"),
    ("abcd", "has 4 images but labels of type str"),
    ([[1], [2], [3], [4]], "has a label [1] of type list; expected integers 0..9"),
    ([1.5, 2.0, 3.0, 4.0], "has a label 1.5 of type float; expected integers 0..9"),
    ([1, None, 3, 4], "has a label None of type NoneType; expected integers 0..9"),
    ([1, 2, 3], "has 4 images but 3 labels"),
    ("shared", "has a label [[[...], [...]], [[...], [...]]] of type list"),
])
def test_pickled_labels_that_are_not_integers_are_one_line(cifar10_pickled, labels, needle):
    """Float labels were truncated silently; None, strings and nested lists were tracebacks."""
    d = cifar10_pickled[0]
    if labels == "shared":  # 40 levels of two references each: 2**40 labels in 500 bytes
        level = [0]
        for _ in range(40):
            level = [level, level]
        labels = [level] * 4
    data = pickle_load(d / "data_batch_2")[b"data"]
    write_pickle(d / "data_batch_2", {b"data": data, b"labels": labels})
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(d))
    one_line(e, needle)


@pytest.mark.parametrize("data,needle", [
    (lambda a: a.astype(object), "has data of shape (4, 3072) object; expected a uint8"),
    (lambda a: a.astype("U1"), "has data of shape (4, 3072) <U1; expected a uint8"),
    (lambda a: a.tolist(), "has data of type list; expected a uint8"),
])
def test_pickled_data_of_another_dtype_is_one_line(cifar10_pickled, data, needle):
    d = cifar10_pickled[0]
    batch = pickle_load(d / "data_batch_2")
    write_pickle(d / "data_batch_2", {**batch, b"data": data(batch[b"data"])})
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(d))
    one_line(e, needle)


def test_class_names_nested_without_end_are_one_line(cifar10_pickled):
    d = cifar10_pickled[0]
    (d / "batches.meta").write_bytes(deep_pickle(100_000))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(d))
    assert "\n" not in str(e.value) and "batches.meta" in str(e.value), str(e.value)


def pickle_load(path):
    import pickle
    return pickle.loads(path.read_bytes())


def deep_pickle(depth: int) -> bytes:
    """{b'label_names': [[[...]]]} nested `depth` deep, written by hand (pickle.dumps itself
    would recurse): EMPTY_LIST, then depth x (EMPTY_LIST ... APPEND) built inside out."""
    import pickle
    body = b"]" * (depth + 1) + b"a" * depth  # EMPTY_LIST x (depth+1), APPEND x depth
    return (b"\x80\x02}" + pickle.dumps(b"label_names", 2)[2:-1] + body + b"s.")


def test_a_corrupt_xz_archive_is_one_line(image_folder, tmp_path):
    import tarfile
    archive = tmp_path / "c.tar"  # xz inside: tarfile's r:* finds the compression by content
    with tarfile.open(archive, "w:xz") as tf:
        tf.add(image_folder[0], arcname="cifar")
    blob = bytearray(archive.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0xFF
    archive.write_bytes(bytes(blob))
    with pytest.raises(DataError) as e:  # usually the stream's own error (LZMAError: "Corrupt
        load_dataset("cifar10", str(archive))  # input data"); before it, garbage may make a
    one_line(e, str(archive))  # member another one line refuses (a size, a name twice)


def test_a_member_named_twice_in_an_archive_is_refused(image_folder, tmp_path):
    """tar appends: a second member of one name was counted twice (decided: refused)."""
    import tarfile
    archive = make_tar(image_folder[0], tmp_path / "c.tar", "cifar")
    one = next((image_folder[0] / "train").rglob("*.png"))
    with tarfile.open(archive, "a") as tf:
        tf.add(one, arcname="cifar/" + str(one.relative_to(image_folder[0])))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(archive))
    one_line(e, f"the archive holds cifar/{one.relative_to(image_folder[0])} twice")


@pytest.mark.parametrize("as_archive", [False, True])
def test_a_huge_sparse_file_is_refused_from_its_size_unread(image_folder, tmp_path, as_archive):
    """A 20 GB sparse .png (a 50 GB tar member) was read whole: now refused from the size its
    file system (its tar header) states, before one byte is read."""
    root = image_folder[0]
    victim = next((root / "train").rglob("*.png"))
    with open(victim, "r+b") as f:
        f.truncate(20 << 30)  # sparse: no disk used
    target = root
    if as_archive:
        import tarfile
        target = tmp_path / "c.tar"
        with tarfile.open(target, "w") as tf:  # header only: the member's data is never written
            info = tarfile.TarInfo("cifar/train/airplane/0000.png")
            info.size = 50 << 30
            tf.addfile(info)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(target))
    one_line(e, "more than any CIFAR image file (1,048,576 at most); refused without reading it")


def test_a_huge_batch_is_checked_without_its_batch(monkeypatch):
    """batch_size_per_device=100000: validation's check used to run a forward on the whole
    device batch (6.5 GB); it now runs one image and judges each layer at the device's batch."""
    from norms import check_statistics
    seen = []
    original = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward",
                        lambda self, x: seen.append(x.shape[0]) or original(self, x))
    validate(make_cfg(*ONE, "batch_size_per_device=100000"))
    assert seen and set(seen) == {1}
    from models import build_model
    with pytest.raises(ValueError, match="batch statistics over 1 value per channel"):
        check_statistics(build_model("resnet", 20, norm="bn", groups=8), (1, 3, 1, 1))


def test_an_archive_whose_files_add_up_past_any_cifar_set_is_refused(image_folder, tmp_path,
                                                                     monkeypatch):
    """A gzip bomb of many image-sized members: refused once what it would hold passes the
    bound (here lowered to 20 kB; each PNG is about 3 kB), before the rest is read."""
    import engine.data
    monkeypatch.setattr(engine.data, "MAX_ARCHIVE_BYTES", 20_000)
    archive = make_tar(image_folder[0], tmp_path / "c.tar.gz", "cifar")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(archive))
    one_line(e, "the archive's image and pickle files add up to more than 20,000 bytes")


def test_file_and_class_names_that_are_not_utf8_load_and_hit_the_cache(image_folder,
                                                                         tmp_path):
    """datacache.source_key encoded names as UTF-8 and failed on the bytes a file system may
    hold: now keyed by the names' bytes, and the second load is the cache's."""
    root = image_folder[0]
    for split in ("train", "test"):
        os.rename(root / split / "airplane", os.fsdecode(os.fsencode(str(root / split)) + b"/\xff"))
    bird = root / "train" / "bird"
    os.rename(bird / "0000.png", os.fsdecode(os.fsencode(str(bird)) + b"/\xfe.png"))
    first = load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = load_dataset("cifar10", str(root), cache_dir=str(tmp_path / "cache"))
    assert first.fingerprint == again.fingerprint and len(first.train) == 30
