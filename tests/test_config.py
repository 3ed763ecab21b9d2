"""Config composition (Hydra compose API) and validation: every bad input is one clear line."""
import json
import re

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from engine.config import ConfigError, global_batch, norm_options, validate
from norms import build_norm

from conftest import make_cfg


def test_default_config_composes_and_validates():
    cfg = make_cfg("data.root=/nonexistent")  # data is not touched by validate
    assert (cfg.model.arch, cfg.model.depth, cfg.norm.name, cfg.norm.ws) == ("resnet", 20, "bn",
                                                                            False)
    assert cfg.batch_size_per_device == 128 and global_batch(cfg) == 128
    validate(cfg)


@pytest.mark.parametrize("preset,name,ws,groups", [
    ("bn", "bn", False, None), ("bn_ws", "bn", True, None), ("gn", "gn", False, 8),
    ("gn_ws", "gn", True, 8), ("bcn_ws", "bcn", True, 8), ("ln", "ln", False, None),
    ("in_ws", "in", True, None), ("syncbn", "syncbn", False, None), ("none", "none", False, None),
])
def test_norm_presets(preset, name, ws, groups):
    cfg = make_cfg(f"norm={preset}")
    assert (cfg.norm.name, cfg.norm.ws, cfg.norm.groups) == (name, ws, groups)
    validate(cfg)


@pytest.mark.parametrize("preset", ["online", "online_ws"])
def test_online_presets_are_the_authors_cifar_command(preset):
    from models import build_model
    from norms import OnlineNorm
    cfg = make_cfg(f"norm={preset}", "norm.ecm=ac")
    assert cfg.norm.ws == preset.endswith("_ws")
    validate(cfg)
    model = build_model("resnet", 8, norm="online", **norm_options(cfg))
    layers = [m for m in model.modules() if isinstance(m, OnlineNorm)]
    assert layers and {(m.alpha_fwd, m.alpha_bkw, m.ecm, m.clamp) for m in layers} == {
        (1023 / 1024, 127 / 128, "ac", 5.0)}


def test_contract_keys_override():
    cfg = make_cfg("model=vgg", "model.depth=11", "norm=gn", "norm.ws=true", "norm.groups=16",
                   "batch_size_per_device=2", "seed=3", "data.root=/x", "data.download=false",
                   "data.train_subset=1000", "trainer.epochs=4", "trainer.devices=2",
                   "trainer.virtual_devices=4", "trainer.accumulate=2", "optim.lr=0.05",
                   "logger.mode=disabled")
    assert global_batch(cfg) == 2 * 2 * 4 * 2
    assert norm_options(cfg) == {"eps": 1e-5, "momentum": 0.1, "sync_stats": True,
                                 "learned_eps": False, "groups": 16}
    assert cfg.data.train_subset == 1000 and cfg.trainer.epochs == 4


def test_synthetic_and_experiment_presets():
    cfg = make_cfg("experiment=smoke")
    assert cfg.data.name == "synthetic" and cfg.name == "smoke"
    validate(cfg)


@pytest.mark.parametrize("override", ["batch_size_per_device=abc", "trainer.epoch=3",
                                      "norm.group=4", "model.depth=1.5", "norm=batchnorm",
                                      "norm.ws=maybe"])
def test_typed_schema_rejects_at_composition(override):
    with pytest.raises((OmegaConfBaseException, ConfigCompositionException)):
        make_cfg(override)


@pytest.mark.parametrize("overrides,match", [
    (["batch_size_per_device=0"], r"batch_size_per_device=0 is invalid; allowed: an integer >= 1"),
    (["trainer.epochs=0"], r"trainer.epochs=0 is invalid; allowed: an integer >= 1"),
    (["trainer.virtual_devices=-2"], r"trainer.virtual_devices=-2"),
    (["optim.lr=-0.1"], r"optim.lr=-0.1 is invalid; allowed: a number >= 0"),
    (["optim.momentum=1.5"], r"optim.momentum=1.5"),
    (["optim.warmup_epochs=50"], r"optim.warmup_epochs=50.0 is invalid; allowed: a number in "
                                 r"\[0, trainer.epochs=30\]"),
    (["model.depth=21"], r"model.depth=21 is not a valid resnet depth; allowed: 6n\+2"),
    (["model=vgg", "model.depth=20"], r"model.depth=20 is not a valid vgg depth"),
    (["model.arch=densenet"], r"model='densenet' is unknown; allowed: vgg, resnet"),
    (["norm.name=foo"], r"norm.name='foo' is unknown; allowed: bn, syncbn"),
    (["norm=gn", "norm.groups=32"], r"resnet20 layer stem.1: gn: norm.groups=32 does not divide "
                                    r"num_channels=16; allowed: \[1, 2, 4, 8, 16\]"),
    (["norm=bcn", "norm.groups=3"], r"norm.groups=3 does not divide"),
    (["norm.eps=0"], r"norm.eps=0.0 is invalid; allowed: a number > 0"),
    (["data.name=mnist"], r"data.name='mnist' is invalid; allowed: cifar10, cifar100, synthetic"),
    (["data.root=null", "data.download=false"], r"data.root=None: set data.root"),
    (["data.train_subset=-1"], r"data.train_subset=-1"),
    (["logger.mode=loud"], r"logger.mode='loud' is invalid; allowed: auto, online, offline"),
    (["trainer.device=tpu"], r"trainer.device='tpu' is invalid; allowed: auto, cpu, cuda"),
    (["seed=18446744073709551616"], r"seed=18446744073709551616 is invalid; allowed: an "
                                    r"integer in \[0, 2\*\*63\)"),
    (["seed=-1"], r"seed=-1 is invalid"),
    (["trainer.timeout_s=inf"], r"trainer.timeout_s=inf is invalid; allowed: a number of "
                                r"seconds in \(0, 604800\]"),
    (["name=../escape"], r"name='../escape' is invalid; allowed: one folder name"),
    (["name=a/b"], r"name='a/b' is invalid"),
    (["norm=brn", "norm.renorm_from=2.5"], r"norm.renorm_from=2.5 is invalid; allowed: a whole "
                                            r"number of optimizer steps"),
    (["norm=brn", "norm.schedule_unit=run", "norm.renorm_from=0.1", "norm.d_max_at=0.5",
      "norm.r_max_at=1.5"],
     r"norm.r_max_at=1.5 is invalid; allowed: a fraction of the run in \[0, 1\]"),
    (["norm=brn", "norm.schedule_unit=epochs"], r"norm.schedule_unit='epochs' is invalid; "
                                                r"allowed: steps, run"),
    (["norm=brn", "norm.r_max=0.5"], r"norm.r_max=0.5 is invalid; allowed: a number >= 1"),
    (["norm=mabn", "batch_size_per_device=3"], r"norm.simulated_batch=32 is invalid; allowed: "
                                               r"a multiple of batch_size_per_device=3"),
    (["norm=frn", "norm.eps=0"], r"norm.eps=0.0 is invalid; allowed: a number > 0"),
    (["norm=online", "norm.ecm=clip"], r"online: norm.ecm='clip' is invalid; allowed: ls | ac | "
                                       r"none"),
    (["norm=online", "trainer.precision=fp16"], r"trainer.precision='fp16' is invalid with "
                                                r"norm.name='online': .*; allowed: fp32, bf16"),
    (["norm=online", "norm.alpha_fwd=1.5"], r"online: norm.alpha_fwd=1.5 is invalid; allowed: a "
                                            r"number in \[0, 1\]"),
])
def test_validation_names_key_value_and_allowed(overrides, match):
    cfg = make_cfg("data.root=/x", *overrides)
    with pytest.raises(ConfigError, match=match) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_online_logging_without_credentials_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(ConfigError, match=r"logger.mode='online' but no wandb credentials"):
        validate(make_cfg("data.root=/x", "logger.mode=online"))


def test_impossible_norm_statistics_are_refused_before_training(monkeypatch):
    import models

    class OneByOne(torch.nn.Module):  # a network whose BN sees 1x1 maps
        def __init__(self, **kw):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 32)
            self.bn = build_norm("bn", 8)

        def forward(self, x):
            return self.bn(self.conv(x))

    monkeypatch.setattr(models, "build_model", lambda *a, **kw: OneByOne())
    with pytest.raises(ConfigError, match=r"norm.name='bn' at batch_size_per_device=1: bn "
                                          r"\(BatchNorm\): batch statistics over 1 value"):
        validate(make_cfg("data.root=/x", "batch_size_per_device=1"))
    validate(make_cfg("data.root=/x", "batch_size_per_device=2"))


@pytest.mark.parametrize("launcher,target", [
    ("parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_presets_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"hydra/launcher={launcher}", "trainer.devices=4"])
    assert cfg.hydra.launcher._target_ == target
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 4 and cfg.hydra.launcher.tasks_per_node == 1


def _sweep_cells(experiment: str) -> list:
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"experiment={experiment}"])
    params = cfg.hydra.sweeper.params
    return [make_cfg(f"experiment={experiment}", f"norm={n}", f"batch_size_per_device={b}")
            for n in params.norm.split(",") for b in params.batch_size_per_device.split(",")]


def test_microbatch_preset_keeps_the_global_batch_at_64():
    cells = _sweep_cells("microbatch")
    assert len(cells) == 12 * 7
    for cfg in cells:
        assert cfg.trainer.virtual_devices * cfg.batch_size_per_device == 64
        assert global_batch(cfg) == 64 and cfg.trainer.accumulate == 1
    assert {c.batch_size_per_device for c in cells} == {1, 2, 4, 8, 16, 32, 64}
    assert {c.norm.name + ("_ws" if c.norm.ws else "") for c in cells} == {
        "bn", "bn_ws", "gn", "gn_ws", "ln", "in", "bcn_ws", "brn", "frn", "evonorm_b0",
        "evonorm_s0", "mabn"}
    with pytest.raises(Exception, match="must divide the experiment's global batch 64"):
        make_cfg("experiment=microbatch", "batch_size_per_device=3").trainer.virtual_devices


@pytest.mark.parametrize("devices", [1, 2, 8])
def test_microbatch_full_keeps_the_cells_on_the_long_schedule(devices):
    cells = [make_cfg("experiment=microbatch_full", f"batch_size_per_device={b}",
                      f"trainer.devices={devices}") for b in (1, 2, 4, 8)]
    for cfg in cells:  # real devices take their share of the 64 device-slices
        assert cfg.trainer.virtual_devices * devices * cfg.batch_size_per_device == 64
        assert global_batch(cfg) == 64
        assert (cfg.trainer.epochs, cfg.data.train_subset, cfg.name) == (200, 0,
                                                                         "microbatch_full")


def test_resolver_errors_are_one_line_naming_the_key():
    cfg = make_cfg("experiment=microbatch", "batch_size_per_device=64", "trainer.devices=2",
                   "data=synthetic")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == ("trainer.virtual_devices: batch_size_per_device=64 x "
                            "trainer.devices=2 must divide the experiment's global batch 64")


def test_gn_protocol_preset_scales_the_global_batch():
    cells = _sweep_cells("microbatch_gn_protocol")
    assert sorted({global_batch(c) for c in cells}) == [16, 32, 64, 128, 256]
    assert all(c.trainer.virtual_devices == 8 for c in cells)


@pytest.mark.parametrize("argv", [
    [], ["-m", "norm=bn,gn", "batch_size_per_device=1,2"], ["hydra/launcher=parallel", "-m"],
    ["experiment=microbatch", "hydra.run.dir=/tmp/x"], ["+hydra.job.env_set.X=1"], ["--help"],
    ["--cfg", "job", "nonsense=1"],  # Hydra's own flags: Hydra answers
])
def test_composition_preflight_passes_what_hydra_accepts(argv):
    from conftest import ROOT
    from engine.cli import composition_error
    assert composition_error(argv, ROOT / "configs", "config") is None


def test_a_data_root_you_name_must_exist_only_the_default_is_downloaded_to(tmp_path,
                                                                             monkeypatch):
    """Issue 22: `data.root=<typo>` with the default data.download=true would download CIFAR-10
    into a folder named like the typo. A root the user names (or $CIFAR10_ROOT) and that does
    not exist is refused before training, naming it and what its nearest folder holds; the
    default location (which `make train` downloads to) and existing folders stay valid.
    (train.py runs check_data_root after validate: tests/test_train.py's bad-input cases.)"""
    from engine.config import DEFAULT_DATA_ROOT, check_data_root
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    assert make_cfg().data.root == DEFAULT_DATA_ROOT and make_cfg().data.download
    check_data_root(make_cfg())  # ./data need not exist: the download's place
    (tmp_path / "cifar10-jpg.tar.gz").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    check_data_root(make_cfg("data.root=empty"))  # exists: a download may fill it
    typo = tmp_path / "cifar10.tar.gz"
    with pytest.raises(ConfigError) as e:
        check_data_root(make_cfg(f"data.root={typo}"))
    assert str(e.value).startswith(
        f"data.root={typo} does not exist (in {tmp_path}/: found cifar10-jpg.tar.gz, empty/); "
        f"did you mean {tmp_path / 'cifar10-jpg.tar.gz'}?; point data.root (or $CIFAR10_ROOT) "
        "at a copy of cifar10")
    assert "data.download=true downloads only into the default data/" in str(e.value)
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path / "nope" / "deeper"))
    with pytest.raises(ConfigError) as e:
        check_data_root(make_cfg())
    assert str(e.value).startswith(f"data.root={tmp_path / 'nope' / 'deeper'} does not exist "
                                   f"(in {tmp_path}/: found ")
    assert "(from $CIFAR10_ROOT)" in str(e.value)
    check_data_root(make_cfg("data=synthetic", "data.root=/no/such/place"))  # no files read


@pytest.mark.parametrize("source", ["command line", "config file"])
def test_keys_the_schema_lacks_are_refused_however_they_arrive(source, tmp_path):
    """Issue 22: '+' added keys that training ignored (`+norm._target_=my.Norm` trained BN).
    A key the schema lacks is one line naming it and the allowed keys, from the command line
    (with or without '+') and from a config file, by the preflight and by validate alike."""
    import shutil

    from conftest import ROOT
    from engine.cli import composition_error
    configs = ROOT / "configs"
    if source == "command line":
        cases = [(["+norm._target_=my.Norm"], "norm._target_"), (["norm.foo=1"], "norm.foo"),
                 (["+trainer.bogus=3"], "trainer.bogus"), (["++extra=1"], "extra")]
    else:  # a user's own presets: an experiment and a norm file
        configs = shutil.copytree(configs, tmp_path / "configs")
        (configs / "experiment" / "mine.yaml").write_text(
            "# @package _global_\nnorm:\n  foo: 1\n")
        (configs / "norm" / "mine.yaml").write_text(
            "defaults:\n  - bn\n  - _self_\n_target_: my.Norm\n")
        cases = [(["experiment=mine"], "norm.foo"), (["norm=mine"], "norm._target_")]
    allowed = {"norm": "in norm: name, ws, groups, channels_per_group, eps,",
               "trainer": "in trainer: epochs, devices, virtual_devices,", "": "at the top "
               "level: model, norm, data, optim, trainer, logger, batch_size_per_device,"}
    for overrides, key in cases:
        parent, _, name = key.rpartition(".")
        line = f"{key}: unknown key {name!r}; allowed {allowed[parent]}"
        assert composition_error(overrides, configs, "config").startswith(line), overrides
        if overrides[0].startswith("+"):  # composed, so validate sees it (train.py, tests)
            with pytest.raises(ConfigError, match=re.escape(line)):
                validate(make_cfg(*overrides))


@pytest.mark.parametrize("argv,modes", [(["-m", "--cfg", "job"], "--cfg and --multirun"),
                                        (["--info", "-r"], "--info and --run"),
                                        (["--cfg=all", "--multirun"], "--cfg and --multirun")])
def test_two_hydra_modes_are_one_line_not_a_traceback(argv, modes, tmp_path):
    from conftest import ROOT, run_cli
    from engine.cli import composition_error
    error = composition_error(argv, ROOT / "configs", "config")
    assert error == (f"{modes} cannot be combined; allowed: one of --cfg, --info, --multirun, "
                     "--run, --shell-completion")
    res = run_cli(*argv, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {error}"


def test_composition_preflight_checks_every_sweep_value():
    from conftest import ROOT
    from engine.cli import composition_error
    error = composition_error(["-m", "model.depth=20,x"], ROOT / "configs", "config")
    assert error == "model.depth: Value 'x' of type 'str' could not be converted to Integer"


@pytest.mark.parametrize("norm,warned", [("syncbn", True), ("bcn_ws", True), ("bn", False),
                                         ("gn", False)])
def test_accumulation_with_cross_device_statistics_is_warned(caplog, norm, warned):
    validate(make_cfg(f"norm={norm}", "trainer.accumulate=4", "batch_size_per_device=8"))
    assert ("cross-device statistics cover one micro-batch" in caplog.text) == warned


def _queue_cells(study: str, committed: str = "/nonexistent") -> list[list[str]]:
    """The cells scripts/microbatch_study.sh queues for STUDY, as its DRY_RUN prints them:
    [folder, override, ...] per cell, in queue order (none committed unless `committed` says)."""
    import os
    import subprocess

    from conftest import ROOT
    env = {**os.environ, "STUDY": study, "DRY_RUN": "1", "CIFAR10_ROOT": "/data/cifar10",
           "COMMITTED": committed}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "microbatch_study.sh"), "/q"],
                         env={**env, "JOBS": "1"}, capture_output=True, text=True, check=True)
    return [line.split() for line in out.stdout.splitlines()]


def test_the_queue_skips_cells_whose_committed_record_is_complete(tmp_path):
    """A study spanning sessions: a landed cell is not run again; an unfinished one is."""
    for cell, status in (("resnet20/bn_b64_s0", "completed"), ("resnet20/bn_b1_s0", "completed"),
                         ("resnet20/gn_b1_s0", "interrupted")):
        (tmp_path / cell).mkdir(parents=True)
        (tmp_path / cell / "summary.json").write_text(json.dumps({"status": status}, indent=1))
    every = [c[0].removeprefix("/q/") for c in _queue_cells("long")]
    left = [c[0].removeprefix("/q/") for c in _queue_cells("long", str(tmp_path))]
    assert left == [c for c in every if c not in ("resnet20/bn_b64_s0", "resnet20/bn_b1_s0")]
    assert "resnet20/gn_b1_s0" in left and "resnet20/bn_b64_s0_e40" in left


def test_landed_cells_are_the_records_of_finished_ones_and_the_queue_skips_them(tmp_path):
    """scripts/land_study.sh copies a finished cell's record (never its checkpoint or log) and
    leaves unfinished ones; the queue pointed at the landed folder skips exactly those."""
    import subprocess

    from conftest import ROOT
    out = tmp_path / "queue"
    for cell, status in (("resnet20/bcn_ws_b1_s0", "completed"),
                         ("resnet20/bn_b64_s0", "interrupted")):
        (out / cell / "checkpoints").mkdir(parents=True)
        (out / cell / "summary.json").write_text(json.dumps({"status": status}, indent=2))
        for name in ("config.yaml", "metrics.jsonl", "train.log", "checkpoints/last.pt"):
            (out / cell / name).write_text(name)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "land_study.sh"), str(out),
                          str(tmp_path / "landed")], capture_output=True, text=True, check=True)
    assert res.stdout.splitlines() == ["landed resnet20/bcn_ws_b1_s0",
                                       f"1 finished cell(s) in {tmp_path / 'landed'}"]
    landed = tmp_path / "landed" / "resnet20" / "bcn_ws_b1_s0"
    assert sorted(p.name for p in landed.iterdir()) == ["config.yaml", "metrics.jsonl",
                                                        "summary.json"]
    assert not (tmp_path / "landed" / "resnet20" / "bn_b64_s0").exists()
    left = [c[0].removeprefix("/q/") for c in _queue_cells("long", str(tmp_path / "landed"))]
    assert "resnet20/bcn_ws_b1_s0" not in left and left[0] == "resnet20/bn_b64_s0"


@pytest.mark.parametrize("study", ["short", "long"])
def test_every_queued_cell_of_the_study_composes_and_validates(study):
    cells = _queue_cells(study)
    folders = [c[0] for c in cells]
    assert len(set(folders)) == len(folders), "two cells share a folder"
    for folder, *overrides in cells:
        cfg = make_cfg(*overrides)
        validate(cfg)
        assert global_batch(cfg) == 64 and cfg.data.root == "/data/cifar10"
        assert not cfg.data.download and cfg.trainer.num_threads == 1
    if study == "short":
        assert len(cells) == 114
        assert (cfg.trainer.epochs, cfg.data.train_subset) == (4, 20000)
        # issue 24's methods close the queue: every one at b = 1 on both models first
        last = [c[0].removeprefix("/q/") for c in cells[-23:]]
        assert last[:8] == [f"{m}/{n}_b1_s0" for m in ("resnet20", "vgg11")
                            for n in ("nf", "nf_agc", "online", "cbn")]
        assert sorted(last[8:]) == sorted(
            [f"resnet20/{n}_b64_s0" for n in ("nf", "nf_agc", "online", "cbn")]
            + [f"{m}/{n}_b1_s1" for m in ("resnet20", "vgg11")
               for n in ("nf", "nf_agc", "online", "cbn")]
            + [f"resnet20/{n}_b2_s0" for n in ("nf", "online", "cbn")])
        nf_agc = make_cfg(*cells[-22][1:])
        assert (nf_agc.norm.name, nf_agc.optim.agc) == ("nf", 0.01)
        cbn = make_cfg(*cells[-20][1:])
        assert cbn.norm.name == "cbn" and cbn.batch_size_per_device == 1


def test_select_keeps_the_matching_cells_of_the_queue():
    import os
    import subprocess

    from conftest import ROOT
    env = {**os.environ, "DRY_RUN": "1", "CIFAR10_ROOT": "/data/cifar10", "SELECT": "norm=nf",
           "JOBS": "1", "COMMITTED": "/nonexistent"}  # the landed cells would be skipped
    out = subprocess.run(["bash", str(ROOT / "scripts" / "microbatch_study.sh"), "/q"], env=env,
                         capture_output=True, text=True, check=True)
    assert [line.split()[0] for line in out.stdout.splitlines()] == [
        "/q/resnet20/nf_b1_s0", "/q/resnet20/nf_agc_b1_s0", "/q/vgg11/nf_b1_s0",
        "/q/vgg11/nf_agc_b1_s0", "/q/resnet20/nf_b64_s0", "/q/resnet20/nf_agc_b64_s0",
        "/q/resnet20/nf_b1_s1", "/q/vgg11/nf_b1_s1", "/q/resnet20/nf_agc_b1_s1",
        "/q/vgg11/nf_agc_b1_s1", "/q/resnet20/nf_b2_s0"]
    env["SELECT"] = "norm=online"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "microbatch_study.sh"), "/q"], env=env,
                         capture_output=True, text=True, check=True)
    assert [line.split()[0] for line in out.stdout.splitlines()] == [
        "/q/resnet20/online_b1_s0", "/q/vgg11/online_b1_s0", "/q/resnet20/online_b64_s0",
        "/q/resnet20/online_b1_s1", "/q/vgg11/online_b1_s1", "/q/resnet20/online_b2_s0"]


def test_the_long_study_queues_its_cells_in_the_issues_order_on_the_long_schedule():
    cells = {c[0].removeprefix("/q/"): make_cfg(*c[1:]) for c in _queue_cells("long")}
    order = list(cells)
    # the calibration cells first, then every method at b = 1 (issue 24's too) before the rest
    assert order[:2] == ["resnet20/bn_b64_s0", "resnet20/bcn_ws_b1_s0"]
    assert {f.split("/")[1] for f in order[:13]} == {
        "bn_b1_s0", "bn_b2_s0", "bn_b64_s0", "bcn_ws_b1_s0", "gn_b1_s0", "mabn_b1_s0",
        "evonorm_s0_b1_s0", "frn_b1_s0", "brn_b1_s0", "online_b1_s0", "cbn_b1_s0", "nf_b1_s0",
        "nf_agc_b1_s0"}
    # issue 24's b = 64 cells right after them, VGG-11 last
    assert order[13:16] == [f"resnet20/{n}_b64_s0" for n in ("online", "cbn", "nf")]
    assert order[-3:] == ["vgg11/bn_b64_s0", "vgg11/bn_b1_s0", "vgg11/bcn_ws_b1_s0"]
    assert cells["resnet20/nf_agc_b1_s0"].optim.agc == 0.01
    assert len(order) == 41
    for folder, cfg in cells.items():
        epochs = 40 if folder.endswith("_e40") else 20
        assert (cfg.trainer.epochs, cfg.data.train_subset, cfg.name) == (epochs, 0,
                                                                         "microbatch_long")
        steps = 50000 // 64 * epochs
        opts = norm_options(cfg, steps)
        if cfg.norm.name == "brn":  # the paper's start; r_max at the run's end, d_max 4/7 there
            assert (opts["renorm_from"], opts["r_max_at"]) == (5000, steps)
            assert opts["d_max_at"] == 5000 + (steps - 5000) * 4 // 7
        if cfg.norm.name == "mabn":
            assert opts["renorm_from"] == 100
    assert sum(f.endswith("_e40") for f in cells) == 4


def test_the_queue_does_not_start_a_cell_finished_earlier_in_its_folder(tmp_path):
    """Re-running a queue over its own OUT: a finished cell is reported, not run again (its
    console.log kept); an unfinished one runs (here PYTHON fails, so it is reported FAILED)."""
    import os
    import subprocess

    from conftest import ROOT
    done = tmp_path / "resnet20" / "nf_b2_s0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"status": "completed"}))
    (done / "console.log").write_text("the first run's log")
    env = {**os.environ, "CIFAR10_ROOT": "/data/cifar10", "PYTHON": "/bin/false",
           "COMMITTED": "/nonexistent", "JOBS": "1",
           "SELECT": "model=resnet .* norm=nf batch_size_per_device=(2|64) "}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "microbatch_study.sh"), str(tmp_path)],
                         env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line.split()[0] for line in out] == ["FAILED", "done"]
    assert out[1].endswith(f"(finished earlier in {tmp_path})")
    assert (done / "console.log").read_text() == "the first run's log"


def test_a_key_the_norm_does_not_read_is_warned_and_no_preset_sets_one(caplog):
    """norm.window with bn does nothing: one warning naming who reads the key (a sweep across
    norms may set it for some of them, so not an error). Every preset sets only its own keys."""
    from conftest import ROOT
    presets = sorted(p.stem for p in (ROOT / "configs" / "norm").glob("*.yaml"))
    for preset in (p for p in presets if p != "custom"):
        validate(make_cfg(f"norm={preset}"))
    assert "does nothing" not in caplog.text
    validate(make_cfg("norm=bn", "norm.window=3", "norm.compensate=false"))
    assert "norm.window=3 does nothing with norm.name='bn'; it is read by cbn" in caplog.text
    assert "norm.compensate=False does nothing with norm.name='bn'; it is read by cbn" \
        in caplog.text
    caplog.clear()
    validate(make_cfg("norm=gn", "norm.groups=4", "norm.r_max=3"))
    assert caplog.text.count("does nothing") == 1 and "it is read by brn, mabn" in caplog.text
