"""GPU readiness: every CUDA path of the project in one prepared check.

    scripts/gpu_check.sh [OUT]                       # one GPU; OUT: results/performance-gpu
    python scripts/gpu_check.py --device cpu --out OUT --depth 8 --steps 4 ...   # the tests

A GPU is lent to this project now and then, for minutes. This turns those minutes into evidence:
each check is passed, failed or skipped (a fast path the device cannot run), with its numbers,
seconds and log (OUT/logs/<check>.log).

  norm:<name>         every norm in norms.NORMS (read at run time) trains ResNet-20 in fp32 for
                      --steps optimizer steps (b = 8 on virtual devices): it completes with
                      finite losses and its training loss falls
  fast:<norm>:fp32    the reference of the fast paths, at the study's extreme cells (bn at
                      b = 64, bcn_ws at b = 1 on 64 virtual devices): fp32 eager, run twice to
                      show the device's run-to-run noise
  fast:<norm>:<path>  bf16, fp16, channels_last, compile, cuda_graphs against that reference:
                      losses within the CPU tests' tolerance, and changed where those tests
                      require it; a path the device cannot run is skipped (needs CUDA). A
                      same-maths path that misses 1e-4 by no more than the reference's own
                      run-to-run noise (cuDNN's atomics, TF32) shows the tolerance, not the path
                      at fault: compare the two numbers before fixing code
  ddp:<norm>          bn, syncbn, bcn_ws through torchrun on every GPU (NCCL; on a CPU two gloo
                      processes) against the same run on virtual devices
  bench               scripts/bench.py --device D, its figures under OUT/bench/
  time:<norm>         the extreme cells on the full training set (50k generated images, or
                      --data-root), two epochs, with the fastest validated fp32 setting
                      (eager, channels_last or cuda_graphs, by their fast-path images/s)
  projection          the whole study's wall time (experiment=microbatch: its cells, 30 epochs)

Every training run is train.py in a subprocess (torchrun for DDP): the user's path through
composition, validation and launch, and a crash fails one check, not the script. Three phases:
the fast-path references and the timed paths (channels_last, cuda_graphs) alone; then the norm,
DDP and other fast-path checks --jobs at a time; then the benchmark and the timings alone.
OUT/summary.json is rewritten after every check, so a machine taken back halfway leaves what
finished. Also written: OUT/README.md (table, command, machine, date), OUT/bench/, OUT/runs/
(replaced on each call; OUT/.gitignore keeps it out of git). Exits 1 naming the failed checks;
a bad option is one line and exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import norms  # noqa: E402  (norms.NORMS is read at run time: new norms join by themselves)
from engine.config import cxx_compiler, register  # noqa: E402
from engine.records import code_version  # noqa: E402

CHECKS = ("norms", "fast", "ddp", "bench", "time")
FAST_PATHS = {"bf16": ("trainer.precision=bf16",), "fp16": ("trainer.precision=fp16",),
              "channels_last": ("trainer.channels_last=true",),
              "compile": ("trainer.compile=true",), "cuda_graphs": ("trainer.cuda_graphs=true",)}
# The CPU tests' tolerances (tests/test_fastpaths.py): relative, on every epoch's train and test
# loss. bf16 and fp16 change the numbers (8 and 11 bits of mantissa); the others only the
# summation order.
TOLERANCE = {"bf16": 5e-2, "fp16": 5e-2, "channels_last": 1e-4, "compile": 1e-4,
             "cuda_graphs": 1e-4}
# Autocast or inductor that leaves every loss bit-equal to eager fp32 did not run (the CPU tests
# require this of bf16 and compile; fp16 is autocast too).
MUST_CHANGE = ("bf16", "fp16", "compile")
# The timing candidates, measured alone: fast paths that keep the fp32 maths (the study's results
# are fp32; trainer.precision is part of a run's identity). compile keeps it too, but its minute
# of CPU-bound compilation runs beside the other checks, and without mode=reduce-overhead it
# still launches every fused kernel, which is what limits these cells (the README's prediction).
TIMED = ("channels_last", "cuda_graphs")
# The study's extreme cells: images per device (None: the whole global batch on one device).
EXTREME_CELLS = {"bn": None, "bcn_ws": 1}
DDP_NORMS = ("bn", "syncbn", "bcn_ws")
DDP_TOLERANCE = 1e-4  # tests/test_distributed.py: train loss; the test loss gets twice that
GOAL_S = 3600  # the target: the whole study within one GPU-hour


def fail_usage(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------- results


@dataclass
class Check:
    name: str
    status: str = "passed"           # passed | failed | skipped
    reason: str = ""                 # why failed or skipped
    detail: str = ""                 # the one-line summary of the table
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0
    log: str = ""

    def fail(self, reason: str) -> "Check":
        if self.status != "failed":  # the first reason is the cause
            self.status, self.reason = "failed", reason
        return self


@dataclass
class Run:
    """One train.py (or torchrun) process and what its run record holds."""
    rc: int
    seconds: float
    metrics: list[dict]
    status: str | None               # summary.json's status
    last_line: str

    def problem(self) -> str | None:
        """Why this run cannot be used, or None."""
        if self.rc != 0:
            return f"exit {self.rc}: {self.last_line}"
        if self.status != "completed":
            return f"run status {self.status!r}, not 'completed'"
        if not self.metrics or not all(math.isfinite(m[k]) for m in self.metrics
                                       for k in ("train_loss", "test_loss")):
            return "non-finite or missing losses"
        return None

    def losses(self, key: str = "train_loss") -> list[float]:
        return [m[key] for m in self.metrics]

    def images_per_sec(self) -> float:
        """The last epoch's: free of compilation and graph capture."""
        return self.metrics[-1]["images_per_sec"]


def max_rel_diff(run: Run, ref: Run, key: str) -> float:
    a, b = run.losses(key), ref.losses(key)
    if len(a) != len(b) or not a:
        return math.inf
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


# ---------------------------------------------------------------- processes


# The runs under way, each in its own process group (a timeout then also kills torchrun's
# workers); when the check itself is stopped (Ctrl-C, SIGTERM) they go too, and none starts.
_running: set[int] = set()
_stopping = threading.Event()


def stop_runs(signum, frame):
    """Signal handler: kill every run under way, then stop the way the signal asks."""
    _stopping.set()
    for pgid in list(_running):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def execute(cmd: list[str], log: Path, timeout: float, cwd: Path) -> tuple[int, float, str]:
    """Run `cmd`, appending its output to `log`; returns (exit status, seconds, its last
    line). On timeout the whole process group goes: 124."""
    if _stopping.is_set():
        return 130, 0.0, "stopped"
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "disabled"}
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        start = f.tell()
        tic = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        _running.add(p.pid)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = 124
        finally:
            _running.discard(p.pid)
        seconds = time.perf_counter() - tic
    with log.open("r+") as f:
        f.seek(start)
        lines = [line for line in f.read().splitlines() if line.strip()]
        last = f"timed out after {timeout:g} s" if rc == 124 else \
            (lines[-1].strip() if lines else "")
        f.write(f"[exit {rc} after {seconds:.1f} s]\n\n")
    return rc, seconds, last[:300]


def log_path(a, check: str) -> Path:
    return a.out / "logs" / (check.replace(":", "_") + ".log")


def overrides(a, *extra: str, epochs: int | None = None, data: tuple[str, ...] = ()) -> list[str]:
    """train.py overrides of every run: the study's experiment on generated data."""
    data = data or ("data=synthetic", f"data.train_size={a.train_size}",
                    f"data.test_size={a.test_size}")
    return ["experiment=microbatch", f"model.depth={a.depth}", *data,
            f"trainer.epochs={epochs or a.epochs}", f"trainer.device={a.device}",
            "logger.mode=disabled", "trainer.progress=false",
            *([f"trainer.num_threads={a.threads}"] if a.threads else []), *extra]


def train(a, check: str, name: str, extra: tuple[str, ...], procs: int = 0,
          epochs: int | None = None, data: tuple[str, ...] = ()) -> Run:
    """train.py with `extra` overrides into OUT/runs/<check>/<name>; torchrun with `procs`."""
    run_dir = a.out / "runs" / check.replace(":", "_") / name
    launcher = ["-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={procs}"] if procs else []
    cmd = [sys.executable, *launcher, str(ROOT / "train.py"),
           *overrides(a, *extra, epochs=epochs, data=data), f"hydra.run.dir={run_dir}"]
    rc, seconds, last = execute(cmd, log_path(a, check), a.run_timeout, a.out)
    metrics_file, summary_file = run_dir / "metrics.jsonl", run_dir / "summary.json"
    metrics = [json.loads(x) for x in metrics_file.read_text().splitlines()] \
        if metrics_file.exists() else []
    status = json.loads(summary_file.read_text())["status"] if summary_file.exists() else None
    return Run(rc, seconds, metrics, status, last)


def layout(b: int, global_batch: int) -> tuple[str, ...]:
    """b images per device on global_batch / b virtual devices."""
    return f"batch_size_per_device={b}", f"trainer.virtual_devices={global_batch // b}"


# ---------------------------------------------------------------- 1. every norm, fp32


def check_norm(a, norm: str) -> list[Check]:
    c = Check(f"norm:{norm}", log=str(log_path(a, f"norm:{norm}")))
    r = train(a, c.name, "fp32", (f"norm={norm}", *layout(math.gcd(8, a.global_batch),
                                                             a.global_batch)))
    c.seconds = r.seconds
    if r.problem():
        return [c.fail(r.problem())]
    loss = r.losses()
    c.numbers = {"train_loss": loss, "test_loss": r.losses("test_loss"),
                 "test_acc": r.metrics[-1]["test_acc"], "images_per_sec": r.images_per_sec()}
    c.detail = f"train loss {loss[0]:.3f} -> {loss[-1]:.3f}, {r.images_per_sec():.0f} img/s"
    if not loss[-1] < loss[0]:
        c.fail(f"the training loss did not fall ({loss[0]:.4f} -> {loss[-1]:.4f})")
    return [c]


# ---------------------------------------------------------------- 2. the fast paths


def unavailable(path: str, device: str) -> str | None:
    """Why `path` cannot run on `device` (the check is then skipped, not failed)."""
    if path in ("fp16", "cuda_graphs") and device != "cuda":
        return "needs CUDA"
    if path == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        return "no bf16 on this GPU"
    if path == "compile" and device == "cpu" and not cxx_compiler():
        return "needs a C++ compiler"
    return None


def cell(norm: str, global_batch: int) -> tuple[str, ...]:
    b = EXTREME_CELLS[norm] or global_batch
    return (f"norm={norm}", *layout(b, global_batch))


def check_reference(a, norm: str, state: "State") -> list[Check]:
    """The fp32 eager reference of `norm`'s extreme cell, twice (the device's run-to-run
    noise), then the timed fast paths against it; measured alone."""
    args = cell(norm, a.global_batch)
    c = Check(f"fast:{norm}:fp32", log=str(log_path(a, f"fast:{norm}:fp32")))
    ref = train(a, c.name, "eager", args)
    again = train(a, c.name, "eager_again", args)
    c.seconds = ref.seconds + again.seconds
    if ref.problem() or again.problem():
        c.fail(ref.problem() or again.problem())
    else:
        state.references[norm] = ref
        noise = {k: max_rel_diff(again, ref, k) for k in ("train_loss", "test_loss")}
        c.numbers = {"train_loss": ref.losses(), "test_loss": ref.losses("test_loss"),
                     "images_per_sec": ref.images_per_sec(), "run_to_run": noise}
        c.detail = f"{ref.images_per_sec():.0f} img/s; run to run {max(noise.values()):.1e}"
    return [c, *(fast_path(a, norm, p, state) for p in a.fast_paths if p in TIMED)]


def fast_path(a, norm: str, path: str, state: "State") -> Check:
    """`path` on `norm`'s extreme cell against the fp32 eager reference."""
    c = Check(f"fast:{norm}:{path}", log=str(log_path(a, f"fast:{norm}:{path}")))
    why = unavailable(path, a.device)
    if why:
        return Check(c.name, "skipped", why)
    ref = state.references.get(norm)
    if ref is None:
        return c.fail("the fp32 eager reference failed")
    args = cell(norm, a.global_batch)
    r = train(a, c.name, path, (*args, *FAST_PATHS[path]))
    c.seconds = r.seconds
    if r.problem():
        return c.fail(r.problem())
    diff = {k: max_rel_diff(r, ref, k) for k in ("train_loss", "test_loss")}
    tolerance = TOLERANCE[path] * a.tolerance_scale
    changed = r.losses() != ref.losses() or r.losses("test_loss") != ref.losses("test_loss")
    speedup = r.images_per_sec() / ref.images_per_sec()
    c.numbers = {"max_rel_diff": diff, "tolerance": tolerance, "changed": changed,
                 "train_loss": r.losses(), "images_per_sec": r.images_per_sec(),
                 "speedup": speedup, "measured_alone": path in TIMED}
    worst = max(diff.values())
    c.detail = f"rel. diff {worst:.1e} (tol {tolerance:.0e}), {speedup:.2f}x fp32's img/s"
    if not worst <= tolerance:
        c.fail(f"losses differ from fp32 eager by {worst:.2e} (relative), tolerance "
               f"{tolerance:.0e}")
    if path in MUST_CHANGE and not changed:
        c.fail(f"every loss equals fp32 eager's: {path} changed nothing (did it run?)")
    return c


# ---------------------------------------------------------------- 3. DDP


def check_ddp(a, norm: str) -> list[Check]:
    """torchrun on a.procs processes against one process with as many virtual devices more."""
    n, g = a.procs, a.global_batch
    b = math.gcd(8, g // n)
    c = Check(f"ddp:{norm}", log=str(log_path(a, f"ddp:{norm}")))
    common = (f"norm={norm}", f"batch_size_per_device={b}")
    ddp = train(a, c.name, "torchrun", (*common, f"trainer.virtual_devices={g // n // b}"),
                procs=n)
    virtual = train(a, c.name, "virtual", (*common, f"trainer.virtual_devices={g // b}"))
    c.seconds = ddp.seconds + virtual.seconds
    if ddp.problem() or virtual.problem():
        return [c.fail(ddp.problem() or virtual.problem())]
    diff = {k: max_rel_diff(ddp, virtual, k) for k in ("train_loss", "test_loss")}
    tol = {"train_loss": DDP_TOLERANCE * a.tolerance_scale,
           "test_loss": 2 * DDP_TOLERANCE * a.tolerance_scale}
    backend = ("nccl" if a.device == "cuda" else "gloo") if n > 1 else None
    c.numbers = {"processes": n, "backend": backend, "batch_size_per_device": b,
                 "max_rel_diff": diff, "tolerance": tol}
    c.detail = (f"{n} process(es), {backend or 'no process group'}; rel. diff "
                f"{max(diff.values()):.1e}")
    for k in diff:
        if not diff[k] <= tol[k]:
            c.fail(f"{k} differs from virtual devices by {diff[k]:.2e} (relative), tolerance "
                   f"{tol[k]:.0e}")
    return [c]


# ---------------------------------------------------------------- 4. the benchmark


def check_bench(a) -> list[Check]:
    c = Check("bench", log=str(log_path(a, "bench")))
    out = a.out / "bench"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", a.device,
           "--out", str(out), *(["--only", a.bench_only] if a.bench_only else []),
           *(["--quick"] if a.bench_quick else []),
           *(["--threads", str(a.threads)] if a.threads else [])]
    rc, c.seconds, last = execute(cmd, log_path(a, "bench"), a.run_timeout, a.out)
    if rc != 0 or not (out / "bench.json").exists():
        return [c.fail(f"exit {rc}: {last}")]
    goals = json.loads((out / "bench.json").read_text())["goals"]
    met = sum(g["met"] for g in goals.values())
    c.numbers = {"goals": {k: g["value"] for k, g in goals.items()}, "goals_met": met,
                 "cases": len(goals), "files": str(out)}
    c.detail = f"{met} of {len(goals)} goals met (bench/table.md)"
    return [c]


# ---------------------------------------------------------------- 5. timings and projection


def fastest(norm: str, done: dict[str, Check]) -> tuple[str, dict[str, float]]:
    """The fastest fp32 setting validated for `norm`'s cell: eager, or a timed fast path that
    passed, by its images/s in the fast-path check (its last epoch, measured alone)."""
    candidates = {}
    ref = done.get(f"fast:{norm}:fp32")
    if ref and ref.status == "passed":
        candidates["fp32"] = ref.numbers["images_per_sec"]
    for path in TIMED:
        c = done.get(f"fast:{norm}:{path}")
        if c and c.status == "passed":
            candidates[path] = c.numbers["images_per_sec"]
    return (max(candidates, key=candidates.get) if candidates else "fp32"), candidates


def epoch_times(r: Run) -> dict[str, float]:
    """startup: process start to the first step (imports, device, data, model); the first
    epoch (with compilation or graph capture); a steady epoch (the last). Each epoch includes
    its evaluation and checkpoint."""
    elapsed = [m["elapsed_s"] for m in r.metrics]
    steady = elapsed[-1] - elapsed[-2] if len(elapsed) > 1 else elapsed[0]
    return {"startup_s": r.seconds - elapsed[-1], "first_epoch_s": elapsed[0],
            "steady_epoch_s": steady, "images_per_sec": r.images_per_sec()}


def check_time(a, norm: str, done: dict[str, Check]) -> list[Check]:
    c = Check(f"time:{norm}", log=str(log_path(a, f"time:{norm}")))
    setting, candidates = fastest(norm, done)
    data = ("data=cifar10", f"data.root={a.data_root}", "data.download=false") if a.data_root \
        else ("data=synthetic", f"data.train_size={a.timing_train_size}",
              f"data.test_size={a.timing_test_size}")
    r = train(a, c.name, setting, (*cell(norm, a.global_batch), *FAST_PATHS.get(setting, ())),
              epochs=a.timing_epochs, data=data)
    c.seconds = r.seconds
    if r.problem():
        return [c.fail(r.problem())]
    t = epoch_times(r)
    c.numbers = {"setting": setting, "candidates_images_per_sec": candidates,
                 "data": a.data_root or f"synthetic, {a.timing_train_size} images", **t}
    c.detail = (f"{setting}: steady epoch {t['steady_epoch_s']:.1f} s, first "
                f"{t['first_epoch_s']:.1f} s, startup {t['startup_s']:.1f} s")
    return [c]


def project(timings: dict[str, dict], cells: int, epochs: int) -> dict:
    """The study's wall time, one cell after another, bracketed by its extreme cells: each cell
    costs its startup, a first epoch and (epochs - 1) steady ones."""
    cost = {k: t["startup_s"] + t["first_epoch_s"] + (epochs - 1) * t["steady_epoch_s"]
            for k, t in timings.items()}
    low, high = min(cost.values()), max(cost.values())
    estimate = cells * (low + high) / 2
    return {"cells": cells, "epochs": epochs, "cell_s": cost, "study_low_s": cells * low,
            "study_estimate_s": estimate, "study_high_s": cells * high, "goal_s": GOAL_S,
            "meets_goal": estimate <= GOAL_S}


def check_projection(a, done: dict[str, Check]) -> list[Check]:
    c = Check("projection")
    timings = {n: done[f"time:{n}"].numbers for n in a.fast_norms
               if done.get(f"time:{n}") and done[f"time:{n}"].status == "passed"}
    if not timings:
        return [Check(c.name, "skipped", "no timing passed")]
    p = project(timings, a.cells, a.study_epochs)
    c.numbers = {**p, "note": "start-up is a fresh process's; a sweep with Hydra's basic "
                 "launcher runs its cells in one process and pays imports and CUDA once"}
    c.detail = (f"{p['cells']} cells x {p['epochs']} epochs: about "
                f"{p['study_estimate_s'] / 60:.0f} min ({p['study_low_s'] / 60:.0f}-"
                f"{p['study_high_s'] / 60:.0f}); goal {GOAL_S // 60} min "
                f"{'met' if p['meets_goal'] else 'NOT met'} (a projection)")
    return [c]


# ---------------------------------------------------------------- the plan


@dataclass
class State:
    done: dict[str, Check] = field(default_factory=dict)
    references: dict[str, Run] = field(default_factory=dict)  # fast norm -> fp32 eager run


@dataclass
class Task:
    names: list[str]                          # the checks it reports, in order
    run: Callable[[State], list[Check]]
    phase: int                                # 1 and 3: alone, in order; 2: --jobs at a time


def plan(a) -> list[Task]:
    """Every check, in the order of the table. Phase 1 measures the fast-path references and
    the timed paths alone; phase 2 runs the rest of the training checks --jobs at a time;
    phase 3 the benchmark and the timings, alone."""
    tasks = []
    if "norms" in a.checks:
        tasks += [Task([f"norm:{n}"], lambda s, n=n: check_norm(a, n), 2) for n in a.norms]
    if "ddp" in a.checks:
        tasks += [Task([f"ddp:{n}"], lambda s, n=n: check_ddp(a, n), 2) for n in a.ddp_norms]
    if "fast" in a.checks:
        for n in a.fast_norms:
            timed = [p for p in a.fast_paths if p in TIMED]
            tasks.append(Task([f"fast:{n}:{p}" for p in ("fp32", *timed)],
                              lambda s, n=n: check_reference(a, n, s), 1))
            tasks += [Task([f"fast:{n}:{p}"], lambda s, n=n, p=p: [fast_path(a, n, p, s)], 2)
                      for p in a.fast_paths if p not in TIMED]
    if "bench" in a.checks:
        tasks.append(Task(["bench"], lambda s: check_bench(a), 3))
    if "time" in a.checks:
        tasks += [Task([f"time:{n}"], lambda s, n=n: check_time(a, n, s.done), 3)
                  for n in a.fast_norms]
        tasks.append(Task(["projection"], lambda s: check_projection(a, s.done), 3))
    return tasks


def run_task(task: Task, state: State, a) -> list[Check]:
    """A task's checks; a bug in this script fails them with its traceback in their log."""
    tic = time.perf_counter()
    try:
        return task.run(state)
    except Exception as e:  # noqa: BLE001 - reported as the checks' failure, never lost
        for name in task.names:
            with log_path(a, name).open("a") as f:
                f.write(traceback.format_exc())
        return [Check(n, "failed", f"gpu_check error: {type(e).__name__}: {e}",
                      seconds=time.perf_counter() - tic, log=str(log_path(a, n)))
                for n in task.names]


def run_all(a, tasks: list[Task], report: Callable[[Check, list[Check]], None]) -> dict:
    """The three phases; `report` hears of every finished check."""
    state = State()

    def finish(checks: list[Check]) -> None:
        for c in checks:
            state.done[c.name] = c
            report(c, list(state.done.values()))
    for t in (t for t in tasks if t.phase == 1):
        finish(run_task(t, state, a))
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = [pool.submit(run_task, t, state, a) for t in tasks if t.phase == 2]
        for future in as_completed(futures):
            finish(future.result())
    for t in (t for t in tasks if t.phase == 3):
        finish(run_task(t, state, a))
    return state.done


# ---------------------------------------------------------------- output


def environment(a) -> dict:
    bench = _load_bench()
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "code": code_version(ROOT), "torch": torch.__version__,
           "python": platform.python_version(), "cpu": bench.cpu_name(),
           "cpu_cores": os.cpu_count(), "device": a.device}
    if a.device == "cuda":
        env.update(gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   tf32={"cudnn": torch.backends.cudnn.allow_tf32,
                         "matmul": torch.backends.cuda.matmul.allow_tf32})
    return env


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(checks: list[Check]) -> str:
    rows = ["| check | status | seconds | detail |", "|---|---|--:|---|"]
    for c in checks:
        status = c.status if c.status == "passed" else f"{c.status} ({c.reason})"
        rows.append(f"| {c.name} | {status} | {c.seconds:.0f} | {c.detail} |")
    return "\n".join(rows)


def write(a, env: dict, checks: list[Check], planned: list[str], finished: bool) -> None:
    failed = [c.name for c in checks if c.status == "failed"]
    summary = {**env, "settings": settings(a), "finished": finished, "planned": planned,
               "failed": failed, "checks": [asdict(c) for c in checks]}
    tmp = a.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, a.out / "summary.json")
    machine = ", ".join(env.get("gpus") or []) or env["cpu"]
    (a.out / "README.md").write_text(
        f"# GPU check: {machine}, {env['date'][:10]}\n\n```bash\n{env['command']}\n```\n\n"
        f"torch {env['torch']}, {env['device']}, code {env['code']}. "
        f"{'Finished' if finished else 'Unfinished'}; failed: {', '.join(failed) or 'none'}. "
        "Numbers: summary.json; logs: logs/; benchmark: bench/.\n\n" + table(checks) + "\n")


def settings(a) -> dict:
    keys = ("checks", "norms", "fast_norms", "fast_paths", "ddp_norms", "depth", "steps",
            "epochs", "global_batch", "train_size", "test_size", "procs", "jobs",
            "tolerance_scale", "timing_train_size", "timing_test_size", "timing_epochs",
            "data_root", "cells", "study_epochs")
    return {k: getattr(a, k) for k in keys}


# ---------------------------------------------------------------- options


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where everything goes")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)}")
    p.add_argument("--norms", default="", help="norm checks (default: every norm in NORMS)")
    p.add_argument("--fast-norms", default=",".join(EXTREME_CELLS),
                   help="fast-path and timing norms")
    p.add_argument("--fast-paths", default=",".join(FAST_PATHS))
    p.add_argument("--ddp-norms", default=",".join(DDP_NORMS), help="norm presets (norm=...)")
    p.add_argument("--depth", type=int, default=20, help="ResNet depth")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per training run")
    p.add_argument("--epochs", type=int, default=2, help="epochs those steps span")
    p.add_argument("--global-batch", type=int, default=64, help="the study's: 64")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--procs", type=int, default=0,
                   help="DDP processes (default: every GPU; on a CPU 2)")
    p.add_argument("--jobs", type=int, default=0,
                   help="norm and DDP checks at a time (default: 4 on CUDA, 1 on a CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--bench-only", default="", help="bench.py --only (default: every figure)")
    p.add_argument("--bench-quick", action="store_true", help="bench.py --quick")
    p.add_argument("--timing-train-size", type=int, default=50000)
    p.add_argument("--timing-test-size", type=int, default=10000)
    p.add_argument("--timing-epochs", type=int, default=2, help=">= 2 to see a steady epoch")
    p.add_argument("--data-root", default=None,
                   help="real CIFAR-10 for the timings (data.root); default: generated data")
    p.add_argument("--cells", type=int, default=0,
                   help="cells in the study (default: experiment=microbatch's sweep)")
    p.add_argument("--study-epochs", type=int, default=0, help="default: the study's (30)")
    p.add_argument("--run-timeout", type=float, default=600, help="seconds per process")
    p.add_argument("--tolerance-scale", type=float, default=1.0,
                   help="multiplies every tolerance (tests: 0 shows a comparison failing)")
    p.add_argument("--list", action="store_true", help="print the planned checks and exit")
    a = p.parse_args(argv)
    return finish_options(a)


def split(a, key: str, allowed) -> list[str]:
    values = [v for v in getattr(a, key).split(",") if v]
    for v in values:
        if v not in allowed:
            fail_usage(f"--{key.replace('_', '-')}={v} is unknown; allowed: {', '.join(allowed)}")
    return values


def finish_options(a):
    """Lists from their comma-separated forms, defaults that depend on the device, checks."""
    if a.device == "cuda" and not torch.cuda.is_available():
        fail_usage("--device=cuda but no CUDA device is visible; allowed here: cpu")
    a.checks = split(a, "checks", CHECKS)
    a.norms = split(a, "norms", norms.NORMS) or list(norms.NORMS)
    a.fast_norms = split(a, "fast_norms", tuple(EXTREME_CELLS))
    a.fast_paths = split(a, "fast_paths", tuple(FAST_PATHS))
    a.ddp_norms = split(a, "ddp_norms", sorted(f.stem for f in (ROOT / "configs" / "norm")
                                                .glob("*.yaml")))
    a.procs = a.procs or (max(1, torch.cuda.device_count()) if a.device == "cuda" else 2)
    a.jobs = a.jobs or (4 if a.device == "cuda" else 1)
    for key in ("depth", "steps", "epochs", "global_batch", "test_size", "procs", "jobs",
                "timing_train_size", "timing_test_size", "timing_epochs"):
        if getattr(a, key) < 1:
            fail_usage(f"--{key.replace('_', '-')}={getattr(a, key)} is invalid; allowed: >= 1")
    if a.global_batch % a.procs:
        fail_usage(f"--global-batch={a.global_batch} is invalid; allowed: a multiple of "
                   f"--procs={a.procs}")
    a.train_size = a.global_batch * math.ceil(a.steps / a.epochs)
    study = study_config()
    a.cells = a.cells or study["cells"]
    a.study_epochs = a.study_epochs or study["epochs"]
    a.out = a.out.resolve()
    return a


def study_config() -> dict:
    """experiment=microbatch's number of cells (its sweep) and epochs, from the configs."""
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=microbatch"],
                      return_hydra_config=True)
    cells = math.prod(len(str(v).split(",")) for v in cfg.hydra.sweeper.params.values())
    return {"cells": cells, "epochs": cfg.trainer.epochs}


def main(argv=None) -> int:
    a = parse(argv)
    tasks = plan(a)
    planned = [n for t in tasks for n in t.names]
    if a.list:
        print("\n".join(planned))
        return 0
    for old in ("runs", "logs"):  # this script's own folders: a fresh check every time
        shutil.rmtree(a.out / old, ignore_errors=True)
    (a.out / "logs").mkdir(parents=True)
    (a.out / ".gitignore").write_text("runs/\n")
    env = environment(a)
    started = time.perf_counter()
    signal.signal(signal.SIGINT, stop_runs)
    signal.signal(signal.SIGTERM, stop_runs)

    def report(c: Check, checks: list[Check]) -> None:
        print(f"[{len(checks):2d}/{len(planned)}] {c.name}: {c.status}"
              f"{f' ({c.reason})' if c.reason else ''}  {c.seconds:.0f} s", flush=True)
        write(a, env, checks, planned, finished=False)
    try:
        done = run_all(a, tasks, report)
    except (KeyboardInterrupt, SystemExit):
        print(f"stopped; {a.out / 'summary.json'} holds the checks that finished",
              file=sys.stderr)
        return 130
    checks = [done[n] for n in planned]
    write(a, env, checks, planned, finished=True)
    print("\n" + table(checks))
    failed = [c.name for c in checks if c.status == "failed"]
    print(f"\n{len(checks)} checks in {time.perf_counter() - started:.0f} s; written to {a.out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
