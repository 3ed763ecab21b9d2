"""A researcher's own normalization layer in the harness: `custom_spec(target, **options)`.

The target is a class or a factory, called as `target(num_channels, **options) -> nn.Module`
(timm's and torchvision's `norm_layer` convention; in Hydra's words `_target_` with
`_partial_: true`). What the engine must know, the layer declares, as attributes of its class
(or of the factory function); the defaults are those of a plain norm:

    fused_act        False    True: it replaces "norm then ReLU" as one layer (FRN, EvoNorm)
                              and takes act= (False where no activation follows it)
    conv             "plain"  the convolution before it: plain | ws (Weight Standardization) |
                              centred (each filter's mean removed, as MABN's)
    takes_conv       False    True: it is built with conv=, the convolution before it (as cbn)
    batch_dependent  whether it is a norms.DeviceAware layer: its output for a sample depends
                     on the other samples of its batch. Such a layer must be DeviceAware, so
                     that virtual devices, DDP, accumulation and checkpoints treat it as the
                     built-in ones (norms/devices.py says what it is told)
    affine           False    True: it has trainable parameters (an nn.BatchNorm2d or
                              nn.GroupNorm instance says so itself)

Declarations are checked, not trusted: every layer built is tried once on a copy, on a small
random batch, before anything trains: it must be an nn.Module, keep its input's shape in train
and eval mode, hold trainable parameters if it claims `affine`, and a layer that is not
batch-dependent must give each sample the output it gives that sample alone. A mistake is a
ValueError of one line naming the target.

Importing a target runs its code, so only `load_target` imports, and only what it is given:
the engine gives it the command's `norm.target`, never a run record's.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .devices import DeviceAware
from .factory import NormSpec
from .mabn import CenConv2d
from .ws import WSConv2d

CONVS = {"plain": nn.Conv2d, "ws": WSConv2d, "centred": CenConv2d}
FLAGS = ("fused_act", "takes_conv", "batch_dependent", "affine")


def _reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_target(target: str) -> Callable:
    """The object `target` names: `package.module.Name` (a module on sys.path, e.g. your
    PYTHONPATH), `package.module:Name`, or `path/to/file.py:Name` (a file, imported once per
    process). ValueError of one line if it cannot be imported."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"{target!r} names no class: give package.module.Name or "
                         "path/to/file.py:Name")
    where, colon, attr = target.rpartition(":")
    if colon:
        module = (_import_file(where, target) if where.endswith(".py") or "/" in where
                  else _import_module(where, target))
    else:
        where, _, attr = target.rpartition(".")
        if not where:
            raise ValueError(f"{target!r} names no module: give package.module.Name or "
                             "path/to/file.py:Name")
        module = _import_module(where, target)
    obj = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([where, *attr.split(".")[:i]])
            raise ValueError(f"{target!r}: {owner} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target!r} is a {type(obj).__name__}, not a class or function "
                         "called as f(num_channels, **options)")
    return obj


def _import_module(name: str, target: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise ValueError(f"{target!r}: no module named {e.name!r} on the Python path "
                             "(run from the folder that holds it, or add it to PYTHONPATH)"
                             ) from None
        raise ValueError(f"{target!r}: importing {name} failed ({_reason(e)})") from None
    except Exception as e:  # the user's module raised while it was imported
        raise ValueError(f"{target!r}: importing {name} failed ({_reason(e)})") from None


def _import_file(path: str, target: str):
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ValueError(f"{target!r}: {path} is not a file")
    # One module per file and process, so that every layer built is of one class.
    name = f"microbatch_norm_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"{target!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"{target!r}: importing {path} failed ({_reason(e)})") from None
    return module


def declared(target: Callable, name: str, default):
    """An attribute the target declares: on the class or function, or on the function a
    functools.partial wraps."""
    for obj in (target, getattr(target, "func", None)):
        if obj is not None and hasattr(obj, name):
            return getattr(obj, name)
    return default


def qualified_name(target: Callable) -> str:
    inner = target.func if isinstance(target, functools.partial) else target
    return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', repr(inner))}"


def custom_spec(target: Callable, label: str | None = None, **options) -> NormSpec:
    """The factory's spec of a user's layer: `target(num_channels, **options)`, with what it
    declares (module docstring). `label` names it in every message (default: its import path).
    The options are bound here, as a functools.partial would; build_norm adds only act= (fused
    layers) and conv= (takes_conv)."""
    label = label or qualified_name(target)
    if not callable(target):
        raise ValueError(f"{label} is a {type(target).__name__}, not a class or function "
                         "called as f(num_channels, **options)")
    flags = {}
    for key in ("fused_act", "takes_conv"):
        flags[key] = declared(target, key, False)
        if not isinstance(flags[key], bool):
            raise ValueError(f"{label}: declares {key}={flags[key]!r}; allowed: True or False")
    conv = declared(target, "conv", "plain")
    if conv not in CONVS:
        raise ValueError(f"{label}: declares conv={conv!r}; allowed: {', '.join(CONVS)}")
    extra = {**({"act": True} if flags["fused_act"] else {}),
             **({"conv": None} if flags["takes_conv"] else {})}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to read (a builtin): the call will say
        signature = None
    if signature is not None:
        try:
            signature.bind(1, **options, **extra)
        except TypeError as e:
            needs = " (it declares " + ", ".join(f"{k}=True" for k, v in flags.items() if v) \
                + ")" if extra else ""
            raise ValueError(f"{label}: cannot be called with options {options}{needs}: {e}; "
                             f"its signature: {signature}") from None

    inner = target.func if isinstance(target, functools.partial) else target
    short = getattr(inner, "__qualname__", type(inner).__name__)

    def build(num_channels: int, **kwargs) -> nn.Module:
        args = "".join(f", {k}={v!r}" for k, v in options.items())
        call = f"{label}: {short}({num_channels}{args})"
        try:
            layer = target(num_channels, **options, **kwargs)
        except Exception as e:  # the user's code: one line, not its traceback
            raise ValueError(f"{call} failed: {_reason(e)}") from None
        check_layer(layer, num_channels, call)
        return layer

    return NormSpec(build, fused_act=flags["fused_act"], conv=CONVS[conv],
                    takes_conv=flags["takes_conv"], label=label)


def check_layer(layer, num_channels: int, call: str) -> None:
    """What a built layer must be (module docstring), tried on a copy of it: the layer itself,
    its state and the global random generators are left as they were."""
    if not isinstance(layer, nn.Module):
        raise ValueError(f"{call} returned a value of type {type(layer).__name__}, not an "
                         "nn.Module")
    affine = getattr(layer, "affine", False)
    if affine and not any(p.requires_grad for p in layer.parameters()):
        raise ValueError(f"{call} declares affine=True but has no trainable parameters")
    aware = isinstance(layer, DeviceAware)
    dependent = getattr(layer, "batch_dependent", aware)
    for key, value in (("affine", affine), ("batch_dependent", dependent)):
        if not isinstance(value, bool):
            raise ValueError(f"{call} declares {key}={value!r}; allowed: True or False")
    if dependent and not aware:
        raise ValueError(f"{call} declares batch_dependent=True but is not a norms.DeviceAware "
                         "layer: subclass DeviceAware so that it sees each device's batch "
                         "(README: Python API)")
    x = torch.randn(4, num_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in ("train", "eval"):
            try:
                y = _forward(layer, x, mode == "train")
            except Exception as e:
                raise ValueError(f"{call}: its {mode} forward on a [4, {num_channels}, 4, 4] "
                                 f"input failed: {_reason(e)}") from None
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"{call}: its {mode} forward returned {got} for an input of "
                                 f"{tuple(x.shape)}; a norm keeps its input's shape")
        if dependent:
            return
        alone = torch.cat([_forward(layer, x[i:i + 1], True) for i in range(len(x))])
        if not torch.allclose(_forward(layer, x, True), alone, rtol=1e-4, atol=1e-5):
            raise ValueError(
                f"{call}: a sample's output depends on the other samples of its batch, but "
                "the layer is not batch-dependent: declare batch_dependent = True and subclass "
                "norms.DeviceAware (README: Python API), or use a batch-independent layer")


def _forward(layer: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
    twin = copy.deepcopy(layer)
    twin.train(training)
    return twin(x)
