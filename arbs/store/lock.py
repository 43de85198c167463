"""The writer lock of a run directory: one writer per run directory, any number of readers.

Every process that writes into a run directory (``save_checkpoint``, ``arbs train``, ``arbs fuse``/
``arbs convert`` into ``--out``) holds :func:`run_lock` while it writes. Readers (``open_checkpoint``,
``arbs inspect``/``eval``) never take it and never delete or rename anything, so they cannot disturb a
writer. Holding the lock is what makes cleanup safe: every ``.tmp-*`` entry in a run directory belongs
to its writer, so whoever acquires the lock removes all of them right away (no pid guessing, which means
nothing across PID namespaces, containers or hosts). Writing into a run directory without the lock
(e.g. ``write_checkpoint`` into it directly) is not supported.

Lock type
---------
``filelock.FileLock`` is, on Linux and macOS, ``UnixFileLock``: ``flock(2)`` with ``LOCK_EX | LOCK_NB``
on ``run_dir/.lock`` (the file stays in place; deleting it releases nothing and would let two writers
in, so never delete it by hand). The kernel releases the lock when the last descriptor of that open file
closes, i.e. when the holder process exits in any way, SIGKILL included: a lock whose holder died is
taken over by the next writer with no manual step. A descriptor inherited by a child process (a fork
without exec) keeps the lock until that child exits too; ``fuser -v run_dir/.lock`` shows who has it.
flock locks work across PID namespaces and containers that share the file system.

On NFS, Linux emulates ``flock`` with POSIX byte-range locks sent to the server (NLM for NFSv3, the
protocol itself for v4), so the lock holds across client hosts when the server supports locking; a
client that crashes keeps it until the server's lease expires (NFSv4: about 90 s). Mounts with
``nolock`` or ``local_lock=flock|all`` lock only within one host: two hosts could then both write the
same run directory. On a file system without ``flock`` at all (some FUSE mounts) :func:`run_lock`
refuses with an ArbsError instead of falling back to a pid-file lock (filelock 4 would, by default).

The holder
----------
After acquiring, the holder writes ``run_dir/.lock.holder`` (JSON: ``host``, ``pid``, ``since`` in UTC,
``argv0``, ``pidns``; durably, by rename) so that a second writer's :class:`~arbs.errors.RunLockedError`
can say who holds the lock; the lock file itself holds nothing (filelock may truncate it). The record
is removed on release; a record left by a killed holder is only information and is overwritten by the
next holder.

Re-entrancy
-----------
The lock is per process: while any thread of a process holds ``run_lock(d)``, further
``run_lock(d)`` calls in that process (any thread) enter at once and only the outermost exit releases
it. A forked child does not inherit the holding: its ``run_lock(d)`` is a new writer and is refused while
the parent holds it.
"""

from __future__ import annotations

import datetime
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import filelock

from ..errors import ArbsError, CorruptStoreError, RunLockedError
from . import durable
from .layout import LOCK_FILE, LOCK_HOLDER_FILE, TMP_PREFIX

logger = logging.getLogger(__name__)

_HOLDER_MAX_BYTES = 4096

# filelock >= 3.12 has thread_local; filelock 4 would fall back to a pid-file ("soft") lock where flock is
# missing, which is exactly the pid heuristic this lock replaces: refuse instead.
_FILELOCK_KW = {"thread_local": False}
if "fallback_to_soft" in inspect.signature(filelock.FileLock.__init__).parameters:
    _FILELOCK_KW["fallback_to_soft"] = False


@dataclass
class _Held:
    lock: filelock.BaseFileLock
    pid: int  # the process that acquired it (a forked child holds nothing)
    depth: int
    holder_file: Path


_mutex = threading.Lock()
_held: dict[str, _Held] = {}


def _key(run: Path) -> str:
    return os.path.realpath(run)


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv0": sys.argv[0] if sys.argv and sys.argv[0] else sys.executable,
        "pidns": _pid_namespace(),
    }


def read_holder(run_dir) -> dict | None:
    """What the current (or last) holder of ``run_dir``'s writer lock recorded, or None if there is no
    readable record. Information only: whether the lock is held is decided by the kernel, not by it."""
    p = Path(run_dir) / LOCK_HOLDER_FILE
    try:
        rec = json.loads(durable.read_regular(p, _HOLDER_MAX_BYTES, "the lock holder record"))
    except (FileNotFoundError, CorruptStoreError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _describe_holder(rec: dict | None, holder_file: Path) -> str:
    if rec is None:
        return (f"held by another process (its record '{holder_file}' is missing or unreadable; "
                "it may have just started)")
    pid, host, since = rec.get("pid"), rec.get("host"), rec.get("since")
    text = f"held by pid {pid} on host {host} since {since}"
    if rec.get("argv0"):
        text += f" ({rec['argv0']})"
    if host == socket.gethostname() and rec.get("pidns") and rec.get("pidns") != _pid_namespace():
        text += f"; pid {pid} is in another PID namespace (a container?) than this process"
    return text


def _locked_error(run: Path, lock_path: Path) -> RunLockedError:
    holder_file = run / LOCK_HOLDER_FILE
    rec = read_holder(run)
    return RunLockedError(
        f"run directory '{run}' is being written by another process: {_describe_holder(rec, holder_file)}. "
        "Only one process may write a run directory at a time; wait for it to finish or, if that process "
        f"is gone, a process that inherited its lock is still running: find it with `fuser -v {lock_path}` "
        f"(or `lsof {lock_path}`) and stop it. A holder that dies releases the lock by itself; do not delete "
        f"'{lock_path}' (that would let a second writer in). Readers (inspect, eval) may open the run "
        "directory meanwhile.",
        os.fspath(run), rec,
    )


def _acquire(run: Path) -> _Held:
    lock_path = run / LOCK_FILE
    lock = filelock.FileLock(os.fspath(lock_path), **_FILELOCK_KW)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise _locked_error(run, lock_path) from None
    except (NotImplementedError, OSError) as e:
        raise ArbsError(
            f"cannot lock run directory '{run}' with flock on '{lock_path}': {e}. arbs needs a file system "
            "with flock (or NFS with locking enabled) to guarantee one writer per run directory."
        ) from e
    _remove_temporaries(run)
    holder_file = run / LOCK_HOLDER_FILE
    try:
        durable.replace_durable(holder_file, json.dumps(_holder_record()).encode() + b"\n")
    except OSError as e:  # the lock is what matters; the record only words other writers' errors
        logger.warning("holding the writer lock of %s, but could not record the holder in %s: %s", run, holder_file, e)
    return _Held(lock, os.getpid(), 0, holder_file)


def _remove_temporaries(run: Path) -> None:
    """Remove every ``.tmp-*`` entry of ``run``. Called only right after acquiring the lock: no other
    process writes here, and no thread of this one does yet, so each is an abandoned temporary."""
    try:
        entries = list(os.scandir(run))
    except OSError as e:
        logger.warning("could not list %s to remove leftover temporaries: %s", run, e)
        return
    for e in entries:
        if not e.name.startswith(TMP_PREFIX):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
        except OSError as exc:
            logger.warning("could not remove leftover temporary %s: %s", e.path, exc)
        else:
            logger.warning("removed leftover temporary %s (a save or removal that was interrupted)", e.path)


def _release(h: _Held) -> None:
    try:
        os.unlink(h.holder_file)
    except OSError:
        pass
    h.lock.release()


def holds_run_lock(run_dir) -> bool:
    """True when this process holds the writer lock of ``run_dir`` (see :func:`run_lock`)."""
    with _mutex:
        h = _held.get(_key(Path(run_dir)))
        return h is not None and h.pid == os.getpid() and h.depth > 0


@contextmanager
def run_lock(run_dir) -> Iterator[Path]:
    """Hold the writer lock of the run directory ``run_dir`` (created if missing) for the ``with`` body.

    Fails at once, never waits: a second writer gets RunLockedError naming the holder. Re-entrant
    within a process. See the module docstring for the lock type and what it guarantees on NFS.

    Yields
    ------
    pathlib.Path
        ``run_dir``.

    Raises
    ------
    RunLockedError
        Another process holds the lock.
    ArbsError
        The run directory cannot be created, or its file system cannot lock.
    """
    run = Path(run_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArbsError(f"cannot create run directory '{run}': {e}") from e
    key = _key(run)
    with _mutex:
        h = _held.get(key)
        if h is None or h.pid != os.getpid():
            h = _acquire(run)
            _held[key] = h
            logger.debug("acquired the writer lock of %s", run)
        h.depth += 1
    try:
        yield run
    finally:
        with _mutex:
            h.depth -= 1
            if h.depth == 0:
                del _held[key]
                _release(h)
                logger.debug("released the writer lock of %s", run)
