"""The run directory: saving into it (LATEST, retention), finding and opening its checkpoints.

Atomicity
---------
A checkpoint is committed by ``checkpoint.write_checkpoint`` (temp directory, fsync, COMMIT last,
rename); only then is ``LATEST`` replaced (``LATEST.tmp`` + fsync + ``os.replace``). A crash at any
moment leaves the previous checkpoint whole and ``LATEST`` naming a committed checkpoint. Leftover
``.tmp-*`` directories of dead processes are removed when a run directory is opened or saved into.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..errors import ArbsError, ConfigError, CorruptStoreError, StoreNotFoundError
from . import durable
from .checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from .encoding import is_int
from .layout import COMMIT_FILE, LATEST_FILE, TMP_PREFIX, parse_step_dir, step_dir, temp_owner_pid

logger = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _clean_temp(run: Path) -> None:
    """Remove ``.tmp-*`` directories left in ``run`` by processes that no longer run."""
    try:
        entries = list(os.scandir(run))
    except OSError:
        return
    for e in entries:
        if not e.name.startswith(TMP_PREFIX):
            continue
        pid = temp_owner_pid(e.name)
        if pid is not None and _pid_alive(pid):
            continue  # another process may be writing it right now
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            logger.warning("removed leftover temporary %s (an interrupted save)", e.path)
        except OSError as exc:
            logger.warning("could not remove leftover temporary %s: %s", e.path, exc)


# ------------------------------------------------------------------------------- shared validation


def save_checkpoint(run_dir, ckpt: Checkpoint, keep: int | None = None, *, step: int | None = None) -> Path:
    """Atomically save ``ckpt`` as ``run_dir/step_<N>``, point LATEST at it, then apply retention.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory; created if missing.
    ckpt : Checkpoint
        Validated before anything is written (ConfigError); never modified.
    keep : int, optional
        Keep only the newest ``keep`` committed checkpoints (by step), never deleting the one LATEST
        names. None keeps all.
    step : int, optional
        N of ``step_<N>``; defaults to ``ckpt.step_counter``. Required for fused checkpoints.

    Returns
    -------
    pathlib.Path
        The committed checkpoint directory.

    Raises
    ------
    ConfigError
        ``ckpt`` is not valid, or ``keep``/``step`` are not.
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
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArbsError(f"cannot create run directory '{run}': {e}") from e
    _clean_temp(run)
    dest = run / step_dir(n)
    if dest.exists():
        latest = _latest_name(run)
        raise ArbsError(
            f"'{dest}' already exists (LATEST names {latest!r}); arbs never writes into an existing "
            "checkpoint. If a save was interrupted after committing it, resume from it, or remove it first."
        )
    write_checkpoint(dest, ckpt, step=int(n))
    try:
        durable.write_durable(run / f"{LATEST_FILE}.tmp", f"{dest.name}\n".encode())
        os.replace(run / f"{LATEST_FILE}.tmp", run / LATEST_FILE)
        durable.fsync_dir(run)
    except OSError as e:
        raise ArbsError(f"checkpoint '{dest}' was committed, but '{run / LATEST_FILE}' could not be updated: {e}. "
                        f"Open '{dest}' directly, or write '{dest.name}' into LATEST.") from e
    if keep is not None:
        for old in list_checkpoints(run)[:-keep]:
            if old.name == dest.name:  # LATEST names it
                continue
            try:
                durable.remove_dir(old)
            except OSError as e:  # the new checkpoint is safe; an old one lingering is not worth failing for
                logger.warning("could not remove old checkpoint %s (keep=%d): %s", old, keep, e)
            else:
                logger.info("removed old checkpoint %s (keep=%d)", old, keep)
    return dest


# -------------------------------------------------------------------------------------------- open


def _latest_name(run: Path) -> str | None:
    """The directory name LATEST holds, or None without LATEST; CorruptStoreError if unreadable."""
    f = run / LATEST_FILE
    try:
        raw = f.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CorruptStoreError(f"cannot read '{f}': {e}. Rewrite it with the name of a step_<N> directory.") from e
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\n" in name:
        raise CorruptStoreError(
            f"'{f}' holds {raw[:80]!r}; expected the name of a checkpoint directory such as 'step_200'. "
            "Rewrite it with the name of a committed step_<N> directory."
        )
    return name


def list_checkpoints(run_dir) -> list[Path]:
    """Committed checkpoints (``step_<N>`` directories with COMMIT) of ``run_dir``, sorted by step.

    Raises StoreNotFoundError when ``run_dir`` is not a directory.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise StoreNotFoundError(f"run directory '{run}' does not exist or is not a directory")
    found = []
    for e in os.scandir(run):
        n = parse_step_dir(e.name)
        if n is not None and e.is_dir() and os.path.isfile(os.path.join(e.path, COMMIT_FILE)):
            found.append((n, run / e.name))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path) -> Path:
    """The checkpoint directory ``path`` designates: itself, or for a run directory the one LATEST names.

    A run directory without LATEST (a crash before the first LATEST was written) resolves to its newest
    committed checkpoint, with a warning.

    Raises
    ------
    StoreNotFoundError
        ``path`` is missing, holds no committed checkpoint, or LATEST names a missing/uncommitted one.
    CorruptStoreError
        LATEST is unreadable.
    """
    p = Path(path)
    if not p.exists():
        raise StoreNotFoundError(f"'{p}' does not exist; pass a run directory or a step_<N> checkpoint directory")
    if not p.is_dir():
        raise StoreNotFoundError(f"'{p}' is a file; pass a run directory or a step_<N> checkpoint directory")
    if (p / COMMIT_FILE).exists():
        return p
    latest = _latest_name(p)
    if latest is not None:
        target = p / latest
        if not (target / COMMIT_FILE).is_file():
            have = [c.name for c in list_checkpoints(p)]
            raise StoreNotFoundError(
                f"'{p / LATEST_FILE}' names {latest!r}, which is not a committed checkpoint "
                f"({'missing' if not target.exists() else 'no COMMIT file'}); committed checkpoints here: "
                f"{have or 'none'}. Point LATEST at one of them or open a step_<N> directory directly."
            )
        n = parse_step_dir(latest)
        newer = [c.name for c in list_checkpoints(p) if n is not None and parse_step_dir(c.name) > n]
        if newer:
            logger.warning("%s: LATEST names %s but newer committed checkpoints exist: %s (an interrupted save?)",
                           p, latest, newer)
        return target
    if (p / "zarr.json").exists():
        raise StoreNotFoundError(
            f"'{p}' has no {COMMIT_FILE} file, so it is not a committed checkpoint (an interrupted save "
            "leaves such a directory); open the run directory or another step_<N> directory"
        )
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise StoreNotFoundError(
            f"'{p}' holds no committed checkpoint (no {LATEST_FILE} and no step_<N> directory with {COMMIT_FILE})"
        )
    logger.warning("%s has no %s; using the newest committed checkpoint %s", p, LATEST_FILE, ckpts[-1].name)
    return ckpts[-1]



def open_checkpoint(path, *, verify: bool = True, kind: str | None = None) -> Checkpoint:
    """Open and validate a checkpoint, reading every array fully into memory.

    Parameters
    ----------
    path : str or os.PathLike
        A run directory (LATEST is followed; leftover ``.tmp-*`` directories of dead processes are
        removed) or a checkpoint directory.
    verify, kind : see :func:`arbs.store.checkpoint.read_checkpoint`.
    """
    p = Path(path)
    d = resolve_checkpoint(p)
    if d != p:
        _clean_temp(p)
    return read_checkpoint(d, verify=verify, kind=kind)


def bytes_on_disk(path) -> int:
    """Total size in bytes of the files under ``path`` (or of the file ``path``)."""
    p = Path(path)
    if not p.exists():
        raise StoreNotFoundError(f"'{p}' does not exist")
    if p.is_file():
        return p.stat().st_size
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(p) for f in fs)
