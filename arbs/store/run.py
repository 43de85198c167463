"""The run directory: saving into it (LATEST, retention), finding and opening its checkpoints.

One writer, many readers
------------------------
Writers hold the run's writer lock (``lock.run_lock``; ``save_checkpoint`` takes it, re-entrantly);
a second writer fails at once with RunLockedError. Whoever acquires the lock removes leftover ``.tmp-*``
entries. Readers (``list_checkpoints``, ``resolve_checkpoint``, ``open_checkpoint``) take no lock and
never delete, rename or write anything, so any number of them may run beside a writer.

Atomicity
---------
A checkpoint is committed by ``checkpoint.write_checkpoint`` (temp directory, fsync, COMMIT last,
rename); only then is ``LATEST`` replaced (``LATEST.tmp`` + fsync + ``os.replace``). A crash at any
moment leaves every committed checkpoint whole.

Which checkpoint a run directory means
--------------------------------------
The newest committed ``step_<N>`` (largest N, with COMMIT) is the truth; ``LATEST`` is a hint for
other tools, kept pointing at it by the writer. A crash between COMMIT and the move of LATEST therefore
loses nothing: readers and ``--resume`` use the new checkpoint, with a warning that LATEST disagrees.
A LATEST that is missing, unreadable, not a regular file (a FIFO), larger than 4 KiB or naming
something else is ignored with a warning, never an error, a hang or a large read.
A newest checkpoint that fails verification (CorruptStoreError) is skipped with a warning naming it,
and the next older one is used; :func:`open_latest_for_resume` (the writer) also moves it aside to
``corrupt-step_<N>-<time>``. Readers only skip. Directories in the ``step_`` namespace whose name is
not canonical (``step_00005``, ``step_-1``) are never checkpoints.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

from ..errors import ArbsError, ConfigError, CorruptStoreError, StoreNotFoundError
from . import durable, portable
from .checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from .encoding import is_int
from .layout import (
    COMMIT_FILE, LATEST_FILE, LATEST_MAX_BYTES, corrupt_dir, is_noncanonical_step_dir, parse_step_dir, step_dir,
)
from .lock import run_lock

logger = logging.getLogger(__name__)

_RESCANS = 20  # a reader re-lists at most this often when retention removes checkpoints under it


# --------------------------------------------------------------------------------------- scanning


_warned_noncanonical: set[str] = set()


def _scan(run: Path) -> list[tuple[int, Path]]:
    """(N, path) of the committed ``step_<N>`` directories of ``run``, sorted by N. Warns (once per
    directory and process) about a non-canonical ``step_`` directory that holds a COMMIT."""
    if not run.is_dir():
        raise StoreNotFoundError(f"run directory '{run}' does not exist or is not a directory")
    found = []
    try:
        entries = list(os.scandir(run))
    except OSError as e:
        raise StoreNotFoundError(f"cannot list run directory '{run}': {e.strerror or e}") from e
    for e in entries:
        n = parse_step_dir(e.name)
        if n is not None:
            # a checkpoint is a real directory: arbs never writes a link, and a link may loop
            if e.is_dir(follow_symlinks=False) and os.path.isfile(os.path.join(e.path, COMMIT_FILE)):
                found.append((n, run / e.name))
        elif is_noncanonical_step_dir(e.name) and os.path.isfile(os.path.join(e.path, COMMIT_FILE)):
            if e.path not in _warned_noncanonical:
                _warned_noncanonical.add(e.path)
                logger.warning(
                    "%s: ignoring '%s', which holds a COMMIT but is not a checkpoint name arbs writes (step_<N>, N "
                    "in decimal without sign or leading zeros); rename it to step_<N> of the step its COMMIT "
                    "records to use it", run, e.name)
    return sorted(found)


def list_checkpoints(run_dir) -> list[Path]:
    """Committed checkpoints (``step_<N>`` directories with COMMIT) of ``run_dir``, sorted by step.

    Directories whose name is in the ``step_`` namespace but not canonical (``step_00005``, ``step_-1``,
    ``step_5e0``) are ignored, with a warning if one holds a COMMIT. Reads only.

    Raises StoreNotFoundError when ``run_dir`` is not a directory.
    """
    return [p for _, p in _scan(Path(run_dir))]


def _read_latest(run: Path) -> tuple[str | None, str | None]:
    """(name LATEST holds, why it cannot be used): a bounded read that never hangs (a FIFO is refused
    unopened) and never raises. (None, None) without LATEST."""
    f = run / LATEST_FILE
    try:
        raw = durable.read_regular(f, LATEST_MAX_BYTES, LATEST_FILE)
    except FileNotFoundError:
        return None, None
    except CorruptStoreError as e:
        return None, str(e)
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\n" in name:
        return None, f"'{f}' holds {raw[:80]!r}, not the name of a checkpoint directory such as 'step_200'"
    return name, None


def _note_latest(run: Path, newest: Path) -> None:
    """Warn when LATEST (a hint) does not name ``newest``, the checkpoint actually used."""
    name, problem = _read_latest(run)
    if name == newest.name:
        return
    if problem is not None:
        logger.warning("%s: ignoring %s (%s); using the newest committed checkpoint %s. The run's next save "
                       "rewrites it", run, LATEST_FILE, problem, newest.name)
    elif name is None:
        logger.warning("%s has no %s; using the newest committed checkpoint %s", run, LATEST_FILE, newest.name)
    else:
        logger.warning("%s: %s names %r, but the newest committed checkpoint is %s; using %s (a save in progress, "
                       "or one interrupted before it moved %s)", run, LATEST_FILE, name, newest.name, newest.name,
                       LATEST_FILE)


def _check_checkpoint_name(d: Path) -> None:
    if is_noncanonical_step_dir(d.name):
        raise CorruptStoreError(
            f"'{d}' is not a checkpoint name arbs writes: checkpoint directories are named step_<N> with N in "
            "decimal, without sign or leading zeros. It was renamed by hand; rename it to step_<N> with the "
            f"step its {COMMIT_FILE} records"
        )


def _no_checkpoint_error(run: Path) -> StoreNotFoundError:
    if (run / "zarr.json").exists():
        return StoreNotFoundError(
            f"'{run}' has no {COMMIT_FILE} file, so it is not a committed checkpoint (an interrupted save "
            "leaves such a directory); open the run directory or another step_<N> directory"
        )
    name, _ = _read_latest(run)
    latest = f" ({LATEST_FILE} names {name!r}, which is not a committed checkpoint)" if name else ""
    return StoreNotFoundError(
        f"'{run}' holds no committed checkpoint (no step_<N> directory with {COMMIT_FILE}){latest}"
    )


def _is_checkpoint_dir(p: Path) -> bool:
    """True for a checkpoint directory, False for a run directory; StoreNotFoundError for neither."""
    if not p.exists():
        raise StoreNotFoundError(f"'{p}' does not exist; pass a run directory or a step_<N> checkpoint directory")
    if not p.is_dir():
        raise StoreNotFoundError(f"'{p}' is a file; pass a run directory or a step_<N> checkpoint directory")
    if (p / COMMIT_FILE).exists():
        _check_checkpoint_name(p)
        return True
    return False


# ------------------------------------------------------------------------------------------- save


def _write_latest(run: Path, name: str) -> None:
    durable.write_durable(run / f"{LATEST_FILE}.tmp", f"{name}\n".encode())
    os.replace(run / f"{LATEST_FILE}.tmp", run / LATEST_FILE)
    durable.fsync_dir(run)


def save_checkpoint(run_dir, ckpt: Checkpoint, keep: int | None = None, *, step: int | None = None) -> Path:
    """Atomically save ``ckpt`` as ``run_dir/step_<N>``, point LATEST at the newest checkpoint, then apply
    retention. Holds the run's writer lock (re-entrantly) throughout.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory; created if missing.
    ckpt : Checkpoint
        Validated before anything is written (ConfigError); never modified.
    keep : int, optional
        Keep only the newest ``keep`` committed checkpoints (by step), never deleting the one just saved.
        None keeps all.
    step : int, optional
        N of ``step_<N>``; defaults to ``ckpt.step_counter``. Required for fused checkpoints.

    Returns
    -------
    pathlib.Path
        The committed checkpoint directory.

    Notes
    -----
    LATEST is written to name the newest committed checkpoint: the one just saved, or a newer one that
    already existed (saving an older step does not make it the run's checkpoint). This also repairs a
    LATEST left behind by a crash between COMMIT and LATEST. LATEST is a hint: failing to write it (a
    directory in its place, disk full) is a warning, not an error, since the checkpoint is committed.

    Raises
    ------
    ConfigError
        ``ckpt`` is not valid, or ``keep``/``step`` are not.
    RunLockedError
        Another process is writing the run directory.
    ArbsError
        ``step_<N>`` already exists (checkpoints are never overwritten), or the file system refused
        a write (the message says whether the checkpoint was committed).
    """
    run = Path(run_dir)
    if keep is not None and (not is_int(keep) or keep < 1):
        raise ConfigError(f"keep={keep!r} must be None (keep all) or an integer >= 1")
    n = ckpt.step_counter if step is None else step
    if n is None:
        raise ConfigError("a fused checkpoint has no step_counter; pass step= to name its step_<N> directory")
    if not is_int(n) or n < 0:
        raise ConfigError(f"step {n!r} must be an integer >= 0")
    with run_lock(run):
        dest = run / step_dir(n)
        if dest.exists() or dest.is_symlink():
            latest, _ = _read_latest(run)
            raise ArbsError(
                f"'{dest}' already exists (LATEST names {latest!r}); arbs never writes into an existing "
                "checkpoint. Resume from the newest checkpoint, or save under another step."
            )
        write_checkpoint(dest, ckpt, step=int(n))
        committed = list_checkpoints(run)
        newest = committed[-1] if committed else dest
        try:
            if _read_latest(run)[0] != newest.name or newest == dest:
                _write_latest(run, newest.name)
        except OSError as e:  # LATEST is a hint: the checkpoint is committed and is what readers open
            logger.warning("checkpoint %s was committed, but %s could not be updated: %s. Readers and --resume use "
                           "the newest committed checkpoint regardless", dest, run / LATEST_FILE, e)
        if newest != dest:
            logger.warning("%s: saved %s, but the newer checkpoint %s exists; %s keeps naming %s", run, dest.name,
                           newest.name, LATEST_FILE, newest.name)
        if keep is not None:
            for old in committed[:-keep]:
                if old.name == dest.name:
                    continue
                try:
                    durable.remove_dir(old)
                except OSError as e:  # the new checkpoint is safe; an old one lingering is not worth failing for
                    logger.warning("could not remove old checkpoint %s (keep=%d): %s", old, keep, e)
                else:
                    logger.info("removed old checkpoint %s (keep=%d)", old, keep)
    return dest


# -------------------------------------------------------------------------------------------- open


def resolve_checkpoint(path) -> Path:
    """The checkpoint directory ``path`` designates: itself, or for a run directory its newest committed
    ``step_<N>`` (by N), whatever LATEST says (a warning when LATEST disagrees). Reads only; does not
    verify the checkpoint (:func:`open_checkpoint` does, and falls back to an older one).

    Raises
    ------
    StoreNotFoundError
        ``path`` is missing, or holds no committed checkpoint.
    CorruptStoreError
        ``path`` is a checkpoint directory whose name is a non-canonical ``step_`` name.
    """
    p = Path(path)
    if _is_checkpoint_dir(p):
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise _no_checkpoint_error(p)
    _note_latest(p, ckpts[-1])
    return ckpts[-1]


def _open_newest(run: Path, *, verify: bool, kind: str | None, writer: bool) -> Checkpoint:
    """Open the newest committed checkpoint of ``run`` that passes verification.

    A checkpoint that raises CorruptStoreError is skipped with a warning (``writer``: moved aside to
    ``corrupt-step_<N>-<time>``); one that disappears while being read (the writer's retention removed
    it) makes the reader list the run again. Other errors (FormatVersionError, the wrong ``kind``)
    propagate. When nothing opens, the newest checkpoint's error is raised.
    """
    skipped: dict[str, CorruptStoreError] = {}
    first_error: CorruptStoreError | None = None
    noted = False
    for _ in range(_RESCANS):
        ckpts = [c for c in list_checkpoints(run) if c.name not in skipped]
        if not ckpts:
            break
        if not noted:
            _note_latest(run, ckpts[-1])
            noted = True
        for d in reversed(ckpts):
            try:
                return read_checkpoint(d, verify=verify, kind=kind)
            except (CorruptStoreError, StoreNotFoundError) as e:
                if not (d / COMMIT_FILE).is_file():
                    break  # removed while we read it: list again
                if not isinstance(e, CorruptStoreError):
                    raise
                first_error = first_error or e
                skipped[d.name] = e
                if writer:
                    aside = _move_aside(run, d)
                    logger.warning("%s failed verification and was moved aside to %s; trying the next older "
                                   "checkpoint. The error: %s", d, aside.name, e)
                else:
                    logger.warning("%s failed verification; skipping it and trying the next older checkpoint "
                                   "(the run's next --resume moves it aside). The error: %s", d, e)
        else:
            break  # every listed checkpoint failed
    if first_error is not None:
        if writer:
            first_error.add_note(f"Every committed checkpoint of '{run}' failed verification and was moved aside "
                                 f"(corrupt-step_<N>-<time>): {sorted(skipped)}")
        else:
            first_error.add_note(f"No committed checkpoint of '{run}' passed verification: {sorted(skipped)}")
        raise first_error
    raise _no_checkpoint_error(run)


def _move_aside(run: Path, d: Path) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for i in range(1000):
        aside = run / corrupt_dir(d.name, stamp if i == 0 else f"{stamp}-{i}")
        if not aside.exists():
            break
    try:
        os.rename(d, aside)
        durable.fsync_dir(run)
    except OSError as e:
        raise ArbsError(f"'{d}' failed verification and could not be moved aside to '{aside}': {e}. Move or "
                        "remove it by hand, then resume again.") from e
    return aside


def open_checkpoint(path, *, verify: bool = True, kind: str | None = None) -> Checkpoint:
    """Open and validate a checkpoint, reading every array fully into memory. Reads only.

    Parameters
    ----------
    path : str or os.PathLike
        A portable E1TM file (``arbs export --to e1tm``; :func:`arbs.store.portable.read_portable`), a
        checkpoint directory (opened as is), or a run directory: its newest committed checkpoint that
        passes verification (LATEST is only a hint; a newer checkpoint that fails with CorruptStoreError
        is skipped with a warning naming it).
    verify, kind : see :func:`arbs.store.checkpoint.read_checkpoint`.

    Raises
    ------
    StoreNotFoundError, FormatVersionError, ConfigError, CorruptStoreError
        As :func:`arbs.store.checkpoint.read_checkpoint`; for a run directory CorruptStoreError only when
        no committed checkpoint passes (the newest one's error). A checkpoint directory whose name is a
        non-canonical ``step_`` name (``step_00005``) raises CorruptStoreError.
    """
    p = Path(path)
    if portable.is_portable(p):  # a file: the portable E1TM file of 'arbs export --to e1tm'
        return portable.read_portable(p, kind=kind)
    if _is_checkpoint_dir(p):
        return read_checkpoint(p, verify=verify, kind=kind)
    return _open_newest(p, verify=verify, kind=kind, writer=False)


def open_latest_for_resume(run_dir, *, verify: bool = True, kind: str | None = None) -> Checkpoint:
    """The writer's open of a run directory, for ``--resume``: takes the run's writer lock (re-entrantly;
    call it inside the ``run_lock`` that covers the training loop), opens the newest committed checkpoint
    that passes verification, moving each newer one that fails (CorruptStoreError) aside to
    ``corrupt-step_<N>-<time>`` with a warning, and points LATEST at the checkpoint returned.

    Raises
    ------
    RunLockedError
        Another process is writing the run directory.
    StoreNotFoundError
        ``run_dir`` holds no committed checkpoint.
    CorruptStoreError
        No committed checkpoint passes (all were moved aside; the newest one's error).
    FormatVersionError, ConfigError
        As :func:`open_checkpoint`.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise StoreNotFoundError(f"run directory '{run}' does not exist or is not a directory")
    with run_lock(run):
        ck = _open_newest(run, verify=verify, kind=kind, writer=True)
        if _read_latest(run)[0] != ck.path.name:
            try:
                _write_latest(run, ck.path.name)
            except OSError as e:
                logger.warning("could not point %s at %s: %s", run / LATEST_FILE, ck.path.name, e)
            else:
                logger.info("%s now names %s", run / LATEST_FILE, ck.path.name)
    return ck


def bytes_on_disk(path) -> int:
    """Total size in bytes of the files under ``path`` (or of the file ``path``)."""
    p = Path(path)
    if not p.exists():
        raise StoreNotFoundError(f"'{p}' does not exist")
    if p.is_file():
        return p.stat().st_size
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(p) for f in fs)
