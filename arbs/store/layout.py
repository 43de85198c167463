"""Names inside a run directory: the one place the ``step_<N>`` grammar and the marker files are defined.

A *run directory* holds committed checkpoints ``step_<N>/`` (N = the step, decimal, no padding), a
``LATEST`` text file naming the newest committed checkpoint directory (``step_200\\n``), ``metrics.jsonl``
and files other modules own (plots, config). Temporary directories start with ``.tmp-``.
"""

from __future__ import annotations

import re

COMMIT_FILE = "COMMIT"
LATEST_FILE = "LATEST"
METRICS_FILE = "metrics.jsonl"
TMP_PREFIX = ".tmp-"

_STEP_DIR = re.compile(r"step_(0|[1-9][0-9]*)")
_TMP_PID = re.compile(r"\.tmp-.*-([0-9]+)-[0-9a-f]+")


def step_dir(step: int) -> str:
    """``step_<N>``: the directory name of the checkpoint of step ``step``."""
    return f"step_{int(step)}"


def parse_step_dir(name: str) -> int | None:
    """N of a ``step_<N>`` directory name (no sign, no leading zeros), or None for any other name."""
    m = _STEP_DIR.fullmatch(name)
    return int(m[1]) if m else None


def temp_owner_pid(name: str) -> int | None:
    """The pid recorded in a ``.tmp-<name>-<pid>-<hex>`` directory name, or None."""
    m = _TMP_PID.fullmatch(name)
    return int(m[1]) if m else None
