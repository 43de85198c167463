"""Durable file-system writes: fsync of files, trees and directories; removal that never shows half a tree."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import ConfigError, CorruptStoreError
from .layout import TMP_PREFIX

_FSYNC_THREADS = 16


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    if os.name != "nt":  # directories cannot be opened for fsync on Windows
        fsync_path(path)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory, under ``root``.

    In parallel: fsync releases the GIL and concurrent fsyncs share journal commits, which a
    checkpoint's many small files need.
    """
    files, dirs = [], []
    for dirpath, _, filenames in os.walk(root):
        dirs.append(dirpath)
        files.extend(os.path.join(dirpath, f) for f in filenames)
    with ThreadPoolExecutor(max_workers=min(_FSYNC_THREADS, len(files) + 1)) as pool:
        list(pool.map(fsync_path, files))
        list(pool.map(fsync_dir, dirs))


def write_durable(path: Path, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove_dir(path: Path) -> None:
    """Remove a directory so that no half-deleted checkpoint is ever visible: rename away, then delete."""
    doomed = path.parent / f"{TMP_PREFIX}del-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


def read_regular(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of ``path``, which must be a regular file (not a FIFO, device or directory; a symlink is
    followed only to a regular file) of at most ``max_bytes``: a hostile file can neither hang the
    reader nor exhaust its memory. FileNotFoundError passes through; anything else is CorruptStoreError
    naming ``what``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptStoreError(f"cannot read {what} '{path}': {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise CorruptStoreError(f"{what} '{path}' is not a regular file (mode {stat.filemode(st.st_mode)}); "
                                "replace it with the file arbs wrote, or remove it")
    if st.st_size > max_bytes:
        raise CorruptStoreError(f"{what} '{path}' is {st.st_size} bytes; arbs writes at most {max_bytes}. "
                                "It is not the file arbs wrote: restore it from a copy or remove it")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise CorruptStoreError(f"cannot read {what} '{path}': {e}") from e
    if len(data) > max_bytes:  # grew after the stat
        raise CorruptStoreError(f"{what} '{path}' is larger than {max_bytes} bytes; it is not the file arbs wrote")
    return data


def replace_durable(path: Path, data: bytes) -> None:
    """Replace the small file ``path`` with ``data`` atomically and durably: written to a ``.tmp-``
    sibling, fsynced, renamed over ``path``, parent fsynced. A crash leaves the old or the new file,
    and at worst a ``.tmp-`` file that the run's writer removes."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write_durable(tmp, data, "xb")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------------------
# outputs a command creates (export): built beside their final path, then placed whole


def tmp_sibling(out: Path, tag: str) -> Path:
    """A fresh ``.tmp-`` path beside ``out`` to build it in (the run's writer removes stale ones)."""
    out = Path(out)
    return out.parent / f"{TMP_PREFIX}{tag}-{out.name}-{os.getpid()}-{secrets.token_hex(4)}"


def check_output(out: Path, replace: bool, *, directory: bool) -> None:
    """ConfigError unless ``out`` may be written: absent (or ``replace`` and of the same kind), parent present."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not replace:
            raise ConfigError(f"output '{out}' exists; choose another path or pass --force to replace it")
        if directory != out.is_dir():
            raise ConfigError(f"output '{out}' exists and is {'not ' if directory else ''}a directory; "
                              f"expected {'a directory' if directory else 'one file'}: choose another path")
    if not out.parent.is_dir():
        raise ConfigError(f"the directory of output '{out}' does not exist ('{out.parent}'); create it first")


def place(tmp: Path, out: Path, replace: bool) -> None:
    """Move the finished file or directory ``tmp`` to ``out`` durably (fsynced first, parent fsynced after).

    Without ``replace`` an ``out`` that appeared meanwhile is never clobbered (a file is hard-linked into
    place, which fails if ``out`` exists): ConfigError. A crash leaves the old ``out`` or the new one.
    """
    tmp, out = Path(tmp), Path(out)
    if tmp.is_dir():
        fsync_tree(tmp)
        if out.exists():
            if not replace:
                raise ConfigError(f"output '{out}' appeared while it was being written; nothing was replaced")
            remove_dir(out)
        os.rename(tmp, out)
    else:
        fsync_path(tmp)
        if replace:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise ConfigError(f"output '{out}' appeared while it was being written; nothing was replaced") from None
            os.unlink(tmp)
    fsync_dir(out.parent)


def discard(tmp: Path) -> None:
    """Remove an unfinished ``tmp`` output (file or directory), ignoring what is already gone."""
    tmp = Path(tmp)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        try:
            tmp.unlink()
        except OSError:
            pass
