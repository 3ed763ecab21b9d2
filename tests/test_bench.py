"""scripts/bench.py runs end to end on tiny sizes and writes well-formed figures. It checks the
machinery, never the goals: speed is measured by running the script, not by tests."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

FIGURES = {"norm_vs_native": {"bn", "gn", "ln", "in", "bcn", "brn", "frn", "evonorm_b0",
                              "evonorm_s0", "mabn", "online", "cbn"}, "ws_conv_vs_conv": None,
           "scaled_ws_conv_vs_conv": None, "agc_vs_clip_grad_norm": None,
           "model_step_vs_bn": {"bn", "bcn_ws", "gn", "brn", "frn", "evonorm_b0", "evonorm_s0",
                                "mabn", "online", "cbn", "nf"},
           "bf16_speedup": {"bn", "bcn_ws", "gn", "brn", "frn", "evonorm_b0", "evonorm_s0",
                            "mabn", "online", "cbn", "nf"},
           "step_vs_bare": {"2", "32"}, "loader_vs_torchvision": {"2", "128"},
           "virtual_vs_accumulate": None}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_suite_writes_every_figure(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick",
                          "--threads", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    details = result["details"]
    for name, keys in FIGURES.items():
        value = result[name]
        if keys is None:
            assert positive(value), (name, value)
            continue
        assert set(value) == keys, (name, value)
        for case in value.values():
            for v in (case.values() if isinstance(case, dict) else [case]):
                assert positive(v), (name, value)
    # Each figure is its details' ratio: ours / base, or base / ours where more is better.
    for norm, shapes in result["norm_vs_native"].items():
        for shape, v in shapes.items():
            assert v == details["norm_vs_native"][norm][shape]["ratio"]
    for fig in ("ws_conv_vs_conv", "scaled_ws_conv_vs_conv"):
        assert result[fig] == max(d["ratio"] for d in details[fig]["by_shape"].values())
    assert result["agc_vs_clip_grad_norm"] == details["agc_vs_clip_grad_norm"]["ratio"]
    assert details["agc_vs_clip_grad_norm"]["parameters"] > 0
    for fig in ("model_step_vs_bn", "bf16_speedup"):
        for norm, cases in result[fig].items():
            assert set(cases) == {"1", "4"}  # quick: 4 images a step, b = 1 (4 devices) and 4
            for b, v in cases.items():
                assert v == details[fig][norm][b]["ratio"]
    for cases in details["bf16_speedup"].values():  # each side ran at its precision
        assert all(d["logits"] == ["float32", "bfloat16"] for d in cases.values())
    for b, v in result["step_vs_bare"].items():
        assert v == details["step_vs_bare"][b]["ratio"]
    for b, v in result["loader_vs_torchvision"].items():
        assert v == pytest.approx(1 / details["loader_vs_torchvision"][b]["time_ratio"])
    assert result["virtual_vs_accumulate"] == pytest.approx(
        1 / details["virtual_vs_accumulate"]["time_ratio"])
    assert set(result["norm_vs_native"]["bcn"]) == {"8x16x4x4", "2x16x4x4"}
    goals = result["goals"]
    assert goals["norm_vs_native.bcn.2x16x4x4"]["goal"] == "<= 2.5"
    assert goals["norm_vs_native.brn.2x16x4x4"]["goal"] == "<= 2.0"
    assert goals["norm_vs_native.gn.2x16x4x4"]["goal"] == "<= 1.5"
    assert goals["loader_vs_torchvision.128"]["goal"] == ">= 5.0"
    for g in goals.values():  # met: the value on the goal's side
        op, bound = g["goal"].split()
        assert g["met"] == (g["value"] <= float(bound) if op == "<=" else
                            g["value"] >= float(bound)), g
    assert {"torch", "threads", "date", "wall_s", "cpu", "allocator"} <= set(result["setting"])
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == len(goals) + 2 and table in res.stdout
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[5:8]
            for line in table.splitlines()[2:]}
    for case, g in goals.items():
        fig, _, rest = case.partition(".")
        ratio, goal, met = (cell.strip() for cell in rows[(fig, rest or "-")])
        assert (ratio, goal, met) == (f"{g['value']:.2f}", g["goal"], "yes" if g["met"] else "NO")


class FakeClock:
    """time.perf_counter for bench.paired: `ours` takes 3 s a call, `base` 1 s."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def __call__(self):
        return self.now

    def side(self, name, seconds):
        def call():
            self.now += seconds
            self.calls.append(name)
        return call


def test_paired_timing_reports_each_side_and_their_ratio(monkeypatch):
    bench = load_bench()
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    res = bench.paired(clock.side("ours", 3.0), clock.side("base", 1.0), repeats=3,
                       target_s=6.0, warmup=2)
    assert res == {"ratio": 3.0, "ours_s": 3.0, "base_s": 1.0, "calls_per_round": 2}
    # warm-up, one call of ours to size the rounds (6 s / 3 s: 2 calls), then 3 rounds of 2
    # calls a side, alternating which side goes first
    assert clock.calls == ["ours", "base"] * 2 + ["ours"] + [
        *["ours"] * 2, *["base"] * 2, *["base"] * 2, *["ours"] * 2, *["ours"] * 2, *["base"] * 2]


def test_torchvision_reads_the_generated_cifar10_layout(tmp_path):
    """The loader figure compares the same images on both sides."""
    import torchvision.transforms as T

    from engine.data import load_dataset

    bench = load_bench()
    bench.write_cifar10_pickles(tmp_path, 20)
    ours = load_dataset("cifar10", tmp_path).train
    theirs = bench.torchvision_cifar10(tmp_path, T.PILToTensor())
    assert len(theirs) == len(ours) == 20
    image, label = theirs[7]
    assert (image == ours.images[7]).all() and label == ours.labels[7]


def test_an_unknown_figure_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as e:
        load_bench().main(["--only", "norm,foo"])
    assert e.value.code == 2
    assert "--only=norm,foo: foo unknown; allowed: a comma-separated subset of norm,ws,nf" \
        in capsys.readouterr().err
