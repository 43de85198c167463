"""Atomic, validated Zarr v3 checkpoints and run directories: the only arbs package that imports zarr.

- :mod:`.checkpoint` one checkpoint directory: layout, validation, atomic write, verified read
- :mod:`.run` the run directory: save (LATEST, retention), list, resolve, open, open for resume
- :mod:`.lock` the run directory's writer lock: one writer, any number of readers
- :mod:`.metrics` ``metrics.jsonl``
- :mod:`.layout` the names in a run directory (``step_<N>``, ``LATEST``, ``COMMIT``, ``.tmp-``, ``.lock``)
- :mod:`.portable` the portable E1TM file (one safetensors file; ``arbs export --to e1tm``)
- :mod:`.durable` fsync and crash-safe removal; :mod:`.encoding` plain JSON and checksums

``RunLockedError`` (raised by :func:`run_lock`) is re-exported from :mod:`arbs.errors` for convenience.
"""

from ..errors import RunLockedError
from .checkpoint import (
    CHUNK_BYTES,
    KINDS,
    Checkpoint,
    TensorState,
    array_nbytes,
    check_checkpoint,
    float_nbytes,
    node_key,
    read_checkpoint,
    write_checkpoint,
)
from .layout import (
    COMMIT_FILE, LATEST_FILE, LOCK_FILE, LOCK_HOLDER_FILE, METRICS_FILE, TMP_PREFIX, is_bookkeeping, parse_step_dir,
    step_dir,
)
from .portable import read_portable, write_portable
from .lock import holds_run_lock, read_holder, run_lock
from .metrics import append_metrics, read_metrics
from .run import (
    bytes_on_disk, list_checkpoints, open_checkpoint, open_latest_for_resume, resolve_checkpoint, save_checkpoint,
)

__all__ = [
    "CHUNK_BYTES", "COMMIT_FILE", "KINDS", "LATEST_FILE", "LOCK_FILE", "LOCK_HOLDER_FILE", "METRICS_FILE",
    "TMP_PREFIX",
    "Checkpoint", "RunLockedError", "TensorState",
    "append_metrics", "array_nbytes", "bytes_on_disk", "check_checkpoint", "float_nbytes", "holds_run_lock", "is_bookkeeping",
    "list_checkpoints", "node_key", "open_checkpoint", "open_latest_for_resume", "parse_step_dir", "read_checkpoint",
    "read_holder", "read_metrics", "read_portable", "resolve_checkpoint", "run_lock", "save_checkpoint", "step_dir",
    "write_checkpoint", "write_portable",
]
