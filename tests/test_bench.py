"""scripts/bench.py runs end to end on tiny sizes and writes well-formed figures. It checks the
machinery, never the goals: speed is measured by running the script, not by tests."""
import importlib.util
import json
import math
import subprocess
import sys

from conftest import ROOT

FIGURES = {"norm_vs_native": {"bn", "gn", "ln", "in", "bcn", "brn", "frn", "evonorm_b0",
                              "evonorm_s0", "mabn"}, "ws_conv_vs_conv": None,
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
    for name, keys in FIGURES.items():
        value = result[name]
        if keys is None:
            assert positive(value), (name, value)
            continue
        assert set(value) == keys, (name, value)
        for case in value.values():
            for v in (case.values() if isinstance(case, dict) else [case]):
                assert positive(v), (name, value)
    assert set(result["norm_vs_native"]["bcn"]) == {"8x16x4x4", "2x16x4x4"}
    goals = result["goals"]
    assert goals["norm_vs_native.bcn.2x16x4x4"]["goal"] == "<= 2.5"
    assert goals["loader_vs_torchvision.128"]["goal"] == ">= 5.0"
    assert all(isinstance(g["met"], bool) for g in goals.values())
    assert {"torch", "threads", "date", "wall_s", "cpu", "allocator"} <= set(result["setting"])
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == len(goals) + 2 and table in res.stdout


def test_paired_timing_reports_each_side_and_their_ratio():
    bench = load_bench()
    res = bench.paired(lambda: sum(range(2000)), lambda: sum(range(1000)), repeats=3,
                       target_s=0.001)
    assert positive(res["ratio"]) and positive(res["ours_s"]) and positive(res["base_s"])
    assert res["calls_per_round"] >= 1


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
