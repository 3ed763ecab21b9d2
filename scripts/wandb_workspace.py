"""A wandb workspace for comparing this project's runs: error against batch per device per norm.

    python scripts/wandb_workspace.py ENTITY/PROJECT [--group NAME] [--title TITLE]
    python scripts/wandb_workspace.py ENTITY/PROJECT --group microbatch --dry-run  # print it

Builds a saved view of the project (wandb-workspaces' API) whose runs are those of one group
(a sweep's or experiment's `name`, or `logger.group`), grouped by `norm_label`, with the panels
the study is read from: final test error against `batch_size_per_device` (log scale), test error
and train loss against epoch, the within-epoch loss against images seen, and the Beyond-BatchNorm
probes when the runs logged any. `--dry-run` prints the view's JSON instead of saving it (no
server, no credentials). Saving needs what `wandb login` gives; the view's address is printed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

# The config keys train.py logs (engine.loop.describe) that a researcher groups and filters by.
GROUP_BY = "norm_label"
X_BATCH = "batch_size_per_device"


def build(entity: str, project: str, group: str | None, title: str):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    sections = [
        ws.Section(name="Error vs batch per device", is_open=True, panels=[
            wr.ScatterPlot(title="final test error (%) vs images per device",
                           x=wr.Config(X_BATCH), y=wr.SummaryMetric("test_error"), log_x=True),
            wr.ParallelCoordinatesPlot(title="norm, b, seed -> test error", columns=[
                wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k))
                for k in (GROUP_BY, X_BATCH, "seed")] + [
                wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("test_error"))]),
        ]),
        ws.Section(name="Curves", is_open=True, panels=[
            wr.LinePlot(title="test error (%)", x="epoch", y=["test_error"]),
            wr.LinePlot(title="train loss", x="epoch", y=["train_loss"]),
            wr.LinePlot(title="train loss within epochs", x="images_seen",
                        y=["step/train_loss"]),
        ]),
        ws.Section(name="Beyond BatchNorm probes", is_open=False, panels=[
            wr.LinePlot(title=f"probe/{p}", x="epoch", y=[f"probe/{p}"])
            for p in ("var_growth", "cosine_similarity", "stable_rank", "grad_ratio")]),
    ]
    filters = [expr.Metric("Group") == group] if group else []
    return ws.Workspace(
        entity=entity, project=project, name=title, sections=sections,
        runset_settings=ws.RunsetSettings(filters=filters, groupby=[expr.Config(GROUP_BY)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("project", metavar="ENTITY/PROJECT")
    parser.add_argument("--group", help="only this group's runs (a sweep's name)")
    parser.add_argument("--title", help="the view's name (default: the group's, or 'microbatch')")
    parser.add_argument("--dry-run", action="store_true", help="print the view, save nothing")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", args.project):
        print(f"wandb_workspace: ENTITY/PROJECT={args.project!r}: expected two names joined by "
              "'/', e.g. my-team/microbatch", file=sys.stderr)
        return 2
    entity, project = args.project.split("/")
    try:
        workspace = build(entity, project, args.group, args.title or args.group or "microbatch")
    except ImportError as e:
        print(f"wandb_workspace: {e.name} is missing: pip install -r requirements.txt",
              file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(workspace._to_model().model_dump(by_alias=True, exclude_none=True),
                         indent=1))
        return 0
    try:
        workspace.save()
    except Exception as e:  # noqa: BLE001 - wandb's client raises many types; one line for all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"wandb_workspace: saving to {args.project} failed: {first}", file=sys.stderr)
        return 1
    print(workspace.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
