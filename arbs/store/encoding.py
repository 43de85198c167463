"""Plain JSON and checksums for what a checkpoint records (attributes, COMMIT, metrics lines)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Mapping

import numpy as np

from ..errors import ConfigError


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def sha256_hex(a: np.ndarray) -> str:
    """sha256 of the little-endian C-order bytes of ``a``."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def reject_json_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def plain_json(x, where: str):
    """``x`` with numpy scalars and tuples converted to plain JSON values; ConfigError on anything else."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, np.bool_):
        return bool(x)
    if is_int(x):
        return int(x)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            raise ConfigError(f"{where} is {float(x)}; JSON holds finite numbers only (store it as null or a string)")
        return float(x)
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has key {k!r} of type {type(k).__name__}; JSON keys must be str")
            out[k] = plain_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(x, (list, tuple)):
        return [plain_json(v, f"{where}[{i}]") for i, v in enumerate(x)]
    raise ConfigError(
        f"{where} is a {type(x).__name__} ({str(x)[:60]}); only JSON values can be stored "
        "(dict with str keys, list, str, int, finite float, bool, None); convert it first"
    )
