"""Names inside a run directory: the one place the ``step_<N>`` grammar and the marker files are defined.

A *run directory* holds committed checkpoints ``step_<N>/`` (N = the step, decimal, no sign, no padding),
a ``LATEST`` text file naming the newest committed checkpoint directory (``step_200\\n``; a hint for
other tools, see ``run.py``), ``metrics.jsonl`` and files other modules own (plots, config).

Reserved names:

- ``.tmp-*``: temporaries of the run's writer (checkpoints being written or deleted, small files being
  replaced). Only the holder of the writer lock removes them.
- ``.lock`` and ``.lock.holder``: the writer lock (``lock.py``) and who holds it. Not damage, not data.
- ``step_*``: the prefix is reserved for the grammar; a ``step_``-name that is not canonical
  (``step_00005``, ``step_-1``, ``step_5e0``) is never a checkpoint (:func:`is_noncanonical_step_dir`).
- ``corrupt-step_<N>-<time>``: a checkpoint that failed verification, moved aside by the writer.
"""

from __future__ import annotations

import re

COMMIT_FILE = "COMMIT"
LATEST_FILE = "LATEST"
METRICS_FILE = "metrics.jsonl"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
LOCK_HOLDER_FILE = ".lock.holder"
STEP_PREFIX = "step_"
CORRUPT_PREFIX = "corrupt-"
LATEST_MAX_BYTES = 4096  # LATEST holds one directory name; anything larger is not the file arbs wrote

_STEP_DIR = re.compile(r"step_(0|[1-9][0-9]*)")


def step_dir(step: int) -> str:
    """``step_<N>``: the directory name of the checkpoint of step ``step``."""
    return f"{STEP_PREFIX}{int(step)}"


def parse_step_dir(name: str) -> int | None:
    """N of a ``step_<N>`` directory name (no sign, no leading zeros), or None for any other name."""
    m = _STEP_DIR.fullmatch(name)
    return int(m[1]) if m else None


def is_noncanonical_step_dir(name: str) -> bool:
    """True for a name in the reserved ``step_`` namespace that is not a canonical ``step_<N>``
    (``step_00005``, ``step_-1``, ``step_5e0``, ``step_x``): arbs never writes such a checkpoint."""
    return name.startswith(STEP_PREFIX) and parse_step_dir(name) is None


def is_bookkeeping(name: str) -> bool:
    """True for the entries of a run directory that are its writer's bookkeeping, not data: the lock,
    its holder record and ``.tmp-*`` temporaries. A directory holding only these is an empty run."""
    return name in (LOCK_FILE, LOCK_HOLDER_FILE) or name.startswith(TMP_PREFIX)


def corrupt_dir(name: str, stamp: str) -> str:
    """``corrupt-<name>-<stamp>``: where the writer moves a checkpoint that failed verification
    (outside the ``step_`` grammar, so no reader takes it for a checkpoint again)."""
    return f"{CORRUPT_PREFIX}{name}-{stamp}"
