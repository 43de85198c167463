"""Whole-model operations on E1TM layers: ternarize_, step, accumulate, the fuse phase, state in and out.

Usage::

    clock = arbs.nn.ternarize_(model, format="E1TM32", rule="flip")
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()          # votes happen here, layer by layer
        arbs.nn.step(model)      # flushes pending votes, step_counter += 1
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from .. import formats, ops
from ..errors import ConfigError
from .layers import Clock, E1TMEmbedding, E1TMLinear, E1TMWeight, e1tm_modules, model_clock


def ternarize_(
    model: nn.Module,
    format: str = formats.DEFAULT_VARIANT,
    rule: str = formats.DEFAULT_RULE,
    *,
    K: int | None = None,
    theta: int | None = None,
    gain: int | None = None,
    horizon: int | None = None,
    vote_max: int | None = None,
    seed: int = 0,
    include=lambda name, module: True,
    report: dict | None = None,
) -> Clock:
    """Turn the nn.Linear and nn.Embedding layers of ``model`` into E1TM form, in place.

    Each weight is converted with the convert rule (ops.convert) at step 0. Embeddings keep an
    ``attend`` method if the original had one (a tied head). A Linear bias stays a float Parameter,
    trained by the user's own optimizer (it is not part of an E1TM checkpoint).

    Parameters
    ----------
    model : the module to change in place.
    format, rule, K, theta, gain, horizon, vote_max : the E1TM variant and update rule with its integer
        parameters (formats.RULES, formats.PARAMS; None takes the table's default; for flip pass
        ``horizon=<your step count>`` to end the vote schedule there, as ``arbs train`` does).
    seed : keys the flip rule's stochastic votes (with each tensor's index and the step).
    include : callable(name, module) -> bool selecting layers to convert.
    report : optional dict filled with name -> ops.ConvertStats.

    Returns
    -------
    Clock shared by all converted layers; ``step(model)`` advances it.
    """
    clock = Clock(formats.make_scheme(format, rule, K=K, theta=theta, gain=gain, horizon=horizon, vote_max=vote_max),
                  seed=int(seed))
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, E1TMWeight) and include(name, m)
    ]
    for name, m in targets:
        w = m.weight.detach().float().cpu().numpy()
        state, stats = ops.convert(w, clock.scheme, name=f"{name}.weight")
        if report is not None:
            report[f"{name}.weight"] = stats
        if isinstance(m, nn.Embedding):
            new = E1TMEmbedding(m.num_embeddings, m.embedding_dim, clock, state)
        else:
            new = E1TMLinear(m.in_features, m.out_features, clock, state, bias=m.bias)
        _set_submodule(model, name, new)
    for i, m in enumerate(e1tm_modules(model).values()):
        m.tensor_index = i
    return clock


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def enter_fuse_phase_(model: nn.Module) -> dict[str, int]:
    """Start the fuse phase: every E1TM tensor's scale becomes its fused value (E = rint(E + Xi), clipped
    to int8; corr_accum = 0) and later votes leave E and corr_accum alone, so the model trained from
    here on is exactly the one ``fuse`` exports. Idempotent. Returns {'groups', 'clipped', 'changed'}."""
    clock = model_clock(model)
    out = {"groups": 0, "clipped": 0, "changed": 0}
    with torch.no_grad():
        for m in e1tm_modules(model).values():
            arrays = _cpu_arrays(m)
            E_fused, st = ops.fuse(arrays, m.shape, clock.scheme, clock.step_counter)
            m.E.copy_(torch.from_numpy(E_fused))
            m.corr_accum.zero_()
            for k in out:
                out[k] += getattr(st, k)
    clock.fuse_phase = True
    return out


def step(model: nn.Module) -> int:
    """End one training step: vote any pending summed gradients, then step_counter += 1. Returns it."""
    clock = model_clock(model)
    for m in e1tm_modules(model).values():
        m.flush()
    if clock.device_counts is not None or clock.sched is not None:  # state on a GPU
        from . import cuda

        cuda.read_counts(clock)
        clock.step_counter += 1
        cuda.write_sched(clock)
    else:
        clock.step_counter += 1
    return clock.step_counter


@contextlib.contextmanager
def accumulate(model: nn.Module):
    """Within this block gradients of several backward passes are summed; ``step(model)`` votes once."""
    clock = model_clock(model)
    clock.accumulating = True
    try:
        yield
    finally:
        clock.accumulating = False


def tensor_states(model: nn.Module) -> dict[str, tuple[tuple[int, ...], dict[str, np.ndarray]]]:
    """``"<module>.weight" -> (shape, arrays)`` copies of every E1TM weight's integer state."""
    return {
        f"{name}.weight": (m.shape, {k: v.copy() for k, v in _cpu_arrays(m).items()})
        for name, m in e1tm_modules(model).items()
    }


def _cpu_arrays(m: E1TMWeight) -> dict[str, np.ndarray]:
    return {name: getattr(m, name).detach().cpu().numpy() for name in m.clock.scheme.arrays()}


def load_tensor_states(model: nn.Module, states: dict[str, dict[str, np.ndarray]], step_counter: int) -> None:
    """Copy integer arrays (``"<module>.weight" -> arrays``) into the model's E1TM layers."""
    mods = {f"{n}.weight": m for n, m in e1tm_modules(model).items()}
    missing, extra = set(mods) - set(states), set(states) - set(mods)
    if missing or extra:
        raise ConfigError(
            f"checkpoint tensors do not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    for name, m in mods.items():
        arrays = states[name]
        for k in m.clock.scheme.arrays():
            a = np.asarray(arrays[k])
            buf = getattr(m, k)
            if tuple(a.shape) != tuple(buf.shape):
                raise ConfigError(f"tensor {name!r} array {k!r} has shape {a.shape}; the model needs {tuple(buf.shape)}")
            buf.copy_(torch.from_numpy(a))
    model_clock(model).step_counter = int(step_counter)
