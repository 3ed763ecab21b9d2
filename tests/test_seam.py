"""The norm-activation seam changes no number: every norm that existed before it (bn, syncbn,
gn, ln, in, bcn, none, each with and without WS) gives the losses and eval outputs recorded by
the code before the seam (commit 56047f2), on VGG-11, ResNet-20 and ResNet-18.

`python tests/test_seam.py` rewrites the record (only ever from code known to be right).
The record holds float64 hex strings: on the CPU model and torch build that wrote it the test
demands bit equality; elsewhere 1e-5 relative, because another CPU generation's kernels block
and sum in another order (a Zen 4 host differed from the Zen 5 one that wrote the record by up to
a few float32 ulps after three steps, in every case).
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build_model  # noqa: E402
from norms import configure_devices  # noqa: E402

RECORD = Path(__file__).parent / "data" / "seam_reference.json"
MODELS = {"vgg11": ("vgg", 11, 32), "resnet20": ("resnet", 20, 32), "resnet18": ("resnet", 18, 16)}
NORMS = ("bn", "syncbn", "gn", "ln", "in", "bcn", "none")


def run(model_key: str, norm: str, ws: bool, steps: int = 3) -> list[float]:
    """Losses of `steps` SGD steps (2 virtual devices x 2 images), then the eval-mode loss."""
    arch, depth, size = MODELS[model_key]
    torch.manual_seed(0)
    model = build_model(arch, depth, norm=norm, ws=ws, groups=8)
    configure_devices(model, virtual_devices=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, size, size, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, size, size, generator=gen)
        losses.append(F.cross_entropy(model(x), torch.arange(4)).item())
    return losses


def cpu_identity() -> str:
    """Vendor, family, model and stepping: what decides the CPU kernels' blocking (Linux)."""
    keys = ("vendor_id", "cpu family", "model", "stepping")
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return " ".join(fields.get(k, "?") for k in keys)


def environment() -> dict:
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu": cpu_identity(),
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": 1}


CASES = [(m, n, ws) for m in MODELS for n in NORMS for ws in (False, True)]


@pytest.mark.parametrize("model_key,norm,ws", CASES)
def test_existing_norms_give_the_recorded_numbers(model_key, norm, ws):
    record = json.loads(RECORD.read_text())
    expected = [float.fromhex(v) for v in record["losses"][f"{model_key}/{norm}/{ws}"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = run(model_key, norm, ws)
    finally:
        torch.set_num_threads(threads)
    if record["environment"] == environment():
        assert [v.hex() for v in got] == [v.hex() for v in expected]
    else:
        assert got == pytest.approx(expected, rel=1e-5, nan_ok=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = {"environment": environment(), "losses": {
        f"{m}/{n}/{ws}": [v.hex() for v in run(m, n, ws)] for m, n, ws in CASES}}
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RECORD} ({len(CASES)} cases)")
