"""Composition errors as one line, before Hydra starts.

Hydra reports an unknown key, an ill-typed value or an unknown group option in several lines
that do not say what is allowed. `composition_error` composes the command line's overrides
first (each value of a sweep too) with Hydra's compose API and turns the first failure into
one line naming the key, the value and what is allowed. Anything it does not understand is left
to Hydra itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from .config import ConfigError, resolve

# Hydra's own flags: with any but -m, Hydra answers itself (help, --cfg, another config, ...).
MULTIRUN_FLAGS = ("-m", "--multirun")
# Hydra's modes: it takes one at most, and answers two with a traceback.
MODES = {"-m": "--multirun", "--multirun": "--multirun", "-r": "--run", "--run": "--run",
         "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info",
         "-sc": "--shell-completion", "--shell-completion": "--shell-completion"}


def exit_on_composition_error(config_dir: Path, config_name: str) -> None:
    """The preflight of a Hydra app's __main__: one line on stderr and exit status 2."""
    error = composition_error(sys.argv[1:], config_dir, config_name)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


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
        resolve(compose(config_name=config_name, overrides=overrides))
    except ConfigError as e:  # an interpolation that cannot be resolved: seed=${oc.env:X}
        return str(e)
    except MissingConfigException as e:  # norm=foo: an option the group does not have
        group, _, value = (e.missing_cfg_file or "").rpartition("/")
        if not group or e.options is None:
            return None
        return f"{group}={value} is unknown; allowed: {', '.join(sorted(e.options))}"
    except ConfigCompositionException as e:
        cause = e.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):  # a misspelled key
            key = cause.full_key
            parent, _, name = key.rpartition(".")
            allowed = _keys(config_name, parent)
            where = f"in {parent}" if parent else "at the top level"
            return (f"{key}: unknown key {name!r}; allowed {where}: {', '.join(allowed)}"
                    if allowed else None)
        if isinstance(cause, ValidationError):  # batch_size_per_device=abc
            message = str(cause).splitlines()[0]
            return f"{cause.full_key}: {message}"
        return None
    return None


def _keys(config_name: str, parent: str) -> list[str]:
    """The keys of node `parent`: the typed schema fixes them, so the default config shows them."""
    cfg = compose(config_name=config_name)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return list(node.keys()) if hasattr(node, "keys") else []
