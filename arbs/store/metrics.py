"""``metrics.jsonl``: one JSON object per line, appended durably; a line cut short by a crash is skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from ..errors import ArbsError, ConfigError, CorruptStoreError, StoreNotFoundError
from . import durable
from .encoding import plain_json, reject_json_constant
from .layout import METRICS_FILE

logger = logging.getLogger(__name__)


def append_metrics(run_dir, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``run_dir/metrics.jsonl`` (flushed and fsynced).

    numpy scalars are converted; NaN/inf and non-JSON values raise ConfigError. ``run_dir`` is created
    if missing. A file-system failure (disk full, read-only, permission) raises ArbsError naming the
    file and the cause; the checkpoints are never affected.
    """
    if not isinstance(record, Mapping):
        raise ConfigError(f"a metrics record must be a dict, got {type(record).__name__}")
    line = json.dumps(plain_json(record, "metrics record"), allow_nan=False, ensure_ascii=True) + "\n"
    run = Path(run_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
        durable.write_durable(run / METRICS_FILE, line.encode(), "ab")
    except OSError as e:
        raise ArbsError(f"could not append to '{run / METRICS_FILE}': {e.strerror or e}; "
                        "the run's checkpoints are not affected") from e


def read_metrics(run_dir) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` in order; [] if the file does not exist.

    A final line cut short by a crash is skipped with a warning; any other bad line raises
    CorruptStoreError naming its line number.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise StoreNotFoundError(f"run directory '{run}' does not exist or is not a directory")
    f = run / METRICS_FILE
    try:
        raw = f.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ArbsError(f"cannot read '{f}': {e.strerror or e}") from e
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"), parse_constant=reject_json_constant)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == len(lines):  # no trailing newline: an append cut short
                logger.warning("%s: skipping incomplete last line %d (%s)", f, i, e)
                continue
            raise CorruptStoreError(f"line {i} of '{f}' is not a JSON object ({e}); fix or delete that line") from e
        out.append(rec)
    return out
