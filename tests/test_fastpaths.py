"""The trainer's fast paths: bf16 autocast, channels_last, torch.compile (run here, on CPU),
fp16 and CUDA graphs (CUDA only: skipped without a GPU), their validation, and the hot loop's
freedom from host syncs."""
import copy
import json

import pytest
import torch

from engine import config, loop
from engine.config import ConfigError, validate
from engine.data import GlobalBatches, load_dataset
from engine.loop import Process, Step, identity, run, train_epoch
from models import build_model
from norms import NORMS, build_norm, configure_devices

from conftest import TINY, make_cfg, run_cli

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LEARN = (*TINY, "trainer.epochs=3", "data.train_size=512")  # reaches > 30% (test_train.py)


def losses(run_dir) -> list[tuple[float, float]]:
    return [(m["train_loss"], m["test_loss"]) for m in
            map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def assert_close_runs(a, b, rel):
    assert len(a) == len(b) > 0
    for (ta, ea), (tb, eb) in zip(a, b):
        assert ta == pytest.approx(tb, rel=rel) and ea == pytest.approx(eb, rel=rel)


def train(tmp_path, name, *overrides) -> tuple[dict, list]:
    cfg = make_cfg(*overrides)
    validate(cfg)
    summary = run(cfg, tmp_path / name)
    return summary, losses(tmp_path / name)


# ---------------------------------------------------------------- CPU: run here


def test_bf16_learns_close_to_fp32(tmp_path):
    _, fp32 = train(tmp_path, "fp32", *LEARN)
    summary, bf16 = train(tmp_path, "bf16", *LEARN, "trainer.precision=bf16")
    assert summary["status"] == "completed" and summary["test_acc"] > 30, summary
    assert bf16 != fp32, "autocast changed nothing"
    assert_close_runs(bf16, fp32, rel=5e-2)  # bf16 keeps 8 bits of mantissa


def nhwc(t: torch.Tensor) -> bool:
    """NHWC strides, not merely compatible with them (as a [N, 1, H, W] tensor is)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def spy_training(monkeypatch) -> dict:
    """Patch engine.loop.train_step to record what training runs on: the net it is given, and,
    for every training forward of every convolution, whether its weight, its input and its
    output are channels_last."""
    seen = {"nets": [], "convs": []}
    real = loop.train_step

    def hook(conv, inputs, output):
        if conv.training:
            seen["convs"].append((nhwc(conv.weight), nhwc(inputs[0]), nhwc(output)))

    def spy(net, *args, **kwargs):
        if not seen["nets"]:
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.register_forward_hook(hook)
        seen["nets"].append(net)
        return real(net, *args, **kwargs)
    monkeypatch.setattr(loop, "train_step", spy)
    return seen


@pytest.mark.parametrize("norm", ["bn", "bcn_ws", "gn"])
def test_channels_last_gives_the_same_losses(tmp_path, monkeypatch, norm):
    args = (*TINY, f"norm={norm}", "trainer.virtual_devices=2", "batch_size_per_device=8")
    seen = spy_training(monkeypatch)
    _, dense = train(tmp_path, "contiguous", *args)
    assert seen["convs"] and not any(any(c) for c in seen["convs"])  # the control: NCHW
    seen = spy_training(monkeypatch)
    _, last = train(tmp_path, "channels_last", *args, "trainer.channels_last=true")
    # Every conv of every training step: weight, input and output in NHWC.
    assert seen["convs"] and all(all(c) for c in seen["convs"]), seen["convs"][:8]
    assert_close_runs(last, dense, rel=1e-4)  # the same maths; summation order only


@pytest.mark.parametrize("devices", [1, 2])
def test_every_norm_keeps_activations_channels_last_and_its_numbers(devices):
    """Every norm on 1 and 2 virtual devices: in a channels_last model every convolution gets
    NHWC input (the device-slice reshapes copy into the default layout: the norms put NHWC
    back), and forward, input gradient and parameter gradients equal the contiguous model's
    (float64: only the summation order differs)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64)
    up = torch.randn(8, 10, generator=gen, dtype=torch.float64)
    for name, options in [*((n, {}) for n in NORMS), ("bcn", {"sync_stats": False})]:
        torch.manual_seed(0)
        dense = build_model("resnet", 8, norm=name, groups=4, **options).double()
        last = copy.deepcopy(dense).to(memory_format=torch.channels_last)
        layouts = []
        for m in last.modules():
            if isinstance(m, torch.nn.Conv2d):
                # a 1x1 kernel's NHWC strides are its contiguous ones (nf's projections)
                m.register_forward_hook(lambda m, i, o: layouts.append(
                    (nhwc(m.weight) or m.kernel_size == (1, 1), nhwc(i[0]), nhwc(o))))
        outs = []
        for model, xin in ((dense, x), (last, x.contiguous(memory_format=torch.channels_last))):
            configure_devices(model, virtual_devices=devices)
            xin = xin.clone().requires_grad_()
            out = model(xin)
            (out * up).sum().backward()
            outs.append([out.detach(), xin.grad, *(p.grad for p in model.parameters())])
        assert layouts and all(all(c) for c in layouts), (name, options, layouts)
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, msg=lambda m: f"{name}: {m}")  # float64


@pytest.mark.slow  # inductor compiles on 2 CPU cores: about a minute (make test-slow)
def test_compile_gives_the_same_losses_as_eager(tmp_path, monkeypatch):
    """About 40 s on a 2-core CPU (inductor compiles C++ with gcc), most of it compiling."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    args = (*TINY, "norm=bcn_ws", "trainer.epochs=1")
    seen = spy_training(monkeypatch)
    _, eager = train(tmp_path, "eager", *args)
    assert seen["nets"] and not any(isinstance(n, OptimizedModule) for n in seen["nets"])
    torch._dynamo.reset()
    counters.clear()
    seen = spy_training(monkeypatch)
    _, compiled = train(tmp_path, "compiled", *args, "trainer.compile=true")
    # Every step ran the compiled module, and dynamo captured the forward and AOTAutograd
    # compiled it with its backward (the training step, not only eval or probes).
    assert seen["nets"] and all(isinstance(n, OptimizedModule) for n in seen["nets"])
    assert counters["frames"]["ok"] >= 1 and counters["aot_autograd"]["ok"] >= 1, \
        {k: dict(v) for k, v in counters.items()}
    assert_close_runs(compiled, eager, rel=1e-4)


@pytest.mark.slow  # two processes compiling: about a minute (make test-slow)
def test_compile_with_ddp_gives_the_same_losses_as_eager_ddp(tmp_path):
    """Two gloo processes: DDP's hooks around the compiled forward, and synchronised BCN
    statistics (an all-reduce per layer) inside it. About 30 s here."""
    args = (*TINY, "norm=bcn_ws", "trainer.epochs=1", "trainer.devices=2",
            "batch_size_per_device=16")
    for name, extra in (("eager", ()), ("compiled", ("trainer.compile=true",))):
        res = run_cli(*args, *extra, f"hydra.run.dir={name}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    compiled, eager = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert compiled != eager, "inductor's kernels sum in another order: was anything compiled?"
    assert_close_runs(compiled, eager, rel=1e-4)


def test_norm_statistics_stay_fp32_under_autocast():
    x = torch.randn(8, 16, 4, 4)
    bn, bcn = build_norm("bn", 16), build_norm("bcn", 16, groups=4, momentum=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = torch.nn.functional.conv2d(x, torch.eye(16).view(16, 16, 1, 1))  # bf16 activations
        assert xb.dtype == torch.bfloat16
        bn(xb), bcn(xb)
    est = bcn.estimated_bn
    for buf in (bn.running_mean, bn.running_var, est.mu_hat, est.var_hat):
        assert buf.dtype == torch.float32
    xf = xb.float()  # the estimates are those of the bf16 values, computed in fp32
    torch.testing.assert_close(est.mu_hat, 0.5 * xf.mean((0, 2, 3)))
    torch.testing.assert_close(est.var_hat, 0.5 + 0.5 * xf.square().mean((0, 2, 3)))


# Every way a tensor's value reaches the host: on a GPU each waits for the queued kernels.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
              "__complex__")


def test_the_hot_loop_reads_nothing_back_between_checks(monkeypatch):
    """No .item(), .tolist(), .numpy(), .cpu(), bool(), float(), int() or index use of a
    tensor inside an epoch when no check falls in it: on a GPU each would stall the launch
    queue."""
    data = load_dataset("synthetic", None, train_size=64, test_size=1)
    batches = GlobalBatches(data.train, 8, data.mean, data.std, "cpu")
    model = build_model("resnet", 8, norm="bcn", groups=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def refuse(*args, **kwargs):
        raise AssertionError("host read-back in the hot loop")
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    loss_sum, correct, seen = train_epoch(model, opt, sched, batches, 0, Process(), Step(),
                                          check_every=10**9, bar=None)
    monkeypatch.undo()
    assert int(seen) == 64 and 0 <= int(correct) <= 64 and loss_sum.item() > 0


# ---------------------------------------------------------------- validation and identity


@pytest.mark.parametrize("overrides,match", [
    (["trainer.precision=fp64"], r"trainer.precision='fp64' is invalid; allowed: fp32, bf16, fp16"),
    (["trainer.device=cpu", "trainer.precision=fp16"],
     r"trainer.precision='fp16' needs CUDA .*; allowed on CPU: fp32, bf16"),
    (["trainer.device=cpu", "trainer.cuda_graphs=true"],
     r"trainer.cuda_graphs=true needs CUDA .*; allowed here: false"),
])
def test_fast_path_validation_names_key_value_and_allowed(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        validate(make_cfg("data.root=/x", *overrides))
    assert "\n" not in str(err.value)


def test_compile_without_a_cxx_compiler_is_refused(monkeypatch):
    monkeypatch.setattr("engine.config.cxx_compiler", lambda: None)
    with pytest.raises(ConfigError, match=r"trainer.compile=true on CPU needs a C\+\+ compiler"):
        validate(make_cfg("data.root=/x", "trainer.device=cpu", "trainer.compile=true"))


@pytest.mark.parametrize("overrides,match", [
    (["trainer.devices=2"], r"trainer.devices=2 is invalid; allowed: 1 with trainer.cuda_graphs"),
    (["trainer.compile=true"], r"trainer.compile=True is invalid; allowed: false with"),
    (["trainer.precision=fp16"], r"trainer.precision='fp16' is invalid; allowed: fp32 or bf16"),
    (["norm.momentum=null"], r"norm.momentum=None is invalid; allowed: a number in \(0, 1\]"),
])
def test_cuda_graph_constraints_are_refused_before_training(monkeypatch, overrides, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # validation only
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg("data.root=/x", "trainer.device=auto", "trainer.cuda_graphs=true",
                          *overrides))


def test_layout_and_compile_may_differ_on_resume_precision_may_not():
    base = identity(make_cfg(*TINY))
    assert identity(make_cfg(*TINY, "trainer.channels_last=true", "trainer.compile=true")) == base
    assert identity(make_cfg(*TINY, "trainer.precision=bf16")) != base
    assert {"trainer.channels_last", "trainer.compile", "trainer.cuda_graphs"} <= \
        set(config.NON_IDENTITY)


# ---------------------------------------------------------------- CUDA only (not run without a GPU)


@CUDA
@pytest.mark.parametrize("norm", ["bn", "bcn_ws"])
def test_cuda_graphs_give_the_same_losses_as_eager(tmp_path, norm):
    args = (*TINY, f"norm={norm}", "trainer.device=cuda", "trainer.virtual_devices=2",
            "batch_size_per_device=8")
    _, eager = train(tmp_path, "eager", *args)
    _, graphed = train(tmp_path, "graphed", *args, "trainer.cuda_graphs=true")
    assert_close_runs(graphed, eager, rel=1e-4)


@CUDA
def test_fp16_with_a_scaler_learns(tmp_path):
    summary, fp16 = train(tmp_path, "fp16", *LEARN, "trainer.device=cuda",
                          "trainer.precision=fp16")
    _, fp32 = train(tmp_path, "fp32", *LEARN, "trainer.device=cuda")
    assert summary["test_acc"] > 30
    assert_close_runs(fp16, fp32, rel=5e-2)


@CUDA
def test_cuda_training_step_does_not_synchronise():
    data = load_dataset("synthetic", None, train_size=64, test_size=1)
    batches = GlobalBatches(data.train, 8, data.mean, data.std, "cuda")
    model = build_model("resnet", 8, norm="bcn", groups=4).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    steps = list(batches.epoch(0))
    sums = (torch.zeros((), device="cuda", dtype=torch.float64),
            torch.zeros((), device="cuda", dtype=torch.long))
    loop.train_step(model, opt, sched, *steps[0], sums, Step())  # lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in steps[1:]:
            loop.train_step(model, opt, sched, x, y, sums, Step())
    finally:
        torch.cuda.set_sync_debug_mode(0)
