"""Report a sweep: one CSV row per run, a test-error table, a ranking and the GN paper's
Figure 1.

    python scripts/report.py RUNS... --out DIR
    python scripts/report.py --wandb ENTITY/PROJECT --group NAME --out DIR

RUNS are run directories or any folder above them (a sweep's `multirun/<name>/`): every
summary.json below them is one finished run; or the summary.csv of an earlier report, whose
rows join the new ones (a study extended later, its first runs' folders long gone). Runs that
have started but hold no summary.json (still going, or interrupted) are listed on stderr and
left out; so is, with one line each, a summary.json that is damaged, lacks a field a row needs
or holds another type (a string where a number belongs). `--wandb` reads the same fields from a
wandb project (the tracker logs the run's identity as config and the summary at finish), so
everything after loading is one code path.

Runs are compared only under one protocol (PROTOCOL below): the data (its name and
fingerprint), the epochs, the global batch and the recipe (every other key of the run's
identity that is not an axis of the comparison: optimizer, augmentation, precision, ...). Runs
of one model that differ in any of these get a table, a ranking and a panel each, headed
`(protocol i of n)` and stating the fields that differ (one line on stderr says so); they are
never averaged together. A row of an older summary.csv, which records no fingerprint or recipe,
joins the one protocol its other fields agree with (with several, it stays apart).

Writes to DIR:
  summary.csv         one row per run (COLUMNS below), sorted by model, depth, norm, b, seed
  table.md            per model and protocol: test error (%) as mean ± std over seeds, norm x
                      batch size per device (also printed)
  ranking.md          per model and protocol: every method's error at b = 1 and b = 2 and its
                      gap to BN at b = 64, sorted by the error at b = 1
  error_vs_batch.png  test error vs. batch size per device, log2 axis, one line per norm, a
                      panel per model and protocol (Wu & He 2018, Figure 1); a norm keeps its
                      colour and marker in every plot
Exit status 2, with one line, when a path does not exist or no finished run is found.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.checkpoint import CheckpointError  # noqa: E402
from engine.records import RunRecord  # noqa: E402

COLUMNS = ("model", "depth", "norm", "ws", "norm_label", "sync_stats", "batch_size_per_device",
           "devices", "virtual_devices", "accumulate", "global_batch", "epochs", "seed", "data",
           "name", "status", "epochs_completed", "test_acc", "best_test_acc", "test_error",
           "test_loss", "train_loss", "images_per_sec", "wall_time_s", "overrides", "code",
           "run_dir", "data_fingerprint", "recipe")
# An earlier report's summary.csv may lack the columns added since (its rows: unknown there).
LATER_COLUMNS = ("data_fingerprint", "recipe")
# The protocol: what must be equal for runs to be compared or averaged. Runs of one model that
# differ in any of these are reported apart (tables, ranking, panels), never averaged.
PROTOCOL = ("data", "data_fingerprint", "epochs", "global_batch", "recipe")
# Identity keys that are not the recipe: the axes a report compares (the norm and its options,
# adaptive gradient clipping, which the norm's label names: nf_agc; b, seed, how K devices are
# realised), the model (its own heading), the device (the same maths, other rounding) and what
# the data's name and fingerprint state themselves.
NOT_RECIPE = ("model.arch", "model.depth", "trainer.devices", "trainer.virtual_devices",
              "trainer.accumulate", "trainer.device", "trainer.epochs", "optim.agc",
              "optim.agc_eps")
NOT_RECIPE_PREFIXES = ("norm.", "data.")
# What engine.loop.make_summary adds to describe(); on wandb these live in run.summary.
SUMMARY_KEYS = ("status", "test_acc", "best_test_acc", "test_loss", "train_loss",
                "epochs_completed", "images_per_sec", "wall_time_s")
FINISHED = ("completed", "diverged")
RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml")  # any one: a run has started
SKIP_DIRS = {".submitit", "wandb", "checkpoints", ".hydra"}
NORM_ORDER = ("bn", "syncbn", "gn", "ln", "in", "bcn", "brn", "frn", "evonorm_b0", "evonorm_s0",
              "mabn", "cbn", "online", "nf", "none")
# A norm's colour and marker, fixed whichever norms a report holds; _ws dashes the line, the
# per-device-statistics ablation dots it.
STYLE = {"bn": ("#1f77b4", "o"), "syncbn": ("#17becf", "v"), "gn": ("#2ca02c", "s"),
         "ln": ("#bcbd22", "P"), "in": ("#8c564b", "X"), "bcn": ("#d62728", "D"),
         "brn": ("#ff7f0e", "^"), "frn": ("#9467bd", "h"), "evonorm_b0": ("#e377c2", "<"),
         "evonorm_s0": ("#7f7f7f", ">"), "mabn": ("#000000", "*"), "none": ("#aec7e8", "."),
         "nf": ("#98df8a", "p"), "online": ("#ff9896", "d"), "cbn": ("#c5b0d5", "8")}
INT_COLUMNS = ("depth", "batch_size_per_device", "devices", "virtual_devices", "accumulate",
               "global_batch", "epochs", "seed", "epochs_completed")
FLOAT_COLUMNS = ("test_acc", "best_test_acc", "test_error", "test_loss", "train_loss",
                 "images_per_sec", "wall_time_s")
# What each field of a run's record must hold. A finished run whose record lacks a REQUIRED
# field (the ones every row is sorted, grouped and labelled by) or test_acc (null when no epoch
# finished), or holds another type anywhere, is skipped with one line; the rest are reported.
INT, NUMBER, TEXT, FLAG = "an integer", "a number", "a string", "true or false"
FIELD_TYPES = {"model": TEXT, "depth": INT, "norm": TEXT, "ws": FLAG, "norm_label": TEXT,
               "batch_size_per_device": INT, "devices": INT, "virtual_devices": INT,
               "accumulate": INT, "global_batch": INT, "epochs": INT, "seed": INT, "data": TEXT,
               "name": TEXT, "status": TEXT, "epochs_completed": INT, "test_acc": NUMBER,
               "best_test_acc": NUMBER, "test_loss": NUMBER, "train_loss": NUMBER,
               "images_per_sec": NUMBER, "wall_time_s": NUMBER, "code": TEXT}
REQUIRED = ("model", "depth", "norm", "ws", "norm_label", "batch_size_per_device", "seed",
            "status")
MODEL_NAMES = {"resnet": "ResNet", "vgg": "VGG"}
MISSING = "—"


class ReportError(Exception):
    """A user's mistake (bad path, nothing to report): one line, exit status 2."""


# ------------------------------------------------------------------------------- loading


def recipe(identity: dict) -> dict:
    """The training recipe in a run's identity (optimizer, augmentation, precision, ...): every
    dotted identity key but the axes and what other protocol columns say (NOT_RECIPE). A key
    at None (an option left off) is as if absent: older records, written before the key
    existed, have the same recipe."""
    return {k: v for k, v in sorted(identity.items()) if k == "data.augment" or (
        "." in k and k not in NOT_RECIPE and not k.startswith(NOT_RECIPE_PREFIXES)
        and v is not None)}


def recipe_digest(keys: dict) -> str | None:
    """8 hex digits naming a recipe (None when the record holds none)."""
    if not keys:
        return None
    return hashlib.sha1(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:8]


def make_row(record: dict, identity: dict, run_dir: str) -> dict:
    """One CSV row from a run's describe() + summary fields and its flattened identity; the
    recipe's keys ride along (not a column) so that a report can name the ones that differ."""
    row = {key: record.get(key) for key in COLUMNS}
    row["sync_stats"] = identity.get("norm.sync_stats", True)
    row["data_fingerprint"] = identity.get("data.fingerprint")
    row["_recipe"] = recipe(identity)
    row["recipe"] = recipe_digest(row["_recipe"])
    acc = record.get("test_acc")
    row["test_error"] = None if acc is None else 100.0 - acc
    row["overrides"] = " ".join(record.get("overrides") or ())
    row["run_dir"] = run_dir
    return row


def is_a(value, kind: str) -> bool:
    if kind == FLAG:
        return isinstance(value, bool)
    python_type = {INT: int, NUMBER: (int, float), TEXT: str}[kind]
    return isinstance(value, python_type) and not isinstance(value, bool)  # True is an int too


def record_problem(record: dict, identity: dict) -> str | None:
    """Why a finished run's record cannot be a row (a field missing or of another type), or
    None when it can."""
    for key in (*REQUIRED, "test_acc"):
        if key not in record or (record[key] is None and key != "test_acc"):
            return f"lacks the field {key!r}"
    for key, kind in FIELD_TYPES.items():
        value = record.get(key)
        if value is not None and not is_a(value, kind):
            return f"{key}={value!r:.40} is {type(value).__name__}; expected {kind}"
        if kind == NUMBER and value is not None and not math.isfinite(value):
            return f"{key}={value!r} is not a finite number"
    for key in ("test_acc", "best_test_acc"):  # percentages: 1e308 would overflow the stdev
        if record.get(key) is not None and not 0 <= record[key] <= 100:
            return f"{key}={record[key]!r:.40} is not a percentage in [0, 100]"
    overrides = record.get("overrides")
    if overrides is not None and not (isinstance(overrides, list)
                                      and all(isinstance(o, str) for o in overrides)):
        return f"overrides={overrides!r:.40} is not a list of strings"
    if not isinstance(identity, dict):
        return f"identity={identity!r:.40} is not a mapping"
    sync = identity.get("norm.sync_stats", True)
    if not isinstance(sync, bool):
        return f"identity norm.sync_stats={sync!r:.40} is {type(sync).__name__}; expected {FLAG}"
    return None


def find_run_dirs(root: Path) -> list[Path]:
    """Folders at or below root holding a run record file."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # a folder named summary.json counts too: read_summary says what it is, in one line
        names = set(filenames) | set(dirnames)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and d not in RUN_FILES)
        if names & set(RUN_FILES):
            found.append(Path(dirpath))
    return found


def load_csv(path: Path) -> list[dict]:
    """The rows of an earlier report's summary.csv, typed as load_local's."""
    def typed(key, text):
        if text == "" or text is None:
            return None
        if key in INT_COLUMNS:
            return int(text)
        if key in FLOAT_COLUMNS:
            return float(text)
        if key in ("ws", "sync_stats"):
            return text == "True"
        return text
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not set(COLUMNS) - set(LATER_COLUMNS) <= set(rows[0]) <= set(COLUMNS):
        raise ReportError(f"{path}: not a summary.csv of this report (columns differ)")
    return [{key: typed(key, row.get(key)) for key in COLUMNS} | {"_recipe": {}}
            for row in rows]


def load_local(paths) -> tuple[list[dict], list[str]]:
    """Rows of the finished runs below `paths` (or in their summary.csv files), and the run
    dirs that have no summary.json."""
    rows, skipped, seen = [], [], set()
    for path in map(Path, paths):
        if path.is_file() and path.suffix == ".csv":
            rows += load_csv(path)
            continue
        if not path.is_dir():
            raise ReportError(f"{path}: no such directory")
        for run_dir in find_run_dirs(path):
            if run_dir.resolve() in seen:  # overlapping arguments (a sweep and one of its runs)
                continue
            seen.add(run_dir.resolve())
            try:
                summary = RunRecord(run_dir).read_summary()
            except CheckpointError as e:  # a damaged summary.json: report the rest
                print(f"report: skipping {e}", file=sys.stderr)
                summary = None
            status = None if summary is None else summary.get("status")
            if summary is None or (isinstance(status, str) and status not in FINISHED):
                skipped.append(str(run_dir))
                continue
            identity = summary.get("identity", {})
            problem = record_problem(summary, identity)
            if problem:
                print(f"report: skipping {run_dir / 'summary.json'}: {problem}", file=sys.stderr)
                continue
            rows.append(make_row(summary, identity, str(run_dir)))
    return rows, skipped


def load_wandb(path: str, group: str | None) -> tuple[list[dict], list[str]]:
    """Rows of the finished wandb runs in ENTITY/PROJECT (one group), and the unfinished ones.

    The tracker's config is describe() + the flat identity; run.summary holds make_summary().
    """
    import wandb

    rows, skipped = [], []
    try:  # runs are fetched lazily, config and summary included: all of it can hit the network
        for run in wandb.Api().runs(path, filters={"group": group} if group else None):
            config = dict(run.config)
            record = {**config, **{key: run.summary.get(key) for key in SUMMARY_KEYS}}
            if record["status"] not in FINISHED:
                skipped.append(f"{run.name} ({run.state})")
                continue
            problem = record_problem(record, config)
            if problem:
                print(f"report: skipping wandb run {run.name}: {problem}", file=sys.stderr)
                continue
            rows.append(make_row(record, config, f"wandb:{path}/{run.name}"))
    except (wandb.errors.Error, OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ReportError(f"wandb {path}: {first_line}") from None
    return rows, skipped


def sort_key(row: dict) -> tuple:
    return (row["model"], row["depth"], row["norm_label"], row["batch_size_per_device"],
            row["seed"], not row["sync_stats"], row["run_dir"])


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------- the statistics


def label(row: dict) -> str:
    """The table's row / the plot's line. sync_stats only changes BCN (its ablation)."""
    if row["norm"] == "bcn" and not row["sync_stats"]:
        return f"{row['norm_label']} (per-device stats)"
    return row["norm_label"]


def norm_rank(row: dict) -> tuple:
    """The README's order of norms, each plain before _ws, synchronised before per-device."""
    norm = row["norm"]
    return (NORM_ORDER.index(norm) if norm in NORM_ORDER else len(NORM_ORDER), norm,
            bool(row["ws"]), not row["sync_stats"])


def group_runs(rows: list[dict]) -> dict:
    """{(model, depth): {label: {b: [rows]}}}, models and labels in reading order."""
    groups = {}
    for row in sorted(rows, key=lambda r: (r["model"], r["depth"], norm_rank(r))):
        cells = groups.setdefault((row["model"], row["depth"]), {}).setdefault(label(row), {})
        cells.setdefault(row["batch_size_per_device"], []).append(row)
    return groups


def protocol(row: dict) -> tuple:
    return tuple(row[key] for key in PROTOCOL)


def _order(key: tuple) -> tuple:
    return tuple((v is None, v) for v in key)  # unknown (None) last


def protocol_parts(rows: list[dict]) -> list[dict]:
    """The runs of each (model, depth) split by protocol (PROTOCOL), in reading order: one part
    per protocol, each a table, a ranking and a panel of its own; nothing is averaged across.

    A row that leaves a protocol field unknown (an older summary.csv has no data fingerprint or
    recipe) joins the one protocol its known fields agree with; with none or several, it stays
    apart. Each part: model, depth, index and count (of its model's protocols), protocol (field
    -> value), differing (the fields in which its model's protocols differ), recipe (its keys,
    where the records hold them), rows."""
    by_model: dict[tuple, list[dict]] = {}
    for row in rows:
        by_model.setdefault((row["model"], row["depth"]), []).append(row)
    parts = []
    for (model, depth), model_rows in sorted(by_model.items()):
        complete = {protocol(r) for r in model_rows if None not in protocol(r)}
        groups: dict[tuple, list[dict]] = {}
        for row in model_rows:
            key = protocol(row)
            fits = [c for c in complete if all(a is None or a == b for a, b in zip(key, c))]
            groups.setdefault(fits[0] if len(fits) == 1 else key, []).append(row)
        keys = sorted(groups, key=_order)
        differing = [name for i, name in enumerate(PROTOCOL) if len({k[i] for k in keys}) > 1]
        for i, key in enumerate(keys, 1):
            recipe_keys = next((r["_recipe"] for r in groups[key] if r.get("_recipe")), {})
            parts.append({"model": model, "depth": depth, "index": i, "count": len(keys),
                          "protocol": dict(zip(PROTOCOL, key)), "differing": differing,
                          "recipe": recipe_keys, "rows": groups[key]})
    return parts


def recipe_difference(parts: list[dict]) -> dict[tuple, dict]:
    """{(model, depth, index): {key: value}}: the recipe keys in which a model's protocols
    differ, with each part's value (what the records hold; a summary.csv row holds none)."""
    out = {}
    for part in parts:
        same_model = [p for p in parts if (p["model"], p["depth"]) == (part["model"],
                                                                       part["depth"])]
        keys = sorted({k for p in same_model for k in p["recipe"]})
        differ = [k for k in keys if len({repr(p["recipe"].get(k)) for p in same_model}) > 1]
        out[(part["model"], part["depth"], part["index"])] = {
            k: part["recipe"].get(k, MISSING) for k in differ}
    return out


def protocol_warnings(parts: list[dict]) -> list[str]:
    """One line per model whose runs follow several protocols: reported apart, and why."""
    lines = []
    for part in parts:
        if part["count"] > 1 and part["index"] == 1:
            lines.append(f"report: {model_name(part['model'], part['depth'])} runs follow "
                         f"{part['count']} protocols (they differ in "
                         f"{', '.join(FIELD_NAMES[f] for f in part['differing'])}): one table, "
                         "ranking and panel each, never averaged together")
    return lines


def error_stats(runs: list[dict]) -> tuple[float | None, float | None, int, int]:
    """Test error over the completed seeds: mean, std (ddof=1, None below 2), n; and how many
    diverged, which are counted apart: their last error is not a result."""
    errors = [r["test_error"] for r in runs
              if r["status"] == "completed" and r["test_error"] is not None]
    diverged = sum(r["status"] == "diverged" for r in runs)
    mean = statistics.fmean(errors) if errors else None
    std = statistics.stdev(errors) if len(errors) >= 2 else None
    return mean, std, len(errors), diverged


# -------------------------------------------------------------------------------- the table


def model_name(model: str, depth: int) -> str:
    return f"{MODEL_NAMES.get(model, model)}-{depth}"


def cell(runs: list[dict]) -> str:
    mean, std, n, diverged = error_stats(runs)
    if n == 0:
        return "diverged" if diverged else MISSING
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" (n={n}"
    return text + (f", {diverged} diverged)" if diverged else ")")


FIELD_NAMES = {"data": "data", "data_fingerprint": "data fingerprint", "epochs": "epochs",
               "global_batch": "global batch", "recipe": "recipe"}


def setting(part: dict, recipes: dict | None = None) -> tuple[list[str], list[str]]:
    """The part's protocol, stated once (epochs, global batch, data; its fingerprint and recipe
    too where they tell the model's protocols apart), and notes: a cell holding one seed twice
    (settings outside the protocol, e.g. a norm's options, differ and are averaged)."""
    proto = part["protocol"]
    stated = [f"{FIELD_NAMES[k]} {MISSING if proto[k] is None else proto[k]}"
              for k in ("epochs", "global_batch", "data")]
    if "data_fingerprint" in part["differing"]:
        stated.append(f"data fingerprint {proto['data_fingerprint'] or 'unknown'}")
    if "recipe" in part["differing"]:
        keys = (recipes or {}).get((part["model"], part["depth"], part["index"]))
        stated.append("recipe " + (", ".join(f"{k}={v}" for k, v in keys.items()) if keys
                                   else proto["recipe"] or "unknown"))
    notes = []
    if part["count"] > 1:
        notes.append(f"Note: protocol {part['index']} of {part['count']} for "
                     f"{model_name(part['model'], part['depth'])} (the protocols differ in "
                     f"{', '.join(FIELD_NAMES[f] for f in part['differing'])}); never averaged "
                     "with the others.")
    for lab, cells in by_label(part).items():
        for b, runs in cells.items():
            seeds = [r["seed"] for r in runs]
            if len(seeds) != len(set(seeds)):  # e.g. two lr values in one folder
                notes.append(f"Note: {lab} at b={b} holds {len(seeds)} runs of seeds "
                             f"{sorted(seeds)}: runs differing in other settings are averaged")
    return stated, notes


def by_label(part: dict) -> dict:
    """{label: {b: [rows]}} of one part."""
    return group_runs(part["rows"])[(part["model"], part["depth"])]


def part_name(part: dict) -> str:
    """`ResNet-20`, or `ResNet-20 (protocol 2 of 3)` where its runs follow several."""
    name = model_name(part["model"], part["depth"])
    return name + (f" (protocol {part['index']} of {part['count']})" if part["count"] > 1
                   else "")


def heading(part: dict, what: str) -> str:
    name = model_name(part["model"], part["depth"])
    return f"## {name}: {what}{part_name(part)[len(name):]}"


def error_table(rows: list[dict]) -> str:
    """Markdown: per (model, depth) and protocol, test error (%) per norm (rows) and b."""
    parts, out = protocol_parts(rows), []
    recipes = recipe_difference(parts)
    for part in parts:
        labels = by_label(part)
        bs = sorted({b for cells in labels.values() for b in cells})
        stated, notes = setting(part, recipes)
        lines = [heading(part, "test error (%) vs. batch size per device"), "",
                 "; ".join([", ".join(stated), "mean ± std over seeds (ddof=1), n = seeds"])
                 + ".", "", "| norm | " + " | ".join(f"b={b}" for b in bs) + " |",
                 "|:--|" + "--:|" * len(bs)]
        for lab, cells in labels.items():
            lines.append(f"| {lab} | "
                         + " | ".join(cell(cells[b]) if b in cells else MISSING for b in bs)
                         + " |")
        out.append("\n".join(lines + ([""] + notes if notes else [])))
    return "\n\n".join(out) + "\n"


# ------------------------------------------------------------------------------ the ranking


def fmt(mean: float | None, std: float | None, n: int, signed: bool = False) -> str:
    if mean is None:
        return MISSING
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "") + f" (n={n})"


def ranking(rows: list[dict]) -> str:
    """Markdown: per (model, depth), every method at b = 1 and b = 2 (test error, mean ± std
    over seeds) and its gap to BN at b = 64 (error minus BN's mean; the std is the method's),
    sorted by the error at b = 1, then at b = 2."""
    parts, out = protocol_parts(rows), []
    recipes = recipe_difference(parts)
    for part in parts:
        labels = by_label(part)
        bn64 = error_stats(labels.get("bn", {}).get(64, []))[0]
        entries = []
        for lab, cells in labels.items():
            at = {b: error_stats(cells.get(b, [])) for b in (1, 2)}
            if not any(at[b][2] for b in at):
                continue
            gaps = {b: (None if at[b][0] is None or bn64 is None else at[b][0] - bn64)
                    for b in at}
            entries.append((lab, at, gaps))
        entries.sort(key=lambda e: tuple(math.inf if e[1][b][0] is None else e[1][b][0]
                                         for b in (1, 2)))
        lines = [heading(part, "which norm at 1-2 images per device"), "",
                 ", ".join(setting(part, recipes)[0]) + "; "
                 "test error (%) at b images per device, mean ± std over seeds (n = seeds); "
                 "gap = error minus BN's at b = 64"
                 + (f" ({bn64:.2f})" if bn64 is not None else " (no BN run at b = 64)")
                 + "; sorted by the error at b = 1.", "",
                 "| rank | norm | b=1 | gap b=1 | b=2 | gap b=2 |", "|--:|:--|--:|--:|--:|--:|"]
        for i, (lab, at, gaps) in enumerate(entries, 1):
            cols = []
            for b in (1, 2):
                mean, std, n, _ = at[b]
                cols += [fmt(mean, std, n), fmt(gaps[b], None, n, signed=True)
                         if gaps[b] is not None else MISSING]
            lines.append(f"| {i} | {lab} | " + " | ".join(cols) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------------- the plot


def style(lab: str) -> dict:
    """Line style of a label: its norm's colour and marker (STYLE), dashed with WS, dotted for
    per-device statistics, dash-dotted with adaptive gradient clipping."""
    base = lab.split()[0]
    norm = base.removesuffix("_agc").removesuffix("_ws")
    color, marker = STYLE.get(norm, ("#999999", "o"))
    ls = (":" if "per-device" in lab else "-." if base.endswith("_agc")
          else "--" if base.endswith("_ws") else "-")
    return {"color": color, "marker": marker, "ls": ls}


def plot_panel(ax, by_label: dict) -> bool:
    """One (model, depth): a line per norm over b; True if a cell had every run diverge."""
    marked = []
    for lab, cells in by_label.items():
        stats = {b: error_stats(cells[b]) for b in sorted(cells)}
        xs = [b for b, s in stats.items() if s[2]]
        look = style(lab)
        if xs:
            ax.plot(xs, [stats[b][0] for b in xs], **look)
        bars = [b for b in xs if stats[b][1] is not None]
        if bars:
            ax.errorbar(bars, [stats[b][0] for b in bars], yerr=[stats[b][1] for b in bars],
                        fmt="none", ecolor=look["color"], capsize=3)
        marked += [(b, look["color"]) for b, s in stats.items() if not s[2] and s[3]]
    if marked:
        # Headroom first, so the crosses (placed in axes fraction) sit above every point.
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.12 * (high - low))
        for b, color in marked:
            ax.plot([b], [0.95], "x", color=color, markersize=9, mew=2,
                    transform=ax.get_xaxis_transform())
    return bool(marked)


def plot(rows: list[dict], path: Path) -> None:
    """The figure (`figure`) as a PNG."""
    fig = figure(rows)  # chooses matplotlib's backend (Agg) before pyplot is imported
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(rows: list[dict]):
    """Test error vs. b on a log2 axis, largest b first as in the GN paper's Figure 1, a panel
    per model and protocol; error bars are the std over seeds; a cross at the top marks a cell
    where every run diverged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    parts = protocol_parts(rows)
    recipes = recipe_difference(parts)
    panels = [(part, by_label(part)) for part in parts]
    labels = list(dict.fromkeys(lab for _, labs in panels for lab in labs))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols + 2.2, 4.2 * nrows),
                             squeeze=False, layout="constrained")
    any_diverged = False
    for ax, (part, labs) in zip(axes.flat, panels):
        any_diverged |= plot_panel(ax, labs)
        bs = sorted({b for cells in labs.values() for b in cells})
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.invert_xaxis()
        ax.set_title(f"{part_name(part)}\n{', '.join(setting(part, recipes)[0])}",
                     fontsize="medium")
        ax.set_xlabel("batch size per device (images, log2 axis)")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    # One legend for all panels: a norm has the same colour and marker everywhere.
    handles = [Line2D([], [], label=lab, **style(lab)) for lab in labels]
    if any_diverged:
        handles.append(Line2D([], [], color="gray", marker="x", ls="none", mew=2,
                              label="every seed diverged"))
    fig.legend(handles=handles, loc="outside right center", fontsize="small", title="norm")
    fig.suptitle("Test error vs. batch size per device (mean ± std over seeds)")
    return fig


# --------------------------------------------------------------------------------- the CLI


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Summarise finished runs: summary.csv, table.md, error_vs_batch.png.")
    parser.add_argument("runs", nargs="*", metavar="RUNS",
                        help="run directories or folders above them (a sweep dir), or an "
                             "earlier report's summary.csv")
    parser.add_argument("--out", required=True, type=Path, help="where to write the report")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from wandb")
    parser.add_argument("--group", help="with --wandb: only this group (the sweep's name)")
    args = parser.parse_args(argv)
    if not args.runs and not args.wandb:
        parser.error("give run directories or --wandb ENTITY/PROJECT")
    if args.group and not args.wandb:
        parser.error("--group needs --wandb")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows, skipped = load_local(args.runs)
        wandb_rows, wandb_skipped = (load_wandb(args.wandb, args.group) if args.wandb
                                     else ([], []))
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    if skipped:
        print(f"{len(skipped)} run{'s' * (len(skipped) != 1)} without summary.json "
              f"(in progress or interrupted): {', '.join(skipped)}", file=sys.stderr)
    if wandb_skipped:
        print(f"{len(wandb_skipped)} wandb run{'s' * (len(wandb_skipped) != 1)} without a "
              f"final status (in progress or interrupted): {', '.join(wandb_skipped)}",
              file=sys.stderr)
    rows = sorted(rows + wandb_rows, key=sort_key)
    if not rows:
        where = [*args.runs] + ([f"wandb {args.wandb}"
                                 + (f" group {args.group}" if args.group else "")]
                                if args.wandb else [])
        print(f"report: no finished run (summary.json) found in {', '.join(where)}",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "summary.csv")
    table = error_table(rows)
    (args.out / "table.md").write_text(table)
    (args.out / "ranking.md").write_text(ranking(rows))
    plot(rows, args.out / "error_vs_batch.png")
    print(table, end="")
    for line in protocol_warnings(protocol_parts(rows)):
        print(line, file=sys.stderr)
    print(f"{len(rows)} runs -> {args.out}/summary.csv, table.md, ranking.md, "
          "error_vs_batch.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
