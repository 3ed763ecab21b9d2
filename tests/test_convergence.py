"""scripts/convergence.py: the by-schedule table (final error, gap to BN at 64, rank, the gap's
change) from hand-made run records whose numbers make every cell checkable, and the curves."""
import importlib.util
import json

import pytest

from conftest import ROOT
from test_report import make_summary

_spec = importlib.util.spec_from_file_location("convergence", ROOT / "scripts" / "convergence.py")
convergence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convergence)

# (norm, ws, b, seed, epochs, test_acc): ResNet-20 on a 4- and a 20-epoch schedule. At 4 epochs
# BCN+WS at b = 1 beats GN; at 20 they swap, and GN's gap to BN closes.
CELLS = [
    ("bn", False, 64, 0, 4, 66.0), ("bn", False, 64, 1, 4, 68.0),
    ("bn", False, 1, 0, 4, 20.0),
    ("bcn", True, 1, 0, 4, 67.5),
    ("gn", False, 1, 0, 4, 50.0),
    ("bn", False, 64, 0, 20, 86.0),
    ("bn", False, 1, 0, 20, 30.0),
    ("bcn", True, 1, 0, 20, 85.0), ("bcn", True, 1, 1, 20, 86.0),
    ("gn", False, 1, 0, 20, 86.5),
]


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "studies"
    for norm, ws, b, seed, epochs, acc in CELLS:
        s = make_summary("resnet", 20, norm, ws, True, b, seed, "completed", acc, epochs)
        run = root / f"e{epochs}" / f"{s['norm_label']}_b{b}_s{seed}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(s))
        curve = [acc - 10 * (epochs - e) / epochs for e in range(1, epochs + 1)]
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "test_acc": a}) + "\n" for e, a in enumerate(curve, 1)))
    return root


def rows_of(text):
    return {tuple(c.strip() for c in line.strip("|").split("|")[:2]):
            [c.strip() for c in line.strip("|").split("|")[2:]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line
            and not line.startswith("| norm")}


def test_the_table_gives_each_cell_on_each_schedule_with_its_gap_rank_and_change(study, tmp_path):
    out = tmp_path / "out"
    assert convergence.main([str(study), "--out", str(out)]) == 0
    table = (out / "convergence.md").read_text()
    assert "| norm | b | 4 ep | gap | rank | 20 ep | gap | rank | Δgap |" in table
    rows = rows_of(table)
    # BN at 64: 33.00 ± 1.41 over two seeds at 4 epochs, 14.00 at 20: every gap's reference.
    assert rows[("bn", "64")] == ["33.00 ± 1.41 (n=2)", "+0.00", "1", "14.00 (n=1)", "+0.00",
                                  "1", "+0.00"]
    assert rows[("bcn_ws", "1")] == ["32.50 (n=1)", "-0.50", "1", "14.50 ± 0.71 (n=2)", "+0.50",
                                     "2", "+1.00"]
    assert rows[("gn", "1")] == ["50.00 (n=1)", "+17.00", "2", "13.50 (n=1)", "-0.50", "1",
                                 "-17.50"]
    assert rows[("bn", "1")] == ["80.00 (n=1)", "+47.00", "3", "70.00 (n=1)", "+56.00", "3",
                                 "+9.00"]
    assert (out / "curves.png").stat().st_size > 10_000
    # bn, bcn_ws and gn ran on both schedules; a cell only on one drops out with N = 2
    assert convergence.main([str(study), "--out", str(out), "--min-schedules", "2"]) == 0
    assert set(rows_of((out / "convergence.md").read_text())) == set(rows)
    extra = make_summary("resnet", 20, "ln", False, True, 1, 0, "completed", 40.0, 4)
    (study / "e4" / "ln_b1_s0").mkdir()
    (study / "e4" / "ln_b1_s0" / "summary.json").write_text(json.dumps(extra))
    assert convergence.main([str(study), "--out", str(out), "--min-schedules", "2"]) == 0
    assert set(rows_of((out / "convergence.md").read_text())) == set(rows)
    assert convergence.main([str(study), "--out", str(out)]) == 0
    assert rows_of((out / "convergence.md").read_text())[("ln", "1")][:3] == [
        "60.00 (n=1)", "+27.00", "3"]
    # a model whose cells ran on one schedule only gets no (empty) table with N = 2
    vgg = make_summary("vgg", 11, "bn", False, True, 64, 0, "completed", 30.0, 4)
    (study / "e4" / "vgg_bn_b64_s0").mkdir()
    (study / "e4" / "vgg_bn_b64_s0" / "summary.json").write_text(json.dumps(vgg))
    assert convergence.main([str(study), "--out", str(out), "--min-schedules", "2"]) == 0
    assert "VGG-11" not in (out / "convergence.md").read_text()
    assert convergence.main([str(study), "--out", str(out)]) == 0
    assert "## VGG-11" in (out / "convergence.md").read_text()


def test_curves_come_from_each_runs_metrics_and_select_keeps_matching_cells(study, tmp_path,
                                                                             capsys):
    out = tmp_path / "out"
    assert convergence.main([str(study), "--out", str(out), "--select", "bcn_ws b=1$"]) == 0
    assert "3 runs" in capsys.readouterr().err
    rows = rows_of((out / "convergence.md").read_text())
    assert list(rows) == [("bcn_ws", "1")]
    drawn = []
    import matplotlib.axes
    original = matplotlib.axes.Axes.plot

    def spy(ax, xs, ys, **kw):
        drawn.append((list(xs), list(ys), kw["label"]))
        return original(ax, xs, ys, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.axes.Axes, "plot", spy)
        convergence.main([str(study), "--out", str(out), "--select", "bcn_ws b=1$"])
    by_label = {lab: (xs, ys) for xs, ys, lab in drawn}
    xs, ys = by_label["bcn_ws b=1 s1 (20 ep)"]
    assert xs == list(range(1, 21))
    assert ys == pytest.approx([100 - (86.0 - 10 * (20 - e) / 20) for e in xs])
    assert set(by_label) == {"bcn_ws b=1 s0 (4 ep)", "bcn_ws b=1 s0 (20 ep)",
                             "bcn_ws b=1 s1 (20 ep)"}


@pytest.mark.parametrize("args,message", [
    (["--select", "("], "is not a regular expression"),
    (["--select", "vgg"], "no finished run matches"),
])
def test_bad_input_is_one_line(study, tmp_path, capsys, args, message):
    assert convergence.main([str(study), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("spoil,reason", [
    (lambda p: (p.unlink(), __import__("os").mkfifo(p)), "is a FIFO"),
    (lambda p: (p.unlink(), p.mkdir()), "is a folder"),
    (lambda p: p.write_text('{"epoch": 1, "test_acc": 5'), "Expecting"),
    (lambda p: p.write_text('{"epoch": 1, "test_acc": "high"}\n'), "not a finite number"),
    (lambda p: p.write_text('{"epoch": 1, "test_acc": NaN}\n'), "not a finite number"),
    (lambda p: p.write_text('{"test_acc": 50}\n'), "'epoch'"),
])
def test_a_metrics_file_that_is_not_a_record_loses_its_curve_not_the_report(study, tmp_path,
                                                                           capsys, spoil, reason):
    run = study / "e20" / "gn_b1_s0"
    spoil(run / "metrics.jsonl")
    out = tmp_path / "out"
    assert convergence.main([str(study), "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "no curve" in line]
    assert len(err) == 1 and str(run) in err[0] and reason in err[0]
    assert (out / "curves.png").stat().st_size > 0 and (out / "convergence.md").exists()
