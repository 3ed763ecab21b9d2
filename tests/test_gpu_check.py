"""scripts/gpu_check.sh in CPU mode on tiny sizes: every kind of check runs and is reported, a
comparison out of tolerance fails the check and the exit status, the plan follows norms.NORMS.
What needs CUDA (fp16, CUDA graphs, NCCL) is reported as skipped here; a GPU runs it."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TINY = ("--device", "cpu", "--threads", "1", "--depth", "8", "--steps", "4",
        "--global-batch", "8", "--test-size", "16", "--timing-train-size", "64",
        "--timing-test-size", "16")
CHECK_KEYS = {"name", "status", "reason", "detail", "numbers", "seconds", "log"}


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def gpu_check(out, *args, timeout=300) -> subprocess.CompletedProcess:
    """The wrapper, as a user runs it (its --device cuda overridden by TINY's --device cpu)."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), *TINY,
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_cpu_mode_runs_every_kind_of_check_and_reports_it(tmp_path):
    """13 tiny train.py runs (one through torchrun), two at a time as a GPU runs them, and
    bench.py: about half a minute on a 2-core CPU."""
    res = gpu_check(tmp_path, "--jobs", "2", "--norms", "bn", "--ddp-norms", "syncbn",
                    "--fast-paths", "bf16,fp16,channels_last,cuda_graphs",
                    "--bench-only", "step", "--bench-quick")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    checks = {c["name"]: c for c in s["checks"]}
    assert list(checks) == s["planned"] == [
        "norm:bn", "ddp:syncbn",
        "fast:bn:fp32", "fast:bn:channels_last", "fast:bn:cuda_graphs", "fast:bn:bf16",
        "fast:bn:fp16",
        "fast:bcn_ws:fp32", "fast:bcn_ws:channels_last", "fast:bcn_ws:cuda_graphs",
        "fast:bcn_ws:bf16", "fast:bcn_ws:fp16",
        "bench", "time:bn", "time:bcn_ws", "projection"]
    assert s["finished"] and s["failed"] == [] and s["device"] == "cpu"
    assert {"date", "command", "code", "torch", "settings"} <= set(s)
    for c in checks.values():
        assert set(c) == CHECK_KEYS, c
        cuda_only = c["name"].endswith((":fp16", ":cuda_graphs"))
        assert (c["status"], c["reason"]) == (("skipped", "needs CUDA") if cuda_only
                                              else ("passed", "")), c
        if c["status"] == "passed" and c["name"] != "projection":
            assert c["seconds"] > 0 and (tmp_path / "logs" / (
                c["name"].replace(":", "_") + ".log")).exists(), c

    loss = checks["norm:bn"]["numbers"]["train_loss"]
    assert len(loss) == 2 and loss[1] < loss[0]
    bf16 = checks["fast:bcn_ws:bf16"]["numbers"]
    assert bf16["changed"] and 0 < max(bf16["max_rel_diff"].values()) <= bf16["tolerance"] == 5e-2
    assert checks["fast:bn:channels_last"]["numbers"]["tolerance"] == 1e-4
    assert checks["fast:bn:fp32"]["numbers"]["run_to_run"] == {"train_loss": 0.0,
                                                                "test_loss": 0.0}
    ddp = checks["ddp:syncbn"]["numbers"]
    assert (ddp["processes"], ddp["backend"]) == (2, "gloo")
    assert max(ddp["max_rel_diff"].values()) <= 1e-4
    assert checks["bench"]["numbers"]["cases"] == 2  # step_vs_bare at b = 2 and 32
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["setting"]["device"] == \
        "cpu"
    for norm in ("bn", "bcn_ws"):
        t = checks[f"time:{norm}"]["numbers"]
        assert t["setting"] in t["candidates_images_per_sec"]
        assert t["setting"] == max(t["candidates_images_per_sec"],
                                   key=t["candidates_images_per_sec"].get)
        assert t["startup_s"] > 0 and t["steady_epoch_s"] > 0
    p = checks["projection"]["numbers"]
    assert (p["cells"], p["epochs"]) == (12 * 7, 30)  # experiment=microbatch: 12 norms x 7 b
    assert p["study_low_s"] < p["study_estimate_s"] < p["study_high_s"]

    readme = (tmp_path / "README.md").read_text()
    assert "| fast:bn:fp16 | skipped (needs CUDA) |" in readme and "--device cpu" in readme
    assert "| projection | passed |" in res.stdout
    assert (tmp_path / ".gitignore").read_text() == "runs/\n"


def test_a_comparison_out_of_tolerance_fails_the_check_and_the_exit_status(tmp_path):
    res = gpu_check(tmp_path, "--checks", "fast", "--fast-norms", "bn", "--fast-paths", "bf16",
                    "--tolerance-scale", "0")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILED: fast:bn:bf16" in res.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    checks = {c["name"]: c for c in s["checks"]}
    assert s["failed"] == ["fast:bn:bf16"] and checks["fast:bn:fp32"]["status"] == "passed"
    assert checks["fast:bn:bf16"]["reason"].startswith("losses differ from fp32 eager by")
    assert "| fast:bn:bf16 | failed (losses differ" in (tmp_path / "README.md").read_text()


def test_a_fast_path_that_changes_nothing_fails(tmp_path, monkeypatch):
    """bf16, fp16 and compile must change the losses (autocast and inductor did run)."""
    gc = load_gpu_check()
    a = gc.parse(["--device", "cpu", "--out", str(tmp_path)])
    ref = gc.Run(0, 1.0, [{"train_loss": 2.0, "test_loss": 1.9, "images_per_sec": 10.0}],
                 "completed", "")
    monkeypatch.setattr(gc, "train", lambda *args, **kwargs: ref)
    state = gc.State(references={"bn": ref})
    c = gc.fast_path(a, "bn", "bf16", state)
    assert c.status == "failed" and "bf16 changed nothing" in c.reason
    assert gc.fast_path(a, "bn", "channels_last", state).status == "passed"  # may be bit-equal
    assert gc.fast_path(a, "bcn_ws", "bf16", state).reason == "the fp32 eager reference failed"


def test_the_plan_follows_norms_NORMS_at_run_time(tmp_path, monkeypatch, capsys):
    gc = load_gpu_check()
    monkeypatch.setattr(gc.norms, "NORMS", (*gc.norms.NORMS, "newnorm"))
    assert gc.main(["--device", "cpu", "--out", str(tmp_path), "--list"]) == 0
    planned = capsys.readouterr().out.split()
    assert [n for n in planned if n.startswith("norm:")] == \
        [f"norm:{n}" for n in gc.norms.NORMS]
    assert {"fast:bn:fp16", "fast:bcn_ws:cuda_graphs", "fast:bcn_ws:compile", "ddp:syncbn",
            "bench", "time:bn", "time:bcn_ws", "projection"} <= set(planned)
    assert not (tmp_path / "summary.json").exists()  # --list runs nothing


def test_the_projection_brackets_the_study_by_its_extreme_cells():
    gc = load_gpu_check()
    p = gc.project({"bn": {"startup_s": 10, "first_epoch_s": 5, "steady_epoch_s": 2},
                    "bcn_ws": {"startup_s": 10, "first_epoch_s": 9, "steady_epoch_s": 4}},
                   cells=49, epochs=30)
    assert p["cell_s"] == {"bn": 10 + 5 + 29 * 2, "bcn_ws": 10 + 9 + 29 * 4}
    assert (p["study_low_s"], p["study_high_s"]) == (49 * 73, 49 * 135)
    assert p["study_estimate_s"] == 49 * 104 and p["goal_s"] == 3600
    assert p["meets_goal"] is False  # 85 minutes


@pytest.mark.parametrize("args,message", [
    (["--checks", "norms,speed"],
     "error: --checks=speed is unknown; allowed: norms, fast, ddp, bench, time"),
    (["--norms", "bn,xx"], "error: --norms=xx is unknown; allowed: bn, "),
    (["--global-batch", "9"],
     "error: --global-batch=9 is invalid; allowed: a multiple of --procs=2"),
    (["--steps", "0"], "error: --steps=0 is invalid; allowed: >= 1"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    gc = load_gpu_check()
    with pytest.raises(SystemExit) as e:
        gc.main(["--device", "cpu", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    gc = load_gpu_check()
    if gc.torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as e:
        gc.main(["--out", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err == \
        "error: --device=cuda but no CUDA device is visible; allowed here: cpu\n"
