"""Fuse a training checkpoint into an inference checkpoint, and materialize float weights of either.

Two export options:

* **B (default), fused**: per tensor only ``T_packed`` and ``E_fused = clip(rint(E + Xi), -128, 127)``
  (``ops.fuse``), so ``S = 2**E`` exactly. No ``corr_accum``/``flip_accum``, no ``step_counter``, rule
  None; ``meta`` keeps the source meta (model config) plus ``fused_from`` = {format, rule, rule_params,
  step_counter}. Inference bits/weight: 8/5 + 8/gs.
* **A (``keep_accum=True``)**: the training state exported unchanged (a copy marked with
  ``meta["export"] = "keep-accum"``; still a training checkpoint), for inference with the continuous
  scale ``S = 2**(E + Xi)``.

The input checkpoint is never modified.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import formats
from . import ops, store
from .errors import ConfigError

log = logging.getLogger(__name__)

FUSED_SUFFIX = "-fused"
KEEP_ACCUM_SUFFIX = "-keep-accum"


@dataclass(frozen=True)
class TensorFuse:
    name: str
    shape: tuple[int, ...]
    groups: int
    changed: int  # groups whose fused E differs from E
    clipped: int  # groups whose rint(E + Xi) left [-128, 127] and were clipped
    grid_rel_l2: float | None = None  # --grid: ||W_grid - W_fused|| / ||W_fused|| (the grid's cost)


@dataclass(frozen=True)
class FuseReport:
    """What fusing did: per tensor counts; ``source``/``path`` once read from / written to disk.

    For ``mode == "keep-accum"`` the counts say what a fuse *would* change; nothing was changed.
    """

    mode: str  # "fused" (option B) or "keep-accum" (option A)
    format: str
    rule: str
    step_counter: int
    tensors: tuple[TensorFuse, ...]
    source: str | None = None
    path: str | None = None
    grid: int | None = None  # weights per shared E along a row when fused onto a coarser grid

    @property
    def groups(self) -> int:
        return sum(t.groups for t in self.tensors)

    @property
    def changed(self) -> int:
        return sum(t.changed for t in self.tensors)

    @property
    def clipped(self) -> int:
        return sum(t.clipped for t in self.tensors)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensors"] = [dict(t, shape=list(t["shape"])) for t in d["tensors"]]
        d.update(groups=self.groups, changed=self.changed, clipped=self.clipped)
        return d


def _require_training(ckpt, action: str) -> formats.Scheme:
    where = f" '{ckpt.path}'" if getattr(ckpt, "path", None) else ""
    if ckpt.kind != "e1tm":
        raise ConfigError(
            f"checkpoint{where} is a {ckpt.kind!r} checkpoint; only E1TM checkpoints can be {action}. "
            "Make one with 'arbs train --format E1TM32 --init <float run>' or 'arbs convert <weights file>'"
        )
    if ckpt.fused:
        src = ckpt.meta.get("fused_from", {}) if isinstance(ckpt.meta, dict) else {}
        frm = f" (from {src.get('format')} rule {src.get('rule')!r} at step {src.get('step_counter')})" if src else ""
        raise ConfigError(
            f"checkpoint{where} is already fused{frm}; it holds only T_packed and E, there is nothing to fuse "
            "(fuse the training checkpoint it came from)"
        )
    return formats.make_scheme(ckpt.format, ckpt.rule, **(ckpt.rule_params or {}))


def fuse_checkpoint(ckpt, *, keep_accum: bool = False, grid: int | None = None):
    """Fuse a training checkpoint in memory.

    Parameters
    ----------
    ckpt : store.Checkpoint of kind "e1tm", not fused (with ``grid``, a fused one is accepted too: its E
        are moved onto the grid).
    keep_accum : export option A (training state copied unchanged, ``meta["export"] = "keep-accum"``)
        instead of option B (fused ``T_packed`` + ``E`` only).
    grid : fuse onto a coarser scale grid: every ``grid`` consecutive weights of a row share one E
        (``ops.fuse_to_grid``; 256 is the block of llama.cpp's TQ1_0/TQ2_0, which then hold the model
        exactly). ``meta["fused_from"]["grid"]`` records it. Not with ``keep_accum``.

    Returns
    -------
    (Checkpoint, FuseReport); the new Checkpoint has ``path=None``. The input and its arrays are not
    modified and share no arrays with the output.

    Raises
    ------
    ConfigError if ``ckpt`` is already fused or is not an E1TM checkpoint.
    """
    if grid is not None and keep_accum:
        raise ConfigError("--grid fuses the scales; it cannot be combined with --keep-accum (which keeps them)")
    if grid is not None and ckpt.kind == "e1tm" and ckpt.fused:
        return _regrid(ckpt, grid)
    scheme = _require_training(ckpt, "fused")
    if grid is not None:
        formats.grid_groups(scheme.gs, grid)  # ConfigError before any work when the grid does not tile the groups
    step = int(ckpt.step_counter)
    reports = []
    tensors = {}
    for name, ts in ckpt.tensors.items():
        shape = tuple(ts.shape)
        E_fused, st = ops.fuse(ts.arrays, shape, scheme, step)
        rel = None
        if grid is not None:
            E_fused, gst = ops.fuse_to_grid(ts.arrays, shape, scheme, step, block=grid)
            st = ops.FuseStats(st.groups, gst.clipped, st.changed)
            rel = gst.rel_l2
        # count real moves: a tie |Xi| = 1/2 rounds half to even, and a clipped group may stay put
        changed = int(np.count_nonzero(E_fused != ts.arrays["E"]))
        reports.append(TensorFuse(name, shape, st.groups, changed, st.clipped, rel))
        if st.clipped:
            log.warning("%s: %d group(s) clipped to the int8 range of E while fusing", name, st.clipped)
        if keep_accum:
            arrays = {k: np.array(v, copy=True) for k, v in ts.arrays.items()}
        else:
            arrays = {"T_packed": np.array(ts.arrays["T_packed"], copy=True), "E": E_fused}
        tensors[name] = store.TensorState(name=name, shape=shape, arrays=arrays)
    meta = copy.deepcopy(dict(ckpt.meta or {}))
    if keep_accum:
        meta["export"] = "keep-accum"
        out = replace(ckpt, tensors=tensors, meta=meta, path=None)
        mode = "keep-accum"
    else:
        meta["fused_from"] = {
            "format": ckpt.format,
            "rule": ckpt.rule,
            "rule_params": dict(ckpt.rule_params or {}),
            "step_counter": step,
        }
        if grid is not None:
            meta["fused_from"]["grid"] = grid
        out = replace(ckpt, fused=True, rule=None, rule_params={}, step_counter=None, tensors=tensors, meta=meta, path=None)
        mode = "fused"
    report = FuseReport(mode, ckpt.format, ckpt.rule, step, tuple(reports), grid=grid)
    log.info("%s %d tensors: %d of %d groups changed E, %d clipped", mode, len(reports), report.changed, report.groups, report.clipped)
    return out, report


def _regrid(ckpt, grid: int):
    """A fused checkpoint with its E moved onto the ``grid`` (ops.fuse_to_grid with Xi = 0)."""
    formats.grid_groups(ckpt.gs, grid)
    src = ckpt.meta.get("fused_from", {}) if isinstance(ckpt.meta, dict) else {}
    reports, tensors = [], {}
    for name, ts in ckpt.tensors.items():
        shape = tuple(ts.shape)
        E_grid, gst = ops.fuse_to_grid(ts.arrays, shape, None, None, gs=ckpt.gs, block=grid)
        changed = int(np.count_nonzero(E_grid != ts.arrays["E"]))
        reports.append(TensorFuse(name, shape, gst.groups, changed, gst.clipped, gst.rel_l2))
        tensors[name] = store.TensorState(name=name, shape=shape,
                                          arrays={"T_packed": np.array(ts.arrays["T_packed"], copy=True), "E": E_grid})
    meta = copy.deepcopy(dict(ckpt.meta or {}))
    meta.setdefault("fused_from", {})["grid"] = grid
    out = replace(ckpt, tensors=tensors, meta=meta, path=None)
    report = FuseReport("fused", ckpt.format, src.get("rule"), int(src.get("step_counter") or 0), tuple(reports),
                        grid=grid)
    return out, report


def _source_root(src: Path, ckpt_dir: Path) -> Path:
    """The directory a default output is named after: the run dir holding the checkpoint.

    ``src`` as given (a run dir, or a step_<N> dir inside one); a checkpoint directory written on its
    own (``store.write_checkpoint``) stands for itself.
    """
    if ckpt_dir != src:  # src was a run dir, resolved through LATEST
        return src
    parent = ckpt_dir.parent
    if store.parse_step_dir(ckpt_dir.name) is not None and (
        (parent / store.LATEST_FILE).exists() or ckpt_dir in store.list_checkpoints(parent)
    ):
        return parent
    return ckpt_dir


def _is_run_dir(d: Path) -> bool:
    return (d / store.LATEST_FILE).is_file() or bool(store.list_checkpoints(d))


def default_out(src_run_dir: Path, keep_accum: bool = False) -> Path:
    """``<run dir>-fused`` (or ``-keep-accum``) next to the source run dir."""
    suffix = KEEP_ACCUM_SUFFIX if keep_accum else FUSED_SUFFIX
    return src_run_dir.with_name(src_run_dir.name + suffix)


def fuse_path(
    src: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    keep_accum: bool = False,
    keep: int | None = None,
    grid: int | None = None,
) -> FuseReport:
    """Open the checkpoint at ``src`` (run dir -> LATEST, or a step_<N> dir), fuse it, save it to ``out``.

    ``out`` is a run dir; default ``<source run dir>-fused`` (``-keep-accum`` for option A), a sibling
    of the source run dir. It may be new or empty, or an existing run dir: the checkpoint is added to
    it as a new step dir (LATEST names the run's newest step). The new checkpoint is saved as ``step_<N>`` with N the
    source's step_counter (a fused checkpoint has no step_counter of its own; N says what it was fused
    from), so fusing the same step twice into one run dir fails: step dirs are never overwritten. Any
    other non-empty directory, a file, and the source's own run dir are refused (ConfigError). The
    input is never modified. ``keep`` is passed to ``store.save_checkpoint``; ``grid`` to
    :func:`fuse_checkpoint`.
    """
    src_p = Path(src)
    ckpt = store.open_checkpoint(src_p)
    ckpt_dir = Path(ckpt.path)
    root = _source_root(src_p, ckpt_dir)
    out_dir = default_out(root, keep_accum) if out is None else Path(out)
    _check_out(out_dir, root, ckpt_dir)
    new, report = fuse_checkpoint(ckpt, keep_accum=keep_accum, grid=grid)
    with store.run_lock(out_dir):  # one writer per run dir: a second fuse into out_dir gets RunLockedError
        path = store.save_checkpoint(out_dir, new, keep=keep, step=report.step_counter)
    log.info("wrote %s checkpoint to %s", report.mode, path)
    return replace(report, source=os.fspath(ckpt_dir), path=os.fspath(path))


def _check_out(out_dir: Path, src_root: Path, ckpt_dir: Path) -> None:
    o, ck = out_dir.resolve(), ckpt_dir.resolve()
    if o in (src_root.resolve(), ck) or o in ck.parents or ck in o.parents:
        raise ConfigError(
            f"output '{out_dir}' is, contains or lies inside the source checkpoint '{ckpt_dir}'; fuse never "
            f"modifies its input. Choose another --out (default: '{default_out(src_root)}')"
        )
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"output '{out_dir}' exists and is not a directory; choose another --out")
        if any(not store.is_bookkeeping(p.name) for p in out_dir.iterdir()) and not _is_run_dir(out_dir):
            raise ConfigError(
                f"output '{out_dir}' is a non-empty directory that is not an arbs run dir; refusing to write "
                "into it. Choose a new or empty directory, or an existing run dir"
            )


def checkpoint_weights(ckpt) -> dict[str, np.ndarray]:
    """Float32 ``W_eff`` of every tensor, in its logical shape.

    Fused checkpoint: ``S = 2**E`` (``ops.materialize_fused``). Training checkpoint (including a
    keep-accum export): ``S = 2**(E + Xi)`` at its step_counter (``ops.materialize``).
    """
    if ckpt.kind != "e1tm":
        raise ConfigError(f"checkpoint is a {ckpt.kind!r} checkpoint; checkpoint_weights needs an E1TM checkpoint")
    out: dict[str, np.ndarray] = {}
    if ckpt.fused:
        gs = formats.variant_gs(ckpt.format)
        for name, ts in ckpt.tensors.items():
            out[name] = ops.materialize_fused(ts.arrays["T_packed"], ts.arrays["E"], tuple(ts.shape), gs)
        return out
    scheme = formats.make_scheme(ckpt.format, ckpt.rule, **(ckpt.rule_params or {}))
    for name, ts in ckpt.tensors.items():
        out[name] = ops.materialize(ts.arrays, tuple(ts.shape), scheme, int(ckpt.step_counter))
    return out
