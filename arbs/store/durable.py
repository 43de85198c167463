"""Durable file-system writes: fsync of files, trees and directories; removal that never shows half a tree."""

from __future__ import annotations

import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
