"""Signal propagation at initialization, per norm (Lubana et al. 2021, "Beyond BatchNorm").

    python scripts/diagnose.py model=resnet model.depth=110 'diagnose.norms=[none,bn,gn,ln,in]'
    python scripts/diagnose.py model.depth=56 data=synthetic hydra.run.dir=outputs/diag56
    python scripts/diagnose.py model=vgg model.depth=16 norm.groups=32 'diagnose.groups=[1,8,32]'

For every norm of `diagnose.norms` (and GN with every group count of `diagnose.groups`), builds
the model `diagnose.seeds` times (seeds seed, seed+1, ...), probes each init on the same
`diagnose.batches` batches of `diagnose.batch_size` training images in train mode
(engine.diagnostics.measure), averages, and writes to the run directory:

    diagnostics.csv  one row per norm x probed layer (residual block / VGG ReLU)
    summary.csv      one row per norm: var_growth, cosine_similarity, stable_rank, grad_ratio
    groups.csv       one row per GN group count
    config.yaml      the config that ran (no .hydra/ folder, as train.py)
    *.png            activation variance and gradient norm vs depth, similarity per norm/groups

Shares configs/ with train.py (model, norm, data, ... groups); the primary config is
configs/diagnose.yaml. norm.ws, norm.groups (default 8), norm.eps and norm.momentum apply to
every norm in the list; a list entry `<norm>_ws` turns WS on for that entry. Data: real images
when data.root exists (never downloaded here), else synthetic with one warning.
"""
from __future__ import annotations

import csv
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from engine.config import (CUSTOM, DATASETS, DEVICES, Config, ConfigError,  # noqa: E402
                           config_keys, model_norm, norm_options, register)
from engine.data import DataError, load_dataset  # noqa: E402
from engine.diagnostics import DiagnoseSettings, Measurement, measure_at_init  # noqa: E402
from engine.records import RunRecord  # noqa: E402
from models import build_model, check_depth  # noqa: E402
from norms import NORMS, check_statistics  # noqa: E402

log = logging.getLogger("diagnose")

DEFAULT_GROUPS = 8  # as configs/norm/gn.yaml: divides every width of every model here
LAYER_COLUMNS = ("norm", "model", "depth", "layer", "depth_fraction", "activation_var",
                 "grad_norm", "cosine_similarity", "stable_rank")
SUMMARY = ("var_growth", "cosine_similarity", "stable_rank", "grad_ratio",
           "block_cosine_similarity", "block_stable_rank")


@dataclass
class DiagnoseConfig(Config):
    """The training schema plus the `diagnose` node (engine.config.Config is strict)."""
    diagnose: DiagnoseSettings = field(default_factory=DiagnoseSettings)


register()  # the training schema and the resolvers the shared configs use
ConfigStore.instance().store(name="diagnose_schema", node=DiagnoseConfig)


# ---------------------------------------------------------------- what to measure


@dataclass
class Variant:
    """One model to diagnose: label (csv `norm`), norm name (or a user's layer's spec), WS,
    build_norm options."""
    label: str
    norm: object
    ws: bool
    options: dict

    def build(self, cfg) -> torch.nn.Module:
        return build_model(cfg.model.arch, cfg.model.depth, norm=self.norm, ws=self.ws,
                           zero_init_residual=cfg.model.zero_init_residual, **self.options)


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def plan(cfg) -> tuple[list[Variant], list[Variant]]:
    """The norms and GN group counts to measure; ConfigError (key, value, allowed) on the first
    bad input. Builds each model once, so nothing fails after measuring has begun."""
    d = cfg.diagnose
    allowed = ", ".join(NORMS) + " (each but nf also <norm>_ws), custom (your layer: with " \
        "norm=custom norm.target=...)"
    _require(len(d.norms) > 0, "diagnose.norms", list(d.norms), f"a non-empty list of {allowed}")
    for key in ("seeds", "batches"):
        _require(d[key] >= 1, f"diagnose.{key}", d[key], "an integer >= 1")
    _require(d.batch_size >= 2, "diagnose.batch_size", d.batch_size,
             "an integer >= 2 (similarity is between the inputs of a batch)")
    for i, g in enumerate(d.groups):
        _require(g >= 1, f"diagnose.groups[{i}]", g, "integers >= 1")
    _require(cfg.data.name in DATASETS, "data.name", cfg.data.name, ", ".join(DATASETS))
    _require(cfg.trainer.device in DEVICES, "trainer.device", cfg.trainer.device,
             ", ".join(DEVICES))
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' but no CUDA device is visible; allowed here: "
                          "auto, cpu")
    try:
        check_depth(cfg.model.arch, cfg.model.depth)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    options = norm_options(cfg)
    if "groups" not in options and "channels_per_group" not in options:
        options["groups"] = DEFAULT_GROUPS
    variants, seen = [], set()
    for i, label in enumerate(d.norms):
        key = f"diagnose.norms[{i}]"
        name = label[:-3] if label.endswith("_ws") else label
        _require(name in NORMS or (name == CUSTOM and cfg.norm.name == CUSTOM), key, label,
                 allowed)
        ws = cfg.norm.ws or label.endswith("_ws")
        if name == CUSTOM:  # the user's layer, by its target
            variant = Variant(cfg.norm.target + ("_ws" if ws else ""), model_norm(cfg)[0], ws, {})
        else:
            variant = Variant(name + ("_ws" if ws else ""), name, ws, options)
        _require(variant.label not in seen, key, label, "each norm once")
        seen.add(variant.label)
        _check_builds(cfg, variant, key, label)
        variants.append(variant)

    sweep, dropped = [], []
    gn_options = {k: v for k, v in options.items() if k not in ("groups", "channels_per_group")}
    for g in dict.fromkeys(d.groups):  # in order, once each
        v = Variant(f"gn{g}", "gn", cfg.norm.ws, {**gn_options, "groups": g})
        try:
            _check_builds(cfg, v, "diagnose.groups", g)
            sweep.append(v)
        except ConfigError:
            dropped.append(g)
    if dropped:
        log.info("diagnose.groups: skipping %s (must divide every norm layer's channels of "
                 "%s%d)", dropped, cfg.model.arch, cfg.model.depth)
    return variants, sweep


def _check_builds(cfg, variant: Variant, key: str, value) -> None:
    try:
        model = variant.build(cfg)
        # BN fails only below 2 values per channel, GN whatever the batch: with batch_size >= 2
        # a batch of 2 gives the real batch's verdicts at a fraction of the cost.
        check_statistics(model, (2, 3, 32, 32))
    except ValueError as e:
        message = config_keys(str(e)) if isinstance(variant.norm, str) else str(e)
        raise ConfigError(f"{key}={value!r}: {message}") from None


# ---------------------------------------------------------------- data


def load_batches(cfg) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """`diagnose.batches` batches of `diagnose.batch_size` training images (no augmentation),
    normalised with the data set's mean/std; the same images for every norm and init, drawn by
    a generator seeded with `seed`. Returns (batches, data set name actually used)."""
    d, n = cfg.data, cfg.diagnose.batches * cfg.diagnose.batch_size
    name, root = d.name, d.root
    if name != "synthetic" and (root is None or not Path(str(root)).expanduser().exists()):
        log.warning("data.root=%s not found: measuring on synthetic data instead (set data.root "
                    "to real %s images)", root, name)
        name = "synthetic"
    ds = load_dataset(name, root, download=False, train_subset=d.train_subset,
                      train_size=d.train_size, test_size=d.test_size, seed=cfg.seed,
                      cache_dir=d.cache_dir)
    if n > len(ds.train):
        raise ConfigError(f"diagnose.batches x diagnose.batch_size={n} is invalid; allowed: at "
                          f"most the {len(ds.train)} training images of data={name}")
    g = torch.Generator().manual_seed(cfg.seed)
    index = torch.randperm(len(ds.train), generator=g)[:n].view(cfg.diagnose.batches, -1)
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    return [((ds.train.images[i].float() / 255 - mean) / std, ds.train.labels[i])
            for i in index], name


# ---------------------------------------------------------------- outputs


def summary_row(m: Measurement) -> dict[str, float]:
    """summary() plus the last block's own cosine similarity and stable rank."""
    return {**m.summary(), "block_cosine_similarity": m.layers[-1].cosine_similarity,
            "block_stable_rank": m.layers[-1].stable_rank}


def write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def plot(out: Path, results: dict[str, Measurement], sweep: dict[int, Measurement],
         title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)

    for key, ylabel, name in (("activation_var", "activation variance", "activation_var.png"),
                              ("grad_norm", "||dL/dh|| (gradient norm)", "grad_norm.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, m in results.items():
            ax.plot([r.depth_fraction for r in m.layers], [getattr(r, key) for r in m.layers],
                    marker=".", label=label)
        ax.set(yscale="log", xlabel="depth fraction (probed layer / number of layers)",
               ylabel=ylabel)
        ax.legend()
        save(fig, name)

    panels = (("cosine_similarity", "penultimate cosine similarity"),
              ("stable_rank", "penultimate stable rank"),
              ("block_cosine_similarity", "last block cosine similarity"),
              ("block_stable_rank", "last block stable rank"))
    for what, name, xlabel in ((results, "similarity.png", "norm"),
                               (sweep, "groups.png", "GN groups")):
        if not what:
            continue
        rows = {str(k): summary_row(m) for k, m in what.items()}
        keys = panels + ((("grad_ratio", "grad ratio (first / last block)"),)
                         if what is sweep else ())
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
        for ax, (key, ylabel) in zip(axes, keys):
            ax.bar(range(len(rows)), [r[key] for r in rows.values()], color="tab:blue")
            ax.set_xticks(range(len(rows)), list(rows), rotation=45)
            ax.set(xlabel=xlabel, ylabel=ylabel)
            finite = [r[key] for r in rows.values() if math.isfinite(r[key])]
            if finite:  # zoomed in: the differences can be small next to the values
                lo, hi = min(finite), max(finite)
                pad = 0.15 * (hi - lo) or 0.01 * abs(hi) or 0.01
                ax.set_ylim(max(0.0, lo - pad), hi + pad)
        save(fig, name)
    return written


# ---------------------------------------------------------------- the app


def run(cfg, out: Path) -> dict[str, dict[str, float]]:
    variants, sweep = plan(cfg)  # every user error raises here, before any measurement
    batches, data_name = load_batches(cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.trainer.device == "auto" \
        else cfg.trainer.device
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    d, arch, depth = cfg.diagnose, cfg.model.arch, cfg.model.depth
    seeds = range(cfg.seed, cfg.seed + d.seeds)
    log.info("%s%d on %s, %d init(s) x %d batch(es) of %d, %s", arch, depth, data_name, d.seeds,
             d.batches, d.batch_size, device)

    def measure_all(vs: list[Variant]) -> dict[str, Measurement]:
        results = {}
        for v in vs:
            tic = time.perf_counter()
            results[v.label] = measure_at_init(lambda: v.build(cfg), batches, seeds, device)
            s = summary_row(results[v.label])
            log.info("%-8s var_growth %10.4g  cos %.4f  srank %7.3f  grad_ratio %10.4g  "
                     "block cos %.4f  block srank %6.3f  (%.1f s)", v.label, s["var_growth"],
                     s["cosine_similarity"], s["stable_rank"], s["grad_ratio"],
                     s["block_cosine_similarity"], s["block_stable_rank"],
                     time.perf_counter() - tic)
        return results

    results = measure_all(variants)
    by_groups = {v.options["groups"]: m for v, m in zip(sweep, measure_all(sweep).values())}

    ident = {"model": arch, "depth": depth}
    write_csv(out / "diagnostics.csv", LAYER_COLUMNS,
              [{"norm": label, **ident, **asdict(r)} for label, m in results.items()
               for r in m.layers])
    summaries = {label: summary_row(m) for label, m in results.items()}
    write_csv(out / "summary.csv", ("norm", "model", "depth", *SUMMARY),
              [{"norm": label, **ident, **s} for label, s in summaries.items()])
    write_csv(out / "groups.csv", ("groups", "model", "depth", *SUMMARY),
              [{"groups": g, **ident, **summary_row(m)} for g, m in by_groups.items()])
    RunRecord(out).write_config(OmegaConf.to_container(cfg, resolve=True))
    written = ["diagnostics.csv", "summary.csv", "groups.csv", "config.yaml"]
    if d.plots:
        written += plot(out, results, by_groups, f"{arch}{depth} at init, {data_name}")
    log.info("wrote %s to %s", ", ".join(written), out)
    return summaries


@hydra.main(config_path="../configs", config_name="diagnose", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line; a traceback is for bugs
        sys.exit(2)


if __name__ == "__main__":
    from engine.cli import exit_on_composition_error

    exit_on_composition_error(ROOT / "configs", "diagnose")
    main()
