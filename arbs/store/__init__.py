"""Atomic, validated Zarr v3 checkpoints and run directories: the only arbs package that imports zarr.

- :mod:`.checkpoint` one checkpoint directory: layout, validation, atomic write, verified read
- :mod:`.run` the run directory: save (LATEST, retention), list, resolve, open
- :mod:`.metrics` ``metrics.jsonl``
- :mod:`.layout` the names in a run directory (``step_<N>``, ``LATEST``, ``COMMIT``, ``.tmp-``)
- :mod:`.durable` fsync and crash-safe removal; :mod:`.encoding` plain JSON and checksums
"""

from .checkpoint import (
    CHUNK_BYTES,
    KINDS,
    Checkpoint,
    TensorState,
    array_nbytes,
    check_checkpoint,
    node_key,
    read_checkpoint,
    write_checkpoint,
)
from .layout import COMMIT_FILE, LATEST_FILE, METRICS_FILE, TMP_PREFIX, parse_step_dir, step_dir
from .metrics import append_metrics, read_metrics
from .run import bytes_on_disk, list_checkpoints, open_checkpoint, resolve_checkpoint, save_checkpoint

__all__ = [
    "CHUNK_BYTES", "COMMIT_FILE", "KINDS", "LATEST_FILE", "METRICS_FILE", "TMP_PREFIX",
    "Checkpoint", "TensorState",
    "append_metrics", "array_nbytes", "bytes_on_disk", "check_checkpoint", "list_checkpoints", "node_key",
    "open_checkpoint", "parse_step_dir", "read_checkpoint", "read_metrics", "resolve_checkpoint",
    "save_checkpoint", "step_dir", "write_checkpoint",
]
