"""How far from convergence: a study's cells on schedules of different lengths, and their curves.

    python scripts/convergence.py RUNS... --out DIR [--select REGEX]

RUNS are what scripts/report.py reads (run folders, folders above them, earlier reports'
summary.csv files), typically a short and a long study together. Writes to DIR:

  convergence.md  per model: each cell's final test error (%) on every schedule it ran
                  (mean ± std over seeds), its gap to BN at b = 64 on the same schedule and its
                  rank among the methods at the same b on that schedule; the last column is the
                  change of the gap from the shortest to the longest schedule
  curves.png      test error against epoch for every run whose metrics.jsonl is at hand (a
                  row of a summary.csv has none), one panel per model

A schedule is a number of epochs (the short study: 4 epochs on 20k images; the long one: 20 and
40 epochs on all 50k). --select keeps the cells whose name, e.g. "resnet20 bcn_ws b=1", matches;
--min-schedules N keeps in the table the cells run on at least N schedules.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import (MISSING, ReportError, error_stats, fmt, group_runs, label,  # noqa: E402
                    load_local, model_name, style)
from engine.records import RunRecord  # noqa: E402


def cell_name(row: dict) -> str:
    return f"{row['model']}{row['depth']} {label(row)} b={row['batch_size_per_device']}"


def by_schedule(rows: list[dict]) -> dict[int, list[dict]]:
    """{epochs: rows}, shortest schedule first."""
    out: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["epochs"]):
        out.setdefault(row["epochs"], []).append(row)
    return out


def ranks(by_label: dict, b: int) -> dict[str, int]:
    """Rank (1 = lowest mean error) of every label that has completed runs at b."""
    means = {lab: error_stats(cells[b])[0] for lab, cells in by_label.items() if b in cells}
    order = sorted((m, lab) for lab, m in means.items() if m is not None)
    return {lab: i for i, (_, lab) in enumerate(order, 1)}


def convergence_table(rows: list[dict], min_schedules: int = 1) -> str:
    """Markdown, per model: a row per cell (label, b) run on at least `min_schedules`
    schedules, a column group per schedule (ranks count every method on it)."""
    schedules = by_schedule(rows)
    stats = {}  # (model, depth) -> epochs -> (by_label, bn64, ranks per b)
    for epochs, sched_rows in schedules.items():
        for key, by_label in group_runs(sched_rows).items():
            bn64 = error_stats(by_label.get("bn", {}).get(64, []))[0]
            bs = {b for cells in by_label.values() for b in cells}
            stats.setdefault(key, {})[epochs] = (by_label, bn64, {b: ranks(by_label, b)
                                                                 for b in bs})
    parts = []
    for (model, depth), per_epochs in stats.items():
        eps = sorted(per_epochs)
        cells = {}
        for e in eps:
            for lab, by_b in per_epochs[e][0].items():
                for b in by_b:
                    cells.setdefault((lab, b), None)
        if len(eps) < min_schedules:
            continue  # a model no cell of which ran on enough schedules: no empty table
        header = " | ".join(f"{e} ep | gap | rank" for e in eps)
        lines = [f"## {model_name(model, depth)}: final test error (%) by schedule", "",
                 "gap = error minus BN's at b = 64 on the same schedule; rank among the "
                 "methods at the same b on that schedule; Δgap = the gap's change from the "
                 f"{eps[0]}- to the {eps[-1]}-epoch schedule.", "",
                 f"| norm | b | {header} | Δgap |", "|:--|--:|" + "--:|--:|--:|" * len(eps) + "--:|"]
        for lab, b in sorted(cells, key=lambda c: (c[1], c[0])):
            if sum(b in per_epochs[e][0].get(lab, {}) for e in eps) < min_schedules:
                continue
            cols, gaps = [], []
            for e in eps:
                by_label, bn64, rank = per_epochs[e]
                mean, std, n, _ = error_stats(by_label.get(lab, {}).get(b, []))
                gap = None if mean is None or bn64 is None else mean - bn64
                gaps.append(gap)
                cols += [fmt(mean, std, n), MISSING if gap is None else f"{gap:+.2f}",
                         str(rank[b].get(lab, MISSING)) if b in rank else MISSING]
            moved = [g for g in gaps if g is not None]
            change = f"{moved[-1] - moved[0]:+.2f}" if len(moved) >= 2 else MISSING
            lines.append(f"| {lab} | {b} | " + " | ".join(cols) + f" | {change} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else f"No cell ran on {min_schedules} schedules.\n"


def epoch_errors(run_dir: str) -> list[tuple[float, float]]:
    """(epoch, test error %) of each evaluated epoch in the run's metrics.jsonl; a file that
    is not a record (a FIFO, a folder, broken JSON, numbers of another kind) is one line on
    stderr and no curve."""
    try:
        lines = RunRecord(run_dir).read_metrics()
        points = [(m["epoch"], m["test_acc"]) for m in lines
                  if isinstance(m, dict) and "test_acc" in m]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for point in points for v in point):
            raise ValueError("an epoch or test_acc that is not a finite number")
    except (OSError, ValueError, KeyError, UnicodeDecodeError, RecursionError) as e:
        print(f"convergence: no curve for {run_dir} ({str(e).splitlines()[0]})",
              file=sys.stderr)
        return []
    return [(epoch, 100 - acc) for epoch, acc in points]


def plot_curves(rows: list[dict], path: Path) -> int:
    """Test error against epoch, a line per run with a metrics.jsonl; returns the lines drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list] = {}
    for row in rows:
        metrics = epoch_errors(row["run_dir"]) if Path(row["run_dir"]).is_dir() else []
        if metrics:
            panels.setdefault((row["model"], row["depth"]), []).append((row, metrics))
    if not panels:
        return 0
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.2), squeeze=False,
                             layout="constrained")
    for ax, ((model, depth), runs) in zip(axes.flat, sorted(panels.items())):
        for row, metrics in sorted(runs, key=lambda rm: (cell_name(rm[0]), rm[0]["epochs"],
                                                         rm[0]["seed"])):
            look = style(label(row))
            ax.plot(*zip(*metrics),
                    color=look["color"], ls=look["ls"], marker=look["marker"], markersize=3,
                    lw=1.2 if row["batch_size_per_device"] == 1 else 2.2,
                    label=f"{label(row)} b={row['batch_size_per_device']} "
                          f"s{row['seed']} ({row['epochs']} ep)")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (%, log axis)")
        ax.set_title(f"{model_name(model, depth)}: test error during training")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small", ncol=2)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return sum(len(r) for r in panels.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUNS",
                        help="run folders, folders above them, or earlier summary.csv files")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--min-schedules", type=int, default=1, metavar="N",
                        help="the table keeps the cells run on at least N schedules")
    parser.add_argument("--select", default="", metavar="REGEX",
                        help='keep cells whose name (e.g. "resnet20 bcn_ws b=1") matches')
    args = parser.parse_args(argv)
    try:
        pattern = re.compile(args.select)
    except re.error as e:
        print(f"convergence: --select {args.select!r} is not a regular expression ({e})",
              file=sys.stderr)
        return 2
    try:
        rows, _ = load_local(args.runs)
    except ReportError as e:
        print(f"convergence: {e}", file=sys.stderr)
        return 2
    rows = [r for r in rows if pattern.search(cell_name(r))]
    if not rows:
        print(f"convergence: no finished run matches in {', '.join(args.runs)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    table = convergence_table(rows, args.min_schedules)
    (args.out / "convergence.md").write_text(table)
    lines = plot_curves(rows, args.out / "curves.png")
    print(table, end="")
    print(f"{len(rows)} runs -> {args.out}/convergence.md"
          + (f", curves.png ({lines} curves)" if lines else " (no metrics.jsonl: no curves)"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
