"""kill -9 at any moment of a run that saves every step, then the same command with --resume: the run
ends bit-identical to the uninterrupted one, with no person's help (issue: runs that survive anything)."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from arbs import store
from arbs_cli.main import main
from conftest import checkpoint_arrays

TRIALS = int(os.environ.get("ARBS_KILL_TRIALS", "100"))
STEPS = 12


def _command(data, out):
    return ["train", "--format", "E1TM16", "--data", data, "--context", "16", "--batch-size", "2",
            "--eval-every", "4", "--eval-batches", "1", "--save-every", "1", "--keep", "3", "--steps", str(STEPS),
            "--out", str(out)]


@pytest.mark.slow  # TRIALS training processes killed with SIGKILL (several minutes)
def test_kill_9_anywhere_then_resume_is_bit_identical(tmp_path, text):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "arbs_cli.main", *_command(text, ref)], env=env,
                          capture_output=True, text=True, timeout=600)
    duration = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    want_step, want = checkpoint_arrays(ref)
    assert want_step == STEPS
    rng = random.Random(1)
    outcomes = {"before the first commit": 0, "mid-run": 0, "after the end": 0}
    for i in range(TRIALS):
        run = tmp_path / f"run{i}"
        p = subprocess.Popen([sys.executable, "-m", "arbs_cli.main", *_command(text, run)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.9) * duration)  # process start, step 0, every save, the end
        p.send_signal(signal.SIGKILL)
        p.wait()
        have = run.is_dir() and store.list_checkpoints(run)
        step = store.open_checkpoint(run).step_counter if have else None
        outcomes["before the first commit" if step is None else "after the end" if step == STEPS else "mid-run"] += 1
        r = CliRunner().invoke(main, [*_command(text, run), "--resume"])
        assert r.exit_code == 0, f"trial {i} (killed at step {step}): {r.output[-2000:]}"
        got_step, got = checkpoint_arrays(run)
        assert got_step == STEPS and got.keys() == want.keys(), f"trial {i}"
        bad = [k for k in want if not np.array_equal(got[k], want[k])]
        assert not bad, f"trial {i} (killed at step {step}): arrays differ from the uninterrupted run: {bad[:3]}"
    print(f"{TRIALS} kill -9 trials resumed bit-identically: {outcomes}")
    assert outcomes["mid-run"] >= TRIALS // 4  # the kills really landed inside the run
