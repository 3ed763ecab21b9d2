"""The preflight of a Hydra app: every user error as one line, before Hydra starts.

Hydra reports an unknown key, an ill-typed value or an unknown group option in several lines
that do not say what is allowed. `composition_error` composes the command line's overrides
first (each value of a sweep too) with Hydra's compose API and turns the first failure into
one line naming the key, the value and what is allowed. Anything it does not understand is left
to Hydra itself.

`job_errors` goes further for train.py: it validates every job the command would run (a sweep:
each combination, as Hydra's basic sweeper will expand it) and checks that the run folder can
be created, so nothing starts, and no folder appears, when a job is bad.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError,
                              InterpolationResolutionError, ValidationError)

from .config import (NAME_MAX, ConfigError, check_keys, interpolation_reason, resolve,
                     schema_keys, unknown_key)

# Hydra's own flags: with any but -m, Hydra answers itself (help, --cfg, another config, ...).
MULTIRUN_FLAGS = ("-m", "--multirun")
# Hydra's modes: it takes one at most, and answers two with a traceback.
MODES = {"-m": "--multirun", "--multirun": "--multirun", "-r": "--run", "--run": "--run",
         "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info",
         "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def exit_on_composition_error(config_dir: Path, config_name: str,
                              validate: Callable | None = None) -> list[str]:
    """The preflight of a Hydra app's __main__: one line on stderr and exit status 2 for a
    composition error; with `validate` (train.py), also one line per invalid job. Returns the
    invalid jobs a sweep with skip_invalid_jobs=true goes on without."""
    error = composition_error(sys.argv[1:], config_dir, config_name)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if validate is None:
        return []
    errors, skip = job_errors(sys.argv[1:], config_dir, config_name, validate)
    if errors and not skip:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        if len(errors) > 1 or any(a in MULTIRUN_FLAGS for a in sys.argv[1:]):
            print(f"error: {len(errors)} invalid job(s); nothing was started (skip_invalid_jobs"
                  "=true runs the valid ones)", file=sys.stderr)
        sys.exit(2)
    return errors


def job_errors(argv: list[str], config_dir: Path, config_name: str,
               validate: Callable) -> tuple[list[str], bool]:
    """One line per job of this command that `validate` refuses (or whose run folder cannot
    be created), and whether the command asks to skip them (skip_invalid_jobs=true)."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):
        return [], False
    multirun = bool(flags)
    typed = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(typed)
    except Exception:  # noqa: BLE001 - Hydra's own message is the right one
        return [], False
    hydra_args = [o.input_line for o in parsed if o.get_key_element().startswith("hydra")]
    task = [o for o in parsed if not o.get_key_element().startswith("hydra")]
    fixed = [o.input_line for o in task if not o.is_sweep_override()]
    errors = []
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        base = compose(config_name=config_name, overrides=fixed + hydra_args,
                       return_hydra_config=True)
        skip = bool(base.get("skip_invalid_jobs", False))
        jobs = [fixed]
        if multirun:  # as Hydra's basic sweeper expands it: config params, then the command
            params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
            overrides = OverridesParser.create().parse_overrides(params + [o.input_line
                                                                           for o in task])
            jobs = BasicSweeper.split_arguments(overrides, None)[0]
        elif (problem := unwritable(base)) is not None:
            return [problem], False
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # validate's warnings come again when the job runs
        try:
            for job in jobs:
                try:
                    validate(compose(config_name=config_name, overrides=job))
                except ValueError as e:  # ConfigError, or a resolver's complaint
                    errors.append(f"{' '.join(job) if multirun else ''}"
                                  f"{': ' if multirun else ''}{e}")
        finally:
            logging.disable(previous)
    return errors, skip and multirun


def unwritable(cfg) -> str | None:
    """One line if the run folder (hydra.run.dir) cannot be created here, else None: an
    interpolation that does not resolve, an empty name (the run's files would go into the
    current folder), a name longer than a file system takes, a link that leads nowhere, a
    parent that is not a writable folder."""
    try:
        text = str(cfg.hydra.run.dir)
    except InterpolationResolutionError as e:
        return f"hydra.run.dir: {interpolation_reason(e)}"
    except Exception:  # noqa: BLE001 - a folder naming what only Hydra knows: Hydra decides
        return None
    if not text.strip():
        return (f"hydra.run.dir={text!r} is invalid; allowed: a folder (an empty name would "
                "write the run into the current folder)")
    run_dir = Path(text)
    for part in run_dir.parts:
        if len(part.encode()) > NAME_MAX:
            return (f"hydra.run.dir: the name {part[:24]}... is {len(part.encode())} bytes; "
                    f"allowed: at most {NAME_MAX} bytes per folder name")
    existing = run_dir.absolute()
    while not existing.exists():
        if existing.is_symlink():  # dangling, or a loop: Hydra's makedirs would fail on it
            return (f"hydra.run.dir={run_dir}: {existing} is a link that leads to no folder "
                    f"(to {os.readlink(existing)}); remove it or choose another folder")
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return (f"hydra.run.dir={run_dir}: cannot create it ({existing} is not a writable "
                "folder); choose a folder you can write to")
    return None


def composition_error(argv: list[str], config_dir: Path, config_name: str) -> str | None:
    """One line for the first override that cannot be composed, or None if all compose."""
    flags = [a for a in argv if a.startswith("-")]
    modes = sorted({MODES[f.split("=")[0]] for f in flags if f.split("=")[0] in MODES})
    if len(modes) > 1:
        return (f"{' and '.join(modes)} cannot be combined; allowed: one of "
                f"{', '.join(sorted(set(MODES.values())))}")
    if any(f not in MULTIRUN_FLAGS for f in flags):
        return None
    typed = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(typed)
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message is the right one
        return None
    # hydra.* overrides configure Hydra itself (launcher, run dir): compose does not take them.
    jobs = [(o, o.input_line) for o in parsed if not o.get_key_element().startswith("hydra")]
    fixed = [line for o, line in jobs if not o.is_sweep_override()]
    candidates = [fixed]
    for o, _ in jobs:  # every value of every sweep, beside the fixed overrides
        if o.is_sweep_override():
            key = o.get_key_element()
            candidates += [fixed + [f"{key}={v}"] for v in o.sweep_string_iterator()]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        for overrides in candidates:
            error = _compose_error(config_name, overrides)
            if error:
                return error
    return None


def _compose_error(config_name: str, overrides: list[str]) -> str | None:
    try:
        cfg = compose(config_name=config_name, overrides=overrides)
        check_keys(cfg)  # a key added with '+': +norm.foo=1
        resolve(cfg)
    except ConfigError as e:  # that, or an interpolation that cannot be resolved: seed=${oc.env:X}
        return str(e)
    except MissingConfigException as e:  # norm=foo: an option the group does not have
        group, _, value = (e.missing_cfg_file or "").rpartition("/")
        if not group or e.options is None:
            return None
        return f"{group}={value} is unknown; allowed: {', '.join(sorted(e.options))}"
    except ConfigCompositionException as e:
        cause = e.__cause__ or e.__context__  # a config file's key: only the context has it
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):  # a misspelled key
            allowed = _keys(config_name, cause.full_key.rpartition(".")[0])
            return unknown_key(cause.full_key, allowed) if allowed else None
        if isinstance(cause, ValidationError):  # batch_size_per_device=abc
            message = str(cause).splitlines()[0]
            return f"{cause.full_key}: {message}"
        return None
    return None


def _keys(config_name: str, parent: str) -> list[str]:
    """The keys node `parent` may hold: its schema's (check_keys' list), else the default's."""
    cfg = compose(config_name=config_name)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not hasattr(node, "keys"):
        return []
    return schema_keys(node) or list(node.keys())
