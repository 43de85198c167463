"""Crash safety: SIGKILL a process that saves checkpoints in a loop; the run directory always opens.

The child is this file run as a script. It saves ``state_for(step)`` for step = 1, 2, ... (keeping the
newest ``KEEP``) and reports each completed save, so the parent can check that whatever it opens is
exactly one state the child wrote. Each trial lets the child finish 0-2 saves (seeded RNG), kills it
with SIGKILL at a random moment of the next one, and checks the run directory: progress does not depend
on machine speed or load. The next child is started early (its imports overlap the current trial) and
waits for "go" on stdin before it touches the run directory.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from arbs import store  # noqa: E402
from arbs.store import Checkpoint  # noqa: E402
from arbs.testing.states import assert_same_checkpoint, random_checkpoint  # noqa: E402

KEEP = 2
TRIALS = 30
SHAPES = [(64, 640), (32, 320), (160,)]
FORMAT, RULE = "E1TM32", "flip"


def state_for(step: int) -> Checkpoint:
    """A valid flip-rule state that is a pure function of ``step``."""
    return random_checkpoint(SHAPES, format=FORMAT, rule=RULE, step=step, seed=step,
                             meta={"writer": "kill-test", "step": step})


def child(run: Path) -> None:
    sys.stdin.readline()  # started early to hide the import time; wait until the previous child is dead
    done = store.list_checkpoints(run)
    step = int(done[-1].name.removeprefix("step_")) + 1 if done else 1
    state = state_for(step)
    print("ready", flush=True)
    while True:
        store.save_checkpoint(run, state, keep=KEEP)
        print(f"saved {step}", flush=True)
        step += 1
        state = state_for(step)


def assert_is_state(ck: Checkpoint) -> None:
    assert_same_checkpoint(ck, state_for(ck.step_counter), str(ck.path))


@pytest.mark.slow  # kill -9 trials: run by .ci/run's second step (python -m pytest -m slow)
def test_sigkill_during_saves_never_breaks_the_run_dir(tmp_path):
    run = tmp_path / "run"
    store.save_checkpoint(run, state_for(0))
    t0 = time.perf_counter()
    store.save_checkpoint(run / "timing", state_for(0))
    save_s = time.perf_counter() - t0
    rng = np.random.default_rng(1234)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def spawn():
        return subprocess.Popen([sys.executable, __file__, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, text=True)

    last_step, interrupted = 0, 0
    upcoming = spawn()
    try:
        for trial in range(TRIALS):
            proc, upcoming = upcoming, (spawn() if trial + 1 < TRIALS else None)
            whole = int(rng.integers(0, 3))  # saves the child completes before the one the kill lands in
            try:
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                assert line == "ready\n", f"child failed to start: {line!r} {proc.communicate()[1]}"
                for _ in range(whole):
                    line = proc.stdout.readline()
                    assert line.startswith("saved "), f"child died: {line!r} {proc.communicate()[1]}"
                time.sleep(rng.uniform(0.0, 1.5 * save_s))
                assert proc.poll() is None, f"child exited early: {proc.communicate()[1]}"
            finally:
                proc.kill()
                proc.communicate()
            interrupted += any(p.name.startswith(".tmp-") for p in run.iterdir())
            ck = store.open_checkpoint(run)  # the newest committed checkpoint, every checksum verified
            assert_is_state(ck)
            # every save the child reported numbers at most the newest committed step (a step_<N> committed
            # just before a kill, with LATEST not yet moved, counts too: LATEST is only a hint)
            assert ck.step_counter >= last_step + whole, "LATEST lost a completed save"
            last_step = ck.step_counter
            with store.run_lock(run):  # the next writer removes what the killed one left
                pass
            assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
            for p in store.list_checkpoints(run):  # every committed checkpoint is whole, none half-deleted
                assert_is_state(store.open_checkpoint(p))
    finally:
        if upcoming is not None:
            upcoming.kill()
            upcoming.communicate()
    # The test means something only if kills landed inside saves (a kill right after a save is allowed too).
    assert interrupted >= 1, f"no kill interrupted a save (a save takes {save_s:.3f}s); make the state larger"


if __name__ == "__main__":
    child(Path(sys.argv[1]))
