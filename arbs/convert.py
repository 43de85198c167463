"""Convert a float checkpoint (safetensors or a torch state dict) into an E1TM training checkpoint.

Three steps, each usable alone::

    tensors = load_float_state("model.safetensors")          # name -> float ndarray
    ckpt, report = convert_state_dict(tensors, format="E1TM32", rule="carry")
    save_checkpoint("runs/a", ckpt)                            # arbs.store

or all at once: ``convert_file("model.safetensors", "runs/a", format="E1TM32")``. A local Hugging Face
causal-LM directory converts whole, its norms folded first: ``convert_hf_dir("llama-dir", "runs/b")``
(arbs.models.hf; its biases are kept in the checkpoint's float part, its config and tokenizer in meta).

The E1TM checkpoint is integer only. A float tensor that is not converted (excluded by a pattern,
0-d, or not floating point) is NOT stored in it; the report lists every skipped tensor with the reason,
so a model that needs it (a LayerNorm gain, a bias) must get it from elsewhere (its config / init).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import formats
from . import ops, store
from .errors import ConfigError, CorruptStoreError, StoreNotFoundError

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model")  # a torch file holding {"state_dict": {...}} is unwrapped once

AVERAGE_NOTE = (
    "rule 'average' cannot hold the fractional part of log2(scale) at step 0 "
    "(Xi = 4*corr_accum/(step*gs) with corr_accum = 0), so each group's scale is rounded to a power "
    "of two and the reported error is that of the integer E alone; carry/flip keep the fraction in corr_accum"
)


# --------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class SkippedTensor:
    """A tensor that was not converted, and why (it is not stored in the E1TM checkpoint)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    reason: str



def _torch_to_numpy(t) -> np.ndarray:
    """A floating torch tensor as a numpy array: sparse layouts made dense; bf16, fp16 and the float8
    types widened to float32 (exact; numpy has none of them); float32/float64 as they are."""
    import torch

    t = t.detach().cpu()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.contiguous().numpy()


def _is_float_tensor(t) -> bool:
    return bool(getattr(t, "is_floating_point", lambda: False)())


def _read_float_state(path) -> tuple[dict[str, np.ndarray], list[SkippedTensor]]:
    """(floating tensors as numpy, the entries dropped) read from a float checkpoint file."""
    p = Path(path)
    if not p.exists():
        raise StoreNotFoundError(f"float checkpoint '{p}' does not exist")
    if p.is_dir():
        raise ConfigError(
            f"'{p}' is a directory; expected a float checkpoint file "
            f"({', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)})"
        )
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        raw = _read_safetensors(p)
    elif suffix in TORCH_SUFFIXES:
        raw = _read_torch(p)
    else:
        raise ConfigError(
            f"cannot tell the format of '{p}' from its extension {suffix or '(none)'!r}; expected "
            f"{', '.join(SAFETENSORS_SUFFIXES)} (safetensors) or {', '.join(TORCH_SUFFIXES)} (torch state dict)"
        )
    out: dict[str, np.ndarray] = {}
    dropped: list[SkippedTensor] = []
    for name, t in raw.items():
        if _is_float_tensor(t) and getattr(t, "is_meta", False):
            dt = str(t.dtype).removeprefix("torch.")
            dropped.append(SkippedTensor(name, tuple(int(d) for d in t.shape), dt, "a meta tensor (it holds no data)"))
        elif _is_float_tensor(t):
            out[name] = _torch_to_numpy(t)
        elif hasattr(t, "dtype") and hasattr(t, "shape"):
            dt = str(t.dtype).removeprefix("torch.")
            dropped.append(SkippedTensor(name, tuple(int(d) for d in t.shape), dt, f"not floating point ({dt})"))
        else:
            dropped.append(SkippedTensor(name, (), type(t).__name__, f"not a tensor ({type(t).__name__})"))
    if dropped:
        log.info("%s: %d non-floating entries not loaded: %s", p, len(dropped), ", ".join(s.name for s in dropped))
    return out, dropped


def _read_safetensors(p: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(p), device="cpu"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptStoreError(f"cannot read safetensors file '{p}': {e}") from e


def _read_torch(p: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as e:
        raise CorruptStoreError(
            f"cannot read torch file '{p}' as a state dict (loaded with weights_only=True): {e}. "
            "Save the weights with torch.save(model.state_dict(), path) or as .safetensors"
        ) from e
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                log.info("%s: using the state dict under key %r", p, key)
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CorruptStoreError(
            f"torch file '{p}' holds a {type(obj).__name__}, not a state dict (a mapping of name -> tensor)"
        )
    return {str(k): v for k, v in obj.items()}


def load_float_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the floating-point tensors of a ``.safetensors`` file or a torch state dict file.

    Parameters
    ----------
    path : a ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin``/``.ckpt`` file written by
        ``torch.save`` (read with ``weights_only=True``; a top-level ``{"state_dict": ...}`` or
        ``{"model": ...}`` wrapper is unwrapped).

    Returns
    -------
    dict name -> numpy array: float16/bfloat16 widened to float32, float32/float64 kept; non-floating
    entries are dropped (logged at INFO).

    Raises
    ------
    StoreNotFoundError if the file is missing; ConfigError for an unknown extension or a directory;
    CorruptStoreError if the file cannot be read.
    """
    return _read_float_state(path)[0]


# ------------------------------------------------------------------------------------------ converting


@dataclass(frozen=True)
class TensorReport:
    """What conversion did to one tensor."""

    name: str
    shape: tuple[int, ...]
    rel_l2: float  # ||W_eff - w|| / ||w|| at step 0
    groups: int
    zero_groups: int  # groups whose weights were all zero (T = 0, E = 0)
    clipped: int  # groups whose log2 scale left the int8 range of E


@dataclass(frozen=True)
class ConvertReport:
    """Result of a conversion: per tensor errors, the tensors left out, and where it was saved."""

    format: str
    gs: int
    rule: str
    rule_params: dict
    tensors: tuple[TensorReport, ...]
    skipped: tuple[SkippedTensor, ...]
    notes: tuple[str, ...] = ()
    source: str | None = None
    path: str | None = None  # the committed checkpoint (step dir), once saved

    @property
    def weights(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def rel_l2(self) -> float:
        """Weight-count-weighted RMS of the per-tensor relative errors (a single summary figure)."""
        n = self.weights
        if n == 0:
            return 0.0
        return float(np.sqrt(sum(t.rel_l2**2 * np.prod(t.shape) for t in self.tensors) / n))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensors"] = [dict(t, shape=list(t["shape"])) for t in d["tensors"]]
        d["skipped"] = [dict(s, shape=list(s["shape"])) for s in d["skipped"]]
        d["notes"] = list(self.notes)
        d["weights"] = self.weights
        d["rel_l2"] = self.rel_l2
        return d


def _as_array(t) -> np.ndarray:
    if hasattr(t, "detach") and hasattr(t, "is_floating_point"):  # torch.Tensor, without importing torch
        return _torch_to_numpy(t)
    return np.asarray(t)


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat):
            return pat
    return None


def _check_patterns(patterns, what: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        raise ConfigError(f"{what} must be a list of patterns, got the single string {patterns!r}")
    out = tuple(patterns)
    for p in out:
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{what} pattern {p!r} must be a non-empty string")
    return out


def convert_state_dict(
    tensors: Mapping[str, Any],
    *,
    format: str = formats.DEFAULT_VARIANT,
    rule: str = formats.DEFAULT_RULE,
    K: int | None = None,
    theta: int | None = None,
    gain: int | None = None,
    horizon: int | None = None,
    vote_max: int | None = None,
    vote_norm: int | None = None,
    reset: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
):
    """Convert float tensors to an E1TM training checkpoint at step 0 (not yet saved).

    Parameters
    ----------
    tensors : mapping name -> numpy array or torch tensor.
    format : E1TM variant name (``formats.VARIANTS``).
    rule : update rule (``formats.RULES``); ``K``, ``theta``, ``gain``, ``horizon``, ``vote_max``, ``vote_norm``, ``reset`` are its
        integer parameters (None: the default of ``formats.PARAMS``); passing one the rule does not
        take is a ConfigError.
    include : fnmatch patterns (``"*.weight"``); when given, only matching tensors are converted.
        A pattern that matches no tensor is a ConfigError (a typo would silently convert nothing).
    exclude : fnmatch patterns; matching tensors are skipped (applied after ``include``).
    meta : JSON-able mapping stored with the checkpoint (model config etc.).

    By default every floating tensor with ndim >= 1 is converted. Skipped tensors are not stored
    (the checkpoint is integer only) and are listed in ``report.skipped`` with the reason.

    Returns
    -------
    (Checkpoint, ConvertReport); ``Checkpoint.path`` is None until saved.

    Raises
    ------
    ConfigError for an unknown format/rule, bad parameters or patterns, or nothing to convert;
    NonFiniteError naming the tensor if a selected tensor holds NaN/inf.
    """
    gs = formats.variant_gs(format)
    params = formats.rule_params(rule, K=K, theta=theta, gain=gain, horizon=horizon, vote_max=vote_max,
                                 vote_norm=vote_norm, reset=reset)
    scheme = formats.make_scheme(format, rule, **params)
    include = _check_patterns(include, "include")
    exclude = _check_patterns(exclude, "exclude")
    names = list(tensors)
    for pat in include:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            sample = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ConfigError(f"include pattern {pat!r} matches no tensor; tensor names look like: {sample}")
    for pat in exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            log.warning("exclude pattern %r matches no tensor", pat)

    states: dict[str, store.TensorState] = {}
    reports: list[TensorReport] = []
    skipped: list[SkippedTensor] = []
    for name in names:
        w = _as_array(tensors[name])
        shape = tuple(int(d) for d in w.shape)

        def skip(reason: str) -> None:
            skipped.append(SkippedTensor(name, shape, str(w.dtype), reason))
            log.info("skip %s %s: %s", name, shape, reason)

        if include and _matches(name, include) is None:
            skip("not matched by any include pattern")
            continue
        pat = _matches(name, exclude)
        if pat is not None:
            skip(f"excluded by pattern {pat!r}")
            continue
        if w.dtype.kind != "f":
            skip(f"not floating point ({w.dtype})")
            continue
        if w.ndim == 0:
            skip("0-d scalar (E1TM needs at least one dimension)")
            continue
        if w.size == 0:
            skip("empty tensor (a dimension is 0)")
            continue
        arrays, st = ops.convert(w, scheme, name=name)
        states[name] = store.TensorState(name=name, shape=shape, arrays=arrays)
        groups = int(arrays["E"].size)
        reports.append(TensorReport(name, shape, st.rel_l2, groups, st.zero_groups, st.clipped))
        log.debug("convert %s %s: rel_l2=%.4f zero_groups=%d clipped=%d", name, shape, st.rel_l2, st.zero_groups, st.clipped)
        if st.clipped:
            log.warning("%s: %d group scale(s) fell outside 2**-128..2**127 and were clipped", name, st.clipped)

    if not states:
        raise ConfigError(
            f"no tensor selected for conversion out of {len(names)} "
            "(check include/exclude patterns; only floating tensors with ndim >= 1 are converted)"
        )
    notes = (AVERAGE_NOTE,) if rule == "average" else ()
    for n in notes:
        log.info("%s", n)
    ckpt_meta = dict(meta or {})
    ckpt_meta["converted"] = {
        "tensors": len(states),
        "skipped": [s.name for s in skipped],
    }
    ckpt = store.Checkpoint(
        kind="e1tm",
        format=format,
        gs=gs,
        rule=rule,
        rule_params=dict(params),
        fused=False,
        step_counter=0,
        tensors=states,
        meta=ckpt_meta,
        path=None,
    )
    report = ConvertReport(format, gs, rule, dict(params), tuple(reports), tuple(skipped), notes)
    return ckpt, report


def _new_run_dir(out_run_dir) -> Path:
    out = Path(out_run_dir)
    if out.exists() and (not out.is_dir() or any(not store.is_bookkeeping(p.name) for p in out.iterdir())):
        raise ConfigError(
            f"output '{out}' already exists and is not an empty directory; convert writes a new run "
            "(choose a new --out, or remove the old one)"
        )
    return out


def convert_file(
    src: str | os.PathLike,
    out_run_dir: str | os.PathLike,
    **opts: Any,
) -> ConvertReport:
    """Read a float checkpoint file, convert it, and save it at step 0 in a new run dir ``out_run_dir``.

    ``out_run_dir`` must not exist or be an empty directory (a ConfigError otherwise: a step-0
    checkpoint must not land in a run that already has a history).

    ``opts`` are the keyword arguments of :func:`convert_state_dict`. Non-floating entries of the
    file appear in ``report.skipped``. The source file is recorded in the checkpoint meta
    (``converted.source``).
    """
    out = _new_run_dir(out_run_dir)
    tensors, dropped = _read_float_state(src)
    meta = dict(opts.pop("meta", None) or {})
    ckpt, report = convert_state_dict(tensors, meta=meta, **opts)
    ckpt.meta["converted"]["source"] = os.fspath(src)
    extra = tuple(dropped)
    ckpt.meta["converted"]["skipped"] = [s.name for s in extra] + ckpt.meta["converted"]["skipped"]
    with store.run_lock(out):  # one writer per run dir: a concurrent writer of out_run_dir gets RunLockedError
        path = store.save_checkpoint(out, ckpt)
    log.info("saved %d tensors (%s, rule %s) to %s", len(report.tensors), report.format, report.rule, path)
    return ConvertReport(
        report.format, report.gs, report.rule, report.rule_params, report.tensors,
        extra + report.skipped, report.notes, source=os.fspath(src), path=os.fspath(path),
    )


KEPT_FLOAT_REASON = "kept float and frozen (a bias, or the final norm of a tied head): the checkpoint's float part"


def convert_hf_dir(
    src: str | os.PathLike,
    out_run_dir: str | os.PathLike,
    *,
    format: str = formats.DEFAULT_VARIANT,
    rule: str = formats.DEFAULT_RULE,
    K: int | None = None,
    theta: int | None = None,
    gain: int | None = None,
    horizon: int | None = None,
    vote_max: int | None = None,
    vote_norm: int | None = None,
    reset: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    context: int | None = None,
    head: str = "keep",
    seed: int = 0,
) -> ConvertReport:
    """Convert a local Hugging Face causal-LM directory into a new E1TM run ``out_run_dir`` at step 0.

    The model is loaded in float32 (arbs.models.hf: config.json + safetensors, a supported model_type,
    checked against this machine's memory first), its norm gains folded into the layers reading them
    (``hf.fold_``), then every Linear/Embedding weight is converted by ``arbs.nn.ternarize_`` (tensor names:
    ``hf.`` + the HF names). What stays float (biases, the final norm of a tied head; ``report.skipped``)
    goes into the checkpoint's float part; ``meta`` records the HF config and the tokenizer (if the
    directory has ``tokenizer.json``), so ``arbs eval``/``arbs generate`` work on the result.
    --include/--exclude do not apply: the model converts whole. ``head``: see ``hf.fold_``.
    """
    from . import nn as arbs_nn
    from .models import hf

    if include or exclude:
        raise ConfigError("--include/--exclude select tensors of a weights file; a Hugging Face model directory "
                          "converts whole (every Linear and Embedding weight)")
    out = _new_run_dir(out_run_dir)
    source = hf.read_source(src, tokenizer=False)
    hf.check_memory(source, context=context)
    model_meta, record = hf.run_record(source, context=context, head=head)
    params = formats.rule_params(rule, K=K, theta=theta, gain=gain, horizon=horizon, vote_max=vote_max,
                                 vote_norm=vote_norm, reset=reset)
    gs = formats.variant_gs(format)
    model, fold = hf.load_folded(source, context=model_meta["context"], head=head)
    stats: dict = {}
    model = arbs_nn.ternarize_(model, format, rule, **params, seed=seed, report=stats)
    tensors = {n: store.TensorState(name=n, shape=shape, arrays=arrays)
               for n, (shape, arrays) in arbs_nn.tensor_states(model).items()}
    floats = {n: p.detach().cpu().float().numpy().copy() for n, p in model.named_parameters()}
    reports = tuple(TensorReport(n, t.shape, stats[n].rel_l2, int(t.arrays["E"].size), stats[n].zero_groups,
                                 stats[n].clipped) for n, t in tensors.items())
    skipped = tuple(SkippedTensor(n, tuple(a.shape), "float32", KEPT_FLOAT_REASON) for n, a in floats.items())
    meta = {
        "format": format, "rule": rule, "rule_params": dict(params), "seed": int(seed), "init": None,
        "model": model_meta, "hf": record,
        "converted": {"source": os.fspath(src), "tensors": len(tensors), "skipped": [],
                      "kept_float": sorted(floats), "folded": [n for n, _ in fold.folded], "head": fold.head},
    }
    ckpt = store.Checkpoint(kind="e1tm", format=format, gs=gs, rule=rule, rule_params=dict(params), fused=False,
                            step_counter=0, tensors=tensors, meta=meta, float_params=floats)
    notes = (AVERAGE_NOTE,) if rule == "average" else ()
    with store.run_lock(out):
        path = store.save_checkpoint(out, ckpt)
    log.info("saved %d tensors (%s, rule %s) and %d float parameters to %s", len(tensors), format, rule,
             len(floats), path)
    return ConvertReport(format, gs, rule, dict(params), reports, skipped, notes, source=os.fspath(src),
                         path=os.fspath(path))
