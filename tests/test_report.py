"""scripts/report.py: the CSV, the error table and the plot from hand-made run records (numbers
chosen so every cell can be checked), the same report from (mocked) wandb, bad input, and one
real sweep of train.py end to end."""
import csv
import importlib.util
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from engine.loop import run
from wandb_log import read_offline_run

from conftest import ROOT, TINY, make_cfg, run_cli

_spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

# (model, depth, norm, ws, sync_stats, b, seed, status, test_acc, epochs): a ResNet-20 sweep at a
# fixed global batch of 64, and a VGG-16 pair trained for different numbers of epochs.
RUNS = [
    ("resnet", 20, "bn", False, True, 1, 0, "diverged", None, 30),
    ("resnet", 20, "bn", False, True, 1, 1, "diverged", 12.5, 30),
    ("resnet", 20, "bn", False, True, 2, 0, "completed", 80.0, 30),
    ("resnet", 20, "bn", False, True, 2, 1, "completed", 78.0, 30),
    ("resnet", 20, "bn", False, True, 4, 0, "completed", 91.25, 30),
    ("resnet", 20, "bn", False, True, 4, 1, "diverged", 10.0, 30),
    ("resnet", 20, "gn", False, True, 1, 0, "completed", 70.0, 30),
    ("resnet", 20, "gn", False, True, 1, 1, "completed", 71.5, 30),
    ("resnet", 20, "gn", False, True, 4, 0, "completed", 72.0, 30),
    ("resnet", 20, "bcn", True, True, 1, 0, "completed", 85.0, 30),
    ("resnet", 20, "bcn", True, False, 1, 0, "completed", 60.0, 30),
    ("vgg", 16, "bn", False, True, 2, 0, "completed", 85.0, 10),
    ("vgg", 16, "gn", False, True, 2, 0, "completed", 86.0, 20),
]

RESNET20_TABLE = """\
## ResNet-20: test error (%) vs. batch size per device

epochs 30, global batch 64, data cifar10; mean ± std over seeds (ddof=1), n = seeds.

| norm | b=1 | b=2 | b=4 |
|:--|--:|--:|--:|
| bn | diverged | 21.00 ± 1.41 (n=2) | 8.75 (n=1, 1 diverged) |
| gn | 29.25 ± 1.06 (n=2) | — | 28.00 (n=1) |
| bcn_ws | 15.00 (n=1) | — | — |
| bcn_ws (per-device stats) | 40.00 (n=1) | — | — |"""

# Trained for 10 and 20 epochs: two protocols, a table each (never one table, never averaged).
VGG16_TABLE = """\
## VGG-16: test error (%) vs. batch size per device (protocol 1 of 2)

epochs 10, global batch 64, data cifar10; mean ± std over seeds (ddof=1), n = seeds.

| norm | b=2 |
|:--|--:|
| bn | 15.00 (n=1) |

Note: protocol 1 of 2 for VGG-16 (the protocols differ in epochs); never averaged with the \
others.

## VGG-16: test error (%) vs. batch size per device (protocol 2 of 2)

epochs 20, global batch 64, data cifar10; mean ± std over seeds (ddof=1), n = seeds.

| norm | b=2 |
|:--|--:|
| gn | 14.00 (n=1) |

Note: protocol 2 of 2 for VGG-16 (the protocols differ in epochs); never averaged with the \
others."""


def make_summary(model, depth, norm, ws, sync_stats, b, seed, status, test_acc, epochs):
    """A summary.json as engine.loop.make_summary writes it (describe() + results + identity)."""
    label = norm + ("_ws" if ws else "")
    overrides = [f"model={model}", f"model.depth={depth}", f"norm={label}",
                 f"batch_size_per_device={b}", f"seed={seed}", f"trainer.epochs={epochs}"]
    if not sync_stats:
        overrides.append("norm.sync_stats=false")
    info = {"model": model, "depth": depth, "norm": norm, "ws": ws, "norm_label": label,
            "batch_size_per_device": b, "devices": 1, "virtual_devices": 64 // b,
            "accumulate": 1, "global_batch": 64, "epochs": epochs, "seed": seed,
            "data": "cifar10", "name": "fake", "overrides": overrides}
    identity = {"model.arch": model, "model.depth": depth, "norm.name": norm, "norm.ws": ws,
                "norm.groups": 8, "norm.sync_stats": sync_stats, "optim.lr": 0.1,
                "trainer.epochs": epochs, "trainer.virtual_devices": 64 // b,
                "batch_size_per_device": b, "seed": seed, "name": "fake"}
    done = epochs if status == "completed" else (0 if test_acc is None else 3)
    return {"status": status, "test_acc": test_acc,
            "best_test_acc": None if test_acc is None else test_acc + 0.5,
            "test_loss": None if test_acc is None else 1.25,
            "train_loss": None if test_acc is None else 0.75, "epochs_completed": done,
            "images_per_sec": 1000.0 + b, "wall_time_s": 60.0 + seed, **info,
            "identity": identity}


@pytest.fixture
def sweep(tmp_path):
    """A sweep folder of finished runs, plus one in progress (metrics.jsonl, no summary)."""
    root = tmp_path / "multirun" / "fake"
    summaries = {}
    for spec in RUNS:
        s = make_summary(*spec)
        run_dir = root / (f"{s['model']}{s['depth']}_{s['norm_label']}_b{spec[5]}_s{spec[6]}"
                          + ("" if spec[4] else "_perdevice"))
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps(s))
        (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
        summaries[str(run_dir)] = s
    running = root / "resnet20_gn_b2_s0"
    running.mkdir()
    (running / "config.yaml").write_text("seed: 0\n")
    (running / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return root, summaries, running


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def as_csv(value):
    """What csv.writer makes of a record value."""
    return "" if value is None else str(value)


def test_csv_has_one_row_per_finished_run_with_its_values(sweep, tmp_path, capsys):
    root, summaries, running = sweep
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"1 run without summary.json (in progress or interrupted): {running}" in err
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert len(rows) == len(RUNS) and {r["run_dir"] for r in rows} == set(summaries)
    assert set(report.COLUMNS) <= set(rows[0])
    for row in rows:
        s = summaries[row["run_dir"]]
        for key in ("model", "depth", "norm", "ws", "norm_label", "batch_size_per_device",
                    "devices", "virtual_devices", "global_batch", "epochs", "seed", "status",
                    "test_acc", "best_test_acc", "train_loss", "images_per_sec", "wall_time_s"):
            assert row[key] == as_csv(s[key]), (key, row)
        assert row["sync_stats"] == str(s["identity"]["norm.sync_stats"])
        assert row["test_error"] == as_csv(None if s["test_acc"] is None
                                           else 100.0 - s["test_acc"])
        assert row["overrides"] == " ".join(s["overrides"])
    diverged = [r for r in rows if r["status"] == "diverged"]
    assert len(diverged) == 3 and {r["test_error"] for r in diverged} == {"", "87.5", "90.0"}
    order = [(r["model"], int(r["depth"]), r["norm_label"], int(r["batch_size_per_device"]),
              int(r["seed"])) for r in rows]
    assert order == sorted(order)


# A finished run's record that parses but cannot be a row: (what is wrong, the line's reason).
BAD_RECORDS = [
    (lambda s: s.pop("seed"), "lacks the field 'seed'"),
    (lambda s: s.pop("status"), "lacks the field 'status'"),
    (lambda s: s.update(norm_label=None), "lacks the field 'norm_label'"),
    (lambda s: s.pop("test_acc"), "lacks the field 'test_acc'"),
    (lambda s: s.update(depth="twenty"), "depth='twenty' is str; expected an integer"),
    (lambda s: s.update(seed=True), "seed=True is bool; expected an integer"),
    (lambda s: s.update(test_acc="85.0"), "test_acc='85.0' is str; expected a number"),
    (lambda s: s.update(wall_time_s=[1]), "wall_time_s=[1] is list; expected a number"),
    (lambda s: s.update(ws="false"), "ws='false' is str; expected true or false"),
    (lambda s: s.update(overrides="norm=bn"), "overrides='norm=bn' is not a list of strings"),
    (lambda s: s.update(identity=[]), "identity=[] is not a mapping"),
    (lambda s: s["identity"].update({"norm.sync_stats": "yes"}),
     "identity norm.sync_stats='yes' is str; expected true or false"),
]


def test_records_that_lack_a_field_or_hold_another_type_are_skipped(sweep, tmp_path, capsys):
    root, summaries, _ = sweep
    expected = {}
    for i, (spoil, reason) in enumerate(BAD_RECORDS):
        s = make_summary("resnet", 20, "gn", False, True, 2, 100 + i, "completed", 50.0, 30)
        spoil(s)
        run_dir = root / f"bad{i:02d}"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps(s))
        expected[run_dir / "summary.json"] = reason
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if line.startswith("report: skipping")]
    assert skipped == [f"report: skipping {path}: {reason}" for path, reason in expected.items()]
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert {r["run_dir"] for r in rows} == set(summaries)  # every good run, none of the bad
    table = (tmp_path / "out" / "table.md").read_text()
    assert table == RESNET20_TABLE + "\n\n" + VGG16_TABLE + "\n"


def test_table_cells_mean_std_missing_and_diverged(sweep, tmp_path, capsys):
    root, _, _ = sweep
    rows, skipped = report.load_local([root])
    assert len(skipped) == 1
    table = report.error_table(rows)
    assert table == RESNET20_TABLE + "\n\n" + VGG16_TABLE + "\n"
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == table == (tmp_path / "out" / "table.md").read_text()


def test_a_seed_run_twice_is_flagged(sweep):
    root, _, _ = sweep
    rows, _ = report.load_local([root])
    first = next(r for r in rows if (r["norm_label"], r["batch_size_per_device"], r["seed"])
                 == ("bn", 1, 0))
    twice = dict(first, run_dir="elsewhere")  # e.g. the same cell at another lr
    assert "Note: bn at b=1 holds 3 runs of seeds [0, 0, 1]" in report.error_table(rows + [twice])


def test_plot_is_a_png(sweep, tmp_path):
    root, _, _ = sweep
    rows, _ = report.load_local([root])
    path = tmp_path / "error_vs_batch.png"
    report.plot(rows, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 400 and len(data) > 20_000


def unlike_runs():
    """Issue 22's report: bn at b=32 on generated data and on CIFAR-10 (and gn at another lr)
    in one folder, averaged into `bn b=32: 49.49 ± 54.25`, an error bar below 0%."""
    rows = []
    for i, (data, fingerprint, acc, lr) in enumerate([
            ("synthetic", "5151515151515151", 99.87, 0.1), ("cifar10", "c1c1c1c1c1c1c1c1", 61.15, 0.1),
            ("cifar10", "c1c1c1c1c1c1c1c1", 61.25, 0.1), ("cifar10", "c1c1c1c1c1c1c1c1", 70.0, 0.05)]):
        s = make_summary("resnet", 20, "bn" if lr == 0.1 else "gn", False, True, 32, i,
                         "completed", acc, 4)
        s["data"] = data
        s["identity"].update({"data.name": data, "data.fingerprint": fingerprint,
                              "optim.lr": lr})
        rows.append(report.make_row(s, s["identity"], f"run{i}"))
    return rows


def test_runs_of_another_protocol_are_never_averaged(tmp_path, capsys):
    rows = unlike_runs()
    parts = report.protocol_parts(rows)
    assert [(p["protocol"]["data"], p["protocol"]["data_fingerprint"], len(p["rows"]))
            for p in parts] == [("cifar10", "c1c1c1c1c1c1c1c1", 2), ("cifar10", "c1c1c1c1c1c1c1c1", 1),
                                ("synthetic", "5151515151515151", 1)]
    table = report.error_table(rows)
    # no cell mixes protocols: the CIFAR-10 pair is the only mean of several runs
    assert re.findall(r"\| \S+ ± \S+ \(n=\d+\) \|", table) == ["| 38.80 ± 0.07 (n=2) |"]
    assert "| bn | 0.13 (n=1) |" in table
    assert "| gn | 30.00 (n=1) |" in table
    assert ("epochs 4, global batch 64, data synthetic, data fingerprint 5151515151515151, "
            "recipe optim.lr=0.1; mean") in table
    assert "data cifar10, data fingerprint c1c1c1c1c1c1c1c1, recipe optim.lr=0.05;" in table
    assert ("Note: protocol 3 of 3 for ResNet-20 (the protocols differ in data, data "
            "fingerprint, recipe); never averaged with the others.") in table
    ranking = report.ranking(rows)
    assert ranking.count("## ResNet-20: which norm at 1-2 images per device (protocol") == 3
    # the PNG: a panel per protocol, each line the mean of its own runs only
    fig = report.figure(rows)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().splitlines()[0] for ax in panels] == [
        f"ResNet-20 (protocol {i} of 3)" for i in (1, 2, 3)]
    means = [list(ax.get_lines()[0].get_ydata()) for ax in panels]  # then the error bars' caps
    assert means == [[pytest.approx(38.8)], [pytest.approx(30.0)], [pytest.approx(0.13)]]
    assert min(y for ax in panels for line in ax.get_lines() for y in line.get_ydata()) > 0
    report.write_csv(rows, tmp_path / "summary.csv")
    assert report.main([str(tmp_path / "summary.csv"), "--out", str(tmp_path / "out")]) == 0
    assert ("report: ResNet-20 runs follow 3 protocols (they differ in data, data fingerprint, "
            "recipe): one table, ranking and panel each, never averaged together") in \
        capsys.readouterr().err.splitlines()
    assert (tmp_path / "out" / "table.md").read_text().count("(protocol") == 3


def test_keys_added_later_at_their_off_value_keep_an_older_records_recipe():
    """The long study's cells from before AGC existed lack optim.agc and optim.agc_eps; later
    cells hold agc=None (off) and agc_eps=0.001: one recipe. AGC is a method compared (its
    label, nf_agc), not the recipe: on, it shares the others' protocol; a real difference in
    the recipe does not."""
    old = {"optim.lr": 0.1, "optim.momentum": 0.9, "optim.foo": None}
    later = {**old, "optim.agc": None, "optim.agc_eps": 0.001}
    same = report.recipe_digest(report.recipe(old))
    for other in (later, {**later, "optim.agc": 0.01}, {**later, "optim.agc_eps": 0.01}):
        assert report.recipe_digest(report.recipe(other)) == same
    assert report.recipe_digest(report.recipe({**later, "optim.lr": 0.05})) != same


def test_agc_is_named_in_the_label_with_any_value_not_the_authors():
    from conftest import make_cfg
    from engine.config import norm_label
    assert norm_label(make_cfg("norm=nf")) == "nf"
    assert norm_label(make_cfg("norm=nf_agc")) == "nf_agc"
    assert norm_label(make_cfg("norm=nf", "optim.agc=0.01")) == "nf_agc"
    assert norm_label(make_cfg("norm=nf_agc", "optim.agc=0.02")) == "nf_agc(lambda=0.02)"
    assert norm_label(make_cfg("norm=bn", "optim.agc=0.02", "optim.agc_eps=1e-4")) == \
        "bn_agc(lambda=0.02, eps=0.0001)"


def test_an_older_csv_without_fingerprint_or_recipe_joins_the_one_protocol_it_fits(tmp_path):
    rows = unlike_runs()[1:3]  # the CIFAR-10 pair, one of them from a report of before
    report.write_csv(rows[:1], tmp_path / "old.csv")
    with open(tmp_path / "old.csv", newline="") as f:
        old = [{k: v for k, v in r.items() if k not in report.LATER_COLUMNS}
               for r in csv.DictReader(f)]
    with open(tmp_path / "old.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c in report.COLUMNS
                                               if c not in report.LATER_COLUMNS])
        writer.writeheader()
        writer.writerows(old)
    joined, _ = report.load_local([tmp_path / "old.csv"])
    assert joined[0]["data_fingerprint"] is None and joined[0]["recipe"] is None
    assert [len(p["rows"]) for p in report.protocol_parts(joined + rows[1:])] == [2]
    other_lr = unlike_runs()[3]  # another recipe on the same data: the old row fits both
    assert [len(p["rows"]) for p in report.protocol_parts(joined + rows[1:] + [other_lr])] \
        == [1, 1, 1]


class FakeRun:
    """What wandb.Api().runs() yields, as engine/tracking.py fills it: config is describe() +
    identity, summary the last logged metrics overwritten by make_summary() minus identity.
    test_a_wandb_offline_run_holds_what_the_report_reads checks this against a real run."""

    def __init__(self, s, name, state="finished"):
        self.name, self.state = name, state
        self.config = {**{k: s[k] for k in report.COLUMNS if k in s and k not in
                          report.SUMMARY_KEYS}, **s["identity"]}
        logged = {"epoch": s["epochs_completed"], "lr": 0.0, "train_acc": 50.0, "_step": 3}
        self.summary = {**logged, **{k: v for k, v in s.items() if k != "identity"}}


def fake_api(monkeypatch, runs=(), error=None):
    import wandb

    calls = []

    class Api:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            if error:
                raise error
            return iter(runs)
    monkeypatch.setattr(wandb, "Api", Api)
    return calls


def test_wandb_runs_give_the_same_csv_as_local_records(sweep, tmp_path, monkeypatch, capsys):
    root, summaries, _ = sweep
    running = FakeRun(make_summary(*RUNS[0]), "resnet20_gn_b2_s0", state="running")
    running.summary = {"epoch": 2, "test_acc": 40.0}
    runs = [FakeRun(s, Path(run_dir).name) for run_dir, s in summaries.items()]
    calls = fake_api(monkeypatch, runs + [running])
    assert report.main(["--wandb", "me/microbatch", "--group", "fake",
                        "--out", str(tmp_path / "wb")]) == 0
    assert calls == [("me/microbatch", {"group": "fake"})]
    assert "1 wandb run without a final status (in progress or interrupted)" in \
        capsys.readouterr().err
    assert report.main([str(root), "--out", str(tmp_path / "local")]) == 0
    local, remote = (read_csv(tmp_path / d / "summary.csv") for d in ("local", "wb"))
    assert all(r["run_dir"].startswith("wandb:me/microbatch/") for r in remote)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "run_dir"} for r in rows]  # noqa
    assert drop(remote) == drop(local)
    assert (tmp_path / "wb" / "table.md").read_text() == (tmp_path / "local" / "table.md") \
        .read_text()


def test_a_mistyped_wandb_run_is_skipped(sweep, tmp_path, monkeypatch, capsys):
    _, summaries, _ = sweep
    runs = [FakeRun(s, Path(run_dir).name) for run_dir, s in summaries.items()]
    runs[0].config["depth"] = "20"
    runs[1].summary["test_acc"] = "NaN"
    fake_api(monkeypatch, runs)
    assert report.main(["--wandb", "me/p", "--out", str(tmp_path / "wb")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [
        f"report: skipping wandb run {runs[0].name}: depth='20' is str; expected an integer",
        f"report: skipping wandb run {runs[1].name}: test_acc='NaN' is str; expected a number"]
    assert len(read_csv(tmp_path / "wb" / "summary.csv")) == len(runs) - 2


def test_a_wandb_offline_run_holds_what_the_report_reads(tmp_path, monkeypatch):
    """A real run logging to wandb offline, read back from the records wandb wrote (what
    `wandb sync` uploads): its name, group and tags; every config key and summary field
    report.py --wandb reads, norm.sync_stats among them, equal to the local record; one history
    row per epoch. The FakeRun above, built from the local summary.json, agrees with it, and
    report --wandb over the stored run gives the local record's row."""
    import wandb

    overrides = ["norm=bcn", "norm.sync_stats=false", "trainer.virtual_devices=2"]
    cfg = make_cfg(*TINY, *overrides, "batch_size_per_device=16", "logger.mode=offline",
                   "name=wb")
    run(cfg, tmp_path / "run", overrides=overrides)
    wandb.teardown()  # stop wandb's service process: its writes are complete after this
    stored = read_offline_run(tmp_path / "run")
    local = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (stored.name, stored.group, stored.state) == ("run", "wb", "finished")
    assert set(stored.tags) == {"resnet8", "bcn", "b16"}
    read = [k for k in report.COLUMNS if k in local and k not in report.SUMMARY_KEYS]
    assert {"norm_label", "global_batch", "overrides", "code"} <= set(read)
    assert {k: stored.config[k] for k in read} == {k: local[k] for k in read}
    assert stored.config["norm.sync_stats"] is False  # the ablation's column
    assert {k: stored.config[k] for k in local["identity"]} == local["identity"]
    assert {k: stored.summary[k] for k in report.SUMMARY_KEYS} == \
        {k: local[k] for k in report.SUMMARY_KEYS}
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    logged = [h for h in stored.history if "test_acc" in h]
    assert [(h["epoch"], h["test_acc"], h["images_seen"]) for h in logged] == \
        [(m["epoch"], m["test_acc"], m["epoch"] * 256) for m in metrics]
    fake = FakeRun(local, "run")
    assert {k: stored.config[k] for k in fake.config} == fake.config
    assert {k: stored.summary[k] for k in report.SUMMARY_KEYS} == \
        {k: fake.summary[k] for k in report.SUMMARY_KEYS}
    fake_api(monkeypatch, [stored])
    remote, skipped = report.load_wandb("me/p", "wb")
    rows, _ = report.load_local([tmp_path / "run"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "run_dir"} for r in rows]  # noqa
    assert skipped == [] and drop(remote) == drop(rows) and remote[0]["sync_stats"] is False


def test_wandb_error_is_one_line(tmp_path, monkeypatch, capsys):
    import wandb

    fake_api(monkeypatch, error=wandb.errors.UsageError("api_key not configured\n(details)"))
    assert report.main(["--wandb", "me/p", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "report: wandb me/p: api_key not configured\n"


def test_no_runs_or_bad_path_exit_2_with_one_line(sweep, tmp_path, capsys):
    _, _, running = sweep
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"report: no finished run (summary.json) found in {empty}\n"
    assert report.main([str(running), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("report: no finished run")
    assert not (tmp_path / "out").exists()
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"),
                          str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"report: {tmp_path / 'missing'}: no such directory\n"


def test_report_on_a_real_train_py_sweep(tmp_path):
    res = run_cli("-m", "data=synthetic", "data.train_size=256", "data.test_size=64",
                  "model.depth=8", "trainer.epochs=1", "logger.mode=disabled",
                  "trainer.num_threads=1", "trainer.device=cpu", "norm=bn,gn",
                  "batch_size_per_device=16", "name=rep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    sweep_dir = tmp_path / "multirun" / "rep"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep_dir),
                          "--out", str(tmp_path / "report")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = read_csv(tmp_path / "report" / "summary.csv")
    assert [(r["norm_label"], r["status"]) for r in rows] == [("bn", "completed"),
                                                             ("gn", "completed")]
    for row in rows:
        s = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert row["test_acc"] == str(s["test_acc"])
        assert float(row["test_error"]) == pytest.approx(100 - s["test_acc"])
        assert row["overrides"] == " ".join(s["overrides"])
    err = 100 - s["test_acc"]  # gn's, the table's last row
    assert f"| gn | {err:.2f} (n=1) |" in out.stdout
    assert "ResNet-8" in out.stdout and "epochs 1, global batch 16, data synthetic" in out.stdout
    assert (tmp_path / "report" / "error_vs_batch.png").stat().st_size > 10_000


def test_an_earlier_reports_csv_joins_new_runs_unchanged(sweep, tmp_path):
    """A study extended later: its first report's summary.csv plus the new run folders give
    the same rows as all the folders together."""
    root, _, _ = sweep
    first = [d for d in root.iterdir() if "vgg" in d.name]
    later = [d for d in root.iterdir() if "vgg" not in d.name]
    assert report.main([*map(str, first), "--out", str(tmp_path / "first")]) == 0
    assert report.main([str(tmp_path / "first" / "summary.csv"), *map(str, later),
                        "--out", str(tmp_path / "joined")]) == 0
    assert report.main([str(root), "--out", str(tmp_path / "all")]) == 0
    for name in ("summary.csv", "table.md", "ranking.md"):
        assert (tmp_path / "joined" / name).read_text() == (tmp_path / "all" / name).read_text()
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(report.ReportError, match="not a summary.csv of this report"):
        report.load_local([bad])


def test_ranking_sorts_methods_by_error_at_one_image_with_gaps_to_bn_at_64(sweep):
    root, _, _ = sweep
    rows, _ = report.load_local([root])
    bn64 = dict(rows[-1], model="resnet", depth=20, epochs=30, norm="bn", ws=False,
                norm_label="bn",
                sync_stats=True, batch_size_per_device=64, seed=0, status="completed",
                test_acc=75.0, test_error=25.0, run_dir="bn64")
    text = report.ranking(rows + [bn64])
    resnet = text.split("## VGG-16")[0]
    table = [line for line in resnet.splitlines() if line.startswith("| ") and "rank" not in line]
    # b=1 errors: bcn_ws 15.00, gn 29.25 +- 1.06, bcn_ws per-device 40.00; bn all diverged
    assert [line.split(" | ")[1] for line in table] == ["bcn_ws", "gn",
                                                        "bcn_ws (per-device stats)", "bn"]
    assert table[0] == "| 1 | bcn_ws | 15.00 (n=1) | -10.00 (n=1) | — | — |"
    assert table[1] == "| 2 | gn | 29.25 ± 1.06 (n=2) | +4.25 (n=2) | — | — |"
    assert table[3] == "| 4 | bn | — | — | 21.00 ± 1.41 (n=2) | -4.00 (n=2) |"
    assert "BN's at b = 64 (25.00)" in resnet
    assert "no BN run at b = 64" in text.split("## VGG-16")[1]


def test_each_norm_keeps_its_colour_and_marker():
    a, b = report.style("evonorm_s0"), report.style("evonorm_s0_ws")
    assert (a["color"], a["marker"]) == (b["color"], b["marker"]) and (a["ls"], b["ls"]) == \
        ("-", "--")
    assert report.style("bcn_ws (per-device stats)")["ls"] == ":"
    looks = {(report.style(n)["color"], report.style(n)["marker"]) for n in report.NORM_ORDER}
    assert len(looks) == len(report.NORM_ORDER)  # no two norms alike
