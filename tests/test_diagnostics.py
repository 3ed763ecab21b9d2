"""Signal-propagation probes (engine/diagnostics.py) and the diagnose app (scripts/diagnose.py):
the probe maths on inputs with known answers, a hand-computed network, hooks and state left as
they were, the paper's findings at small scale, and the app end to end."""
import csv
import functools
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from engine.config import ConfigError
from engine.data import DataError, load_dataset
from engine.diagnostics import (Probes, average, measure, measure_at_init, mean_pairwise_cosine,
                                probe_layers, stable_rank)
from models import build_model

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "diagnose.py"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine, more threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the measures


def test_stable_rank_known_answers():
    u, v = torch.randn(5, 1), torch.randn(1, 7)
    assert stable_rank(u @ v) == pytest.approx(1.0)                      # rank one
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert stable_rank(q[:4]) == pytest.approx(4.0)                      # orthonormal rows: N
    assert stable_rank(3 * q[:4]) == pytest.approx(4.0)                  # scale-free
    f = torch.randn(6, 10, dtype=torch.float64)
    s = torch.linalg.svdvals(f)
    assert stable_rank(f) == pytest.approx(float((s ** 2).sum() / s.max() ** 2))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)                     # flattened per sample:
    s = torch.linalg.svdvals(x.reshape(3, 32))                           # 3 rows of C x H x W
    assert stable_rank(x) == pytest.approx(float((s ** 2).sum() / s.max() ** 2))
    assert 1 < stable_rank(x) < 3


def test_mean_pairwise_cosine_known_answers():
    row = torch.randn(1, 9)
    assert mean_pairwise_cosine(row.repeat(4, 1)) == pytest.approx(1.0)            # identical
    assert mean_pairwise_cosine(torch.eye(5) * torch.arange(1, 6)[:, None]) == \
        pytest.approx(0.0, abs=1e-12)                                              # orthogonal
    f = torch.randn(5, 3)
    pairs = [F.cosine_similarity(f[i], f[j], dim=0) for i in range(5) for j in range(5) if i != j]
    assert mean_pairwise_cosine(f) == pytest.approx(float(sum(pairs) / len(pairs)), rel=1e-5)


# ---------------------------------------------------------------- a network computed by hand


class TwoLayer(nn.Module):
    """h1 = 2x, h2 = 3 h1 = 6x, logits = h2 (identity classifier)."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Linear(2, 2, bias=False)
        self.layer2 = nn.Linear(2, 2, bias=False)
        self.classifier = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.layer1.weight.copy_(2 * torch.eye(2))
            self.layer2.weight.copy_(3 * torch.eye(2))
            self.classifier.weight.copy_(torch.eye(2))

    def forward(self, x):
        return self.classifier(self.layer2(self.layer1(x)))


def test_measure_matches_a_hand_computation():
    model = TwoLayer().double()  # float64: the answers below are exact to ~1e-15
    layers = [("layer1", model.layer1), ("layer2", model.layer2)]
    x, y = torch.eye(2, dtype=torch.float64), torch.tensor([0, 1])
    m = measure(model, x, y, layers=layers)
    l1, l2 = m.layers
    assert (l1.layer, l2.layer) == ("layer1", "layer2")
    assert (l1.depth_fraction, l2.depth_fraction) == (0.5, 1.0)
    # h1 = [[2, 0], [0, 2]]: mean 1, population variance 1; h2 = 3 h1: variance 9.
    assert l1.activation_var == pytest.approx(1.0) and l2.activation_var == pytest.approx(9.0)
    # L = mean CE of logits h2 = [[6, 0], [0, 6]] with labels [0, 1]:
    # dL/dh2 = (softmax(h2) - onehot) / 2 = +-1 / (2 (1 + e^6)) in each of 4 entries,
    # so ||dL/dh2|| = 1 / (1 + e^6); dL/dh1 = W2^T dL/dh2 = 3 dL/dh2.
    g2 = 1 / (1 + math.exp(6))
    assert l2.grad_norm == pytest.approx(g2) and l1.grad_norm == pytest.approx(3 * g2)
    assert m.loss == pytest.approx(math.log(1 + math.exp(-6)))
    # Penultimate features h2: orthogonal rows -> cosine 0, stable rank 2.
    assert m.cosine_similarity == pytest.approx(0.0) and m.stable_rank == pytest.approx(2.0)
    assert l1.cosine_similarity == pytest.approx(0.0) and l1.stable_rank == pytest.approx(2.0)
    s = m.summary()
    assert s["var_growth"] == pytest.approx(9.0) and s["grad_ratio"] == pytest.approx(3.0)


def test_average_is_elementwise():
    model = TwoLayer()
    layers = [("layer1", model.layer1), ("layer2", model.layer2)]
    a = measure(model, torch.eye(2), torch.tensor([0, 1]), layers=layers)
    b = measure(model, 2 * torch.eye(2), torch.tensor([0, 1]), layers=layers)
    m = average([a, b])
    assert m.layers[0].activation_var == pytest.approx((1.0 + 4.0) / 2)
    assert m.layers[1].grad_norm == pytest.approx((a.layers[1].grad_norm
                                                   + b.layers[1].grad_norm) / 2)


# ---------------------------------------------------------------- hooks and state


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch,depth", [("resnet", 8), ("vgg", 11)])
def test_measure_leaves_no_hook_and_no_state_behind(arch, depth):
    torch.manual_seed(0)
    model = build_model(arch, depth, norm="bn").eval()
    names = [name for name, _ in probe_layers(model)]
    assert len(names) == (3 if arch == "resnet" else 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = measure(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert [r.layer for r in m.layers] == names
    assert all(math.isfinite(r.grad_norm) and r.grad_norm > 0 for r in m.layers)
    assert _hooks(model) == 0 and not model.training
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()  # BN running statistics and counters restored
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hooks_are_removed_when_the_body_raises():
    model = build_model("resnet", 8, norm="gn", groups=8)
    with pytest.raises(RuntimeError):
        with Probes(model):
            assert _hooks(model) == 3 + 1  # the blocks and the classifier's pre-hook
            model(torch.randn(2, 5, 32, 32))  # wrong channel count
    assert _hooks(model) == 0


def test_probes_reusable_around_a_training_step():
    """Probes record during an ordinary loss.backward(); same numbers as measure()."""
    torch.manual_seed(0)
    model = build_model("resnet", 8, norm="bn")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    ref = measure(model, x, y)
    with Probes(model, similarity=False) as probes:
        F.cross_entropy(model(x), y).backward()
    records = probes.records()
    assert all(p.grad is not None for p in model.parameters())
    for r, q in zip(records, ref.layers):
        assert r.activation_var == pytest.approx(q.activation_var, rel=1e-5)
        assert r.grad_norm == pytest.approx(q.grad_norm, rel=1e-4)
        assert math.isnan(r.cosine_similarity)  # similarity=False
    assert _hooks(model) == 0


# ---------------------------------------------------------------- the paper's findings


@pytest.fixture(scope="module")
def findings():
    """ResNet-20, 16 synthetic images, two inits per norm: summary and last-block records."""
    ds = load_dataset("synthetic", None, train_size=64, test_size=1, seed=0)
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    batch = ((ds.train.images[:16].float() / 255 - mean) / std, ds.train.labels[:16])
    out = {}
    for norm in ("none", "bn", "ln", "in"):
        m = measure_at_init(lambda: build_model("resnet", 20, norm=norm), [batch], [0, 1])
        out[norm] = {**m.summary(), "block_cosine": m.layers[-1].cosine_similarity}
    return out


# Margins checked over 40 (init, batch) pairs, one init each: none/bn var_growth >= 4.8,
# in/ln grad_ratio >= 1.73, penultimate cosine none - bn >= 0.014, last-block cosine
# none - bn >= 0.28 and ln - in >= 0.26 (ResNet-32: wider still).


def test_forward_variance_explodes_without_normalization(findings):
    assert findings["none"]["var_growth"] > 3 * findings["bn"]["var_growth"]


def test_gradients_explode_more_with_small_groups(findings):
    assert findings["in"]["grad_ratio"] > 1.2 * findings["ln"]["grad_ratio"]


def test_features_collapse_more_without_normalization(findings):
    assert findings["none"]["cosine_similarity"] > findings["bn"]["cosine_similarity"]
    assert findings["none"]["block_cosine"] > findings["bn"]["block_cosine"] + 0.1


def test_large_groups_weaken_the_guarantee_against_collapse(findings):
    assert findings["ln"]["block_cosine"] > findings["in"]["block_cosine"] + 0.1


# ---------------------------------------------------------------- the app


@functools.cache
def _load_app():
    """scripts/diagnose.py as a module (registers its schema; main() is not run)."""
    spec = importlib.util.spec_from_file_location("diagnose_app", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="diagnose", overrides=list(overrides))


def test_config_composes_and_plans():
    app = _load_app()
    cfg = _compose()
    assert list(cfg.diagnose.norms) == ["none", "bn", "gn", "ln", "in"]
    assert (cfg.diagnose.seeds, cfg.diagnose.batches, cfg.diagnose.batch_size) == (3, 2, 64)
    variants, sweep = app.plan(cfg)
    assert [v.label for v in variants] == ["none", "bn", "gn", "ln", "in"]
    assert variants[2].options["groups"] == 8  # gn's default here, see configs/norm/gn.yaml
    assert [v.options["groups"] for v in sweep] == [1, 2, 4, 8, 16]
    variants, sweep = app.plan(_compose("model=vgg", "model.depth=11", "norm.ws=true",
                                        "diagnose.norms=[bn,bcn_ws]", "diagnose.groups=[3,64,1]"))
    assert [(v.label, v.ws) for v in variants] == [("bn_ws", True), ("bcn_ws", True)]
    assert [v.options["groups"] for v in sweep] == [64, 1]  # 3 divides no width: skipped


@pytest.mark.parametrize("override", ["diagnose.seeds=abc", "diagnose.seed=3",
                                      "diagnose.groups=[a]", "trainer.epoch=3"])
def test_typed_schema_rejects_at_composition(override):
    _load_app()  # registers diagnose_schema
    with pytest.raises((OmegaConfBaseException, ConfigCompositionException)):
        _compose(override)


@pytest.mark.parametrize("overrides,match", [
    (["diagnose.norms=[bn,batchnorm]"], r"diagnose.norms\[1\]='batchnorm' is invalid; allowed: "
                                        r"bn, syncbn, gn, ln, in, bcn, brn, frn, evonorm_b0, "
                                        r"evonorm_s0, mabn, cbn, online, none"),
    (["diagnose.norms=[]"], r"diagnose.norms=\[\] is invalid"),
    (["diagnose.norms=[gn,gn]"], r"diagnose.norms\[1\]='gn' is invalid; allowed: each norm once"),
    (["diagnose.seeds=0"], r"diagnose.seeds=0 is invalid; allowed: an integer >= 1"),
    (["diagnose.batch_size=1"], r"diagnose.batch_size=1 is invalid; allowed: an integer >= 2"),
    (["diagnose.groups=[4,0]"], r"diagnose.groups\[1\]=0 is invalid"),
    (["model.depth=21"], r"model.depth=21 is not a valid resnet depth"),
    (["norm.groups=3", "diagnose.norms=[gn]"],
     r"diagnose.norms\[0\]='gn': resnet20 layer stem.1: gn: norm.groups=3 does not divide"),
])
def test_bad_input_is_refused_before_measuring(overrides, match):
    app = _load_app()
    with pytest.raises(ConfigError, match=match):
        app.plan(_compose(*overrides))


def _run_app(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_app_end_to_end(tmp_path):
    res = _run_app("model.depth=8", "data=synthetic", "data.train_size=64", "diagnose.seeds=1",
                   "diagnose.batch_size=16", "diagnose.norms=[none,bn]",
                   "diagnose.groups=[1,3,16]", "trainer.num_threads=1", "hydra.run.dir=run",
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    rows = _rows(run / "diagnostics.csv")
    assert [(r["norm"], r["layer"]) for r in rows] == [
        (n, f"stages.{i}.0") for n in ("none", "bn") for i in range(3)]
    assert {r["model"] for r in rows} == {"resnet"} and {r["depth"] for r in rows} == {"8"}
    assert [float(r["depth_fraction"]) for r in rows[:3]] == pytest.approx([1 / 3, 2 / 3, 1])
    assert all(float(r["activation_var"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    summary = _rows(run / "summary.csv")
    assert [r["norm"] for r in summary] == ["none", "bn"]
    assert {"var_growth", "cosine_similarity", "stable_rank", "grad_ratio"} <= set(summary[0])
    groups = _rows(run / "groups.csv")
    assert [r["groups"] for r in groups] == ["1", "16"]  # 3 divides no layer: skipped
    for png in ("activation_var.png", "grad_norm.png", "similarity.png", "groups.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    # as train.py: no .hydra/ folder, config.yaml says what ran
    assert not (run / ".hydra").exists()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["depth"] == 8 and config["diagnose"]["norms"] == ["none", "bn"]


def test_app_bad_input_is_one_line_and_exit_2(tmp_path):
    res = _run_app("data=synthetic", "diagnose.norms=[none,batchnorm]", "hydra.run.dir=run",
                   cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: diagnose.norms[1]='batchnorm' is invalid; allowed: bn, syncbn, gn, ln, in, "
        "bcn, brn, frn, evonorm_b0, evonorm_s0, mabn, cbn, online, none, nf (each but nf also "
        "<norm>_ws), custom (your layer: with norm=custom norm.target=...)"]
    assert "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "run" / "diagnostics.csv").exists()
    res = _run_app("data=synthetic", "diagnose.seed=3", cwd=tmp_path)  # a misspelled key
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: diagnose.seed: unknown key 'seed'; allowed in diagnose: norms, seeds, batches, "
        "batch_size, groups, plots"]


# ---------------------------------------------------------------- after a failed download


def test_falls_back_to_generated_data_after_a_failed_download(tmp_path, monkeypatch):
    """The README's path: the default run's download fails (no network), then the diagnose
    example runs on generated data, as documented, rather than on the folder it left behind."""
    import torchvision.datasets.cifar as tv_cifar
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    app = _load_app()
    cfg = _compose("diagnose.batches=1", "diagnose.batch_size=4", "data.train_size=8")
    assert cfg.data.root == "data" and cfg.data.download  # the defaults train.py uses
    with pytest.raises(DataError, match="no network"):
        load_dataset(cfg.data.name, cfg.data.root, download=True)
    assert list(tmp_path.iterdir()) == []
    batches, name = app.load_batches(cfg)
    assert name == "synthetic" and batches[0][0].shape == (4, 3, 32, 32)


def test_train_then_diagnose_offline_as_the_readme_says(tmp_path):
    """The same with the real commands: no network is a proxy nobody listens on."""
    env = {k: v for k, v in os.environ.items() if k != "CIFAR10_ROOT"
           and k.lower() not in ("https_proxy", "http_proxy", "all_proxy", "no_proxy")}
    env.update(https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9",
               OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), "logger.mode=disabled",
                            "trainer.num_threads=1"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert train.returncode != 0
    last = train.stderr.strip().splitlines()[-1]
    assert "no network? Nothing was left behind" in last and "data.root" in last, train.stderr
    assert "Traceback" not in train.stderr
    assert not (tmp_path / "data").exists()
    res = subprocess.run([sys.executable, str(SCRIPT), "model.depth=8", "diagnose.seeds=1",
                          "diagnose.batches=1", "diagnose.batch_size=8", "data.train_size=16",
                          "diagnose.norms=[none]", "diagnose.groups=[1]", "diagnose.plots=false",
                          "trainer.num_threads=1", "hydra.run.dir=diag"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    log = res.stdout + res.stderr
    assert "data.root=data not found: measuring on synthetic data instead" in log
    assert (tmp_path / "diag" / "summary.csv").exists()
