"""A researcher's own normalizer (norm=custom norm.target=...): the import, the declarations and
their checks, one line for every mistake, the example layer against its equations, and the
protocol around it (identity, run folders, resume, report, diagnose, bench, the study queue).
The device tests (SIGKILL resume, DDP = virtual devices = accumulation) run it beside the
built-in norms in test_train.py and test_distributed.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError, identity, model_norm, norm_label, validate
from engine.loop import describe, run
from engine.tracking import default_tags
from models import build_model
from norms import (CenConv2d, DeviceAware, FusedActivation, WSConv2d, configure_devices,
                   custom_spec, load_target)

from conftest import ROOT, TINY, make_cfg, run_cli

sys.path.insert(0, str(ROOT))
from examples.my_norm import BatchInstanceNorm  # noqa: E402

EXAMPLE = "examples.my_norm.BatchInstanceNorm"
CUSTOM = ("norm=custom", f"norm.target={EXAMPLE}")
DT = torch.float64

# Layers a user might write, good and bad, in a module outside the packages.
USER_MODULE = '''
import torch
from torch import nn

class RMSNorm(nn.Module):
    """Batch-independent: per sample and channel, like FRN without its TLU."""
    affine = True
    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
    def forward(self, x):
        nu2 = x.pow(2).mean((2, 3), keepdim=True)
        return x * torch.rsqrt(nu2 + self.eps) * self.weight.view(-1, 1, 1)

class FusedRMS(RMSNorm):
    fused_act = True
    def __init__(self, num_channels, act=True):
        super().__init__(num_channels)
        self.act = act
    def forward(self, x):
        y = super().forward(x)
        return torch.relu(y) if self.act else y

class OnWS(RMSNorm):
    conv = "ws"

class OnCentred(RMSNorm):
    conv = "centred"

class TakesConv(RMSNorm):
    takes_conv = True
    def __init__(self, num_channels, conv=None):
        super().__init__(num_channels)
        self.conv_before = conv

def fails(num_channels):
    raise RuntimeError(f"no layer for {num_channels} channels")

def not_a_module(num_channels):
    return torch.zeros(num_channels)

def widens(num_channels):
    return nn.Conv2d(num_channels, num_channels + 1, 1)

class NoParams(nn.Module):
    affine = True
    def __init__(self, num_channels):
        super().__init__()
    def forward(self, x):
        return x - x.mean((2, 3), keepdim=True)

class ClaimsBatch(nn.Module):
    batch_dependent = True
    def __init__(self, num_channels):
        super().__init__()
    def forward(self, x):
        return x - x.mean(0, keepdim=True)

class BadConv(RMSNorm):
    conv = "fancy"

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path) -> str:
    """The path of a file of user layers; targets are `<path>:<Name>`."""
    path = tmp_path / "user_norms.py"
    path.write_text(USER_MODULE)
    return str(path)


# ---------------------------------------------------------------- the import


def test_a_target_is_found_by_module_path_or_file_path(user_module):
    assert load_target(EXAMPLE) is BatchInstanceNorm
    assert load_target("examples.my_norm:BatchInstanceNorm") is BatchInstanceNorm
    by_file = load_target(f"{user_module}:RMSNorm")
    assert by_file.__name__ == "RMSNorm"
    assert load_target(f"{user_module}:RMSNorm") is by_file, "one module per file and process"


@pytest.mark.parametrize("target,needle", [
    ("no_such_pkg.layers.MyNorm", "no module named 'no_such_pkg' on the Python path"),
    ("examples.my_norm.NoSuchNorm", "examples.my_norm has no attribute 'NoSuchNorm'"),
    ("MyNorm", "names no module"),
    ("{file}:NOT_CALLABLE", "is a int, not a class or function"),
    ("{file}.missing.py:X", "is not a file"),
    ("{bomb}:X", "failed (ZeroDivisionError: division by zero)"),
])
def test_a_target_that_cannot_be_imported_is_one_line_naming_it(user_module, tmp_path, target,
                                                                 needle):
    bomb = tmp_path / "bomb.py"
    bomb.write_text("1 / 0\n")
    target = target.format(file=user_module, bomb=bomb)
    with pytest.raises(ValueError) as e:
        load_target(target)
    assert needle in str(e.value) and repr(target) in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the declarations


def test_declarations_choose_the_conv_and_the_activation_slots(user_module):
    t = lambda name: custom_spec(load_target(f"{user_module}:{name}"))  # noqa: E731
    convs = lambda net: {type(m) for m in net.modules() if isinstance(m, nn.Conv2d)}  # noqa: E731
    assert convs(build_model("resnet", 8, norm=t("RMSNorm"))) == {nn.Conv2d}
    assert convs(build_model("resnet", 8, norm=t("RMSNorm"), ws=True)) == {WSConv2d}
    assert convs(build_model("resnet", 8, norm=t("OnWS"))) == {WSConv2d}
    assert convs(build_model("resnet", 8, norm=t("OnCentred"))) == {CenConv2d}

    fused = build_model("resnet", 8, norm=t("FusedRMS"))
    layers = [m for m in fused.modules() if type(m).__name__ == "FusedRMS"]
    assert any(m.act for m in layers) and any(not m.act for m in layers)  # branch ends: act off
    assert any(isinstance(m, FusedActivation) for m in fused.modules())
    assert not any(isinstance(m, nn.ReLU) and not isinstance(m, FusedActivation)
                   for m in fused.modules() if m is not fused)

    linked = build_model("resnet", 8, norm=t("TakesConv"))
    norms = [m for m in linked.modules() if type(m).__name__ == "TakesConv"]
    assert all(isinstance(m.conv_before, nn.Conv2d) for m in norms)
    assert len({id(m.conv_before) for m in norms}) == len(norms)  # each its own conv


def test_a_partial_of_a_torch_layer_joins_as_it_is():
    import functools
    net = build_model("resnet", 8, norm=custom_spec(functools.partial(nn.GroupNorm, 4)))
    assert sum(isinstance(m, nn.GroupNorm) for m in net.modules()) == 7


@pytest.mark.parametrize("name,options,needle", [
    ("fails", {}, "fails(16) failed: RuntimeError: no layer for 16 channels"),
    ("not_a_module", {}, "returned a value of type Tensor, not an nn.Module"),
    ("widens", {}, "its train forward returned (4, 17, 4, 4) for an input of (4, 16, 4, 4)"),
    ("NoParams", {}, "declares affine=True but has no trainable parameters"),
    ("ClaimsBatch", {}, "declares batch_dependent=True but is not a norms.DeviceAware layer"),
    ("RMSNorm", {"momentum": 0.1}, "got an unexpected keyword argument 'momentum'"),
    ("BadConv", {}, "declares conv='fancy'; allowed: plain, ws, centred"),
])
def test_every_mistake_is_one_line_before_training(user_module, name, options, needle):
    args = [*TINY, "norm=custom", f"norm.target={user_module}:{name}",
            *(f"+norm.options.{k}={v}" for k, v in options.items())]
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*args))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert f"norm.target='{user_module}:{name}'" in str(e.value)


def test_a_batch_dependent_layer_that_is_not_device_aware_is_refused():
    """torch's own BatchNorm2d, the first thing a user would try: over a process's K virtual
    devices it would take one statistic, so it is refused by what it does, not by its name."""
    with pytest.raises(ConfigError, match="a sample's output depends on the other samples of "
                                          "its batch, but the layer is not batch-dependent"):
        validate(make_cfg(*TINY, "norm=custom", "norm.target=torch.nn.BatchNorm2d"))


def test_the_checks_leave_the_layer_and_the_global_generators_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    spec = custom_spec(BatchInstanceNorm)
    layer = spec.build(8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(layer.running_mean, torch.zeros(8))
    assert torch.equal(layer.running_var, torch.ones(8))


@pytest.mark.parametrize("args,needle", [
    (["norm=custom"], "norm.target=None is invalid; allowed: the import path of your layer"),
    (["norm=bn", "norm.target=x.Y"], "norm.target='x.Y' is invalid; allowed: unset with "
                                     "norm.name='bn'"),
    (["norm=gn", "+norm.options.eps=0.1"], "norm.options={'eps': 0.1} is invalid"),
    ([*CUSTOM, "norm.eps=0.001"], "norm.eps=0.001 is invalid; allowed: its default (1e-05) "
                                  "with norm=custom"),
])
def test_the_norm_keys_belong_to_their_norm(args, needle):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*TINY, *args))
    assert needle in str(e.value), str(e.value)


def test_a_wrong_target_through_train_py_is_one_line_and_exit_2(tmp_path):
    res = run_cli(*TINY, "norm=custom", "norm.target=no_such_pkg.MyNorm", cwd=tmp_path,
                  timeout=120)
    assert res.returncode == 2
    assert res.stderr == ("error: norm.target='no_such_pkg.MyNorm': no module named "
                          "'no_such_pkg' on the Python path (run from the folder that holds "
                          "it, or add it to PYTHONPATH)\n")
    assert not list(tmp_path.rglob("last.pt")) and not list(tmp_path.rglob("config.yaml"))


# ---------------------------------------------------------------- the example layer


def bin_reference(x, rho, weight, bias, eps, devices):
    """Nam & Kim's equations in float64, per device-slice: x_BN over (N, H, W) of the slice,
    x_IN over (H, W) of each sample, y = gamma (rho x_BN + (1 - rho) x_IN) + beta."""
    ys = []
    for xd in x.chunk(devices):
        mb = xd.mean((0, 2, 3), keepdim=True)
        vb = ((xd - mb) ** 2).mean((0, 2, 3), keepdim=True)
        mi = xd.mean((2, 3), keepdim=True)
        vi = ((xd - mi) ** 2).mean((2, 3), keepdim=True)
        r = rho.clamp(0, 1).view(1, -1, 1, 1)
        ys.append(r * (xd - mb) / torch.sqrt(vb + eps) + (1 - r) * (xd - mi) / torch.sqrt(vi + eps))
    return torch.cat(ys) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("devices", [1, 3])
def test_the_example_matches_its_equations_forward_backward_and_eval(devices):
    g = torch.Generator().manual_seed(0)
    layer = BatchInstanceNorm(5, momentum=0.3).to(DT)
    configure_devices(layer, devices)
    with torch.no_grad():  # rho on both sides of [0, 1], so the clamp is exercised
        layer.rho.copy_(torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.7], dtype=DT))
        layer.weight.copy_(torch.randn(5, generator=g, dtype=DT))
        layer.bias.copy_(torch.randn(5, generator=g, dtype=DT))
    mean, var = torch.zeros(5, dtype=DT), torch.ones(5, dtype=DT)
    for step in range(3):
        x = (torch.randn(2 * devices, 5, 3, 4, generator=g, dtype=DT) * (1 + step) + step)
        up = torch.randn(x.shape, generator=g, dtype=DT)
        params = [layer.rho, layer.weight, layer.bias]
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = layer(xa)
        ref = bin_reference(xb, *params, 1e-5, devices)
        torch.testing.assert_close(y, ref)
        ga = torch.autograd.grad((y * up).sum(), [xa, *params])
        gb = torch.autograd.grad((ref * up).sum(), [xb, *params])
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)
        slices = x.chunk(devices)  # running statistics: the devices' mean, once per step
        mean = 0.7 * mean + 0.3 * torch.stack([s.mean((0, 2, 3)) for s in slices]).mean(0)
        var = 0.7 * var + 0.3 * torch.stack([s.var((0, 2, 3), correction=0)
                                             for s in slices]).mean(0)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_var, var)
    layer.eval()
    x = torch.randn(3, 5, 2, 2, generator=g, dtype=DT)
    r = layer.rho.clamp(0, 1).view(1, -1, 1, 1)
    mi, vi = x.mean((2, 3), keepdim=True), x.var((2, 3), correction=0, keepdim=True)
    expected = (r * (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
                + (1 - r) * (x - mi) / torch.sqrt(vi + 1e-5))
    torch.testing.assert_close(layer(x), expected * layer.weight.view(1, -1, 1, 1)
                               + layer.bias.view(1, -1, 1, 1))


def test_the_example_at_its_initial_rho_is_batch_norm():
    """rho = 1 at init: the example is BN (biased batch variance) there, so a custom run starts
    where bn starts; a cross-check against torch's own kernel."""
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(1))
    y = BatchInstanceNorm(6)(x)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True, eps=1e-5))


def test_the_example_learns_from_the_command_line(tmp_path):
    """As a user runs it: b = 2 on 4 virtual devices, ResNet-8, 1024 generated images, 3
    epochs, as tests/test_train.py's norms (bn 74.2%, gn 71.5% there). Measured: 76.6%."""
    res = run_cli(*TINY, *CUSTOM, "batch_size_per_device=2", "trainer.virtual_devices=4",
                  "trainer.epochs=3", "data.train_size=1024", "data.test_size=256",
                  "optim.lr=0.4", "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_acc"] > 50, summary
    assert summary["norm"] == "custom" and summary["norm_label"] == EXAMPLE
    assert summary["identity"]["norm.target"] == EXAMPLE


# ---------------------------------------------------------------- the protocol


def test_identity_label_folder_and_tags_name_the_target_and_its_options():
    base = make_cfg(*TINY, *CUSTOM)
    other = make_cfg(*TINY, "norm=custom", "norm.target=examples/my_norm.py:BatchInstanceNorm")
    option = make_cfg(*TINY, *CUSTOM, "+norm.options.momentum=0.05", "norm.ws=true")
    assert identity(base)["norm.target"] == EXAMPLE
    assert identity(option)["norm.options.momentum"] == 0.05
    assert norm_label(base) == EXAMPLE
    assert norm_label(option) == f"{EXAMPLE}(momentum=0.05)_ws"
    dirs = [run_dir(c) for c in (base, other, option)]
    assert len(set(dirs)) == 3, dirs
    assert dirs[0].startswith("outputs/default/resnet8_custom-BatchInstanceNorm_b32_s0_")
    assert dirs[2].startswith("outputs/default/resnet8_custom-BatchInstanceNorm_ws_b32_s0_")
    tags = default_tags(describe(option, []))
    assert f"{EXAMPLE}(momentum=0.05)_ws" in tags
    # a built-in norm's identity (and so its run folder's digest) does not hold the new keys
    assert not any(k.startswith(("norm.target", "norm.options")) for k in identity(
        make_cfg(*TINY)))


def run_dir(cfg) -> str:
    from hydra import compose, initialize_config_dir

    from conftest import ROOT as root
    overrides = [f"norm.target={cfg.norm.target}", f"norm.ws={cfg.norm.ws}",
                 *(f"+norm.options.{k}={v}" for k, v in cfg.norm.options.items())]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        c = compose(config_name="config", overrides=[*TINY, "norm=custom", *overrides],
                    return_hydra_config=True)
    from omegaconf import OmegaConf
    return OmegaConf.to_container(c.hydra.run, resolve=True)["dir"]


def write_marker_module(path: Path, marker: Path) -> None:
    """A user's module that records every process that imports it."""
    path.write_text(
        "import os\n"
        f"open({str(marker)!r}, 'a').write(str(os.getpid()) + '\\n')\n"
        "from examples.my_norm import BatchInstanceNorm as Layer\n")


def test_a_record_never_imports_and_a_checkpoint_of_another_target_is_refused(tmp_path):
    """The folder's run used target A; the same folder with target B is refused naming both,
    and only B, the command's, was imported. Reading the folder (the report) imports nothing."""
    a, b = tmp_path / "a_norm.py", tmp_path / "b_norm.py"
    write_marker_module(a, tmp_path / "a.imports")
    write_marker_module(b, tmp_path / "b.imports")
    args = [*TINY, "trainer.epochs=1", "norm=custom", "hydra.run.dir=run"]
    first = run_cli(*args, f"norm.target={a}:Layer", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "run" / "summary.json").unlink()  # as if killed after epoch 1
    imports_a = (tmp_path / "a.imports").read_text()

    res = run_cli(*args, f"norm.target={b}:Layer", cwd=tmp_path)
    assert res.returncode == 2
    assert (f"norm.target: '{a}:Layer' there, '{b}:Layer' now" in res.stderr
            or f"norm.target: '{a}:Layer' there, '{b}:Layer' now" in res.stdout), res.stderr
    assert (tmp_path / "a.imports").read_text() == imports_a, "the record imported its target"
    assert (tmp_path / "b.imports").exists()

    report = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"),
                             str(tmp_path / "run"), "--out", str(tmp_path / "rep")],
                            capture_output=True, text=True, timeout=120)
    assert (tmp_path / "a.imports").read_text() == imports_a, report.stderr

    resumed = run_cli(*args, f"norm.target={a}:Layer", cwd=tmp_path)  # its own: resumes
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_a_sweep_over_targets_and_the_report_of_it(tmp_path, user_module):
    """`-m norm.target=A,B`: one job each, one report row each and a place in the ranking
    (b = 2 on 2 virtual devices), labelled by target."""
    targets = f"{EXAMPLE},{user_module}:RMSNorm"
    res = run_cli("-m", *TINY, "trainer.epochs=1", "data.train_size=64", "norm=custom",
                  "batch_size_per_device=2", "trainer.virtual_devices=2",
                  f"norm.target={targets}", "name=mine", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = sorted(d for d in (tmp_path / "multirun" / "mine").iterdir() if d.is_dir())
    assert len(jobs) == 2 and all((d / "summary.json").exists() for d in jobs)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"),
                          str(tmp_path / "multirun" / "mine"), "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"| {EXAMPLE} |" in out.stdout and f"| {user_module}:RMSNorm |" in out.stdout
    ranking = (tmp_path / "rep" / "ranking.md").read_text()
    assert f"| {EXAMPLE} |" in ranking and f"| {user_module}:RMSNorm |" in ranking


def test_the_microbatch_experiment_and_the_study_queue_take_a_target(tmp_path):
    cfg = make_cfg("experiment=microbatch", *CUSTOM, "batch_size_per_device=2")
    validate(cfg)
    assert (cfg.trainer.virtual_devices, norm_label(cfg)) == (32, EXAMPLE)
    for study, cells in (("short", ["resnet20/custom-BatchInstanceNorm_b1_s0",
                                    "resnet20/custom-BatchInstanceNorm_b64_s0",
                                    "resnet20/custom-BatchInstanceNorm_b2_s0",
                                    "resnet20/custom-BatchInstanceNorm_b8_s0",
                                    "vgg11/custom-BatchInstanceNorm_b1_s0",
                                    "resnet20/custom-BatchInstanceNorm_b1_s1",
                                    "vgg11/custom-BatchInstanceNorm_b1_s1"]),
                         ("long", ["resnet20/custom-BatchInstanceNorm_b1_s0",
                                   "resnet20/custom-BatchInstanceNorm_b64_s0"])):
        env = {**os.environ, "STUDY": study, "DRY_RUN": "1", "CIFAR10_ROOT": "/data/cifar10",
               "COMMITTED": "/nonexistent", "JOBS": "1", "NORM_TARGET": EXAMPLE}
        out = subprocess.run(["bash", str(ROOT / "scripts" / "microbatch_study.sh"), "/q"],
                             env=env, capture_output=True, text=True, check=True)
        lines = [line.split() for line in out.stdout.splitlines()]
        assert [c[0].removeprefix("/q/") for c in lines] == cells
        for _, *overrides in lines:
            cfg = make_cfg(*overrides)
            validate(cfg)
            assert cfg.norm.target == EXAMPLE and cfg.trainer.virtual_devices * \
                cfg.batch_size_per_device == 64


def test_diagnose_measures_the_users_layer(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "diagnose.py"), *CUSTOM,
         "diagnose.norms=[bn,custom]", "data=synthetic", "model.depth=8", "diagnose.seeds=1",
         "diagnose.groups=[1]", "diagnose.plots=false", "trainer.num_threads=1",
         f"hydra.run.dir={tmp_path / 'diag'}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = (tmp_path / "diag" / "summary.csv").read_text().splitlines()
    bn, mine = (dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:3])
    assert mine["norm"] == EXAMPLE
    # rho = 1 at init: the same signal propagation as bn, up to float rounding
    assert float(mine["var_growth"]) == pytest.approx(float(bn["var_growth"]), rel=1e-5)


def test_bench_measures_the_users_layer_against_batch_norm(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick",
                          "--only", "norm", "--target", EXAMPLE, "--threads", "1", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert list(result["norm_vs_native"]) == ["custom-BatchInstanceNorm"]
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--only", "norm",
                          "--target", "examples.my_norm.Nope"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "examples.my_norm has no attribute 'Nope'" in bad.stderr


def test_model_norm_binds_the_options_into_the_layer():
    cfg = make_cfg(*TINY, *CUSTOM, "+norm.options.momentum=0.05")
    norm, options = model_norm(cfg)
    assert options == {}
    net = build_model("resnet", 8, norm=norm)
    layers = [m for m in net.modules() if isinstance(m, BatchInstanceNorm)]
    assert layers and all(m.momentum == 0.05 and isinstance(m, DeviceAware) for m in layers)
