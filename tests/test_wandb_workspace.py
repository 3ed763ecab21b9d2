"""scripts/wandb_workspace.py: the dashboard view reads the names train.py really logs.

A real run logs to wandb offline; the records wandb wrote (what `wandb sync` uploads) are read
back, and every axis, grouping key and filter of the view must name a config key, history metric
or summary field of that run and its group. No server: the view is built, never saved.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from engine.loop import run
from wandb_log import read_offline_run

from conftest import ROOT, TINY, make_cfg

_spec = importlib.util.spec_from_file_location("wandb_workspace",
                                               ROOT / "scripts" / "wandb_workspace.py")
wandb_workspace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wandb_workspace)


def names(metric) -> tuple[str, str]:
    """(section, key) of a panel axis: ('config', 'seed'), ('summary', 'test_error'), ..."""
    if isinstance(metric, str):
        return "history", metric
    kind = type(metric).__name__
    return {"Config": "config", "SummaryMetric": "summary"}.get(kind, kind), metric.name


def axes(workspace):
    for section in workspace.sections:
        for panel in section.panels:
            kind = type(panel).__name__
            if kind == "LinePlot":
                yield section.name, ("history", panel.x)
                yield from ((section.name, names(y)) for y in panel.y)
            elif kind == "ScatterPlot":
                yield section.name, names(panel.x)
                yield section.name, names(panel.y)
            elif kind == "ParallelCoordinatesPlot":
                yield from ((section.name, names(c.metric)) for c in panel.columns)
            else:
                raise AssertionError(f"untested panel {kind}")


def test_every_panel_names_what_a_real_offline_run_logged(tmp_path):
    import wandb

    overrides = ["norm=bn", "trainer.probe_every=1", "logger.mode=offline", "name=wbview"]
    cfg = make_cfg(*TINY, *overrides, "batch_size_per_device=16", "trainer.epochs=2",
                   "logger.log_every=8", "trainer.check_every=8")
    run(cfg, tmp_path / "run", overrides=overrides)
    wandb.teardown()  # wandb's service process has written everything after this
    stored = read_offline_run(tmp_path / "run")
    local = json.loads((tmp_path / "run" / "summary.json").read_text())

    view = wandb_workspace.build("me", "microbatch", stored.group, "study")
    logged = {"config": set(stored.config), "summary": set(stored.summary),
              "history": set().union(*stored.history)}
    missing = [(section, kind, key) for section, (kind, key) in axes(view)
               if key not in logged[kind]]
    assert missing == []
    assert stored.summary["test_error"] == 100.0 - local["test_acc"]
    runset = view.runset_settings
    assert [g.name for g in runset.groupby] == ["norm_label"] and "norm_label" in stored.config
    assert stored.group == "wbview" and runset.filters == """Metric("Group") == 'wbview'"""


def test_dry_run_prints_the_view_and_a_bad_project_is_one_line():
    script = [sys.executable, str(ROOT / "scripts" / "wandb_workspace.py")]
    out = subprocess.run([*script, "me/microbatch", "--group", "sweep1", "--dry-run"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                              "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert (view["entity"], view["project"], view["displayName"]) == ("me", "microbatch", "sweep1")
    runset = view["spec"]["section"]["runSets"][0]
    assert runset["grouping"] == [{"section": "config", "name": "norm_label.value"}]
    assert "sweep1" in json.dumps(runset["filters"])
    bad = subprocess.run([*script, "microbatch", "--dry-run"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == ("wandb_workspace: ENTITY/PROJECT='microbatch': expected two names "
                          "joined by '/', e.g. my-team/microbatch\n")
