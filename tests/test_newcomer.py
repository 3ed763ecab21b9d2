"""The newcomer's path: the README's quick-start commands run as printed, training curves reach
the tracker within epochs, the wandb sweep file drives train.py, and what the commands create
is ignored by git."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import engine.loop as loop
from engine.config import validate

from conftest import ROOT, TINY, make_cfg

# Appended to every README command: small generated data, one short epoch, no wandb.
SMALL = ("data=synthetic", "data.train_size=128", "data.test_size=32", "data.train_subset=0",
         "trainer.epochs=1", "logger.mode=disabled", "trainer.num_threads=1")


def readme_commands(*sections: str) -> list[str]:
    """The `python train.py ...` lines of the README's bash blocks in these sections."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for section in sections:
        body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            commands += [line.split("#")[0].strip() for line in joined.splitlines()
                         if line.strip().startswith("python train.py")]
    return commands


def test_the_readme_says_how_to_activate_the_environment():
    two = (ROOT / "README.md").read_text().split("\n## Two commands\n", 1)[1].split("\n## ")[0]
    assert "source .venv/bin/activate" in two


def test_the_readme_describes_every_file_the_report_writes():
    """The files listed in scripts/report.py's docstring ("Writes to DIR:") are each named in
    the README's paragraph on the report (the study section)."""
    doc = ast.get_docstring(ast.parse((ROOT / "scripts" / "report.py").read_text()))
    listed = doc.split("Writes to DIR:", 1)[1].split("Exit status", 1)[0]
    files = re.findall(r"^  (\S+\.(?:csv|md|png))\s", listed, re.M)
    assert "ranking.md" in files and len(files) >= 4
    text = (ROOT / "README.md").read_text()
    study = text.split("\n## The micro-batch study", 1)[1].split("\n## ", 1)[0]
    paragraph = study.split("`scripts/report.py RUN_DIRS...", 1)[1].split("\n\n", 1)[0]
    assert [f for f in files if f"`{f}`" not in paragraph] == []


def test_torchrun_threads_banner_is_explained_where_torchrun_is():
    """torchrun prints its OMP_NUM_THREADS banner before train.py runs (torch/distributed/
    run.py), which only the user's environment can prevent: the Devices section says so."""
    import torch.distributed.run as torchrun
    assert "Setting OMP_NUM_THREADS" in Path(torchrun.__file__).read_text()
    devices = (ROOT / "README.md").read_text().split("\n## Devices", 1)[1].split("\n## ", 1)[0]
    bullet = devices.split("- **CPU threads.**", 1)[1].split("\n- ", 1)[0]
    for words in ("Setting OMP_NUM_THREADS", "`OMP_NUM_THREADS=4 torchrun ...`",
                  "`trainer.num_threads=4`", "`trainer.devices=N` prints no banner"):
        assert words in bullet, words


def test_every_quick_start_command_runs_as_printed(tmp_path):
    """Every `python train.py` line of "Two commands" and "Examples", in order, in one folder,
    with small-data overrides appended: none fails, none refuses another's folder."""
    commands = readme_commands("Two commands", "Examples")
    assert len(commands) >= 5
    for command in commands:
        args = command.split()[2:]
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *SMALL],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (command, res.stderr[-2000:])
        assert "refus" not in res.stderr and "another config" not in res.stderr, command


class FakeTracker:
    """What engine.loop.train logs, recorded (a live tracker: .run is set)."""
    logged: list = []

    def __init__(self, *args, **kwargs):
        self.run = object()

    def log(self, metrics):
        FakeTracker.logged.append(dict(metrics))

    def finish(self, *args, **kwargs):
        pass


def test_training_curves_are_logged_within_epochs(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "Tracker", FakeTracker)
    FakeTracker.logged = []
    cfg = make_cfg(*TINY, "trainer.epochs=2", "trainer.check_every=2", "logger.log_every=4",
                   "logger.mode=offline")
    summary = loop.run(cfg, tmp_path)
    steps = [m for m in FakeTracker.logged if "step/train_loss" in m]
    epochs = [m for m in FakeTracker.logged if "test_acc" in m]
    assert len(steps) == 4 and len(epochs) == 2  # 8 steps an epoch: at steps 4 and 8
    assert [m["images_seen"] for m in steps] == [128, 256, 384, 512]
    assert [m["epoch"] for m in steps] == [0.5, 1.0, 1.5, 2.0]
    for m in steps:
        assert set(m) == {"step/train_loss", "step/train_acc", "step/lr",
                          "step/images_per_sec", "images_seen", "epoch"}
    # the two windows of an epoch (equal sizes) average to the epoch's training loss
    for e, m in enumerate(epochs):
        window = [s["step/train_loss"] for s in steps[2 * e:2 * e + 2]]
        assert sum(window) / 2 == pytest.approx(m["train_loss"], rel=1e-9)
    assert summary["best_test_acc"] == max(m["test_acc"] for m in epochs)


def test_curves_are_logged_every_log_every_steps_whatever_check_every(tmp_path, monkeypatch):
    """log_every=3 with checks every 5 steps (8 steps an epoch): logged at steps 3 and 6, each
    its own check, not at the checks; with wandb disabled the log points add no check."""
    monkeypatch.setattr(loop, "Tracker", FakeTracker)
    checks = []
    reduce_sum = loop.reduce_sum
    monkeypatch.setattr(loop, "reduce_sum", lambda t, proc: checks.append(t.numel()) or
                        reduce_sum(t, proc))
    args = (*TINY, "trainer.epochs=1", "trainer.check_every=5", "logger.log_every=3")
    FakeTracker.logged = []
    loop.run(make_cfg(*args, "logger.mode=offline"), tmp_path / "offline")
    assert [m["images_seen"] for m in FakeTracker.logged if "step/lr" in m] == [96, 192]
    assert checks.count(2) == 3  # steps 3, 5 and 6 (a check reduces [loss sum, correct])
    checks.clear()
    loop.run(make_cfg(*args), tmp_path / "disabled")
    assert checks.count(2) == 1  # step 5 only
    with pytest.raises(ValueError, match=r"logger.log_every=-1 is invalid"):
        validate(make_cfg(*TINY, "logger.log_every=-1"))


def test_the_wandb_sweep_file_drives_train_py():
    sweep = yaml.safe_load((ROOT / "configs" / "wandb" / "microbatch_sweep.yaml").read_text())
    assert sweep["program"] == "train.py"
    fixed = [a for a in sweep["command"] if not a.startswith("${")]
    assert fixed == ["python", "experiment=microbatch"]
    names = list(sweep["parameters"])
    combos = [[]]
    for name in names:
        combos = [c + [f"{name}={v}"] for c in combos for v in sweep["parameters"][name]["values"]]
    assert len(combos) == 8 * 4 * 2
    for combo in combos:  # what wandb's ${args_no_hyphens} expands to, after the fixed ones
        cfg = make_cfg("experiment=microbatch", *combo)
        validate(cfg)
        assert cfg.trainer.virtual_devices * cfg.batch_size_per_device == 64


def test_git_ignores_what_the_readme_commands_create(tmp_path):
    for path in ("outputs/x/summary.json", "multirun/x/y", "data/cifar-10-batches-py/a",
                 "report/table.md", "wandb/run-1/x"):
        res = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path])
        assert res.returncode == 0, path
    res = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q",
                          "tests/data/seam_reference.json"])
    assert res.returncode == 1  # the tests' own data stays tracked


def test_bench_prints_each_figure_as_it_completes():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick",
                          "--threads", "1", "--only", "ws,step"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    err = res.stderr
    assert "| ws_conv_vs_conv |" in err and "| step_vs_bare |" in err
    assert err.index("| ws_conv_vs_conv |") < err.index("| step_vs_bare |")
    assert "figure" in err  # the progress bar's unit
