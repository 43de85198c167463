"""One checkpoint directory: the Zarr v3 layout, its validation, atomic write and verified read.

A checkpoint directory is a Zarr v3 group:

- root attributes (plain JSON): ``arbs_format_version``, ``kind`` (``"e1tm"`` or ``"float"``),
  ``format`` (e.g. ``"E1TM32"``, null for float), ``gs``, ``rule`` (null when fused or float),
  ``rule_params`` (dict of ints), ``fused`` (bool), ``tensors`` (ordered list of ``{name, shape}``;
  float checkpoints add ``arrays``: ``{array: {dtype, shape}}``) and ``meta`` (the caller's JSON dict);
  an e1tm checkpoint of a user's model that keeps float parameters adds ``float_params`` (below).
- a 0-d int64 array ``step_counter`` at the root (absent when fused).
- one subgroup per tensor holding the arrays of ``formats.tensor_arrays(rule, fused)``, each with the
  dtype and shape of the format table. Every array's codec chain ends with ``crc32c``; all arrays but
  ``T_packed`` (base-3 bytes, incompressible) are also zstd-compressed. Arrays up to ``CHUNK_BYTES``
  are one chunk; larger ones are chunked by rows. Every chunk is written, even an all-zero one, so a
  missing chunk file is always damage.
- ``COMMIT`` (JSON), written last: ``{"arbs_format_version", "step", "attrs_sha256", "arrays"}`` where
  ``arrays`` maps each array's path inside the checkpoint (``"<tensor key>/<array>"``, ``"step_counter"``)
  to the sha256 of its little-endian C-order bytes, and ``attrs_sha256`` hashes the root attributes
  (canonical JSON: sorted keys, no spaces, ASCII). A directory without ``COMMIT`` is not a checkpoint.

Float parameters (e1tm only)
----------------------------
Every model arbs builds is integer-only. A user's model may keep float parameters (norm gains, biases, an
un-ternarized head); ``Checkpoint.float_params`` holds them by name and they are stored apart: the root
attribute ``float_params`` (ordered list of ``{name, shape, dtype}``, dtype float16/float32/float64) and
one array per parameter in the root subgroup ``_float`` (key: the name's ``node_key``; COMMIT path
``"_float/<key>"``). Both are present exactly when there is at least one float parameter, so an
integer-only checkpoint is byte for byte what it was before float parameters existed, and
``Checkpoint.integer_only`` is the absence of the attribute. No tensor key starts with ``_``, so ``_float``
never collides with a tensor; a float array anywhere else in an e1tm checkpoint is refused.

Tensor keys
-----------
A tensor's group key is its name, percent-encoded where the name would not make a safe directory name:
characters outside ``[A-Za-z0-9_.~-]`` become ``%XX`` (UTF-8 bytes, ``urllib.parse.quote``), and a first
character is also encoded when the name starts with ``.`` or ``_`` or equals a reserved entry
(``step_counter``, ``zarr.json``, ``COMMIT``, compared case-insensitively). ``urllib.parse.unquote``
inverts it. ``"blocks.0.attn.qkv.weight"`` is its own key. Array names (float checkpoints) use the same rule.

Atomicity
---------
A checkpoint is written into a sibling ``.tmp-<name>-<pid>-<random>`` directory, every file and directory
is fsynced, the temporary tree is checked to be whole (every ``zarr.json`` and chunk file it should hold:
zarr recreates directories another process deleted, so a deleted array would otherwise be committed as
missing), ``COMMIT`` is written and fsynced, the directory is renamed into place and the parent fsynced.
A crash at any moment leaves no directory of that name, or a whole committed one (``run.py`` then moves
``LATEST``).

Bounded reads
-------------
A hostile checkpoint can neither hang the reader nor make it allocate more than the arrays it declares.
Before zarr opens anything: ``COMMIT`` is read as a regular file of at most ``COMMIT_MAX_BYTES``; the
tree is walked and any entry that is not a regular file or directory (symlink, FIFO, device, socket) is
refused, as is a ``zarr.json`` larger than ``ROOT_JSON_MAX_BYTES`` (root) or ``NODE_JSON_MAX_BYTES``.
Before an array is read: its codec chain must be exactly ``bytes`` (little-endian) [-> ``zstd``] ->
``crc32c``, its chunks no larger than the array, every chunk file a regular file whose size is possible
for its chunk (``bytes + 4`` uncompressed; within ``encoding.zstd_size_bounds`` for zstd), and a zstd
frame must declare in its header (``encoding.zstd_frame_header``) exactly the chunk's byte count, so
nothing is decompressed beyond the declared chunk size.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import operator
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import quote

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from .. import formats
from ..errors import ArbsError, ConfigError, CorruptStoreError, FormatVersionError, StoreNotFoundError
from . import durable
from .encoding import (
    ZSTD_MAX_HEADER, canonical_json, is_int, plain_json, reject_json_constant, sha256_hex, zstd_frame_header,
    zstd_size_bounds,
)
from .layout import COMMIT_FILE, TMP_PREFIX, parse_step_dir

logger = logging.getLogger(__name__)

KINDS = ("e1tm", "float")
CHUNK_BYTES = 64 << 20  # arrays larger than this are chunked by rows
# Reader caps on the JSON files (arbs writes far less): COMMIT holds ~100 bytes per array, an array's or
# group's zarr.json under 1 KiB, the root zarr.json the tensor list and the caller's meta.
COMMIT_MAX_BYTES = 64 << 20
ROOT_JSON_MAX_BYTES = 16 << 20
NODE_JSON_MAX_BYTES = 1 << 20
_ZARR_JSON = "zarr.json"

_ATTR_KEYS = ("arbs_format_version", "kind", "format", "gs", "rule", "rule_params", "fused", "tensors", "meta")
FLOAT_PARAMS_ATTR = "float_params"  # root attribute, present only with float parameters (e1tm)
FLOAT_GROUP = "_float"  # root subgroup of the float parameters; node_key never starts a key with "_"
FLOAT_PARAM_DTYPES = ("float16", "float32", "float64")
_COMMIT_KEYS = ("arbs_format_version", "step", "attrs_sha256", "arrays")
_UNCOMPRESSED = frozenset({"T_packed"})  # uniformly distributed base-3 bytes: zstd only costs time
_RESERVED_KEYS = frozenset({formats.STEP_COUNTER.lower(), "zarr.json", COMMIT_FILE.lower()})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_POW3 = np.array([1, 3, 9, 27, 81], np.int16)  # digit weights within a packed byte, first trit least significant

OPEN_ADVICE = (
    "The checkpoint is damaged or was altered: open an earlier one (arbs.store.list_checkpoints) "
    "or restore it from a copy."
)
_SAVE_ADVICE = "Nothing was written; fix the state before saving."




@dataclass(frozen=True, kw_only=True, eq=False)
class TensorState:
    """The persistent arrays of one tensor.

    Parameters
    ----------
    name : str
        Tensor name, e.g. ``"blocks.0.attn.qkv.weight"``.
    shape : tuple of int
        Logical shape of the weight (e1tm) or of the parameter (float).
    arrays : dict of str to numpy.ndarray
        e1tm: ``T_packed`` (uint8), ``E`` (int8), ``corr_accum`` (int64) [, ``flip_accum`` (int8)]
        with the shapes of ``formats.array_shape``; fused: ``T_packed`` and ``E`` only.
        float: any named bool/int/float arrays (e.g. ``weight``, ``exp_avg``, ``exp_avg_sq``).
        The arrays are not copied; they stay mutable.
    """

    name: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]

    def __post_init__(self):
        try:
            shape = tuple(operator.index(d) for d in self.shape)
        except TypeError:
            raise ConfigError(f"tensor {self.name!r} has shape {self.shape!r}; expected a tuple of ints") from None
        object.__setattr__(self, "shape", shape)


@dataclass(frozen=True, kw_only=True, eq=False)
class Checkpoint:
    """Everything a checkpoint holds. ``open_checkpoint`` returns one with ``path`` set.

    Parameters
    ----------
    kind : {"e1tm", "float"}
    format : str or None
        E1TM variant name (``"E1TM32"``); None for float checkpoints.
    gs : int or None
        Group size of ``format``; None for float checkpoints.
    rule : str or None
        Update rule (``formats.RULES``); None when fused and for float checkpoints.
    rule_params : dict of str to int
        The rule's integer parameters, complete (``formats.rule_params``); empty when rule is None.
    fused : bool
        Inference-only e1tm checkpoint (T_packed and E, no step_counter).
    step_counter : int or None
        Optimizer steps taken; None exactly when fused.
    tensors : dict of str to TensorState
        Keyed by tensor name, in order.
    meta : dict
        The caller's JSON-able data: model config, data hash, ... numpy scalars are converted on save.
    path : pathlib.Path or None
        The checkpoint directory it was opened from.
    float_params : dict of str to numpy.ndarray
        e1tm only: the float parameters of a user's model (norm gains, biases, an un-ternarized head) by
        name, float16/float32/float64, stored apart from the integer state (root subgroup ``_float``).
        Empty for every model arbs builds; see :attr:`integer_only`.
    """

    kind: str
    format: str | None
    gs: int | None
    rule: str | None
    rule_params: dict[str, int]
    fused: bool
    step_counter: int | None
    tensors: dict[str, TensorState]
    meta: dict
    path: Path | None = None
    float_params: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def integer_only(self) -> bool:
        """True for an e1tm checkpoint without float parameters: every persistent array is an integer."""
        return self.kind == "e1tm" and not self.float_params


@dataclass(frozen=True)
class _Header:
    kind: str
    format: str | None
    gs: int | None
    rule: str | None
    rule_params: dict
    fused: bool


@dataclass(frozen=True)
class _Site:
    """Where a validation runs: builds errors that name the place and say what to do."""

    where: str
    exc: type
    advice: str

    def error(self, subject: str, problem: str, exc: type | None = None) -> ArbsError:
        return (exc or self.exc)(f"{subject} in {self.where} {problem}. {self.advice}")


def _open_site(d: Path) -> _Site:
    return _Site(f"'{d}'", CorruptStoreError, OPEN_ADVICE)


# ------------------------------------------------------------------------------------ small helpers


def node_key(name: str) -> str:
    """Directory key of a tensor (or float array) ``name`` inside a checkpoint; see the module docstring."""
    key = quote(name, safe="")
    if key[:1] in (".", "_") or key.lower() in _RESERVED_KEYS:
        key = f"%{ord(key[0]):02X}{key[1:]}"
    return key


def _check_header(site: _Site, *, kind, format, gs, rule, rule_params, fused) -> _Header:
    """Check the checkpoint-level fields (not step_counter) and return them as plain Python values."""
    subj = "the checkpoint header"
    if kind not in KINDS:
        raise site.error(subj, f"has kind {kind!r}; expected one of {', '.join(KINDS)}.{formats.did_you_mean(str(kind), KINDS)}")
    if not isinstance(fused, (bool, np.bool_)):
        raise site.error(subj, f"has fused={fused!r}; expected true or false")
    if not isinstance(rule_params, Mapping):
        raise site.error(subj, f"has rule_params={rule_params!r}; expected a dict of ints")
    fused = bool(fused)
    if kind == "float":
        if format is not None or gs is not None or rule is not None or rule_params or fused:
            raise site.error(
                subj, f"is kind 'float' but has format={format!r}, gs={gs!r}, rule={rule!r}, "
                f"rule_params={dict(rule_params)!r}, fused={fused}; expected None/None/None/{{}}/False",
            )
        return _Header("float", None, None, None, {}, False)
    if not isinstance(format, str):
        raise site.error(subj, f"has format={format!r}; expected one of {', '.join(formats.VARIANTS)}")
    try:
        want_gs = formats.variant_gs(format)
    except ConfigError as e:
        raise site.error(subj, f"has an unknown format: {e}") from None
    if not is_int(gs) or int(gs) != want_gs:
        raise site.error(subj, f"has gs={gs!r} with format {format!r}; expected gs={want_gs}")
    if fused:
        if rule is not None or rule_params:
            raise site.error(subj, f"is fused but has rule={rule!r}, rule_params={dict(rule_params)!r}; expected None and {{}}")
        return _Header("e1tm", format, want_gs, None, {}, True)
    if not isinstance(rule, str):
        raise site.error(subj, f"has rule={rule!r}; expected one of {', '.join(formats.RULES)}")
    try:
        spec = formats.rule_spec(rule)
        required = {p for p in spec.params if formats.PARAMS[p].absent is None}
        if not required <= set(rule_params) <= set(spec.params):
            raise site.error(
                subj, f"has rule_params with keys {sorted(rule_params)}; rule {rule!r} takes {sorted(spec.params)} "
                f"({', '.join(sorted(set(spec.params) - required)) or 'none'} optional)"
            )
        params = formats.recorded_rule_params(rule, rule_params)
    except ConfigError as e:
        raise site.error(subj, f"has an invalid rule: {e}") from None
    return _Header("e1tm", format, want_gs, rule, params, False)


def _check_step(site: _Site, header: _Header, step) -> int | None:
    if header.fused:
        if step is not None:
            raise site.error("step_counter", f"is {step!r}; a fused checkpoint has no step_counter (expected None)")
        return None
    if not is_int(step) or int(step) < 0:
        raise site.error("step_counter", f"is {step!r}; expected an integer >= 0")
    step = int(step)
    most = formats.max_step_counter(header.rule, header.gs)
    if step > most:
        if header.rule == "average":
            why = (f"rule 'average' with gs={header.gs} requires gs*step_counter < 2**61 (step_counter <= {most}), "
                   "so that Xi = 4*corr_accum/(gs*step_counter) fits int64")
        else:
            why = f"expected at most the int64 maximum {most}"
        raise site.error("step_counter", f"is {step}; {why}")
    return step


def _e1tm_specs(site: _Site, header: _Header, name: str, shape) -> dict[str, tuple[np.dtype, tuple]]:
    """Expected (dtype, shape) of every array of an e1tm tensor, from the format table."""
    try:
        rows, cols = formats.tensor_view(shape)
    except ConfigError as e:
        raise site.error(f"tensor {name!r}", f"has an invalid shape: {e}") from None
    return {
        a: (formats.ARRAYS[a].dtype, formats.array_shape(a, rows, cols, header.gs))
        for a in formats.tensor_arrays(header.rule, header.fused)
    }


def _check_dtype_shape(site: _Site, subject: str, dtype, shape, want_dtype, want_shape, e1tm: bool) -> None:
    dtype = np.dtype(dtype)
    if dtype != want_dtype:
        got = dtype.str if dtype.name == want_dtype.name else dtype.name
        hint = f"; E1TM checkpoints hold no float arrays outside {FLOAT_GROUP!r}" if e1tm and dtype.kind in "fc" else ""
        raise site.error(subject, f"has dtype {got}; expected {want_dtype.name}{hint}")
    if tuple(shape) != tuple(want_shape):
        raise site.error(subject, f"has shape {tuple(shape)}; expected {tuple(want_shape)}")


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _check_e1tm_values(site: _Site, header: _Header, step: int | None, name: str, shape, arrays) -> None:
    """Value invariants of an e1tm tensor whose arrays already have the right dtypes and shapes."""
    tp = arrays["T_packed"]  # (rows, nb)
    bad = tp > formats.MAX_PACKED_BYTE
    if bad.any():
        r, c = _first(bad)
        raise site.error(
            f"array 'T_packed' of tensor {name!r}",
            f"holds byte {int(tp[r, c])} at row {r}, column {c}; packed bytes must be 0..{formats.MAX_PACKED_BYTE}",
        )
    rows, cols = formats.tensor_view(shape)
    first_byte = cols // formats.TRITS_PER_BYTE
    if rows and first_byte < tp.shape[1]:
        # Trits past `cols` (group and byte padding) must be 0, i.e. base-3 digit 1.
        tail = tp[:, first_byte:].astype(np.int16)  # (rows, k)
        digits = (tail[:, :, None] // _POW3) % 3  # (rows, k, 5)
        pad = digits.reshape(rows, -1)[:, cols - first_byte * formats.TRITS_PER_BYTE:]
        bad = pad != 1
        if bad.any():
            r, c = _first(bad)
            col = cols + c
            raise site.error(
                f"array 'T_packed' of tensor {name!r}",
                f"holds a nonzero padding trit at row {r}, trit column {col} (byte column "
                f"{col // formats.TRITS_PER_BYTE}); trits past cols={cols} must be 0",
            )
    if header.fused:
        return
    corr = arrays["corr_accum"]  # (rows, n_groups)
    limit = formats.carry_limit(header.rule, header.rule_params, header.gs)
    if limit == 0:  # average: |corr_accum| <= gs*step_counter
        hi = min(header.gs * step, np.iinfo(np.int64).max)
        bad, bound = (corr > hi) | (corr < -hi), f"|corr_accum| <= gs*step_counter = {header.gs}*{step} = {hi}"
    else:  # carry, flip: a full K*gs carries into E, so |corr_accum| < K*gs
        bad, bound = (corr >= limit) | (corr <= -limit), f"|corr_accum| < K*gs = {limit}"
    if bad.any():
        r, g = _first(bad)
        raise site.error(
            f"array 'corr_accum' of tensor {name!r}",
            f"holds {int(corr[r, g])} at row {r}, group {g}; rule {header.rule!r} requires {bound}",
        )
    if "flip_accum" in arrays:
        fa = arrays["flip_accum"]  # (rows, cols_p)
        theta = header.rule_params["theta"]
        bad = (fa > theta) | (fa < -theta)
        if bad.any():
            r, c = _first(bad)
            raise site.error(
                f"array 'flip_accum' of tensor {name!r}",
                f"holds {int(fa[r, c])} at row {r}, column {c}; rule {header.rule!r} requires |flip_accum| <= theta = {theta}",
            )


def _check_float_dtype(site: _Site, subject: str, dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise site.error(subject, f"has dtype {dtype}; float checkpoints hold bool, integer or float arrays")
    return dtype


# -------------------------------------------------------------------------------------------- save


def check_checkpoint(ckpt: Checkpoint, *, where: str = "the checkpoint") -> None:
    """Validate an in-memory checkpoint as ``save_checkpoint`` does; raise ConfigError if it is not valid.

    Parameters
    ----------
    ckpt : Checkpoint
    where : str
        How error messages name the checkpoint.
    """
    _plan(_Site(where, ConfigError, _SAVE_ADVICE), ckpt, ckpt.step_counter)


def _plan(site: _Site, ckpt: Checkpoint, step: int | None):
    """Validate ``ckpt``; return (attrs, [(tensor key, [(array key, array, compress)])], step array, commit)."""
    if not isinstance(ckpt, Checkpoint):
        raise ConfigError(f"expected a Checkpoint, got {type(ckpt).__name__}")
    header = _check_header(
        site, kind=ckpt.kind, format=ckpt.format, gs=ckpt.gs, rule=ckpt.rule,
        rule_params=ckpt.rule_params, fused=ckpt.fused,
    )
    step_counter = _check_step(site, header, ckpt.step_counter)
    if not isinstance(ckpt.tensors, Mapping):
        raise site.error("tensors", f"is a {type(ckpt.tensors).__name__}; expected a dict of TensorState")
    entries, groups, shas, seen = [], [], {}, {}
    for tname, t in ckpt.tensors.items():
        if not isinstance(t, TensorState) or t.name != tname:
            raise site.error(f"tensor {tname!r}", f"is {type(t).__name__} named {getattr(t, 'name', None)!r}; "
                             "expected a TensorState whose name is its key")
        if not tname:
            raise site.error("a tensor", "has an empty name")
        tkey = node_key(tname)
        if tkey.lower() in seen:
            raise site.error(f"tensor {tname!r}", f"has the same directory key as tensor {seen[tkey.lower()]!r} "
                             "on a case-insensitive file system; rename one")
        seen[tkey.lower()] = tname
        if not isinstance(t.arrays, Mapping):
            raise site.error(f"tensor {tname!r}", f"has arrays of type {type(t.arrays).__name__}; expected a dict")
        for aname, a in t.arrays.items():
            if not isinstance(a, np.ndarray):
                raise site.error(f"array {aname!r} of tensor {tname!r}", f"is a {type(a).__name__}; expected a numpy array")
        entry = {"name": tname, "shape": list(t.shape)}
        if header.kind == "e1tm":
            specs = _e1tm_specs(site, header, tname, t.shape)
            for aname in specs:
                if aname not in t.arrays:
                    raise site.error(f"tensor {tname!r}", f"lacks array {aname!r}; expected arrays {list(specs)}")
            for aname, a in t.arrays.items():
                if aname not in specs:
                    raise site.error(f"array {aname!r} of tensor {tname!r}", f"is not part of the format; expected arrays {list(specs)}")
                _check_dtype_shape(site, f"array {aname!r} of tensor {tname!r}", a.dtype, a.shape, *specs[aname], True)
            _check_e1tm_values(site, header, step_counter, tname, t.shape, t.arrays)
            arrays = [(aname, t.arrays[aname], aname not in _UNCOMPRESSED) for aname in specs]
        else:
            if any(d < 0 for d in t.shape):
                raise site.error(f"tensor {tname!r}", f"has shape {t.shape} with a negative dimension")
            arrays, described, akeys = [], {}, set()
            for aname, a in t.arrays.items():
                if not isinstance(aname, str) or not aname or node_key(aname).lower() in akeys:
                    raise site.error(f"array {aname!r} of tensor {tname!r}", "has an empty, non-str or duplicate name")
                akeys.add(node_key(aname).lower())
                dtype = _check_float_dtype(site, f"array {aname!r} of tensor {tname!r}", a.dtype)
                # Store native byte order; the values are unchanged.
                a = a.astype(dtype.newbyteorder("="), copy=False)
                described[aname] = {"dtype": a.dtype.name, "shape": list(a.shape)}
                arrays.append((node_key(aname), a, True))
            entry["arrays"] = described
        entries.append(entry)
        groups.append((tkey, arrays))
        for akey, a, _ in arrays:
            shas[f"{tkey}/{akey}"] = sha256_hex(a)
    float_entries = _plan_float_params(site, header, ckpt.float_params, groups, shas)
    if not isinstance(ckpt.meta, Mapping):
        raise site.error("meta", f"is a {type(ckpt.meta).__name__}; expected a dict")
    step_array = None
    if step_counter is not None:
        step_array = np.array(step_counter, formats.STEP_COUNTER_DTYPE)
        shas[formats.STEP_COUNTER] = sha256_hex(step_array)
    attrs = {
        "arbs_format_version": formats.FORMAT_VERSION,
        "kind": header.kind,
        "format": header.format,
        "gs": header.gs,
        "rule": header.rule,
        "rule_params": dict(header.rule_params),
        "fused": header.fused,
        "tensors": entries,
        "meta": plain_json(ckpt.meta, "meta"),
    }
    if float_entries:  # absent without float parameters: an integer-only checkpoint is unchanged
        attrs[FLOAT_PARAMS_ATTR] = float_entries
    # zarr writes the root zarr.json with indent=2; readers refuse one above ROOT_JSON_MAX_BYTES
    root_json = len(json.dumps({"attributes": attrs}, indent=2)) + 1024
    if root_json > ROOT_JSON_MAX_BYTES:
        raise site.error("the root attributes", f"take about {root_json} bytes of zarr.json; readers accept at most "
                         f"{ROOT_JSON_MAX_BYTES} (store less in meta)")
    commit = {
        "arbs_format_version": formats.FORMAT_VERSION,
        "step": step,
        "attrs_sha256": hashlib.sha256(canonical_json(attrs)).hexdigest(),
        "arrays": shas,
    }
    return attrs, groups, step_array, commit


def _plan_float_params(site: _Site, header: _Header, params, groups: list, shas: dict) -> list[dict]:
    """Validate ``Checkpoint.float_params``; append the ``_float`` group to ``groups`` and its checksums to
    ``shas``; return the ``float_params`` attribute entries (empty: no float parameters)."""
    if not isinstance(params, Mapping):
        raise site.error("float_params", f"is a {type(params).__name__}; expected a dict of numpy arrays")
    if not params:
        return []
    if header.kind != "e1tm":
        raise site.error("float_params", "is given for a float checkpoint, whose tensors hold every array; "
                         "float parameters are the separate part of an E1TM checkpoint")
    entries, arrays, seen = [], [], {}
    for name, a in params.items():
        subj = f"float parameter {name!r}"
        if not isinstance(name, str) or not name:
            raise site.error(subj, "has an empty or non-str name")
        key = node_key(name)
        if key.lower() in seen:
            raise site.error(subj, f"has the same directory key as float parameter {seen[key.lower()]!r} on a "
                             "case-insensitive file system; rename one")
        seen[key.lower()] = name
        if not isinstance(a, np.ndarray):
            raise site.error(subj, f"is a {type(a).__name__}; expected a numpy array")
        if a.dtype.kind != "f" or a.dtype.name not in FLOAT_PARAM_DTYPES:
            raise site.error(subj, f"has dtype {a.dtype}; float parameters are {', '.join(FLOAT_PARAM_DTYPES)} "
                             "(widen bfloat16 to float32: exact)")
        a = a.astype(a.dtype.newbyteorder("="), copy=False)  # native byte order; the values are unchanged
        entries.append({"name": name, "shape": list(a.shape), "dtype": a.dtype.name})
        arrays.append((key, a, True))
        shas[f"{FLOAT_GROUP}/{key}"] = sha256_hex(a)
    groups.append((FLOAT_GROUP, arrays))
    return entries


def _parse_float_params(site: _Site, header: _Header, value) -> list[tuple[str, str, np.dtype, tuple]]:
    """[(name, key, dtype, shape)] from the root attribute ``float_params``."""
    subj = f"attribute {FLOAT_PARAMS_ATTR!r}"
    if header.kind != "e1tm":
        raise site.error(subj, "is present in a float checkpoint; only E1TM checkpoints have a float part")
    if not isinstance(value, list) or not value:
        raise site.error(subj, f"is {str(value)[:100]}; expected a non-empty list (writers omit it when there "
                         "are no float parameters)")
    out, seen = [], set()
    for i, t in enumerate(value):
        what = f"entry {i} of {subj}"
        if not isinstance(t, dict) or set(t) != {"name", "shape", "dtype"}:
            raise site.error(what, f"is {str(t)[:100]}; expected an object with keys ['name', 'shape', 'dtype']")
        name, shape, dtype = t["name"], t["shape"], t["dtype"]
        if not isinstance(name, str) or not name or node_key(name).lower() in seen:
            raise site.error(what, f"has name {name!r}; expected a non-empty, unique str")
        seen.add(node_key(name).lower())
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise site.error(f"float parameter {name!r}", f"has shape {shape!r}; expected a list of ints >= 0")
        if dtype not in FLOAT_PARAM_DTYPES:
            raise site.error(f"float parameter {name!r}", f"has dtype {dtype!r}; expected one of {list(FLOAT_PARAM_DTYPES)}")
        out.append((name, node_key(name), np.dtype(dtype), tuple(int(d) for d in shape)))
    return out


def _chunks(a: np.ndarray) -> tuple[int, ...]:
    """One chunk up to CHUNK_BYTES, else whole rows per chunk."""
    if a.ndim == 0:
        return ()
    row_bytes = max(1, math.prod(a.shape[1:]) * a.itemsize)
    rows = max(1, min(a.shape[0], CHUNK_BYTES // row_bytes))
    return (rows,) + tuple(max(1, d) for d in a.shape[1:])


def _write_array(group, key: str, a: np.ndarray, compress: bool) -> None:
    z = group.create_array(
        key, shape=a.shape, dtype=a.dtype, chunks=_chunks(a),
        compressors=[ZstdCodec(), Crc32cCodec()] if compress else [Crc32cCodec()],
        fill_value=0, config={"write_empty_chunks": True},
    )
    z[...] = a


def _chunk_keys(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[str]:
    """The chunk file keys of an array as ``_write_array`` writes it (default encoding, separator "/")."""
    if not shape:
        yield "c"
        return
    for idx in itertools.product(*(range(-(-s // c)) for s, c in zip(shape, chunks))):
        yield "c/" + "/".join(map(str, idx))


def _first_missing(tmp: Path, groups, step_array) -> str | None:
    """The first file of the temporary tree that should exist and does not (or is no regular file).

    Structural only (lstat of every zarr.json and chunk file); catches a tree another process changed
    while it was written: zarr's LocalStore recreates deleted directories on the next write, so an array
    deleted under the writer would otherwise be committed as missing.
    """
    def expected():
        yield _ZARR_JSON
        for tkey, arrays in groups:
            yield f"{tkey}/{_ZARR_JSON}"
            for akey, a, _ in arrays:
                yield f"{tkey}/{akey}/{_ZARR_JSON}"
                for k in _chunk_keys(a.shape, _chunks(a)):
                    yield f"{tkey}/{akey}/{k}"
        if step_array is not None:
            yield f"{formats.STEP_COUNTER}/{_ZARR_JSON}"
            yield f"{formats.STEP_COUNTER}/c"

    for rel in expected():
        try:
            if not stat.S_ISREG(os.lstat(tmp / rel).st_mode):
                return rel
        except OSError:
            return rel
    return None


def write_checkpoint(path, ckpt: Checkpoint, *, step: int | None = None) -> Path:
    """Atomically write ``ckpt`` as a new checkpoint directory ``path`` (which must not exist).

    ``save_checkpoint`` is the usual entry point; this one writes to an exact path, e.g. to export a
    fused checkpoint. Nothing is ever written into an existing directory.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint directory to create; its parent is created if missing.
    ckpt : Checkpoint
        Validated before anything is written (ConfigError).
    step : int, optional
        The step recorded in COMMIT; defaults to ``ckpt.step_counter`` (must agree with it if both set).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    dest = Path(path)
    site = _Site(f"the checkpoint to be saved as '{dest}'", ConfigError, _SAVE_ADVICE)
    if step is None:
        step = ckpt.step_counter
    elif ckpt.step_counter is not None and step != ckpt.step_counter:
        raise ConfigError(f"step={step} disagrees with step_counter={ckpt.step_counter} of the checkpoint to be saved as '{dest}'")
    if step is not None and (not is_int(step) or step < 0):
        raise ConfigError(f"step={step!r} for '{dest}' must be an integer >= 0")
    attrs, groups, step_array, commit = _plan(site, ckpt, None if step is None else int(step))
    if dest.exists() or dest.is_symlink():
        raise ArbsError(f"'{dest}' already exists; arbs never writes into an existing checkpoint. "
                        "Save under another step or remove it first.")
    parent = dest.parent
    tmp = parent / f"{TMP_PREFIX}{dest.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
    except OSError as e:
        raise ArbsError(f"cannot create '{tmp}' to save a checkpoint: {e}. Nothing was written.") from e
    try:
        root = zarr.open_group(store=LocalStore(str(tmp)), mode="w-", zarr_format=3, attributes=attrs)
        for tkey, arrays in groups:
            g = root.create_group(tkey)
            for akey, a, compress in arrays:
                _write_array(g, akey, a, compress)
        if step_array is not None:
            _write_array(root, formats.STEP_COUNTER, step_array, False)
        durable.fsync_tree(tmp)
        missing = _first_missing(tmp, groups, step_array)
        if missing is not None:
            raise ArbsError(
                f"the temporary checkpoint '{tmp}' was changed by another process while it was being written "
                f"({missing!r} is missing), so nothing was committed as '{dest}'. Only one process may write "
                "into a run directory; save again."
            )
        durable.write_durable(tmp / COMMIT_FILE, json.dumps(commit, indent=1).encode() + b"\n", "xb")
        durable.fsync_dir(tmp)
        if dest.exists() or dest.is_symlink():
            raise ArbsError(f"'{dest}' appeared while it was being saved (another writer?); "
                            "arbs never writes into an existing checkpoint.")
        os.rename(tmp, dest)
        durable.fsync_dir(parent)
    except BaseException as e:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ArbsError(f"could not save checkpoint '{dest}': {e}. Nothing was committed; "
                            "free disk space or fix permissions, then save again.") from e
        raise
    logger.info("committed checkpoint %s", dest)
    return dest


@contextlib.contextmanager
def _translated(site: _Site, subject: str) -> Iterator[None]:
    """Turn any non-arbs exception (zarr, json, numpy, OS) into the site's error naming ``subject``."""
    try:
        yield
    except ArbsError:
        raise
    except Exception as e:
        raise site.error(subject, f"cannot be read ({type(e).__name__}: {str(e)[:300]})") from e


def _read_commit(site: _Site, d: Path) -> dict:
    f = d / COMMIT_FILE
    try:
        raw = durable.read_regular(f, COMMIT_MAX_BYTES, COMMIT_FILE)
    except FileNotFoundError:
        raise StoreNotFoundError(
            f"'{d}' has no {COMMIT_FILE} file, so it is not a committed checkpoint (an interrupted save "
            "leaves such a directory); open the run directory or another step_<N> directory"
        ) from None
    with _translated(site, COMMIT_FILE):
        c = json.loads(raw.decode("utf-8"), parse_constant=reject_json_constant)
    if not isinstance(c, dict):
        raise site.error(COMMIT_FILE, f"holds a JSON {type(c).__name__}; expected an object")
    _check_version(d, COMMIT_FILE, c.get("arbs_format_version"))
    if set(c) != set(_COMMIT_KEYS):
        raise site.error(COMMIT_FILE, f"has keys {sorted(c)}; expected {sorted(_COMMIT_KEYS)}")
    if c["step"] is not None and (not is_int(c["step"]) or c["step"] < 0):
        raise site.error(COMMIT_FILE, f"has step={c['step']!r}; expected null or an integer >= 0")
    if not isinstance(c["arrays"], dict):
        raise site.error(COMMIT_FILE, f"has arrays of type {type(c['arrays']).__name__}; expected an object")
    shas = [c["attrs_sha256"], *c["arrays"].values()]
    if not all(isinstance(s, str) and _SHA256.fullmatch(s) for s in shas):
        raise site.error(COMMIT_FILE, "has a malformed checksum; expected 64 lowercase hex digits per entry")
    n = parse_step_dir(d.name)
    if n is not None and c["step"] is not None and n != c["step"]:
        raise site.error(COMMIT_FILE, f"records step {c['step']}, but the directory is named {d.name!r}")
    return c


def _check_version(d: Path, subject: str, v) -> None:
    if not is_int(v):
        raise CorruptStoreError(f"{subject} in '{d}' has arbs_format_version={v!r}; expected an integer. {OPEN_ADVICE}")
    if v != formats.FORMAT_VERSION:
        todo = ("upgrade arbs to open it" if v > formats.FORMAT_VERSION
                else "this arbs cannot read that version; use the arbs release that wrote it")
        raise FormatVersionError(
            f"'{d}' was written in arbs format version {v}; this arbs reads version {formats.FORMAT_VERSION}: {todo}"
        )


def _entry_kind(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "unreadable"
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return f"not a regular file (mode {stat.filemode(mode)})"


def _scan_tree(site: _Site, d: Path) -> None:
    """Walk the checkpoint before zarr opens anything: every entry must be a regular file or a directory
    (a symlink could point at /dev/zero or outside, a FIFO would block the reader), and no zarr.json may
    exceed its cap (the root's holds the attributes). Iterative, never follows links, keeps nothing."""
    stack = [str(d)]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError as e:
            raise site.error(f"directory '{os.path.relpath(top, d)}'", f"cannot be listed ({e})") from e
        for e in entries:
            rel = os.path.relpath(e.path, d)
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    continue
                regular = e.is_file(follow_symlinks=False)
                size = e.stat(follow_symlinks=False).st_size if regular else 0
            except OSError as exc:
                raise site.error(f"entry '{rel}'", f"cannot be examined ({exc})") from exc
            if not regular:
                raise site.error(f"entry '{rel}'", f"is {_entry_kind(e.path)}; a checkpoint holds only regular files "
                                 "and directories (arbs never follows links or reads special files in one)")
            if e.name == _ZARR_JSON:
                cap = ROOT_JSON_MAX_BYTES if top == str(d) else NODE_JSON_MAX_BYTES
                if size > cap:
                    raise site.error(f"'{rel}'", f"is {size} bytes; arbs writes at most {cap} there, so it is not "
                                     "the file arbs wrote")


def _check_codecs(site: _Site, subject: str, z) -> bool:
    """The codec chain must be exactly what arbs writes: bytes (little-endian) [-> zstd] -> crc32c.
    Returns whether the chunks are zstd-compressed. Any other codec (gzip, blosc, sharding, transpose)
    is refused: its output size would not be checked before decompression."""
    codecs = tuple(z.metadata.codecs)
    names = [type(c).__name__ for c in codecs]
    if not codecs or not isinstance(codecs[-1], Crc32cCodec):
        raise site.error(subject, f"has codecs {names}; expected a chain ending with crc32c")
    if len(codecs) not in (2, 3) or not isinstance(codecs[0], BytesCodec) \
            or (len(codecs) == 3 and not isinstance(codecs[1], ZstdCodec)):
        raise site.error(subject, f"has codecs {names}; expected BytesCodec, [ZstdCodec,] Crc32cCodec")
    endian = codecs[0].endian
    if endian is not None and getattr(endian, "value", endian) != "little":
        raise site.error(subject, f"stores {getattr(endian, 'value', endian)}-endian bytes; the format stores little-endian")
    return len(codecs) == 3


def _count_chunk_files(adir: str) -> int:
    """Regular files under an array directory other than its zarr.json (bounded by what is on disk)."""
    n, stack = 0, [adir]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.name != _ZARR_JSON or os.path.dirname(e.path) != adir:
                    n += 1
    return n


def _check_chunk_file(site: _Site, subject: str, path: Path, key: str, nbytes: int, compressed: bool) -> None:
    """One chunk file, before zarr reads it: a regular file (opened without following links, without
    blocking) whose size is possible for ``nbytes`` of chunk, and for zstd a frame header that declares
    exactly ``nbytes``, so decompression can never produce (or allocate) more."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise site.error(subject, f"lacks chunk file {key!r}; a missing chunk would read as the fill value") from None
    except OSError as e:
        raise site.error(subject, f"has chunk file {key!r} that cannot be opened ({e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise site.error(subject, f"has chunk file {key!r} that is {_entry_kind(str(path))}; expected a regular file")
        size = st.st_size
        if not compressed:
            if size != nbytes + 4:
                raise site.error(subject, f"has chunk file {key!r} of {size} bytes; an uncompressed chunk of {nbytes} "
                                 f"bytes plus its crc32c is {nbytes + 4}")
            return
        least, most = zstd_size_bounds(nbytes)
        if not least + 4 <= size <= most + 4:
            raise site.error(subject, f"has chunk file {key!r} of {size} bytes; a zstd chunk of {nbytes} bytes plus "
                             f"its crc32c takes {least + 4}..{most + 4}")
        head = os.read(fd, ZSTD_MAX_HEADER)
    except OSError as e:
        raise site.error(subject, f"has chunk file {key!r} that cannot be read ({e})") from e
    finally:
        os.close(fd)
    try:
        h = zstd_frame_header(head)
    except ValueError as e:
        raise site.error(subject, f"has chunk file {key!r} that is not a zstd frame arbs can read: it {e}") from None
    if h.content_size is None:
        raise site.error(subject, f"has chunk file {key!r} whose zstd frame does not declare its decompressed size; "
                         "refusing to decompress it (it could inflate without bound)")
    if h.content_size != nbytes:
        raise site.error(subject, f"has chunk file {key!r} whose zstd frame declares {h.content_size} decompressed bytes; "
                         f"the chunk is {nbytes} bytes, so it is refused before decompression")
    if h.dictionary_id:
        raise site.error(subject, f"has chunk file {key!r} compressed with zstd dictionary {h.dictionary_id}; arbs uses none")


def _check_chunks(site: _Site, d: Path, rel: str, subject: str, z, compressed: bool) -> None:
    """Chunk grid and chunk files of array ``rel`` (path inside the checkpoint ``d``): regular chunks no
    larger than the array, every chunk file present and plausible (``_check_chunk_file``). The files are
    counted first, so a hostile grid of many tiny chunks costs no more than the files on disk."""
    meta = z.metadata
    cshape = tuple(getattr(meta.chunk_grid, "chunk_shape", None) or ())
    if type(meta.chunk_grid).__name__ != "RegularChunkGrid" or len(cshape) != z.ndim \
            or any(not 1 <= c <= max(1, n) for c, n in zip(cshape, z.shape)):
        raise site.error(subject, f"has chunk grid {meta.chunk_grid}; expected regular chunks no larger than its shape {z.shape}")
    nbytes = math.prod(cshape) * z.dtype.itemsize
    counts = [-(-n // c) for n, c in zip(z.shape, cshape)]
    want = math.prod(counts)
    adir = str(d / rel)
    have = _count_chunk_files(adir) if want else 0
    if have < want:
        raise site.error(subject, f"has {have} of {want} chunk files on disk; a missing chunk would read as the fill value")
    for idx in itertools.product(*map(range, counts)):
        key = meta.encode_chunk_key(idx)
        _check_chunk_file(site, subject, Path(adir) / key, key, nbytes, compressed)


def _child_dirs(path: Path) -> set[str]:
    return {e.name for e in os.scandir(path) if e.is_dir()}


def _describe(path: Path) -> tuple[str, bool]:
    """(description, is_float) of an unexpected entry, for error messages."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
        if meta.get("node_type") == "array":
            dt = str(meta.get("data_type"))
            return f"array of dtype {dt}", dt.startswith(("float", "complex", "bfloat"))
        return "group", False
    except Exception:  # only used to word an error that is raised anyway
        return "directory without zarr metadata", False


def _check_children(site: _Site, path: Path, expected: Mapping[str, str], owner: str, e1tm: bool) -> None:
    """``path``'s subdirectories must be exactly ``expected`` (key -> description)."""
    with _translated(site, owner):
        have = _child_dirs(path)
    for key, what in expected.items():
        if key not in have:
            raise site.error(what, f"is missing (no directory {key!r} in {owner})")
    for key in sorted(have - set(expected)):
        desc, is_float = _describe(path / key)
        if e1tm and is_float:
            raise site.error(f"{owner}", f"holds an unexpected float {desc} {key!r}; E1TM checkpoints hold no float "
                             f"arrays outside {FLOAT_GROUP!r} (a model's float parameters, listed in attribute "
                             f"{FLOAT_PARAMS_ATTR!r})")
        raise site.error(owner, f"holds an unexpected {desc} {key!r}; expected only {sorted(expected) or 'nothing'}")


def _read_array(site: _Site, d: Path, group, key: str, rel: str, subject: str, dtype: np.dtype, shape, e1tm: bool,
                want_sha: str | None) -> np.ndarray:
    """Array ``key`` of zarr ``group`` (``rel``: its path inside checkpoint ``d``), checked before any chunk
    is read: dtype, shape, codec chain, chunk grid and chunk files (sizes, zstd frame headers)."""
    with _translated(site, subject):
        z = group[key]
        if not isinstance(z, zarr.Array):
            raise site.error(subject, "is a group; expected an array")
        _check_dtype_shape(site, subject, z.dtype, z.shape, dtype, shape, e1tm)
        compressed = _check_codecs(site, subject, z)
        _check_chunks(site, d, rel, subject, z, compressed)
        data = np.asarray(z[()] if z.ndim == 0 else z[...])
    _check_dtype_shape(site, subject, data.dtype, data.shape, dtype, shape, e1tm)
    if want_sha is not None and sha256_hex(data) != want_sha:
        raise site.error(subject, "does not match its sha256 in COMMIT (changed after it was committed)")
    return data


def _parse_tensors(site: _Site, header: _Header, tensors) -> list[tuple[str, tuple, dict]]:
    """[(name, shape, {array name: (dtype, shape)})] from the ``tensors`` attribute."""
    if not isinstance(tensors, list):
        raise site.error("attribute 'tensors'", f"is a {type(tensors).__name__}; expected a list")
    keys = ("name", "shape") if header.kind == "e1tm" else ("name", "shape", "arrays")
    out, seen = [], set()
    for i, t in enumerate(tensors):
        subj = f"entry {i} of attribute 'tensors'"
        if not isinstance(t, dict) or set(t) != set(keys):
            raise site.error(subj, f"is {str(t)[:100]}; expected an object with keys {list(keys)}")
        name, shape = t["name"], t["shape"]
        if not isinstance(name, str) or not name or node_key(name).lower() in seen:
            raise site.error(subj, f"has name {name!r}; expected a non-empty, unique str")
        seen.add(node_key(name).lower())
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise site.error(f"tensor {name!r}", f"has shape {shape!r}; expected a list of ints >= 0")
        if header.kind == "e1tm":
            specs = _e1tm_specs(site, header, name, shape)
        else:
            specs = {}
            arrays = t["arrays"]
            if not isinstance(arrays, dict):
                raise site.error(f"tensor {name!r}", f"has arrays {arrays!r}; expected an object")
            for aname, s in arrays.items():
                subj = f"array {aname!r} of tensor {name!r}"
                if not aname or not isinstance(s, dict) or set(s) != {"dtype", "shape"} or not isinstance(s["shape"], list) \
                        or not all(is_int(d) and d >= 0 for d in s["shape"]):
                    raise site.error(subj, f"is described as {str(s)[:100]}; expected {{dtype, shape}}")
                with _translated(site, subj):
                    dtype = np.dtype(s["dtype"])
                specs[aname] = (_check_float_dtype(site, subj, dtype), tuple(s["shape"]))
        out.append((name, tuple(shape), specs))
    return out


def read_checkpoint(d: Path, *, verify: bool = True, kind: str | None = None) -> Checkpoint:
    """Read and validate the checkpoint directory ``d``, reading every array fully into memory.

    ``arbs.store.open_checkpoint`` is the usual entry point (it also accepts a run directory).

    Parameters
    ----------
    d : pathlib.Path
        A committed checkpoint directory (``step_<N>`` or any directory holding COMMIT).
    verify : bool
        Compare the sha256 of every array and of the root attributes with COMMIT. Structural and value
        checks (dtypes, shapes, packed bytes, bounds) always run.
    kind : {"e1tm", "float"}, optional
        The kind the caller needs; a checkpoint of the other kind raises ConfigError before any array
        is read. None accepts both.

    Returns
    -------
    Checkpoint
        With ``path`` set to the checkpoint directory.

    Raises
    ------
    StoreNotFoundError
        Missing path, no COMMIT, or a dangling LATEST.
    FormatVersionError
        Written by a format version this arbs does not read.
    ConfigError
        The checkpoint is not of the ``kind`` asked for.
    CorruptStoreError
        Anything else: the message names the path, the tensor and array, expected vs got.
    """
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"kind={kind!r}; expected one of {', '.join(KINDS)} or None.{formats.did_you_mean(str(kind), KINDS)}")
    site = _open_site(d)
    commit = _read_commit(site, d)
    _scan_tree(site, d)
    with _translated(site, "the root group"):
        root = zarr.open_group(store=LocalStore(str(d), read_only=True), mode="r", zarr_format=3, use_consolidated=False)
        attrs = root.attrs.asdict()
    _check_version(d, "the root attributes", attrs.get("arbs_format_version"))
    if set(attrs) - {FLOAT_PARAMS_ATTR} != set(_ATTR_KEYS):
        raise site.error("the root attributes", f"have keys {sorted(attrs)}; expected {sorted(_ATTR_KEYS)} "
                         f"(and {FLOAT_PARAMS_ATTR!r} in an E1TM checkpoint with float parameters)")
    if verify:
        with _translated(site, "the root attributes"):
            sha = hashlib.sha256(canonical_json(attrs)).hexdigest()
        if sha != commit["attrs_sha256"]:
            raise site.error("the root attributes", "do not match attrs_sha256 in COMMIT (edited after commit)")
    header = _check_header(
        site, kind=attrs["kind"], format=attrs["format"], gs=attrs["gs"], rule=attrs["rule"],
        rule_params=attrs["rule_params"], fused=attrs["fused"],
    )
    if kind is not None and header.kind != kind:
        what = {"e1tm": "an E1TM checkpoint", "float": "a float (baseline) checkpoint"}
        raise ConfigError(f"'{d}' is {what[header.kind]}, but {what[kind]} is required here; "
                          f"pass the path of {what[kind].split(' (')[0]}")
    if not isinstance(attrs["meta"], dict):
        raise site.error("attribute 'meta'", f"is a {type(attrs['meta']).__name__}; expected an object")
    tensors = _parse_tensors(site, header, attrs["tensors"])
    float_specs = _parse_float_params(site, header, attrs[FLOAT_PARAMS_ATTR]) if FLOAT_PARAMS_ATTR in attrs else []
    e1tm = header.kind == "e1tm"
    shas = commit["arrays"]

    def want(key):
        if key not in shas:
            raise site.error(f"array '{key}'", "has no checksum in COMMIT")
        return shas[key] if verify else None

    expected_root = {node_key(name): f"tensor {name!r}" for name, _, _ in tensors}
    if not header.fused:
        expected_root[formats.STEP_COUNTER] = "array 'step_counter'"
    if float_specs:
        expected_root[FLOAT_GROUP] = f"the float parameters group {FLOAT_GROUP!r}"
    _check_children(site, d, expected_root, "the checkpoint root", e1tm)
    step = None
    if not header.fused:
        s = _read_array(site, d, root, formats.STEP_COUNTER, formats.STEP_COUNTER, "array 'step_counter'",
                        formats.STEP_COUNTER_DTYPE, (), e1tm, want(formats.STEP_COUNTER))
        step = _check_step(site, header, int(s))
        if commit["step"] is None:  # null is what a fused checkpoint written without a step records
            raise site.error(COMMIT_FILE, f"records step null, but the checkpoint has step_counter {step}; "
                             "COMMIT's step must equal it")
        if commit["step"] != step:
            raise site.error("array 'step_counter'", f"holds {step}, but COMMIT records step {commit['step']}")
    read_keys = {formats.STEP_COUNTER} if step is not None else set()
    out: dict[str, TensorState] = {}
    for name, shape, specs in tensors:
        tkey = node_key(name)
        akeys = {a: node_key(a) for a in specs}
        _check_children(site, d / tkey, {k: f"array {a!r} of tensor {name!r}" for a, k in akeys.items()},
                        f"tensor {name!r}", e1tm)
        with _translated(site, f"tensor {name!r}"):
            group = root[tkey]
        arrays = {}
        for aname, (dtype, ashape) in specs.items():
            key = f"{tkey}/{akeys[aname]}"
            arrays[aname] = _read_array(site, d, group, akeys[aname], key, f"array {aname!r} of tensor {name!r}",
                                        dtype, ashape, e1tm, want(key))
            read_keys.add(key)
        if e1tm:
            _check_e1tm_values(site, header, step, name, shape, arrays)
        out[name] = TensorState(name=name, shape=shape, arrays=arrays)
    float_params: dict[str, np.ndarray] = {}
    if float_specs:
        owner = f"the float parameters group {FLOAT_GROUP!r}"
        _check_children(site, d / FLOAT_GROUP, {k: f"float parameter {n!r}" for n, k, _, _ in float_specs}, owner,
                        False)
        with _translated(site, owner):
            group = root[FLOAT_GROUP]
            if not isinstance(group, zarr.Group):
                raise site.error(owner, "is an array; expected a group")
        for name, key, dtype, shape in float_specs:
            rel = f"{FLOAT_GROUP}/{key}"
            float_params[name] = _read_array(site, d, group, key, rel, f"float parameter {name!r}", dtype, shape,
                                             False, want(rel))
            read_keys.add(rel)
    extra = sorted(set(shas) - read_keys)
    if extra:
        raise site.error(COMMIT_FILE, f"lists arrays that are not in the checkpoint: {extra[:5]}")
    logger.debug("opened checkpoint %s", d)
    return Checkpoint(
        kind=header.kind, format=header.format, gs=header.gs, rule=header.rule,
        rule_params=dict(header.rule_params), fused=header.fused, step_counter=step,
        tensors=out, meta=attrs["meta"], path=d, float_params=float_params,
    )


# ------------------------------------------------------------------------------------------- sizes


def array_nbytes(obj: Checkpoint | TensorState, names=None) -> int:
    """Raw (uncompressed) bytes of the arrays of a checkpoint or of one tensor: the one measure of
    bits per weight (``arbs inspect``, ``arbs compare``).

    ``names``: count only these arrays (e.g. ``formats.INFERENCE_ARRAYS``); None counts every array
    and, for a checkpoint, its step_counter. A checkpoint's float parameters are not counted here: they
    are not E1TM state (:func:`float_nbytes`).
    """
    if isinstance(obj, TensorState):
        return sum(a.nbytes for k, a in obj.arrays.items() if names is None or k in names)
    total = sum(array_nbytes(t, names) for t in obj.tensors.values())
    return total + (formats.STEP_COUNTER_DTYPE.itemsize if obj.step_counter is not None and names is None else 0)



def float_nbytes(ckpt: Checkpoint) -> int:
    """Raw bytes of a checkpoint's float parameters (``Checkpoint.float_params``; 0 when integer-only)."""
    return sum(int(a.nbytes) for a in ckpt.float_params.values())
