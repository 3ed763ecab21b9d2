"""python tests/kill_at_step.py STEP MARKER ARGS...: `python train.py ARGS`, SIGKILLed by
itself just before its optimizer step number STEP (from 1, counted in this process).

Before the kill it writes the number of steps it completed to MARKER, so a test knows exactly
where the run died: with S steps per epoch, STEP = S + S // 2 is the middle of epoch 2, after
epoch 1's checkpoint. A kill from outside after a fixed sleep lands wherever the machine's
speed puts it; this one lands where the test says.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import loop  # noqa: E402

kill_at, marker = int(sys.argv[1]), Path(sys.argv[2])
real_step = loop.train_step
done = 0


def train_step(*args, **kwargs):
    global done
    if done + 1 == kill_at:
        marker.write_text(str(done))
        os.kill(os.getpid(), signal.SIGKILL)
    real_step(*args, **kwargs)
    done += 1


loop.train_step = train_step  # engine.loop.train_epoch looks it up at every step
sys.argv = [str(ROOT / "train.py"), *sys.argv[3:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
