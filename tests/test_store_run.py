"""The run directory under concurrency and crashes: one writer (the writer lock), readers that never
delete, LATEST as a hint (the newest committed checkpoint is the truth), fallback past a corrupt
checkpoint, non-canonical step names, hostile LATEST files, and a writer in another PID namespace.

Helper processes are this file run as a script: ``hold RUN`` takes the writer lock and waits;
``writer RUN STEPS MIN_PID`` saves in a loop (the PID-namespace test).
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from arbs import store  # noqa: E402
from arbs.errors import CorruptStoreError, RunLockedError, StoreNotFoundError  # noqa: E402
from arbs.testing.states import assert_same_checkpoint, random_checkpoint  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
SHAPES = [(16, 160), (40,)]


def state_for(step: int, shapes=SHAPES):
    """A valid state that is a pure function of ``step``."""
    return random_checkpoint(shapes, rule="flip", step=step, seed=step, meta={"step": step})


def entries(run: Path) -> dict[str, int]:
    """Every name under ``run`` (recursively) with its inode: what a reader must leave untouched."""
    return {os.path.relpath(os.path.join(dp, n), run): os.lstat(os.path.join(dp, n)).st_ino
            for dp, dns, fns in os.walk(run) for n in dns + fns}


def corrupt_chunk(ckpt_dir: Path) -> None:
    """Damage one chunk of T_packed (crc32c no longer matches)."""
    chunk = next(p for p in (ckpt_dir / "blocks.0.attn.qkv.weight" / "T_packed").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


class Holder:
    """A separate process holding the writer lock of ``run`` until released or killed."""

    def __init__(self, run: Path):
        self.proc = subprocess.Popen([sys.executable, __file__, "hold", str(run)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
        line = self.proc.stdout.readline()
        assert line == "locked\n", f"holder failed: {line!r} {self.proc.communicate()[1]}"

    def release(self) -> None:
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)


def hold(run: Path) -> None:
    with store.run_lock(run):
        print("locked", flush=True)
        sys.stdin.readline()


# ------------------------------------------------------------------------------- readers only read


def test_readers_never_delete_or_write(tmp_path):
    run = tmp_path / "run"
    store.save_checkpoint(run, state_for(1))
    dead = run / ".tmp-step_2-999999999-abcd"  # its pid exists nowhere (a writer in another PID namespace?)
    (dead / "x").mkdir(parents=True)
    (run / ".tmp-LATEST-999999998-beef").write_text("step_2\n")
    (run / ".tmp-del-step_0-1-0000").mkdir()
    ours = run / f".tmp-step_3-{os.getpid()}-cafe"
    ours.mkdir()
    (run / "step_9").mkdir()  # uncommitted: not a checkpoint
    before = entries(run)
    from arbs import inspect as arbs_inspect

    for _ in range(2):
        assert store.open_checkpoint(run).step_counter == 1
        assert store.resolve_checkpoint(run) == run / "step_1"
        assert store.list_checkpoints(run) == [run / "step_1"]
        assert arbs_inspect.summarize_path(run) is not None
    assert entries(run) == before  # nothing deleted, renamed, created (not even a lock file)


def test_a_writer_removes_every_leftover_temporary(tmp_path):
    run = tmp_path / "run"
    store.save_checkpoint(run, state_for(1))
    for name in (".tmp-step_2-999999999-abcd", f".tmp-step_3-{os.getpid()}-cafe", ".tmp-step_4-1-0000"):
        (run / name).mkdir()
    (run / ".tmp-LATEST-7-beef").write_text("x")
    with store.run_lock(run):  # holding the lock, every .tmp-* is abandoned by definition
        assert not [p for p in run.iterdir() if p.name.startswith(store.TMP_PREFIX)]
    assert store.open_checkpoint(run).step_counter == 1


# ------------------------------------------------------------------------------------- one writer


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    store.save_checkpoint(run, state_for(1))
    holder = Holder(run)
    try:
        for attempt in (lambda: store.save_checkpoint(run, state_for(2)),
                        lambda: store.run_lock(run).__enter__(),
                        lambda: store.open_latest_for_resume(run)):
            t0 = time.monotonic()
            with pytest.raises(RunLockedError) as info:
                attempt()
            assert time.monotonic() - t0 < 2.0  # at once, no waiting
            msg = str(info.value)
            assert f"pid {holder.proc.pid} on host {socket.gethostname()}" in msg, msg
            assert str(run) in msg and "wait for it to finish" in msg
            assert info.value.holder["pid"] == holder.proc.pid
        assert store.read_holder(run)["pid"] == holder.proc.pid
        assert not store.holds_run_lock(run)
        assert [p.name for p in store.list_checkpoints(run)] == ["step_1"]  # nothing written
        assert store.open_checkpoint(run).step_counter == 1  # readers carry on
    finally:
        holder.release()
    assert not (run / store.LOCK_HOLDER_FILE).exists()  # a clean release removes the record
    store.save_checkpoint(run, state_for(2))
    assert store.open_checkpoint(run).step_counter == 2


def test_fuse_into_a_run_dir_being_written_is_refused(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    store.save_checkpoint(src, state_for(3))
    out.mkdir()
    holder = Holder(out)
    try:
        from arbs.fuse import fuse_path

        with pytest.raises(RunLockedError, match=f"pid {holder.proc.pid}"):
            fuse_path(src, out)
    finally:
        holder.release()
    assert Path(fuse_path(src, out).path) == out / "step_3"  # .lock alone is not "a non-empty directory"


def test_stale_lock_of_a_killed_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    store.save_checkpoint(run, state_for(1))
    holder = Holder(run)
    holder.kill()  # SIGKILL: no cleanup ran; its .lock.holder record is still there
    assert store.read_holder(run)["pid"] == holder.proc.pid
    with store.run_lock(run):
        assert store.read_holder(run)["pid"] == os.getpid()
        store.save_checkpoint(run, state_for(2))
    assert store.open_checkpoint(run).step_counter == 2


def test_lock_is_reentrant_in_a_process_and_not_inherited_by_a_fork(tmp_path):
    run = tmp_path / "run"
    with store.run_lock(run):
        with store.run_lock(run):
            store.save_checkpoint(run, state_for(1))  # takes it once more
            assert store.holds_run_lock(run)
        assert store.holds_run_lock(run)
        seen = []
        t = threading.Thread(target=lambda: seen.append(store.save_checkpoint(run, state_for(2))))
        t.start()
        t.join()
        assert seen == [run / "step_2"]  # another thread of the holder enters too
        for _ in range(2):  # the second fork: the first one's exit did not release the parent's lock
            pid = os.fork()
            if pid == 0:  # a forked child is another writer
                try:
                    with store.run_lock(run):
                        os._exit(1)
                except RunLockedError:
                    os._exit(0)
                except BaseException:
                    os._exit(2)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        assert store.holds_run_lock(run)
    assert not store.holds_run_lock(run)
    assert (run / store.LOCK_FILE).exists()  # the lock file stays; deleting it would let two writers in
    holder = Holder(run)  # released: another process gets it
    holder.release()


# ----------------------------------------------------------------------- LATEST is only a hint


def test_crash_between_commit_and_latest_resolves_to_the_new_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    store.save_checkpoint(run, state_for(10))
    store.save_checkpoint(run, state_for(20))
    (run / "LATEST").write_text("step_10\n")  # kill -9 after step_20/COMMIT, before LATEST moved
    with caplog.at_level(logging.WARNING, logger="arbs.store"):
        assert store.resolve_checkpoint(run) == run / "step_20"
        assert store.open_checkpoint(run).step_counter == 20
    assert "LATEST names 'step_10'" in caplog.text and "step_20" in caplog.text
    assert (run / "LATEST").read_text() == "step_10\n"  # readers do not write
    ck = store.open_latest_for_resume(run)  # what --resume does
    assert ck.step_counter == 20 and ck.path == run / "step_20"
    assert (run / "LATEST").read_text() == "step_20\n"
    store.save_checkpoint(run, state_for(30))  # the old failure: "'step_20' already exists"
    assert store.open_checkpoint(run).step_counter == 30


def test_save_repairs_a_latest_that_names_an_older_checkpoint(tmp_path):
    run = tmp_path / "run"
    for s in (10, 20):
        store.save_checkpoint(run, state_for(s))
    (run / "LATEST").write_text("step_10\n")
    store.save_checkpoint(run, state_for(5))  # an older step: LATEST names the newest, step_20
    assert (run / "LATEST").read_text() == "step_20\n"


def test_dangling_or_missing_latest_is_ignored(tmp_path, caplog):
    run = tmp_path / "run"
    store.save_checkpoint(run, state_for(7))
    (run / "LATEST").write_text("step_99\n")
    assert store.open_checkpoint(run).step_counter == 7
    (run / "LATEST").unlink()
    with caplog.at_level(logging.WARNING, logger="arbs.store"):
        assert store.open_checkpoint(run).step_counter == 7
    assert "has no LATEST" in caplog.text
    shutil.rmtree(run / "step_7")
    (run / "LATEST").write_text("step_7\n")
    with pytest.raises(StoreNotFoundError, match="no committed checkpoint.*LATEST names 'step_7'"):
        store.open_checkpoint(run)


def _unblock_fifo(path: Path) -> None:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.parametrize("kind", ["fifo", "sparse-3GB", "dev-zero", "directory", "garbage"])
def test_hostile_latest_is_ignored_without_hanging_or_reading_it(tmp_path, caplog, kind):
    run = tmp_path / "run"
    store.save_checkpoint(run, state_for(3))
    latest = run / "LATEST"
    latest.unlink()
    if kind == "fifo":
        os.mkfifo(latest)
    elif kind == "sparse-3GB":
        with open(latest, "wb") as f:
            f.truncate(3 << 30)
    elif kind == "dev-zero":
        latest.symlink_to("/dev/zero")
    elif kind == "directory":
        latest.mkdir()
    else:
        latest.write_bytes(b"\xff\x00../etc\n")
    got, errors = [], []

    def read():
        try:
            got.append(store.open_checkpoint(run).step_counter)
            tracemalloc.start()  # resolving reads LATEST and lists the run, nothing else
            got.append(store.resolve_checkpoint(run).name)
            got.append(tracemalloc.get_traced_memory()[1])
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            tracemalloc.stop()

    with caplog.at_level(logging.WARNING, logger="arbs.store"):
        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(30)
        hung = t.is_alive()
        if hung and kind == "fifo":
            _unblock_fifo(latest)
            t.join(5)
    assert not hung, "reading LATEST hung"
    assert not errors, errors
    assert got[:2] == [3, "step_3"]
    assert got[2] < 1 << 20, f"peak {got[2]} bytes allocated"
    assert "ignoring LATEST" in caplog.text
    store.save_checkpoint(run, state_for(4))  # the writer replaces it with a regular file where it can
    assert store.open_checkpoint(run).step_counter == 4
    if kind != "directory":
        assert latest.read_text() == "step_4\n"


# ---------------------------------------------------------------------- corrupt newest checkpoint


def test_corrupt_newest_checkpoint_readers_skip_it_the_writer_moves_it_aside(tmp_path, caplog):
    run = tmp_path / "run"
    for s in (10, 20):
        store.save_checkpoint(run, state_for(s))
    corrupt_chunk(run / "step_20")
    with pytest.raises(CorruptStoreError):
        store.open_checkpoint(run / "step_20")  # asked for by name: no fallback
    before = entries(run)
    with caplog.at_level(logging.WARNING, logger="arbs.store"):
        ck = store.open_checkpoint(run)
    assert ck.step_counter == 10
    assert_same_checkpoint(ck, state_for(10))
    assert f"{run / 'step_20'} failed verification" in caplog.text
    assert entries(run) == before  # a reader only skips
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="arbs.store"):
        ck = store.open_latest_for_resume(run)
    assert ck.step_counter == 10
    aside = [p.name for p in run.iterdir() if p.name.startswith("corrupt-step_20-")]
    assert len(aside) == 1 and f"moved aside to {aside[0]}" in caplog.text
    assert store.list_checkpoints(run) == [run / "step_10"]
    assert (run / "LATEST").read_text() == "step_10\n"
    store.save_checkpoint(run, state_for(20))  # training continues and writes step_20 afresh
    assert store.open_checkpoint(run).step_counter == 20


def test_when_every_checkpoint_is_corrupt_the_newest_error_is_raised(tmp_path):
    run = tmp_path / "run"
    for s in (1, 2):
        store.save_checkpoint(run, state_for(s))
        corrupt_chunk(run / f"step_{s}")
    with pytest.raises(CorruptStoreError, match="step_2"):
        store.open_checkpoint(run)
    assert len(store.list_checkpoints(run)) == 2
    with pytest.raises(CorruptStoreError, match="step_2"):
        store.open_latest_for_resume(run)
    assert store.list_checkpoints(run) == []
    assert len([p for p in run.iterdir() if p.name.startswith("corrupt-step_")]) == 2


# ---------------------------------------------------------------------------- non-canonical names


@pytest.mark.parametrize("name", ["step_00005", "step_-1", "step_5e0", "step_+5", "step_5 "])
def test_non_canonical_step_names_are_never_checkpoints(tmp_path, caplog, name):
    run = tmp_path / "run"
    store.save_checkpoint(run, state_for(5))
    shutil.copytree(run / "step_5", run / name)
    for fn in (store.open_checkpoint, store.resolve_checkpoint):
        with pytest.raises(CorruptStoreError, match="not a checkpoint name arbs writes"):
            fn(run / name)
    with caplog.at_level(logging.WARNING, logger="arbs.store"):
        assert store.list_checkpoints(run) == [run / "step_5"]
    assert f"ignoring '{name}', which holds a COMMIT" in caplog.text
    os.rename(run / "step_5", run / "renamed")  # only the non-canonical one left: the run holds nothing
    with pytest.raises(StoreNotFoundError, match="no committed checkpoint"):
        store.open_checkpoint(run)


# --------------------------------------------------------------------------- another PID namespace


def _unshare_works() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare command"
    try:
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    return None if r.returncode == 0 else f"unshare --pid --fork --mount-proc: {r.stderr.decode()[:200].strip()}"


def _free_pid_range(width: int = 2000) -> int:
    """A pid P such that no process here has a pid in [P, P + width): a writer in the new namespace
    whose pid lies there records, in its temp directory names, a pid that is dead from this side."""
    used = sorted(int(n) for n in os.listdir("/proc") if n.isdigit())
    p = 300
    for u in used:
        if u >= p + width:
            break
        if u >= p:
            p = u + 1
    return p


def writer(run: Path, steps: int, min_pid: int) -> None:
    """In a fresh PID namespace (as pid 1): fork until a child's pid is >= min_pid; that child saves
    steps 1..``steps`` into ``run`` (keeping 3)."""
    try:  # skip most of the forks: set the namespace's last pid (root in the namespace may)
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(min_pid - 1))
    except OSError:
        pass
    while True:
        pid = os.fork()
        if pid == 0:
            if os.getpid() < min_pid:
                os._exit(0)
            try:
                for step in range(1, steps + 1):
                    store.save_checkpoint(run, state_for(step, WRITER_SHAPES), keep=3)
            except BaseException as e:
                print(f"writer failed at pid {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if pid >= min_pid:
            sys.exit(os.waitstatus_to_exitcode(status))


WRITER_SHAPES = [(64, 640), (32, 320), (160,)]


@pytest.mark.slow
def test_writer_in_another_pid_namespace_with_readers_here(tmp_path):
    reason = _unshare_works()
    if reason:
        pytest.skip(reason)
    run = tmp_path / "run"
    run.mkdir()
    steps = 40
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, __file__, "writer", str(run),
                             str(steps), str(_free_pid_range())], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV, text=True)
    opened, errors = 0, []
    try:
        while proc.poll() is None:  # `arbs inspect RUN` in a loop, from outside the writer's namespace
            try:
                ck = store.open_checkpoint(run, verify=True)
            except StoreNotFoundError:
                continue  # before the first save
            except Exception as e:  # noqa: BLE001 - collected and reported
                errors.append(repr(e))
                continue
            assert_same_checkpoint(ck, state_for(ck.step_counter, WRITER_SHAPES), str(ck.path))
            opened += 1
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not errors, errors[:3]
    assert opened > 0
    done = store.list_checkpoints(run)
    assert [p.name for p in done] == [f"step_{s}" for s in range(steps - 2, steps + 1)]
    for p in done:  # every committed checkpoint is whole
        assert_same_checkpoint(store.open_checkpoint(p, verify=True), state_for(int(p.name[5:]), WRITER_SHAPES))
    assert not [p for p in run.iterdir() if p.name.startswith(store.TMP_PREFIX)]


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        hold(Path(sys.argv[2]))
    elif sys.argv[1] == "writer":
        writer(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
