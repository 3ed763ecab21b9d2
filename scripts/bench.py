"""The benchmark suite: every figure is a ratio of two timings taken side by side.

    python scripts/bench.py [--out DIR] [--threads N] [--device cpu|cuda] [--repeats 7]
                            [--only norm,ws,nf,agc,model,bf16,step,loader,virtual]
    python scripts/bench.py --only norm --target my_pkg.MyNorm [--options '{"eps": 1e-3}']

Prints a table and, with --out, writes DIR/bench.json and DIR/table.md. The figures:

  norm_vs_native         fwd+bwd of each norm / the cheapest torch-native computation of the
                         same maths (F.batch_norm for bn; F.group_norm for gn, ln, in, and as the
                         base for bcn), per activation shape            (goal <= 1.5, bcn <= 2.5);
                         the published micro-batch norms against their closest native kernel
                         (F.batch_norm: brn, evonorm_b0, mabn, online; F.group_norm: frn,
                         evonorm_s0)
                      (goal <= 2.0 brn, frn, evonorm_s0; <= 3.0 evonorm_b0, mabn, online)
                         cbn with the 3x3 conv before it, its window full (k = 4), against
                         the same conv + F.batch_norm: cbn's extra work is one weight-gradient
                         convolution (nu's; mu's is two small matmuls) and the compensation
                                                                                 (goal <= 2.0)
                         --target: your layer (norm=custom's target and options) instead,
                         against F.batch_norm if it is batch-dependent, else F.group_norm
                         (custom-<Name>, goal <= 1.5)
  ws_conv_vs_conv        WSConv2d / nn.Conv2d, fwd+bwd; the worse of the two shapes (goal <= 1.15)
  scaled_ws_conv_vs_conv nf's ScaledWSConv2d (gain, gamma) / nn.Conv2d, the same     (goal <= 1.2)
  agc_vs_clip_grad_norm  adaptive_clip_grad_ over NF ResNet-20's clipped parameters / torch's
                         clip_grad_norm_ (foreach) over the same gradients: the price of
                         clipping unit-wise, per optimizer step                      (goal <= 3.0)
  model_step_vs_bn       a whole ResNet-20 SGD step of 64 images (forward, cross-entropy,
                         backward, step) with each study normalizer at b = 1 (64 virtual
                         devices) and 64 / the same step with bn at b = 64: what a cell costs
                         beside BN's (bn at 64 against itself shows the noise)   (goal <= 2.0)
  bf16_speedup           the engine's training step (train_step) in fp32 / the same step under
                         trainer.precision=bf16's autocast, each study normalizer at b = 1 and
                         64: what bf16 would save a study cell (issue 20 measured 1.3-1.5x for
                         the whole run; its cells need fp32 and bf16 to agree first) (goal >= 1.3)
  step_vs_bare           engine.loop.train_step / a hand-written loop (zero_grad, forward,
                         cross-entropy, backward, SGD step), same model and batch (goal <= 1.05)
  loader_vs_torchvision  engine.data.GlobalBatches batches/s / torchvision's CIFAR10 with PIL
                         transforms and a default DataLoader (num_workers=0), same images
                                                                                 (goal >= 5)
  virtual_vs_accumulate  K virtual devices / K accumulation steps, images/s of the engine's
                         training loop; the same update (tests/test_distributed.py) (goal >= 1.8)

Both sides of a figure run in the same process, alternating within each round after a warm-up;
a figure is the median over rounds of the per-round ratio. These machines are shared: the load
drifts between rounds, far less within one.

On Linux the process first asks glibc to keep freed buffers up to 32 MiB on its heap (mallopt;
--system-malloc keeps the default). By default every buffer above 128 KiB is mmap'd afresh and
zeroed by the kernel page by page on first touch: at [64, 64, 16, 16] those page faults cost
more than the kernels (group_norm fwd+bwd 2.6 ms instead of 0.7 ms here) and swing from run to
run. PyTorch's CUDA caching allocator reuses memory the same way, so this measures the kernels.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import pickle
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from itertools import count
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.agc import adaptive_clip_grad_, clipped_parameters  # noqa: E402
from engine.data import CIFAR10_MEAN, CIFAR10_STD, GlobalBatches, load_dataset  # noqa: E402
from engine.loop import (Process, Step, WarmupCosine, keep_freed_memory, train_epoch,  # noqa: E402
                         train_step)
from models import build_model  # noqa: E402
from engine.config import CUSTOM, norm_dirname  # noqa: E402
from norms import (RELU_GAMMA, DeviceAware, NormSpec, ScaledWSConv2d, WSConv2d,  # noqa: E402
                   build_norm, configure_devices, conv_factory, custom_spec, load_target)

NORMS = ("bn", "gn", "ln", "in", "bcn", "brn", "frn", "evonorm_b0", "evonorm_s0", "mabn",
         "online", "cbn")
SHAPES = ((64, 64, 16, 16), (2, 64, 16, 16))  # a realistic activation, a micro-batch one
# the study's normalizers (norm, ws) as results/microbatch labels them
STUDY_NORMS = {"bn": ("bn", False), "bcn_ws": ("bcn", True), "gn": ("gn", False),
               "brn": ("brn", False), "frn": ("frn", False), "evonorm_b0": ("evonorm_b0", False),
               "evonorm_s0": ("evonorm_s0", False), "mabn": ("mabn", False),
               "online": ("online", False), "cbn": ("cbn", False), "nf": ("nf", False)}
GROUPS = 8  # the project's default (engine/config.py)
GOALS = {"norm_vs_native": ("<=", 1.5), "norm_vs_native.bcn": ("<=", 2.5),
         **{f"norm_vs_native.{n}": ("<=", 2.0) for n in ("brn", "frn", "evonorm_s0")},
         **{f"norm_vs_native.{n}": ("<=", 3.0) for n in ("evonorm_b0", "mabn", "online")},
         "norm_vs_native.cbn": ("<=", 2.0),
         "ws_conv_vs_conv": ("<=", 1.15), "scaled_ws_conv_vs_conv": ("<=", 1.2),
         "agc_vs_clip_grad_norm": ("<=", 3.0), "model_step_vs_bn": ("<=", 2.0),
         "bf16_speedup": (">=", 1.3),
         "step_vs_bare": ("<=", 1.05),
         "loader_vs_torchvision": (">=", 5.0), "virtual_vs_accumulate": (">=", 1.8)}


# ---------------------------------------------------------------- timing


def paired(ours: Callable[[], object], base: Callable[[], object], repeats: int,
           target_s: float = 0.05, warmup: int = 3, device="cpu") -> dict:
    """Time both sides `repeats` rounds, alternating which goes first.

    Each round times n calls of each side, n chosen so a side's round lasts about `target_s`
    (on CUDA each timing waits for the queued kernels). Returns the medians of each side's
    seconds per call and of the per-round ratio ours/base.
    """
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def clock(fn, n):
        sync()
        tic = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - tic) / n
    for _ in range(warmup):
        ours()
        base()
    n = max(1, round(target_s / max(clock(ours, 1), 1e-9)))
    times = {"ours": [], "base": []}
    for r in range(repeats):
        for side in (("ours", "base") if r % 2 == 0 else ("base", "ours")):
            times[side].append(clock(ours if side == "ours" else base, n))
    ratios = [a / b for a, b in zip(times["ours"], times["base"])]
    return {"ratio": statistics.median(ratios), "ours_s": statistics.median(times["ours"]),
            "base_s": statistics.median(times["base"]), "calls_per_round": n}


def shape_key(shape) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------- norms and WS


def native_norm(name: str, c: int, device="cpu") -> Callable:
    """The cheapest torch-native computation of the norm's maths, or of its closest kin:
    F.batch_norm for the batch-statistics norms (bn, brn, evonorm_b0, mabn, online),
    F.group_norm for the rest (bcn: its channel-norm base; frn: per sample and channel, as G = C)."""
    weight = torch.ones(c, device=device, requires_grad=True)
    bias = torch.zeros(c, device=device, requires_grad=True)
    if name in ("bn", "brn", "evonorm_b0", "mabn", "online"):
        mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)
        return lambda x: F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5)
    groups = {"gn": GROUPS, "bcn": GROUPS, "evonorm_s0": GROUPS, "ln": 1, "in": c, "frn": c}[name]
    return lambda x: F.group_norm(x, groups, weight, bias, 1e-5)


def conv_and_cbn(c: int, device="cpu", window: int = 4) -> tuple[nn.Module, Callable]:
    """cbn needs the conv before it (it records that conv's input): a 3x3 conv and cbn, its
    window already full, against the same conv and F.batch_norm."""
    conv_cls, link = conv_factory("cbn", False)
    conv = conv_cls(c, c, 3, padding=1, bias=False)
    pair = nn.Sequential(conv, build_norm("cbn", c, conv=link.take(), window=window)).to(device)
    with torch.no_grad():
        for _ in range(window):
            pair(torch.randn(2, c, 4, 4, device=device))
    batch_norm = native_norm("bn", c, device)
    return pair, lambda x: batch_norm(F.conv2d(x, pair[0].weight, None, 1, 1))


def fwd_bwd(fn: Callable, shape, device="cpu", seed: int = 0) -> Callable[[], None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    up = torch.randn(shape, generator=g).to(device)
    return lambda: fn(x).backward(up)


def norm_vs_native(shapes=SHAPES, norms=NORMS, repeats: int = 7, target_s: float = 0.1,
                   device="cpu"):
    """norms: built-in names, or a user's layer (a NormSpec from custom_spec, its label the
    figure's case) against F.batch_norm if batch-dependent (DeviceAware), else F.group_norm."""
    figure, details = {}, {}
    for norm in norms:
        name = norm.label if isinstance(norm, NormSpec) else norm
        figure[name], details[name] = {}, {}
        for shape in shapes:
            if isinstance(norm, NormSpec):
                layer = build_norm(norm, shape[1]).to(device)
                native = native_norm("bn" if isinstance(layer, DeviceAware) else "gn", shape[1],
                                     device)
            elif name == "cbn":
                layer, native = conv_and_cbn(shape[1], device)
            else:
                layer = build_norm(name, shape[1], groups=GROUPS).to(device)
                native = native_norm(name, shape[1], device)
            res = paired(fwd_bwd(layer, shape, device), fwd_bwd(native, shape, device), repeats,
                         target_s, device=device)
            figure[name][shape_key(shape)] = res["ratio"]
            details[name][shape_key(shape)] = res
    return figure, details


def ws_conv_vs_conv(shapes=SHAPES, repeats: int = 7, target_s: float = 0.25, device="cpu",
                    conv_cls=WSConv2d, **conv_options):
    """WSConv2d (or `conv_cls`: nf's ScaledWSConv2d) against nn.Conv2d with the same weights;
    the figure is the worse shape's."""
    details = {}
    for shape in shapes:
        c = shape[1]
        torch.manual_seed(0)
        ws = conv_cls(c, c, 3, padding=1, bias=False, **conv_options)
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        conv.weight.data.copy_(ws.weight.data)
        ws, conv = ws.to(device), conv.to(device)
        details[shape_key(shape)] = paired(fwd_bwd(ws, shape, device), fwd_bwd(conv, shape, device),
                                           repeats, target_s, device=device)
    worst = max(details.values(), key=lambda d: d["ratio"])
    return worst["ratio"], {**worst, "by_shape": details}


def agc_vs_clip_grad_norm(depth: int = 20, repeats: int = 7, target_s: float = 0.1,
                          device="cpu"):
    """Adaptive gradient clipping (unit-wise, a loop over the parameters) against torch's
    global-norm clip_grad_norm_ (foreach kernels) on the same NF ResNet's gradients. Both clip
    in place; clipped gradients cost the same to clip again, so the rounds stay comparable."""
    torch.manual_seed(0)
    model = build_model("resnet", depth, norm="nf").to(device)
    params = clipped_parameters(model)
    for p in params:
        p.grad = torch.randn_like(p)
    res = paired(lambda: adaptive_clip_grad_(params, 0.01),
                 lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), repeats,
                 target_s, device=device)
    return res["ratio"], {**res, "parameters": len(params)}


# ---------------------------------------------------------------- the training step


def step_vs_bare(batch_sizes=(2, 32), arch: str = "resnet", depth: int = 20, norm: str = "bn",
                 repeats: int = 7, target_s: float = 0.4, device="cpu"):
    """engine.loop.train_step against the minimal loop, each on its own copy of one model."""
    figure, details = {}, {}
    for b in batch_sizes:
        torch.manual_seed(0)
        model = build_model(arch, depth, norm=norm, groups=GROUPS).to(device)
        bare = copy.deepcopy(model)
        x = torch.randn(b, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (b,), device=device)

        def sgd(m):
            return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                   weight_decay=5e-4)
        opt, bare_opt = sgd(model), sgd(bare)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, 10**9))
        sums = (torch.zeros((), device=device, dtype=torch.float64),
                torch.zeros((), device=device, dtype=torch.long))
        step = Step()

        def ours():
            train_step(model, opt, sched, x, y, sums, step)

        def minimal():
            bare_opt.zero_grad(set_to_none=True)
            F.cross_entropy(bare(x), y).backward()
            bare_opt.step()
        res = paired(ours, minimal, repeats, target_s, device=device)
        figure[str(b)], details[str(b)] = res["ratio"], res
    return figure, details


def study_model(norm: str, ws: bool, devices: int, depth: int = 20, device="cpu"):
    """ResNet-`depth` with `norm` over `devices` virtual devices, and the study's SGD."""
    torch.manual_seed(0)
    model = build_model("resnet", depth, norm=norm, ws=ws, groups=GROUPS).to(device)
    configure_devices(model, devices)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4)


def model_step_vs_bn(norms=tuple(STUDY_NORMS), batch_sizes=(1, 64), images: int = 64,
                     depth: int = 20, repeats: int = 7, target_s: float = 0.4, device="cpu"):
    """One SGD step of `images` images through ResNet-`depth` with each norm at each batch per
    device (images / b virtual devices), against the same step with bn at b = images."""
    x = torch.randn(images, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (images,), device=device)

    def stepper(norm: str, ws: bool, b: int) -> Callable[[], None]:
        model, opt = study_model(norm, ws, images // b, depth, device)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step
    base = stepper("bn", False, images)
    figure, details = {}, {}
    for label in norms:
        figure[label], details[label] = {}, {}
        for b in batch_sizes:
            res = paired(stepper(*STUDY_NORMS[label], b), base, repeats, target_s,
                         device=device)
            figure[label][str(b)], details[label][str(b)] = res["ratio"], res
    return figure, details


def bf16_speedup(norms=tuple(STUDY_NORMS), batch_sizes=(1, 64), images: int = 64,
                 depth: int = 20, repeats: int = 7, target_s: float = 0.4, device="cpu"):
    """The engine's training step (train_step) of `images` images in fp32 against the same
    step under trainer.precision=bf16's autocast, each norm at each b: fp32 s / bf16 s."""
    x = torch.randn(images, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (images,), device=device)
    sums = (torch.zeros((), device=device, dtype=torch.float64),
            torch.zeros((), device=device, dtype=torch.long))

    def stepper(norm: str, ws: bool, b: int, step: Step):
        """The step, and the dtype of the logits it computes (what precision really ran)."""
        model, opt = study_model(norm, ws, images // b, depth, device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, 10**9))
        with torch.no_grad(), step.autocast():
            dtype = str(model(x).dtype).removeprefix("torch.")
        return (lambda: train_step(model, opt, sched, x, y, sums, step)), dtype
    bf16 = Step(autocast=partial(torch.autocast, torch.device(device).type,
                                 dtype=torch.bfloat16))
    figure, details = {}, {}
    for label in norms:
        figure[label], details[label] = {}, {}
        for b in batch_sizes:
            (fp32_step, ours), (bf16_step, base) = (stepper(*STUDY_NORMS[label], b, s)
                                                    for s in (Step(), bf16))
            res = {**paired(fp32_step, bf16_step, repeats, target_s, device=device),
                   "logits": [ours, base]}
            figure[label][str(b)], details[label][str(b)] = res["ratio"], res
    return figure, details


# ---------------------------------------------------------------- data


def write_cifar10_pickles(root: Path, n: int, seed: int = 0) -> Path:
    """torchvision's cifar-10-batches-py layout with n random training images (5 batches).

    The official files come from Python 2, whose str keys torchvision reads as str (latin1)
    and the engine as bytes; a Python 3 pickle has one or the other, so each file holds both
    spellings of every key (pickle stores the shared value once)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = n // 5
    for i in range(5):
        data = rng.integers(0, 256, (per, 3072), dtype=np.uint8)
        _dump(d / f"data_batch_{i + 1}", {b"data": data, b"labels": list(rng.integers(0, 10, per))})
    _dump(d / "test_batch", {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                             b"labels": list(range(10))})
    _dump(d / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    return d


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump({**obj, **{k.decode(): v for k, v in obj.items()}}, f)


def loader_vs_torchvision(batch_sizes=(2, 128), images: int = 2560, batches: int = 0,
                          repeats: int = 7, target_s: float = 0.1, device="cpu"):
    """Augmented training batches per second on `device`, ours against torchvision's pipeline.

    Both serve the same images (a generated pickled layout): RandomCrop(32, padding=4) and a
    horizontal flip, then float conversion and normalisation; torchvision's DataLoader runs in
    the main process (num_workers=0) with its default collation (on CUDA, pinned and copied to
    the GPU); ours gathers from the images held on `device`.
    """
    import torchvision.transforms as T

    figure, details = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10_pickles(Path(tmp), images)
        data = load_dataset("cifar10", tmp)
        tv = torchvision_cifar10(Path(tmp), T.Compose([
            T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]))
        for b in batch_sizes:
            ours = _endless(GlobalBatches(data.train, b, data.mean, data.std, device).epoch)
            cuda = torch.device(device).type == "cuda"
            loader = torch.utils.data.DataLoader(tv, batch_size=b, shuffle=True, drop_last=True,
                                                 num_workers=0, pin_memory=cuda)
            theirs = _endless(lambda e: ((x.to(device, non_blocking=True),
                                          y.to(device, non_blocking=True)) for x, y in loader))
            k = batches or max(1, 256 // b)  # batches per call
            res = paired(lambda: _take(ours, k), lambda: _take(theirs, k), repeats, target_s,
                         device=device)
            res["ours_s"], res["base_s"] = res["ours_s"] / k, res["base_s"] / k  # per batch
            res["ours_batches_per_s"], res["base_batches_per_s"] = 1 / res["ours_s"], \
                1 / res["base_s"]
            res["time_ratio"] = res.pop("ratio")  # ours / base; the figure is its inverse
            figure[str(b)], details[str(b)] = 1 / res["time_ratio"], res
    return figure, details


def torchvision_cifar10(root: Path, transform):
    """torchvision's CIFAR10 training set over generated files: it checks every file's md5, so
    its file lists carry the generated files' sums (the official ones describe the real data)."""
    from torchvision.datasets import CIFAR10

    d = root / CIFAR10.base_folder
    md5 = lambda name: hashlib.md5((d / name).read_bytes()).hexdigest()  # noqa: E731

    class Generated(CIFAR10):
        train_list = [[name, md5(name)] for name, _ in CIFAR10.train_list]
        test_list = [[name, md5(name)] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])}
    return Generated(str(root), train=True, download=False, transform=transform)


def _endless(epoch: Callable):
    for e in count():
        yield from epoch(e)


def _take(it, k: int) -> None:
    for _ in range(k):
        next(it)


# ---------------------------------------------------------------- virtual devices


def virtual_vs_accumulate(devices: int = 16, batch: int = 2, norm: str = "bn",
                          arch: str = "resnet", depth: int = 20, steps: int = 8,
                          repeats: int = 5, device="cpu"):
    """K virtual devices x b images (one forward over K*b, per-device statistics) against K
    accumulation steps x b: the same optimizer update, each side the engine's own loop."""
    def side(virtual, accumulate):
        torch.manual_seed(0)
        model = build_model(arch, depth, norm=norm, groups=GROUPS).to(device)
        configure_devices(model, virtual)
        g = batch * virtual * accumulate
        data = load_dataset("synthetic", None, train_size=g * steps, test_size=1)
        batches = GlobalBatches(data.train, g, data.mean, data.std, device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, 10**9))
        epochs, step = count(), Step(accumulate=accumulate)
        proc = Process(device=torch.device(device))
        return lambda: train_epoch(model, opt, sched, batches, next(epochs), proc, step, 10**9,
                                   None)
    res = paired(side(devices, 1), side(1, devices), repeats, target_s=0, warmup=1, device=device)
    res["ours_s"], res["base_s"] = res["ours_s"] / steps, res["base_s"] / steps  # per update
    images = batch * devices
    res["ours_images_per_s"], res["base_images_per_s"] = images / res["ours_s"], \
        images / res["base_s"]
    res["setting"] = {"devices": devices, "batch_size_per_device": batch, "norm": norm,
                      "model": f"{arch}{depth}", "steps_per_call": steps}
    res["time_ratio"] = res.pop("ratio")  # virtual / accumulate; the figure is its inverse
    return 1 / res["time_ratio"], res


# ---------------------------------------------------------------- the suite


FIGURE_KEYS = ("norm", "ws", "nf", "agc", "model", "bf16", "step", "loader",
               "virtual")  # --only's


def run_suite(only=FIGURE_KEYS, repeats: int = 7,
              quick: bool = False, devices: int = 16, norm: str = "bn",
              allocator: str = "system default", device: str = "cpu",
              quiet: bool = False, custom: NormSpec | None = None) -> dict:
    """Every figure, its details (each side's seconds per call) and whether its goal is met.
    `quick` shrinks sizes and rounds to check the machinery (tests), not to measure. Unless
    `quiet`, a progress bar and each figure's rows go to stderr as the figures complete.
    `custom`: norm_vs_native measures this user's layer instead of the built-in norms."""
    timing = {"repeats": 2, "target_s": 0.002} if quick else {"repeats": repeats}
    timing["device"] = device
    shapes = ((8, 16, 4, 4), (2, 16, 4, 4)) if quick else SHAPES
    depth = 8 if quick else 20
    figures, details = {}, {}
    started = time.perf_counter()
    plan = {
        "norm": ("norm_vs_native", lambda: norm_vs_native(
            shapes, (custom,) if custom is not None else NORMS, **timing)),
        "ws": ("ws_conv_vs_conv", lambda: ws_conv_vs_conv(shapes, **timing)),
        "nf": ("scaled_ws_conv_vs_conv", lambda: ws_conv_vs_conv(
            shapes, conv_cls=ScaledWSConv2d, gamma=RELU_GAMMA, **timing)),
        "agc": ("agc_vs_clip_grad_norm", lambda: agc_vs_clip_grad_norm(depth, **timing)),
        "model": ("model_step_vs_bn", lambda: model_step_vs_bn(
            depth=depth, images=4 if quick else 64, batch_sizes=(1, 4) if quick else (1, 64),
            **timing)),
        "bf16": ("bf16_speedup", lambda: bf16_speedup(
            depth=depth, images=4 if quick else 64, batch_sizes=(1, 4) if quick else (1, 64),
            **timing)),
        "step": ("step_vs_bare", lambda: step_vs_bare(depth=depth, **timing)),
        "loader": ("loader_vs_torchvision", lambda: loader_vs_torchvision(
            images=640 if quick else 2560, batches=2 if quick else 0, **timing)),
        "virtual": ("virtual_vs_accumulate", lambda: virtual_vs_accumulate(
            devices=4 if quick else devices, norm=norm, depth=depth, steps=1 if quick else 8,
            repeats=2 if quick else repeats, device=device))}
    chosen = [plan[k] for k in plan if k in only]
    bar = tqdm(chosen, desc="bench", unit="figure", file=sys.stderr, leave=False,
               disable=quiet)
    for name, measure in bar:
        bar.set_postfix_str(name)
        figures[name], details[name] = measure()
        if not quiet:  # each figure as it completes: a slow one is not a silent one
            shown = {name: figures[name], "goals": goals({name: figures[name]}),
                     "details": {name: details[name]}}
            tqdm.write("\n".join(table(shown).splitlines()[2:]), file=sys.stderr)
    return {**figures, "goals": goals(figures), "details": details,
            "setting": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "repeats": repeats, "quick": quick,
                        "python": platform.python_version(), "cpu": cpu_name(),
                        "device": device, "gpu": torch.cuda.get_device_name()
                        if torch.device(device).type == "cuda" else None,
                        "allocator": allocator,
                        "date": datetime.date.today().isoformat(),
                        "wall_s": time.perf_counter() - started}}


def goals(figures: dict) -> dict:
    """{"figure.case": {value, goal, met}} for every number in the figures."""
    res = {}
    for case, value in _cases(figures).items():
        parts = case.split(".")
        op, goal = next(GOALS[k] for k in (".".join(parts[:i]) for i in
                                           range(len(parts), 0, -1)) if k in GOALS)
        res[case] = {"value": value, "goal": f"{op} {goal}",
                     "met": value <= goal if op == "<=" else value >= goal}
    return res


def _cases(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        flat.update(_cases(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return flat


def table(result: dict) -> str:
    """Markdown: one row per case with each side's time per call (loader: per batch; virtual:
    per optimizer step; the base of virtual_vs_accumulate is accumulation)."""
    rows = ["| figure | case | ours | base | ratio | goal | met |",
            "|---|---|---|---|---|---|---|"]
    for case, g in result["goals"].items():
        d = result["details"]
        for k in case.split("."):
            d = d[k]
        fig, _, rest = case.partition(".")
        rows.append(f"| {fig} | {rest or '-'} | {_ms(d['ours_s'])} | {_ms(d['base_s'])} | "
                    f"{g['value']:.2f} | {g['goal']} | {'yes' if g['met'] else 'NO'} |")
    return "\n".join(rows)


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write bench.json and table.md here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both sides run")
    p.add_argument("--repeats", type=int, default=7, help="rounds per figure (median)")
    p.add_argument("--only", default=",".join(FIGURE_KEYS),
                   help=f"comma-separated subset of: {', '.join(FIGURE_KEYS)}")
    p.add_argument("--devices", type=int, default=16, help="virtual_vs_accumulate: K")
    p.add_argument("--norm", default="bn", help="virtual_vs_accumulate: the norm")
    p.add_argument("--target", help="norm_vs_native: your layer (pkg.module.Name or "
                   "path/to/file.py:Name, as norm.target) instead of the built-in norms")
    p.add_argument("--options", default="{}", help="--target's options, a JSON object "
                   "(as norm.options)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks, not measurements")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's allocator at its defaults (see above)")
    a = p.parse_args(argv)
    unknown = [k for k in a.only.split(",") if k not in FIGURE_KEYS]
    if unknown:
        p.error(f"--only={a.only}: {', '.join(unknown)} unknown; allowed: a comma-separated "
                f"subset of {','.join(FIGURE_KEYS)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    custom = None
    if a.target is not None:
        try:
            options = json.loads(a.options)
            if not isinstance(options, dict):
                raise ValueError(f"--options={a.options}: a JSON object, e.g. '{{\"eps\": 1e-3}}'")
            custom = custom_spec(load_target(a.target), label=norm_dirname(CUSTOM, a.target),
                                 **options)
        except ValueError as e:  # json's errors are ValueErrors too
            p.error(f"--target {a.target}: {e}")
    if a.threads:
        torch.set_num_threads(a.threads)
    allocator = "system default"
    if not a.system_malloc and keep_freed_memory():
        allocator = "glibc, mmap threshold 32 MiB, trim threshold 1 GiB"
    result = run_suite(tuple(a.only.split(",")), a.repeats, a.quick, a.devices, a.norm,
                       allocator, a.device, custom=custom)
    text = table(result)
    s = result["setting"]
    print(text)
    print(f"\ntorch {s['torch']}, {a.device}, {s['threads']} thread(s), {s['wall_s']:.0f} s")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (a.out / "table.md").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
