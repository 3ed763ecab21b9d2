"""Signal-propagation probes at initialization (Lubana, Dick & Tanaka 2021, "Beyond BatchNorm").

The paper explains activation-based normalizers by three properties, each measured here:

1. stable forward propagation: the activation variance of residual-block outputs grows
   exponentially with depth without normalization, roughly linearly with it
   (`activation_var` per layer; `var_growth` = last / first block);
2. informative forward propagation: the features of different inputs stay dissimilar, no rank
   collapse (`mean_pairwise_cosine` and `stable_rank` of the penultimate features);
3. stable backward propagation: the gradient norm w.r.t. early block outputs is not much larger
   than w.r.t. late ones; worst for small groups (IN), milder for large ones (LN)
   (`grad_norm` per layer; `grad_ratio` = first / last block).

Usage, on any model of `models.build_model` (or any model with explicit `layers`):

    m = measure(model, x, y)          # one forward/backward, no side effects
    m.layers[i].activation_var, m.layers[i].grad_norm, m.cosine_similarity, m.summary()

    with Probes(model) as probes:     # reusable around any forward/backward (e.g. training)
        loss = criterion(model(x), y); loss.backward()
    records = probes.records()

Probes are forward hooks on the probed layers (tensor hooks on their outputs for the gradient,
a forward pre-hook on `model.classifier` for the penultimate features); the context manager
removes every hook on exit, and nothing is attached when no probe is in use.

No Hydra here: plain data in, plain data out (scripts/diagnose.py is the app).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from norms import FusedActivation

__all__ = ["DiagnoseSettings", "LayerRecord", "Measurement", "Probes", "average",
           "activation_variance", "cosine_matrix", "grad_norm", "mean_pairwise_cosine",
           "measure", "measure_at_init", "probe_layers", "stable_rank"]


@dataclass
class DiagnoseSettings:
    """What scripts/diagnose.py measures (the `diagnose` config node)."""
    norms: list[str] = field(default_factory=lambda: ["none", "bn", "gn", "ln", "in"])
    seeds: int = 3                   # initializations averaged over: seed, seed+1, ...
    batches: int = 2                 # batches per initialization
    batch_size: int = 64
    groups: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # GN sweep
    plots: bool = True               # PNG plots beside the CSVs


# ---------------------------------------------------------------- the measures


def activation_variance(h: torch.Tensor) -> torch.Tensor:
    """Variance of every element of a layer output h over the whole batch (population form):

        Var(h) = 1/M sum_m (h_m - mean(h))^2,   M = h.numel()

    (the authors' code averages per-channel variances over (N, H, W) instead; both grow the
    same way with depth, this one also counts differences between channel means)."""
    return torch.var(h.detach().double(), correction=0)


def grad_norm(g: torch.Tensor) -> torch.Tensor:
    """||dL/dh||_2 over the full gradient tensor of a layer output h, L the mean cross-entropy
    of the batch (as the authors' code: the norm of the whole [N, ...] gradient)."""
    return torch.linalg.vector_norm(g.detach().double())


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """C_ij = <f_i, f_j> / (||f_i|| ||f_j||) for the rows f_i of features [N, D] (any trailing
    dims are flattened per sample); an all-zero row has cosine 0 with everything."""
    f = features.detach().flatten(1).double()
    f = f / torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(1e-300)
    return f @ f.T


def _offdiag_mean(c: torch.Tensor) -> float:
    n = c.shape[0]
    if n < 2:
        return float("nan")
    return float((c.sum() - c.diagonal().sum()) / (n * (n - 1)))


def _gram_stable_rank(g: torch.Tensor) -> float:
    top = float(torch.linalg.eigvalsh(g)[-1])  # G is symmetric PSD: ||G||_2 = lambda_max
    return float(g.diagonal().sum()) / top if top > 0 else 0.0


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity between the features of different inputs (paper, Sec. 4):

        rho = 1 / (N (N-1)) sum_{i != j} <f_i, f_j> / (||f_i|| ||f_j||)

    1 when every input maps to the same direction (rank collapse); 0 for orthogonal rows."""
    return _offdiag_mean(cosine_matrix(features))


def stable_rank(features: torch.Tensor) -> float:
    """Stable rank of features F [N, D] (trailing dims flattened per sample):

        srank(F) = tr(G) / ||G||_2,  G = F F^T,  = sum_i sigma_i^2 / sigma_max^2

    between 1 (rank one) and rank(F) <= N (all singular values equal)."""
    f = features.detach().flatten(1).double()
    return _gram_stable_rank(f @ f.T)


def _similarity(h: torch.Tensor) -> tuple[float, float]:
    """(mean pairwise cosine, stable rank) of h from one Gram matrix of unit rows.

    The stable rank is taken of the rows scaled to unit norm, as the authors' code does, so that
    no input dominates by its norm: srank = tr(C) / ||C||_2 = N / lambda_max(C)."""
    c = cosine_matrix(h)
    return _offdiag_mean(c), _gram_stable_rank(c)


# ---------------------------------------------------------------- the probes


def probe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose outputs are probed, in forward order, as (name, module):
    ResNet: every residual block `stages.i.j`; VGG: every activation of `features` (each
    follows a conv and its norm; a FusedActivation marks it after a fused norm-activation)."""
    if hasattr(model, "stages"):
        return [(f"stages.{i}.{j}", block) for i, stage in enumerate(model.stages)
                for j, block in enumerate(stage)]
    if hasattr(model, "features"):
        return [(f"features.{k}", m) for k, m in enumerate(model.features)
                if isinstance(m, (nn.ReLU, FusedActivation))]
    raise ValueError(f"{type(model).__name__}: no `stages` (ResNet) or `features` (VGG) to "
                     "probe; pass layers=[(name, module), ...]")


@dataclass
class LayerRecord:
    """One probed layer's output h: depth_fraction = (index + 1) / number of probed layers."""
    layer: str
    depth_fraction: float
    activation_var: float            # activation_variance(h)
    grad_norm: float                 # grad_norm(dL/dh); nan when no backward reached h
    cosine_similarity: float         # mean_pairwise_cosine(h), h flattened per sample
    stable_rank: float               # stable_rank of h's unit rows (see _similarity)


class Probes:
    """Context manager recording, for every forward/backward run inside it, each probed layer's
    output statistics (LayerRecord fields) and the penultimate features (the input of
    `model.classifier`). Every hook is removed on exit.

    similarity=False skips the per-layer cosine/stable rank (one N x N Gram matrix per layer),
    e.g. when probing during training; the penultimate ones are always computed.
    """

    def __init__(self, model: nn.Module, layers: Sequence[tuple[str, nn.Module]] | None = None,
                 similarity: bool = True):
        self.model = model
        self.layers = list(probe_layers(model) if layers is None else layers)
        if not self.layers:
            raise ValueError(f"{type(model).__name__}: no layers to probe")
        self.similarity = similarity
        self._handles: list = []
        self._active = False
        names = [name for name, _ in self.layers]
        self._var: dict[str, list] = {n: [] for n in names}
        self._grad: dict[str, list] = {n: [] for n in names}
        self._sim: dict[str, list] = {n: [] for n in names}
        self.features: list[torch.Tensor] = []   # penultimate features, one entry per forward

    def __enter__(self) -> Probes:
        for name, module in self.layers:
            self._handles.append(module.register_forward_hook(functools.partial(self._forward,
                                                                                name)))
        classifier = getattr(self.model, "classifier", None)
        if classifier is not None:
            self._handles.append(classifier.register_forward_pre_hook(self._penultimate))
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False  # tensor hooks on outputs still alive go quiet
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward(self, name: str, module, args, output: torch.Tensor) -> None:
        self._var[name].append(activation_variance(output))
        if self.similarity:
            self._sim[name].append(_similarity(output))
        if output.requires_grad:
            output.register_hook(functools.partial(self._backward, name))

    def _backward(self, name: str, grad: torch.Tensor) -> None:
        if self._active:
            self._grad[name].append(grad_norm(grad))

    def _penultimate(self, module, args) -> None:
        self.features.append(args[0].detach().flatten(1))

    def records(self) -> list[LayerRecord]:
        """Per probed layer, each statistic averaged over the passes recorded."""
        n = len(self.layers)
        out = []
        for i, (name, _) in enumerate(self.layers):
            sim = self._sim[name]
            out.append(LayerRecord(
                layer=name, depth_fraction=(i + 1) / n,
                activation_var=_mean(float(v) for v in self._var[name]),
                grad_norm=_mean(float(g) for g in self._grad[name]),
                cosine_similarity=_mean(s[0] for s in sim),
                stable_rank=_mean(s[1] for s in sim)))
        return out


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------- one measurement


@dataclass
class Measurement:
    """Per-layer records plus the penultimate features' cosine similarity and stable rank."""
    layers: list[LayerRecord]
    cosine_similarity: float
    stable_rank: float
    loss: float

    def summary(self) -> dict[str, float]:
        """var_growth = Var(last block) / Var(first block); grad_ratio = ||dL/dh|| at the first
        block / at the last; the penultimate cosine similarity and stable rank."""
        first, last = self.layers[0], self.layers[-1]
        return {"var_growth": _ratio(last.activation_var, first.activation_var),
                "cosine_similarity": self.cosine_similarity,
                "stable_rank": self.stable_rank,
                "grad_ratio": _ratio(first.grad_norm, last.grad_norm)}


def _ratio(a: float, b: float) -> float:
    return a / b if b else (float("inf") if a else float("nan"))


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            layers: Sequence[tuple[str, nn.Module]] | None = None,
            similarity: bool = True, train: bool = True) -> Measurement:
    """Probe one forward and backward pass of the mean cross-entropy of (x, y) at the model's
    current weights. train=True (default) runs the norms in train mode, on the batch's own
    statistics, as the paper measures at initialization; train=False in eval mode.

    No side effects: the gradient is taken w.r.t. the input only (no parameter's .grad is
    touched), every buffer (BN running statistics, BCN estimates, counters) is restored and
    every module's train/eval mode is put back, so it is safe to call in the middle of
    training."""
    if x.shape[0] < 2:
        raise ValueError(f"measure needs a batch of at least 2 inputs (pairwise cosine), "
                         f"got {tuple(x.shape)}")
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    model.train(train)
    try:
        with torch.enable_grad(), Probes(model, layers, similarity) as probes:
            x = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(x), y)
            # Backward to the input reaches every probed output; the tensor hooks record it.
            torch.autograd.grad(loss, x)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for module, mode in modes:
            module.training = mode
    if not probes.features:
        raise ValueError(f"{type(model).__name__} has no `classifier` whose input is the "
                         "penultimate features")
    cos, srank = _similarity(probes.features[-1])
    return Measurement(probes.records(), cos, srank, float(loss.detach()))


def average(measurements: Sequence[Measurement]) -> Measurement:
    """Element-wise mean of measurements of the same layers (inits and batches)."""
    if not measurements:
        raise ValueError("nothing to average")
    first = measurements[0]
    layers = []
    for i, rec in enumerate(first.layers):
        recs = [m.layers[i] for m in measurements]
        if any(r.layer != rec.layer for r in recs):
            raise ValueError(f"layer {i} differs between measurements")
        values = {f.name: _mean(getattr(r, f.name) for r in recs)
                  for f in fields(LayerRecord) if f.name not in ("layer", "depth_fraction")}
        layers.append(LayerRecord(rec.layer, rec.depth_fraction, **values))
    return Measurement(layers,
                       _mean(m.cosine_similarity for m in measurements),
                       _mean(m.stable_rank for m in measurements),
                       _mean(m.loss for m in measurements))


Batch = tuple[torch.Tensor, torch.Tensor]


def measure_at_init(build: Callable[[], nn.Module], batches: Sequence[Batch],
                    seeds: Iterable[int], device="cpu") -> Measurement:
    """Average `measure` (train mode) over fresh initializations (torch.manual_seed(seed),
    then `build()`) and the given batches: every init sees every batch. Averages are of the
    per-layer values, so var_growth and grad_ratio of the result are ratios of means."""
    results = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build().to(device)
        for x, y in batches:
            results.append(measure(model, x.to(device), y.to(device)))
    return average(results)
