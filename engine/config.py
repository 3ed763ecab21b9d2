"""The typed config schema (Hydra structured configs) and the one place it is validated.

The dataclasses below are the schema: Hydra refuses unknown keys and ill-typed values while
composing (`batch_size_per_device=abc`, `trainer.epoch=3`); `check_keys` refuses the keys its
'+' adds (`+norm.foo=1`). `validate` then checks what types
cannot (ranges, depths, groups against every layer's channels, devices) before any data or
model is built, raising ConfigError with one line: the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

DATASETS = ("cifar10", "cifar100", "synthetic")
DEFAULT_DATA_ROOT = "data"  # configs/data/cifar*.yaml without $CIFAR10_ROOT: where a download goes
LOGGER_MODES = ("auto", "online", "offline", "disabled")
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")  # wandb's own
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # autocast dtype (torch.*)
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a collective that waits longer is a hung job
log = logging.getLogger("microbatch")


class ConfigError(ValueError):
    """A user-caused configuration problem; str() is one line naming key, value, allowed."""


@dataclass
class ModelConfig:
    arch: str = MISSING              # vgg | resnet (chosen by the `model` group)
    depth: int = MISSING
    zero_init_residual: bool = False


@dataclass
class NormConfig:
    name: str = MISSING              # one of norms.NORMS (the `norm` group's presets)
    ws: bool = False                 # Weight Standardization on every convolution
    groups: Optional[int] = None     # gn, bcn, evonorm_s0 (or channels_per_group)
    channels_per_group: Optional[int] = None
    eps: float = 1e-5
    momentum: Optional[float] = 0.1  # running-statistics update rate (bcn: the estimate rate r)
    sync_stats: bool = True          # bcn: estimates from the global batch, or per device
    r_max: Optional[float] = None    # brn, mabn: r clipped to [1/r_max, r_max]
    d_max: Optional[float] = None    # brn: d clipped to [-d_max, d_max]
    # Optimizer steps, or fractions of the run's steps with schedule_unit=run:
    renorm_from: Optional[float] = None  # brn, mabn: r = 1 (and d = 0) for this many steps
    r_max_at: Optional[float] = None     # brn: r_max reached (linear from renorm_from)
    d_max_at: Optional[float] = None     # brn: d_max reached
    warmup: Optional[float] = None       # mabn: steps on the current batch's statistics
    schedule_unit: str = "steps"     # steps | run
    simulated_batch: Optional[int] = None  # mabn: averages over simulated_batch / b steps
    learned_eps: bool = False        # frn: eps + |eps_l|, eps_l learned (eps the floor)
    alpha: Optional[float] = None    # nf: the NF block's residual scale (default 0.2)
    window: Optional[int] = None     # cbn: k, the iterations whose statistics are used (4)
    burnin: Optional[float] = None   # cbn: plain-BN steps before the window is used
    compensate: Optional[bool] = None  # cbn: the Taylor compensation (false: the naive window)
    alpha_fwd: Optional[float] = None  # online: decay of the streamed mean and variance
    alpha_bkw: Optional[float] = None  # online: decay of the backward's control processes
    ecm: Optional[str] = None        # online: error compensation, ls | ac | none
    clamp: Optional[float] = None    # online: the clamp of ecm=ac (5)
    # norm=custom, a layer of your own (README: Python API): its import path, pkg.module.Name
    # or path/to/file.py:Name, called as target(num_channels, **options)
    target: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: Optional[str] = None       # pickled layout, image folder, or a .tar.gz of one
    download: bool = False
    train_subset: int = 0            # first-N deterministic subset; 0 = all
    train_size: int = 5000           # synthetic only
    test_size: int = 1000            # synthetic only
    augment: bool = True
    cache_dir: Optional[str] = None
    eval_batch_size: int = 1000


@dataclass
class OptimConfig:
    lr: float = 0.1                  # base lr for a global batch of 128, scaled linearly
    scale_lr: bool = True            # lr = optim.lr x global_batch / 128
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0       # linear warm-up, then cosine to 0
    agc: Optional[float] = None      # adaptive gradient clipping's lambda (0.01); null: off
    agc_eps: float = 1e-3            # AGC's floor on the weight norm


@dataclass
class TrainerConfig:
    epochs: int = 30
    devices: int = 1                 # real processes (DDP)
    virtual_devices: int = 1         # devices simulated in one process
    accumulate: int = 1              # gradient-accumulation steps per optimizer step
    device: str = "auto"             # auto | cpu | cuda
    num_threads: int = 0             # torch CPU threads; 0 = torch's default
    keep_freed_memory: bool = True   # CPU on glibc: reuse freed buffers instead of new mmaps
    resume: bool = True              # continue from <run dir>/checkpoints/last.pt if present
    progress: bool = True            # tqdm bar on interactive terminals
    check_every: int = 50            # steps between non-finite-loss checks (host syncs)
    probe_every: int = 0             # Beyond-BatchNorm probes every N epochs (0: off)
    timeout_s: float = 300.0         # collective timeout: a stuck peer fails the job
    precision: str = "fp32"          # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, CUDA)
    channels_last: bool = False      # NHWC activations and conv weights
    compile: bool = False            # torch.compile the training forward (inductor)
    cuda_graphs: bool = False        # CUDA: capture a step's forward+backward, replay it


@dataclass
class LoggerConfig:
    mode: str = "auto"               # auto | online | offline | disabled
    project: str = "microbatch"
    entity: Optional[str] = None
    group: Optional[str] = None      # default: the experiment name
    tags: list[str] = field(default_factory=list)
    log_every: int = 50              # training curves every N optimizer steps of an epoch
    #                                  (0: per epoch only), each a check (a host sync)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    batch_size_per_device: int = 128
    seed: int = 0
    name: str = "default"            # the experiment/sweep name: wandb group, output folder
    skip_invalid_jobs: bool = False  # sweeps: run the valid jobs, list the invalid at the end


CUSTOM = "custom"  # norm.name of a user's layer (norm.target)
# The built-in norms' keys, which norm=custom leaves at their defaults (its options are its own).
BUILT_IN_NORM_KEYS = {f.name: f.default for f in dataclasses.fields(NormConfig)
                      if f.name not in ("name", "ws", "target", "options")}


def norm_dirname(name: str, target: str | None) -> str:
    """${norm_dirname:${norm.name},${norm.target}}: the norm in a run folder's name; a user's
    layer by its class name (custom-MeanOnlyBatchNorm), the digest telling targets apart."""
    if name != CUSTOM or not target:
        return name
    tail = re.split(r"[.:/]", str(target).rstrip(".:/"))[-1]
    return f"{CUSTOM}-{re.sub(r'[^A-Za-z0-9_-]', '_', tail)[:64]}"


def register() -> None:
    """Register the schema (named in configs/config.yaml's defaults) and the resolvers."""
    ConfigStore.instance().store(name="schema", node=Config)
    for name, resolver in (("ws_suffix", lambda ws: "_ws" if ws else ""),
                           ("norm_dirname", norm_dirname),
                           ("devices_for", devices_for), ("run_digest", run_digest),
                           ("job_dirname", job_dirname)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


# Keys that do not change a run's mathematics: free to differ when resuming. The execution
# strategies (memory layout, torch.compile, CUDA graphs) run the same operations on the same
# numbers and differ only in summation order, as thread counts do; trainer.precision changes
# the numbers themselves (bf16 keeps 8 bits of mantissa), so it is part of the identity.
# data.root is a path, not data: the data's own fingerprint joins the identity when it loads.
NON_IDENTITY = ("logger", "trainer.progress", "trainer.num_threads", "trainer.keep_freed_memory",
                "trainer.resume", "trainer.check_every", "trainer.timeout_s",
                "trainer.probe_every", "data.root", "data.cache_dir", "data.download",
                "data.eval_batch_size", "trainer.channels_last", "trainer.compile",
                "trainer.cuda_graphs", "skip_invalid_jobs")


# Keys added after runs were recorded, left out of the identity at their default (which keeps
# the old behaviour), so that the run folders of earlier runs keep their digests.
ABSENT_AT_DEFAULT = {"norm.target": None}


def identity(cfg) -> dict:
    """The run's identity: every config key that changes its mathematics, flattened (a
    user's layer: its target and each of its options, norm.options.<key>)."""
    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if key == "hydra" or any(key == n or key.startswith(n + ".") for n in NON_IDENTITY):
                continue
            if isinstance(v, dict):
                walk(v, key + ".")
            elif not (key in ABSENT_AT_DEFAULT and v == ABSENT_AT_DEFAULT[key]):
                flat[key] = v
    walk(container, "")
    return flat


def digest(ident: dict) -> str:
    """8 hex digits naming an identity: equal identities, equal digests, on any machine."""
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def world_size_from_env() -> int:
    """The number of processes a launcher (torchrun) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_digest(*, _root_) -> str:
    """${run_digest:} in hydra.run.dir: the digest of the config's identity, so different
    configs never share a default run folder and the same command always finds its own. The
    data's content is only known once loaded, so its path (data.root) stands in for it here;
    inside the folder the identity compares the data's fingerprint."""
    container = {k: (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
                 for k, v in _root_.items_ex(resolve=False) if k != "hydra"}
    world = world_size_from_env()
    if world > 1 and container["trainer"]["devices"] == 1:
        # under torchrun the launcher sets the number of devices (train.py does the same to
        # the config): the same job as trainer.devices=N, the same folder
        container["trainer"]["devices"] = world
    return digest({**identity(container), "data.root": container["data"]["root"]})


NAME_MAX = 255  # bytes in one path component on Linux and macOS file systems


def job_dirname(overrides: str) -> str:
    """${job_dirname:${hydra.job.override_dirname}} in hydra.sweep.subdir: a sweep job's folder
    is one level deep whatever the overrides hold. '/' becomes %2F (and '%' %25, so the name
    still reads back to the overrides), `data.root=../x/y.tar.gz` stays one readable name; a
    name longer than one path component may be is cut and ends in a digest of the whole."""
    name = str(overrides).replace("%", "%25").replace("/", "%2F")
    if len(name.encode()) > NAME_MAX:
        tail = "..." + hashlib.sha1(name.encode()).hexdigest()[:8]
        head = name.encode()[:NAME_MAX - len(tail)].decode(errors="ignore")
        name = head + tail
    return name


def devices_for(global_batch: int, batch_size_per_device: int, devices: int = 1) -> int:
    """Virtual devices per process that keep the global batch fixed when b and the number of
    real devices vary: ${devices_for:64,${batch_size_per_device},${trainer.devices}}."""
    per_process = batch_size_per_device * devices
    if batch_size_per_device < 1 or devices < 1 or global_batch % per_process:
        raise ConfigError(f"batch_size_per_device={batch_size_per_device} x trainer.devices="
                          f"{devices} must divide the experiment's global batch {global_batch}")
    return global_batch // per_process


# ---------------------------------------------------------------- derived values


def global_batch(cfg) -> int:
    t = cfg.trainer
    return cfg.batch_size_per_device * t.devices * t.virtual_devices * t.accumulate


SCHEDULE_UNITS = ("steps", "run")
STEP_KEYS = ("renorm_from", "r_max_at", "d_max_at", "warmup", "burnin")  # counted in optimizer steps


def norm_options(cfg, total_steps: int | None = None) -> dict[str, Any]:
    """The options `build_norm` takes, from the norm config. Step-valued keys become optimizer
    steps: as given, or with norm.schedule_unit=run as fractions of `total_steps` (the run's
    optimizer steps; None while validating, before the data fixes it)."""
    n = cfg.norm
    if n.name == CUSTOM:  # its options are bound into its spec (model_norm)
        return {}
    opts = {"eps": n.eps, "momentum": n.momentum, "sync_stats": n.sync_stats,
            "learned_eps": n.learned_eps}
    if n.channels_per_group is not None:
        opts["channels_per_group"] = n.channels_per_group
    elif n.groups is not None:
        opts["groups"] = n.groups
    for key in ("r_max", "d_max", "alpha", "window", "compensate", "alpha_fwd", "alpha_bkw",
                "ecm", "clamp"):
        if n[key] is not None:
            opts[key] = n[key]
    for key in STEP_KEYS:
        value = n[key]
        if value is None:
            continue
        if n.schedule_unit == "run":
            _require(0 <= value <= 1, f"norm.{key}", value,
                     "a fraction of the run in [0, 1] with norm.schedule_unit=run")
            opts[key] = round(value * (total_steps or 10_000))
        else:
            _require(value >= 0 and float(value).is_integer(), f"norm.{key}", value,
                     "a whole number of optimizer steps >= 0 (or norm.schedule_unit=run and "
                     "a fraction of the run)")
            opts[key] = int(value)
    if n.simulated_batch is not None:
        b = cfg.batch_size_per_device
        _require(n.simulated_batch >= 1 and (n.simulated_batch % b == 0 or b >= n.simulated_batch),
                 "norm.simulated_batch", n.simulated_batch,
                 f"a multiple of batch_size_per_device={b} (the moving averages span "
                 "simulated_batch / b steps)")
        opts["buffer_size"] = max(1, n.simulated_batch // b)
    return opts


def custom_options(cfg) -> dict:
    """norm=custom: the layer's own options, as plain Python values."""
    return OmegaConf.to_container(cfg.norm.options, resolve=True) if cfg.norm.options else {}


def model_norm(cfg, total_steps: int | None = None):
    """(norm, options) for models.build_model: a built-in norm's name and its options
    (norm_options), or a user's layer (norm=custom) as its spec, its options bound. The one
    place a target is imported: from this command's config, never from a run record."""
    if cfg.norm.name != CUSTOM:
        return cfg.norm.name, norm_options(cfg, total_steps)
    from norms import custom_spec, load_target
    target = cfg.norm.target
    try:
        layer = load_target(target)
    except ValueError as e:
        raise ConfigError(f"norm.target={e}") from None
    try:
        return custom_spec(layer, label=f"norm.target={target!r}", **custom_options(cfg)), {}
    except ValueError as e:
        raise ConfigError(str(e)) from None


def norm_label(cfg) -> str:
    """The norm as reports name it: bn, gn_ws, nf_agc (adaptive gradient clipping on at the
    authors' lambda and eps; other values follow: nf_agc(lambda=0.02)); a user's layer by its
    target and options, my_pkg.MyNorm(momentum=0.05)_ws. AGC is part of the method compared,
    so reports take it from here, not from the recipe."""
    from .agc import CLIPPING, EPS
    name = cfg.norm.name
    if name == CUSTOM:
        options = custom_options(cfg)
        name = str(cfg.norm.target) + (
            f"({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else "")
    name += "_ws" if cfg.norm.ws else ""
    agc, eps = cfg.optim.get("agc"), cfg.optim.get("agc_eps", EPS)
    if agc is None:
        return name
    own = [f"{key}={value:g}" for key, value, default in (("lambda", agc, CLIPPING),
                                                          ("eps", eps, EPS)) if value != default]
    return name + "_agc" + (f"({', '.join(own)})" if own else "")


# ---------------------------------------------------------------- validation


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def schema_keys(node) -> list[str] | None:
    """The keys a config node may hold: its dataclass's fields (None for an untyped node)."""
    kind = OmegaConf.get_type(node)
    return [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else None


def unknown_key(key: str, allowed: list[str]) -> str:
    """The one line for a key the schema does not have (misspelled, or added with '+')."""
    parent, _, name = key.rpartition(".")
    where = f"in {parent}" if parent else "at the top level"
    return f"{key}: unknown key {name!r}; allowed {where}: {', '.join(allowed)}"


def check_keys(cfg: DictConfig) -> None:
    """Refuse a key the schema lacks, however it arrived. Hydra refuses one while composing
    (`norm.foo=1`, or a config file's), but its '+' adds one to a typed node (`+norm.foo=1`,
    `++trainer.bogus=3`, `+norm._target_=x`) that training would ignore: the same line here."""
    def walk(node: DictConfig, prefix: str) -> None:
        allowed = schema_keys(node)
        for key, value in node.items_ex(resolve=False):
            full = f"{prefix}{key}"
            if allowed is not None and key not in allowed and full != "hydra":
                raise ConfigError(unknown_key(full, allowed))
            if isinstance(value, DictConfig) and full != "hydra":
                walk(value, full + ".")
    walk(cfg, "")


def validate(cfg: DictConfig) -> None:
    """Check everything that can be checked without data; raise ConfigError on the first.

    Builds the model once (cheap) so that norm options are checked against every layer."""
    from models import build_model, check_depth  # engine -> models, never the reverse
    from norms import check_statistics, configure_devices

    check_keys(cfg)
    resolve(cfg)
    _require(cfg.batch_size_per_device >= 1, "batch_size_per_device", cfg.batch_size_per_device,
             "an integer >= 1")
    _require(0 <= cfg.seed < 2**63, "seed", cfg.seed, "an integer in [0, 2**63)")
    _require(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", cfg.name) is not None, "name",
             cfg.name, "one folder name (letters, digits, '.', '_', '-'; not starting with "
             "'.'): it names outputs/<name>/ and multirun/<name>/")
    t = cfg.trainer
    for key in ("epochs", "devices", "virtual_devices", "accumulate", "check_every"):
        _require(t[key] >= 1, f"trainer.{key}", t[key], "an integer >= 1")
    _require(0 < t.timeout_s <= MAX_TIMEOUT_S, "trainer.timeout_s", t.timeout_s,
             f"a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    _require(t.probe_every >= 0, "trainer.probe_every", t.probe_every, "0 (off) or >= 1")
    _require(cfg.logger.log_every >= 0, "logger.log_every", cfg.logger.log_every,
             "0 (per epoch only) or an integer >= 1")
    _require(t.num_threads >= 0, "trainer.num_threads", t.num_threads, "0 (default) or >= 1")
    _require(t.device in DEVICES, "trainer.device", t.device, ", ".join(DEVICES))
    o = cfg.optim
    _require(o.lr >= 0, "optim.lr", o.lr, "a number >= 0")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "a number in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _require(0 <= o.warmup_epochs <= t.epochs, "optim.warmup_epochs", o.warmup_epochs,
             f"a number in [0, trainer.epochs={t.epochs}]")
    _require(o.agc is None or o.agc > 0, "optim.agc", o.agc,
             "a clipping threshold lambda > 0 (0.01: the authors'), or null (off)")
    _require(o.agc_eps > 0, "optim.agc_eps", o.agc_eps, "a number > 0 (1e-3: the authors')")
    d = cfg.data
    _require(d.name in DATASETS, "data.name", d.name, ", ".join(DATASETS))
    _require(d.train_subset >= 0, "data.train_subset", d.train_subset, "0 (all) or >= 1")
    _require(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "an integer >= 1")
    if d.name == "synthetic":
        _require(d.train_size >= 1, "data.train_size", d.train_size, "an integer >= 1")
        _require(d.test_size >= 1, "data.test_size", d.test_size, "an integer >= 1")
    elif d.root is None and not d.download:
        raise ConfigError(f"data.root=None: set data.root to the {d.name} data (pickled layout, "
                          "image folder or .tar.gz) or data.download=true")
    _require(cfg.logger.mode in LOGGER_MODES, "logger.mode", cfg.logger.mode,
             ", ".join(LOGGER_MODES))
    if t.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device='cuda' but no CUDA device is visible; "
                              "allowed here: auto, cpu")
    validate_fast_paths(cfg)
    _require(cfg.norm.schedule_unit in SCHEDULE_UNITS, "norm.schedule_unit",
             cfg.norm.schedule_unit, ", ".join(SCHEDULE_UNITS))
    if t.accumulate > 1 and (cfg.norm.name == "syncbn"
                             or (cfg.norm.name == "bcn" and cfg.norm.sync_stats)):
        log.warning("trainer.accumulate=%d with norm=%s: each accumulation step is its own "
                    "forward, so cross-device statistics cover one micro-batch, not the global "
                    "batch; use trainer.virtual_devices for the same maths as real devices",
                    t.accumulate, cfg.norm.name)

    validate_custom(cfg)
    warn_unused_norm_keys(cfg)
    wandb_mode = os.environ.get("WANDB_MODE")
    if cfg.logger.mode != "disabled" and wandb_mode and wandb_mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={wandb_mode!r} (environment) is invalid; allowed: "
                          f"{', '.join(WANDB_MODES)}, or unset (logger.mode={cfg.logger.mode!r}"
                          " starts wandb, which reads it)")
    if cfg.logger.mode == "online":
        from .tracking import has_credentials
        if not has_credentials():
            raise ConfigError("logger.mode='online' but no wandb credentials (WANDB_API_KEY or "
                              "~/.netrc); run `wandb login`, or use auto, offline, disabled")

    norm, options = model_norm(cfg)
    try:
        check_depth(cfg.model.arch, cfg.model.depth)
        model = build_model(cfg.model.arch, cfg.model.depth, norm=norm, ws=cfg.norm.ws,
                            zero_init_residual=cfg.model.zero_init_residual, **options)
    except ValueError as e:  # a user's layer speaks of its own options, not norm.<key>
        raise ConfigError(str(e) if cfg.norm.name == CUSTOM else config_keys(str(e))) from None
    configure_devices(model, t.virtual_devices, accumulate=t.accumulate)
    try:
        check_statistics(model, (cfg.batch_size_per_device, 3, 32, 32))
    except ValueError as e:
        raise ConfigError(f"norm.name={cfg.norm.name!r} at batch_size_per_device="
                          f"{cfg.batch_size_per_device}: {e}") from None


# the keys only some built-in norms read (unset: None); each norm's own come from its spec
NORM_SPECIFIC_KEYS = tuple(k for k, v in BUILT_IN_NORM_KEYS.items() if v is None)


def warn_unused_norm_keys(cfg) -> None:
    """A norm-specific key set for a norm that does not read it does nothing: one warning
    naming who reads it. Not an error: a sweep across norms may set it for some of them."""
    from norms.factory import NORM_SPECS
    name = cfg.norm.name
    if name == CUSTOM or name not in NORM_SPECS:  # custom: validate_custom; unknown: refused
        return

    def reads(spec) -> set[str]:
        keys = set(spec.defaults) | ({"groups", "channels_per_group"} if spec.grouped else set())
        return keys | ({"simulated_batch"} if "buffer_size" in spec.defaults else set())
    for key in NORM_SPECIFIC_KEYS:
        value = cfg.norm[key]
        if value is not None and key not in reads(NORM_SPECS[name]):
            readers = [n for n, spec in NORM_SPECS.items() if key in reads(spec)]
            log.warning("norm.%s=%r does nothing with norm.name=%r; it is read by %s",
                        key, value, name, ", ".join(readers))


def validate_custom(cfg) -> None:
    """norm.target and norm.options belong to norm=custom, which needs a target and leaves the
    built-in norms' keys alone (an eps it would ignore is a mistake, not a setting)."""
    n = cfg.norm
    if n.name != CUSTOM:
        for key, value in (("target", n.target), ("options", custom_options(cfg))):
            _require(not value, f"norm.{key}", value, f"unset with norm.name={n.name!r}: "
                     f"norm.{key} is for norm=custom, a layer of your own")
        return
    _require(isinstance(n.target, str) and n.target.strip() != "", "norm.target", n.target,
             "the import path of your layer with norm=custom: pkg.module.Name or "
             "path/to/file.py:Name")
    for key, default in BUILT_IN_NORM_KEYS.items():
        _require(n[key] == default, f"norm.{key}", n[key],
                 f"its default ({default!r}) with norm=custom: the built-in norms' key; give "
                 f"your layer's own options as norm.options (e.g. '+norm.options.{key}=...')")


def check_data_root(cfg: DictConfig) -> None:
    """A data.root the user named must exist: a download goes only to the default location
    (DEFAULT_DATA_ROOT, configs/data/*.yaml), so a typo is "does not exist", not a download
    into a folder named like the typo (engine/data.py also never downloads to an archive's
    name). The default location, or a folder that exists, may be a download's target.

    The environment, not the config: train.py checks it after `validate`, for every job of a
    sweep before any starts, and where each job runs."""
    name, root = cfg.data.name, cfg.data.root
    if name == "synthetic" or root is None or Path(root) == Path(DEFAULT_DATA_ROOT) \
            or Path(os.path.expanduser(root)).exists():
        return
    from .data import not_found
    env = f"{name.upper()}_ROOT"
    origin = f" (from ${env})" if os.environ.get(env) == root else ""
    raise ConfigError(f"{not_found(root)}{origin}; point data.root (or ${env}) at a copy of "
                      f"{name} (torchvision's pickles, an image folder or a .tar.gz of one); "
                      f"data.download=true downloads only into the default {DEFAULT_DATA_ROOT}/ "
                      "or a folder that exists")


def resolve(cfg: DictConfig) -> None:
    """Resolve every interpolation now, so a resolver's complaint (e.g. devices_for) is one
    line naming the key instead of a traceback from wherever the value is first read."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:
        raise ConfigError(f"{e.full_key}: {interpolation_reason(e)}") from None


def interpolation_reason(e: InterpolationResolutionError) -> str:
    """The resolver's own words: `Environment variable 'X' not found`."""
    return re.sub(r"^\w+ raised while resolving interpolation: ", "", str(e).splitlines()[0])


def validate_fast_paths(cfg) -> None:
    """trainer.precision, compile and cuda_graphs against the device and each other."""
    import torch

    t = cfg.trainer
    _require(t.precision in PRECISIONS, "trainer.precision", t.precision, ", ".join(PRECISIONS))
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.precision == "fp16" and cfg.norm.name == "online":
        raise ConfigError("trainer.precision='fp16' is invalid with norm.name='online': its "
                          "backward's control processes carry the loss-scaled gradient (and an "
                          "overflow step's inf) into every later step; allowed: fp32, bf16")
    if t.precision == "fp16" and not cuda:
        raise ConfigError("trainer.precision='fp16' needs CUDA (autocast with a GradScaler); "
                          "allowed on CPU: fp32, bf16")
    if t.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.precision='bf16' but this GPU has no bf16 support; "
                          "allowed here: fp32, fp16")
    if t.compile and not cuda and not cxx_compiler():
        raise ConfigError("trainer.compile=true on CPU needs a C++ compiler for torch.compile's "
                          "inductor backend (g++ or clang++, or $CXX); install one or use "
                          "trainer.compile=false")
    if not t.cuda_graphs:
        return
    if not cuda:
        raise ConfigError("trainer.cuda_graphs=true needs CUDA (trainer.device=cuda or auto with "
                          "a visible GPU); allowed here: false")
    for ok, key, value, allowed in (
            (t.devices == 1, "trainer.devices", t.devices,
             "1 with trainer.cuda_graphs=true (DDP's gradient hooks cannot be captured)"),
            (not t.compile, "trainer.compile", t.compile,
             "false with trainer.cuda_graphs=true (use one: compile's mode=reduce-overhead "
             "captures graphs itself)"),
            (t.precision != "fp16", "trainer.precision", t.precision,
             "fp32 or bf16 with trainer.cuda_graphs=true (fp16's GradScaler checks for inf on "
             "the host)"),
            (cfg.norm.momentum is not None or cfg.norm.name not in ("bn", "syncbn"),
             "norm.momentum", cfg.norm.momentum,
             "a number in (0, 1] with trainer.cuda_graphs=true (momentum=None reads the batch "
             "count on the host)")):
        _require(ok, key, value, allowed)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU, if any."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def config_keys(message: str) -> str:
    """Speak in config keys: the norm factory says `groups=`, the user typed `norm.groups=`."""
    from norms import OPTIONS
    for key in OPTIONS:
        message = message.replace(f": {key}=", f": norm.{key}=")
    return message.replace("norm='", "norm.name='")
