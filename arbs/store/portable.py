"""The portable E1TM file: one safetensors file holding a fused checkpoint (``arbs export --to e1tm``).

Layout (safetensors: an 8-byte header length, a JSON header, then the raw arrays):

* per E1TM tensor ``<name>``: ``<name>.T_packed`` (uint8, (rows, ceil(cols_p/5))) and ``<name>.E`` (int8,
  (rows, n_groups)), exactly the arrays of a fused checkpoint (``formats.ARRAYS``);
* per float parameter of a Hugging Face run ``<name>``: ``_float.<name>`` (float16/32/64, as stored);
* ``__metadata__`` (string -> string): ``arbs_portable`` (this layout's version, ``PORTABLE_VERSION``),
  ``arbs_format_version``, ``kind`` (``"e1tm"``), ``format``, ``gs``, ``fused`` (``"true"``), ``tensors``
  (JSON list of ``[name, shape]`` in order), ``float_params`` (JSON list of names), ``meta`` (the checkpoint's
  meta as JSON: the model config that eval and generate rebuild the model from) and ``arrays_sha256`` (sha256
  over every array's bytes, in header order: tensors, then float parameters).

Reading validates the file as a checkpoint directory is validated (``check_checkpoint``: dtypes, shapes,
trit bytes < 243, ...) and checks the digest; any mismatch is CorruptStoreError naming the file. Writing goes
through a temporary sibling that is fsynced and then linked (no overwrite) or renamed (overwrite) into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .. import formats
from ..errors import ConfigError, CorruptStoreError, FormatVersionError, StoreNotFoundError
from . import durable
from .checkpoint import Checkpoint, TensorState, check_checkpoint

PORTABLE_VERSION = 1
MAX_BYTES = 1 << 40  # what a reader accepts: far above any model arbs trains, below what hangs a machine
FLOAT_PREFIX = "_float."
_ARRAYS = ("T_packed", "E")


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def portable_bytes(ckpt: Checkpoint) -> bytes:
    """The portable file of a fused E1TM checkpoint, as bytes. ConfigError for anything else."""
    from safetensors.numpy import save

    if ckpt.kind != "e1tm" or not ckpt.fused:
        raise ConfigError("the portable E1TM file holds a fused E1TM checkpoint; fuse the checkpoint first "
                          "('arbs fuse', or 'arbs export --fuse')")
    check_checkpoint(ckpt, where="the checkpoint to export")
    arrays: dict[str, np.ndarray] = {}
    order: list[np.ndarray] = []
    for name, ts in ckpt.tensors.items():
        for k in _ARRAYS:
            a = np.ascontiguousarray(ts.arrays[k])
            arrays[f"{name}.{k}"] = a
            order.append(a)
    for name, a in ckpt.float_params.items():
        a = np.ascontiguousarray(a)
        arrays[FLOAT_PREFIX + name] = a
        order.append(a)
    meta = {
        "arbs_portable": str(PORTABLE_VERSION),
        "arbs_format_version": str(formats.FORMAT_VERSION),
        "kind": "e1tm",
        "format": ckpt.format,
        "gs": str(ckpt.gs),
        "fused": "true",
        "tensors": json.dumps([[n, list(t.shape)] for n, t in ckpt.tensors.items()]),
        "float_params": json.dumps(list(ckpt.float_params)),
        "meta": json.dumps(ckpt.meta, sort_keys=True, allow_nan=False),
        "arrays_sha256": _digest(order),
    }
    return save(arrays, metadata=meta)


def write_portable(path, ckpt: Checkpoint, *, overwrite: bool = False) -> int:
    """Write ``ckpt`` (fused E1TM) to the portable file ``path`` atomically; returns its size in bytes.

    The bytes go to a ``.tmp-`` sibling, fsynced, then into place: linked when ``overwrite`` is False (an
    existing ``path`` raises ConfigError and is left alone), renamed over ``path`` otherwise. A crash leaves
    no partial ``path``.
    """
    p = Path(path)
    data = portable_bytes(ckpt)
    durable.check_output(p, overwrite, directory=False)
    tmp = durable.tmp_sibling(p, "e1tm")
    try:
        durable.write_durable(tmp, data, "xb")
        durable.place(tmp, p, overwrite)
    except BaseException:
        durable.discard(tmp)
        raise
    return len(data)


def _metadata(p: Path) -> dict | None:
    """The ``__metadata__`` of the safetensors file ``p`` (read by the ``safetensors`` library, which checks
    the header against the file), or None for a file that is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(p, framework="numpy") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError):
        return None


def is_portable(path) -> bool:
    """Whether ``path`` is a regular file whose safetensors header marks it a portable E1TM file (the
    header is read, not the arrays; any other file or a directory: False)."""
    p = Path(path)
    if not p.is_file():
        return False
    meta = _metadata(p)
    return meta is not None and "arbs_portable" in meta


def read_portable(path, *, kind: str | None = None) -> Checkpoint:
    """The fused Checkpoint a portable E1TM file holds (``path`` set to the file), validated.

    Raises StoreNotFoundError (no such file), FormatVersionError (a newer layout or format version),
    CorruptStoreError (not a portable E1TM file, or one that fails validation or its digest), ConfigError
    (``kind`` given and not "e1tm").
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    p = Path(path)
    try:
        size = os.stat(p).st_size
        if size > MAX_BYTES:
            raise CorruptStoreError(f"'{p}' is {size} bytes; more than the {MAX_BYTES} a portable E1TM file may hold")
        raw = durable.read_regular(p, size, "portable E1TM file")  # bounded by the size just seen
    except FileNotFoundError:
        raise StoreNotFoundError(f"'{p}' does not exist") from None
    what = (f"'{p}' is not a portable E1TM file (one that 'arbs export --to e1tm' writes); arbs opens those, "
            "run directories and step_<N> directories")
    try:
        arrays = load(raw)
    except SafetensorError as e:
        raise CorruptStoreError(f"{what}: {e}") from e
    meta = _metadata(p)  # the same file's header (a file changed in between fails the arrays' digest below)
    if meta is None or "arbs_portable" not in meta:
        raise CorruptStoreError(what)
    try:
        version = int(meta["arbs_portable"])
        fversion = int(meta.get("arbs_format_version", "0"))
    except ValueError as e:
        raise CorruptStoreError(f"'{p}': bad version field: {e}") from e
    if version > PORTABLE_VERSION or fversion > formats.FORMAT_VERSION:
        raise FormatVersionError(f"'{p}' was written in portable layout {version} / E1TM format {fversion}; this "
                                 f"arbs reads up to {PORTABLE_VERSION} / {formats.FORMAT_VERSION}: upgrade arbs")
    if kind is not None and kind != "e1tm":
        raise ConfigError(f"'{p}' holds an E1TM checkpoint, not a {kind!r} one")
    try:
        fmt = meta["format"]
        gs = int(meta["gs"])
        listed = json.loads(meta["tensors"])
        float_names = json.loads(meta["float_params"])
        run_meta = json.loads(meta["meta"])
        tensors, order = {}, []
        for name, shape in listed:
            arr = {k: arrays[f"{name}.{k}"] for k in _ARRAYS}
            order += [arr[k] for k in _ARRAYS]
            tensors[name] = TensorState(name=name, shape=tuple(shape), arrays=arr)
        floats = {}
        for name in float_names:
            floats[name] = arrays[FLOAT_PREFIX + name]
            order.append(floats[name])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptStoreError(f"'{p}': its header does not describe its arrays ({type(e).__name__}: {e})") from e
    extra = set(arrays) - {f"{n}.{k}" for n in tensors for k in _ARRAYS} - {FLOAT_PREFIX + n for n in floats}
    if extra:
        raise CorruptStoreError(f"'{p}' holds arrays its header does not list: {sorted(extra)[:5]}")
    if _digest(order) != meta.get("arrays_sha256"):
        raise CorruptStoreError(f"'{p}': the arrays do not match their sha256 (the file is damaged); export it again")
    ck = Checkpoint(kind="e1tm", format=fmt, gs=gs, rule=None, rule_params={}, fused=True, step_counter=None,
                    tensors=tensors, meta=run_meta, path=p, float_params=floats)
    try:
        check_checkpoint(ck, where=f"'{p}'")
    except ConfigError as e:
        raise CorruptStoreError(str(e)) from e
    return ck
